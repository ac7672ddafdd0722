"""Cost of ContextPruner on huge inputs: time and peak memory at 1,000 passages and at a 1 MB passage.

    HF_HUB_OFFLINE=1 python -m tokenprune.bench.suites.rag.cost --tag after --force   # ~5-8 min on 2 busy CPU cores

Each case runs in a fresh subprocess (one torch thread, the default bi-encoder scorer) so that its
peak RSS (``VmHWM``) is its own; ``rss_loaded_mb`` is the RSS after the scorer's model is loaded
and a warm-up call, so ``peak_rss_mb - rss_loaded_mb`` is what the input itself cost. Cases:

* ``1000_passages``: one question, 1,000 passages of the synthetic RAG set (``dataset.py``);
* ``1mb_passage``: one question, one English passage of exactly 1,000,000 characters (the synthetic
  set's passages concatenated);
* ``segment_cjk_1mb``: sentence segmentation only (``split_sentences``) of a 1,000,000-character
  Japanese passage (sentencex's own cost grows with sentences x length on CJK text; scoring 125k
  sentences would take tens of minutes here and measures nothing new);
* ``segment_cjk_interleaved``: on the same 250,000-character Japanese text, one whole-text sentencex
  call (what ``split_sentences`` did before) against the windowed ``split_sentences``, interleaved,
  3 repetitions each, medians (``baseline_seconds`` vs ``seconds``): a load-independent ratio;
* ``guard_2mb``: a 2,000,000-character passage with the default ``max_chars``: the time to refuse it.

Results go to ``benchmarks/results/rag_cost.{csv,json}``; ``--tag`` labels the rows (``before`` was
measured with the same script on the code before the fix, see docs/context_pruning.md); rows of
other tags or cases already in the JSON are kept.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]  # the checkout holding tokenprune/ (PYTHONPATH default of the measured code)
CASES = ("1000_passages", "1mb_passage", "segment_cjk_1mb", "segment_cjk_interleaved", "guard_2mb")
QUESTION = "When was the company founded?"
_JA = ["今日は晴れです。", "東京の会社は一八七五年に設立されました。", "それは本当ですか？", "はい！",
       "研究者たちは新しい方法を提案し、その結果を詳しく報告した。"]

_CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
import tokenprune as tp
from tokenprune.bench.suites.rag.dataset import make_split

case, question, ja = {case!r}, {question!r}, {ja!r}

def peak_mb():
    # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across fork + exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def english(n_chars):
    out, size, seed = [], 0, 0
    while size < n_chars:
        for ex in make_split(seed, n_questions=50, n_passages=5):
            for p in ex.passages:
                out.append(p["text"] + " ")
                size += len(out[-1])
        seed += 1
    return "".join(out)[:n_chars]

row = {{"case": case, "tokenprune_path": os.path.dirname(os.path.dirname(tp.__file__))}}
if case == "segment_cjk_interleaved":
    import statistics, sentencex
    from tokenprune.methods.context.segment import split_sentences
    text = ("".join(ja) * (250_000 // len("".join(ja)) + 1))[:250_000]
    row["rss_loaded_mb"] = rss_mb()
    whole, windowed = [], []
    for _ in range(3):
        start = time.perf_counter()
        n_whole = len(sentencex.get_sentence_boundaries("ja", text))
        whole.append(time.perf_counter() - start)
        start = time.perf_counter()
        sentences = split_sentences(text, "ja")
        windowed.append(time.perf_counter() - start)
    row.update(seconds=statistics.median(windowed), baseline_seconds=statistics.median(whole), passages=1,
               chars=len(text), sentences=len(sentences), outcome=f"same sentence count: {{n_whole == len(sentences)}}")
elif case == "segment_cjk_1mb":
    from tokenprune.methods.context.segment import split_sentences
    text = ("".join(ja) * (1_000_000 // len("".join(ja)) + 1))[:1_000_000]
    row["rss_loaded_mb"] = rss_mb()
    start = time.perf_counter()
    sentences = split_sentences(text, "ja")
    row.update(seconds=time.perf_counter() - start, passages=1, chars=len(text), sentences=len(sentences))
else:
    pruner = tp.ContextPruner()
    pruner.prune(question, ["Warm up. The model loads here."])
    row["rss_loaded_mb"] = rss_mb()
    if case == "1000_passages":
        passages = [p["text"] for ex in make_split(0, n_questions=200, n_passages=5) for p in ex.passages][:1000]
    elif case == "1mb_passage":
        passages = [english(1_000_000)]
    else:
        passages = [english(2_000_000)]
    row.update(passages=len(passages), chars=sum(map(len, passages)))
    start = time.perf_counter()
    try:
        res = pruner.prune(question, passages)
        row["sentences"] = sum(len(d.sentences) for d in res.details)
        row["outcome"] = f"pruned: compression {{res.compression:.3f}}"
    except ValueError as exc:
        row["outcome"] = "ValueError: " + str(exc).split(";")[0]
    row["seconds"] = time.perf_counter() - start
row["peak_rss_mb"] = peak_mb()
print("ROW " + json.dumps(row))
"""


