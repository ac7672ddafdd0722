"""RAG end to end with a real generator (tokenprune.bench.suites.rag.qa and .answers): answer scoring, intervals,
the ChatML documents template with the pruning hook; the SmolLM2 run itself is marked ``real``."""

import math
import os

import pytest

import tokenprune as tp
from tokenprune.bench.suites.rag import answers
from tokenprune.bench.suites.rag.dataset import make_split

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("output, answer, ok", [
    ("Kyoto University.", "the University of Kyoto", True),
    ("At the University of Kyoto.\nMore text", "the University of Kyoto", True),
    ("Felix Silva", "John Silva", False),
    ("about 14,570 staff", "14,570", True),
    ("14,5", "14,570", False),
    ("The answer is 13", "13 October 1946", False),
    ("Lyon\nthe University of Kyoto", "the University of Kyoto", False),  # only the first line counts
    ("", "Cork", False),
])
def test_is_correct(output, answer, ok):
    assert answers.is_correct(output, answer) is ok


def test_an_answer_naming_another_candidate_is_wrong():
    others = ["the University of Tampere", "the University of Oslo"]
    assert answers.is_correct("the University of Lima", "the University of Lima", others)
    assert not answers.is_correct("Tampere, then the University of Lima", "the University of Lima", others)
    # an other value inside the answer's own words cannot be told apart: ignored
    assert answers.is_correct("New York City", "New York City", ["York"])


def test_answer_study_rows(chatml_tokenizer, monkeypatch):
    """The study's rows from scripted answers (no model): a reader that answers exactly when the
    answer sentence is in its prompt, and otherwise names a distractor's value."""
    from tokenprune.bench.suites.rag import qa

    examples = make_split(1, 6)[2:]
    by_question = {e.question: e for e in examples}

    def scripted(model, tokenizer, ids):
        text = tokenizer.decode(ids["input_ids"][0]).lower()
        e = next(e for q, e in by_question.items() if q.lower() in text)
        gold = e.passages[e.gold_passage]["text"].lower()
        return e.answer if e.answer.lower() in text and e.answer.lower() in gold else \
            next((v for v in e.candidates if v != e.answer), "no idea")

    monkeypatch.setattr(qa, "generate_answer", scripted)
    rows, outputs = qa.answer_study(None, chatml_tokenizer, examples, [0.3])
    by = {r["context"] if r["context"] != "pruned" else r["label"]: r for r in rows}
    assert by["none"]["accuracy"] == 0.0
    assert by["none"]["distractor_answers"] == sum(len(e.candidates) > 1 for e in examples) > 0
    assert by["full"]["accuracy"] == by["oracle"]["accuracy"] == 1.0 and by["full"]["accuracy_2se"] == 0.0
    assert by["none"]["accuracy_minus_full"] == -1.0 and by["oracle"]["accuracy_minus_full"] == 0.0
    assert by["oracle"]["prompt_tokens_median"] < by["full"]["prompt_tokens_median"]
    pruned = [r for r in rows if r["context"] == "pruned"]
    assert [r["threshold"] for r in pruned] == [tp.ContextPruner().effective_threshold, 0.3]
    for r in pruned:  # the default keeps every answer sentence here, so the reader still answers
        assert r["answer_recall"] == 1.0 and r["accuracy"] == 1.0
        assert r["prompt_tokens_median"] < by["full"]["prompt_tokens_median"]
    chance = by["chance"]
    assert chance["accuracy"] == pytest.approx(sum(1 / len(e.candidates) for e in examples) / len(examples))
    assert len(outputs) == len(examples) * (len(rows) - 1)


def test_accuracy_and_paired_difference():
    acc = answers.accuracy([True, False, True, True])
    assert (acc.correct, acc.n, acc.value) == (3, 4, 0.75)
    assert acc.two_se == pytest.approx(2 * math.sqrt(0.75 * 0.25 / 4))
    d, se2 = answers.paired_difference([True, True, False, True], [True, False, False, False])
    assert d == 0.5 and se2 == pytest.approx(2 * 0.5773502691896258 / 2)
    assert answers.paired_difference([True, False], [True, False]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        answers.accuracy([])
    with pytest.raises(ValueError):
        answers.paired_difference([True], [True, False])


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from transformers import AutoTokenizer

    from tokenprune.methods.context.scorers.bi_encoder import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())  # any tokenizer renders the template
    tok.chat_template = answers.CHATML_DOC_TEMPLATE
    return tok


def test_template_puts_documents_in_the_last_user_message(chatml_tokenizer):
    e = make_split(1, 1)[0]
    text = chatml_tokenizer.apply_chat_template(answers.messages_for(e.question), documents=e.passages[:2],
                                                add_generation_prompt=True, tokenize=False)
    example, last = text.split("<|im_start|>assistant\nGraz<|im_end|>\n")
    assert example.startswith(f"<|im_start|>system\n{answers.SYSTEM}<|im_end|>\n<|im_start|>user\n# Zorvik Labs\n")
    assert last == ("<|im_start|>user\n" + "".join(f"# {p['title']}\n{p['text']}\n\n" for p in e.passages[:2])
                    + f"Question: {e.question}<|im_end|>\n<|im_start|>assistant\n")
    bare = chatml_tokenizer.apply_chat_template(answers.messages_for(e.question), add_generation_prompt=True,
                                                tokenize=False)
    assert bare.endswith(f"<|im_start|>user\nQuestion: {e.question}<|im_end|>\n<|im_start|>assistant\n")
    assert "Zorvik Labs was founded" in bare  # the worked example keeps its own documents


def test_render_prunes_through_the_hook(chatml_tokenizer):
    e = make_split(1, 1)[0]
    messages = answers.messages_for(e.question)
    full = answers.render(chatml_tokenizer, messages, e.passages)
    keep_all = answers.render(chatml_tokenizer, messages, e.passages, tp.ContextPruner(threshold=0.0))
    assert full["input_ids"].tolist() == keep_all["input_ids"].tolist()
    pruned = answers.render(chatml_tokenizer, messages, e.passages, tp.ContextPruner())
    assert pruned["input_ids"].shape[1] < full["input_ids"].shape[1]
    text = chatml_tokenizer.decode(pruned["input_ids"][0])
    assert "zorvik labs was founded in 1931" in text  # the worked example is never pruned (MiniLM lower-cases)
    # the patch is gone after the call: the same prompt as before
    assert answers.render(chatml_tokenizer, messages, e.passages)["input_ids"].tolist() == full["input_ids"].tolist()


@pytest.mark.real("smollm2-135m")
def test_rag_runner_with_smollm2(tmp_path):
    from tokenprune.bench.modes import BenchConfig
    from tokenprune.bench.suites.rag.run import run

    config = BenchConfig(model="smollm2-135m", mode="rag", methods=[("context", tp.ContextPruner())], reps=1,
                         warmup=0, extra={"samples": 2})
    rows = run(config, lambda iterable, description="": iterable)
    base, pruned = rows
    for row in rows:
        assert row["model"] == "smollm2-135m" and row["random_weights"] is False and row["questions"] == 2
        assert 0.0 <= row["answer_accuracy"] <= 1.0 and row["answers_correct"] in (0, 1, 2)
        assert row["ttft_ms"] > 0
    assert pruned["prompt_tokens_after"] < base["prompt_tokens"]
    # the questions after the prompt-format ones; the generator answers question 40 from the full passages
    assert pruned["questions"] == 2
    assert base["answers_correct"] >= 1
