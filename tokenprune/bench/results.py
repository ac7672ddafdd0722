"""Result rows shared by every benchmark mode: samples per (metric, variant, repetition) -> rows.

A row describes one variant (``"baseline"`` or a method) of one run of the CLI. Its columns:

* ``method``, ``label``, ``keep``, ``params`` (the method's ``to_config()``), ``stage``;
* per metric of :data:`METRICS` that the runner measured (``ttft_ms``, ``decode_tok_s``, ``e2e_ms``,
  ``peak_mem_mb``, and the vLLM suite's ``ttft_cpu_ms``, ``throughput_rps``,
  ``throughput_cpu_rps``): the median, its ``_q1``/``_q3``/``_min``/``_max`` and the baseline's
  median as ``<metric>_baseline``;
* per metric with a speedup column (``speedup`` for TTFT, ``decode_speedup``, ``e2e_speedup``,
  ``throughput_speedup``...): the ratio of the baseline's median to the method's (inverted for
  higher-is-better metrics, so > 1 always means faster), with ``<speedup>_paired`` (median of the
  per-repetition paired ratios, steadier on a machine whose load drifts) and ``<speedup>_q1``/
  ``_q3``/``_min``/``_max`` of those paired ratios;
* ``ideal_ratio``: prompt token-layers the decoder processes in the baseline / with the method (the
  speedup pruning would give if prefill cost were linear in tokens and nothing else cost time),
  and ``ratio_to_ideal`` = ``speedup / ideal_ratio``;
* whatever the runner adds (token counts, shapes, model facts).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Sequence

from tokenprune.bench.timing import paired_ratios, summarize

__all__ = ["Samples", "METRICS", "ideal_ratio", "variant_rows", "BASELINE"]

BASELINE = "baseline"
# metric -> (lower is better, speedup column or None)
METRICS: dict[str, tuple[bool, Optional[str]]] = {
    "ttft_ms": (True, "speedup"),
    "decode_tok_s": (False, "decode_speedup"),
    "e2e_ms": (True, "e2e_speedup"),
    "peak_mem_mb": (True, None),
    "ttft_cpu_ms": (True, "ttft_cpu_speedup"),  # process CPU time of a request (vLLM, in-process engine)
    "throughput_rps": (False, "throughput_speedup"),
    "throughput_cpu_rps": (False, "throughput_cpu_speedup"),  # requests per CPU-second
}


class Samples:
    """Measurements keyed by metric, variant and repetition."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))

    def add(self, variant: str, rep: int, **metrics: Optional[float]) -> None:
        for metric, value in metrics.items():
            if value is not None:
                self._data[metric][variant][rep] = float(value)

    def get(self, metric: str, variant: str) -> dict[int, float]:
        return dict(self._data.get(metric, {}).get(variant, {}))


def ideal_ratio(prompt_tokens: int, removed: int, num_layers: int, first_pruned_layer: int = 0) -> float:
    """Decoder token-layers of the baseline prefill over those of the pruned prefill.

    Layers ``< first_pruned_layer`` see all ``prompt_tokens``; later layers see
    ``prompt_tokens - removed`` (pre-LLM pruning: ``first_pruned_layer = 0``; FastV: ``K``).
    """
    if prompt_tokens <= 0 or num_layers <= 0 or not 0 <= removed < prompt_tokens:
        raise ValueError(f"need 0 <= removed < prompt_tokens and num_layers > 0, got {removed}, {prompt_tokens}, "
                         f"{num_layers}")
    k = min(max(first_pruned_layer, 0), num_layers)
    pruned = prompt_tokens * k + (prompt_tokens - removed) * (num_layers - k)
    return prompt_tokens * num_layers / pruned


def variant_rows(
    samples: Samples,
    variants: Sequence[tuple[str, Any]],
    per_variant: Optional[dict[str, dict[str, Any]]] = None,
    common: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """One row per ``(label, method)`` (``method`` None for the baseline, which must come first).

    A method is a ``tp.Pruner`` or anything with ``name``, ``stage`` and ``to_config()`` (and
    optionally ``keep``): the suites measure a few things that are not tokenprune methods
    (transformers' prompt lookup, kvpress's SnapKV) in the same rows.
    ``per_variant[label]`` may carry ``ideal_ratio`` (and overrides any column); ``common`` is
    copied into every row.
    """
    if not variants or variants[0][1] is not None:
        raise ValueError("variants must start with the baseline (label, None)")
    base_label = variants[0][0]
    per_variant = per_variant or {}
    rows = []
    for label, method in variants:
        row: dict[str, Any] = {
            "method": BASELINE if method is None else method.name,
            "label": label,
            "keep": None if method is None else getattr(method, "keep", None),
            "stage": None if method is None else method.stage,
            "params": {} if method is None else method.to_config(),
        }
        for metric, (lower_is_better, speedup) in METRICS.items():
            values = samples.get(metric, label)
            if not values:
                continue
            row.update(summarize(list(values.values())).as_dict(metric))
            base = samples.get(metric, base_label)
            if not base:
                continue
            row[f"{metric}_baseline"] = summarize(list(base.values())).median
            if speedup is None or not row[metric] or not row[f"{metric}_baseline"]:
                continue
            ratio = row[f"{metric}_baseline"] / row[metric]
            row[speedup] = ratio if lower_is_better else 1 / ratio
            if method is not None:
                paired = paired_ratios(base, values) if lower_is_better else paired_ratios(values, base)
                if paired:
                    spread = summarize(paired).as_dict(speedup)
                    spread[f"{speedup}_paired"] = spread.pop(speedup)
                    row.update(spread)
        row.update(per_variant.get(label, {}))
        if row.get("ideal_ratio") and "speedup" in row:
            row["ratio_to_ideal"] = row["speedup"] / row["ideal_ratio"]
        row.update(common or {})
        rows.append(row)
    return rows
