"""Train the quality harness's LLaVA around a real decoder (SmolLM2-135M) on CPU: tower, projector, LoRA.

The decoder's pretrained weights stay frozen (bfloat16); what learns is the harness's CLIP-style
vision tower (alone, first), the two-layer projector and a low-rank adapter (:mod:`.real`). The
tower uses **28-px patches: 12x12 = 144 image tokens** (the scenes stay 336 px), a quarter of
LLaVA-1.5's 576, because a 30-layer decoder trained and evaluated on two CPU cores cannot afford
576 image tokens per question (measured: 0.36 s per 170-token sequence forward + backward in
bfloat16, 0.78 s at 300). Stages, each cached in a work directory (a crash or a budget stop loses
nothing; a rerun reuses finished stages and resumes the last from its checkpoint):

1. ``vision.pt`` — :func:`train.train_vision`: dense per-patch targets (colour, shape, grid row and
   column, object centre), the shape of the covering object on object patches, and [CLS] presence;
2. ``pool.pt`` — tower features of a pool of training scenes, computed once (the tower is frozen
   from here on, as CLIP is in LLaVA);
3. ``align.pt`` — the projector alone (seconds): an object's projected patches point, by cosine,
   along the decoder's embeddings of the words that name it (colour, shape, row letter, column
   digit), at the embeddings' norm: image tokens start out reading like words (LLaVA's stage 1 in
   spirit);
4. ``language.pt`` — projector + LoRA on conversations about pool scenes: several questions about
   one image (loss on the answers), and, in a fraction of the rows, a *description* turn listing
   every object as ``b3 red circle`` in reading order (dense supervision of what every image token
   holds, as LLaVA's captioning stage gives). Descriptions are never in a question's context.

The result is an adapter directory (:func:`real.save_adapter`; a few MB, no decoder weights)::

    python -m tokenprune.bench.suites.quality.train_real --work .cache/quality-smollm2 \\
        --out tokenprune/bench/suites/quality/model_smollm2 --force

(``--force``: the default ``--out`` holds the shipped adapter; without it a non-empty ``--out`` is refused.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from tokenprune.bench.suites.quality import data, real
from tokenprune.bench.suites.quality.train import (Conversations, cosine, image_pool, optimizer_step, pad_right,
                                                   scene_features, train_vision)

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              image_size=data.IMAGE_SIZE, patch_size=28, projection_dim=64)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_OUT = Path(__file__).parent / "model_smollm2"
DESCRIBE = "describe the image ."


def describe(scene: data.Scene) -> str:
    """The description target: every object as ``<cell> <colour> <shape>``, in reading order."""
    objects = sorted(scene.objects, key=lambda o: (o.row, o.col, o.cx))
    return " , ".join(f"{data.cell_name(o)} {o.color} {o.shape}" for o in objects)


def encode_description(conversations: Conversations, scene: data.Scene, num_image_tokens: int
                       ) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of ``USER: <image>*k\\ndescribe the image . ASSISTANT: <description></s>``:
    a one-turn conversation of :meth:`Conversations.encode` (it reads only the question and answer)."""
    ids, labels, _ = conversations.encode([SimpleNamespace(question=DESCRIBE, answer=describe(scene))],
                                          num_image_tokens)
    return ids, labels


def embed_batch(model, image_token_id: int, pad_id: int, rows: list[list[int]], labels: list[list[int]],
                features: list[torch.Tensor]):
    """``(inputs_embeds, attention_mask, labels)`` of right-padded rows whose image placeholders take
    the projected patch features (``features``: one ``[k, D_vision]`` per row)."""
    ids = pad_right(rows, pad_id)
    mask = pad_right([[1] * len(r) for r in rows], 0)
    image_embeds = model.model.multi_modal_projector(torch.cat(features).float())
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == image_token_id).unsqueeze(-1), image_embeds.to(embeds.dtype))
    return embeds, mask, pad_right(labels, -100)


