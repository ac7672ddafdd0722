"""Benchmark of tokenprune's kernels: ``mmdp_select`` and ``attention_topk``.

For each shape it times, in one run:

- mmdp_select: the torch path, the Triton kernel (GPU only), a per-step Python loop shaped like the
  public DivPrune code, and two floors: the ``N x N x D`` Gram GEMM that the first-pick rule needs
  (the CPU floor) and one read of ``x`` (the GPU floor); it also checks that all picks are identical.
- attention_topk: the torch path, the Triton kernel (GPU only) and one read of ``K`` (the floor).

CPU timings are medians over rounds of :func:`tokenprune.bench.timing.time_interleaved` (every
candidate once per round, the order rotating, so load changes hit all alike; wall or process CPU
clock); GPU timings use ``triton.testing.do_bench``. Triton is not timed on CPU: there it runs only
in the interpreter. Rows (``time_ms`` median with its quartiles, ``floor``, ``ratio_vs_floor``,
``ratio_vs_loop``, ``same_picks``) go through :mod:`tokenprune.bench.report` to
``benchmarks/results/kernels_<device>_<threads>_<clock>_<date>.csv`` with the machine, versions,
load and date.

    python -m tokenprune.bench.suites.kernels                  # CPU, 2 threads
    python -m tokenprune.bench.suites.kernels --device cuda    # GPU (H100/H200)
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional

import torch

from tokenprune.bench.timing import Summary, summarize, time_interleaved
from tokenprune.kernels import attention_topk, mmdp_select


def divprune_loop(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MMDP in the shape of the public DivPrune code (Alvar et al., CVPR 2025): full
    distance matrix, first pick from each column's second-smallest distance (the smallest is the
    token itself), then per step an ``index_select`` of the whole kept set, a min over it, an
    argmax and a host sync. The baseline of the ``ratio_vs_loop`` column; ``[n, D]`` -> ascending
    ``[k]``."""
    xf = x.float()
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - xn @ xn.T
    nearest = torch.topk(dist, 2, dim=0, largest=False).values[1]
    selected = [int(torch.argmax(nearest))]
    for _ in range(k - 1):
        kept = torch.tensor(selected, device=x.device)
        min_dist = dist.index_select(0, kept).min(dim=0).values
        min_dist[kept] = float("-inf")
        selected.append(int(torch.argmax(min_dist)))
    return torch.sort(torch.tensor(selected, device=x.device)).values


def row(kernel: str, shape: str, impl: str, time: Summary, dtype: torch.dtype, floor: str = "",
        ratio_vs_floor: Optional[float] = None, ratio_vs_loop: Optional[float] = None,
        same_picks: Optional[bool] = None) -> dict[str, Any]:
    """One result row (``mode="kernels"``: the report's kernels table; ``method`` is the implementation)."""
    return {"mode": "kernels", "kernel": kernel, "shape": shape, "method": impl, **time.as_dict("time_ms"),
            "floor": floor, "ratio_vs_floor": ratio_vs_floor, "ratio_vs_loop": ratio_vs_loop, "same_picks": same_picks,
            "dtype": str(dtype).removeprefix("torch.")}


def time_all(fns: dict[str, Callable[[], object]], device: str, repeats: int, clock: str) -> dict[str, Summary]:
    """Milliseconds of each function: ``triton.testing.do_bench`` medians on GPU (a single-value
    summary), :func:`~tokenprune.bench.timing.time_interleaved` on CPU (``clock="cpu"``: process CPU
    time, which on a shared, oversubscribed machine does not count the time a single-threaded run
    waits for a core)."""
    if device == "cuda":
        import triton.testing

        return {name: summarize([float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))])
                for name, fn in fns.items()}
    return time_interleaved(fns, repeats, warmup=1, clock=clock)


def bench_mmdp(device: str, repeats: int, clock: str, shapes: list[tuple[int, int, int, int]]) -> list[dict[str, Any]]:
    rows = []
    for segments, n, k, d in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(segments * n, d, generator=g).to(device)
        cu = torch.arange(0, (segments + 1) * n, n, device=device)
        shape = f"S={segments} N={n} K={k} D={d}"
        fns: dict[str, Callable[[], object]] = {
            "gemm": lambda: [x[s * n : (s + 1) * n] @ x[s * n : (s + 1) * n].T for s in range(segments)],
            "read_x": lambda: x.sum(),
            "torch": lambda: mmdp_select(x, k, cu_seqlens=cu, impl="torch"),
            "loop": lambda: [divprune_loop(x[s * n : (s + 1) * n], k) for s in range(segments)],
        }
        if device == "cuda":
            fns["triton"] = lambda: mmdp_select(x, k, cu_seqlens=cu, impl="triton")
        times = time_all(fns, device, repeats, clock)
        loop_picks = torch.cat([p + s * n for s, p in enumerate(fns["loop"]())])
        floor_name = "gemm" if device == "cpu" else "read_x"
        for impl in ("torch", "triton", "loop"):
            if impl not in times:
                continue
            picks = loop_picks if impl == "loop" else fns[impl]()
            ms = times[impl].median
            rows.append(row("mmdp_select", shape, impl, times[impl], x.dtype, floor_name,
                            ms / times[floor_name].median, times["loop"].median / ms,
                            bool(torch.equal(picks, loop_picks))))
        for floor in ("gemm", "read_x"):
            rows.append(row("mmdp_select", shape, floor, times[floor], x.dtype))
    return rows


