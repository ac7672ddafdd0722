"""Side by side with kvpress's SnapKV (NVIDIA/kvpress ``SnapKVPress``) on the same model and prompts.

kvpress needs transformers < 5.3, so it runs in its own environment (see docs/text_pruning.md),
from the root of a checkout (``-m`` puts the working directory on the path):

    # 1. in the kvpress venv: baseline vs kvpress SnapKV, interleaved; kept indices of prompt 0
    /tmp/kvpress_venv/bin/python -m tokenprune.bench.suites.kvpress_side_by_side run --model-path /tmp/tp_medium
    # 2. in the tokenprune env: our SnapKV's selection on prompt 0 against kvpress's
    python -m tokenprune.bench.suites.kvpress_side_by_side compare --model-path /tmp/tp_medium

The model is the text suite's preset saved with ``save_pretrained``
(``python -m tokenprune.bench.suites.text --model-path``); prompts come from the same seeded
generator, so both environments see the very same weights and token ids. Timing and fidelity
columns are those of :mod:`tokenprune.bench.suites.text`.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch

from tokenprune.bench.suites.text import _Clock, build_model, cache_bytes, environment, make_prompt, write_results

RESULTS = Path(os.environ.get("TOKENPRUNE_RESULTS", Path("benchmarks") / "results"))


def kept_indices(full_keys: torch.Tensor, kept_keys: torch.Tensor) -> torch.Tensor:
    """Prompt index of every kept key ``[B, Hk, K]``: kept rows are exact copies of full rows, so a
    random projection identifies them (equal projections <=> equal rows, up to ties of measure 0)."""
    proj = torch.randn(full_keys.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = full_keys.double() @ proj  # [B, Hk, L]
    kept = kept_keys.double() @ proj  # [B, Hk, K]
    order = torch.sort(full, -1)
    pos = torch.searchsorted(order.values.contiguous(), kept.contiguous()).clamp(max=full.shape[-1] - 1)
    idx = torch.gather(order.indices, -1, pos)
    if not torch.equal(torch.gather(full, -1, idx), kept):
        raise RuntimeError("a kept key does not match any prompt key")
    return torch.sort(idx, -1).values


def run_kvpress(args) -> None:
    import transformers
    from kvpress import SnapKVPress
    from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(args.model_path, attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    press = SnapKVPress(compression_ratio=1 - args.keep, window_size=args.window, kernel_size=args.kernel)
    rows = []
    for length in args.lengths:
        runs = {"baseline": [], "kvpress-snapkv": []}
        for rep in range(args.reps):
            ids = make_prompt(length, model.config.vocab_size, seed=rep)
            for label in runs:
                cache = DynamicCache(config=model.config)
                clock = _Clock(lambda: {"kv": cache_bytes(cache)})
                start = time.perf_counter()
                with torch.no_grad():
                    if label == "baseline":
                        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                                             past_key_values=cache, logits_processor=LogitsProcessorList([clock]))
                    else:
                        with press(model):
                            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                                 past_key_values=cache,
                                                 logits_processor=LogitsProcessorList([clock]))
                runs[label].append({
                    "ttft_s": clock.first - start,
                    "decode_tok_s": (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]),
                    "kv_prefill_bytes": clock.after_prefill["kv"],
                    "tokens": out.sequences[0, length:], "first_logits": out.logits[0][0].double(),
                })
                print(f"  L={length} rep={rep} {label}: ttft {runs[label][-1]['ttft_s']:.2f}s", flush=True)
            if rep == 0:  # kept indices of prompt 0, for `compare`
                with torch.no_grad():
                    full = model(input_ids=ids, use_cache=True).past_key_values
                    with press(model):
                        pressed = model(input_ids=ids, use_cache=True).past_key_values
                idx = torch.stack([kept_indices(f.keys, p.keys) for f, p in zip(full.layers, pressed.layers)])
                torch.save({"kept": idx, "tokens": runs["kvpress-snapkv"][0]["tokens"]},
                           Path(args.model_path) / f"kvpress_kept_L{length}.pt")
        base = runs["baseline"]
        for label, rs in runs.items():
            kl, agree, seq = [], [], []
            for r, b in zip(rs, base):
                p, q = torch.log_softmax(b["first_logits"], -1), torch.log_softmax(r["first_logits"], -1)
                kl.append(float((p.exp() * (p - q)).sum()))
                agree.append(float(r["tokens"][0] == b["tokens"][0]))
                seq.append(float((r["tokens"] == b["tokens"]).double().mean()))
            rows.append({
                "engine": f"kvpress {version('kvpress')}",
                "prompt_tokens": length, "method": label,
                "config": json.dumps({"compression_ratio": 1 - args.keep, "window_size": args.window,
                                      "kernel_size": args.kernel}) if label != "baseline" else "{}",
                "reps": args.reps, "new_tokens": args.new_tokens,
                "ttft_s": statistics.median(r["ttft_s"] for r in rs),
                "ttft_speedup": statistics.median(r["ttft_s"] for r in base) / statistics.median(r["ttft_s"] for r in rs),
                "ttft_speedup_paired": statistics.median(b["ttft_s"] / r["ttft_s"] for r, b in zip(rs, base)),
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                "decode_speedup_paired": statistics.median(r["decode_tok_s"] / b["decode_tok_s"] for r, b in zip(rs, base)),
                "decode_speedup": statistics.median(r["decode_tok_s"] for r in rs)
                / statistics.median(r["decode_tok_s"] for r in base),
                "kv_prefill_bytes": rs[0]["kv_prefill_bytes"], "kv_ratio": rs[0]["kv_prefill_bytes"] / base[0]["kv_prefill_bytes"],
                "next_token_agreement": statistics.fmean(agree), "kl": statistics.median(kl),
                "sequence_agreement": statistics.fmean(seq),
                **environment(), "transformers": transformers.__version__,
            })
    for r in rows:
        print(f"{r['prompt_tokens']:>6} {r['method']:<16} TTFT {r['ttft_s']:.2f}s ({r['ttft_speedup']:.2f}x) "
              f"decode {r['decode_tok_s']:.2f} tok/s ({r['decode_speedup']:.2f}x) KV {r['kv_ratio']:.3f} "
              f"seq {r['sequence_agreement']:.2f}")
    write_results(rows, RESULTS / "kvpress_snapkv")


def compare(args) -> None:
    import tokenprune as tp

    model = build_model("medium", args.model_path)
    out = {}
    for length in args.lengths:
        saved = torch.load(Path(args.model_path) / f"kvpress_kept_L{length}.pt")
        theirs = saved["kept"]
        ids = make_prompt(length, model.config.vocab_size, seed=0)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=True).past_key_values
            with tp.patch(model, tp.SnapKV(keep=args.keep, window=args.window, kernel=args.kernel)):
                ours = model(input_ids=ids, use_cache=True).past_key_values
                tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False)[0, length:]
        mine = torch.stack([kept_indices(f.keys, o.keys) for f, o in zip(full.layers, ours.layers)])
        if mine.shape != theirs.shape:
            raise RuntimeError(f"kept shapes differ: ours {tuple(mine.shape)}, kvpress {tuple(theirs.shape)}")
        same = [(torch.isin(m, t).double().mean().item()) for m, t in zip(mine.flatten(0, -2), theirs.flatten(0, -2))]
        out[str(length)] = {"kept_per_head": mine.shape[-1], "overlap_mean": statistics.fmean(same),
                            "overlap_min": min(same), "identical_heads": sum(s == 1.0 for s in same),
                            "heads": len(same),
                            "greedy_continuation_identical": bool(torch.equal(tokens, saved["tokens"])),
                            "continuation_tokens_equal": float((tokens == saved["tokens"]).double().mean())}
        print(length, out[str(length)])
    (RESULTS / "kvpress_snapkv_selection.json").write_text(json.dumps({**out, **environment()}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["run", "compare"])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=5)
    args = parser.parse_args()
    (run_kvpress if args.mode == "run" else compare)(args)


if __name__ == "__main__":
    main()
