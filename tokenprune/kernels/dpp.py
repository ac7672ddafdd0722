"""Greedy MAP inference of a determinantal point process (DPP), batched over images, in pure torch.

The DPP kernel of one image is ``L = diag(q) S diag(q)``: ``S`` the cosine similarities of its
tokens (``S = X^ X^T`` with ``X^`` the row-normalised features, so ``L`` is positive semi-definite)
and ``q >= 0`` a per-token quality. Greedy MAP adds, ``k`` times, the token with the largest
marginal gain ``d_j^2 = det(L_{S+j}) / det(L_S)``, which maximises ``log det(L_S)`` one token at a
time. The gains are kept up to date with the incremental Cholesky update of Chen, Zhang and Zhou,
"Fast Greedy MAP Inference for Determinantal Point Process to Improve Recommendation Diversity"
(NeurIPS 2018, Algorithm 1): with ``c_i`` the Cholesky rows of the selected set,

    e_i = (L_ji - <c_j, c_i>) / d_j,    c_i <- [c_i, e_i],    d_i^2 <- d_i^2 - e_i^2

so a step costs ``O(k N)`` after one ``N x N`` Gram matrix per image (``O(N^2 D)``).

**Exhausted gains.** Once the selected tokens span a token's direction (more tokens than the
kernel's rank, duplicated tokens, a zero feature or a zero quality), its gain is zero and
``log det`` is ``-inf`` whatever is added next; Chen et al. stop there, but a pruner must return
exactly ``k`` tokens. A token counts as exhausted when its residual is at most ``eps`` times its
own ``L_ii`` (its direction lies in the span up to ``sqrt(eps)``; fp32 rounding of the updates is
~1e-6 relative after a few hundred steps, so ``eps = 1e-5`` keeps noise out). Exhausted tokens are
picked only after every live one, by decreasing ``L_ii = q_i^2`` (the quality alone), ties to the
lowest index; an exhausted pick does not update the Cholesky rows (it adds nothing to the span).
Ties between live gains also go to the lowest index (``argmax`` returns the first maximum); the
kernel's diagonal is set to its exact value ``q_i^2`` so that rounding in the Gram matrix does not
break ties between tokens of equal quality (e.g. the first pick when ``q`` is constant).

There is no Triton kernel yet: the loop is ``k`` small sequential steps (launch-bound on a GPU,
like DivPrune's before its kernel); ``tokenprune.kernels.mmdp`` shows the pattern a fused kernel
would follow, with this function as its reference.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["dpp_greedy_map"]

_TINY = 1e-30


def _validate(features: torch.Tensor, quality: torch.Tensor, k: int, lengths: Optional[torch.Tensor], eps: float):
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("features must be a floating-point torch.Tensor [N, D] or [B, N, D]")
    if not isinstance(quality, torch.Tensor) or not quality.is_floating_point():
        raise TypeError("quality must be a floating-point torch.Tensor [N] or [B, N]")
    if features.dim() not in (2, 3) or features.shape[-1] == 0:
        raise ValueError(f"features must be [N, D] or [B, N, D] with D >= 1, got shape {tuple(features.shape)}")
    if quality.shape != features.shape[:-1]:
        raise ValueError(
            f"quality must have shape {tuple(features.shape[:-1])} (one value per token), got {tuple(quality.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    n = features.shape[-2]
    if lengths is not None:
        if features.dim() != 3:
            raise ValueError("lengths is only valid with batched features [B, N, D]")
        if not isinstance(lengths, torch.Tensor) or lengths.shape != features.shape[:1] or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor of shape ({features.shape[0]},)")
        shortest = int(lengths.min()) if lengths.numel() else n
        if lengths.numel() and (shortest < 0 or int(lengths.max()) > n):
            raise ValueError(f"lengths must be in [0, {n}], got {lengths.tolist()}")
    else:
        shortest = n
    if not 1 <= k <= shortest:
        raise ValueError(f"k must be in [1, {shortest}] (the shortest image's token count), got {k}")
    if not bool(torch.isfinite(features).all()) or not bool(torch.isfinite(quality).all()):
        raise ValueError("features and quality must be finite (no NaN or inf)")
    if bool((quality < 0).any()):
        raise ValueError("quality must be >= 0 (the kernel is diag(q) S diag(q))")


def dpp_greedy_map(
    features: torch.Tensor,
    quality: torch.Tensor,
    k: int,
    *,
    lengths: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Greedy MAP selection of ``k`` tokens per image under ``L = diag(q) cos(X, X) diag(q)``.

    Args:
        features: ``[N, D]`` tokens of one image or ``[B, N, D]`` of ``B`` images (padded to ``N``
            when ``lengths`` is given); any float dtype, the math runs in fp32.
        quality: ``[N]`` / ``[B, N]`` per-token quality ``q >= 0``.
        k: tokens selected per image, ``1 <= k <=`` the shortest image's length.
        lengths: ``[B]`` real token count of each image; tokens at or after it are never selected.
        eps: a token whose residual gain is at most ``eps * L_ii`` is exhausted (module docstring).

    Returns:
        LongTensor ``[k]`` / ``[B, k]``: selected token indices **in greedy order** (the first ``m``
        entries are the greedy selection of size ``m``).

    Raises:
        TypeError / ValueError: wrong types, shapes, ``k`` out of range, non-finite or negative input.
    """
    _validate(features, quality, k, lengths, eps)
    single = features.dim() == 2
    x = features.detach().float()
    q = quality.detach().float()
    if single:
        x, q = x[None], q[None]
    b, n, _ = x.shape
    device = x.device
    valid = torch.ones(b, n, dtype=torch.bool, device=device)
    if lengths is not None:
        valid = torch.arange(n, device=device)[None] < lengths.to(device)[:, None]
    q = q * valid  # padding: zero quality, zero kernel rows

    norm = x.norm(dim=-1, keepdim=True)
    unit = x / norm.clamp_min(_TINY)  # a zero feature stays zero
    kernel = torch.bmm(unit, unit.transpose(1, 2))
    # cos(x_i, x_i) is exactly 1 (0 for a zero feature); the GEMM's rounding would otherwise decide
    # between tokens of equal quality (the first pick maximises L_ii = q_i^2).
    kernel.diagonal(dim1=1, dim2=2).copy_((norm.squeeze(-1) > 0).float())
    kernel *= q[:, :, None] * q[:, None, :]
    diag = kernel.diagonal(dim1=1, dim2=2).clone()
    gains = diag.clone()
    live_floor = eps * diag
    # Exhausted tokens rank by L_ii in [-2, -1], below every live gain (> 0).
    fallback = diag / diag.amax(dim=1, keepdim=True).clamp_min(_TINY) - 2.0
    taken = ~valid
    chol = torch.zeros(b, k, n, dtype=torch.float32, device=device)
    picks = torch.empty(b, k, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)
    for t in range(k):
        key = torch.where(gains > live_floor, gains, fallback).masked_fill(taken, float("-inf"))
        j = key.argmax(dim=1)
        picks[:, t] = j
        gain_j = gains[rows, j]
        live = gain_j > live_floor[rows, j]
        # e = (L_j - C_j^T C) / d_j over the t rows selected so far (row j of the Cholesky factor).
        chol_j = chol[rows, :t, j]  # [B, t]
        e = kernel[rows, j] - torch.bmm(chol_j[:, None], chol[:, :t]).squeeze(1)
        e = e / gain_j.clamp_min(_TINY).sqrt()[:, None]
        e = torch.where(live[:, None], e, torch.zeros_like(e))
        chol[:, t] = e
        gains = gains - e * e
        taken[rows, j] = True
    return picks[0] if single else picks
