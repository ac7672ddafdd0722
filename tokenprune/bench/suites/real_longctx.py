"""Long-context quality of LazyLLM and SnapKV on a real model (SmolLM2-135M-Instruct, 8k window).

For every (length, kind, sample) the unpruned model and every method answer the same synthetic prompt
(:mod:`tokenprune.bench.suites.longctx_tasks`) through ``tp.patch`` + ``generate`` (greedy); answers
are scored by exact match. The variants of one sample run back to back, their order rotated from one
sample to the next (as :func:`tokenprune.bench.timing.interleaved_schedule` does), and every run's
time to first token comes from :class:`tokenprune.bench.timing.TokenClock`, so TTFT ratios
(baseline / method) are paired per sample and summarised by their median.

Every run is appended to ``<out>.jsonl`` as it finishes (a long run that is stopped keeps what it
measured; ``--resume`` skips runs already there). The summary (``<out>.json`` / ``.csv``) gives per
(length, variant): samples, accuracy with its standard error, accuracy relative to the unpruned
model, the number of samples where the method and the baseline disagree, and TTFT ratios.

    python -m tokenprune.bench.suites.real_longctx --samples 1024:6,2048:3,4096:2,8000:1 --budget-min 90 \\
        --out benchmarks/results/real/longctx_smollm2

Needs the real weights (``make real-weights``); see docs/text_pruning.md "Real model".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import tokenprune as tp
from tokenprune.bench.suites.longctx_tasks import KINDS, make_samples, score
from tokenprune.bench.timing import TokenClock, summarize

__all__ = ["VARIANTS", "parse_samples", "run", "summarise", "main"]

# label -> method factory (None = unpruned); the number is the fraction of the prompt kept at the end
# (LazyLLM: past its last scheduled layer; SnapKV: in every layer's cache). LazyLLM on 30 layers: the
# default schedule is ((3, 0.7), (7, 0.5), (15, 0.3)). SnapKV below 0.3 already loses most answers
# at 1k tokens on this model (see docs/text_pruning.md), so the grid stays at 0.7 / 0.3.
VARIANTS: dict[str, Any] = {
    "baseline": lambda: None,
    "lazyllm-0.7": lambda: tp.LazyLLM(schedule=((7, 0.9), (15, 0.7))),
    "lazyllm-0.3": lambda: tp.LazyLLM(),
    "snapkv-0.7": lambda: tp.SnapKV(keep=0.7),
    "snapkv-0.3": lambda: tp.SnapKV(keep=0.3),
}
# New tokens per kind: a 5-digit answer is 5-7 tokens; hop2 names the town first.
NEW_TOKENS = {"needle": 10, "kv": 10, "hop2": 32}
MIN_NEW_TOKENS = {"needle": 0, "kv": 0, "hop2": 16}  # hop2: the chat model would stop after the town


def parse_samples(spec: str) -> dict[int, int]:
    """``"1024:8,2048:4"`` -> ``{1024: 8, 2048: 4}`` (prompt tokens: samples per kind)."""
    out = {}
    for item in spec.split(","):
        length, _, n = item.partition(":")
        try:
            out[int(length)] = int(n)
        except ValueError:
            raise ValueError(f"--samples must look like 1024:8,2048:4, got {spec!r}") from None
    return out


def kvpress_variants(keeps: Sequence[float] = (0.7, 0.3), window: int = 32, kernel: int = 5) -> dict[str, Any]:
    """kvpress's ``SnapKVPress`` at the same keeps (``compression_ratio = 1 - keep``), for its own venv.

    kvpress needs transformers < 5.3 (docs/text_pruning.md); a press is used as ``with press(model):``.
    """
    from kvpress import SnapKVPress

    out: dict[str, Any] = {"baseline": lambda: None}
    for keep in keeps:
        out[f"kvpress-snapkv-{keep}"] = (lambda keep=keep: SnapKVPress(compression_ratio=1 - keep, window_size=window,
                                                                       kernel_size=kernel))
    return out


def _generate(model, tokenizer, ids: torch.Tensor, kind: str, method) -> tuple[str, float]:
    """Greedy answer and TTFT; ``method``: None, a ``tp.Pruner`` or a kvpress press (``press(model)``)."""
    clock = TokenClock()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS[kind],
                  min_new_tokens=MIN_NEW_TOKENS[kind], do_sample=False, streamer=clock)
    with torch.no_grad():
        if method is None:
            clock.start()
            out = model.generate(ids, **kwargs)
        else:
            with tp.patch(model, method) if isinstance(method, tp.Pruner) else method(model):
                clock.start()
                out = model.generate(ids, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), clock.ttft_s


def run(model, tokenizer, samples: dict[int, int], *, kinds: Sequence[str] = KINDS, variants: Sequence[str] = tuple(VARIANTS),
        jsonl: Optional[Path] = None, budget_s: Optional[float] = None, seed: int = 0, log=print,
        factories: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Run every (length, kind, sample, variant); return (and append to ``jsonl``) one row per run.

    Lengths run shortest first; when ``budget_s`` is spent the run stops after the current sample.
    ``factories``: label -> method factory (default :data:`VARIANTS`; :func:`kvpress_variants`).
    """
    factories = VARIANTS if factories is None else factories
    unknown = [v for v in variants if v not in factories]
    if unknown or "baseline" not in variants:
        raise ValueError(f"variants must include baseline and come from {', '.join(factories)}, got {list(variants)}")
    done = set()
    rows: list[dict[str, Any]] = []
    if jsonl is not None and jsonl.exists():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        done = {(r["length"], r["kind"], r["index"], r["variant"]) for r in rows}
    t0 = time.perf_counter()
    count = 0
    for length, n in sorted(samples.items()):
        prompts = {kind: make_samples(tokenizer, kind, length, n, seed=seed) for kind in kinds}
        for index in range(n):
            for kind in kinds:
                if budget_s is not None and time.perf_counter() - t0 > budget_s:
                    log(f"budget of {budget_s:.0f} s spent: stopping before {length}/{kind}/{index}")
                    return rows
                sample = prompts[kind][index]
                ids = torch.tensor([sample.prompt_ids(tokenizer)])
                order = list(variants[count % len(variants):]) + list(variants[:count % len(variants)])
                count += 1
                for variant in order:
                    if (length, kind, index, variant) in done:
                        continue
                    text, ttft = _generate(model, tokenizer, ids, kind, factories[variant]())
                    row = {"length": length, "kind": kind, "index": index, "variant": variant,
                           "prompt_tokens": ids.shape[1], "answer": sample.answer, "output": text,
                           "correct": score(sample, text), "ttft_s": ttft}
                    rows.append(row)
                    if jsonl is not None:
                        with jsonl.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    log(f"{length:>5} {kind:<6} #{index} {variant:<12} ttft {ttft:6.2f}s "
                        f"{'ok ' if row['correct'] else 'BAD'} {text.strip()[:60]!r}")
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (length, variant) over the samples every variant finished: accuracy +- SE, vs baseline, TTFT ratio."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["length"], r["kind"], r["index"]), {})[r["variant"]] = r
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "baseline", v))
    complete = {k: runs for k, runs in by_key.items() if all(v in runs for v in variants)}
    out = []
    for length in sorted({k[0] for k in complete}):
        keys = [k for k in complete if k[0] == length]
        for variant in variants:
            correct = [complete[k][variant]["correct"] for k in keys]
            base = [complete[k]["baseline"]["correct"] for k in keys]
            n = len(correct)
            acc = sum(correct) / n
            ratios = [complete[k]["baseline"]["ttft_s"] / complete[k][variant]["ttft_s"] for k in keys]
            per_kind = {kind: sum(complete[k][variant]["correct"] for k in keys if k[1] == kind) /
                        max(1, sum(1 for k in keys if k[1] == kind)) for kind in sorted({k[1] for k in keys})}
            out.append({
                "length": length, "variant": variant, "samples": n,
                "prompt_tokens_median": statistics.median(complete[k][variant]["prompt_tokens"] for k in keys),
                "accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n),
                "accuracy_by_kind": per_kind,
                "relative_to_baseline": acc / (sum(base) / n) if sum(base) else None,
                "lost": sum(b and not c for b, c in zip(base, correct)),
                "gained": sum(c and not b for b, c in zip(base, correct)),
                "ttft_s_median": statistics.median(complete[k][variant]["ttft_s"] for k in keys),
                "ttft_ratio_median": summarize(ratios).median,
            })
    return out


