"""ContextPruner selection logic, result bookkeeping and argument validation.

Uses a deterministic keyword scorer (a SentenceScorer subclass, as a user could write) so the
expected selections can be computed by hand; the model-backed scorers are tested in
test_context_scorers.py.
"""

import math

import pytest

import tokenprune as tp
from tokenprune.methods.context import PassageScores, SentenceScorer, split_sentences


class KeywordScorer(SentenceScorer):
    """Keep score = fraction of the question's words found in the sentence; rerank = best."""

    default_threshold = 0.5

    def __init__(self):
        self.calls = 0

    @property
    def tokenizer(self):
        return None

    def score(self, questions, passages):
        self.calls += 1
        out = []
        for q, group in zip(questions, passages):
            words = {w.strip("?.,").lower() for w in q.split()}
            row = []
            for p in group:
                keep = [
                    len(words & {w.strip("?.,").lower() for w in s.split()}) / len(words) for s in p.sentences
                ]
                row.append(PassageScores(keep, keep, max(keep, default=-math.inf)))
            out.append(row)
        return out


class WordCounter:
    """A tokenizer stand-in counting whitespace words (only the call convention matters)."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


P1 = "Acme Corp. Acme was founded in 1875. It sells anvils, e.g. heavy ones. The U.S. office is in Ohio."
P2 = "Beta makes cars. Beta was founded in 1990."
Q = "when was acme founded"


def pruner(**kw):
    return tp.ContextPruner(scorer=KeywordScorer(), **kw)


def test_sentences_tile_the_passage_and_respect_abbreviations():
    sents = split_sentences(P1)
    assert "".join(s.text for s in sents) == P1
    assert [s.text.strip() for s in sents] == [
        "Acme Corp. Acme was founded in 1875.",
        "It sells anvils, e.g. heavy ones.",
        "The U.S. office is in Ohio.",
    ]


def test_threshold_zero_keeps_everything_verbatim():
    res = pruner(threshold=0.0).prune(Q, [P1, P2, {"title": "T", "text": P2}])
    assert res.passages == [P1, P2, {"title": "T", "text": P2}]
    assert res.compression == 0.0 and res.chars_after == res.chars_before


def test_threshold_selection_matches_hand_computation():
    # question words: when, was, acme, founded (4)
    # P1: s0 "Acme Corp. Acme was founded in 1875." -> acme, was, founded = 0.75
    #     s1 -> 0, s2 -> 0
    # P2: s0 "Beta makes cars." -> 0 ; s1 "Beta was founded in 1990." -> was, founded = 0.5
    res = pruner(threshold=0.5, always_keep_title=False).prune(Q, [P1, P2])
    assert res.kept_sentences == [[0], [1]]
    assert res.passages == ["Acme Corp. Acme was founded in 1875.", "Beta was founded in 1990."]
    assert res.sentence_scores[0] == [0.75, 0.0, 0.0]
    assert res.rerank_scores == [0.75, 0.5]
    assert res.chars_after == len(res.passages[0]) + len(res.passages[1])


def test_very_high_threshold_keeps_min_sentences():
    for m in (0, 1, 2):
        res = pruner(threshold=1.0, min_sentences=m, always_keep_title=False).prune(Q, [P1, P2])
        assert [len(k) for k in res.kept_sentences] == [m, m]
    res = pruner(threshold=1.0, min_sentences=1, always_keep_title=False).prune(Q, [P1, P2])
    assert res.kept_sentences == [[0], [1]]  # the best sentence of each passage


def test_title_is_kept_for_string_passages_and_counts_for_min_sentences():
    res = pruner(threshold=1.0).prune("beta", [P1])  # title scores 0 but is kept
    assert res.kept_sentences == [[0]]
    res = pruner(threshold=1.0, min_sentences=2).prune("office", [P1])
    assert res.kept_sentences == [[0, 2]]
    # mapping passages keep their title field untouched; the text is pruned normally
    res = pruner(threshold=1.0, min_sentences=1).prune("office", [{"title": "Acme", "text": P1, "id": 7}])
    assert res.passages == [{"title": "Acme", "text": "The U.S. office is in Ohio.", "id": 7}]


def test_keep_ratio_mode():
    res = pruner(keep_ratio=0.34, always_keep_title=False, min_sentences=0).prune(Q, [P1])
    assert res.kept_sentences == [[0]]  # round(0.34 * 3) = 1, the best sentence
    res = pruner(keep_ratio=1.0, always_keep_title=False).prune(Q, [P1])
    assert res.passages == [P1]


def test_reorder_and_top_k():
    passages = [P2, P1, "Nothing relevant here."]
    res = pruner(threshold=0.0, reorder=True).prune(Q, passages)
    assert res.order == [1, 0, 2] and res.passages[0] == P1
    res = pruner(threshold=0.0, top_k=2).prune(Q, passages)
    assert res.order == [0, 1]  # the two best, in input order
    assert res.chars_before == sum(map(len, passages)) and res.chars_after == len(P1) + len(P2)
    assert len(res.details) == 3


def test_batched_questions_score_in_one_call():
    scorer = KeywordScorer()
    p = tp.ContextPruner(scorer=scorer, threshold=0.5, always_keep_title=False)
    results = p.prune([Q, "what does beta make"], [[P1], [P2, P1]])
    assert scorer.calls == 1
    assert [len(r.passages) for r in results] == [1, 2]
    assert results[1].passages[0] == "Beta makes cars."
    single = p.prune("what does beta make", [P2, P1])
    assert single.passages == results[1].passages and single.kept_sentences == results[1].kept_sentences


def test_empty_passages_and_no_sentence_breaks_and_non_english():
    p = pruner(threshold=0.9, always_keep_title=False)
    res = p.prune(Q, ["", "   ", "acme was founded without any full stop"])
    assert res.passages == ["", "   ", "acme was founded without any full stop"]
    assert res.kept_sentences == [[], [], [0]]
    assert res.rerank_scores[0] == -math.inf
    assert p.prune(Q, []).passages == []
    ja = "東京は日本の首都です。人口は約1400万人です。"
    res = pruner(threshold=0.0, language="ja").prune("東京", [ja])
    assert res.details[0].sentences == ["東京は日本の首都です。", "人口は約1400万人です。"]
    assert res.passages == [ja]


def test_token_counts_use_the_given_tokenizer():
    res = pruner(threshold=0.5, always_keep_title=False).prune(Q, [P1], tokenizer=WordCounter())
    assert res.tokens_before == len(P1.split())
    assert res.tokens_after == len("Acme Corp. Acme was founded in 1875.".split())


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"threshold": -0.1}, ValueError),
        ({"threshold": 1.5}, ValueError),
        ({"threshold": float("nan")}, ValueError),
        ({"threshold": "high"}, TypeError),
        ({"threshold": 0.5, "keep_ratio": 0.5}, ValueError),
        ({"keep_ratio": 0.0}, ValueError),
        ({"keep_ratio": 1.2}, ValueError),
        ({"min_sentences": -1}, ValueError),
        ({"min_sentences": 1.5}, TypeError),
        ({"top_k": 0}, ValueError),
        ({"batch_size": 0}, ValueError),
        ({"language": ""}, ValueError),
        ({"scorer": "nope"}, ValueError),
        ({"scorer": 3}, TypeError),
        ({"scorer": "cross-encoder"}, ValueError),  # needs a model path
        ({"scorer": "provence"}, ValueError),
    ],
)
def test_bad_arguments(kwargs, exc):
    with pytest.raises(exc):
        tp.ContextPruner(**kwargs)


def test_bad_scorer_arguments():
    from tokenprune.methods.context import BiEncoderScorer, CrossEncoderScorer, ProvenceScorer

    with pytest.raises(ValueError, match="passage_exponent"):
        BiEncoderScorer(passage_exponent=-1)
    with pytest.raises(ValueError, match="sentence_exponent"):
        CrossEncoderScorer(model="x", sentence_exponent=float("inf"))
    with pytest.raises(ValueError, match="batch_size"):
        BiEncoderScorer(batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        ProvenceScorer(model="x", max_length=4)


def test_bad_inputs():
    p = pruner()
    with pytest.raises(TypeError):
        p.prune(Q, [3])
    with pytest.raises(TypeError):
        p.prune(Q, "a passage instead of a list")
    with pytest.raises(ValueError):
        p.prune([Q, Q], [[P1]])
    with pytest.raises(ValueError):
        tp.ContextPruner(scorer=KeywordScorer(), model="/some/path")


def test_registry_and_config():
    assert "context" in tp.available_methods()
    p = tp.build("context", threshold=0.3)
    assert isinstance(p, tp.ContextPruner) and p.stage == "context"
    config = p.to_config()
    assert config["method"] == "context" and config["threshold"] == 0.3 and config["scorer"] == "bi-encoder"
    assert tp.build(config.pop("method"), **config) == p


def test_adaptive_keep_scores_by_hand():
    from tokenprune.methods.context.scorers.base import adaptive_keep_scores

    keep = adaptive_keep_scores([[0.8, 0.4], [0.4, 0.1], [-0.2], []])
    # passage 0 is the best: gate 1; 0.4/0.8 = 0.5 -> sqrt = 0.7071
    # passage 1: gate (0.4/0.8)^2 = 0.25; sentence 1: sqrt(0.1/0.4) * 0.25 = 0.125
    assert keep[0] == pytest.approx([1.0, 0.5**0.5])
    assert keep[1] == pytest.approx([0.25, 0.125])
    assert keep[2] == [0.0] and keep[3] == []
    assert adaptive_keep_scores([[0.8, 0.4], [0.4]], passage_exponent=0)[1] == [1.0]


# ------------------------------------------------------------------ huge inputs (bounded cost)
_FRAGMENTS = ["The cat sat. ", "Dr. Who? ", "e.g. this ", "U.S. ", "3.50 ", "\n\n", "   ", "Hi!", "Yes... ",
              '"Quote." ', "(Paren.) ", "今日は晴れです。", "はい！", "本当？", "a", "Mr. ", "end.", "Jan. 5 ",
              "word ", "x" * 50, "...", "。", "\t", "A. B. C. "]


@pytest.mark.parametrize("seed", range(12))
def test_windowed_segmentation_equals_whole_text(monkeypatch, seed):
    """Long texts are segmented window by window; the splits are sentencex's on the whole text,
    also on adversarial mixes of abbreviations, ellipses, CJK terminators and blank runs."""
    import random

    from tokenprune.methods.context import segment

    rng = random.Random(seed)
    text = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(300, 1500)))
    language = ["en", "ja", "fr", "de"][seed % 4]
    whole = segment._segment_starts(text, language)
    monkeypatch.setattr(segment, "WINDOW_CHARS", rng.randint(300, 3000))
    assert segment._starts(text, language) == whole
    sentences = split_sentences(text, language)
    assert [s.start for s in sentences] == [0] + whole[1:] and "".join(s.text for s in sentences) == text


def test_segmentation_work_is_linear_in_the_text(monkeypatch):
    """sentencex costs (sentences x length) per call on CJK text (1 MB took 248 s): each call gets a
    bounded window and the windows cover the text about once."""
    from tokenprune.methods.context import segment

    calls = []
    real = segment._segment_starts
    monkeypatch.setattr(segment, "_segment_starts", lambda t, lang: calls.append(len(t)) or real(t, lang))
    text = "今日は晴れです。東京の会社は一八七五年に設立されました。それは本当ですか？" * 3000  # 108k chars
    sentences = split_sentences(text, "ja")
    assert len(sentences) == 9000 and "".join(s.text for s in sentences) == text
    assert max(calls) <= segment.WINDOW_CHARS
    assert sum(calls) <= 2.2 * len(text)


def test_max_chars_refuses_huge_inputs_before_any_work():
    scorer = KeywordScorer()
    p = tp.ContextPruner(scorer=scorer, max_chars=100)
    assert tp.ContextPruner(scorer=KeywordScorer()).max_chars == 1_000_000  # the default bound
    with pytest.raises(ValueError, match=r"101 characters.*max_chars=100.*max_chars=None"):
        p.prune(Q, ["x" * 60, "y" * 41])
    with pytest.raises(ValueError, match="max_chars"):  # counted over every question of a batch
        p.prune([Q, Q], [["x" * 60], ["y" * 41]])
    assert scorer.calls == 0
    assert p.prune(Q, ["x" * 60, {"title": "T", "text": "y" * 40}]).passages[0] == "x" * 60
    unbounded = tp.ContextPruner(scorer=scorer, max_chars=None)
    assert unbounded.prune(Q, ["Acme was founded. " * 10]).details[0].chars_before == 180
