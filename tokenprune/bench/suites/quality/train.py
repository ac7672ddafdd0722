"""Train the quality harness's small LLaVA-architecture model from scratch, on CPU, deterministically.

The model is a real ``LlavaForConditionalGeneration`` with the LLaVA-1.5 geometry where it matters
for pruning — a CLIP-style vision tower at 336 px with 14-px patches, so **576 image tokens reach
the language model**, features taken from the penultimate vision layer without [CLS]
(``vision_feature_layer=-2``, ``"default"`` strategy), a two-layer GELU projector — and small
widths: vision 64-d x 3 layers, Llama decoder 128-d x 4 layers with 4 heads of 32 and RoPE base
1e6 (so FastV can prune before layer 1, 2 or 3).

Two stages, as LLaVA itself is built (docs/quality.md has the reasons and the failed recipes):

1. :func:`train_vision` — a stand-in for CLIP pre-training: the vision tower alone learns dense
   per-patch targets and a [CLS] target.
2. :func:`train_language` — vision tower frozen; projector and decoder learn to answer multi-turn
   conversations about pooled training scenes (``USER: <image>\nq1 ASSISTANT: a1</s>USER: q2
   ASSISTANT: a2</s>...``, the first turn exactly the evaluation prompt), most steps on image blocks
   pruned to the objects plus random background, with three attention targets and a feature
   alignment loss that make the question-to-region routing learnable in minutes.

The output directory holds the checkpoint in the classic llava-hf layout (safetensors keys
``vision_tower.vision_model.*``, which both transformers 5 and vLLM load), the tokenizer (a byte-level
BPE trained here with ``tokenizers``), a ``LlavaProcessor`` and ``training.json`` (settings, timings,
loss log)::

    python -m tokenprune.bench.suites.quality.train --out tokenprune/bench/suites/quality/model --force

(``--force``: the directory holds the shipped checkpoint; without it a non-empty ``--out`` is refused.)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from tokenprune.bench.suites.quality import data

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


def build_processor(tokenizer, patch_size: int = 14):
    """The harness's ``LlavaProcessor`` (336-px CLIP preprocessing; ``patch_size`` sets how many
    ``<image>`` placeholders a prompt expands to: ``(336 / patch_size) ** 2``)."""
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
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, seed: int, text_width: int = 128, text_layers: int = 4, text_heads: int = 4,
                head_dim: int = 32, rope_theta: float = 1e6):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        image_size=data.IMAGE_SIZE, patch_size=14, projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, num_key_value_heads=text_heads, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, vocab_size=len(tokenizer), max_position_embeddings=2048,
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


class Conversations:
    """Token ids and labels of training conversations, tokenised exactly as the processor does.

    A conversation about one scene is ``USER: <image>*k\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:
    a2</s>...`` with loss on the answers and their ``</s>``; its first turn is exactly the
    evaluation prompt (:data:`data.PROMPT`) with ``k`` image tokens (576 unpruned). Text pieces are
    tokenised once and cached: the special ``<image>`` token splits the prompt, so the pieces
    concatenate to the processor's tokenisation, which :meth:`check` verifies.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self._cache: dict[str, list[int]] = {}
        head, tail = data.PROMPT.split("<image>")
        # The tokenizer's own special tokens (a BOS for the harness tokenizer, none for SmolLM2's).
        self._head = tokenizer(head).input_ids
        self._tail = tail
        # The token of a question that ends each mention of an object: a cell's column digit ("cell
        # b3"), a shape ("red circle"), a plural ("stars", "red shapes"). Training routes through them.
        words = [*data.SHAPES, *data.PLURAL.values(), "shapes"]
        self.anchor_ids = {self._single(" " + w) for w in words} | {self._single(str(c)) for c in range(1, data.GRID + 1)}

    @functools.cached_property
    def word_groups(self) -> list[torch.Tensor]:
        """Token ids of the words that name a colour, a shape, a cell's row letter, a column digit."""
        return [torch.tensor([self._single(" " + c) for c in data.COLORS]),
                torch.tensor([self._single(" " + s) for s in data.SHAPES]),
                torch.tensor([self._single(" " + r) for r in "abcd"[: data.GRID]]),
                torch.tensor([self._single(str(c)) for c in range(1, data.GRID + 1)])]

    @staticmethod
    def patch_words(scene: data.Scene, objects: torch.Tensor) -> torch.Tensor:
        """[N, 4] index within each of :attr:`word_groups` of the words describing the object of each
        patch (``objects``: [N] object indices, -1 = background, whose rows stay -1)."""
        out = torch.full((len(objects), 4), -1, dtype=torch.long)
        for j, obj in enumerate(objects.tolist()):
            if obj >= 0:
                o = scene.objects[obj]
                out[j] = torch.tensor([list(data.COLORS).index(o.color), data.SHAPES.index(o.shape), o.row - 1, o.col - 1])
        return out

    def anchors(self, ids: list[int], sample: data.Sample, question: int, answer: int) -> list[int]:
        """Positions of the anchors of ``sample``'s question, ``ids[question : answer]`` (a turn of
        :meth:`encode`): one per object role (two for a relation, else one)."""
        found = [p for p in range(question, answer - 2) if ids[p] in self.anchor_ids]
        if len(found) != (2 if sample.qtype == "relation" else 1):
            raise RuntimeError(f"expected one anchor per object role in {sample.question!r}, found {len(found)}")
        return found

    def _single(self, text: str) -> int:
        ids = self._ids(text)
        if len(ids) != 1:
            raise RuntimeError(f"{text!r} is not a single token ({ids})")
        return ids[0]

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._cache[text]

    def encode(self, samples: list[data.Sample], num_image_tokens: int = NUM_IMAGE_TOKENS
               ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """``(ids, labels, turns)``: labels are -100 outside the answers and their ``</s>``;
        ``turns[t] = (question_start, answer_position)``: turn ``t``'s question occupies
        ``ids[question_start : answer_position - 2]`` (then `` ASSISTANT`` ``:``) and its answer
        token sits at ``answer_position``."""
        ids = self._head + [self.image_token_id] * num_image_tokens
        labels = [-100] * len(ids)
        answers = []
        for turn, s in enumerate(samples):
            text = self._tail.format(question=s.question) if turn == 0 else f"USER: {s.question} ASSISTANT:"
            prompt = self._ids(text)
            answer = self._ids(" " + s.answer) + [self.tokenizer.eos_token_id]
            answers.append((len(ids), len(ids) + len(prompt)))
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return ids, labels, answers

    def check(self, processor, samples: list[data.Sample]) -> None:
        """The training path (own pixel normalisation, own tokenisation) must equal the processor's."""
        for s in samples:
            ref = processor(images=s.scene.render(), text=s.prompt, return_tensors="pt")
            ids, _, _ = self.encode([s])
            prompt_len = ref["input_ids"].shape[1]
            if ref["input_ids"][0].tolist() != ids[:prompt_len]:
                raise RuntimeError("training tokenisation differs from the processor's")
            diff = (ref["pixel_values"] - pixel_values([s.scene.render()])).abs().max().item()
            if diff > 1e-5:
                raise RuntimeError(f"training pixel normalisation differs from the processor's by {diff}")


def dense_targets(scenes: list[data.Scene], patch: int = 14) -> dict[str, torch.Tensor]:
    """[B, (336 / patch) ** 2] class targets per patch: object colour / shape (0 = background), grid
    row / column, and whether the patch holds an object's centre."""
    colors, shapes = zip(*(data.patch_labels(s, patch) for s in scenes))
    side = data.IMAGE_SIZE // patch
    cell = torch.arange(side) * data.GRID // side
    centre = torch.zeros(len(scenes), side * side, dtype=torch.long)
    for row, s in enumerate(scenes):
        centre[row, torch.from_numpy(data.centre_patches(s, patch))] = 1
    return {
        "color": torch.from_numpy(np.stack(colors)).long(),
        "shape": torch.from_numpy(np.stack(shapes)).long(),
        "row": cell.repeat_interleave(side).expand(len(scenes), -1),
        "col": cell.repeat(side).expand(len(scenes), -1),
        "centre": centre,
    }


def presence_targets(scenes: list[data.Scene]) -> torch.Tensor:
    """[B, 10] multi-hot of the colours and the shapes each scene holds: the [CLS] auxiliary target."""
    kinds = [*data.COLORS, *data.SHAPES]
    out = torch.zeros(len(scenes), len(kinds))
    for row, scene in enumerate(scenes):
        for o in scene.objects:
            out[row, kinds.index(o.color)] = out[row, kinds.index(o.shape)] = 1.0
    return out


def train_scenes(seed: int, start: int = 0) -> Iterator[data.Scene]:
    """Training scenes in a fixed order (the ``train`` split's scenes)."""
    i = start
    while True:
        yield data.scene("train", i, seed)
        i += 1


def optimizer_step(opt, sched, params, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def cosine(steps: int, warmup: int, floor: float = 0.1):
    return lambda s: min(1.0, (s + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def train_vision(model, steps: int, batch: int, lr: float, seed: int, log: list, log_every: int = 25,
                 object_shape: float = 0.0) -> None:
    """Stage 1, a stand-in for CLIP pre-training: the vision tower learns dense and [CLS] targets.

    * dense: each patch token of the feature layer predicts, through linear heads, the colour and
      shape of the object covering its patch (or background), its grid cell's row and column, and
      whether it holds an object's centre. This keeps visual tokens local, as CLIP patch tokens
      largely are, which is what makes *which* tokens a method keeps matter;
    * [CLS]: the pooled [CLS] output predicts which colours and which shapes the scene holds, so
      the [CLS] query that VisionZip / HoloV / FlowCut score with is trained (LLaVA never uses it);
    * ``object_shape`` > 0: also the shape of the covering object on object patches only, with
      that weight. Averaged over all patches (mostly background) the dense shape loss stays flat: a
      patch's shape is not visible inside it and must be gathered from the object's other patches.

    The heads are discarded afterwards.
    """
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({
        "presence": torch.nn.Linear(width, len(data.COLORS) + len(data.SHAPES)),
        "color": torch.nn.Linear(width, len(data.COLORS) + 1),
        "shape": torch.nn.Linear(width, len(data.SHAPES) + 1),
        "row": torch.nn.Linear(width, data.GRID),
        "col": torch.nn.Linear(width, data.GRID),
        "centre": torch.nn.Linear(width, 2),
    })
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, max(1, steps // 20)))
    scenes = train_scenes(seed, start=10_000_000)  # disjoint from the language stage's pool
    start = time.time()
    for step in range(1, steps + 1):
        chunk = [next(scenes) for _ in range(batch)]
        out = tower(pixel_values([s.render() for s in chunk]), output_hidden_states=True)
        patches = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        losses = {"presence": F.binary_cross_entropy_with_logits(heads["presence"](out.pooler_output),
                                                                  presence_targets(chunk))}
        for key, target in dense_targets(chunk, model.config.vision_config.patch_size).items():
            logits, target = heads[key](patches).flatten(0, 1), target.flatten()
            losses[key] = F.cross_entropy(logits, target)
            if key == "shape" and object_shape > 0:
                on = target > 0
                losses["shape_object"] = object_shape * F.cross_entropy(logits[on][:, 1:], target[on] - 1)
        loss = sum(losses.values())
        optimizer_step(opt, sched, params, loss)
        if step % log_every == 0 or step == steps:
            entry = {"stage": "vision", "step": step, "elapsed_s": round(time.time() - start, 1),
                     **{k: round(v.item(), 4) for k, v in losses.items()}}
            log.append(entry)
            print(json.dumps(entry), flush=True)


@torch.no_grad()
def scene_features(model, scenes: list[data.Scene], batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-layer patch features ``[len(scenes), 576, D]`` of ``scenes`` (what LLaVA's projector
    reads) and their object maps ``[len(scenes), 576]`` (:func:`data.patch_objects`: -1 = background)."""
    features, object_maps = [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        out = model.model.vision_tower(pixel_values([s.render() for s in chunk]), output_hidden_states=True)
        features.append(out.hidden_states[model.config.vision_feature_layer][:, 1:].clone())
        patch = model.config.vision_config.patch_size
        object_maps.append(torch.from_numpy(np.stack([data.patch_objects(s, patch) for s in chunk])).to(torch.int8))
    return torch.cat(features), torch.cat(object_maps)


def image_pool(model, size: int, seed: int, batch: int = 32) -> tuple[list[data.Scene], torch.Tensor, torch.Tensor]:
    """``size`` training scenes with their :func:`scene_features`."""
    scenes = [s for s, _ in zip(train_scenes(seed), range(size))]
    return (scenes, *scene_features(model, scenes, batch))


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


@torch.no_grad()
def answer_accuracy(model, conversations: Conversations, samples: list[data.Sample], batch: int = 16) -> float:
    """Accuracy of the argmax token after the unpruned prompt, through the model's own forward with
    pixels (a fast check; evaluate.py generates through the public API)."""
    model.eval()
    correct = 0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        encoded = [conversations.encode([s]) for s in chunk]
        ids = pad_right([i for i, _, _ in encoded], conversations.tokenizer.pad_token_id)
        mask = pad_right([[1] * len(i) for i, _, _ in encoded], 0)  # right padding: causal rows unaffected
        answer_pos = torch.tensor([turns[0][1] for _, _, turns in encoded])
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values([s.scene.render() for s in chunk])).logits
        rows = torch.arange(len(chunk))
        correct += (logits[rows, answer_pos - 1].argmax(-1) == ids[rows, answer_pos]).sum().item()
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


class AttentionProbe:
    """Captures a decoder layer's attention inputs so that training can supervise its attention.

    ``weights(rows, positions)`` recomputes that layer's softmax attention probabilities for the
    given query positions only, ``[S, heads, L]`` (causal and padding masked), from the captured
    hidden states and rotary embeddings with the layer's own projections: the forward pass itself
    keeps running on SDPA.
    """

    def __init__(self, attention: torch.nn.Module):
        self.attention = attention
        self.captured: dict = {}
        self._hook = attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self.captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.captured["rope"] = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]

    def weights(self, rows: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

        attn, hidden = self.attention, self.captured["hidden"]
        b, length, _ = hidden.shape
        cos, sin = (t.expand(b, -1, -1) for t in self.captured["rope"])  # [B or 1, L, head_dim]
        # Queries only where supervised; keys everywhere (rotated as the layer rotates them).
        q = attn.q_proj(hidden[rows, positions]).view(len(rows), -1, attn.head_dim)
        q = q * cos[rows, positions].unsqueeze(1) + rotate_half(q) * sin[rows, positions].unsqueeze(1)
        k = attn.k_proj(hidden).view(b, length, -1, attn.head_dim).transpose(1, 2)
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)  # [B, heads, L, head_dim]
        order = torch.argsort(rows, stable=True)
        chunks = [torch.einsum("shd,hld->shl", q[order[rows[order] == r]], k[r]) for r in rows[order].unique_consecutive()]
        logits = torch.cat(chunks)[torch.argsort(order)].float() * attn.scaling  # float32 softmax under bf16
        allowed = key_mask[rows].bool() & (torch.arange(length) <= positions[:, None])
        return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)

    def target_loss(self, targets: list[tuple[int, int, int, torch.Tensor]], key_mask: torch.Tensor) -> torch.Tensor:
        """Mean ``-log`` of the attention mass that each ``(row, position, head, key positions)`` of
        ``targets`` puts on its key positions."""
        rows, positions, heads, hits = zip(*targets)
        weights = self.weights(torch.tensor(rows), torch.tensor(positions), key_mask)  # [S, heads, L]
        wanted = torch.zeros(len(hits), weights.shape[-1], dtype=torch.bool)
        for i, hit in enumerate(hits):
            wanted[i, hit] = True
        mass = (weights[torch.arange(len(heads)), torch.tensor(heads)].float() * wanted).sum(-1)
        return -torch.log(mass + 1e-6).mean()

    def remove(self) -> None:
        self._hook.remove()


def train_language(model, conversations: Conversations, scenes: list[data.Scene], features: torch.Tensor,
                   object_maps: torch.Tensor, steps: int, batch: int, turns: int, lr: float, prune_p: float,
                   attention_weight: float, seed: int, val: list[data.Sample], log: list, log_every: int = 25,
                   align_weight: float = 0.0, tie_retrieval: bool = False) -> None:
    """Stage 2, LLaVA's recipe: vision tower frozen, projector and decoder learn to answer.

    Each step draws ``batch`` scenes of the pool with ``turns`` fresh questions each.

    * Pruned steps (probability ``prune_p``): every patch covered by an object is kept, plus a
      random share of the background (16 to 192 patches), in raster order and with re-indexed
      positions, which is exactly what a pre-LLM method hands the decoder. The model learns that a
      shorter, re-indexed image block is still an image, so the harness measures which tokens a
      method keeps rather than the model's surprise at a short prompt; and pruned steps are several
      times cheaper, which is what fits training into minutes on a CPU. Answers still need the
      object patches: a method that drops them loses the answer.
    * Attention supervision (weight ``attention_weight``): in the **last** decoder layer, heads 0
      and 1 of each answer-predicting position are pushed to put their attention on the patches of
      the objects the question is about (both objects of a relation, one per head; all counted
      objects). Without it the question-to-region routing is a slow phase transition that a small
      decoder did not cross within an hour of CPU training (docs/quality.md); with it the model
      reads the image within minutes. Only the last layer is supervised, so the attention that
      FastV scores with (layers 0 to K-1 < 3) is the model's own.
    """
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, max(1, steps // 20)))
    rng = random.Random(f"language/{seed}")
    embed = model.get_input_embeddings()
    layers = model.model.language_model.layers
    if tie_retrieval:  # heads 0-1 of the retrieval layer start with W_q = W_k: similar vectors attend
        attn = layers[-2].self_attn
        with torch.no_grad():
            attn.q_proj.weight[: 2 * attn.head_dim] = attn.k_proj.weight[: 2 * attn.head_dim]
    probes = {"previous": AttentionProbe(layers[0].self_attn), "retrieve": AttentionProbe(layers[-2].self_attn),
              "read": AttentionProbe(layers[-1].self_attn)}
    pad = conversations.tokenizer.pad_token_id
    start = time.time()
    for step in range(1, steps + 1):
        pruned = rng.random() < prune_p
        rows, labels, image_rows, words = [], [], [], []
        targets: dict[str, list] = {key: [] for key in probes}
        for row in range(batch):
            index = rng.randrange(len(scenes))
            objects = object_maps[index].long()
            if pruned:
                background = (objects < 0).nonzero().flatten().tolist()
                extra = rng.sample(background, min(len(background), rng.randint(16, 192)))
                kept = torch.tensor(sorted((objects >= 0).nonzero().flatten().tolist() + extra))
            else:
                kept = torch.arange(NUM_IMAGE_TOKENS)
            samples = data.ask(scenes[index], rng, turns)
            ids, lab, spans = conversations.encode(samples, len(kept))
            image_start = ids.index(conversations.image_token_id)
            for s, (question, answer) in zip(samples, spans):
                anchors = conversations.anchors(ids, s, question, answer)
                for k, anchor in enumerate(anchors):
                    targets["previous"].append((row, anchor, 0, torch.tensor([anchor - 1])))
                    if s.refs and s.qtype != "count":
                        hit = image_start + torch.isin(objects[kept], torch.tensor(s.refs[k])).nonzero().flatten()
                        if len(hit):
                            targets["retrieve"] += [(row, anchor, head, hit) for head in (0, 1)]
                targets["read"] += [(row, answer - 1, 0, torch.tensor(anchors[:1])),
                                    (row, answer - 1, 1, torch.tensor(anchors[-1:]))]
            rows.append(ids)
            labels.append(lab)
            image_rows.append(features[index, kept])
            if align_weight > 0:
                words.append(conversations.patch_words(scenes[index], objects[kept]))
        ids = pad_right(rows, pad)
        labels = pad_right(labels, -100)
        mask = pad_right([[1] * len(r) for r in rows], 0)
        image_embeds = model.model.multi_modal_projector(torch.cat(image_rows))
        embeds = embed(ids).masked_scatter((ids == conversations.image_token_id).unsqueeze(-1), image_embeds)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        answered = labels[:, 1:] != -100
        loss_lm = F.cross_entropy(model.lm_head(hidden[:, :-1][answered]), labels[:, 1:][answered])
        aux_losses = {}
        if align_weight > 0:
            # Feature alignment (LLaVA's stage 1 in spirit): an object's projected patches point
            # along the embeddings of the words that describe it, read out with the tied embeddings.
            logits = image_embeds @ embed.weight.T
            for group, target in zip(conversations.word_groups, torch.cat(words).T):
                keep = target >= 0
                aux_losses.setdefault("align", 0)
                aux_losses["align"] = aux_losses["align"] + align_weight * F.cross_entropy(
                    logits[keep][:, group], target[keep]) / len(conversations.word_groups)
        if attention_weight > 0:
            for key, probe in probes.items():
                if targets[key]:
                    aux_losses[key] = probe.target_loss(targets[key], mask)
        loss = loss_lm + sum(v * (1 if k == "align" else attention_weight) for k, v in aux_losses.items())
        optimizer_step(opt, sched, params, loss)
        if step % log_every == 0 or step == steps:
            entry = {"stage": "language", "step": step, "loss": round(loss_lm.item(), 4),
                     **{k: round(v.item(), 4) for k, v in aux_losses.items()}, "pruned": pruned, "elapsed_s": round(time.time() - start, 1)}
            if val and (step % (log_every * 4) == 0 or step == steps):
                entry["val_acc"] = round(answer_accuracy(model, conversations, val), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    for probe in probes.values():
        probe.remove()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(True)


def train(out: Path, seed: int = 0, vision_steps: int = 300, vision_batch: int = 8, vision_lr: float = 2e-3,
          pool: int = 3072, steps: int = 2000, batch: int = 16, turns: int = 8, lr: float = 2e-3,
          prune_p: float = 0.85, attention_weight: float = 1.0, align_weight: float = 1.0,
          tie_retrieval: bool = True, text_width: int = 128, text_layers: int = 4, text_heads: int = 4,
          threads: int = 1, val_n: int = 128) -> dict:
    """Both stages from scratch, deterministic by seed (bit-reproducible with one thread); saves to ``out``."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed, text_width=text_width, text_layers=text_layers, text_heads=text_heads)
    model.config._attn_implementation = "sdpa"
    conversations = Conversations(tokenizer)
    val = data.dataset("val", val_n, seed=seed)
    conversations.check(processor, val[:4])
    model.train()
    log: list[dict] = []
    start = time.time()
    train_vision(model, vision_steps, vision_batch, vision_lr, seed, log)
    t_vision = time.time() - start
    model.eval()
    scenes, features, objects = image_pool(model, pool, seed)
    model.train()
    t_pool = time.time() - start - t_vision
    train_language(model, conversations, scenes, features, objects, steps, batch, turns, lr, prune_p,
                   attention_weight, seed, val, log, align_weight=align_weight, tie_retrieval=tie_retrieval)
    train_s = time.time() - start
    model.eval()
    meta = {
        "seed": seed, "vision_steps": vision_steps, "vision_batch": vision_batch, "vision_lr": vision_lr,
        "pool": pool, "steps": steps, "batch": batch, "turns": turns, "lr": lr, "prune_p": prune_p,
        "attention_weight": attention_weight, "align_weight": align_weight, "tie_retrieval": tie_retrieval, "text": {"width": text_width, "layers": text_layers, "heads": text_heads},
        "threads": threads, "train_seconds": round(train_s, 1),
        "seconds": {"vision": round(t_vision, 1), "pool": round(t_pool, 1), "language": round(train_s - t_vision - t_pool, 1)},
        "val_accuracy_argmax": round(answer_accuracy(model, conversations, val), 4), "val_n": val_n,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "log": log,
    }
    save_classic_layout(model, processor, out, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--pool", type=int, default=3072, help="training scenes whose features stage 2 reuses")
    parser.add_argument("--steps", type=int, default=2000, help="language-stage steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8, help="questions per scene in a training conversation")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--prune-p", type=float, default=0.85, help="share of language steps on pruned image blocks")
    parser.add_argument("--attention-weight", type=float, default=1.0,
                        help="weight of the last-layer attention supervision (0 = answers only)")
    parser.add_argument("--align-weight", type=float, default=1.0,
                        help="weight of the projector's feature alignment with the word embeddings")
    parser.add_argument("--tie-retrieval", action=argparse.BooleanOptionalAction, default=True,
                        help="start the retrieval heads with W_q = W_k")
    parser.add_argument("--text-width", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--text-heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps runs bit-reproducible")
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    # The default --out is the shipped checkpoint: replacing it (make quality-model) takes --force.
    report.check_outputs_or_exit(parser, [("--out", args.out, "directory")], force=args.force)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = train(args.out, seed=args.seed, vision_steps=args.vision_steps, pool=args.pool, steps=args.steps,
                 batch=args.batch, turns=args.turns, lr=args.lr, prune_p=args.prune_p, attention_weight=args.attention_weight,
                 align_weight=args.align_weight, tie_retrieval=args.tie_retrieval, text_width=args.text_width,
                 text_layers=args.text_layers, text_heads=args.text_heads, threads=args.threads)
    print(f"saved to {args.out}: val accuracy {meta['val_accuracy_argmax']:.3f} in {meta['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()
