"""Pure-torch greedy max-min diversity selection (MMDP), the reference and CPU path of
:func:`tokenprune.kernels.mmdp_select`.

DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models") casts token pruning as a Max-Min Diversity Problem over cosine distance
``d(i, j) = 1 - cos(x_i, x_j)`` and solves it greedily:

1. first pick: the token whose nearest neighbour is farthest, ``argmax_i min_{j != i} d(i, j)``;
2. then, ``k - 1`` times: the token maximising its minimum distance to the kept set.

Ties go to the lowest index. ``1 - c`` is decreasing in the cosine ``c``, so both rules are run on
similarities (argmin of a running maximum), which saves an ``[n, n]`` pass. The first rule needs every
token's nearest neighbour, so one ``[n, n]`` Gram matrix (an ``n x n x D`` GEMM) is the floor of the
work; each greedy step then only folds one row of it into the running maximum.
"""

from __future__ import annotations

import torch

from tokenprune.kernels.mmdp.common import MmdpSegments

__all__ = ["cosine_gram", "mmdp_select_segment", "mmdp_select_torch"]


def cosine_gram(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[n, n]`` (fp32) of the rows of ``x`` ``[n, D]``.

    One GEMM ``G = x @ x.T``, then ``G_ij * (r_i * r_j)`` with ``r = 1 / max(|x|, 1e-12)`` taken from
    the diagonal: two ``[n, n]`` passes instead of normalising the ``[n, D]`` rows (cheaper whenever
    ``D > n / 2``, the usual case). A zero vector has similarity 0 to everything. The GEMM computes
    ``(i, j)`` and ``(j, i)`` from the same products in the same order and ``r_i * r_j`` commutes,
    so the result is symmetric and mutual nearest neighbours tie exactly.
    """
    xf = x.float()
    gram = xf @ xf.T
    inv_norm = gram.diagonal().clamp_min(1e-24).rsqrt()
    gram *= torch.outer(inv_norm, inv_norm)
    return gram


def mmdp_select_segment(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MMDP over one segment.

    Args:
        x: ``[n, D]`` features (any float dtype; the distance math runs in fp32).
        k: number of tokens to keep (``>= 1``; capped at ``n``).

    Returns:
        LongTensor ``[min(k, n)]``: kept indices into ``x``, ascending.
    """
    n = x.shape[0]
    k = min(k, n)
    if k == n:
        return torch.arange(n, device=x.device)
    sim = cosine_gram(x)
    # The nearest neighbour of i must be another token: hide the diagonal.
    sim.diagonal().fill_(float("-inf"))
    # argmin returns the first minimal index: ties -> lowest index.
    pick = int(torch.argmin(sim.amax(dim=1)))
    # From now on the diagonal is +inf, so folding in row `pick` also marks `pick` as taken.
    sim.diagonal().fill_(float("inf"))
    max_sim = sim[pick].clone()
    picks = [pick]
    for _ in range(k - 1):
        pick = int(torch.argmin(max_sim))
        picks.append(pick)
        torch.maximum(max_sim, sim[pick], out=max_sim)
    return torch.sort(torch.tensor(picks, dtype=torch.long, device=x.device)).values


def mmdp_select_torch(segments: MmdpSegments) -> torch.Tensor:
    """Run :func:`mmdp_select_segment` over every segment; returns the packed global indices."""
    out = []
    for start, end in segments.bounds:
        out.append(mmdp_select_segment(segments.x[start:end], segments.k) + start)
    if not out:
        return torch.empty(0, dtype=torch.long, device=segments.x.device)
    return torch.cat(out)
