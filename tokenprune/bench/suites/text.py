"""Text-mode benchmark: long-prompt prefill / decoding with LazyLLM and SnapKV against the unpruned
model, in Hugging Face ``generate``.

Every repetition uses a new prompt (seed = repetition) on which every method runs once, in the
rotating order of :func:`tokenprune.bench.timing.interleaved_schedule` (machine noise hits them
alike); a :class:`~tokenprune.bench.timing.TokenClock` times each ``generate`` call and rows are
built by :func:`tokenprune.bench.results.variant_rows`, so the columns are those of every
``tokenprune-bench`` mode:

* ``ttft_ms`` (``generate`` entry to the first token), ``decode_tok_s`` (tokens per second after
  the first), ``e2e_ms`` (the whole call): medians with quartiles; ``speedup``,
  ``decode_speedup``, ``e2e_speedup``: ratios of medians taken in the same run, ``*_paired``: the
  median of the per-repetition ratios (same prompt, back to back: robust to load drift);
* ``kv_prefill_bytes``/``kv_ratio``: KV cache held after prefill, ``aux_bytes``: LazyLLM's aux
  hidden states, ``kv_bytes_end``: KV cache at the end;
* fidelity against the unpruned model on the same prompts: ``next_token_agreement`` (first
  generated token identical), ``kl`` / ``kl_max`` (KL(p_unpruned || p_method) of the first token's
  distribution, nats; median / max) and ``sequence_agreement`` (fraction of the greedy
  continuation identical).

Models are random-weight Llama shapes (no hub access): weights only decide fidelity figures,
which therefore say how much the pruning perturbs *this* model, not task accuracy.

:func:`measure` is the measurement (the kvpress side by side runs it with kvpress's press),
:func:`run_text_benchmark` runs it on a preset, :func:`run` is the ``tokenprune-bench --mode text``
runner, and ``python -m tokenprune.bench.suites.text --preset medium`` writes JSON/CSV under
``benchmarks/results/`` (``--force`` to replace existing files).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch

import tokenprune as tp
from tokenprune.bench.modes import BenchConfig
from tokenprune.bench.results import Samples, variant_rows
from tokenprune.bench.suites.common import SIZE_PRESETS
from tokenprune.bench.timing import TokenClock, interleaved_schedule

#: model shapes (tokenprune.fixtures.tiny_llama_config arguments) and default prompt lengths.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"config": dict(vocab_size=512, hidden_size=128, num_layers=4, num_heads=2, intermediate_size=256,
                            initializer_range=0.3), "lengths": (512,), "new_tokens": 8},
    "small": {"config": dict(vocab_size=32000, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2,
                             intermediate_size=768, initializer_range=0.05), "lengths": (2048, 8192, 16384),
              "new_tokens": 16},
    # ~125M parameters: a Llama shape at GPT-2-small scale with GQA.
    "medium": {"config": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                              intermediate_size=2048, initializer_range=0.05), "lengths": (4096,),
               "new_tokens": 16},
}


def default_methods() -> list[tuple[str, Optional[tp.Pruner]]]:
    """Baseline, LazyLLM at its default schedule (with revival, and prefill-only), SnapKV at about
    the same mean KV budget as that schedule leaves after prefill (0.5 on 8- and 12-layer models)."""
    return [("baseline", None), ("lazyllm", tp.LazyLLM()), ("lazyllm-static", tp.LazyLLM(revive=False)),
            ("snapkv", tp.SnapKV(keep=0.5, window=32, kernel=5))]


def build_model(preset: str, path: Optional[str | os.PathLike] = None, attn: str = "sdpa", seed: int = 0):
    """The preset's random Llama (saved with ``save_pretrained`` under ``path`` when given, so
    other environments, e.g. kvpress's, load the very same weights)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from tokenprune.fixtures import tiny_llama_config

    if path is not None and (Path(path) / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()
    cfg = tiny_llama_config(max_position_embeddings=32768, **PRESETS[preset]["config"])
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = cfg.pad_token_id
    if path is not None:
        model.save_pretrained(path)
    return model


def make_prompt(length: int, vocab: int, seed: int) -> torch.Tensor:
    """Deterministic random prompt ``[1, length]`` (same ids in any environment with the same torch)."""
    return torch.randint(5, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def cache_bytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def patch_method(model: Any, method: Optional[Any]) -> ContextManager[Any]:
    """``tp.patch(model, method)`` (its handle), or nothing for the baseline."""
    return tp.patch(model, method) if method is not None else contextlib.nullcontext()


def run_once(model, ids: torch.Tensor, method: Optional[Any], new_tokens: int,
             apply: Callable[[Any, Optional[Any]], ContextManager[Any]] = patch_method) -> dict[str, Any]:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens with ``apply(model, method)`` entered
    around it; the KV cache (and LazyLLM's aux cache) is read right after the first token, outside
    the timing."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with apply(model, method) as handle:
        def probe() -> dict[str, int]:
            runtime = getattr(handle, "runtime", None)
            aux = getattr(getattr(runtime, "state", None), "aux", {}) or {}
            return {"kv": cache_bytes(cache), "aux": sum(a.hidden.nbytes for a in aux.values())}

        clock = TokenClock(on_first_token=probe)
        with torch.no_grad():
            clock.start()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                 past_key_values=cache, return_dict_in_generate=True, streamer=clock)
    if clock.new_tokens != new_tokens:
        raise RuntimeError(f"generated {clock.new_tokens} tokens instead of {new_tokens}")
    return {
        "ttft_s": clock.ttft_s,
        "decode_tok_s": clock.decode_tokens_per_s(1),
        "total_s": clock.token_times[-1],  # without the probe
        "kv_prefill_bytes": clock.first_token_result["kv"],
        "aux_bytes": clock.first_token_result["aux"],
        "kv_bytes_end": cache_bytes(out.past_key_values),
        "tokens": out.sequences[0, ids.shape[1]:],
        "first_logits": out.logits[0][0].double(),  # raw logits (min_new_tokens masks EOS in scores)
    }


def _fidelity(runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, float]:
    """First-token KL and agreements of ``runs`` against the baseline's runs on the same prompts."""
    kl, agree, seq = [], [], []
    for r, b in zip(runs, base):
        p = torch.log_softmax(b["first_logits"], -1)
        q = torch.log_softmax(r["first_logits"], -1)
        kl.append(float((p.exp() * (p - q)).sum()))
        agree.append(float(r["tokens"][0] == b["tokens"][0]))
        seq.append(float((r["tokens"] == b["tokens"]).double().mean()))
    return {"next_token_agreement": statistics.fmean(agree), "kl": statistics.median(kl), "kl_max": max(kl),
            "sequence_agreement": statistics.fmean(seq)}


def measure(model, variants: Sequence[tuple[str, Optional[Any]]], lengths: Sequence[int], reps: int,
            new_tokens: int, warmup: int = 0, apply: Callable[[Any, Optional[Any]], ContextManager[Any]] = patch_method,
            track: Optional[Callable[..., Iterable]] = None) -> list[dict[str, Any]]:
    """Rows of :func:`~tokenprune.bench.results.variant_rows` for ``variants`` (``[(label, method)]``,
    the unpruned baseline ``(label, None)`` first) on prompts of each of ``lengths`` tokens.

    ``apply(model, method)`` is the context manager a variant runs in (default ``tp.patch``);
    ``track`` wraps the schedule (a progress bar).
    """
    if not variants or variants[0][1] is not None:
        raise ValueError("the first variant must be the unpruned baseline: ('baseline', None)")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decode speed needs two steps), got {new_tokens}")
    track = track or (lambda iterable, description="": iterable)
    device = next(model.parameters()).device
    methods = dict(variants)
    base_label = variants[0][0]
    rows = []
    for length in lengths:
        samples = Samples()
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in variants}
        for item in track(interleaved_schedule(list(methods), reps, warmup), f"{length} tokens"):
            ids = make_prompt(length, model.config.vocab_size, seed=item.rep).to(device)
            r = run_once(model, ids, methods[item.variant], new_tokens, apply)
            if item.warmup:
                continue
            samples.add(item.variant, item.rep, ttft_ms=r["ttft_s"] * 1e3, decode_tok_s=r["decode_tok_s"],
                        e2e_ms=r["total_s"] * 1e3)
            runs[item.variant].append(r)  # in repetition order: the schedule runs repetitions in turn
        base = runs[base_label]
        per_variant = {
            label: {"kv_prefill_bytes": rs[0]["kv_prefill_bytes"],
                    "kv_ratio": rs[0]["kv_prefill_bytes"] / base[0]["kv_prefill_bytes"],
                    "kv_bytes_end": rs[0]["kv_bytes_end"], "aux_bytes": rs[0]["aux_bytes"], **_fidelity(rs, base)}
            for label, rs in runs.items()
        }
        rows += variant_rows(samples, variants, per_variant, common={"prompt_tokens": length})
    return rows