def bench_attention(device: str, repeats: int, clock: str,
                    shapes: list[tuple[int, int, int, int, int, int, int]]) -> list[dict[str, Any]]:
    rows = []
    dtype = torch.float16 if device == "cuda" else torch.float32
    for b, hq, hk, lq, lk, d, width in shapes:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, hq, lq, d, generator=g).to(device, dtype)
        k = torch.randn(b, hk, lk, d, generator=g).to(device, dtype)
        start = lk - width - 32  # an image-like range near the end, as FastV ranks it
        shape = f"B={b} Hq={hq} Hk={hk} Lq={lq} Lk={lk} D={d} range={width} {str(dtype).replace('torch.', '')}"
        fns: dict[str, Callable[[], object]] = {
            "read_k": lambda: k.sum(),
            "torch": lambda: attention_topk(q, k, width // 2, key_start=start, key_end=start + width, impl="torch"),
        }
        if device == "cuda":
            fns["triton"] = lambda: attention_topk(q, k, width // 2, key_start=start, key_end=start + width, impl="triton")
        times = time_all(fns, device, repeats, clock)
        ref = fns["torch"]()[0]
        for impl in ("torch", "triton"):
            if impl in times:
                same = bool(torch.equal(fns[impl]()[0], ref))
                rows.append(row("attention_topk", shape, impl, times[impl], dtype, "read_k",
                                times[impl].median / times["read_k"].median, same_picks=same))
        rows.append(row("attention_topk", shape, "read_k", times["read_k"], dtype))
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=21, help="CPU rounds per shape (median)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="CPU timer: wall time, or process CPU time (robust on a shared machine with --threads 1)")
    parser.add_argument("--out", default=None,
                        help="CSV path (default benchmarks/results/kernels_<device>_<threads>_<clock>_<date>.csv)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        # the GEMM floor in true fp32, as the kernels compute
        torch.backends.cuda.matmul.allow_tf32 = False
        mmdp_shapes = [(1, 576, 64, 4096), (1, 576, 64, 1024), (8, 576, 64, 4096), (1, 2304, 256, 4096), (1, 5120, 512, 3584)]
        attn_shapes = [(1, 32, 32, 1, 32768, 128, 576), (1, 32, 32, 1, 32768, 128, 32768 - 64),
                       (1, 32, 8, 1, 32768, 128, 576), (1, 32, 8, 64, 32768, 128, 576), (4, 32, 8, 1, 4096, 128, 576)]
    else:
        torch.set_num_threads(args.threads)
        mmdp_shapes = [(1, 576, 64, 1024), (1, 256, 32, 1024), (1, 576, 64, 4096), (1, 1024, 128, 1024), (4, 576, 64, 1024)]
        attn_shapes = [(1, 32, 8, 1, 4096, 128, 576), (1, 32, 32, 1, 4096, 128, 576), (1, 32, 8, 1, 32768, 128, 576)]
    clock = "wall" if args.device == "cuda" else args.clock
    meta = {**report.environment(args.device), "clock": clock, "timer": "triton.testing.do_bench"
            if args.device == "cuda" else f"time_interleaved, median of {args.repeats} rounds", "parameters": vars(args)}
    tag = f"{clock}clock" if args.device == "cuda" else f"{torch.get_num_threads()}threads_{clock}clock"
    out = args.out or os.path.join("benchmarks", "results", f"kernels_{args.device}_{tag}_{meta['date'][:10]}.csv")
    report.check_outputs_or_exit(parser, [("--out", out, "csv"), ("--json", args.json, "json")], force=args.force)
    rows = (bench_mmdp(args.device, args.repeats, clock, mmdp_shapes)
            + bench_attention(args.device, args.repeats, clock, attn_shapes))
    for r in rows:
        r.update(model="tokenprune.kernels", device=args.device)
    report.print_table(rows, meta, title=f"kernels ({clock} clock, load {meta['load_avg_1m']})")
    report.write_csv(out, meta, rows)
    if args.json:
        report.write_json(args.json, meta, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
