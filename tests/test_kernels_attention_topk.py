"""attention_topk: every implementation against a brute-force float64 reference that builds the
full softmax matrix, one head and one query row at a time."""

from __future__ import annotations

import pytest
import torch

from kernel_utils import IMPLS, on, poisoned_empty, requires_triton
from tokenprune.kernels import attention_topk


def run(q, k, keep, impl, key_padding_mask=None, **kwargs):
    """``attention_topk`` on the device of ``impl``, results on CPU."""
    q, k, mask = on(impl, q, k, key_padding_mask)
    idx, scores = attention_topk(q, k, keep, key_padding_mask=mask, impl=impl, **kwargs)
    return idx.cpu(), scores.cpu()


def brute_scores(q, k, *, key_start=0, key_end=None, causal=True, scale=None, key_padding_mask=None):
    """Averaged probabilities ``[B, key_end - key_start]`` (float64) from the full softmax matrix."""
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    key_end = lk if key_end is None else key_end
    scale = d ** -0.5 if scale is None else scale
    kd = k.double().repeat_interleave(hq // hk, dim=1)  # query head h reads key head h // (Hq / Hk)
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), kd) * scale  # [B, Hq, Lq, Lk]
    visible = torch.ones(b, hq, lq, lk, dtype=torch.bool)
    if causal:
        for i in range(lq):
            visible[:, :, i, lk - lq + i + 1 :] = False
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a row that sees no key contributes nothing
    return probs.mean(dim=(1, 2))[:, key_start:key_end]


def assert_valid_topk(indices, ref_scores, keep, key_start, tol):
    """``indices`` are ascending, in range, and hold a top-``keep`` set of ``ref_scores`` (up to tol)."""
    width = ref_scores.shape[1]
    assert indices.dtype == torch.long and indices.shape == (ref_scores.shape[0], min(keep, width))
    for row, ref in zip(indices, ref_scores):
        local = row - key_start
        assert bool((local[1:] > local[:-1]).all()) and int(local.min()) >= 0 and int(local.max()) < width
        chosen = torch.zeros(width, dtype=torch.bool)
        chosen[local] = True
        if not bool(chosen.all()):
            assert float(ref[chosen].min()) >= float(ref[~chosen].max()) - tol


