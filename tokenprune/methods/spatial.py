"""Spatial helpers shared by the grid-aware visual methods (UniformGrid, HoloV): budget splitting
and crops of an image's patch grids (:meth:`ImageTokens.spatial_blocks`)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["split_budget", "grid_crops", "raster_crops", "uniform_grid_points"]


def split_budget(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` tokens over groups: ``floor(w_i / sum(w) * total)`` each, capped at ``caps[i]``,
    then the remainder one token at a time to the groups in descending weight order (ties to the
    lowest index), cycling while tokens remain, skipping full groups.

    This is HoloV's largest-weight remainder rule with one fix: a quota above a group's size is not
    lost (the public code then pads with zero vectors) but flows to the next groups, so exactly
    ``min(total, sum(caps))`` tokens are allotted.
    """
    n = len(weights)
    if n != len(caps):
        raise ValueError("weights and caps must have the same length")
    total = min(int(total), int(sum(caps)))
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64).clamp_min(0)
    s = float(w.sum())
    share = w / s if s > 0 else torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)
    alloc = [min(int(math.floor(float(share[i]) * total)), int(caps[i])) for i in range(n)]
    order = torch.sort(share, descending=True, stable=True).indices.tolist()
    remaining = total - sum(alloc)
    while remaining > 0:
        for i in order:
            if remaining == 0:
                break
            if alloc[i] < caps[i]:
                alloc[i] += 1
                remaining -= 1
    return alloc


def _bounds(length: int, parts: int) -> list[int]:
    return [(i * length) // parts for i in range(parts + 1)]


def grid_crops(blocks: Sequence[tuple[int, int, int]], crops: int, total: int) -> list[torch.Tensor]:
    """Token indices of 2-D crops: each ``rows x cols`` block is cut into about
    ``crops * block_size / total`` rectangles of near-equal size, laid out as close to square as the
    block allows (16 crops of a 24x24 grid = 4x4 crops of 6x6 tokens). Crops are listed block by
    block, row-major; indices inside a crop are ascending."""
    out: list[torch.Tensor] = []
    for start, rows, cols in blocks:
        n = rows * cols
        want = max(1, min(n, round(crops * n / max(total, 1))))
        cr = max(1, min(rows, round(math.sqrt(want * rows / cols))))
        cc = max(1, min(cols, round(want / cr)))
        index = torch.arange(start, start + n).view(rows, cols)
        rb, cb = _bounds(rows, cr), _bounds(cols, cc)
        for i in range(cr):
            for j in range(cc):
                crop = index[rb[i] : rb[i + 1], cb[j] : cb[j + 1]].flatten()
                if crop.numel():
                    out.append(crop)
    return out


def raster_crops(n: int, crops: int) -> list[torch.Tensor]:
    """HoloV's public layout: ``crops`` contiguous chunks of the flattened sequence, the first
    ``n % crops`` one token longer."""
    crops = max(1, min(crops, n))
    size, rem = divmod(n, crops)
    out, start = [], 0
    for p in range(crops):
        length = size + (1 if p < rem else 0)
        out.append(torch.arange(start, start + length))
        start += length
    return out


def uniform_grid_points(rows: int, cols: int, k: int) -> torch.Tensor:
    """``k`` row-major indices spread evenly over a ``rows x cols`` grid (ascending).

    A ``gr x gc`` lattice of cell centres with ``gr * gc >= k`` and an aspect close to the grid's;
    when the lattice has more than ``k`` points, ``k`` of them are taken evenly spaced along it.
    """
    n = rows * cols
    k = min(k, n)
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    gr = max(1, min(rows, round(math.sqrt(k * rows / cols))))
    gc = min(cols, math.ceil(k / gr))
    if gr * gc < k:
        gr = min(rows, math.ceil(k / gc))
    r = torch.tensor([int((i + 0.5) * rows / gr) for i in range(gr)])
    c = torch.tensor([int((j + 0.5) * cols / gc) for j in range(gc)])
    points = (r[:, None] * cols + c[None, :]).flatten()
    if points.numel() > k:
        pick = torch.tensor([int((i + 0.5) * points.numel() / k) for i in range(k)])
        points = points[pick]
    return torch.sort(points).values
