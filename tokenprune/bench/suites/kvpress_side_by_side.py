"""Side by side with kvpress's SnapKV (NVIDIA/kvpress ``SnapKVPress``) on the same model and prompts.

kvpress needs transformers < 5.3, so it runs in its own environment (see docs/text_pruning.md),
from the root of a checkout (``-m`` puts the working directory on the path):

    # 1. in the kvpress venv: baseline vs kvpress SnapKV, interleaved; kept indices of prompt 0
    /tmp/kvpress_venv/bin/python -m tokenprune.bench.suites.kvpress_side_by_side run --model-path /tmp/tp_medium --force
    # 2. in the tokenprune env: our SnapKV's selection on prompt 0 against kvpress's
    python -m tokenprune.bench.suites.kvpress_side_by_side compare --model-path /tmp/tp_medium --force

The model is the text suite's preset saved with ``save_pretrained``
(``python -m tokenprune.bench.suites.text --model-path``); prompts come from the same seeded
generator, so both environments see the very same weights and token ids. The ``run`` step measures with :func:`tokenprune.bench.suites.text.measure`
(the press entered where ``tp.patch`` would be), so its rows have the text suite's columns and go
through the same writer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from tokenprune.bench.suites.text import build_model, make_prompt, measure

RESULTS = Path(os.environ.get("TOKENPRUNE_RESULTS", Path("benchmarks") / "results"))


@dataclass(frozen=True)
class KvpressSnapKV:
    """kvpress's ``SnapKVPress`` as a variant of the text suite's rows (``name``/``stage``/``to_config``)."""

    keep: float
    window: int
    kernel: int
    name = "kvpress-snapkv"
    stage = "text"

    def press(self) -> Any:
        from kvpress import SnapKVPress

        return SnapKVPress(compression_ratio=1 - self.keep, window_size=self.window, kernel_size=self.kernel)

    def to_config(self) -> dict[str, Any]:
        return {"method": self.name, "compression_ratio": 1 - self.keep, "window_size": self.window,
                "kernel_size": self.kernel}


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
    from transformers import AutoModelForCausalLM

    from tokenprune.bench import report

    model = AutoModelForCausalLM.from_pretrained(args.model_path, attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    variant = KvpressSnapKV(args.keep, args.window, args.kernel)
    press = variant.press()
    rows = measure(model, [("baseline", None), ("kvpress-snapkv", variant)], args.lengths, args.reps, args.new_tokens,
                   apply=lambda m, v: press(m) if v is not None else contextlib.nullcontext())
    for length in args.lengths:  # kept indices of prompt 0, for `compare`
        ids = make_prompt(length, model.config.vocab_size, seed=0)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=True).past_key_values
            with press(model):
                pressed = model(input_ids=ids, use_cache=True).past_key_values
                tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False)[0, length:]
        idx = torch.stack([kept_indices(f.keys, p.keys) for f, p in zip(full.layers, pressed.layers)])
        torch.save({"kept": idx, "tokens": tokens}, Path(args.model_path) / f"kvpress_kept_L{length}.pt")
    engine = f"kvpress {version('kvpress')}"
    for row in rows:
        row.update(engine=engine, mode="text", model=str(args.model_path), random_weights=True, batch_size=1,
                   new_tokens=args.new_tokens, reps=args.reps, warmup=0)
    meta = {**report.environment("cpu"), "kvpress": version("kvpress"), "transformers": transformers.__version__,
            "parameters": vars(args)}
    report.print_table(rows, meta, title=engine)
    report.write_json(Path(args.results_dir) / "kvpress_snapkv.json", meta, rows)
    report.write_csv(Path(args.results_dir) / "kvpress_snapkv.csv", meta, rows)


def compare(args) -> None:
    import tokenprune as tp
    from tokenprune.bench import report

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
    report.write_text(Path(args.results_dir) / "kvpress_snapkv_selection.json",
                      json.dumps({**out, **report.environment("cpu")}, indent=2))


def outputs(args) -> tuple[list[tuple[str, Path, str]], list[Path]]:
    """``(outputs, inputs)`` of a step, for :func:`tokenprune.bench.report.check_outputs`."""
    results, model = Path(args.results_dir), Path(args.model_path)
    kept = [model / f"kvpress_kept_L{length}.pt" for length in args.lengths]
    if args.mode == "run":
        return ([("--results-dir", results / "kvpress_snapkv.json", "json"),
                 ("--results-dir", results / "kvpress_snapkv.csv", "csv")]
                + [("--model-path", path, "file") for path in kept]), []
    return [("--results-dir", results / "kvpress_snapkv_selection.json", "json")], kept


def main(argv: list[str] | None = None) -> None:
    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["run", "compare"])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--results-dir", default=str(RESULTS),
                        help="where the JSON/CSV go (default: $TOKENPRUNE_RESULTS or benchmarks/results)")
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    written, read = outputs(args)
    report.check_outputs_or_exit(parser, written, inputs=read, force=args.force)
    (run_kvpress if args.mode == "run" else compare)(args)


if __name__ == "__main__":
    main()
