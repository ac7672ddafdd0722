"""Triton greedy max-min diversity selection (DivPrune's MMDP) over a batch of packed segments.

Two launches for the whole batch, whatever the number of segments:

1. ``_mmdp_gram_kernel``, grid ``(tiles, tiles, S)``: each program computes one upper-triangular
   ``[BT, BT]`` tile of a segment's cosine Gram matrix (fp32 FMA, ``x`` read in ``[BT, BD]`` blocks
   and cast to fp32), stores it and its transpose into a block-diagonal scratch (segment ``s`` owns
   ``n_s * n_s`` floats), and folds the row and column maxima into every token's nearest-neighbour
   similarity with ``atomic_max`` (order-independent, so deterministic). Computing each pair once
   makes the matrix exactly symmetric, so mutual nearest neighbours tie exactly as in the reference.
2. ``_mmdp_greedy_kernel``, one program per segment: the first pick (argmin of the
   nearest-neighbour similarity), then the ``k - 1`` greedy steps, each folding one Gram row into a
   running maximum (in registers when the segment fits one block, in a scratch row otherwise), and
   finally the picks written in ascending order (a picked token is the one whose running maximum is
   ``+inf``).

The greedy steps are sequential by nature; the Gram GEMM is spread over the GPU by launch 1.
All math is fp32 (the Triton interpreter also computes bf16 wrongly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenprune.kernels.mmdp.common import MmdpSegments

__all__ = ["mmdp_select_triton"]

# Largest segment whose running maximum stays in registers in the greedy kernel.
_MAX_REGISTER_BLOCK = 4096


@triton.jit
def _mmdp_gram_kernel(
    gram_ptr,  # [sum n_s^2] fp32, segment s at gram_off[s], row-major [n_s, n_s]
    nn_ptr,  # [T] fp32, initialised to -inf: max similarity to another token
    x_ptr,  # [T, D]
    cu_ptr,  # [S + 1] int64
    gram_off_ptr,  # [S] int64
    k,
    D,
    stride_x,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_u = tl.program_id(1)
    i_s = tl.program_id(2)
    bos = tl.load(cu_ptr + i_s)
    n = tl.load(cu_ptr + i_s + 1) - bos
    # Each unordered tile pair once (i_t <= i_u); segments that keep everything need no Gram.
    if (i_t <= i_u) & (i_u * BT < n) & (k < n):
        o_r = i_t * BT + tl.arange(0, BT)
        o_c = i_u * BT + tl.arange(0, BT)
        m_r = o_r < n
        m_c = o_c < n
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        ss_r = tl.zeros((BT,), dtype=tl.float32)
        ss_c = tl.zeros((BT,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_r = tl.load(x_ptr + (bos + o_r)[:, None].to(tl.int64) * stride_x + o_d[None, :],
                          mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_c = tl.load(x_ptr + (bos + o_c)[:, None].to(tl.int64) * stride_x + o_d[None, :],
                          mask=m_c[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(b_r, tl.trans(b_c), input_precision="ieee")
            ss_r += tl.sum(b_r * b_r, axis=1)
            ss_c += tl.sum(b_c * b_c, axis=1)
        inv_r = 1.0 / tl.maximum(tl.sqrt(ss_r), 1e-12)
        inv_c = 1.0 / tl.maximum(tl.sqrt(ss_c), 1e-12)
        # (a * b) is commutative, so the tile and its mirror get the same scale factor.
        sim = acc * (inv_r[:, None] * inv_c[None, :])
        if i_t == i_u:
            # A diagonal tile is one dot whose (a, b) and (b, a) may round differently: keep the upper half.
            sim = tl.where(o_r[:, None] <= o_c[None, :], sim, tl.trans(sim))
        # The nearest neighbour must be another token.
        sim = tl.where(o_r[:, None] == o_c[None, :], float("-inf"), sim)
        m_tile = m_r[:, None] & m_c[None, :]
        sim = tl.where(m_tile, sim, float("-inf"))
        base = gram_ptr + tl.load(gram_off_ptr + i_s)
        tl.store(base + o_r[:, None].to(tl.int64) * n + o_c[None, :], sim, mask=m_tile)
        tl.atomic_max(nn_ptr + bos + o_r, tl.max(sim, axis=1), mask=m_r)
        if i_t != i_u:
            tl.store(base + o_c[None, :].to(tl.int64) * n + o_r[:, None], sim, mask=m_tile)
            tl.atomic_max(nn_ptr + bos + o_c, tl.max(sim, axis=0), mask=m_c)


@triton.jit
def _argmin_first(values, offsets, sentinel):
    """(min, lowest offset holding it) of a block; masked lanes must hold +inf."""
    v = tl.min(values, axis=0)
    return v, tl.min(tl.where(values == v, offsets, sentinel), axis=0)


@triton.jit
def _mmdp_greedy_kernel(
    out_ptr,  # [sum min(k, n_s)] int64
    run_ptr,  # [T] fp32 scratch, initialised to -inf (used when ONE_BLOCK is False)
    gram_ptr,
    nn_ptr,
    cu_ptr,
    cu_out_ptr,  # [S + 1] int64: output offsets
    gram_off_ptr,
    k,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    i_s = tl.program_id(0)
    bos = tl.load(cu_ptr + i_s)
    n = tl.load(cu_ptr + i_s + 1) - bos
    out = out_ptr + tl.load(cu_out_ptr + i_s)
    o = tl.arange(0, BLOCK)
    if k >= n:
        for b0 in range(0, n, BLOCK):
            tl.store(out + b0 + o, bos + b0 + o, mask=b0 + o < n)
    else:
        base = gram_ptr + tl.load(gram_off_ptr + i_s)
        sentinel = n + BLOCK
        # First pick: the token whose most similar other token is least similar.
        # loop-carried scalars start as tensors of their final type
        best_v = tl.full((), float("inf"), tl.float32)
        best_i = sentinel
        for b0 in range(0, n, BLOCK):
            v = tl.load(nn_ptr + bos + b0 + o, mask=b0 + o < n, other=float("inf"))
            bv, bi = _argmin_first(v, b0 + o, sentinel)
            # Strict < keeps the earlier block on ties: lowest index wins.
            best_i = tl.where(bv < best_v, bi, best_i)
            best_v = tl.minimum(bv, best_v)
        pick = best_i
        if ONE_BLOCK:
            m = o < n
            run = tl.full((BLOCK,), float("-inf"), tl.float32)
            for _ in range(k - 1):
                row = tl.load(base + pick.to(tl.int64) * n + o, mask=m, other=float("-inf"))
                run = tl.where(o == pick, float("inf"), tl.maximum(run, row))
                _, pick = _argmin_first(tl.where(m, run, float("inf")), o, sentinel)
            run = tl.where(o == pick, float("inf"), run)
            chosen = m & (run == float("inf"))
            tl.store(out + tl.cumsum(chosen.to(tl.int32), axis=0) - 1, bos + o, mask=chosen)
        else:
            run = run_ptr + bos
            for _ in range(k - 1):
                best_v = tl.full((), float("inf"), tl.float32)
                best_i = sentinel
                for b0 in range(0, n, BLOCK):
                    m = b0 + o < n
                    row = tl.load(base + pick.to(tl.int64) * n + b0 + o, mask=m, other=float("-inf"))
                    cur = tl.maximum(tl.load(run + b0 + o, mask=m, other=float("-inf")), row)
                    cur = tl.where(b0 + o == pick, float("inf"), cur)
                    tl.store(run + b0 + o, cur, mask=m)
                    bv, bi = _argmin_first(tl.where(m, cur, float("inf")), b0 + o, sentinel)
                    best_i = tl.where(bv < best_v, bi, best_i)
                    best_v = tl.minimum(bv, best_v)
                pick = best_i
                # Make this step's stores visible to every thread before the next step reads them.
                tl.debug_barrier()
            tl.store(run + pick, float("inf"))
            tl.debug_barrier()
            count = tl.full((), 0, tl.int32)
            for b0 in range(0, n, BLOCK):
                m = b0 + o < n
                chosen = m & (tl.load(run + b0 + o, mask=m, other=0.0) == float("inf"))
                tl.store(out + count + tl.cumsum(chosen.to(tl.int32), axis=0) - 1, bos + b0 + o, mask=chosen)
                count += tl.sum(chosen.to(tl.int32), axis=0)


def gram_blocks(max_n: int, d: int) -> tuple[int, int]:
    """``(BT, BD)`` of the Gram kernel: smaller tiles spread a single image over more SMs."""
    bt = 32 if max_n <= 2048 else 64
    # tl.dot wants K >= 16 (masked columns load as zeros)
    return bt, max(16, min(64, triton.next_power_of_2(d)))


def greedy_block(max_n: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the greedy kernel."""
    block = min(triton.next_power_of_2(max(max_n, 1)), _MAX_REGISTER_BLOCK)
    return block, 4 if block <= 1024 else 8


