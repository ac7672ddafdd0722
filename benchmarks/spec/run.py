"""Speculative decoding benchmark (DraftTree vs greedy vs HF prompt lookup); writes a CSV.

    python benchmarks/spec/run.py [--out benchmarks/results/spec_tree_cpu.csv] [--tokens 64] [--repeats 3]
    python benchmarks/spec/run.py --preset medium --out benchmarks/results/spec_tree_cpu_medium.csv
"""

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenprune.bench.speculative import DEFAULT_CONFIGS, run_spec_benchmark  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/spec_tree_cpu.csv")
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens per prompt")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per kind")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "medium"], help="trained target model size")
    parser.add_argument("--configs", default=None, help="comma-separated config labels (default: all)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenprune"))
    args = parser.parse_args()
    configs = None
    if args.configs:
        wanted = args.configs.split(",")
        configs = [c for c in DEFAULT_CONFIGS if c[0] in wanted]
        if len(configs) != len(wanted):
            parser.error(f"--configs must be among {[c[0] for c in DEFAULT_CONFIGS]}")
    rows = run_spec_benchmark(max_new_tokens=args.tokens, n_per_kind=args.prompts, repeats=args.repeats,
                              cache_dir=args.cache_dir, threads=args.threads, preset=args.preset, configs=configs)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    print(markdown(rows))


def markdown(rows: list) -> str:
    """Pivot table: one line per configuration, 'tokens per forward / speedup' per mode and prompt kind."""
    columns = sorted({(r["mode"], r["prompt_kind"]) for r in rows}, key=lambda c: (c[0] != "greedy", c[1]))
    configs = list(dict.fromkeys(r["config"] if r["source"] != "none" else "baseline" for r in rows))
    cell = {((r["config"] if r["source"] != "none" else "baseline"), r["mode"], r["prompt_kind"]): r for r in rows}
    lines = ["| config | " + " | ".join(f"{m} {k}" for m, k in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for config in configs:
        values = []
        for m, k in columns:
            r = cell.get((config, m, k))
            values.append("" if r is None else f"{float(r['tokens_per_forward']):.2f} / {float(r['speedup']):.2f}x")
        lines.append(f"| {config} | " + " | ".join(values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
