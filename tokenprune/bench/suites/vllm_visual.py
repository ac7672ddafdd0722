"""vLLM benchmark: TTFT and request throughput of LLaVA and Qwen2.5-VL with and without visual
token pruning.

One in-process engine per preset runs with the tokenprune plugin configured
(``TOKENPRUNE_CONFIG``); the *baseline* is the same engine with a per-request budget covering every
image token (``mm_processor_kwargs={"tokenprune_keep": N}``, 576 for the LLaVA presets, 256 for
the Qwen ones), which the tests show reproduces the unpatched engine bit for bit. Baseline and pruned requests follow
:func:`tokenprune.bench.timing.interleaved_schedule` (with two variants the order alternates from
one repetition to the next), every request carries a fresh image (no encoder-cache hits) and prefix
caching is off, so both see the same machine state. Rows come from
:func:`tokenprune.bench.results.variant_rows`: medians with quartiles, speedups (ratio of medians
and ``*_paired``), the *ideal* ratio (prompt tokens without / with pruning) and the fraction of it
achieved (``ratio_to_ideal``).

* TTFT (``ttft_ms``): wall time of one request with ``max_tokens=1`` (image processing + vision
  tower + prefill + one sampled token), as an offline ``LLM.generate`` caller sees it.
* Throughput (``throughput_rps``): ``requests / wall time`` for a batch of ``batch`` concurrent
  requests generating ``max_tokens`` tokens each.
* The same two with the process's CPU time instead of wall time (``ttft_cpu_ms``,
  ``throughput_cpu_rps``: requests per CPU-second; :class:`~tokenprune.bench.timing.Stopwatch`).
  The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so this is the compute
  each request costs; on a shared machine it is far less sensitive to other processes than wall
  time (``load_avg_1m`` is recorded).

Usage (CPU, tiny and medium presets, results to CSV)::

    python -m tokenprune.bench.suites.vllm_visual --presets tiny medium --keep 64 --trials 5 \\
        --csv benchmarks/results/vllm_cpu.csv --force
    python -m tokenprune.bench.suites.vllm_visual --presets qwen-tiny qwen-medium --keep 32 --trials 5 \\
        --csv benchmarks/results/vllm_cpu_qwen.csv --force

``run_vllm_benchmark(...)`` returns the rows; :func:`run` is the ``tokenprune-bench --engine vllm``
runner over it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from tokenprune.bench.modes import BenchConfig
from tokenprune.bench.results import Samples, ideal_ratio, variant_rows
from tokenprune.bench.timing import Stopwatch, interleaved_schedule

@dataclass(frozen=True)
class VllmPreset:
    """A checkpoint the suite builds once: ``family`` (``"llava"`` / ``"qwen2_5_vl"``), the square
    image side fed to it, the image tokens that gives, and the fixture builder's arguments."""

    family: str
    image_size: int
    image_tokens: int
    build: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, VllmPreset] = {
    # CLIP 2 x 64 + Llama 4 x 128 (head_dim 64): dominated by fixed per-request costs.
    "tiny": VllmPreset("llava", 336, 576, dict(image_size=336)),
    # CLIP 4 x 256 + Llama 8 x 1024 (16 heads of 64), ~110M parameters: prefill dominates.
    "medium": VllmPreset("llava", 336, 576, dict(
        image_size=336, vision_hidden_size=256, vision_layers=4, vision_heads=4, hidden_size=1024, num_layers=8,
        num_heads=16, intermediate_size=2816,
    )),
    # Qwen2.5-VL layout (window ViT 4 x 64, merger 2x2): 448 px -> 16 x 16 = 256 merged tokens.
    # Decoder Qwen2 4 x 128 (head_dim 64, M-RoPE sections [8, 12, 12]).
    "qwen-tiny": VllmPreset("qwen2_5_vl", 448, 256, dict(max_pixels=448 * 448)),
    # Decoder Qwen2 8 x 1024 (16 heads of 64), ~70M parameters: prefill dominates.
    "qwen-medium": VllmPreset("qwen2_5_vl", 448, 256, dict(
        max_pixels=448 * 448, hidden_size=1024, num_layers=8, num_heads=16,
    )),
}
PROMPT = "USER: <image>\nDescribe the picture in detail.\nASSISTANT:"


