"""Greedy max-min diversity selection (DivPrune's MMDP) with a Triton kernel and a torch reference."""

from __future__ import annotations

from typing import Optional

import torch

from tokenprune.kernels.dispatch import resolve_impl
from tokenprune.kernels.mmdp.common import prepare_segments, unpack_result
from tokenprune.kernels.mmdp.naive import mmdp_select_segment, mmdp_select_torch

__all__ = ["mmdp_select", "mmdp_select_segment"]


def mmdp_select(
    x: torch.Tensor,
    k: int,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Greedy max-min diversity selection over cosine distance (DivPrune, CVPR 2025).

    Args:
        x: ``[N, D]`` features of one image, ``[B, N, D]`` for B images of equal length, or packed
            ``[T, D]`` with ``cu_seqlens``.
        k: tokens kept per image (segment), ``>= 1``; an image with fewer tokens keeps them all.
        cu_seqlens: ``[S + 1]`` int32/int64 segment offsets into a packed ``x``.
        impl: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``[min(k, N)]`` for ``[N, D]``; ``[B, min(k, N)]`` for ``[B, N, D]``; for packed input a
        1-D LongTensor of indices into ``x``, ``min(k, n_s)`` per segment, ascending inside each.

    Raises:
        ValueError: ``k < 1``, wrong ranks, inconsistent ``cu_seqlens``, NaN/inf features.
    """
    segments = prepare_segments(x, k, cu_seqlens)
    chosen = resolve_impl(impl, segments.x)
    if chosen == "triton":
        from tokenprune.kernels.mmdp.triton import mmdp_select_triton

        indices = mmdp_select_triton(segments)
    else:
        indices = mmdp_select_torch(segments)
    return unpack_result(indices, segments)