def answer_logits(model, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """Logits ``[A, V]`` (float32) at the positions that predict a labelled token, and those labels ``[A]``."""
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    answered = labels[:, 1:] != -100
    return model.lm_head(hidden[:, :-1][answered]).float(), labels[:, 1:][answered]


@torch.no_grad()
def val_accuracy(model, conversations: Conversations, samples: list[data.Sample], features: torch.Tensor,
                 batch: int = 16) -> dict:
    """Argmax accuracy of the answer token (one question per image, the evaluation prompt), overall
    and per question type."""
    pad = conversations.tokenizer.pad_token_id
    correct: list[bool] = []
    for start in range(0, len(samples), batch):
        chunk = range(start, min(start + batch, len(samples)))
        encoded = [conversations.encode([samples[i]], features.shape[1]) for i in chunk]
        embeds, mask, labels = embed_batch(model, conversations.image_token_id, pad, [e[0] for e in encoded],
                                           [e[1] for e in encoded], [features[i] for i in chunk])
        logits, targets = answer_logits(model, embeds, mask, labels)
        hits = (logits.argmax(-1) == targets).tolist()
        at = 0
        for e in encoded:  # every token of the answer (`` 3`` may be two), not its </s>
            n = sum(x != -100 for x in e[1])
            correct.append(all(hits[at : at + n - 1]))
            at += n
    out = {"acc": round(sum(correct) / len(correct), 4)}
    for qtype in data.QUESTION_TYPES:
        got = [c for c, s in zip(correct, samples) if s.qtype == qtype]
        out[qtype] = round(sum(got) / len(got), 3) if got else None
    return out


def alignment_loss(image_embeds: torch.Tensor, words: torch.Tensor, embeddings: torch.Tensor,
                   groups: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Cross-entropy of each object patch's projected vector ``[N, D]`` against the words naming its
    object (``words``: [N, 4] indices into ``groups``, -1 = background), by cosine / temperature."""
    v = F.normalize(image_embeds.float(), dim=-1)
    loss = v.new_zeros(())
    for group, target in zip(groups, words.T):
        keep = target >= 0
        if keep.any():
            logits = v[keep] @ F.normalize(embeddings[group].float(), dim=-1).T / temperature
            loss = loss + F.cross_entropy(logits, target[keep]) / len(groups)
    return loss


def align_projector(model, conversations: Conversations, scenes: list[data.Scene], features: torch.Tensor,
                    object_maps: torch.Tensor, steps: int, batch: int, lr: float, log: list,
                    temperature: float = 0.1, seed: int = 0) -> None:
    """Stage 3, no decoder involved: the projector learns :func:`alignment_loss` plus a norm match
    (projected patches as long as the decoder's word embeddings on average)."""
    projector = model.model.multi_modal_projector
    params = list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, max(1, steps // 20)))
    embeddings = model.get_input_embeddings().weight.detach().float()
    norm = embeddings[:-1].norm(dim=-1).mean()  # without the <image> row (zeros)
    rng = random.Random(f"align/{seed}")
    start = time.time()
    for step in range(1, steps + 1):
        picks = [rng.randrange(len(scenes)) for _ in range(batch)]
        image_embeds = projector(torch.cat([features[i].float() for i in picks]))
        words = torch.cat([conversations.patch_words(scenes[i], object_maps[i].long()) for i in picks])
        loss_align = alignment_loss(image_embeds, words, embeddings, conversations.word_groups, temperature)
        loss_norm = (image_embeds.norm(dim=-1) / norm - 1).pow(2).mean()
        optimizer_step(opt, sched, params, loss_align + loss_norm)
        if step % 50 == 0 or step == steps:
            entry = {"stage": "align", "step": step, "align": round(loss_align.item(), 4),
                     "norm": round(loss_norm.item(), 4), "elapsed_s": round(time.time() - start, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)


def train_language(model, conversations: Conversations, scenes: list[data.Scene], features: torch.Tensor,
                   params: list[torch.nn.Parameter], opt, sched, state: dict, steps: int, batch: int, turns: int,
                   describe_p: float, val: tuple, log: list, checkpoint, save_every: int, log_every: int,
                   val_every: int, minutes: Optional[float]) -> None:
    """Stage 4: projector + LoRA learn to answer (and describe); decoder frozen. Resumes at ``state["step"]``."""
    rng = random.Random()
    rng.setstate(state["rng"])
    pad = conversations.tokenizer.pad_token_id
    start, tokens = time.time(), 0
    for step in range(state["step"] + 1, steps + 1):
        rows, labels, blocks = [], [], []
        for _ in range(batch):
            index = rng.randrange(len(scenes))
            if rng.random() < describe_p:
                ids, lab = encode_description(conversations, scenes[index], features.shape[1])
            else:
                ids, lab, _ = conversations.encode(data.ask(scenes[index], rng, turns), features.shape[1])
            rows.append(ids)
            labels.append(lab)
            blocks.append(features[index])
        embeds, mask, labs = embed_batch(model, conversations.image_token_id, pad, rows, labels, blocks)
        logits, targets = answer_logits(model, embeds, mask, labs)
        loss = F.cross_entropy(logits, targets)
        optimizer_step(opt, sched, params, loss)
        tokens += int(mask.sum())
        state["step"] = step
        if step % log_every == 0 or step == steps:
            elapsed = time.time() - start
            entry = {"stage": "language", "step": step, "loss": round(loss.item(), 4),
                     "lr": round(sched.get_last_lr()[0], 6), "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                     "elapsed_s": round(state["elapsed_s"] + elapsed, 1)}
            if step % val_every == 0 or step == steps:
                model.eval()
                entry["val"] = val_accuracy(model, conversations, *val)
                model.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)
        over = minutes is not None and (state["elapsed_s"] + time.time() - start) / 60 >= minutes
        if step % save_every == 0 or step == steps or over:
            state["rng"] = rng.getstate()
            state["elapsed_s"] += time.time() - start
            start, tokens = time.time(), 0
            checkpoint()
        if over:
            print(json.dumps({"stage": "language", "stopped": f"--minutes {minutes} reached at step {step}"}), flush=True)
            return


def _record_stage(work: Path, stage: str, seconds: float, log: list) -> None:
    """Keep a finished stage's time and log in ``work/stages.json``: a rerun loads the stage from its
    file, and the adapter's ``training.json`` still reports what it cost."""
    record = _read_stages(work)
    record[stage] = {"seconds": round(seconds, 1), "log": [e for e in log if e["stage"] == stage]}
    (work / "stages.json").write_text(json.dumps(record, indent=1) + "\n")


def _read_stages(work: Path) -> dict:
    path = work / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _trainable_state(model) -> dict[str, torch.Tensor]:
    """Copies of what the language stage trains: ``projector.*`` and the LoRA factors ``lora.*``."""
    state = {"projector." + k: v.detach().clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    state.update(real.lora_state(model))
    return state


def _load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    """Put :func:`_trainable_state` back (in place: the optimizer holds these parameters)."""
    projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict(projector)
    lora = {k: v for k, v in state.items() if k.startswith("lora.")}
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, real.LoRALinear):
            with torch.no_grad():
                module.A.copy_(lora.pop(f"lora.{name}.A"))
                module.B.copy_(lora.pop(f"lora.{name}.B"))
    if lora:
        raise ValueError(f"checkpoint holds LoRA factors the model does not have: {sorted(lora)[:4]}")


def train(work: Path, out: Path, seed: int = 0, vision_steps: int = 1000, vision_batch: int = 16,
          vision_lr: float = 2e-3, pool: int = 4000, align_steps: int = 400, steps: int = 1100, batch: int = 8,
          turns: int = 6, lr: float = 1e-3, describe_p: float = 0.25, lora_rank: int = 16, lora_scale: float = 2.0,
          val_n: int = 192, val_every: int = 100, save_every: int = 50, log_every: int = 10,
          minutes: Optional[float] = None, threads: int = 2, align_batch: int = 32,
          decoder_dir: Optional[Path] = None) -> dict:
    """Run (or resume) the stages in ``work`` and write the adapter to ``out``.

    ``decoder_dir``: the decoder checkpoint (default: SmolLM2-135M from :func:`real.decoder_path`;
    tests pass a tiny random Llama).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    decoder_dir = real.decoder_path("smollm2") if decoder_dir is None else Path(decoder_dir)
    tokenizer = real.build_tokenizer(decoder_dir)
    model = real.build_model(decoder_dir, VISION, tokenizer)
    conversations = Conversations(tokenizer)
    log: list = []

    t = time.time()
    vision_file = work / "vision.pt"
    if vision_file.exists():
        model.model.vision_tower.load_state_dict(torch.load(vision_file))
    else:
        train_vision(model, vision_steps, vision_batch, vision_lr, seed, log, object_shape=1.0)
        torch.save(model.model.vision_tower.state_dict(), vision_file)
        _record_stage(work, "vision", time.time() - t, log)

    t = time.time()
    pool_file = work / "pool.pt"
    if pool_file.exists():
        scenes = [data.scene("train", i, seed) for i in range(pool)]
        features, object_maps = torch.load(pool_file)
    else:
        scenes, features, object_maps = image_pool(model, pool, seed)
        features = features.to(torch.bfloat16)
        torch.save((features, object_maps), pool_file)
        _record_stage(work, "pool", time.time() - t, log)
    val_samples = data.dataset("val", val_n, seed)
    val_features = scene_features(model, [s.scene for s in val_samples])[0]

    t = time.time()
    align_file = work / "align.pt"
    if align_file.exists():
        model.model.multi_modal_projector.load_state_dict(torch.load(align_file))
    else:
        align_projector(model, conversations, scenes, features, object_maps, align_steps, align_batch, 3e-3, log,
                        seed=seed)
        torch.save(model.model.multi_modal_projector.state_dict(), align_file)
        _record_stage(work, "align", time.time() - t, log)

    # The decoder in bfloat16 (frozen), the projector and the LoRA factors in float32.
    model.model.language_model.to(torch.bfloat16)
    model.lm_head.to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    params = real.add_lora(model, lora_rank, lora_scale, LORA_TARGETS)
    params += list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, max(1, steps // 30)))
    state = {"step": 0, "rng": random.Random(f"language/{seed}").getstate(), "elapsed_s": 0.0, "log": []}
    language_file = work / "language.pt"
    if language_file.exists():
        saved = torch.load(language_file, weights_only=False)
        _load_trainable(model, saved["weights"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        print(json.dumps({"stage": "language", "resumed_at": state["step"]}), flush=True)

    def checkpoint() -> None:
        state["log"] = state["log"] + [e for e in log if e["stage"] == "language"]
        log[:] = [e for e in log if e["stage"] != "language"]
        tmp = language_file.with_suffix(".tmp")
        torch.save({"weights": _trainable_state(model),
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state}, tmp)
        os.replace(tmp, language_file)

    model.train()
    train_language(model, conversations, scenes, features, params, opt, sched, state, steps, batch, turns,
                   describe_p, (val_samples, val_features), log, checkpoint, save_every, log_every, val_every, minutes)
    model.eval()
    final_val = val_accuracy(model, conversations, val_samples, val_features)
    stages = _read_stages(work)
    seconds = {**{k: v["seconds"] for k, v in stages.items()}, "language": round(state["elapsed_s"], 1)}
    meta = {"seed": seed, "vision": VISION, "vision_steps": vision_steps, "vision_batch": vision_batch, "pool": pool,
            "align_steps": align_steps, "steps": steps, "steps_done": state["step"], "batch": batch, "turns": turns,
            "lr": lr, "describe_p": describe_p, "lora_rank": lora_rank, "lora_scale": lora_scale,
            "lora_targets": list(LORA_TARGETS), "decoder": "smollm2", "decoder_dtype": "bfloat16",
            "val_n": val_n, "val": final_val, "threads": threads, "seconds": seconds,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "log": [e for v in stages.values() for e in v["log"]] + state["log"]}
    cfg = real.AdapterConfig(decoder="smollm2", vision=VISION, lora_rank=lora_rank, lora_scale=lora_scale,
                             lora_targets=LORA_TARGETS)
    real.save_adapter(model, out, cfg, meta)
    print(json.dumps({"stage": "done", "val": final_val, "out": str(out)}), flush=True)
    return meta


def main(argv: Optional[list[str]] = None) -> None:
    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="stage files and the resumable checkpoint")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="adapter directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=4000, help="training scenes whose features are cached")
    parser.add_argument("--steps", type=int, default=1100, help="language steps (the cosine schedule's length)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6, help="questions per training conversation")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--describe-p", type=float, default=0.25, help="fraction of rows that describe the image")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--val-n", type=int, default=192)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=None, help="stop the language stage after this long")
    parser.add_argument("--threads", type=int, default=2)
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    # The default --out is the shipped adapter: replacing it (make quality-real-model) takes --force.
    report.check_outputs_or_exit(parser, [("--out", args.out, "directory")], force=args.force)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args.work, args.out, seed=args.seed, vision_steps=args.vision_steps, pool=args.pool, steps=args.steps,
          batch=args.batch, turns=args.turns, lr=args.lr, describe_p=args.describe_p, lora_rank=args.lora_rank,
          val_n=args.val_n, val_every=args.val_every, minutes=args.minutes, threads=args.threads)


if __name__ == "__main__":
    main()
