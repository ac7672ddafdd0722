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

__all__ = ["run", "llava_inputs"]

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
    text_cfg = cfg.text_config
    image_id = int(cfg.image_token_id)
    # Ordinary vocabulary ids only: above the specials, below the image token when it sits inside the vocab.
    high = image_id if 5 < image_id < text_cfg.vocab_size else text_cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(5, high, (batch_size, text_tokens), generator=gen)
    bos = torch.full((batch_size, 1), int(text_cfg.bos_token_id or 1))
    head = min(4, text_tokens)
    image = torch.full((batch_size, n_image), image_id)
    input_ids = torch.cat([bos, text[:, :head], image, text[:, head:]], dim=1).to(lm.device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": _pixel_values(vision.image_size, range(seed, seed + batch_size), lm.device, lm.dtype),
    }


INPUT_BUILDERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"llava": llava_inputs}


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
