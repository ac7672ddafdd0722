"""Input validation shared by every ``attention_topk`` implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AttnTopkArgs:
    q: torch.Tensor  # [B, Hq, Lq, D]
    k: torch.Tensor  # [B, Hk, Lk, D]
    keep: int
    key_start: int
    key_end: int
    causal: bool
    scale: float
    key_padding_mask: Optional[torch.Tensor]  # [B, Lk] bool, True = visible


def prepare_args(q, k, keep, key_start, key_end, causal, scale, key_padding_mask) -> AttnTopkArgs:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D] (the SDPA layout), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    b, hq, lq, d = q.shape
    bk, hk, lk, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    if lq == 0 or d == 0:
        raise ValueError(f"q needs at least one query row and a non-empty head_dim, got shape {tuple(q.shape)}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the key heads ({hk})")
    if causal and lq > lk:
        raise ValueError(f"with causal=True the queries are the last Lq={lq} rows of Lk={lk} keys; Lq must be <= Lk")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    key_end = lk if key_end is None else key_end
    if not (0 <= key_start < key_end <= lk):
        raise ValueError(f"need 0 <= key_start < key_end <= Lk={lk}, got key_start={key_start}, key_end={key_end}")
    if scale is None:
        scale = d ** -0.5
    elif not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, lk) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor [B, Lk] = [{b}, {lk}], got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    return AttnTopkArgs(q, k, keep, key_start, key_end, causal, float(scale), key_padding_mask)


def topk_ascending_rows(scores: torch.Tensor, keep: int, offset: int) -> torch.Tensor:
    """Per row: indices of the ``keep`` largest scores (ties to the lowest index), ascending, + offset."""
    keep = min(keep, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep]
    return torch.sort(order, dim=-1).values + offset


def finish(args: AttnTopkArgs, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, scores)`` from averaged probabilities ``[B, key_end - key_start]``.

    Probabilities are finite by construction, so a non-finite score can only come from NaN/inf in
    ``q`` or ``k``; checking the small score tensor costs far less than scanning ``k``.
    """
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        raise ValueError("q or k contains NaN or inf: the attention scores are not finite")
    return topk_ascending_rows(scores, args.keep, args.key_start), scores