def agreement(rows: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per SnapKV keep: on the samples both runs hold, how often tokenprune's and kvpress's answers
    are the same text, and both accuracies (``rows``: this suite's runs; ``other``: a ``--kvpress`` run)."""
    mine = {(r["length"], r["kind"], r["index"], r["variant"]): r for r in rows}
    out = []
    for variant in sorted({r["variant"] for r in other if r["variant"].startswith("kvpress-")}):
        ours = variant.removeprefix("kvpress-")
        pairs = [(mine[(r["length"], r["kind"], r["index"], ours)], r) for r in other
                 if r["variant"] == variant and (r["length"], r["kind"], r["index"], ours) in mine]
        if not pairs:
            continue
        out.append({"tokenprune": ours, "kvpress": variant, "samples": len(pairs),
                    "same_prompt_tokens": all(a["prompt_tokens"] == b["prompt_tokens"] for a, b in pairs),
                    "same_answer": sum(a["output"] == b["output"] for a, b in pairs),
                    "accuracy_tokenprune": sum(a["correct"] for a, _ in pairs) / len(pairs),
                    "accuracy_kvpress": sum(b["correct"] for _, b in pairs) / len(pairs)})
    return out


def _describe(method) -> Any:
    if method is None or isinstance(method, tp.Pruner):
        return None if method is None else method.to_config()
    from importlib.metadata import version

    return {"kvpress": version("kvpress"), "press": repr(method)}


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    from tokenprune.bench.report import environment, write_csv, write_json
    from tokenprune.fixtures import load_real_lm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a tokenprune.fixtures.real_lm name")
    ap.add_argument("--samples", default="1024:6,2048:3,4096:2,8000:1",
                    help="prompt tokens:samples per kind, comma-separated (default %(default)s)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--variants", default=None, help=f"default: {','.join(VARIANTS)}")
    ap.add_argument("--kvpress", action="store_true",
                    help="measure kvpress's SnapKVPress instead (run in the kvpress venv, with --model-path)")
    ap.add_argument("--model-path", default=None,
                    help="a saved checkpoint instead of real_lm(--model) (the kvpress venv has no GGUF packages)")
    ap.add_argument("--budget-min", type=float, default=None, help="stop after this many minutes (keeps what ran)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine more threads only wait on each other)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="skip runs already in <out>.jsonl")
    ap.add_argument("--out", default="benchmarks/results/real/longctx_smollm2")
    ap.add_argument("--compare", default=None, metavar="KVPRESS.jsonl",
                    help="run nothing: compare <out>.jsonl with a --kvpress run's JSONL (same samples)")
    args = ap.parse_args(argv)
    if args.compare:
        load = lambda path: [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]  # noqa: E731
        result = agreement(load(Path(args.out).with_suffix(".jsonl")), load(args.compare))
        write_json(f"{args.out}_vs_kvpress.json", environment("cpu"), result)
        for r in result:
            print(f"{r['tokenprune']} vs {r['kvpress']}: {r['same_answer']}/{r['samples']} identical answers, "
                  f"accuracy {r['accuracy_tokenprune']:.2f} vs {r['accuracy_kvpress']:.2f}")
        return result
    kinds = args.kinds.split(",")
    if any(k not in KINDS for k in kinds):
        ap.error(f"--kinds must come from {', '.join(KINDS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    if jsonl.exists() and not args.resume:
        ap.error(f"{jsonl} exists: pass --resume to continue it, or another --out")
    factories = kvpress_variants() if args.kvpress else VARIANTS
    variants = args.variants.split(",") if args.variants else list(factories)
    if args.model_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    else:
        model, tokenizer = load_real_lm(args.model)
    window = model.config.max_position_embeddings
    samples = parse_samples(args.samples)
    too_long = [n for n in samples if n + max(NEW_TOKENS.values()) > window]
    if too_long:
        ap.error(f"--samples lengths {too_long} + new tokens exceed the model's window ({window})")
    rows = run(model, tokenizer, samples, kinds=kinds, variants=variants, jsonl=jsonl, factories=factories,
               budget_s=None if args.budget_min is None else 60 * args.budget_min, seed=args.seed)
    summary = summarise(rows)
    meta = {**environment("cpu"), "model": args.model, "window": window, "samples_per_kind": samples,
            "kinds": kinds, "load_average_1m_end": os.getloadavg()[0],
            "variants": {v: _describe(factories[v]()) for v in variants}}
    write_json(out.with_suffix(".json"), meta, summary)
    write_csv(out.with_suffix(".csv"), meta, summary)
    for row in summary:
        print(f"{row['length']:>5} {row['variant']:<12} n={row['samples']:<3} acc {row['accuracy']:.2f} "
              f"+-{2 * row['accuracy_se']:.2f} (2 SE)  vs base {row['relative_to_baseline'] or float('nan'):.2f}  "
              f"lost {row['lost']} gained {row['gained']}  TTFT x{row['ttft_ratio_median']:.2f}")
    return summary


if __name__ == "__main__":
    main()
