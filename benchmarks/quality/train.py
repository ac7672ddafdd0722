"""Train the quality harness's small LLaVA-architecture model from scratch, on CPU, deterministically.

The model is a real ``LlavaForConditionalGeneration`` with the LLaVA-1.5 geometry where it matters
for pruning — a CLIP-style vision tower at 336 px with 14-px patches, so **576 image tokens reach
the language model**, features taken from the penultimate vision layer without [CLS]
(``vision_feature_layer=-2``, ``"default"`` strategy), a two-layer GELU projector — and small
widths: vision 64-d x 3 layers, Llama decoder 64-d x 4 layers (so FastV can prune before layer
1, 2 or 3). About 1.2 M parameters, 4.7 MB in float32.

Training data is :mod:`benchmarks.quality.data`: each step takes ``batch`` scenes, each with
``turns`` questions as a multi-turn conversation (``USER: q1\\n<image> ASSISTANT: a1</s>USER: q2
ASSISTANT: a2</s>...``), loss on the answers and their ``</s>``. The first turn is exactly the
evaluation prompt (question, then image: see ``data.PROMPT``); later turns amortise the 576-token
image over more supervision.

Auxiliary losses stand in for CLIP pre-training (their heads are discarded after training):

* dense: each patch token of the feature layer predicts, through linear heads, the colour and
  shape of the object covering its patch (or background) and its grid cell's row and column. From
  scratch, a vision tower reading 576 patches of which a few percent show objects otherwise takes
  far longer than this budget to learn anything; the dense targets also keep visual tokens local,
  as CLIP patch tokens largely are, which is what makes *which* tokens a method keeps matter;
* [CLS]: the pooled [CLS] output (last layer) predicts which (colour, shape) pairs the scene
  contains. Without it the [CLS] query is never trained (LLaVA drops [CLS]) and [CLS]-attention
  methods (VisionZip, HoloV, FlowCut) would score patches with an untrained query.

The output directory holds the checkpoint in the classic llava-hf layout (safetensors keys
``vision_tower.vision_model.*``, which both transformers 5 and vLLM load), the tokenizer (a byte-level
BPE trained here with ``tokenizers``) and a ``LlavaProcessor``::

    python -m benchmarks.quality.train --out benchmarks/quality/model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.quality import data

NUM_IMAGE_TOKENS = (data.IMAGE_SIZE // 14) ** 2  # 576
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE trained on the task's template corpus; every answer is a single token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(data.corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=2048,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    for answer in data.ANSWERS:
        ids = fast(" " + answer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"answer {answer!r} is not a single token ({ids}); enlarge vocab_size")
    return fast


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": data.IMAGE_SIZE},
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        image_size=data.IMAGE_SIZE, patch_size=14, projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, vocab_size=len(tokenizer), max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=NUM_IMAGE_TOKENS,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def pixel_values(images) -> torch.Tensor:
    """[B, 3, 336, 336] CLIP-normalised pixels; equal (to 1e-6) to the saved processor's output
    for 336-px images, which :func:`check_processor` verifies, at a fraction of its cost."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_conversation(tokenizer, samples: list[data.Sample]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside answers) of a multi-turn conversation about one scene.

    The first turn's prompt is tokenised exactly as the processor tokenises an evaluation prompt.
    """
    image = "<image>" * NUM_IMAGE_TOKENS
    ids: list[int] = []
    labels: list[int] = []
    for turn, s in enumerate(samples):
        if turn == 0:
            prompt = tokenizer(s.prompt.replace("<image>", image)).input_ids
        else:
            prompt = tokenizer(f"USER: {s.question} ASSISTANT:", add_special_tokens=False).input_ids
        answer = tokenizer(" " + s.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    return ids, labels


def squeezed_positions(ids: list[int], image_token_id: int, rng: random.Random, p: float = 0.5) -> list[int]:
    """Position ids as the decoder sees them after pre-LLM pruning that re-indexes positions.

    With probability ``p`` the image block is squeezed into ``m`` (uniform in [32, 576]) positions
    and later tokens shift down by ``576 - m``; otherwise positions are 0..L-1. Pre-LLM pruning in
    tokenprune re-indexes positions, and with the question *before* the image the distance from the
    question to the answer token then shrinks by the number of dropped tokens: a model trained only
    on full-length prompts reads that shift as garbage (measured: colour/shape/count accuracy fell
    to 0 at keep=64 for every method, random and DivPrune alike). Training on squeezed positions
    makes the harness measure which tokens a method keeps, not the position shift.
    """
    n = len(ids)
    if rng.random() >= p or image_token_id not in ids:
        return list(range(n))
    start = ids.index(image_token_id)
    m = rng.randint(32, NUM_IMAGE_TOKENS)
    positions = list(range(start))
    positions += [start + (j * m) // NUM_IMAGE_TOKENS for j in range(NUM_IMAGE_TOKENS)]
    positions += [p_ - (NUM_IMAGE_TOKENS - m) for p_ in range(start + NUM_IMAGE_TOKENS, n)]
    return positions


def make_batch(tokenizer, groups: list[list[data.Sample]], rng: random.Random | None = None,
               squeeze: float = 0.5) -> dict[str, torch.Tensor]:
    encoded = [encode_conversation(tokenizer, g) for g in groups]
    width = max(len(i) for i, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(groups), width), pad, dtype=torch.long)
    labels = torch.full((len(groups), width), -100, dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.long)
    positions = torch.arange(width).repeat(len(groups), 1)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    for row, (i, l) in enumerate(encoded):  # right padding: training only
        input_ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(l)] = torch.tensor(l)
        mask[row, : len(i)] = 1
        if rng is not None:
            positions[row, : len(i)] = torch.tensor(squeezed_positions(i, image_token_id, rng, squeeze))
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixel_values([g[0].scene.render() for g in groups]),
    }
    if rng is not None and squeeze > 0:
        batch["position_ids"] = positions
    return batch


def presence_targets(groups: list[list[data.Sample]]) -> torch.Tensor:
    """[B, 24] multi-hot of the (colour, shape) pairs in each scene: the [CLS] auxiliary target."""
    kinds = [(c, s) for c in data.COLORS for s in data.SHAPES]
    out = torch.zeros(len(groups), len(kinds))
    for row, g in enumerate(groups):
        for o in g[0].scene.objects:
            out[row, kinds.index((o.color, o.shape))] = 1.0
    return out


def dense_targets(groups: list[list[data.Sample]]) -> dict[str, torch.Tensor]:
    """[B, 576] class targets per patch: object colour / shape (0 = background), grid row / column."""
    colors, shapes = zip(*(data.patch_labels(g[0].scene) for g in groups))
    side = data.IMAGE_SIZE // 14
    cell = torch.arange(side) * data.GRID // side
    return {
        "color": torch.from_numpy(np.stack(colors)).long(),
        "shape": torch.from_numpy(np.stack(shapes)).long(),
        "row": cell.repeat_interleave(side).expand(len(groups), -1),
        "col": cell.repeat(side).expand(len(groups), -1),
    }


def check_processor(processor, tokenizer, sample: data.Sample) -> None:
    """The training path (own pixel normalisation, own tokenisation) must equal the processor's."""
    ref = processor(images=sample.scene.render(), text=sample.prompt, return_tensors="pt")
    ids, _ = encode_conversation(tokenizer, [sample])
    prompt_len = ref["input_ids"].shape[1]
    if ref["input_ids"][0].tolist() != ids[:prompt_len]:
        raise RuntimeError("training tokenisation differs from the processor's")
    diff = (ref["pixel_values"] - pixel_values([sample.scene.render()])).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"training pixel normalisation differs from the processor's by {diff}")


