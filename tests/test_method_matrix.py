"""The method matrix: every registered method goes through the same checks on the target it acts on,
so a method cannot be registered without being exercised (README, "Adding a method").

For each method: a keep-all configuration reproduces the unpatched target exactly (tokens and
scores, or the rendered prompt); a pruning configuration prunes (its statistics say fewer tokens
than before, or for draft trees: drafts were verified and the output is still greedy's) and
removing the patch restores the target. A registered method missing from ``MATRIX`` fails
``test_every_registered_method_is_in_the_matrix``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import tokenprune as tp

transformers = pytest.importorskip("transformers")

from test_context_pruner import KeywordScorer  # noqa: E402


@dataclass
class Case:
    keep_all: Callable[[], Any]
    pruning: Callable[[], Any]
    target: str  # "vlm" (tiny LLaVA), "lm" (tiny Llama) or "tokenizer" (chat template with documents)


MATRIX: dict[str, Case] = {
    "divprune": Case(lambda: tp.DivPrune(keep=1.0, impl="torch"), lambda: tp.DivPrune(keep=4, impl="torch"), "vlm"),
    "random": Case(lambda: tp.RandomPrune(keep=1.0), lambda: tp.RandomPrune(keep=4), "vlm"),
    "grid": Case(lambda: tp.UniformGrid(keep=1.0), lambda: tp.UniformGrid(keep=4), "vlm"),
    "holov": Case(lambda: tp.HoloV(keep=1.0, crops=4), lambda: tp.HoloV(keep=4, crops=4), "vlm"),
    "visionzip": Case(lambda: tp.VisionZip(keep=1.0), lambda: tp.VisionZip(keep=6), "vlm"),
    "flowcut": Case(lambda: tp.FlowCut(keep=1.0), lambda: tp.FlowCut(keep=4), "vlm"),
    "cdpruner": Case(lambda: tp.CDPruner(keep=1.0), lambda: tp.CDPruner(keep=4), "vlm"),
    "fastv": Case(lambda: tp.FastV(keep=1.0, impl="torch"), lambda: tp.FastV(keep=4, impl="torch"), "vlm"),
    "todre": Case(lambda: tp.ToDRE(keep=1.0, threshold=0.0, impl="torch"), lambda: tp.ToDRE(keep=4, impl="torch"), "vlm"),
    "lazyllm": Case(lambda: tp.LazyLLM(schedule=((1, 1.0),)), lambda: tp.LazyLLM(schedule=((1, 0.5),), window=2), "lm"),
    "snapkv": Case(lambda: tp.SnapKV(keep=1.0, window=4), lambda: tp.SnapKV(keep=0.5, window=4), "lm"),
    "knorm": Case(lambda: tp.Knorm(keep=1.0), lambda: tp.Knorm(keep=0.5), "lm"),
    "context": Case(lambda: tp.ContextPruner(scorer=KeywordScorer(), threshold=0.0),
                    lambda: tp.ContextPruner(scorer=KeywordScorer(), threshold=0.5, always_keep_title=False), "tokenizer"),
    "draft_tree": Case(lambda: tp.DraftTree(sources=("ngram",), budget=0),
                       lambda: tp.DraftTree(sources=("ngram",), budget=4), "lm"),
}


def test_every_registered_method_is_in_the_matrix():
    missing = sorted(set(tp.available_methods()) - set(MATRIX))
    assert not missing, f"registered methods without a MATRIX entry (see README 'Adding a method'): {missing}"
    assert sorted(MATRIX) == tp.available_methods()


# ----------------------------------------------------------------------------- targets


@pytest.fixture(scope="module")
def targets(tiny_llava_path, tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from tokenprune.fixtures import make_image

    from test_context_hooks import TEMPLATE

    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in ("what is this", "describe the colours")]
    vlm_inputs = processor(images=[make_image(56, seed=1), make_image(56, seed=2)], text=texts, return_tensors="pt",
                           padding=True)
    ids = torch.randint(5, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    ids[0] = ids[0, :8].repeat(5)  # repeated n-grams: something for draft trees' lookup to propose
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    tokenizer.chat_template = TEMPLATE
    return {
        "vlm": (LlavaForConditionalGeneration.from_pretrained(tiny_llava_path).eval(), dict(vlm_inputs)),
        "lm": (AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval(), {"input_ids": ids, "attention_mask": mask}),
        "tokenizer": (tokenizer, None),
    }


def run(kind: str, target: Any, inputs: Any, scores: bool = True):
    """What the target produces: generated tokens and scores (``scores=False``: tokens only, as draft
    trees return), or the rendered RAG prompt."""
    if kind == "tokenizer":
        from test_context_hooks import DOCS, MESSAGES

        return target.apply_chat_template(MESSAGES, documents=DOCS, tokenize=False, add_generation_prompt=True)
    batch = inputs if scores else {k: v[:1] for k, v in inputs.items()}  # draft trees decode one row
    with torch.no_grad():
        out = target.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=scores,
                              return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores) if scores else None


def same(a, b) -> bool:
    if isinstance(a, str):
        return a == b
    return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_keep_all_reproduces_the_unpatched_target(name, targets):
    case = MATRIX[name]
    target, inputs = targets[case.target]
    scores = name != "draft_tree"  # draft trees return sequences only (lossless: greedy's tokens)
    base = run(case.target, target, inputs, scores)
    with tp.patch(target, case.keep_all()):
        patched = run(case.target, target, inputs, scores)
    assert same(base, patched)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_pruning_prunes_and_removal_restores(name, targets):
    case = MATRIX[name]
    target, inputs = targets[case.target]
    scores = name != "draft_tree"
    base = run(case.target, target, inputs, scores)
    before = dict(target.__dict__)
    handle = tp.patch(target, case.pruning())
    try:
        patched = run(case.target, target, inputs, scores)
    finally:
        handle.remove()
    records = handle.stats.last()
    assert records, f"{name} recorded no statistics"
    if name == "draft_tree":
        assert torch.equal(base[0], patched[0])  # still greedy's output
        assert sum(r.after for r in records) > 0  # drafts were verified
    else:
        assert sum(r.after for r in records) < sum(r.before for r in records), name
        if case.target == "tokenizer":
            assert len(patched) < len(base)
    assert target.__dict__.keys() == before.keys() and all(target.__dict__[k] is before[k] for k in before)
    assert same(run(case.target, target, inputs, scores), base)
