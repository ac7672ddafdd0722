"""Benchmark of DraftTree speculative decoding against plain greedy decoding and HF prompt lookup.

No pretrained language model can be downloaded here, and a random model neither copies nor
continues text, so the benchmark trains a small Llama once (seeded, a few minutes on two CPU cores,
cached; and a smaller one as the draft model) on a synthetic corpus with the two regimes speculative decoding cares about:

* *repetitive / code-like*: a random motif repeated (the model must copy from its context,
  which needs induction heads), optionally with a few edited tokens;
* *prose*: samples of a sparse random Markov chain (each token has three likely successors), so
  the next token is predictable only from local statistics.

For each decoding mode (greedy, sampling), prompt kind, source and budget it reports the target
forwards per generated token, the tokens per target forward, the wall-clock time of the whole
``generate`` call (``e2e_ms``) and its speedup over plain ``model.generate`` (``e2e_speedup``, and
``e2e_speedup_paired``: the median of per-run ratios; baseline and methods interleaved by
:func:`tokenprune.bench.timing.interleaved_schedule`, rows from
:func:`tokenprune.bench.results.variant_rows`) and whether the output was identical.
Transformers' own prompt-lookup decoding (``prompt_lookup_num_tokens``) runs on the same prompts.

:func:`run` is the ``tokenprune-bench --mode spec`` runner; the full study (both decoding modes,
every configuration of :data:`DEFAULT_CONFIGS`) writes a CSV::

    python -m tokenprune.bench.suites.spec [--out benchmarks/results/spec_tree_cpu.csv] [--tokens 64] [--repeats 3] \\
        [--force]
    python -m tokenprune.bench.suites.spec --preset medium --out benchmarks/results/spec_tree_cpu_medium.csv --force
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from tokenprune.bench.modes import BenchConfig
from tokenprune.bench.results import Samples, variant_rows
from tokenprune.bench.suites.common import SIZE_PRESETS, check_config
from tokenprune.bench.timing import Stopwatch, interleaved_schedule

__all__ = ["run", "run_spec_benchmark", "train_copy_lm", "make_prompts", "DEFAULT_CONFIGS", "PRESETS"]

VOCAB = 64
SEQ = 96
# marker in a config: the benchmark's own draft model (same recipe, hidden 32, 1000 steps)
BENCH_DRAFT = "<bench-draft>"
DRAFT_RECIPE = dict(steps=1000, hidden=32, layers=2)
# target model recipes: "medium" makes the forward costlier than the decoding loop's Python
PRESETS = {"tiny": dict(steps=1500, hidden=64, layers=2), "medium": dict(steps=1500, hidden=128, layers=4)}

# (label, DraftTree kwargs or a special marker)
DEFAULT_CONFIGS: list[tuple[str, Any]] = [
    ("hf-prompt-lookup-10", "prompt_lookup"),
    ("ngram-b4", dict(sources=("ngram",), budget=4)),
    ("ngram-b16", dict(sources=("ngram",), budget=16)),
    ("ngram-auto", dict(sources=("ngram",), budget="auto")),
    ("recycling-b16", dict(sources=("recycling",), budget=16)),
    ("recycling-auto", dict(sources=("recycling",), budget="auto")),
    ("ngram+recycling-b16", dict(sources=("ngram", "recycling"), budget=16)),
    ("ngram+recycling-auto", dict(sources=("ngram", "recycling"), budget="auto")),
    ("retrieval+ngram-auto", dict(sources=("retrieval", "ngram"), budget="auto")),
    ("draft-b16", dict(sources=("draft_model",), budget=16, draft_model=BENCH_DRAFT)),
    ("ngram+draft-auto", dict(sources=("ngram", "draft_model"), budget="auto", draft_model=BENCH_DRAFT)),
]


def _markov(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(VOCAB, generator=g)[:3] for _ in range(VOCAB)])  # [V, 3] successors


def _sample(kind: str, length: int, g: torch.Generator, successors: torch.Tensor) -> torch.Tensor:
    if kind == "prose":
        out = [int(torch.randint(0, VOCAB, (1,), generator=g))]
        probs = torch.tensor([0.6, 0.3, 0.1])
        while len(out) < length:
            out.append(int(successors[out[-1], torch.multinomial(probs, 1, generator=g)]))
        return torch.tensor(out)
    k = int(torch.randint(6, 17, (1,), generator=g))
    seq = torch.randint(0, VOCAB, (k,), generator=g).repeat(length // k + 2)[:length].clone()
    if kind == "code":  # edited copies: a few tokens differ between repetitions
        for pos in torch.randint(k, length, (max(1, length // 24),), generator=g).tolist():
            seq[pos] = int(torch.randint(0, VOCAB, (1,), generator=g))
    return seq


def train_copy_lm(cache_dir: str | os.PathLike, steps: int = 1500, seed: int = 0, hidden: int = 64,
                  layers: int = 2, verbose: bool = True):
    """Train (or load from ``cache_dir``) the benchmark's small Llama; returns it in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = dict(vocab=VOCAB, seq=SEQ, steps=steps, seed=seed, hidden=hidden, layers=layers, v=1)
    tag = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cache_dir) / f"spec_copy_lm_{tag}"
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    successors = _markov(seed)
    kinds = ("repeat", "code", "prose", "prose")
    for step in range(steps):
        batch = torch.stack([_sample(kinds[i % len(kinds)], SEQ, g, successors) for i in range(32)])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if verbose and step % 250 == 0:
            print(f"train step {step} loss {loss.item():.3f}", flush=True)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return model.eval()