@torch.no_grad()
def answer_accuracy(model, tokenizer, samples: list[data.Sample], batch: int = 16) -> float:
    """Accuracy of the argmax next token after the prompt (a fast check; evaluate.py generates)."""
    model.eval()
    correct = 0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        b = make_batch(tokenizer, [[s] for s in chunk])
        # The answer token is the first labelled position; its logit sits one position earlier.
        pos = (b["labels"] != -100).int().argmax(dim=1) - 1
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"]).logits
        pred = logits[torch.arange(len(chunk)), pos].argmax(-1)
        gold = b["input_ids"][torch.arange(len(chunk)), pos + 1]
        correct += (pred == gold).sum().item()
    model.train()
    return correct / max(1, len(samples))


def save_classic_layout(model, processor, out: Path, meta: dict) -> None:
    """Save with the vision tower under ``vision_tower.vision_model.*`` (llava-hf / vLLM layout)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    weights = out / "model.safetensors"
    state = load_file(weights)
    renamed = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        renamed[key] = value.contiguous()
    save_file(dict(sorted(renamed.items())), weights, metadata={"format": "pt"})
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def train(out: Path, seed: int = 0, steps: int = 1500, batch: int = 8, turns: int = 6, lr: float = 2e-3,
          aux_weight: float = 0.5, threads: int = 1, log_every: int = 25, init: Path | None = None,
          squeeze: float = 0.5) -> dict:
    """Train for ``steps`` steps and save to ``out``; with ``init``, continue from that checkpoint
    (same tokenizer, fresh auxiliary heads, scenes after the ones it was trained on)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    history: list[dict] = []
    first_scene = 0
    if init is None:
        tokenizer = build_tokenizer()
        processor = build_processor(tokenizer)
        model = build_model(tokenizer, seed)
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(init)
        processor.chat_template = CHAT_TEMPLATE
        tokenizer = processor.tokenizer
        model = LlavaForConditionalGeneration.from_pretrained(init)
        previous = json.loads((Path(init) / "training.json").read_text())
        history = previous.get("history", []) + [{k: v for k, v in previous.items() if k not in ("history", "log")}]
        first_scene = sum(h["steps"] * h["batch"] for h in history)
        torch.manual_seed(seed + len(history))
    model.config._attn_implementation = "sdpa"
    val = data.dataset("val", 256, seed=seed)
    check_processor(processor, tokenizer, val[0])

    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({
        "presence": torch.nn.Linear(width, len(data.COLORS) * len(data.SHAPES)),
        "color": torch.nn.Linear(width, len(data.COLORS) + 1),
        "shape": torch.nn.Linear(width, len(data.SHAPES) + 1),
        "row": torch.nn.Linear(width, data.GRID),
        "col": torch.nn.Linear(width, data.GRID),
    })
    seen: dict[str, torch.Tensor] = {}

    def capture(module, args, output):
        # LLaVA overwrites pooler_output with the projected features after the tower returns: take
        # the [CLS] (post-layernorm, last layer) and the feature layer's patches here, before that.
        seen["cls"] = output.pooler_output
        seen["patches"] = output.hidden_states[model.config.vision_feature_layer][:, 1:]

    hook = model.model.vision_tower.register_forward_hook(capture)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    stream = data.iter_split("train", seed=seed, questions=turns, start=first_scene)
    position_rng = random.Random(f"positions/{seed}/{first_scene}")
    model.train()
    log = []
    start = time.time()
    for step in range(1, steps + 1):
        groups = [next(stream) for _ in range(batch)]
        b = make_batch(tokenizer, groups, position_rng, squeeze)
        loss_lm = model(**b).loss
        loss_aux = torch.nn.functional.binary_cross_entropy_with_logits(
            heads["presence"](seen["cls"]), presence_targets(groups))
        for key, target in dense_targets(groups).items():
            logits = heads[key](seen["patches"])
            loss_aux = loss_aux + torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        loss = loss_lm + aux_weight * loss_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            entry = {"step": step, "loss": round(loss_lm.item(), 4), "aux": round(loss_aux.item(), 4),
                     "elapsed_s": round(time.time() - start, 1)}
            if step % (log_every * 5) == 0 or step == steps:
                entry["val_acc"] = round(answer_accuracy(model, tokenizer, val[:128]), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    hook.remove()
    train_s = time.time() - start
    model.eval()
    val_acc = answer_accuracy(model, tokenizer, val)
    meta = {
        "seed": seed, "steps": steps, "batch": batch, "turns": turns, "lr": lr, "aux_weight": aux_weight, "squeeze": squeeze,
        "threads": threads, "train_seconds": round(train_s, 1), "val_accuracy_argmax": round(val_acc, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "init": str(init) if init else None,
        "first_scene": first_scene, "history": history, "log": log,
    }
    save_classic_layout(model, processor, out, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--squeeze", type=float, default=0.5,
                        help="probability of training a conversation on squeezed image positions")
    parser.add_argument("--init", type=Path, default=None, help="continue training this checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="1 keeps runs bit-reproducible and is fastest on a shared machine")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = train(args.out, seed=args.seed, steps=args.steps, batch=args.batch, turns=args.turns, lr=args.lr,
                 threads=args.threads, init=args.init, squeeze=args.squeeze)
    print(f"saved to {args.out}: val accuracy {meta['val_accuracy_argmax']:.3f} in {meta['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()
