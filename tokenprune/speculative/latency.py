"""Latency model of the target and the budget it implies (Sequoia / EAGLE-2 ``total_token=-1``).

The time of one target forward over ``n`` tree tokens is measured once per model at a few sizes
(interleaved repetitions, the fastest kept: on a shared machine preemption adds spikes of several
forwards' length to random samples, which the minimum ignores) and interpolated linearly. At every step the budget is the one
that maximises expected tokens per second:

    N* = argmax_N (1 + sum_{i <= N} P(node i accepted)) / t(N + 1)

over the nodes ranked by path score, where ``P(node accepted) = exp(path score)`` (the product of
edge probabilities along its path; the 1 is the bonus token the target always yields). This is the
per-step form of Sequoia's hardware-aware argmin ``(d t_draft + t_target(m)) / E[accepted]``
(Chen et al., 2024), with the drafting time folded into the per-step constant.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["LatencyModel", "choose_budget"]


@dataclass
class LatencyModel:
    """Measured forward time (seconds) against the number of tokens in the forward."""

    sizes: list[int]
    seconds: list[float]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes:
            raise ValueError("sizes and seconds must be non-empty and of equal length")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must be strictly increasing, got {self.sizes}")

    def time(self, n: int) -> float:
        """Interpolated time of a forward over ``n`` tokens (linear extrapolation past the ends)."""
        s, t = self.sizes, self.seconds
        if len(s) == 1:
            return t[0]
        i = min(max(bisect_left(s, n), 1), len(s) - 1)
        slope = (t[i] - t[i - 1]) / (s[i] - s[i - 1])
        return max(t[i - 1] + slope * (n - s[i - 1]), 1e-9)

    @classmethod
    def measure(cls, forward: Callable[[int], None], sizes: Sequence[int], repeats: int = 7) -> "LatencyModel":
        """Time ``forward(n)`` for each size, repetitions interleaved across sizes, fastest kept."""
        sizes = sorted(set(int(n) for n in sizes))
        forward(sizes[0])  # warm-up (allocator, kernels)
        samples: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(repeats):
            for n in sizes:
                start = time.perf_counter()
                forward(n)
                samples[n].append(time.perf_counter() - start)
        seconds = [min(samples[n]) for n in sizes]
        # Enforce a non-decreasing cost curve: noise must not make a bigger tree look cheaper.
        for i in range(1, len(seconds)):
            seconds[i] = max(seconds[i], seconds[i - 1])
        return cls(sizes, seconds)


def choose_budget(ranked_scores: torch.Tensor, latency: LatencyModel, max_budget: int) -> int:
    """Best number of draft nodes to verify.

    Args:
        ranked_scores: ``[M]`` path log-probabilities of the candidate nodes, best first (every
            prefix of that order is a connected tree, see :func:`~tokenprune.speculative.prune.ranked_nodes`).
        latency: the target's latency model.
        max_budget: upper bound on the answer.

    Returns:
        ``N`` in ``[0, min(M, max_budget)]`` maximising expected tokens per second.
    """
    m = min(int(ranked_scores.numel()), max_budget)
    expected = torch.cat([torch.ones(1, dtype=torch.float64),
                          1.0 + torch.cumsum(ranked_scores[:m].double().exp(), dim=0)])
    cost = torch.tensor([latency.time(n + 1) for n in range(m + 1)], dtype=torch.float64)
    return int(torch.argmax(expected / cost))