def machine_info() -> dict:
    import sentence_transformers
    import sentencex  # noqa: F401
    import torch
    import transformers
    from importlib.metadata import version

    return {
        "machine": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "sentencex": version("sentencex"),
    }


def run_case(case: str) -> dict:
    code = _CHILD.format(case=case, question=QUESTION, ja=_JA)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("PYTHONPATH", str(ROOT))
    load = os.getloadavg()[0]
    # cwd: ``python -c`` puts the working directory first on sys.path, before PYTHONPATH; run where no
    # ``tokenprune`` package lies, so the code measured is PYTHONPATH's
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False,
                         cwd=str(HERE))
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")), None)
    if line is None:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    row = json.loads(line[4:])
    row["load_average"] = round(load, 2)
    seconds = row["seconds"]
    row["passages_per_s"] = row["passages"] / seconds if seconds else None
    row["sentences_per_s"] = row["sentences"] / seconds if seconds and row.get("sentences") else None
    row["kchars_per_s"] = row["chars"] / 1000 / seconds if seconds else None
    return row


def main() -> None:
    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True, help="label of these rows (e.g. before / after)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--out", default="benchmarks/results/rag_cost",
                        help="stem of the .json/.csv results (rows of other tags already there are kept)")
    parser.add_argument("--code", help="revision of the measured code (default: git HEAD of the first PYTHONPATH entry)")
    report.add_force_argument(parser)
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {CASES}")
    stem = Path(args.out)
    report.check_outputs_or_exit(parser, [("--out", stem.with_suffix(".json"), "json"),
                                          ("--out", stem.with_suffix(".csv"), "csv")], force=args.force)

    code_rev = args.code or subprocess.run(
        ["git", "-C", os.environ.get("PYTHONPATH", str(ROOT)).split(":")[0], "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True,
    ).stdout.strip() or "unknown"
    info = {**machine_info(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    for case in cases:
        row = {"tag": args.tag, "code": code_rev, **run_case(case),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        print(json.dumps(row), flush=True)
        rows.append(row)

    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    replaced = {(args.tag, case) for case in cases}
    kept = [r for r in previous.get("rows", []) if (r["tag"], r["case"]) not in replaced]
    runs = {**previous.get("runs", {}), args.tag: info}
    all_rows = kept + rows
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "rows": all_rows}, indent=1) + "\n")
    keys = ["tag", "code", "case", "passages", "chars", "sentences", "seconds", "baseline_seconds", "passages_per_s",
            "sentences_per_s",
            "kchars_per_s", "rss_loaded_mb", "peak_rss_mb", "outcome", "load_average"]
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["machine", "torch", "transformers", "sentencex", "date"])
        w.writeheader()
        for r in all_rows:
            meta = runs[r["tag"]]
            w.writerow({**{k: r.get(k) for k in keys}, **{k: meta[k] for k in ("machine", "torch", "transformers",
                                                                               "sentencex")},
                        "date": r.get("date", meta["date"])})


if __name__ == "__main__":
    main()
