"""vLLM benchmark: TTFT and request throughput of LLaVA with and without visual token pruning.

One in-process engine per preset runs with the tokenprune plugin configured
(``TOKENPRUNE_CONFIG``); the *baseline* is the same engine with a per-request budget covering every
image token (``mm_processor_kwargs={"tokenprune_keep": 576}``), which the tests show reproduces the
unpatched engine bit for bit. Baseline and pruned requests are interleaved trial by trial (the
order alternates), every request carries a fresh image (no encoder-cache hits) and prefix caching is
off, so both see the same machine state. Reported: medians, the speedup, the *ideal* speedup
(prompt tokens without / with pruning) and the fraction of it achieved.

* TTFT: wall time of one request with ``max_tokens=1`` (image processing + vision tower +
  prefill + one sampled token), as an offline ``LLM.generate`` caller sees it.
* Throughput: ``requests / wall time`` for a batch of ``batch`` concurrent requests generating
  ``max_tokens`` tokens each.
* The same two with the process's CPU time instead of wall time (``ttft_cpu_s``,
  ``throughput_cpu_rps``: requests per CPU-second). The engine runs in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so this is the compute each request costs; on a shared
  machine it is far less sensitive to other processes than wall time (``load_avg_1m`` is recorded).

Usage (CPU, tiny and medium presets, results to CSV)::

    python -m tokenprune.bench.suites.vllm_visual --presets tiny medium --keep 64 --trials 5 \\
        --out benchmarks/results/vllm_cpu.csv

``run_vllm_benchmark(...)`` returns the rows as dicts; :func:`run` is the
``tokenprune-bench --engine vllm`` runner over it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from tokenprune.bench.modes import BenchConfig

#: model presets: keyword arguments of ``tokenprune.fixtures.build_tiny_llava`` (576 image tokens).
PRESETS: dict[str, dict[str, Any]] = {
    # CLIP 2 x 64 + Llama 4 x 128 (head_dim 64): dominated by fixed per-request costs.
    "tiny": dict(image_size=336),
    # CLIP 4 x 256 + Llama 8 x 1024 (16 heads of 64), ~110M parameters: prefill dominates.
    "medium": dict(
        image_size=336,
        vision_hidden_size=256,
        vision_layers=4,
        vision_heads=4,
        hidden_size=1024,
        num_layers=8,
        num_heads=16,
        intermediate_size=2816,
    ),
}
N_IMAGE_TOKENS = 576
PROMPT = "USER: <image>\nDescribe the picture in detail.\nASSISTANT:"


def _environment() -> dict[str, Any]:
    import torch
    import transformers
    import vllm

    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": vllm.__version__,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _model(preset: str, cache_dir: Path) -> Path:
    from tokenprune.fixtures import build_tiny_llava

    path = cache_dir / f"llava-{preset}"
    if not (path / "config.json").exists():
        build_tiny_llava(path, **PRESETS[preset])
    return path


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def run_vllm_benchmark(
    presets: Sequence[str] = ("tiny", "medium"),
    keep: int = 64,
    method: str = "divprune",
    trials: int = 5,
    batch: int = 4,
    max_tokens: int = 16,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark pruned against unpruned LLaVA in vLLM; one row per (preset, metric).

    Args:
        presets: names in :data:`PRESETS`.
        keep: visual tokens kept per image by the pruned requests (of 576).
        method: a visual method name accepted by ``TOKENPRUNE_CONFIG``.
        trials: interleaved repetitions per metric (medians are reported).
        batch: concurrent requests per throughput measurement.
        max_tokens: tokens generated per request in the throughput measurement.
        cache_dir: where preset checkpoints are built once (default: a tmp dir).

    Returns:
        Rows with ``preset, metric, method, keep, baseline, pruned, speedup, ideal_speedup,
        fraction_of_ideal, prompt_tokens_baseline, prompt_tokens_pruned, trials, ...`` plus
        machine and version columns. ``speedup`` is baseline/pruned for TTFT (seconds) and
        pruned/baseline for throughput (requests per second), so > 1 always means faster.
    """
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; available: {sorted(PRESETS)}")
    if not isinstance(keep, int) or not 1 <= keep <= N_IMAGE_TOKENS:
        raise ValueError(f"keep must be an int in [1, {N_IMAGE_TOKENS}], got {keep!r}")
    if trials < 1 or batch < 1 or max_tokens < 1:
        raise ValueError("trials, batch and max_tokens must be >= 1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("TMPDIR", "/tmp")) / "tokenprune-vllm-bench"
    cache.mkdir(parents=True, exist_ok=True)

    import tokenprune as tp
    from tokenprune.integrations import vllm as tpv

    tpv.enable(tp.build(method, keep=keep))
    try:
        rows: list[dict[str, Any]] = []
        for preset in presets:
            rows += _bench_preset(preset, _model(preset, cache), keep, method, trials, batch, max_tokens, progress)
    finally:
        tpv.disable()
    env = _environment()
    return [{**row, **env} for row in rows]


def _bench_preset(preset, path, keep, method, trials, batch, max_tokens, progress) -> list[dict[str, Any]]:
    from vllm import LLM, SamplingParams

    from tokenprune.fixtures import make_image

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
                    "multi_modal_data": {"image": make_image(336, seed=seed[0])},
                    "mm_processor_kwargs": {"tokenprune_keep": budget},
                }
            )
        return out

    def timed(reqs, params) -> tuple[float, float, int]:
        wall, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(reqs, params, use_tqdm=False)
        return time.perf_counter() - wall, time.process_time() - cpu, len(outs[0].prompt_token_ids)

    first = SamplingParams(max_tokens=1, temperature=0.0)
    many = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    budgets = {"baseline": N_IMAGE_TOKENS, "pruned": keep}
    samples: dict[str, dict[str, list[float]]] = {
        metric: {m: [] for m in budgets} for metric in ("ttft_s", "ttft_cpu_s", "throughput_rps", "throughput_cpu_rps")
    }
    ttft, tput = samples["ttft_s"], samples["throughput_rps"]
    prompt_tokens: dict[str, int] = {}
    for mode, budget in budgets.items():  # warm-up, both paths
        timed(requests(batch, budget), many)
    for trial in range(trials):
        order = list(budgets) if trial % 2 == 0 else list(reversed(budgets))
        for mode in order:
            wall, cpu, prompt_tokens[mode] = timed(requests(1, budgets[mode]), first)
            samples["ttft_s"][mode].append(wall)
            samples["ttft_cpu_s"][mode].append(cpu)
        for mode in order:
            wall, cpu, _ = timed(requests(batch, budgets[mode]), many)
            samples["throughput_rps"][mode].append(batch / wall)
            samples["throughput_cpu_rps"][mode].append(batch / cpu)
        if progress:
            print(
                f"[{preset}] trial {trial + 1}/{trials}: TTFT {ttft['baseline'][-1]:.3f}s vs "
                f"{ttft['pruned'][-1]:.3f}s (CPU {samples['ttft_cpu_s']['baseline'][-1]:.3f}s vs "
                f"{samples['ttft_cpu_s']['pruned'][-1]:.3f}s), throughput {tput['baseline'][-1]:.2f} vs "
                f"{tput['pruned'][-1]:.2f} req/s",
                file=sys.stderr,
            )
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort before the next preset
        pass
    del llm
    gc.collect()

    ideal = prompt_tokens["baseline"] / prompt_tokens["pruned"]
    common = {
        "preset": preset,
        "method": method,
        "keep": keep,
        "prompt_tokens_baseline": prompt_tokens["baseline"],
        "prompt_tokens_pruned": prompt_tokens["pruned"],
        "ideal_speedup": round(ideal, 4),
        "trials": trials,
        "batch": batch,
        "max_tokens": max_tokens,
    }
    rows = []
    for metric, values in samples.items():
        higher_is_better = metric.startswith("throughput")
        base, pruned = _median(values["baseline"]), _median(values["pruned"])
        speedup = pruned / base if higher_is_better else base / pruned
        rows.append(
            {
                **common,
                "metric": metric,
                "baseline": round(base, 5),
                "pruned": round(pruned, 5),
                "speedup": round(speedup, 4),
                "fraction_of_ideal": round(speedup / ideal, 4),
            }
        )
    return rows


