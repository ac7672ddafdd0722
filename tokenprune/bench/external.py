"""Adapters from the CLI's runner contract to the benchmark suites under ``benchmarks/``.

The suites (``benchmarks/vllm_bench.py``, ``benchmarks/text_bench.py``, ``benchmarks/rag/run.py``,
:mod:`tokenprune.bench.speculative`) are scripts of their own
with their own keyword arguments and row layouts; these adapters call them with the CLI's
:class:`~tokenprune.bench.modes.BenchConfig` and rename their figures to the CLI's columns
(``ttft_ms``, ``ttft_ms_baseline``, ``speedup``, ``ideal_ratio``...), keeping every other column
they report. A suite that is not importable makes the CLI exit 2 with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from tokenprune.bench.modes import BackendUnavailable, BenchConfig, import_benchmark

__all__ = ["run_vllm", "run_text", "run_spec", "run_rag", "run_quality", "plot_quality"]

# CLI preset -> the vLLM suite's preset (its own checkpoints, saved once; shapes in its PRESETS).
VLLM_PRESETS = {"tiny-llava": "tiny", "medium-llava": "medium"}
# CLI preset -> the spec and rag modes' own model sizes (the CLI's default model is tiny-llava).
SIZE_PRESETS = {"tiny-llava": "tiny", "medium-llava": "medium", "tiny": "tiny", "medium": "medium"}
# the rag mode's generator (TTFT): a random Llama with the bi-encoder's tokenizer; "medium" is the
# suite's own (benchmarks/rag/run.py:ttft).
RAG_GENERATORS = {"tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4),
                  "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8)}


def _suite(name: str, attr: str) -> Callable[..., list[dict[str, Any]]]:
    module = import_benchmark(name)
    fn = getattr(module, attr, None)
    if fn is None:
        raise BackendUnavailable(f"{name} has no {attr}")
    return fn


def run_vllm(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """One visual method with an integer keep against the unpruned engine, in vLLM.

    Rows: the baseline and the method, with TTFT (a ``max_tokens=1`` request) and request throughput
    (``throughput_rps``, a batch of ``batch_size`` requests generating ``new_tokens`` each).
    """
    bench = _suite("benchmarks.vllm_bench", "run_vllm_benchmark")
    if len(config.methods) != 1:
        raise ValueError("the vllm engine measures one method per run (e.g. --methods divprune:keep=64)")
    label, method = config.methods[0]
    if method.stage != "visual" or not isinstance(method.keep, int):
        raise ValueError("the vllm engine runs pre-LLM visual methods with an integer keep (e.g. divprune:keep=64)")
    preset = VLLM_PRESETS.get(config.model, config.model)
    raw = bench(presets=[preset], keep=method.keep, method=method.name, trials=config.reps,
                batch=config.batch_size, max_tokens=config.new_tokens, progress=False)
    by_metric = {r["metric"]: r for r in raw}
    ttft, tput = by_metric["ttft_s"], by_metric.get("throughput_rps", {})
    extra = {k: v for k, v in ttft.items() if k not in ("metric", "baseline", "pruned", "speedup", "method", "keep")}
    import torch

    common = {"model": f"vllm:{preset}", "engine": "vllm", "mode": "visual", "random_weights": True,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "float32",
              "batch_size": config.batch_size, "new_tokens": config.new_tokens, "reps": config.reps, "warmup": 1,
              "visual_tokens_before": 576, **extra}
    base_row = {"method": "baseline", "label": "baseline", "keep": None, "params": {}, **common,
                "ttft_ms": ttft["baseline"] * 1e3, "ttft_ms_baseline": ttft["baseline"] * 1e3, "speedup": 1.0,
                "visual_tokens_after": 576, "prompt_tokens": ttft.get("prompt_tokens_baseline"),
                "prompt_tokens_after": ttft.get("prompt_tokens_baseline"), "ideal_ratio": 1.0,
                "throughput_rps": tput.get("baseline")}
    method_row = {"method": method.name, "label": label, "keep": method.keep, "params": method.to_config(), **common,
                  "ttft_ms": ttft["pruned"] * 1e3, "ttft_ms_baseline": ttft["baseline"] * 1e3,
                  "speedup": ttft["speedup"], "visual_tokens_after": method.keep,
                  "prompt_tokens": ttft.get("prompt_tokens_baseline"),
                  "prompt_tokens_after": ttft.get("prompt_tokens_pruned"),
                  "ideal_ratio": ttft.get("ideal_speedup"), "ratio_to_ideal": ttft.get("fraction_of_ideal"),
                  "throughput_rps": tput.get("pruned"), "throughput_speedup": tput.get("speedup")}
    return [base_row, method_row]


def run_text(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """Prompt/KV pruning (LazyLLM, SnapKV) on a Llama decoder, ``--prompt-tokens`` long prompts.

    ``--model``: a suite preset (tiny, small, medium; ``tiny-llava``/``medium-llava`` map to
    tiny/medium), a CLI text preset (``llama-3-8b``, built here
    on the GPU and handed over) or a checkpoint directory.
    """
    bench_module = import_benchmark("benchmarks.text_bench")
    bench = getattr(bench_module, "run_text_benchmark", None)
    if bench is None:
        raise BackendUnavailable("benchmarks.text_bench has no run_text_benchmark")
    suite_presets = getattr(bench_module, "PRESETS", {})
    kwargs: dict[str, Any] = {}
    if config.model in suite_presets:
        kwargs["preset"] = config.model
    elif SIZE_PRESETS.get(config.model) in suite_presets:  # the CLI's default model, tiny-llava
        kwargs["preset"] = SIZE_PRESETS[config.model]
    elif Path(config.model).is_dir():
        kwargs["model_path"] = config.model
    else:
        from tokenprune.bench.presets import get_preset, load_model, resolve_device

        preset = get_preset(config.model)
        if preset.family != "llama":
            raise ValueError(f"text mode needs a text model: {', '.join(suite_presets)}, llama-3-8b or a "
                             f"checkpoint directory; {config.model} is a vision-language preset")
        kwargs["model"] = load_model(config.model, resolve_device(config.device), config.dtype, None,
                                     config.seed).model
    raw = bench(lengths=[config.prompt_tokens] if config.prompt_tokens else None,
                methods=[("baseline", None), *config.methods], reps=config.reps, new_tokens=config.new_tokens,
                progress=False, **kwargs)
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


def _check_config(config: BenchConfig, stage: str, example: str) -> None:
    """Methods of ``stage`` only, and none of the options the spec/rag suites have no use for."""
    wrong = [label for label, m in config.methods if m.stage != stage]
    if wrong:
        raise ValueError(f"{config.mode} mode measures {stage} methods (e.g. --methods {example}), "
                         f"not {', '.join(wrong)}")
    unused = {"--batch-size": config.batch_size != 1, "--prompt-tokens": config.prompt_tokens is not None,
              "--image-size": config.image_size is not None, "--device": config.device not in ("auto", "cpu")}
    given = [flag for flag, set_ in unused.items() if set_]
    if given:
        raise ValueError(f"{config.mode} mode runs one prompt at a time on CPU with the suite's prompts; "
                         f"drop {', '.join(given)}")


def run_spec(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """DraftTree speculative decoding against plain greedy ``generate`` and HF prompt lookup.

    Calls :func:`tokenprune.bench.speculative.run_spec_benchmark` (greedy decoding) with each
    ``draft_tree`` method of ``--methods`` plus transformers' ``prompt_lookup_num_tokens=10``.
    One row per (prompt kind, variant): ``tokens_per_forward`` (tokens generated per target
    forward: accepted drafts + the bonus token), ``forwards_per_token``, ``speedup`` (wall clock
    of the whole ``generate`` call over the interleaved greedy baseline, median of ``--reps``) and
    ``identical`` (greedy output equal to the baseline's).

    ``--model``: ``tiny``/``medium`` (``tiny-llava``/``medium-llava`` map to them), the suite's
    trained Llamas (trained once, a few minutes, cached in ``~/.cache/tokenprune``), or a local
    causal-LM checkpoint with at least 64 tokens (the prompts are ids < 64). ``--samples``:
    prompts per kind (repeat, code, prose; default 2).
    """
    import torch

    from tokenprune.bench.speculative import run_spec_benchmark

    _check_config(config, "speculative", "draft_tree:sources=ngram:budget=4")
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
    n_per_kind = config.extra.get("samples") or 2
    raw = run_spec_benchmark(configs=configs, max_new_tokens=config.new_tokens, n_per_kind=n_per_kind,
                             repeats=config.reps, threads=torch.get_num_threads(), modes=("greedy",),
                             verbose=False, **kwargs)
    methods = dict(config.methods)
    rows = []
    for r in raw:
        label = "baseline" if r["source"] == "none" else r["config"]
        method = methods.get(label)
        if method is not None:
            name, stage, params = method.name, method.stage, method.to_config()
        elif label == "baseline":
            name, stage, params = "baseline", None, {}
        else:
            name, stage, params = "prompt_lookup", "speculative", {"prompt_lookup_num_tokens": 10}
        suite = {k: v for k, v in r.items() if k not in ("mode", "config", "max_new_tokens")}
        rows.append({"method": name, "label": label, "keep": None, "stage": stage, "params": params, **suite,
                     "decoding": r["mode"], "engine": "hf", "mode": "spec", "device": "cpu", "dtype": "float32",
                     "batch_size": 1, "new_tokens": config.new_tokens, "reps": config.reps, "warmup": 1,
                     "prompts_per_kind": n_per_kind, "random_weights": False})
    return rows


def run_rag(config: BenchConfig, track: Callable[..., Iterable]) -> list[dict[str, Any]]:
    """Context pruning (``tp.ContextPruner``) on the synthetic RAG set of ``benchmarks/rag/``.

    For each ``context`` method (scorer, threshold or keep_ratio) and the unpruned baseline, on
    ``--samples`` test questions (default 8, 5 passages each): answer-sentence recall
    (``gold_sentence_recall``; ``answer_recall``), compression (``token_compression``,
    ``char_compression``), pruning latency per passage (``prune_ms_per_passage``, median over
    questions of the best of ``--reps`` interleaved calls), and the TTFT of a random Llama
    generator (``--model tiny``: 2x128, ``medium``: 8x512 as in ``benchmarks/rag/run.py``)
    prompted with all passages vs the pruned ones: ``ttft_ms`` (prefill + first token),
    ``ttft_with_pruning_ms`` and ``speedup``/``speedup_with_pruning`` (medians over ``--reps``
    interleaved rounds of the whole question set, per question).
    """
    import statistics
    import time

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import tokenprune as tp
    from tokenprune.bench.results import Samples, variant_rows
    from tokenprune.bench.timing import interleaved_schedule
    from tokenprune.methods.context.scorers.bi_encoder import default_model_path

    _check_config(config, "context", "context:threshold=0.5")
    size = SIZE_PRESETS.get(config.model)
    if size is None:
        raise ValueError(f"rag mode needs --model tiny or medium (the generator's size), got {config.model!r}")
    suite = import_benchmark("benchmarks.rag.run")
    examples = suite.make_split(1, config.extra.get("samples") or 8)  # seed 1: the suite's test split
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.chat_template = suite.DOC_TEMPLATE
    tok.model_max_length = 4096  # the generator's window, not MiniLM's
    torch.manual_seed(config.seed)
    heads = RAG_GENERATORS[size]["num_attention_heads"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, num_key_value_heads=heads,
                                         max_position_embeddings=4096, pad_token_id=0,
                                         **RAG_GENERATORS[size])).eval()
    variants: list[tuple[str, Any]] = [("baseline", None), *config.methods]
    per_variant: dict[str, dict[str, Any]] = {}
    for label, method in variants:
        if method is None:
            per_variant[label] = {"gold_sentence_recall": 1.0, "answer_recall": 1.0, "token_compression": 0.0,
                                  "char_compression": 0.0, "kept_sentence_fraction": 1.0}
        else:
            per_variant[label] = dict(suite.evaluate(method, examples, tok), scorer=method.scorer,
                                      threshold=method.effective_threshold if method.keep_ratio is None else None,
                                      keep_ratio=method.keep_ratio)

    def prompt(example, method):
        messages = [{"role": "user", "content": example.question}]
        start = time.perf_counter()
        if method is None:
            ids = tok.apply_chat_template(messages, documents=example.passages, add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
        else:
            with tp.patch(tok, method):
                ids = tok.apply_chat_template(messages, documents=example.passages, add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
        ids.pop("token_type_ids", None)  # BERT-style tokenizer output; a Llama takes none
        return ids, time.perf_counter() - start

    samples = Samples()
    prune_s: dict[str, list[list[float]]] = {label: [[] for _ in examples] for label, _ in variants}
    tokens: dict[str, list[int]] = {}
    methods = dict(variants)
    for run in track(interleaved_schedule([label for label, _ in variants], config.reps, config.warmup),
                     description="rag"):
        method = methods[run.variant]
        ttft = pruning = 0.0
        lengths = []
        for i, example in enumerate(examples):
            ids, t_prune = prompt(example, method)
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(**ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            ttft += time.perf_counter() - start
            pruning += t_prune
            lengths.append(ids["input_ids"].shape[1])
            if not run.warmup:
                prune_s[run.variant][i].append(t_prune / len(example.passages))
        tokens[run.variant] = lengths
        if not run.warmup:
            n = len(examples)
            samples.add(run.variant, run.rep, ttft_ms=1e3 * ttft / n, e2e_ms=1e3 * (ttft + pruning) / n)
    for label, _ in variants:
        per_variant[label].update(
            prompt_tokens=round(statistics.median(tokens["baseline"])),
            prompt_tokens_after=round(statistics.median(tokens[label])),
            prune_ms_per_passage=None if methods[label] is None
            else 1e3 * statistics.median(min(t) for t in prune_s[label]))
    rows = variant_rows(samples, variants, per_variant, common={
        "model": f"rag-generator-{size}", "engine": "hf", "mode": "rag", "device": "cpu", "dtype": "float32",
        "random_weights": True, "num_parameters": sum(p.numel() for p in model.parameters()),
        "questions": len(examples), "passages_per_question": len(examples[0].passages), "batch_size": 1,
        "new_tokens": 1, "reps": config.reps, "warmup": config.warmup})
    for row in rows:  # e2e here = pruning + prefill: the TTFT a user of the pruned prompt sees
        row["ttft_with_pruning_ms"] = row.pop("e2e_ms")
        row["speedup_with_pruning"] = row.pop("e2e_speedup", 1.0 if row["method"] == "baseline" else None)
        for key in [k for k in row if k.startswith("e2e_ms")]:
            row.pop(key)
    return rows


def run_quality(model: Optional[str], methods: Optional[list[str]], keeps: Sequence[int], layers: Sequence[int],
                samples: int, seed: int, batch_size: int) -> list[dict[str, Any]]:
    """Answer accuracy on the quality harness (``benchmarks/quality/evaluate.py:evaluate``).

    The harness's trained LLaVA (``model``: its directory, default the shipped one) answers
    ``samples`` test questions unpruned, then with every visual/in-LLM method (``methods``: names,
    default all registered) at each keep (and each FastV-like layer), through ``tp.patch``. The
    random baseline is always included. Rows (unpruned first, ``method`` ``"none"``): ``method``,
    ``label``, ``keep``, ``layer``, ``accuracy``, ``retention`` (accuracy / unpruned accuracy),
    ``agreement`` (answers equal to the unpruned model's), ``acc_<question type>``,
    ``majority_baseline``, ``seconds``.
    """
    suite = import_benchmark("benchmarks.quality.evaluate")
    kwargs: dict[str, Any] = {}
    if model is not None:
        if not Path(model).is_dir():
            raise ValueError(f"--model must be a checkpoint directory of the quality harness, got {model!r}")
        kwargs["model_dir"] = Path(model)
    only = None if methods is None else [*methods, *(["random"] if "random" not in methods else [])]
    rows = suite.evaluate(n=samples, seed=seed, keeps=tuple(keeps), layers=tuple(layers), batch=batch_size,
                          only=only, progress=False, **kwargs)
    name = Path(model).name if model is not None else "quality-harness"
    for row in rows:
        row.update(engine="hf", mode="quality", model=name, random_weights=False, batch_size=batch_size,
                   device="cpu", dtype="float32")
    return rows


def plot_quality(rows: list[dict[str, Any]], path: str) -> None:
    """Retention against keep, one line per method, random and majority-answer baselines (the suite's plot)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    import_benchmark("benchmarks.quality.evaluate").plot(rows, Path(path))
