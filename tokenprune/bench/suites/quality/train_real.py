"""Train the quality harness's LLaVA around a real decoder (SmolLM2-135M) on CPU: tower, projector, LoRA.

The decoder's pretrained weights stay frozen (LLaVA's stage 1); what learns is the harness's
CLIP-style vision tower (alone, first), the two-layer projector and a low-rank adapter on the
decoder's attention projections (:mod:`.real`). Three stages, each cached in a work directory so a
crash or a budget stop loses nothing and later runs reuse earlier stages:

1. ``vision.pt`` — :func:`train.train_vision` (dense per-patch targets plus the shape of the
   covering object on object patches, which the small harness's tower never learned);
2. ``pool.pt`` — tower features of a pool of training scenes, computed once (the tower is frozen
   from here on);
3. ``language.pt`` — projector + LoRA on multi-turn conversations about pool scenes (loss on the
   answers), most steps on image blocks pruned to the objects plus some background with re-indexed
   positions (what a pre-LLM method hands the decoder, and 3-5x cheaper than 576 tokens through 30
   layers), plus a feature-alignment loss: an object's projected patches point, by cosine, along
   the decoder's embeddings of the words that describe it. Checkpointed every ``--save-every`` steps
   and resumed from the last checkpoint.

The frozen decoder runs in bfloat16 (about twice as fast as float32 on CPUs with AVX-512 BF16).
The result is an adapter directory (:func:`real.save_adapter`): a few MB, no decoder weights::

    python -m tokenprune.bench.suites.quality.train_real --work /tmp/quality-smollm2 \\
        --out tokenprune/bench/suites/quality/model_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from tokenprune.bench.suites.quality import data, real
from tokenprune.bench.suites.quality.train import (NUM_IMAGE_TOKENS, AttentionProbe, Conversations,
                                                   build_processor, cosine, image_pool, optimizer_step, pad_right,
                                                   scene_features, train_vision)

VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              image_size=data.IMAGE_SIZE, patch_size=14, projection_dim=64)
DEFAULT_OUT = Path(__file__).parent / "model_smollm2"


def image_block(objects: torch.Tensor, rng: random.Random, background: Optional[int]) -> torch.Tensor:
    """Raster indices of the image tokens a training or validation step keeps: all 576 when
    ``background`` is None, else every object patch plus ``background`` random background patches."""
    if background is None:
        return torch.arange(NUM_IMAGE_TOKENS)
    rest = (objects < 0).nonzero().flatten().tolist()
    extra = rng.sample(rest, min(len(rest), background))
    return torch.tensor(sorted((objects >= 0).nonzero().flatten().tolist() + extra))


def embed_batch(model, conversations: Conversations, blocks: list[torch.Tensor], conversations_ids: list[list[int]],
                labels: list[list[int]]):
    """``(inputs_embeds, attention_mask, labels)`` of right-padded conversations whose image
    placeholders take the projected patch features ``blocks`` (one ``[k, D_vision]`` per row)."""
    pad = conversations.tokenizer.pad_token_id
    ids = pad_right(conversations_ids, pad)
    mask = pad_right([[1] * len(r) for r in conversations_ids], 0)
    image_embeds = model.model.multi_modal_projector(torch.cat(blocks))
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == conversations.image_token_id).unsqueeze(-1), image_embeds.to(embeds.dtype))
    return embeds, mask, pad_right(labels, -100), image_embeds


def answer_logits(model, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """Logits ``[A, V]`` (float32) at the positions that predict a labelled token, and those labels ``[A]``."""
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    answered = labels[:, 1:] != -100
    return model.lm_head(hidden[:, :-1][answered]).float(), labels[:, 1:][answered]


@torch.no_grad()
def val_accuracy(model, conversations: Conversations, samples: list[data.Sample], features: torch.Tensor,
                 objects: torch.Tensor, background: Optional[int], batch: int = 8) -> dict:
    """Teacher-forced exact match of every answer token (the ``</s>`` excluded), overall and per
    question type, with the image block of :func:`image_block` (``background`` None = all 576)."""
    rng = random.Random("val")
    correct: list[bool] = []
    for start in range(0, len(samples), batch):
        rows, labs, blocks, spans = [], [], [], []
        for i in range(start, min(start + batch, len(samples))):
            kept = image_block(objects[i].long(), rng, background)
            ids, lab, _ = conversations.encode([samples[i]], len(kept))
            n = sum(x != -100 for x in lab) - 1  # answer tokens, without the end of turn
            rows.append(ids)
            labs.append(lab)
            blocks.append(features[i, kept].float())
            spans.append(n)
        embeds, mask, labels, _ = embed_batch(model, conversations, blocks, rows, labs)
        logits, targets = answer_logits(model, embeds, mask, labels)
        hits = (logits.argmax(-1) == targets).tolist()
        at = 0
        for n in spans:
            correct.append(all(hits[at : at + n]))
            at += n + 1
    out = {"acc": round(sum(correct) / len(correct), 4)}
    for qtype in data.QUESTION_TYPES:
        got = [c for c, s in zip(correct, samples) if s.qtype == qtype]
        out[qtype] = round(sum(got) / len(got), 3) if got else None
    return out


def alignment_loss(image_embeds: torch.Tensor, words: torch.Tensor, embeddings: torch.Tensor,
                   groups: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Cross-entropy of each object patch's projected vector ``[N, D]`` against the words describing
    its object (``words``: [N, 4] indices into ``groups``, -1 = background), by cosine / temperature."""
    v = F.normalize(image_embeds.float(), dim=-1)
    loss = v.new_zeros(())
    for group, target in zip(groups, words.T):
        keep = target >= 0
        if keep.any():
            logits = v[keep] @ F.normalize(embeddings[group].float(), dim=-1).T / temperature
            loss = loss + F.cross_entropy(logits, target[keep]) / len(groups)
    return loss


