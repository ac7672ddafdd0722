"""Triton attention-score top-k: softmax probabilities of a few query rows, averaged over heads and
rows, without materialising the attention matrix.

Query heads that share a key head (GQA) are processed together as ``R = G * Lq`` rows against one
stream of keys. Two passes over the keys, as in flash-decoding:

1. ``_attn_stats_kernel``, grid ``(row blocks, B * Hk, splits)``: online softmax statistics (row
   maximum and normaliser) of every row over one slice of the keys; the slices are merged on the
   host (a few ``[B, Hk, splits, R]`` ops), so long sequences spread over the whole GPU.
2. ``_attn_scores_kernel``, grid ``(key blocks of the range, B)``: recomputes the logits of its key
   block for every head and row, turns them into probabilities with the merged statistics and sums
   them; each score is written once by one program (no atomics, deterministic).

Memory beyond the inputs is ``O(B * Hk * splits * R + B * Lk)``. Logits use the same block shapes
in both passes, so a probability never exceeds one by more than rounding. All math is fp32 (the
Triton interpreter also computes bf16 wrongly). Rows narrower than 16 (``Lq * G`` small, the FastV
case) use a broadcast multiply-sum instead of ``tl.dot``, which would pad the rows to 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenprune.kernels.attn_topk.common import AttnTopkArgs, finish

__all__ = ["attention_topk_triton"]


@triton.jit
def _logits_block(
    q_ptr, k_ptr, mask_ptr,
    i_b, i_hk, o_r, o_n,
    Hq, Lq, Lk, D, G, R,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sm_b,
    scale, key_limit,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """Scaled, masked logits ``[BM, BN]`` (fp32) of rows ``o_r`` against keys ``o_n``."""
    # row r of key head hk is query head hk * G + r // Lq, query row r % Lq
    m_r = o_r < R
    m_n = o_n < key_limit
    q_row = q_ptr + i_b.to(tl.int64) * sq_b + (i_hk * G + o_r // Lq).to(tl.int64) * sq_h + (o_r % Lq).to(tl.int64) * sq_l
    k_row = k_ptr + i_b.to(tl.int64) * sk_b + tl.cast(i_hk, tl.int64) * sk_h + o_n.to(tl.int64) * sk_l
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_q = tl.load(q_row[:, None] + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_k = tl.load(k_row[:, None] + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        if USE_DOT:
            acc += tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            acc += tl.sum(b_q[:, None, :] * b_k[None, :, :], axis=2)
    visible = m_n[None, :] & m_r[:, None]
    if CAUSAL:
        # query row i sits at absolute position Lk - Lq + i
        visible = visible & (o_n[None, :] <= (Lk - Lq + o_r % Lq)[:, None])
    if HAS_MASK:
        keep = tl.load(mask_ptr + i_b.to(tl.int64) * sm_b + o_n, mask=m_n, other=0)
        visible = visible & (keep != 0)[None, :]
    return tl.where(visible, acc * scale, float("-inf"))


@triton.jit
def _attn_stats_kernel(
    part_m_ptr, part_l_ptr,  # [B * Hk, splits, R] fp32
    q_ptr, k_ptr, mask_ptr,
    Hk, Hq, Lq, Lk, D, G, R, split_len,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sm_b,
    scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_sp = tl.program_id(2)
    i_b = i_bh // Hk
    i_hk = i_bh % Hk
    o_r = i_m * BM + tl.arange(0, BM)
    start = i_sp * split_len
    end = tl.minimum(start + split_len, Lk)
    b_m = tl.full((BM,), float("-inf"), tl.float32)
    b_l = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(start, end, BN):
        o_n = n0 + tl.arange(0, BN)
        s = _logits_block(q_ptr, k_ptr, mask_ptr, i_b, i_hk, o_r, o_n, Hq, Lq, Lk, D, G, R,
                          sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sm_b, scale, end,
                          CAUSAL, HAS_MASK, USE_DOT, BM, BN, BD)
        m_new = tl.maximum(b_m, tl.max(s, axis=1))
        # a row that has seen no visible key yet keeps m = -inf; shift by 0 instead (exp(-inf) = 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_l = b_l * tl.exp(b_m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        b_m = m_new
    off = (i_bh.to(tl.int64) * tl.num_programs(2) + i_sp) * R + o_r
    tl.store(part_m_ptr + off, b_m, mask=o_r < R)
    tl.store(part_l_ptr + off, b_l, mask=o_r < R)


@triton.jit
def _attn_scores_kernel(
    scores_ptr,  # [B, key_end - key_start] fp32
    m_ptr, inv_l_ptr,  # [B * Hk, R] fp32: merged row maximum (0 for a row that sees nothing), 1 / normaliser
    q_ptr, k_ptr, mask_ptr,
    Hk, Hq, Lq, Lk, D, G, R, key_start, key_end,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sm_b,
    scale, inv_rows,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_b = tl.program_id(1)
    o_n = key_start + i_n * BN + tl.arange(0, BN)
    total = tl.zeros((BN,), dtype=tl.float32)
    for i_hk in range(0, Hk):
        i_bh = i_b * Hk + i_hk
        for r0 in range(0, R, BM):
            o_r = r0 + tl.arange(0, BM)
            m_r = o_r < R
            s = _logits_block(q_ptr, k_ptr, mask_ptr, i_b, i_hk, o_r, o_n, Hq, Lq, Lk, D, G, R,
                              sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sm_b, scale, key_end,
                              CAUSAL, HAS_MASK, USE_DOT, BM, BN, BD)
            b_m = tl.load(m_ptr + tl.cast(i_bh, tl.int64) * R + o_r, mask=m_r, other=0.0)
            b_inv = tl.load(inv_l_ptr + tl.cast(i_bh, tl.int64) * R + o_r, mask=m_r, other=0.0)
            total += tl.sum(tl.exp(s - b_m[:, None]) * b_inv[:, None], axis=0)
    width = key_end - key_start
    tl.store(scores_ptr + i_b.to(tl.int64) * width + (o_n - key_start), total * inv_rows, mask=o_n < key_end)


def block_sizes(rows: int, d: int) -> dict:
    """Block sizes and the row path for ``rows = G * Lq`` query rows of head_dim ``d``."""
    block_m = min(64, triton.next_power_of_2(rows))
    use_dot = block_m >= 16
    # tl.dot wants K >= 16 (masked columns load as zeros); the broadcast path keeps
    # BM * BN * BD products in registers, hence its small BD
    block_d = max(16, min(64, triton.next_power_of_2(d))) if use_dot else min(16, triton.next_power_of_2(d))
    return dict(USE_DOT=use_dot, BM=block_m, BN=64, BD=block_d)


def _default_splits(args: AttnTopkArgs, programs: int, block_n: int) -> int:
    lk = args.k.shape[2]
    if args.q.is_cuda:
        # about four programs per SM in pass 1
        target = 4 * torch.cuda.get_device_properties(args.q.device).multi_processor_count
    else:
        # the interpreter runs programs one by one: a few slices exercise the merge, no more
        target = 2 * programs
    return max(1, min(triton.cdiv(lk, block_n), triton.cdiv(target, programs)))


def attention_topk_triton(args: AttnTopkArgs, *, num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`tokenprune.kernels.attention_topk` on validated arguments.

    Args:
        args: validated inputs (``q`` ``[B, Hq, Lq, D]``, ``k`` ``[B, Hk, Lk, D]``, range, flags).
        num_splits: key slices per (batch, key head) in pass 1; default: enough programs to fill
            the GPU (four per SM), or two on the interpreter.

    Returns:
        ``(indices [B, min(keep, range)], scores [B, key_end - key_start] fp32)``, as the torch path.
    """
    q, k = args.q, args.k
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    group = hq // hk
    rows = group * lq
    width = args.key_end - args.key_start
    device = q.device
    if b == 0:
        return finish(args, torch.empty(0, width, dtype=torch.float32, device=device))
    blocks = block_sizes(rows, d)
    block_m, block_n = blocks["BM"], blocks["BN"]
    row_blocks = triton.cdiv(rows, block_m)
    splits = num_splits or _default_splits(args, row_blocks * b * hk, block_n)
    # whole blocks per slice, so both passes cut the keys into the same blocks
    split_len = triton.cdiv(triton.cdiv(lk, splits), block_n) * block_n
    splits = triton.cdiv(lk, split_len)

    mask = args.key_padding_mask
    has_mask = mask is not None
    mask_arg = mask.to(device=device, dtype=torch.int8).contiguous() if has_mask else q
    sm_b = mask_arg.stride(0) if has_mask else 0
    # any layout works as long as head_dim is contiguous (e.g. [B, L, H, D] transposed views)
    q = q if q.stride(3) == 1 else q.contiguous()
    k = k if k.stride(3) == 1 else k.contiguous()
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sm_b)
    flags = dict(CAUSAL=args.causal, HAS_MASK=has_mask, **blocks)

    part_m = torch.empty(b * hk, splits, rows, dtype=torch.float32, device=device)
    part_l = torch.empty_like(part_m)
    _attn_stats_kernel[(row_blocks, b * hk, splits)](
        part_m, part_l, q, k, mask_arg, hk, hq, lq, lk, d, group, rows, split_len, *strides, args.scale, **flags
    )
    # merge the slices: m = max_s m_s, l = sum_s l_s * exp(m_s - m)
    row_max = part_m.amax(dim=1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    row_sum = (part_l * torch.exp(part_m - row_max[:, None, :])).sum(dim=1)
    # a query row that sees no key (fully masked) contributes nothing
    inv_sum = torch.where(row_sum > 0, 1.0 / row_sum, torch.zeros_like(row_sum))

    scores = torch.empty(b, width, dtype=torch.float32, device=device)
    _attn_scores_kernel[(triton.cdiv(width, block_n), b)](
        scores, row_max.contiguous(), inv_sum.contiguous(), q, k, mask_arg,
        hk, hq, lq, lk, d, group, rows, args.key_start, args.key_end, *strides,
        args.scale, 1.0 / (hq * lq), **flags,
    )
    return finish(args, scores)
