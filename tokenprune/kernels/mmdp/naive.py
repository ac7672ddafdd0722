"""Pure-torch greedy max-min diversity selection (MMDP), the reference and CPU path of
:func:`tokenprune.kernels.mmdp_select`.

DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models") casts token pruning as a Max-Min Diversity Problem over cosine distance
``d(i, j) = 1 - cos(x_i, x_j)`` and solves it greedily:

1. first pick: the token whose nearest neighbour is farthest, ``argmax_i min_{j != i} d(i, j)``;
2. then, ``k - 1`` times: the token maximising its minimum distance to the kept set.

Ties go to the lowest index. The first rule needs every token's nearest neighbour, so one
normalised ``[n, n]`` Gram matrix is the floor of the work; each greedy step then only updates a
running minimum with one row of it.
"""

from __future__ import annotations

import torch

from tokenprune.kernels.mmdp.common import MmdpSegments

__all__ = ["mmdp_select_segment", "mmdp_select_torch"]


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
    xf = x.float()
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - xn @ xn.T  # [n, n]
    # The nearest neighbour of i must be another token: hide the diagonal.
    dist.diagonal().fill_(float("inf"))
    nearest = dist.min(dim=1).values
    first = int(torch.argmax(nearest))  # argmax returns the first maximal index: ties -> lowest
    dist.diagonal().fill_(0.0)
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    chosen[first] = True
    min_dist = dist[first].clone()
    picks = [first]
    neg_inf = torch.tensor(float("-inf"), device=x.device)
    for _ in range(k - 1):
        candidate = torch.where(chosen, neg_inf, min_dist)
        pick = int(torch.argmax(candidate))
        picks.append(pick)
        chosen[pick] = True
        torch.minimum(min_dist, dist[pick], out=min_dist)
    return torch.sort(torch.tensor(picks, dtype=torch.long, device=x.device)).values


def mmdp_select_torch(segments: MmdpSegments) -> torch.Tensor:
    """Run :func:`mmdp_select_segment` over every segment; returns the packed global indices."""
    out = []
    for start, end in segments.bounds:
        out.append(mmdp_select_segment(segments.x[start:end], segments.k) + start)
    if not out:
        return torch.empty(0, dtype=torch.long, device=segments.x.device)
    return torch.cat(out)