def align_projector(model, conversations: Conversations, scenes: list[data.Scene], features: torch.Tensor,
                    object_maps: torch.Tensor, steps: int, batch: int, lr: float, temperature: float, seed: int,
                    log: list, log_every: int = 50) -> None:
    """Stage 3a, no decoder involved (seconds, not hours): the projector alone learns
    :func:`alignment_loss` on whole pool images plus a norm match (projected patches as long as the
    decoder's word embeddings on average), so the language stage starts from image tokens that
    read like the words of their objects (LLaVA's stage 1 in spirit, at a fraction of its cost)."""
    projector = model.model.multi_modal_projector
    params = list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, max(1, steps // 20)))
    embeddings = model.get_input_embeddings().weight.float()
    norm = embeddings[: -1].norm(dim=-1).mean()  # without the <image> row (zeros)
    rng = random.Random(f"align/{seed}")
    start = time.time()
    for step in range(1, steps + 1):
        picks = [rng.randrange(len(scenes)) for _ in range(batch)]
        image_embeds = projector(torch.cat([features[i].float() for i in picks]))
        words = torch.cat([conversations.patch_words(scenes[i], object_maps[i].long()) for i in picks])
        loss_align = alignment_loss(image_embeds, words, embeddings, conversations.word_groups, temperature)
        loss_norm = (image_embeds.norm(dim=-1) / norm - 1).pow(2).mean()
        optimizer_step(opt, sched, params, loss_align + loss_norm)
        if step % log_every == 0 or step == steps:
            entry = {"stage": "align", "step": step, "align": round(loss_align.item(), 4),
                     "norm": round(loss_norm.item(), 4), "elapsed_s": round(time.time() - start, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)


def train_language(model, conversations: Conversations, scenes: list[data.Scene], features: torch.Tensor,
                   object_maps: torch.Tensor, params: list[torch.nn.Parameter], opt, sched, state: dict,
                   steps: int, batch: int, turns: int, prune_p: float, background: tuple[int, int],
                   align_weight: float, temperature: float, val: tuple, log: list, checkpoint, save_every: int,
                   log_every: int, val_every: int, minutes: Optional[float], attention_weight: float = 0.0,
                   retrieve_layer: int = 10, read_layer: int = 14, content_weight: float = 0.0) -> None:
    """Stage 3: projector + LoRA learn to answer; decoder frozen. Resumes at ``state["step"]``.

    Trained on the answers alone, the frozen decoder with LoRA stayed at the language prior (colour
    questions at chance after 200 steps, docs/quality.md), as the small harness did; what the small
    harness needed was a target per hop of the routing circuit, and so does this one:

    * ``attention_weight`` > 0 — *retrieve*: heads 0 and 1 of layer ``retrieve_layer`` at each anchor
      of a question (:meth:`Conversations.anchors`: the token that ends the mention of an object,
      e.g. the ``3`` of ``cell b3``) attend to the patches of the object it names (not for counts);
      *read*: heads 0 and 1 of layer ``read_layer`` at the answer-predicting position attend to the
      first and the last anchor. The answer position's attention to image tokens, which FastV scores
      with, is never supervised.
    * ``content_weight`` > 0 — the anchor's hidden state after ``retrieve_layer``, read through the
      decoder's final norm and tied embeddings (the logit lens), names the colour and the shape of
      the object it retrieved (the retrieval heads must copy what they attend to), and the answer
      position's hidden state after ``read_layer`` names the answer among :data:`data.ANSWERS` (the
      read heads must copy it on; the layers above only have to keep it).
    """
    rng = random.Random()
    rng.setstate(state["rng"])
    decoder = model.model.language_model
    embeddings = model.get_input_embeddings().weight
    groups = conversations.word_groups
    answer_words = torch.tensor([conversations.answer_token(a) for a in data.ANSWERS])
    probes = {}
    if attention_weight:
        probes = {"retrieve": AttentionProbe(decoder.layers[retrieve_layer].self_attn),
                  "read": AttentionProbe(decoder.layers[read_layer].self_attn)}
    start, tokens = time.time(), 0
    for step in range(state["step"] + 1, steps + 1):
        pruned = rng.random() < prune_p
        rows, labels, blocks, words = [], [], [], []
        targets: dict[str, list] = {"retrieve": [], "read": [], "content": [], "answer": []}
        for row in range(batch):
            index = rng.randrange(len(scenes))
            objects = object_maps[index].long()
            kept = image_block(objects, rng, rng.randint(*background) if pruned else None)
            samples = data.ask(scenes[index], rng, turns)
            ids, lab, spans = conversations.encode(samples, len(kept))
            image_start = ids.index(conversations.image_token_id)
            for s, (question, answer) in zip(samples, spans):
                anchors = conversations.anchors(ids, s, question, answer)
                if s.refs and s.qtype != "count":
                    for k, anchor in enumerate(anchors):
                        hit = image_start + torch.isin(objects[kept], torch.tensor(s.refs[k])).nonzero().flatten()
                        if len(hit):
                            targets["retrieve"] += [(row, anchor, head, hit) for head in (0, 1)]
                            o = scenes[index].objects[s.refs[k][0]]
                            targets["content"].append((row, anchor, list(data.COLORS).index(o.color),
                                                       data.SHAPES.index(o.shape)))
                targets["read"] += [(row, answer - 1, 0, torch.tensor(anchors[:1])),
                                    (row, answer - 1, 1, torch.tensor(anchors[-1:]))]
                targets["answer"].append((row, answer - 1, data.ANSWERS.index(s.answer)))
            rows.append(ids)
            labels.append(lab)
            blocks.append(features[index, kept].float())
            words.append(conversations.patch_words(scenes[index], objects[kept]))
        embeds, mask, labels_t, image_embeds = embed_batch(model, conversations, blocks, rows, labels)
        out = decoder(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=content_weight > 0)
        answered = labels_t[:, 1:] != -100
        loss_lm = F.cross_entropy(model.lm_head(out.last_hidden_state[:, :-1][answered]).float(), labels_t[:, 1:][answered])
        losses = {"align": alignment_loss(image_embeds, torch.cat(words), embeddings, groups, temperature)}
        weights = {"align": align_weight, "retrieve": attention_weight, "read": attention_weight,
                   "content": content_weight, "answer": content_weight}
        for key, probe in probes.items():
            if targets[key]:
                losses[key] = probe.target_loss(targets[key], mask)
        if content_weight and targets["content"]:
            r, pos, color, shape = (torch.tensor(x) for x in zip(*targets["content"]))
            lens = decoder.norm(out.hidden_states[retrieve_layer + 1][r, pos]).float()
            losses["content"] = (F.cross_entropy(lens @ embeddings[groups[0]].float().T, color)
                                 + F.cross_entropy(lens @ embeddings[groups[1]].float().T, shape)) / 2
        if content_weight and targets["answer"]:
            r, pos, word = (torch.tensor(x) for x in zip(*targets["answer"]))
            lens = decoder.norm(out.hidden_states[read_layer + 1][r, pos]).float()
            losses["answer"] = F.cross_entropy(lens @ embeddings[answer_words].float().T, word)
        optimizer_step(opt, sched, params, loss_lm + sum(weights[k] * v for k, v in losses.items()))
        tokens += int(mask.sum())
        state["step"] = step
        elapsed = time.time() - start
        if step % log_every == 0 or step == steps:
            entry = {"stage": "language", "step": step, "loss": round(loss_lm.item(), 4),
                     **{k: round(v.item(), 4) for k, v in losses.items()}, "pruned": pruned,
                     "lr": round(sched.get_last_lr()[0], 6), "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                     "elapsed_s": round(state["seconds"] + elapsed, 1)}
            if val_every and (step % val_every == 0 or step == steps):
                entry["val"] = val_accuracy(model, conversations, *val)
            log.append(entry)
            print(json.dumps(entry), flush=True)
        stop = minutes is not None and elapsed > 60 * minutes
        if step % save_every == 0 or step == steps or stop:
            state["rng"] = rng.getstate()
            checkpoint(step, elapsed)
        if stop:
            print(f"stopping at step {step}: {minutes} min budget reached", flush=True)
            break
    for probe in probes.values():
        probe.remove()
    state["seconds"] += time.time() - start


def build(decoder_dir: Path, seed: int, lora_rank: int, lora_scale: float, lora_targets: tuple[str, ...]):
    """The model to train: frozen bfloat16 decoder (about twice as fast as float32 forward and
    backward on CPUs with AVX-512 BF16), float32 tower, projector and LoRA factors."""
    tokenizer = real.build_tokenizer(decoder_dir)
    torch.manual_seed(seed)
    model = real.build_model(decoder_dir, VISION, tokenizer)
    model.model.language_model.to(torch.bfloat16)  # lm_head is tied to its embeddings
    for p in model.parameters():
        p.requires_grad_(False)
    lora = real.add_lora(model, lora_rank, lora_scale, lora_targets)
    return model, tokenizer, lora


def train(out: Path, work: Path, seed: int = 0, vision_steps: int = 1200, vision_batch: int = 8,
          vision_lr: float = 2e-3, object_shape: float = 1.0, pool: int = 2048, align_steps: int = 500,
          steps: int = 600, batch: int = 4,
          turns: int = 8, lr: float = 1e-3, prune_p: float = 0.9, background: tuple[int, int] = (8, 64),
          align_weight: float = 1.0, temperature: float = 0.1, lora_rank: int = 8, lora_scale: float = 2.0,
          lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), val_n: int = 64,
          val_background: int = 32, save_every: int = 25, log_every: int = 5, val_every: int = 50,
          minutes: Optional[float] = None, attention_weight: float = 0.5, retrieve_layer: int = 10,
          read_layer: int = 14, content_weight: float = 0.5, threads: int = 1) -> dict:
    """All three stages (each skipped when its file in ``work`` exists); writes the adapter to ``out``."""
    torch.set_num_threads(threads)
    random.seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    decoder_dir = real.decoder_path("smollm2")
    model, tokenizer, lora = build(decoder_dir, seed, lora_rank, lora_scale, lora_targets)
    conversations = Conversations(tokenizer)
    processor = build_processor(tokenizer)
    conversations.check(processor, data.dataset("val", 4, seed=seed))
    log: list[dict] = []
    tower = model.model.vision_tower

    vision_file = work / "vision.pt"
    if vision_file.exists():
        saved = torch.load(vision_file)
        tower.load_state_dict(saved["tower"])
        log += saved["log"]
        t_vision = saved["seconds"]
    else:
        for p in tower.parameters():
            p.requires_grad_(True)
        t0 = time.time()
        train_vision(model, vision_steps, vision_batch, vision_lr, seed, log, object_shape=object_shape)
        t_vision = time.time() - t0
        for p in tower.parameters():
            p.requires_grad_(False)
        torch.save({"tower": tower.state_dict(), "log": list(log), "seconds": t_vision,
                    "steps": vision_steps, "object_shape": object_shape}, vision_file)
    tower.eval()

    pool_file = work / "pool.pt"
    if pool_file.exists():
        saved = torch.load(pool_file)
        features, objects, t_pool = saved["features"], saved["objects"], saved["seconds"]
        scenes = [data.scene("train", i, seed) for i in range(len(features))]
    else:
        t0 = time.time()
        scenes, features, objects = image_pool(model, pool, seed)
        features = features.half()
        t_pool = time.time() - t0
        torch.save({"features": features, "objects": objects, "seconds": t_pool}, pool_file)

    val_samples = data.dataset("val", val_n, seed=seed)
    val_features, val_objects = scene_features(model, [s.scene for s in val_samples])
    val = (val_samples, val_features, val_objects, val_background)

    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    align_file = work / "align.pt"
    if align_file.exists():
        saved = torch.load(align_file)
        projector.load_state_dict(saved["projector"])
        log += saved["log"]
        t_align = saved["seconds"]
    else:
        t0, before = time.time(), len(log)
        align_projector(model, conversations, scenes, features, objects, align_steps, 16, 2e-3, temperature, seed, log)
        t_align = time.time() - t0
        torch.save({"projector": projector.state_dict(), "log": log[before:], "seconds": t_align}, align_file)
    params = list(projector.parameters()) + lora
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(max(1, steps), max(1, steps // 20)))
    state = {"step": 0, "seconds": 0.0, "rng": random.Random(f"language/{seed}").getstate()}
    language_file = work / "language.pt"
    if language_file.exists():
        saved = torch.load(language_file, weights_only=False)
        projector.load_state_dict(saved["projector"])
        for p, value in zip(lora, saved["lora"]):
            p.data.copy_(value)
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        log = saved["log"]
        print(f"resumed at step {state['step']}", flush=True)

    def checkpoint(step: int, elapsed: float) -> None:
        snapshot = {**state, "seconds": state["seconds"] + elapsed}
        tmp = language_file.with_suffix(".tmp")
        torch.save({"projector": projector.state_dict(), "lora": [p.detach().clone() for p in lora],
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "state": snapshot, "log": log}, tmp)
        os.replace(tmp, language_file)

    model.train()
    train_language(model, conversations, scenes, features, objects, params, opt, sched, state, steps, batch, turns,
                   prune_p, background, align_weight, temperature, val, log, checkpoint, save_every, log_every,
                   val_every, minutes, attention_weight, retrieve_layer, read_layer, content_weight)
    model.eval()
    meta = {
        "decoder": real.DECODERS["smollm2"], "seed": seed,
        "vision": {"steps": vision_steps, "batch": vision_batch, "lr": vision_lr, "object_shape": object_shape},
        "pool": pool, "steps": steps, "steps_done": state["step"], "batch": batch, "turns": turns, "lr": lr,
        "prune_p": prune_p, "background": list(background), "align_weight": align_weight,
        "attention_weight": attention_weight, "retrieve_layer": retrieve_layer, "read_layer": read_layer,
        "content_weight": content_weight,
        "temperature": temperature, "lora": {"rank": lora_rank, "scale": lora_scale, "targets": list(lora_targets)},
        "align_steps": align_steps,
        "threads": threads, "seconds": {"vision": round(t_vision, 1), "pool": round(t_pool, 1), "align": round(t_align, 1),
                                        "language": round(state["seconds"], 1)},
        "trainable_parameters": sum(p.numel() for p in params) + sum(p.numel() for p in tower.parameters()),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "log": log,
    }
    cfg = real.AdapterConfig(decoder="smollm2", vision=VISION, lora_rank=lora_rank, lora_scale=lora_scale,
                             lora_targets=tuple(lora_targets))
    real.save_adapter(model, out, cfg, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, required=True, help="stage files and the resumable checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=1200)
    parser.add_argument("--object-shape", type=float, default=1.0, help="weight of the object-patch shape loss")
    parser.add_argument("--pool", type=int, default=2048)
    parser.add_argument("--align-steps", type=int, default=500, help="projector-only alignment steps (no decoder)")
    parser.add_argument("--steps", type=int, default=600, help="language-stage steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prune-p", type=float, default=0.9)
    parser.add_argument("--background", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--align-weight", type=float, default=1.0)
    parser.add_argument("--attention-weight", type=float, default=0.5,
                        help="weight of the grounding supervision (anchor -> named object's patches; 0 = answers only)")
    parser.add_argument("--retrieve-layer", type=int, default=10, help="decoder layer whose heads 0-1 are grounded")
    parser.add_argument("--read-layer", type=int, default=14, help="decoder layer whose heads 0-1 read the anchors")
    parser.add_argument("--content-weight", type=float, default=0.5,
                        help="weight of the logit-lens target at the anchors after the retrieve layer")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-scale", type=float, default=2.0)
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--val-n", type=int, default=64)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--minutes", type=float, default=None, help="stop the language stage after this wall time")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = train(args.out, args.work, seed=args.seed, vision_steps=args.vision_steps, object_shape=args.object_shape,
                 pool=args.pool, align_steps=args.align_steps, steps=args.steps, batch=args.batch, turns=args.turns, lr=args.lr, prune_p=args.prune_p,
                 background=tuple(args.background), align_weight=args.align_weight, lora_rank=args.lora_rank,
                 lora_scale=args.lora_scale, lora_targets=tuple(args.lora_targets), val_n=args.val_n,
                 attention_weight=args.attention_weight, retrieve_layer=args.retrieve_layer,
                 read_layer=args.read_layer, content_weight=args.content_weight, val_every=args.val_every, log_every=args.log_every, save_every=args.save_every, minutes=args.minutes, threads=args.threads)
    print(f"saved to {args.out} after {meta['steps_done']} language steps")


if __name__ == "__main__":
    main()
