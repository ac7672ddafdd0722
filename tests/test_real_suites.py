"""The real-model suites (long-context quality, DraftTree with a real target): tasks, scoring, runners.

Runners are exercised on the tiny random Llama (mechanics: rows, resume, identity to greedy); the
figures themselves need the real weights (``make real-quality``).
"""

import json

import pytest
import torch

from tokenprune.bench.suites import longctx_tasks, real_longctx, real_spec
from tokenprune.bench.suites.longctx_tasks import KINDS, make_samples, score


@pytest.fixture(scope="module")
def tokenizer():
    from tokenprune.fixtures import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny(tiny_llama_path, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval(), tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_samples_are_deterministic_sized_and_hold_the_answer(tokenizer, kind):
    samples = make_samples(tokenizer, kind, 512, 3, seed=1)
    assert samples == make_samples(tokenizer, kind, 512, 3, seed=1)
    assert samples != make_samples(tokenizer, kind, 512, 3, seed=2)
    for s in samples:
        ids = s.prompt_ids(tokenizer)
        assert 512 - 60 <= len(ids) <= 512
        assert s.context.count(s.answer) == 1  # the answer is stated once, and only there
        assert tokenizer.decode(ids).endswith(s.answer_prefix)
    assert len({s.answer for s in samples}) == 3


def test_bad_task_arguments(tokenizer):
    with pytest.raises(ValueError, match="kind must be one of needle"):
        make_samples(tokenizer, "qa", 512, 1)
    with pytest.raises(ValueError, match="length must be an int >= 128"):
        make_samples(tokenizer, "kv", 64, 1)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        make_samples(tokenizer, "kv", 512, 0)
    with pytest.raises(ValueError, match="--samples must look like"):
        real_longctx.parse_samples("1024-8")


def test_exact_match_scoring(tokenizer):
    s = make_samples(tokenizer, "hop2", 256, 1)[0]
    assert score(s, f" Oslo. The postal code of Oslo is {s.answer}.")
    assert not score(s, " Oslo. The postal code of Oslo is 1" + s.answer)
    assert not score(s, f" {s.answer[:-1]}")
    assert not score(s, " I don't know")
    assert score(longctx_tasks.Sample("kv", 256, 0, "", "", "", "12345"), " 12345.\n99")


def test_longctx_runner_rows_summary_and_resume(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    jsonl = tmp_path / "runs.jsonl"
    variants = ("baseline", "snapkv-0.3", "lazyllm-0.3")
    rows = real_longctx.run(model, tok, {256: 2}, kinds=("needle",), variants=variants, jsonl=jsonl, log=lambda *_: None)
    assert len(rows) == 6 and len(jsonl.read_text().splitlines()) == 6
    # Variant order rotates from one sample to the next.
    assert [r["variant"] for r in rows[:3]] != [r["variant"] for r in rows[3:]]
    summary = real_longctx.summarise(rows)
    assert [(r["length"], r["variant"], r["samples"]) for r in summary] == [(256, v, 2) for v in
                                                                           ("baseline", "lazyllm-0.3", "snapkv-0.3")]
    base = summary[0]
    assert base["lost"] == base["gained"] == 0 and base["ttft_ratio_median"] == 1.0
    for row in summary:
        assert row["accuracy"] == sum(r["correct"] for r in rows if r["variant"] == row["variant"]) / 2

    def boom(*args, **kwargs):
        raise AssertionError("ran again")

    monkeypatch.setattr(real_longctx, "_generate", boom)
    again = real_longctx.run(model, tok, {256: 2}, kinds=("needle",), variants=variants, jsonl=jsonl, log=lambda *_: None)
    assert again == [json.loads(line) for line in jsonl.read_text().splitlines()]
    with pytest.raises(ValueError, match="variants must include baseline"):
        real_longctx.run(model, tok, {256: 1}, variants=("snapkv-0.3",))


def test_spec_runner_is_identical_to_greedy(tiny):
    model, tok = tiny
    rows = real_spec.run(model, tok, real_spec.PROMPTS[:1], configs=["draft_tree:ngram", "prompt_lookup"],
                         max_new_tokens=12, repeats=1, log=lambda *_: None)
    assert [r["config"] for r in rows] == ["greedy", "draft_tree:ngram", "prompt_lookup"]
    assert all(r["identical"] for r in rows)
    greedy = rows[0]
    assert greedy["target_forwards"] == greedy["new_tokens"] == 12  # one forward per token (no EOS: random model)
    for r in rows[1:]:
        assert r["new_tokens"] == 12 and 1 <= r["target_forwards"] <= 12
    summary = real_spec.summarise(rows)
    assert [s["config"] for s in summary] == ["greedy", "draft_tree:ngram", "prompt_lookup"]
    with pytest.raises(ValueError, match="configs must come from"):
        real_spec.run(model, tok, real_spec.PROMPTS[:1], configs=["assisted:draft"])


def test_chat_ids_end_with_the_generation_prompt(tokenizer):
    ids = real_spec.chat_ids(tokenizer, real_spec.PROMPTS[0])
    assert ids.shape[0] == 1 and tokenizer.decode(ids[0]).rstrip().endswith("ASSISTANT:")
    assert torch.is_tensor(ids)


def test_kvpress_agreement_pairs_the_same_samples():
    def row(variant, index, output, correct, tokens=100):
        return dict(length=1024, kind="kv", index=index, variant=variant, output=output, correct=correct,
                    prompt_tokens=tokens)

    ours = [row("snapkv-0.3", 0, "1", True), row("snapkv-0.3", 1, "2", False), row("snapkv-0.7", 0, "1", True)]
    theirs = [row("kvpress-snapkv-0.3", 0, "1", True), row("kvpress-snapkv-0.3", 1, "3", True),
              row("kvpress-snapkv-0.3", 2, "9", True), row("baseline", 0, "1", True)]
    (result,) = real_longctx.agreement(ours, theirs)
    assert result == {"tokenprune": "snapkv-0.3", "kvpress": "kvpress-snapkv-0.3", "samples": 2,
                      "same_prompt_tokens": True, "same_answer": 1, "accuracy_tokenprune": 0.5, "accuracy_kvpress": 1.0}
