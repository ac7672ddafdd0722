"""Adapters from the CLI's runner contract to the benchmark suites under ``benchmarks/``.

The suites (``benchmarks/vllm_bench.py``, ``benchmarks/text_bench.py``) are scripts of their own
with their own keyword arguments and row layouts; these adapters call them with the CLI's
:class:`~tokenprune.bench.modes.BenchConfig` and rename their figures to the CLI's columns
(``ttft_ms``, ``ttft_ms_baseline``, ``speedup``, ``ideal_ratio``...), keeping every other column
they report. A suite that is not importable makes the CLI exit 2 with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from tokenprune.bench.modes import BackendUnavailable, BenchConfig, import_benchmark

__all__ = ["run_vllm", "run_text"]

# CLI preset -> the vLLM suite's preset (its own checkpoints, saved once; shapes in its PRESETS).
VLLM_PRESETS = {"tiny-llava": "tiny", "medium-llava": "medium"}


def _suite(name: str, attr: str) -> Callable[..., list[dict[str, Any]]]:
    module = import_benchmark(name)
    fn = getattr(module, attr, None)
    if fn is None:
        raise BackendUnavailable(f"{name} has no {attr}")
    return fn


def run_vllm(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """One visual method with an integer keep against the unpruned engine, in vLLM.

    Rows: the baseline and the method, with TTFT (a ``max_tokens=1`` request) and request throughput
    (``throughput_rps``, a batch of ``batch_size`` requests generating ``new_tokens`` each).
    """
    bench = _suite("benchmarks.vllm_bench", "run_vllm_benchmark")
    if len(config.methods) != 1:
        raise ValueError("the vllm engine measures one method per run (e.g. --methods divprune:keep=64)")
    label, method = config.methods[0]
    if method.stage != "visual" or not isinstance(method.keep, int):
        raise ValueError("the vllm engine runs pre-LLM visual methods with an integer keep (e.g. divprune:keep=64)")
    preset = VLLM_PRESETS.get(config.model, config.model)
    raw = bench(presets=[preset], keep=method.keep, method=method.name, trials=config.reps,
                batch=config.batch_size, max_tokens=config.new_tokens, progress=False)
    by_metric = {r["metric"]: r for r in raw}
    ttft, tput = by_metric["ttft_s"], by_metric.get("throughput_rps", {})
    extra = {k: v for k, v in ttft.items() if k not in ("metric", "baseline", "pruned", "speedup", "method", "keep")}
    common = {"model": f"vllm:{preset}", "engine": "vllm", "mode": "visual", "random_weights": True,
              "batch_size": config.batch_size, "new_tokens": config.new_tokens, "reps": config.reps, "warmup": 1,
              "visual_tokens_before": 576, **extra}
    base_row = {"method": "baseline", "label": "baseline", "keep": None, "params": {}, **common,
                "ttft_ms": ttft["baseline"] * 1e3, "ttft_ms_baseline": ttft["baseline"] * 1e3, "speedup": 1.0,
                "visual_tokens_after": 576, "prompt_tokens": ttft.get("prompt_tokens_baseline"),
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


def run_text(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """Prompt/KV pruning (LazyLLM, SnapKV) on a Llama decoder, ``--prompt-tokens`` long prompts.

    ``--model``: a suite preset (tiny, small, medium), a CLI text preset (``llama-3-8b``, built here
    on the GPU and handed over) or a checkpoint directory.
    """
    bench_module = import_benchmark("benchmarks.text_bench")
    bench = getattr(bench_module, "run_text_benchmark", None)
    if bench is None:
        raise BackendUnavailable("benchmarks.text_bench has no run_text_benchmark")
    suite_presets = getattr(bench_module, "PRESETS", {})
    kwargs: dict[str, Any] = {}
    if config.model in suite_presets:
        kwargs["preset"] = config.model
    elif Path(config.model).is_dir():
        kwargs["model_path"] = config.model
    else:
        from tokenprune.bench.presets import get_preset, load_model, resolve_device

        preset = get_preset(config.model)
        if preset.family != "llama":
            raise ValueError(f"text mode needs a text model: {', '.join(suite_presets)}, llama-3-8b or a "
                             f"checkpoint directory; {config.model} is a vision-language preset")
        kwargs["model"] = load_model(config.model, resolve_device(config.device), config.dtype, None,
                                     config.seed).model
    raw = bench(lengths=[config.prompt_tokens] if config.prompt_tokens else None,
                methods=[("baseline", None), *config.methods], reps=config.reps, new_tokens=config.new_tokens,
                progress=False, **kwargs)
    methods = dict([("baseline", None), *config.methods])
    rows = []
    for r in raw:
        method = methods.get(r["method"])
        params = method.to_config() if method is not None else json.loads(r.get("config") or "{}")
        rows.append({**r, "label": r["method"], "method": method.name if method is not None else "baseline",
                     "keep": getattr(method, "keep", None), "params": params, "model": config.model,
                     "engine": "hf", "mode": "text", "ttft_ms": r["ttft_s"] * 1e3,
                     "ttft_ms_baseline": r["ttft_s"] * r["ttft_speedup"] * 1e3, "speedup": r["ttft_speedup"],
                     "batch_size": 1})
    return rows
