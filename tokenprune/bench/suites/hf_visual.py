"""Visual-mode runner for Hugging Face models: baseline vs visual pruners in ``model.generate``.

Each run is one ``generate`` call with greedy decoding and exactly ``new_tokens`` new tokens
(``min_new_tokens = max_new_tokens``, so EOS cannot end a run early); a :class:`TokenClock`
streamer timestamps the tokens, giving TTFT (vision tower + selection + prefill + first token) and
decode throughput from the same call. Methods are applied with ``tp.patch`` around the call and
removed after it, so baseline and pruned runs share one model and interleave freely.

Inputs are synthetic but shaped like the real thing: ``<s>``, a few text tokens, one block of
image placeholders per row (as the LLaVA processor expands them), the rest of the text; pixel
values come from :func:`tokenprune.fixtures.make_image` normalised with CLIP's statistics.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch

import tokenprune as tp
from tokenprune.bench.modes import BenchConfig
from tokenprune.bench.presets import FAMILY_CLASSES, LoadedModel, load_model, resolve_device
from tokenprune.bench.results import Samples, ideal_ratio, variant_rows
from tokenprune.bench.timing import PeakMemory, TokenClock, interleaved_schedule, synchronize

__all__ = ["run", "llava_inputs", "llava_next_inputs", "qwen2_5_vl_inputs", "INPUT_BUILDERS"]

DEFAULT_TEXT_TOKENS = 32
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pixel_values(size: int, seeds: Iterable[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 3, size, size]`` CLIP-normalised pixels of deterministic structured images."""
    from tokenprune.fixtures import make_image

    mean = torch.tensor(_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(_CLIP_STD).view(3, 1, 1)
    images = []
    for seed in seeds:
        pixels = torch.frombuffer(bytearray(make_image(size, seed).tobytes()), dtype=torch.uint8)
        pixels = pixels.view(size, size, 3).permute(2, 0, 1).float() / 255.0
        images.append((pixels - mean) / std)
    return torch.stack(images).to(device=device, dtype=dtype)


def _text_ids(cfg: Any, batch_size: int, text_tokens: int, seed: int) -> torch.Tensor:
    """``[B, T]`` ordinary vocabulary ids: above the specials (0-4 in Llama-style vocabularies),
    below the image token when it sits inside the vocabulary."""
    vocab, image_id = int(cfg.text_config.vocab_size), int(cfg.image_token_id)
    high = image_id if 5 < image_id < vocab else vocab
    return torch.randint(5, high, (batch_size, text_tokens), generator=torch.Generator().manual_seed(seed))


def _bos(cfg: Any, batch_size: int) -> torch.Tensor:
    return torch.full((batch_size, 1), int(cfg.text_config.bos_token_id or 1))


def _with_image_block(ids: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` text ids -> ``[B, T + len(block)]`` with ``block`` after the first 4 text tokens."""
    head = min(4, ids.shape[1])
    return torch.cat([ids[:, :head], block.expand(ids.shape[0], -1), ids[:, head:]], dim=1)


def llava_inputs(lm: LoadedModel, batch_size: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``generate`` inputs for a LLaVA-1.5 model: ``input_ids``/``attention_mask`` ``[B, L]`` with
    one block of image tokens per row, ``pixel_values`` ``[B, 3, S, S]``.

    ``L = 1 + text_tokens + image tokens``; 4 text tokens precede the image (a "USER:" turn).
    """
    cfg = lm.model.config
    vision = cfg.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    if cfg.vision_feature_select_strategy == "full":
        n_image += 1
    image_id = int(cfg.image_token_id)
    text = _text_ids(cfg, batch_size, text_tokens, seed)
    input_ids = torch.cat([_bos(cfg, batch_size), _with_image_block(text, torch.full((1, n_image), image_id))], dim=1)
    input_ids = input_ids.to(lm.device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": _pixel_values(vision.image_size, range(seed, seed + batch_size), lm.device, lm.dtype),
    }


def llava_next_inputs(lm: LoadedModel, batch_size: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``generate`` inputs for LLaVA-NeXT: ``lm.image_size`` square images through the model's
    any-resolution tiling (``pixel_values`` ``[B, crops, 3, S, S]``, ``image_sizes`` ``[B, 2]``).

    The placeholder count per image is what the model's own ``get_image_features`` packs (base crop
    + unpadded grid + row newlines), so it always matches the model.
    """
    from transformers import LlavaNextImageProcessor

    from tokenprune.fixtures import make_image

    cfg = lm.model.config
    side = cfg.vision_config.image_size
    processor = LlavaNextImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_grid_pinpoints=cfg.image_grid_pinpoints, image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD),
    )
    images = [make_image(lm.image_size, s) for s in range(seed, seed + batch_size)]
    processed = processor(images=images, return_tensors="pt")
    pixel_values = processed["pixel_values"].to(lm.device, lm.dtype)
    image_sizes = processed["image_sizes"].to(lm.device)
    with torch.no_grad():
        packed = lm.model.model.get_image_features(
            pixel_values=pixel_values[:1], image_sizes=image_sizes[:1], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True,
        ).pooler_output
    block = torch.full((1, int(packed[0].shape[0])), int(cfg.image_token_id))
    text = _text_ids(cfg, batch_size, text_tokens, seed)
    input_ids = torch.cat([_bos(cfg, batch_size), _with_image_block(text, block)], dim=1).to(lm.device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
            "image_sizes": image_sizes}


def qwen2_5_vl_inputs(lm: LoadedModel, batch_size: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``generate`` inputs for Qwen2.5-VL: ``lm.image_size`` square images (a multiple of 28) as
    flattened patches ``[B * (S/14)^2, 3 * 2 * 14 * 14]`` with ``image_grid_thw`` ``[B, 3]``; each row
    holds ``<|vision_start|>``, ``(S/28)^2`` image tokens, ``<|vision_end|>`` in its text."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from tokenprune.fixtures import make_image

    cfg = lm.model.config
    vision = cfg.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    side = lm.image_size
    if side % unit:
        raise ValueError(f"image_size must be a multiple of {unit} for {type(lm.model).__name__}, got {side}")
    processor = Qwen2VLImageProcessor(min_pixels=side * side, max_pixels=side * side, patch_size=vision.patch_size,
                                      merge_size=vision.spatial_merge_size,
                                      temporal_patch_size=vision.temporal_patch_size)
    processed = processor(images=[make_image(side, s) for s in range(seed, seed + batch_size)], return_tensors="pt")
    n_image = (side // unit) ** 2
    gen = torch.Generator().manual_seed(seed)
    specials = min(cfg.vision_start_token_id, cfg.image_token_id)
    text = torch.randint(0, min(specials, cfg.text_config.vocab_size), (batch_size, text_tokens), generator=gen)
    block = torch.tensor([[cfg.vision_start_token_id, *([cfg.image_token_id] * n_image), cfg.vision_end_token_id]])
    input_ids = _with_image_block(text, block).to(lm.device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": processed["pixel_values"].to(lm.device, lm.dtype),
            "image_grid_thw": processed["image_grid_thw"].to(lm.device)}


INPUT_BUILDERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "llava": llava_inputs,
    "llava_next": llava_next_inputs,
    "qwen2_5_vl": qwen2_5_vl_inputs,
}


def _check_supported(family: str, methods: list[tuple[str, Any]]) -> None:
    """Fail before building a (possibly 7B) model that cannot be measured."""
    if family not in INPUT_BUILDERS:
        raise NotImplementedError(
            f"visual mode builds inputs for {', '.join(FAMILY_CLASSES[f] for f in INPUT_BUILDERS)}; "
            f"{FAMILY_CLASSES.get(family, family)} is not wired yet"
        )
    if methods:
        from tokenprune.integrations.hf import supported_architectures

        arch = FAMILY_CLASSES[family]
        if arch not in supported_architectures():
            raise NotImplementedError(
                f"tokenprune's HF integration does not support {arch} yet; supported architectures: "
                f"{', '.join(supported_architectures())}"
            )


def _family(model: str) -> str:
    from pathlib import Path

    from tokenprune.bench.presets import get_preset

    if Path(model).is_dir():
        import transformers

        arch = (transformers.AutoConfig.from_pretrained(model).architectures or [""])[0]
        return next((f for f, cls in FAMILY_CLASSES.items() if cls == arch), arch)
    return get_preset(model).family


def run(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """Measure baseline and every method of ``config`` on one model; rows as in :mod:`results`."""
    device = resolve_device(config.device)
    family = _family(config.model)
    if family == "llama":
        raise ValueError(f"{config.model} is a text model: visual mode needs a vision-language model "
                         "(text-mode methods such as LazyLLM/SnapKV run with --mode text)")
    _check_supported(family, config.methods)
    lm = load_model(config.model, device, config.dtype, config.image_size, config.seed)
    text_tokens = DEFAULT_TEXT_TOKENS if config.prompt_tokens is None else config.prompt_tokens
    inputs = INPUT_BUILDERS[lm.family](lm, config.batch_size, text_tokens, config.seed)
    prompt_len = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"][0] == lm.model.config.image_token_id).sum())
    num_layers = int(lm.model.config.text_config.num_hidden_layers)

    n = config.new_tokens
    clock = TokenClock()
    gen_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, streamer=clock,
                      use_cache=True, pad_token_id=lm.model.generation_config.pad_token_id)
    variants: list[tuple[str, Any]] = [("baseline", None), *config.methods]
    methods = dict(variants)
    samples = Samples()
    tokens_after: dict[str, tuple[int, int]] = {}  # label -> (visual tokens kept per image, tokens removed per row)

    for item in track(interleaved_schedule([v for v, _ in variants], config.reps, config.warmup), "measuring"):
        method = methods[item.variant]
        handle = tp.patch(lm.model, method) if method is not None else None
        try:
            with PeakMemory(device) as memory, torch.no_grad():
                synchronize(device)
                clock.start()
                lm.model.generate(**inputs, **gen_kwargs)
                synchronize(device)
                e2e = time.perf_counter() - clock.t0
            if handle is not None and item.variant not in tokens_after:
                summary = handle.stats.summary()
                images = summary["images"] or 1
                tokens_after[item.variant] = (
                    round(summary["tokens_after"] / images),
                    (summary["tokens_before"] - summary["tokens_after"]) // config.batch_size,
                )
        finally:
            if handle is not None:
                handle.remove()
        if clock.new_tokens != n:
            raise RuntimeError(f"{item.variant} generated {clock.new_tokens} tokens instead of {n}")
        if not item.warmup:
            samples.add(
                item.variant,
                item.rep,
                ttft_ms=clock.ttft_s * 1e3,
                decode_tok_s=clock.decode_tokens_per_s(config.batch_size),
                e2e_ms=e2e * 1e3,
                peak_mem_mb=None if memory.peak_bytes is None else memory.peak_bytes / 2**20,
            )

    per_variant = {}
    for label, method in variants:
        kept, removed = tokens_after.get(label, (image_tokens, 0))
        first_pruned = method.layer if method is not None and method.stage == "llm" else 0
        per_variant[label] = {
            "visual_tokens_before": image_tokens,
            "visual_tokens_after": kept,
            "prompt_tokens": prompt_len,
            "prompt_tokens_after": prompt_len - removed,
            "ideal_ratio": ideal_ratio(prompt_len, removed, num_layers, first_pruned),
        }
    common = {
        "model": lm.name,
        "family": lm.family,
        "num_parameters": lm.num_parameters,
        "random_weights": lm.random_weights,
        "engine": "hf",
        "mode": "visual",
        "device": str(device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "batch_size": config.batch_size,
        "image_size": lm.image_size,
        "text_tokens": text_tokens,
        "new_tokens": n,
        "reps": config.reps,
        "warmup": config.warmup,
    }
    return variant_rows(samples, variants, per_variant, common)