# CLI preset -> this suite's preset (its own checkpoints, saved once; shapes in PRESETS).
CLI_PRESETS = {"tiny-llava": "tiny", "medium-llava": "medium"}


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
    raw = run_vllm_benchmark(presets=[preset], keep=method.keep, method=method.name, trials=config.reps,
                             batch=config.batch_size, max_tokens=config.new_tokens, progress=False)
    by_metric = {r["metric"]: r for r in raw}
    ttft, tput = by_metric["ttft_s"], by_metric.get("throughput_rps", {})
    extra = {k: v for k, v in ttft.items() if k not in ("metric", "baseline", "pruned", "speedup", "method", "keep")}
    import torch

    common = {"model": f"vllm:{preset}", "engine": "vllm", "mode": "visual", "random_weights": True,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "float32",
              "batch_size": config.batch_size, "new_tokens": config.new_tokens, "reps": config.reps, "warmup": 1,
              "visual_tokens_before": N_IMAGE_TOKENS, **extra}
    base_row = {"method": "baseline", "label": "baseline", "keep": None, "params": {}, **common,
                "ttft_ms": ttft["baseline"] * 1e3, "ttft_ms_baseline": ttft["baseline"] * 1e3, "speedup": 1.0,
                "visual_tokens_after": N_IMAGE_TOKENS, "prompt_tokens": ttft.get("prompt_tokens_baseline"),
                "prompt_tokens_after": ttft.get("prompt_tokens_baseline"), "ideal_ratio": 1.0,
                "throughput_rps": tput.get("baseline")}
    method_row = {"method": method.name, "label": label, "keep": method.keep, "params": method.to_config(), **common,
                  "ttft_ms": ttft["pruned"] * 1e3, "ttft_ms_baseline": ttft["baseline"] * 1e3,
                  "speedup": ttft["speedup"], "visual_tokens_after": method.keep,
                  "prompt_tokens": ttft.get("prompt_tokens_baseline"),
                  "prompt_tokens_after": ttft.get("prompt_tokens_pruned"),
                  "ideal_ratio": ttft.get("ideal_speedup"), "ratio_to_ideal": ttft.get("fraction_of_ideal"),
                  "throughput_rps": tput.get("pruned"), "throughput_speedup": tput.get("speedup")}
    return [base_row, method_row]


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=sorted(PRESETS))
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--method", default="divprune")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None, help="CSV file for the rows (also printed as JSON)")
    args = parser.parse_args(argv)
    rows = run_vllm_benchmark(
        args.presets, args.keep, args.method, args.trials, args.batch, args.max_tokens, args.cache_dir
    )
    for row in rows:
        print(
            f"{row['preset']:>7} {row['metric']:>15}: baseline {row['baseline']:.4f}  pruned {row['pruned']:.4f}  "
            f"speedup {row['speedup']:.2f}x  (ideal {row['ideal_speedup']:.2f}x, {100 * row['fraction_of_ideal']:.0f}%)"
        )
    if args.out:
        write_csv(rows, args.out)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
