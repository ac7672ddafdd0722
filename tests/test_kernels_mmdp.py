"""mmdp_select (DivPrune's greedy max-min diversity selection): every implementation against a
brute-force float64 reference written here from the rule in DESIGN.md section 3."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernel_utils import IMPLS, on, poisoned_empty, requires_triton
from tokenprune.kernels import mmdp_select


def run(x: torch.Tensor, k: int, impl: str, cu_seqlens=None) -> torch.Tensor:
    """``mmdp_select`` on the device of ``impl``, result on CPU."""
    return mmdp_select(on(impl, x), k, cu_seqlens=None if cu_seqlens is None else on(impl, cu_seqlens), impl=impl).cpu()


def brute_mmdp(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MMDP from the full float64 distance matrix, recomputing every minimum from scratch."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    xd = x.double()
    xn = xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - xn @ xn.T
    dist = (dist + dist.T) / 2  # exactly symmetric: mutual nearest neighbours tie exactly
    off_diag = dist + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64))
    nearest = off_diag.min(dim=1).values
    chosen = [int(torch.nonzero(nearest == nearest.max())[0])]  # ties -> lowest index
    while len(chosen) < k:
        best, best_i = -1.0, -1
        for i in range(n):
            if i in chosen:
                continue
            d = float(dist[i, chosen].min())
            if d > best:  # strict: the lowest index wins ties
                best, best_i = d, i
        chosen.append(best_i)
    return torch.tensor(sorted(chosen))


def features(n: int, d: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "n,d,k",
    [(1, 7, 1), (1, 7, 4), (2, 5, 1), (2, 5, 2), (3, 9, 2), (63, 33, 1), (63, 33, 10), (63, 33, 63),
     (63, 33, 100), (577, 40, 1), (577, 40, 64)],
    ids=lambda v: str(v),
)
def test_single_segment_matches_brute_force(impl, n, d, k):
    x = features(n, d, seed=n * 1000 + k)
    with poisoned_empty():
        got = run(x, k, impl)
    assert got.dtype == torch.long and got.shape == (min(k, n),)
    assert torch.equal(got, brute_mmdp(x, k))


@pytest.mark.parametrize(
    "impl,dtype",
    [("torch", torch.float16), ("torch", torch.bfloat16), pytest.param("triton", torch.float16, marks=[pytest.mark.triton, requires_triton])],
)
def test_half_precision_inputs(impl, dtype):
    x = features(100, 48, dtype=dtype, seed=3)
    # the reference reads the same (rounded) half values; the distance math is fp32 vs float64
    assert torch.equal(run(x, 12, impl), brute_mmdp(x, 12))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_packed_segments(impl, cu_dtype):
    lengths = [5, 0, 63, 1, 2, 40, 4]
    x = features(sum(lengths), 21, seed=11)
    cu = torch.tensor([0] + lengths).cumsum(0).to(cu_dtype)
    k = 4
    with poisoned_empty():
        got = run(x, k, impl, cu_seqlens=cu)
    want = torch.cat([brute_mmdp(x[s:e], k) + s for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert torch.equal(got, want)
    assert got.shape == (sum(min(k, n) for n in lengths),)


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("block", [16, 64, None])
def test_triton_block_paths(block):
    """Segments larger than the greedy block loop over blocks with a scratch row (the register path
    covers segments that fit one block)."""
    from tokenprune.kernels.mmdp.common import prepare_segments
    from tokenprune.kernels.mmdp.triton import mmdp_select_triton

    lengths = [70, 3, 33]
    x = features(sum(lengths), 19, seed=5)
    cu = torch.tensor([0] + lengths).cumsum(0)
    with poisoned_empty():
        got = mmdp_select_triton(prepare_segments(on("triton", x), 9, on("triton", cu)), block=block).cpu()
    want = torch.cat([brute_mmdp(x[s:e], 9) + s for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_input(impl):
    x = torch.stack([features(20, 13, seed=s) for s in range(3)])
    got = run(x, 6, impl)
    assert got.shape == (3, 6)
    for b in range(3):
        assert torch.equal(got[b], brute_mmdp(x[b], 6))
    assert run(x, 50, impl).tolist() == [list(range(20))] * 3
    assert run(torch.zeros(0, 4, 3), 2, impl).shape == (0, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_ties_go_to_lowest_index(impl):
    """Rows along a few axes (scaled by powers of two, some negated): every cosine is exactly
    0, 1 or -1, so the greedy rule meets exact ties at every step."""
    axes = [0, 1, 0, 2, 1, 3, 0, 2, 4, 4, 1]
    signs = [1, 1, -1, 1, 1, 1, 1, -1, 1, 1, -1]
    x = torch.zeros(len(axes), 5)
    for i, (a, s) in enumerate(zip(axes, signs)):
        x[i, a] = s * 2.0 ** (i % 4)
    for k in range(1, len(axes) + 1):
        assert run(x, k, impl).tolist() == brute_mmdp(x, k).tolist(), k
    # tokens 2, 5, 7 and 10 have no other token pointing their way (nearest-neighbour distance 1,
    # every other token has a twin at distance 0): the lowest index wins the first pick
    assert run(x, 1, impl).tolist() == [2]


def axis_ties(n: int) -> torch.Tensor:
    """Rows along a few axes (scaled by powers of two, some negated): every cosine is exactly
    0, 1 or -1, so the greedy rule meets exact ties at every step."""
    g = torch.Generator().manual_seed(n)
    axes = torch.randint(0, 5, (n,), generator=g)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = torch.zeros(n, 5)
    x[torch.arange(n), axes] = signs * 2.0 ** (torch.arange(n) % 4)
    return x


@pytest.mark.triton
@requires_triton
def test_triton_exact_ties_across_blocks():
    from tokenprune.kernels.mmdp.common import prepare_segments
    from tokenprune.kernels.mmdp.triton import mmdp_select_triton

    x = axis_ties(23)
    for k in (1, 2, 4, 7, 12):
        for block in (4, 8):
            got = mmdp_select_triton(prepare_segments(on("triton", x), k, None), block=block).cpu()
            assert got.tolist() == brute_mmdp(x, k).tolist(), (k, block)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pair", [(5, 20), (5, 40), (44, 3)])
def test_mutual_nearest_neighbours_tie_exactly(impl, pair):
    """Tight clusters plus one isolated pair: the pair's distance is the largest nearest-neighbour
    distance, held by both members, so the first pick must be the lower index of the pair whatever
    tiles the two rows fall in (the similarity matrix must be exactly symmetric)."""
    i, j = pair
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(4, 37, generator=g)
        x = centers[torch.arange(50) % 4] + 0.01 * torch.randn(50, 37, generator=g)
        x[i] = torch.randn(37, generator=g)
        x[j] = x[i] + torch.randn(37, generator=g)
        assert run(x, 1, impl).tolist() == [min(i, j)], seed


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_vectors_are_allowed(impl):
    x = features(30, 8, seed=2)
    x[4] = 0
    x[17] = 0
    assert torch.equal(run(x, 7, impl), brute_mmdp(x, 7))


def test_pick_order_does_not_depend_on_the_number_of_kept_tokens():
    """Greedy: the first k picks are a prefix of the first k + 1 picks."""
    x = features(50, 16, seed=9)
    previous = set()
    for k in range(1, 12):
        current = set(mmdp_select(x, k, impl="torch").tolist())
        assert previous < current and len(current) == k
        previous = current


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(x=torch.randn(5, 3), k=0), ValueError, "k must be >= 1"),
        (dict(x=torch.randn(5, 3), k=-2), ValueError, "k must be >= 1"),
        (dict(x=torch.randn(5, 3), k=True), TypeError, "k must be an int"),
        (dict(x=torch.randn(5, 3), k=2.0), TypeError, "k must be an int"),
        (dict(x=torch.randn(5), k=2), ValueError, r"\[N, D\]"),
        (dict(x=torch.randn(2, 5, 3, 1), k=2), ValueError, r"\[N, D\]"),
        (dict(x=torch.randn(5, 0), k=2), ValueError, "feature dimension"),
        (dict(x=torch.arange(6).view(3, 2), k=2), TypeError, "floating-point"),
        (dict(x=torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), k=1), ValueError, "NaN or inf"),
        (dict(x=torch.tensor([[1.0, float("inf")], [1.0, 2.0]]), k=1), ValueError, "NaN or inf"),
        (dict(x=torch.randn(2, 5, 3), k=2, cu_seqlens=torch.tensor([0, 5])), ValueError, "packed 2-D"),
        (dict(x=torch.randn(5, 3), k=2, cu_seqlens=torch.tensor([0, 4])), ValueError, "end at x.shape"),
        (dict(x=torch.randn(5, 3), k=2, cu_seqlens=torch.tensor([1, 5])), ValueError, "start at 0"),
        (dict(x=torch.randn(5, 3), k=2, cu_seqlens=torch.tensor([0, 4, 2, 5])), ValueError, "non-decreasing"),
        (dict(x=torch.randn(5, 3), k=2, cu_seqlens=torch.tensor([0.0, 5.0])), ValueError, "int32/int64"),
        (dict(x=torch.randn(5, 3), k=2, cu_seqlens=torch.tensor([[0, 5]])), ValueError, "1-D"),
        (dict(x=torch.randn(5, 3), k=2, cu_seqlens=[0, 5]), TypeError, "cu_seqlens"),
        (dict(x=torch.randn(5, 3), k=2, impl="cuda"), ValueError, "impl must be one of"),
    ],
)
def test_bad_input(kwargs, err, match):
    x = kwargs.pop("x")
    k = kwargs.pop("k")
    with pytest.raises(err, match=match):
        mmdp_select(x, k, **kwargs)


def _run_without_interpreter(code: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_dispatch_without_interpreter():
    """On CPU without TRITON_INTERPRET: auto picks torch without importing triton; an explicit
    impl='triton' raises a clear error."""
    code = (
        "import sys, torch\n"
        "import tokenprune\n"
        "from tokenprune.kernels import mmdp_select, attention_topk\n"
        "assert 'triton' not in sys.modules, 'import tokenprune imported triton'\n"
        "print(mmdp_select(torch.randn(6, 4), 2).tolist())\n"
        "print(attention_topk(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4), 2)[0].tolist())\n"
        "assert 'triton' not in sys.modules, 'impl=auto on CPU imported triton'\n"
        "for call in (lambda: mmdp_select(torch.randn(6, 4), 2, impl='triton'),\n"
        "             lambda: attention_topk(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 5, 4), 2, impl='triton')):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        assert 'TRITON_INTERPRET' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('impl=triton on CPU did not raise')\n"
        "print('ok')\n"
    )
    proc = _run_without_interpreter(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_benchmark_per_step_loop_matches_the_reference():
    """The DivPrune-shaped loop that the kernels benchmark times against is the same selection."""
    from tokenprune.bench.suites.kernels import divprune_loop

    for n, d, k in [(2, 5, 1), (63, 33, 10), (200, 70, 30)]:
        x = features(n, d, seed=n + k)
        assert torch.equal(divprune_loop(x, k), brute_mmdp(x, k))