def random_qk(b, hq, hk, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # logits of order one and more: probabilities far from uniform, so the top-k is well separated
    q = (torch.randn(b, hq, lq, d, generator=g) * 2.0).to(dtype)
    k = torch.randn(b, hk, lk, d, generator=g).to(dtype)
    return q, k


SHAPES = [
    # (B, Hq, Hk, Lq, Lk, D)
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 1, 77, 24),  # FastV: last token, GQA, rows < 16 (broadcast path)
    (2, 6, 3, 5, 63, 20),  # rows = 10
    (1, 4, 1, 20, 50, 12),  # rows = 80: tl.dot path, two row blocks
    (1, 2, 2, 9, 130, 5),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hk{}-Lq{}-Lk{}-D{}".format(*s))
@pytest.mark.parametrize("causal", [True, False])
def test_matches_full_softmax(impl, shape, causal):
    b, hq, hk, lq, lk, d = shape
    q, k = random_qk(*shape, seed=sum(shape))
    for key_start, key_end, keep in [(0, None, 5), (lk // 3, lk - lk // 4, 1), (lk - 1, lk, 3)]:
        if key_end is not None and key_start >= key_end:
            continue
        with poisoned_empty():
            idx, scores = run(q, k, keep, impl, key_start=key_start, key_end=key_end, causal=causal)
        ref = brute_scores(q, k, key_start=key_start, key_end=key_end, causal=causal)
        assert scores.dtype == torch.float32 and scores.shape == ref.shape
        torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=1e-7)
        assert_valid_topk(idx, ref, keep, key_start, tol=1e-6)


@pytest.mark.parametrize(
    "impl,dtype",
    [("torch", torch.float16), ("torch", torch.bfloat16), pytest.param("triton", torch.float16, marks=[pytest.mark.triton, requires_triton])],
)
def test_half_precision_inputs(impl, dtype):
    q, k = random_qk(2, 4, 2, 3, 45, 16, dtype=dtype, seed=1)
    idx, scores = run(q, k, 6, impl, key_start=4, key_end=40)
    # the reference reads the same (rounded) half values; the implementations compute in fp32
    ref = brute_scores(q, k, key_start=4, key_end=40)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=1e-7)
    assert_valid_topk(idx, ref, 6, 4, tol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padding_mask_and_custom_scale(impl):
    b, hq, hk, lq, lk, d = 3, 4, 2, 2, 40, 8
    q, k = random_qk(b, hq, hk, lq, lk, d, seed=4)
    mask = torch.ones(b, lk, dtype=torch.bool)
    mask[0, :7] = False  # left padding
    mask[1, :] = False  # a row that sees nothing: scores 0
    mask[2, 10:13] = False
    idx, scores = run(q, k, 4, impl, key_start=2, key_end=35, key_padding_mask=mask, scale=0.3)
    ref = brute_scores(q, k, key_start=2, key_end=35, key_padding_mask=mask, scale=0.3)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=1e-7)
    assert float(scores[0, :5].abs().max()) == 0.0 and float(scores[1].abs().max()) == 0.0
    assert_valid_topk(idx, ref, 4, 2, tol=1e-6)
    # all-zero scores: the top-4 are the first keys of the range
    assert idx[1].tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("impl", IMPLS)
def test_non_causal_more_queries_than_keys_and_keep_covering_the_range(impl):
    q, k = random_qk(1, 2, 1, 9, 5, 6, seed=8)
    idx, scores = run(q, k, 50, impl, causal=False)
    torch.testing.assert_close(scores.double(), brute_scores(q, k, causal=False), rtol=1e-4, atol=1e-7)
    assert idx.tolist() == [[0, 1, 2, 3, 4]]
    # probabilities averaged over rows: each row sums to one
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(1))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    """[B, L, H, D] projections transposed to the SDPA layout, without a copy."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, 4, 10, generator=g).transpose(1, 2)
    k = torch.randn(2, 30, 2, 10, generator=g).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    idx, scores = run(q, k, 5, impl, key_start=3)
    ref = brute_scores(q, k, key_start=3)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=1e-7)
    assert_valid_topk(idx, ref, 5, 3, tol=1e-6)


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_triton_key_splits(num_splits):
    """Pass 1 splits the keys into slices whose statistics are merged: any split gives the same scores."""
    from tokenprune.kernels.attn_topk.common import prepare_args
    from tokenprune.kernels.attn_topk.triton import attention_topk_triton

    q, k = random_qk(2, 2, 2, 3, 300, 16, seed=10)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, :100] = False  # the first slices of row 1 see nothing
    args = prepare_args(*on("triton", q, k), 8, 50, 290, True, None, on("triton", mask))
    with poisoned_empty():
        idx, scores = attention_topk_triton(args, num_splits=num_splits)
    idx, scores = idx.cpu(), scores.cpu()
    ref = brute_scores(q, k, key_start=50, key_end=290, key_padding_mask=mask)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=1e-7)
    assert_valid_topk(idx, ref, 8, 50, tol=1e-6)


def test_ties_go_to_the_lowest_index():
    q = torch.zeros(1, 1, 1, 4)
    k = torch.randn(1, 1, 10, 4)
    idx, scores = attention_topk(q, k, 3, key_start=2, impl="torch")  # uniform probabilities
    assert idx.tolist() == [[2, 3, 4]]
    torch.testing.assert_close(scores, torch.full((1, 8), 0.1))


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(keep=0), ValueError, "keep must be >= 1"),
        (dict(keep=True), TypeError, "keep must be an int"),
        (dict(q=torch.randn(2, 1, 4)), ValueError, "4-D"),
        (dict(k=torch.randn(1, 2, 3, 5, 4)), ValueError, "4-D"),
        (dict(k=torch.randn(1, 3, 8, 4)), ValueError, "multiple of the key heads"),
        (dict(k=torch.randn(1, 2, 8, 5)), ValueError, "head_dim"),
        (dict(q=torch.randn(1, 2, 0, 4)), ValueError, "at least one query row"),
        (dict(q=torch.randn(1, 2, 9, 4)), ValueError, "Lq must be <= Lk"),
        (dict(key_start=8), ValueError, "key_start < key_end"),
        (dict(key_start=3, key_end=2), ValueError, "key_start < key_end"),
        (dict(key_end=9), ValueError, "key_end <= Lk"),
        (dict(scale=0.0), ValueError, "scale must be a positive"),
        (dict(key_padding_mask=torch.ones(1, 7, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(key_padding_mask=torch.ones(1, 8)), ValueError, "key_padding_mask"),
        (dict(q=torch.tensor([float("nan")]).expand(1, 2, 1, 4)), ValueError, "NaN or inf"),
        (dict(k=torch.full((1, 2, 8, 4), float("inf"))), ValueError, "NaN or inf"),
        (dict(impl="fast"), ValueError, "impl must be one of"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(kwargs, err, match, impl):
    call = dict(q=torch.randn(1, 2, 1, 4), k=torch.randn(1, 2, 8, 4), keep=2, impl=impl)
    call.update(kwargs)
    q, k = on(impl, call.pop("q"), call.pop("k"))
    with pytest.raises(err, match=match):
        attention_topk(q, k, call.pop("keep"), **call)
