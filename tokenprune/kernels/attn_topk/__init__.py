"""Attention-score top-k from a few query rows, without materialising the attention matrix."""

from __future__ import annotations

from typing import Optional

import torch

from tokenprune.kernels.attn_topk.common import prepare_args
from tokenprune.kernels.attn_topk.naive import attention_topk_torch
from tokenprune.kernels.dispatch import resolve_impl

__all__ = ["attention_topk"]


def attention_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    keep: int,
    *,
    key_start: int = 0,
    key_end: Optional[int] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top keys by softmax attention probability from a few query rows (FastV, LazyLLM, SnapKV).

    Args:
        q: ``[B, Hq, Lq, D]``, the last ``Lq`` query rows of a sequence (SDPA layout, RoPE applied).
        k: ``[B, Hk, Lk, D]`` its keys; ``Hq`` must be a multiple of ``Hk`` (GQA).
        keep: number of keys returned per row (``>= 1``; capped at the range length).
        key_start, key_end: the key range ``[key_start, key_end)`` that is ranked (default: all).
        causal: query row ``i`` sits at absolute position ``Lk - Lq + i`` and sees keys ``<=`` it.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding_mask: optional ``[B, Lk]`` bool, ``False`` for padding keys (hidden from the
            softmax, as the attention mask hides them from the model).
        impl: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(indices, scores)``: ``indices`` ``[B, min(keep, key_end - key_start)]`` absolute key
        positions, ascending; ``scores`` ``[B, key_end - key_start]`` the probabilities averaged
        over heads and query rows (fp32). Softmax runs over all visible keys, not only the range.
    """
    args = prepare_args(q, k, keep, key_start, key_end, causal, scale, key_padding_mask)
    if resolve_impl(impl, q) == "triton":
        from tokenprune.kernels.attn_topk.triton import attention_topk_triton

        return attention_topk_triton(args)
    return attention_topk_torch(args)
