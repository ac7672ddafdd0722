"""DraftTree with a real target: Qwen2.5-Coder-0.5B/1.5B-Instruct against HF assisted generation.

Code-editing prompts (the answer repeats much of the prompt, as real coding-assistant answers do) are
answered greedily by the target alone and by every configuration:

* ``draft_tree:<sources>``: ``tp.DraftTree`` through ``custom_generate=tree_generate``;
* ``prompt_lookup``: HF ``generate(prompt_lookup_num_tokens=10)``;
* ``assisted:<draft>``: HF ``generate(assistant_model=...)`` with a real draft model sharing the
  vocabulary (Qwen2.5-Coder-0.5B drafting for the 1.5B target).

Per configuration: tokens per target forward (the acceptance length + 1 of a chain method; the target's
``forward`` calls are counted by a pre-hook), wall-clock ratio to the greedy baseline run right before
or after it (runs interleaved, order rotated per repetition; medians of per-run ratios), and whether the
output equals greedy token for token.

    python -m tokenprune.bench.suites.real_spec --target qwen2.5-coder-0.5b --out benchmarks/results/real/spec_qwen05b
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Optional, Sequence

import torch

import tokenprune as tp

__all__ = ["PROMPTS", "chat_ids", "run", "main"]

_CODE = [
    '''def moving_average(values, window):
    result = []
    for i in range(len(values) - window + 1):
        total = 0
        for j in range(i, i + window):
            total += values[j]
        result.append(total / window)
    return result''',
    '''class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        if name in self.items:
            self.items[name] += count
        else:
            self.items[name] = count

    def remove(self, name, count):
        if name not in self.items:
            raise KeyError(name)
        self.items[name] -= count
        if self.items[name] <= 0:
            del self.items[name]''',
    '''def parse_config(lines):
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config''',
    '''def binary_search(items, target):
    low, high = 0, len(items) - 1
    while low <= high:
        mid = (low + high) // 2
        if items[mid] == target:
            return mid
        if items[mid] < target:
            low = mid + 1
        else:
            high = mid - 1
    return -1''',
]
_TASKS = [
    "Add type hints to this Python code. Reply with the full code only.",
    "Rename the variables of this Python code to longer, descriptive names. Reply with the full code only.",
]
# (task, code) pairs: every code snippet under both tasks.
PROMPTS: list[str] = [f"{task}\n\n```python\n{code}\n```" for code in _CODE for task in _TASKS]


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """``[1, L]`` token ids of the chat-formatted prompt (generation prompt included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _configs(draft) -> dict[str, tuple[str, Any]]:
    out: dict[str, tuple[str, Any]] = {
        "draft_tree:ngram": ("tree", dict(sources=("ngram",))),
        "draft_tree:ngram+recycling": ("tree", dict(sources=("ngram", "recycling"))),
        "prompt_lookup": ("hf", dict(prompt_lookup_num_tokens=10)),
    }
    if draft is not None:
        out["assisted:draft"] = ("hf", dict(assistant_model=draft))
        out["draft_tree:draft_model"] = ("tree", dict(sources=("draft_model",), draft_model=draft))
        out["draft_tree:draft_model+ngram"] = ("tree", dict(sources=("draft_model", "ngram"), draft_model=draft))
    return out


def run(model, tokenizer, prompts: Sequence[str], *, draft=None, configs: Optional[Sequence[str]] = None,
        max_new_tokens: int = 64, repeats: int = 2, log=print) -> list[dict[str, Any]]:
    """One row per (prompt, configuration) + the baseline rows; see the module docstring."""
    from tokenprune.integrations.hf.speculative import tree_generate

    available = _configs(draft)
    names = list(available) if configs is None else list(configs)
    unknown = [c for c in names if c not in available]
    if unknown:
        raise ValueError(f"configs must come from {', '.join(available)}, got {unknown}")
    methods = {name: tp.DraftTree(**available[name][1]) for name in names if available[name][0] == "tree"}
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    rows = []
    try:
        for p_index, prompt in enumerate(prompts):
            ids = chat_ids(tokenizer, prompt)
            common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)

            def generate(name: Optional[str]) -> tuple[torch.Tensor, float, int]:
                if name is None:
                    extra = {}
                elif name in methods:
                    extra = dict(custom_generate=tree_generate, draft_tree=methods[name])
                else:
                    extra = dict(available[name][1])
                calls[0] = 0
                start = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(ids, **common, **extra)
                return out[0, ids.shape[1]:], time.perf_counter() - start, calls[0]

            for name in methods:  # warm-up: latency model of budget="auto", recycling table
                with torch.no_grad():
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                   custom_generate=tree_generate, draft_tree=methods[name])
            per = {name: dict(ratios=[]) for name in [None, *names]}
            for rep in range(repeats):
                order = [None, *names]
                order = order[rep % len(order):] + order[:rep % len(order)]
                times: dict[Optional[str], float] = {}
                for name in order:
                    out, seconds, forwards = generate(name)
                    times[name] = seconds
                    if rep == 0:
                        per[name].update(out=out, forwards=forwards)
                for name in names:
                    per[name]["ratios"].append(times[None] / times[name])
                per[None]["ratios"].append(times[None])
            ref, ref_calls = per[None]["out"], per[None]["forwards"]
            base_times = per[None]["ratios"]
            for name in names:
                per[name].update(identical=torch.equal(per[name]["out"], ref), new=per[name]["out"].shape[0])
            rows.append(dict(prompt=p_index, config="greedy", prompt_tokens=ids.shape[1], new_tokens=ref.shape[0],
                             target_forwards=ref_calls, tokens_per_forward=ref.shape[0] / ref_calls,
                             speedup=1.0, identical=True, baseline_s=statistics.median(base_times)))
            for name in names:
                p = per[name]
                rows.append(dict(prompt=p_index, config=name, prompt_tokens=ids.shape[1], new_tokens=p["new"],
                                 target_forwards=p["forwards"], tokens_per_forward=p["new"] / p["forwards"],
                                 speedup=statistics.median(p["ratios"]), identical=p["identical"],
                                 baseline_s=statistics.median(base_times)))
                r = rows[-1]
                log(f"prompt {p_index} {name:30s} tok/fwd {r['tokens_per_forward']:5.2f} "
                    f"speedup {r['speedup']:.2f}x identical {r['identical']}")
    finally:
        hook.remove()
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration over prompts: total tokens / total target forwards, median speedup, all identical."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        sel = [r for r in rows if r["config"] == config]
        out.append(dict(config=config, prompts=len(sel),
                        tokens_per_forward=sum(r["new_tokens"] for r in sel) / sum(r["target_forwards"] for r in sel),
                        speedup_median=statistics.median(r["speedup"] for r in sel),
                        speedup_min=min(r["speedup"] for r in sel), speedup_max=max(r["speedup"] for r in sel),
                        identical=all(r["identical"] for r in sel)))
    return out


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    from tokenprune.bench.report import environment, write_csv, write_json
    from tokenprune.fixtures import load_real_lm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b", help="a tokenprune.fixtures.real_lm name")
    ap.add_argument("--draft", default=None, help="a real_lm name sharing the target's vocabulary (assisted + draft_model)")
    ap.add_argument("--configs", default=None, help="comma-separated subset (default: all that apply)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"first N of the {len(PROMPTS)} prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/real/spec_qwen05b")
    ap.add_argument("--force", action="store_true", help="overwrite existing <out>.json / .csv")
    args = ap.parse_args(argv)
    existing = [f"{args.out}{ext}" for ext in (".json", ".csv") if os.path.exists(f"{args.out}{ext}")]
    if existing and not args.force:
        ap.error(f"{', '.join(existing)} exists; pass --force to overwrite")
    if not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_real_lm(args.target)
    draft = load_real_lm(args.draft)[0] if args.draft else None
    rows = run(model, tokenizer, PROMPTS[:args.prompts], draft=draft,
               configs=None if args.configs is None else args.configs.split(","),
               max_new_tokens=args.new_tokens, repeats=args.repeats)
    summary = summarise(rows)
    meta = {**environment("cpu"), "target": args.target, "draft": args.draft, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "load_average_1m_end": os.getloadavg()[0]}
    write_json(f"{args.out}.json", meta, rows)
    write_csv(f"{args.out}.csv", meta, summary)
    for r in summary:
        print(f"{r['config']:30s} prompts {r['prompts']}  tok/fwd {r['tokens_per_forward']:.2f}  speedup median "
              f"{r['speedup_median']:.2f}x [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}]  identical {r['identical']}")
    return summary


if __name__ == "__main__":
    main()