def make_prompts(n_per_kind: int = 4, length: int = 40, seed: int = 123) -> dict[str, list[torch.Tensor]]:
    """Prompts ``[1, length]`` per kind, from the training distribution (new seeds)."""
    g = torch.Generator().manual_seed(seed)
    successors = _markov(0)
    return {kind: [_sample(kind, length, g, successors)[None] for _ in range(n_per_kind)]
            for kind in ("repeat", "code", "prose")}


def _count_forwards(model) -> tuple[list[int], Any]:
    counter = [0]
    handle = model.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter, handle


@dataclass(frozen=True)
class Variant:
    """What a row measured, as :func:`~tokenprune.bench.results.variant_rows` names it: a DraftTree
    configuration or transformers' prompt lookup (``config`` is the row's ``params``)."""

    name: str
    config: dict = field(default_factory=dict)
    stage: str = "speculative"
    keep = None

    def to_config(self) -> dict[str, Any]:
        return {"method": self.name, **self.config}


def run_spec_benchmark(model=None, *, configs: Optional[Sequence[tuple[str, Any]]] = None, max_new_tokens: int = 64,
                       n_per_kind: int = 3, repeats: int = 3, cache_dir: Optional[str] = None, threads: int = 1,
                       modes: Sequence[str] = ("greedy", "sample"), preset: str = "tiny",
                       verbose: bool = True, track: Optional[Callable[..., Iterable]] = None) -> list[dict]:
    """Run the benchmark; one row per (decoding mode, prompt kind, variant), the greedy baseline first.

    Args:
        model: an HF causal LM (default: the trained benchmark Llama of ``preset``, cached in ``cache_dir``).
        configs: ``(label, DraftTree kwargs | "prompt_lookup")`` pairs (default :data:`DEFAULT_CONFIGS`).
        max_new_tokens: tokens generated per prompt.
        n_per_kind: prompts per kind (repeat, code, prose).
        repeats: timed repetitions per prompt (every variant once per repetition, rotating order).
        threads: torch intra-op threads while timing (1 on a shared machine).
        preset: ``"tiny"`` (64 wide, 2 layers) or ``"medium"`` (128 wide, 4 layers) trained target.
        modes: ``"greedy"`` (output must be identical) and/or ``"sample"`` (the generation config's
            default sampling; same seeds for every configuration).
        verbose: training progress of the cached models.
        track: wraps each schedule (a progress bar).

    Returns:
        :func:`~tokenprune.bench.results.variant_rows` rows (``e2e_ms``, ``e2e_speedup``...) with
        ``decoding``, ``prompt_kind``, ``source``, ``budget``, ``forwards_per_token``,
        ``tokens_per_forward`` (first repetition of every prompt) and ``identical`` (greedy output
        equal to the baseline's; None when sampling).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    for mode in modes:
        if mode not in ("greedy", "sample"):
            raise ValueError(f"modes must be among 'greedy', 'sample', got {mode!r}")
    import tokenprune as tp
    from tokenprune.integrations.hf.speculative import tree_generate

    track = track or (lambda iterable, description="": iterable)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    hook = None
    try:
        if model is None:
            model = train_copy_lm(cache_dir or os.path.expanduser("~/.cache/tokenprune"), verbose=verbose,
                                  **PRESETS[preset])
        configs = list(DEFAULT_CONFIGS if configs is None else configs)
        draft = None
        if any(isinstance(c, dict) and c.get("draft_model") == BENCH_DRAFT for _, c in configs):
            draft = train_copy_lm(cache_dir or os.path.expanduser("~/.cache/tokenprune"), verbose=verbose,
                                  **DRAFT_RECIPE)
        prompts = make_prompts(n_per_kind)
        corpus = {kind: [p[0].tolist() for p in make_prompts(n_per_kind, length=SEQ, seed=999)[kind]]
                  for kind in prompts}
        counter, hook = _count_forwards(model)
        variants: list[tuple[str, Optional[Variant]]] = [("baseline", None)]
        for label, cfg in configs:
            variants.append((label, Variant("prompt_lookup", {"prompt_lookup_num_tokens": 10})
                             if cfg == "prompt_lookup" else Variant("draft_tree", dict(cfg))))
        common = dict(engine="hf", mode="spec", device="cpu", dtype=str(model.dtype).removeprefix("torch."),
                      model=f"llama h{model.config.hidden_size} l{model.config.num_hidden_layers} "
                            f"v{model.config.vocab_size}",
                      random_weights=False, batch_size=1, new_tokens=max_new_tokens, reps=repeats, warmup=1,
                      prompts_per_kind=n_per_kind, threads=threads)

        rows = []
        for mode in modes:
            sample = mode == "sample"
            for kind, kind_prompts in prompts.items():
                generate_kwargs: dict[str, dict[str, Any]] = {"baseline": {}}
                for label, cfg in configs:
                    if cfg == "prompt_lookup":
                        generate_kwargs[label] = dict(prompt_lookup_num_tokens=10)
                        continue
                    cfg = dict(cfg)
                    if "retrieval" in cfg.get("sources", ()):
                        cfg["corpus"] = tuple(corpus[kind])
                    if cfg.get("draft_model") == BENCH_DRAFT:
                        cfg["draft_model"] = draft
                    generate_kwargs[label] = dict(custom_generate=tree_generate, draft_tree=tp.DraftTree(**cfg))
                samples = Samples()
                first = {label: dict(forwards=0, new=0, exact=True) for label in generate_kwargs}
                for i, ids in enumerate(kind_prompts):
                    def run_generate(extra: dict, seed: int = 0, ids=ids) -> torch.Tensor:
                        torch.manual_seed(seed)  # sampling: same seeds for every configuration
                        return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample, **extra)

                    ref = run_generate({})  # the reference output; also the baseline's warm-up
                    for extra in generate_kwargs.values():  # warm-up: latency model, recycling table
                        if "draft_tree" in extra:
                            model.generate(ids, max_new_tokens=8, do_sample=False, **extra)
                    for item in track(interleaved_schedule(list(generate_kwargs), repeats, 0), f"{mode} {kind}"):
                        counter[0] = 0
                        with Stopwatch() as watch:
                            out = run_generate(generate_kwargs[item.variant], item.rep)
                        samples.add(item.variant, i * repeats + item.rep, e2e_ms=watch.wall_s * 1e3)
                        if item.rep == 0:
                            f = first[item.variant]
                            f["forwards"] += counter[0]
                            f["new"] += out.shape[1] - ids.shape[1]
                            f["exact"] &= torch.equal(out, ref)
                per_variant = {}
                for label, cfg in [("baseline", None), *configs]:
                    f = first[label]
                    per_variant[label] = dict(
                        source="none" if cfg is None else "prompt_lookup(hf)" if cfg == "prompt_lookup"
                        else "+".join(cfg["sources"]),
                        budget=None if cfg is None else 10 if cfg == "prompt_lookup" else cfg["budget"],
                        forwards_per_token=f["forwards"] / f["new"], tokens_per_forward=f["new"] / f["forwards"],
                        # sampled outputs differ draw by draw (same law); exactness is a greedy property
                        identical=None if sample else f["exact"])
                rows += variant_rows(samples, variants, per_variant, dict(common, decoding=mode, prompt_kind=kind))
        return rows
    finally:
        if hook is not None:
            hook.remove()
        torch.set_num_threads(previous_threads)


def run(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """``tokenprune-bench --mode spec``: DraftTree speculative decoding against plain greedy
    ``generate`` and HF prompt lookup.

    Calls :func:`run_spec_benchmark` (greedy decoding) with each ``draft_tree`` method of
    ``--methods`` plus transformers' ``prompt_lookup_num_tokens=10``.
    One row per (prompt kind, variant): ``tokens_per_forward`` (tokens generated per target
    forward: accepted drafts + the bonus token), ``forwards_per_token``, ``e2e_speedup`` (wall clock
    of the whole ``generate`` call against the interleaved greedy baseline; medians over
    ``--samples`` prompts x ``--reps``) and ``identical`` (greedy output equal to the baseline's).

    ``--model``: ``tiny``/``medium`` (``tiny-llava``/``medium-llava`` map to them), the suite's
    trained Llamas (trained once, a few minutes, cached in ``~/.cache/tokenprune``), or a local
    causal-LM checkpoint with at least 64 tokens (the prompts are ids < 64). ``--samples``:
    prompts per kind (repeat, code, prose; default 2).
    """
    check_config(config, "speculative", "draft_tree:sources=ngram:budget=4")
    kwargs: dict[str, Any] = {}
    if config.model in SIZE_PRESETS:
        kwargs["preset"] = SIZE_PRESETS[config.model]
    elif Path(config.model).is_dir():
        from transformers import AutoModelForCausalLM

        kwargs["model"] = AutoModelForCausalLM.from_pretrained(config.model).eval()
    else:
        raise ValueError(f"spec mode needs --model tiny, medium or a causal-LM checkpoint directory, "
                         f"got {config.model!r}")
    configs: list[tuple[str, Any]] = [("hf-prompt-lookup-10", "prompt_lookup")]
    for label, method in config.methods:
        cfg = method.to_config()
        cfg.pop("method")
        configs.append((label, cfg))
    return run_spec_benchmark(configs=configs, max_new_tokens=config.new_tokens,
                              n_per_kind=config.extra.get("samples") or 2, repeats=config.reps,
                              threads=torch.get_num_threads(), modes=("greedy",), verbose=False, track=track,
                              **kwargs)


def markdown(rows: list) -> str:
    """Pivot table: one line per variant, 'tokens per forward / speedup' per decoding mode and prompt kind."""
    columns = sorted({(r["decoding"], r["prompt_kind"]) for r in rows}, key=lambda c: (c[0] != "greedy", c[1]))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["decoding"], r["prompt_kind"]): r for r in rows}
    lines = ["| config | " + " | ".join(f"{m} {k}" for m, k in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for label in labels:
        values = []
        for m, k in columns:
            r = cell.get((label, m, k))
            values.append("" if r is None else f"{r['tokens_per_forward']:.2f} / {r['e2e_speedup']:.2f}x")
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/spec_tree_cpu.csv", help="CSV of the rows")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens per prompt")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per kind")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "medium"], help="trained target model size")
    parser.add_argument("--configs", default=None, help="comma-separated config labels (default: all)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenprune"))
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    report.check_outputs_or_exit(parser, [("--out", args.out, "csv"), ("--json", args.json, "json")], force=args.force)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configs = None
    if args.configs:
        wanted = args.configs.split(",")
        configs = [c for c in DEFAULT_CONFIGS if c[0] in wanted]
        if len(configs) != len(wanted):
            parser.error(f"--configs must be among {[c[0] for c in DEFAULT_CONFIGS]}")
    rows = run_spec_benchmark(max_new_tokens=args.tokens, n_per_kind=args.prompts, repeats=args.repeats,
                              cache_dir=args.cache_dir, threads=args.threads, preset=args.preset, configs=configs)
    meta = {**report.environment("cpu"), "parameters": vars(args)}
    report.write_csv(args.out, meta, rows)
    if args.json:
        report.write_json(args.json, meta, rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