def _model(preset: str, cache_dir: Path) -> Path:
    from tokenprune.fixtures import build_tiny_llava, build_tiny_qwen2_5_vl

    spec = PRESETS[preset]
    path = cache_dir / f"{spec.family}-{preset}"
    if not (path / "config.json").exists():
        builder = build_tiny_llava if spec.family == "llava" else build_tiny_qwen2_5_vl
        builder(path, **spec.build)
    return path


def run_vllm_benchmark(
    presets: Sequence[str] = ("tiny", "medium"),
    keep: int = 64,
    method: Any = "divprune",
    trials: int = 5,
    batch: int = 4,
    max_tokens: int = 16,
    cache_dir: Optional[str | os.PathLike] = None,
    warmup: int = 1,
    track: Optional[Callable[..., Iterable]] = None,
) -> list[dict[str, Any]]:
    """Benchmark pruned against unpruned LLaVA in vLLM; two rows (baseline, method) per preset.

    Args:
        presets: names in :data:`PRESETS`.
        keep: visual tokens kept per image by the pruned requests (of the preset's image tokens).
        method: a visual method name accepted by ``TOKENPRUNE_CONFIG`` (built with ``keep``), or a
            built pre-LLM method with an integer ``keep`` (which then overrides ``keep``).
        trials: interleaved repetitions (medians are reported).
        batch: concurrent requests per throughput measurement.
        max_tokens: tokens generated per request in the throughput measurement.
        cache_dir: where preset checkpoints are built once (default: a tmp dir).
        warmup: discarded rounds of both variants.
        track: wraps the schedule (a progress bar).

    Returns:
        :func:`~tokenprune.bench.results.variant_rows` rows: ``ttft_ms``, ``ttft_cpu_ms``,
        ``throughput_rps``, ``throughput_cpu_rps`` with their speedups (> 1 always means faster),
        ``prompt_tokens``/``prompt_tokens_after``, ``visual_tokens_before``/``_after``,
        ``ideal_ratio``, ``ratio_to_ideal``, ``preset``.
    """
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; available: {sorted(PRESETS)}")
    keep = keep if isinstance(method, str) else method.keep
    most = min(PRESETS[p].image_tokens for p in presets)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= most:
        raise ValueError(f"keep must be an int in [1, {most}] (the presets' image tokens), got {keep!r}")
    if trials < 1 or batch < 1 or max_tokens < 1:
        raise ValueError("trials, batch and max_tokens must be >= 1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("TMPDIR", "/tmp")) / "tokenprune-vllm-bench"
    cache.mkdir(parents=True, exist_ok=True)

    import tokenprune as tp
    from tokenprune.integrations import vllm as tpv

    pruner = tp.build(method, keep=keep) if isinstance(method, str) else method
    tpv.enable(pruner)
    try:
        rows: list[dict[str, Any]] = []
        for preset in presets:
            rows += _bench_preset(preset, _model(preset, cache), pruner, trials, batch, max_tokens, warmup,
                                  track or (lambda iterable, description="": iterable))
    finally:
        tpv.disable()
    return rows


def _bench_preset(preset, path, pruner, trials, batch, max_tokens, warmup, track) -> list[dict[str, Any]]:
    import torch
    from vllm import LLM, SamplingParams

    from tokenprune.fixtures import make_image

    spec = PRESETS[preset]

    llm = LLM(
        str(path),
        enforce_eager=True,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=batch,
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=512 << 20,
        enable_prefix_caching=False,
        seed=0,
    )
    seed = [1000]

    def requests(n: int, budget: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            seed[0] += 1  # a new image every time: no encoder-cache or processor-cache hits
            out.append(
                {
                    "prompt": PROMPT,
                    "multi_modal_data": {"image": make_image(spec.image_size, seed=seed[0])},
                    "mm_processor_kwargs": {"tokenprune_keep": budget},
                }
            )
        return out

    def timed(reqs, params) -> tuple[Stopwatch, int]:
        with Stopwatch() as watch:
            outs = llm.generate(reqs, params, use_tqdm=False)
        return watch, len(outs[0].prompt_token_ids)

    first = SamplingParams(max_tokens=1, temperature=0.0)
    many = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    label = pruner.name
    variants = [("baseline", None), (label, pruner)]
    budgets = {"baseline": spec.image_tokens, label: pruner.keep}
    samples = Samples()
    prompt_tokens: dict[str, int] = {}
    for item in track(interleaved_schedule(list(budgets), trials, warmup), preset):
        ttft, prompt_tokens[item.variant] = timed(requests(1, budgets[item.variant]), first)
        tput, _ = timed(requests(batch, budgets[item.variant]), many)
        if not item.warmup:
            samples.add(item.variant, item.rep, ttft_ms=ttft.wall_s * 1e3, ttft_cpu_ms=ttft.cpu_s * 1e3,
                        throughput_rps=batch / tput.wall_s, throughput_cpu_rps=batch / tput.cpu_s)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort before the next preset
        pass
    del llm
    gc.collect()

    full = prompt_tokens["baseline"]
    per_variant = {
        name: {"visual_tokens_before": spec.image_tokens, "visual_tokens_after": budgets[name], "prompt_tokens": full,
               "prompt_tokens_after": prompt_tokens[name],
               # pre-LLM pruning: every decoder layer sees the shorter prompt
               "ideal_ratio": ideal_ratio(full, full - prompt_tokens[name], 1)}
        for name in budgets
    }
    common = {"model": f"vllm:{preset}", "preset": preset, "family": spec.family, "engine": "vllm", "mode": "visual", "random_weights": True,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "float32", "batch_size": batch,
              "new_tokens": max_tokens, "reps": trials, "warmup": warmup}
    return variant_rows(samples, variants, per_variant, common)


# CLI preset -> this suite's preset (its own checkpoints, saved once; shapes in PRESETS).
CLI_PRESETS = {"tiny-llava": "tiny", "medium-llava": "medium", "tiny-qwen2.5-vl": "qwen-tiny",
               "medium-qwen2.5-vl": "qwen-medium"}


def run(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """``tokenprune-bench --engine vllm``: one visual method with an integer keep against the
    unpruned engine, through :func:`run_vllm_benchmark`.

    Rows: the baseline and the method, with TTFT (a ``max_tokens=1`` request) and request throughput
    (``throughput_rps``, a batch of ``batch_size`` requests generating ``new_tokens`` each).
    """
    if len(config.methods) != 1:
        raise ValueError("the vllm engine measures one method per run (e.g. --methods divprune:keep=64)")
    label, method = config.methods[0]
    if method.stage != "visual" or not isinstance(method.keep, int):
        raise ValueError("the vllm engine runs pre-LLM visual methods with an integer keep (e.g. divprune:keep=64)")
    preset = CLI_PRESETS.get(config.model, config.model)
    rows = run_vllm_benchmark(presets=[preset], method=method, trials=config.reps, batch=config.batch_size,
                              max_tokens=config.new_tokens, warmup=config.warmup, track=track)
    rows[1]["label"] = label
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=sorted(PRESETS))
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--method", default="divprune")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--csv", default=None, help="write the rows as CSV here")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    report.check_outputs_or_exit(parser, [("--csv", args.csv, "csv"), ("--json", args.json, "json")], force=args.force)
    rows = run_vllm_benchmark(args.presets, args.keep, args.method, args.trials, args.batch, args.max_tokens,
                              args.cache_dir, args.warmup)
    meta = {**report.environment(rows[0]["device"]), "parameters": vars(args)}
    report.print_table(rows, meta, title="vLLM: baseline vs " + args.method)
    if args.csv:
        report.write_csv(args.csv, meta, rows)
    if args.json:
        report.write_json(args.json, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