def mmdp_select_triton(segments: MmdpSegments, *, block: int | None = None) -> torch.Tensor:
    """Triton :func:`tokenprune.kernels.mmdp_select` over packed segments.

    Args:
        segments: validated packed input (``x`` ``[T, D]``, per-segment bounds, ``k``).
        block: greedy-kernel block size (power of two); default: the largest segment rounded up to
            a power of two, up to 4096 (larger segments loop over blocks). Tests use small values
            to exercise the multi-block path.

    Returns:
        LongTensor ``[sum_s min(k, n_s)]`` of indices into ``x``, ascending inside each segment.
    """
    x = segments.x
    if x.stride(-1) != 1:
        x = x.contiguous()
    device = x.device
    k = segments.k
    lengths = [end - start for start, end in segments.bounds]
    num_segments = len(lengths)
    kept = [min(k, n) for n in lengths]
    out = torch.empty(sum(kept), dtype=torch.long, device=device)
    if num_segments == 0 or not out.numel():
        return out
    # Gram scratch only for segments that select (k < n).
    gram_sizes = [n * n if k < n else 0 for n in lengths]
    cu = segments.cu_seqlens.to(device=device, dtype=torch.int64)
    offsets = torch.tensor([0] + kept, dtype=torch.int64).cumsum(0).to(device)
    gram_off = torch.tensor([0] + gram_sizes[:-1], dtype=torch.int64).cumsum(0).to(device)
    gram = torch.empty(max(sum(gram_sizes), 1), dtype=torch.float32, device=device)
    nn = torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=device)
    max_select = max((n for n in lengths if k < n), default=0)

    if max_select:
        bt, bd = gram_blocks(max_select, x.shape[1])
        tiles = triton.cdiv(max_select, bt)
        _mmdp_gram_kernel[(tiles, tiles, num_segments)](
            gram, nn, x, cu, gram_off, k, x.shape[1], x.stride(0), BT=bt, BD=bd
        )
    default_block, num_warps = greedy_block(max(lengths))
    block = block or default_block
    one_block = block >= max_select
    run = nn if one_block else torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=device)
    _mmdp_greedy_kernel[(num_segments,)](
        out, run, gram, nn, cu, offsets, gram_off, k, BLOCK=block, ONE_BLOCK=one_block,
        num_warps=num_warps,
    )
    return out
