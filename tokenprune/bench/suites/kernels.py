"""Benchmark of tokenprune's kernels: ``mmdp_select`` and ``attention_topk``.

For each shape it times, in one run:

- mmdp_select: the torch path, the Triton kernel (GPU only), a per-step Python loop shaped like the
  public DivPrune code, and two floors: the ``N x N x D`` Gram GEMM that the first-pick rule needs
  (the CPU floor) and one read of ``x`` (the GPU floor); it also checks that all picks are identical.
- attention_topk: the torch path, the Triton kernel (GPU only) and one read of ``K`` (the floor).

CPU timings are medians over interleaved repeats (every candidate once per round, so load changes
hit all alike); GPU timings use ``triton.testing.do_bench``. Triton is not timed on CPU: there it
runs only in the interpreter. Results go to ``benchmarks/results/kernels_<device>_<date>.csv`` with
the machine, versions and date.

    python -m tokenprune.bench.suites.kernels                  # CPU, 2 threads
    python -m tokenprune.bench.suites.kernels --device cuda    # GPU (H100/H200)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

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


@dataclass
class Row:
    kernel: str
    shape: str
    impl: str
    median_ms: float
    floor: str = ""
    ratio_vs_floor: Optional[float] = None
    ratio_vs_loop: Optional[float] = None
    same_picks: Optional[bool] = None


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, repeats: int, clock: str) -> dict[str, float]:
    """Median milliseconds of each function.

    ``clock="cpu"`` measures process CPU time instead of wall time: on a shared, oversubscribed
    machine a single-threaded run then does not count the time it waits for a core.
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    if device == "cuda":
        import triton.testing

        return {name: float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = timer()
            fn()
            samples[name].append((timer() - start) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_mmdp(device: str, repeats: int, clock: str, shapes: list[tuple[int, int, int, int]]) -> list[Row]:
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
        times = time_interleaved(fns, device, repeats, clock)
        loop_picks = torch.cat([p + s * n for s, p in enumerate(fns["loop"]())])
        floor_name = "gemm" if device == "cpu" else "read_x"
        for impl in ("torch", "triton", "loop"):
            if impl not in times:
                continue
            picks = loop_picks if impl == "loop" else fns[impl]()
            rows.append(Row("mmdp_select", shape, impl, times[impl], floor_name, times[impl] / times[floor_name],
                            times["loop"] / times[impl], bool(torch.equal(picks, loop_picks))))
        for floor in ("gemm", "read_x"):
            rows.append(Row("mmdp_select", shape, floor, times[floor]))
    return rows


def bench_attention(device: str, repeats: int, clock: str, shapes: list[tuple[int, int, int, int, int, int, int]]) -> list[Row]:
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
        times = time_interleaved(fns, device, repeats, clock)
        ref = fns["torch"]()[0]
        for impl in ("torch", "triton"):
            if impl in times:
                same = bool(torch.equal(fns[impl]()[0], ref))
                rows.append(Row("attention_topk", shape, impl, times[impl], "read_k", times[impl] / times["read_k"],
                                same_picks=same))
        rows.append(Row("attention_topk", shape, "read_k", times["read_k"]))
    return rows


def machine(device: str) -> dict[str, str]:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor())
        name = f"{name} ({torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # how busy the machine was: CPU wall-clock figures are meaningless when it is oversubscribed
        "load_avg_1min": f"{os.getloadavg()[0]:.1f}",
    }


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_table(rows: list[Row]) -> None:
    header = ["kernel", "shape", "impl", "median_ms", "floor", "x_floor", "loop_speedup", "same_picks"]
    body = [[r.kernel, r.shape, r.impl, fmt(r.median_ms), r.floor, fmt(r.ratio_vs_floor), fmt(r.ratio_vs_loop),
             fmt(r.same_picks)] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    for line in [header] + body:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=21, help="CPU rounds per shape (median)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="CPU timer: wall time, or process CPU time (robust on a shared machine with --threads 1)")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/kernels_<device>_<date>.csv)")
    args = parser.parse_args()
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
    info = machine(args.device)
    clock = "wall" if args.device == "cuda" else args.clock
    info["clock"] = clock
    rows = (bench_mmdp(args.device, args.repeats, clock, mmdp_shapes)
            + bench_attention(args.device, args.repeats, clock, attn_shapes))
    print(f"{info['device_name']} | torch {info['torch']} | triton {info['triton']} | {clock} clock | "
          f"load {info['load_avg_1min']} | {info['date']}")
    print_table(rows)
    tag = f"{clock}clock" if args.device == "cuda" else f"{torch.get_num_threads()}threads_{clock}clock"
    out = args.out or os.path.join("benchmarks", "results", f"kernels_{args.device}_{tag}_{info['date'][:10]}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        fields = list(Row.__dataclass_fields__)
        writer.writerow(fields + list(info))
        for r in rows:
            writer.writerow([fmt(getattr(r, name)) for name in fields] + list(info.values()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