def run_text_benchmark(
    preset: str = "medium",
    lengths: Optional[Sequence[int]] = None,
    methods: Optional[Sequence[tuple[str, Optional[tp.Pruner]]]] = None,
    reps: int = 3,
    new_tokens: Optional[int] = None,
    model_path: Optional[str | os.PathLike] = None,
    model: Any = None,
    warmup: int = 0,
    track: Optional[Callable[..., Iterable]] = None,
) -> list[dict[str, Any]]:
    """Benchmark ``methods`` (``[(label, method or None for the unpruned baseline), ...]``, the
    first entry is the reference; default :func:`default_methods`) on prompts of ``lengths`` tokens
    (default: the preset's) with :func:`measure`. Returns one row per (length, method)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    methods = list(methods) if methods is not None else default_methods()
    lengths = tuple(lengths or PRESETS[preset]["lengths"])
    new_tokens = new_tokens or PRESETS[preset]["new_tokens"]
    model = model if model is not None else build_model(preset, model_path)
    rows = measure(model, methods, lengths, reps, new_tokens, warmup, track=track)
    common = {"model": preset if model_path is None else str(model_path), "engine": "hf", "mode": "text",
              "random_weights": True, "num_parameters": sum(p.numel() for p in model.parameters()),
              "device": str(next(model.parameters()).device), "dtype": str(model.dtype).removeprefix("torch."),
              "batch_size": 1, "new_tokens": new_tokens, "reps": reps, "warmup": warmup}
    return [{**row, **common} for row in rows]


def run(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """``tokenprune-bench --mode text``: prompt/KV pruning (LazyLLM, SnapKV) on a Llama decoder,
    ``--prompt-tokens`` long prompts, through :func:`run_text_benchmark`.

    ``--model``: a suite preset (tiny, small, medium; ``tiny-llava``/``medium-llava`` map to
    tiny/medium), a CLI text preset (``llama-3-8b``, built here
    on the GPU and handed over) or a checkpoint directory.
    """
    kwargs: dict[str, Any] = {}
    if config.model in PRESETS:
        kwargs["preset"] = config.model
    elif SIZE_PRESETS.get(config.model) in PRESETS:  # the CLI's default model, tiny-llava
        kwargs["preset"] = SIZE_PRESETS[config.model]
    elif Path(config.model).is_dir():
        kwargs["model_path"] = config.model
    else:
        from tokenprune.bench.presets import get_preset, load_model, resolve_device

        preset = get_preset(config.model)
        if preset.family != "llama":
            raise ValueError(f"text mode needs a text model: {', '.join(PRESETS)}, llama-3-8b or a "
                             f"checkpoint directory; {config.model} is a vision-language preset")
        kwargs["model"] = load_model(config.model, resolve_device(config.device), config.dtype, None,
                                     config.seed).model
    rows = run_text_benchmark(lengths=[config.prompt_tokens] if config.prompt_tokens else None,
                              methods=[("baseline", None), *config.methods], reps=config.reps,
                              new_tokens=config.new_tokens, warmup=config.warmup, track=track, **kwargs)
    for row in rows:
        row.update(model=kwargs.get("preset", config.model), random_weights="model_path" not in kwargs)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    from tqdm.auto import tqdm

    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0, help="discarded rounds of every method (default 0)")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--model-path", help="save/load the preset model here (shared with the kvpress run)")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/text_<preset>)")
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    out = Path(args.out or Path("benchmarks") / "results" / f"text_{args.preset}")
    # --model-path is read when it holds a saved model, else the model is saved there (an output).
    saves = args.model_path is not None and not (Path(args.model_path) / "config.json").exists()
    report.check_outputs_or_exit(parser, [("--out", out.with_suffix(".json"), "json"),
                                          ("--out", out.with_suffix(".csv"), "csv"),
                                          ("--model-path", args.model_path if saves else None, "directory")],
                                 force=args.force)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_text_benchmark(args.preset, args.lengths, reps=args.reps, new_tokens=args.new_tokens,
                              model_path=args.model_path, warmup=args.warmup,
                              track=lambda it, description="": tqdm(it, desc=description, leave=False))
    for row in rows:  # a saved --model-path is still the preset's random model
        row["model"] = args.preset
    meta = {**report.environment(rows[0]["device"]), "parameters": vars(args)}
    report.print_table(rows, meta, title=f"text suite: {args.preset}")
    report.write_json(out.with_suffix(".json"), meta, rows)
    report.write_csv(out.with_suffix(".csv"), meta, rows)
    print(f"wrote {out.with_suffix('.json')} and .csv")


if __name__ == "__main__":
    main()
