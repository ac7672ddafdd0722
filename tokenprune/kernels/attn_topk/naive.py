"""Chunked pure-torch reference of :func:`tokenprune.kernels.attention_topk`.

Computes the softmax attention probabilities of a few query rows (e.g. the last prompt token, all
heads) over every visible key, averages them over heads and query rows, and returns the top keys of
a key range. Keys are processed in chunks with a two-pass softmax (maxima and normalisers first,
then probabilities), so memory is ``O(B * H * Lq * chunk + B * Lk)`` and never ``O(Lk^2)``: this
works beside SDPA/flash attention, which never materialise attention weights.
"""

from __future__ import annotations

import torch

from tokenprune.kernels.attn_topk.common import AttnTopkArgs, finish

CHUNK = 4096


def _chunk_logits(args: AttnTopkArgs, qf: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Masked logits ``[B, Hk, G*Lq, end-start]`` (fp32) for keys ``[start, end)``."""
    b, hq, lq, d = args.q.shape
    hk, lk = args.k.shape[1], args.k.shape[2]
    kf = args.k[:, :, start:end].float()
    logits = torch.matmul(qf, kf.transpose(-1, -2))  # [B, Hk, G*Lq, c]
    if args.causal:
        group = hq // hk
        query_pos = (lk - lq) + torch.arange(lq, device=qf.device).repeat(group)  # row r -> r % Lq
        key_pos = torch.arange(start, end, device=qf.device)
        logits = logits.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
    if args.key_padding_mask is not None:
        visible = args.key_padding_mask[:, start:end].to(qf.device)
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    return logits


def attention_scores_torch(args: AttnTopkArgs) -> torch.Tensor:
    """Averaged probabilities ``[B, key_end - key_start]`` (fp32)."""
    b, hq, lq, d = args.q.shape
    hk, lk = args.k.shape[1], args.k.shape[2]
    group = hq // hk
    # Query heads sharing a key head sit together: [B, Hk, G*Lq, D], pre-scaled.
    qf = args.q.float().reshape(b, hk, group * lq, d) * args.scale
    row_max = torch.full((b, hk, group * lq, 1), float("-inf"), device=qf.device)
    for start in range(0, lk, CHUNK):
        chunk = _chunk_logits(args, qf, start, min(lk, start + CHUNK))
        row_max = torch.maximum(row_max, chunk.amax(dim=-1, keepdim=True))
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    row_sum = torch.zeros_like(row_max)
    for start in range(0, lk, CHUNK):
        chunk = _chunk_logits(args, qf, start, min(lk, start + CHUNK))
        row_sum += torch.exp(chunk - safe_max).sum(dim=-1, keepdim=True)
    # A query row that sees no key (fully masked) contributes nothing.
    inv_sum = torch.where(row_sum > 0, 1.0 / row_sum, torch.zeros_like(row_sum))
    scores = torch.empty(b, args.key_end - args.key_start, device=qf.device)
    for start in range(args.key_start, args.key_end, CHUNK):
        end = min(args.key_end, start + CHUNK)
        probs = torch.exp(_chunk_logits(args, qf, start, end) - safe_max) * inv_sum
        scores[:, start - args.key_start : end - args.key_start] = probs.sum(dim=(1, 2)) / (hq * lq)
    return scores


def attention_topk_torch(args: AttnTopkArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return finish(args, attention_scores_torch(args))
