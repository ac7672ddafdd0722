"""Input validation and layout handling shared by every ``mmdp_select`` implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MmdpSegments:
    """Packed view of ``mmdp_select`` inputs: ``x`` ``[T, D]`` split into segments."""

    x: torch.Tensor
    k: int
    bounds: list[tuple[int, int]]
    cu_seqlens: torch.Tensor  # [S + 1] int64 on x.device
    batch_shape: Optional[tuple[int, int]]  # (B, N) when the input was [B, N, D]


def prepare_segments(x: torch.Tensor, k: int, cu_seqlens: Optional[torch.Tensor]) -> MmdpSegments:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, D], [B, N, D] or packed [T, D], got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError("x must have a non-empty feature dimension D")
    # A NaN or inf anywhere makes the fp32 sum non-finite: one cheap reduction instead of an
    # elementwise isfinite pass; the exact check runs only if the sum overflowed or is not finite.
    if x.numel() and not bool(torch.isfinite(x.sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; mmdp_select needs finite features")

    x = x.detach()  # a selection is not differentiable
    batch_shape = None
    if x.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is only valid with packed 2-D x [T, D], got 3-D x")
        b, n, d = x.shape
        batch_shape = (b, n)
        x = x.reshape(b * n, d)
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.long, device=x.device) if b else torch.zeros(1, dtype=torch.long, device=x.device)
    elif cu_seqlens is None:
        cu = torch.tensor([0, x.shape[0]], dtype=torch.long, device=x.device)
    else:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [S + 1]")
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        if int(cu[0]) != 0 or int(cu[-1]) != x.shape[0]:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at x.shape[0] = {x.shape[0]}, "
                f"got {int(cu[0])} .. {int(cu[-1])}"
            )
        if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    cu_list = cu.tolist()
    bounds = list(zip(cu_list[:-1], cu_list[1:]))
    return MmdpSegments(x=x, k=k, bounds=bounds, cu_seqlens=cu, batch_shape=batch_shape)


def unpack_result(indices: torch.Tensor, segments: MmdpSegments) -> torch.Tensor:
    """Packed global indices -> the caller's layout ([N, D] -> [k], [B, N, D] -> [B, k] local)."""
    if segments.batch_shape is not None:
        b, n = segments.batch_shape
        kk = min(segments.k, n)
        return (indices.view(b, kk) - torch.arange(b, device=indices.device).unsqueeze(1) * n) if b else indices.view(0, kk)
    return indices
