"""Text-mode benchmark: long-prompt prefill / decoding with LazyLLM and SnapKV against the unpruned
model, in Hugging Face ``generate``.

For each prompt length and each repetition, every method runs once on the same prompt
(baseline, LazyLLM, SnapKV interleaved, so machine noise hits them alike); figures are medians over
repetitions and speed-ups are ratios of medians taken in the same run:

* ``ttft_s``: time to the first generated token (``generate`` entry to the first logits);
* ``*_paired``: median over repetitions of the per-repetition ratio (robust to load drift);
* ``decode_tok_s``: generated tokens per second after the first one; ``total_s``: the whole
  ``generate`` call (prefill + ``new_tokens - 1`` decoding steps);
* ``kv_bytes``: KV cache held after prefill (``aux_bytes``: LazyLLM's aux hidden states);
* fidelity against the unpruned model on the same prompts: ``next_token_agreement`` (first
  generated token identical), ``kl`` (KL(p_unpruned || p_method) of the first token's distribution,
  nats) and ``sequence_agreement`` (fraction of the greedy continuation identical).

Models are random-weight Llama shapes (no hub access): weights only decide fidelity figures,
which therefore say how much the pruning perturbs *this* model, not task accuracy.

``run_text_benchmark(...) -> list[dict]`` is the entry point; :func:`run` is the
``tokenprune-bench --mode text`` runner over it, and
``python -m tokenprune.bench.suites.text --preset medium`` writes JSON/CSV under
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

import tokenprune as tp
from tokenprune.bench.modes import BenchConfig
from tokenprune.bench.suites.common import SIZE_PRESETS

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


class _Clock:
    """A logits processor that timestamps every decoding step (it changes nothing) and runs
    ``probe`` once, right after the prefill."""

    def __init__(self, probe):
        self.times: list[float] = []
        self.first = 0.0
        self.probe = probe
        self.after_prefill: dict[str, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        now = time.perf_counter()
        if not self.times:
            self.first = now
            self.after_prefill = self.probe()
            now = time.perf_counter()  # decoding is timed from the end of the probe
        self.times.append(now)
        return scores


def cache_bytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run_once(model, ids: torch.Tensor, method: Optional[tp.Pruner], new_tokens: int) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    handle = tp.patch(model, method) if method is not None else None

    def probe() -> dict[str, int]:
        runtime = getattr(handle, "runtime", None)
        aux = getattr(getattr(runtime, "state", None), "aux", {}) or {}
        return {"kv": cache_bytes(cache), "aux": sum(a.hidden.nbytes for a in aux.values())}

    clock = _Clock(probe)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                 past_key_values=cache, return_dict_in_generate=True,
                                 logits_processor=LogitsProcessorList([clock]))
    finally:
        if handle is not None:
            handle.remove()
    return {
        "ttft_s": clock.first - start,
        "decode_tok_s": (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]),
        "total_s": clock.times[-1] - start - (clock.times[0] - clock.first),  # without the probe
        "kv_prefill_bytes": clock.after_prefill["kv"],
        "aux_bytes": clock.after_prefill["aux"],
        "kv_bytes_end": cache_bytes(out.past_key_values),
        "tokens": out.sequences[0, ids.shape[1]:],
        "first_logits": out.logits[0][0].double(),  # raw logits (min_new_tokens masks EOS in scores)
    }


def environment() -> dict[str, Any]:
    import transformers

    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenprune": tp.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_text_benchmark(
    preset: str = "medium",
    lengths: Optional[Sequence[int]] = None,
    methods: Optional[Sequence[tuple[str, Optional[tp.Pruner]]]] = None,
    reps: int = 3,
    new_tokens: Optional[int] = None,
    model_path: Optional[str | os.PathLike] = None,
    model: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark ``methods`` (``[(label, method or None for the unpruned baseline), ...]``, the
    first entry is the reference) on prompts of ``lengths`` tokens. Each repetition uses a new
    prompt (seed = repetition) and runs every method on it in turn. Returns one row per
    (length, method) with medians, ratios against the first method and fidelity figures."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    methods = list(methods) if methods is not None else default_methods()
    if not methods or methods[0][1] is not None:
        raise ValueError("the first method must be the unpruned baseline: ('baseline', None)")
    lengths = tuple(lengths or PRESETS[preset]["lengths"])
    new_tokens = new_tokens or PRESETS[preset]["new_tokens"]
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decode speed needs two steps), got {new_tokens}")
    model = model if model is not None else build_model(preset, model_path)
    env = environment()
    rows = []
    for length in lengths:
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in methods}
        for rep in range(reps):
            ids = make_prompt(length, model.config.vocab_size, seed=rep)
            for label, method in methods:
                runs[label].append(run_once(model, ids, method, new_tokens))
                if progress:
                    print(f"  L={length} rep={rep} {label}: ttft {runs[label][-1]['ttft_s']:.2f}s", flush=True)
        base = runs[methods[0][0]]
        base_ttft = statistics.median(r["ttft_s"] for r in base)
        base_decode = statistics.median(r["decode_tok_s"] for r in base)
        for label, method in methods:
            rs = runs[label]
            kl, agree, seq = [], [], []
            for r, b in zip(rs, base):
                p = torch.log_softmax(b["first_logits"], -1)
                q = torch.log_softmax(r["first_logits"], -1)
                kl.append(float((p.exp() * (p - q)).sum()))
                agree.append(float(r["tokens"][0] == b["tokens"][0]))
                seq.append(float((r["tokens"] == b["tokens"]).double().mean()))
            ttft = statistics.median(r["ttft_s"] for r in rs)
            decode = statistics.median(r["decode_tok_s"] for r in rs)
            total = statistics.median(r["total_s"] for r in rs)
            rows.append({
                "preset": preset, "prompt_tokens": length, "method": label,
                "config": json.dumps(method.to_config()) if method is not None else "{}",
                "reps": reps, "new_tokens": new_tokens,
                "ttft_s": ttft, "ttft_speedup": base_ttft / ttft,
                # per-repetition ratios (same prompt, back to back) are robust to load drifting
                # between repetitions on a shared machine
                "ttft_speedup_paired": statistics.median(b["ttft_s"] / r["ttft_s"] for r, b in zip(rs, base)),
                "decode_tok_s": decode, "decode_speedup": decode / base_decode,
                "total_s": total, "total_speedup": statistics.median(r["total_s"] for r in base) / total,
                "decode_speedup_paired": statistics.median(r["decode_tok_s"] / b["decode_tok_s"] for r, b in zip(rs, base)),
                "kv_prefill_bytes": rs[0]["kv_prefill_bytes"],
                "kv_ratio": rs[0]["kv_prefill_bytes"] / base[0]["kv_prefill_bytes"],
                "kv_bytes_end": rs[0]["kv_bytes_end"], "aux_bytes": rs[0]["aux_bytes"],
                "next_token_agreement": statistics.fmean(agree), "kl": statistics.median(kl),
                "kl_max": max(kl), "sequence_agreement": statistics.fmean(seq),
                **env,
            })
    return rows


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
    raw = run_text_benchmark(lengths=[config.prompt_tokens] if config.prompt_tokens else None,
                             methods=[("baseline", None), *config.methods], reps=config.reps,
                             new_tokens=config.new_tokens, progress=False, **kwargs)
    methods = dict([("baseline", None), *config.methods])
    rows = []
    for r in raw:
        method = methods.get(r["method"])
        params = method.to_config() if method is not None else json.loads(r.get("config") or "{}")
        rows.append({**r, "label": r["method"], "method": method.name if method is not None else "baseline",
                     "keep": getattr(method, "keep", None), "params": params,
                     "model": kwargs.get("preset", config.model), "random_weights": "model_path" not in kwargs,
                     "warmup": 0,  # the suite times every run it makes
                     "engine": "hf", "mode": "text", "ttft_ms": r["ttft_s"] * 1e3,
                     "ttft_ms_baseline": r["ttft_s"] * r["ttft_speedup"] * 1e3, "speedup": r["ttft_speedup"],
                     "batch_size": 1})
    return rows


def write_results(rows: list[dict[str, Any]], stem: str | os.PathLike) -> None:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'L':>6} {'method':<15} {'TTFT s':>8} {'TTFT x':>7} {'dec tok/s':>9} {'dec x':>6} {'total x':>7} {'KV ratio':>8} " \
           f"{'agree':>6} {'KL':>8} {'seq':>5}"
    print(head)
    for r in rows:
        print(f"{r['prompt_tokens']:>6} {r['method']:<15} {r['ttft_s']:>8.2f} {r['ttft_speedup']:>7.2f} "
              f"{r['decode_tok_s']:>9.2f} {r['decode_speedup']:>6.2f} {r['total_speedup']:>7.2f} {r['kv_ratio']:>8.3f} "
              f"{r['next_token_agreement']:>6.2f} {r['kl']:>8.4f} {r['sequence_agreement']:>5.2f}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--model-path", help="save/load the preset model here (shared with the kvpress run)")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/text_<preset>)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_text_benchmark(args.preset, args.lengths, reps=args.reps, new_tokens=args.new_tokens,
                              model_path=args.model_path)
    print_table(rows)
    out = args.out or Path("benchmarks") / "results" / f"text_{args.preset}"
    write_results(rows, out)
    print(f"wrote {Path(out).with_suffix('.json')} and .csv")


if __name__ == "__main__":
    main()
