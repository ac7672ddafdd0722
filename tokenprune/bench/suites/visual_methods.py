"""Every visual pruning method on tiny offline LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL fixtures: tokens
reaching the decoder and time-to-first-token ratios (HF generate, CPU, one thread by default).

    python -m tokenprune.bench.suites.visual_methods [--reps 5] [--keep 64] \\
        [--out benchmarks/results/visual_methods_cpu] [--force]

Each fixture is saved to a temporary directory and measured by the ``tokenprune-bench`` visual
runner (:func:`tokenprune.bench.suites.hf_visual.run`, i.e. ``tokenprune-bench latency --model
<checkpoint>``): baseline and methods interleaved, TTFT (vision encoder + selection + prefill + first
token: pre-LLM methods do not shorten the encoder) from one ``generate`` call per run, rows from
:func:`tokenprune.bench.results.variant_rows`. Models: LLaVA-1.5-shaped (336 px, 576 tokens),
LLaVA-NeXT-shaped (112 px crops of 64 tokens, a 224x224 image: base + 2x2 grid + newlines = 336
placeholders), Qwen2.5-VL-shaped (448x448 image, 256 tokens).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import tokenprune as tp
from tokenprune.bench.modes import BenchConfig

__all__ = ["methods", "models", "run_visual_methods"]


def methods(keep: int) -> list[tuple[str, tp.Pruner]]:
    """``[(label, method)]``: every registered pre-LLM (``"visual"``) and in-LLM (``"llm"``) method at
    ``keep`` tokens, FastV-like methods (a ``layer`` field) at layer 2."""
    from tokenprune.methods.base import get_method_class, method_stages

    out = []
    for name in tp.available_methods():
        cls = get_method_class(name)
        if not all(stage in ("visual", "llm") for stage in method_stages(cls)):  # ToDRE: both
            continue
        extra = {"layer": 2} if "layer" in getattr(cls, "__dataclass_fields__", {}) else {}
        out.append((name, tp.build(name, keep=keep, **extra)))
    return out


def models() -> dict[str, tuple[Callable[[Path], Any], int]]:
    """name -> (builder of the fixture checkpoint at a path, image side in pixels)."""
    from tokenprune.fixtures import build_tiny_llava, build_tiny_llava_next, build_tiny_qwen2_5_vl

    return {
        "llava-1.5": (lambda p: build_tiny_llava(p, image_size=336, vision_layers=4, hidden_size=256), 336),
        "llava-next": (lambda p: build_tiny_llava_next(p, crop_size=112, hidden_size=256), 224),
        "qwen2.5-vl": (lambda p: build_tiny_qwen2_5_vl(p, hidden_size=256, max_pixels=448 * 448), 448),
    }


def run_visual_methods(keep: int = 64, reps: int = 5, warmup: int = 1, only: Optional[Sequence[str]] = None,
                       track: Optional[Callable[..., Iterable]] = None) -> list[dict[str, Any]]:
    """Rows of the visual runner for every fixture of :func:`models` (``only``: a subset of names)."""
    from tokenprune.bench.suites import hf_visual

    track = track or (lambda iterable, description="": iterable)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, size) in models().items():
            if only is not None and name not in only:
                continue
            path = Path(tmp) / name
            build(path)
            config = BenchConfig(model=str(path), methods=methods(keep), image_size=size, new_tokens=1, reps=reps,
                                 warmup=warmup, device="cpu")
            rows += [{**row, "model": name} for row in hf_visual.run(config, track)]
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    import torch

    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/visual_methods_cpu", help="results stem (.json, .csv)")
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    report.check_outputs_or_exit(parser, [("--out", out.with_suffix(".json"), "json"),
                                          ("--out", out.with_suffix(".csv"), "csv")], force=args.force)
    torch.set_num_threads(args.threads)
    rows = run_visual_methods(args.keep, args.reps, args.warmup)
    meta = {**report.environment("cpu"), "parameters": vars(args)}
    for model in dict.fromkeys(r["model"] for r in rows):
        report.print_table([r for r in rows if r["model"] == model], meta, title=model)
    report.write_json(out.with_suffix(".json"), meta, rows)
    report.write_csv(out.with_suffix(".csv"), meta, rows)


if __name__ == "__main__":
    main()
