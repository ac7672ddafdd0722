"""The three sentence scorers: the offline MiniLM bi-encoder, a cross-encoder and a Provence-format
checkpoint (tiny random checkpoints built here, offline, from MiniLM's tokenizer)."""

import json
import os

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.context import PassageInput
from tokenprune.methods.context.scorers import BiEncoderScorer, CrossEncoderScorer, ProvenceScorer
from tokenprune.methods.context.scorers.provence import load_provence, sentence_keep_score

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTION = "When was Acme Industries founded?"
PASSAGE = (
    "Acme Industries is a company. Acme Industries was founded in 1875. Its head office is in Lima. "
    "The sector has been shaped by regulation, e.g. new rules in the U.S. and Europe."
)


passage_input = PassageInput.from_text


@pytest.fixture(scope="session")
def minilm_path():
    from tokenprune.methods.context.scorers.bi_encoder import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def bi_encoder():
    return BiEncoderScorer()  # the model itself is cached per process (loaded once)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, minilm_path):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    tok.model_max_length = 64  # small window: long passages must slide
    tok.save_pretrained(path)
    return path, tok


@pytest.fixture(scope="session")
def tiny_cross_encoder(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    tok_dir, tok = tiny_tokenizer_dir
    path = tmp_path_factory.mktemp("ce")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=1, initializer_range=0.3,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_provence(tiny_tokenizer_dir, tmp_path_factory):
    """A random checkpoint in the Provence layout: deberta.* + pooler.dense + classifier + token_classifier."""
    from safetensors.torch import save_file
    from transformers import DebertaV2Config, DebertaV2Model

    _, tok = tiny_tokenizer_dir
    path = tmp_path_factory.mktemp("provence")
    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=0, pooler_hidden_size=32,
        pooler_hidden_act="gelu", num_labels=1, initializer_range=0.3,
    )
    config.architectures = ["Provence"]
    backbone = DebertaV2Model(config)
    heads = {
        "pooler.dense": torch.nn.Linear(32, 32),
        "classifier": torch.nn.Linear(32, 1),
        "token_classifier": torch.nn.Linear(32, 2),
    }
    state = {f"deberta.{k}": v for k, v in backbone.state_dict().items()}
    for name, layer in heads.items():
        state[f"{name}.weight"] = layer.weight.detach()
        state[f"{name}.bias"] = layer.bias.detach()
    config.save_pretrained(path)
    # Like the real checkpoint, the config points at remote code; it must never be imported.
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_provence.Provence"}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "modeling_provence.py").write_text("raise RuntimeError('remote code must not run')\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    tok.save_pretrained(path)
    return str(path), backbone.eval(), {k: v.eval() for k, v in heads.items()}


# ------------------------------------------------------------------ bi-encoder (real MiniLM)


def test_bi_encoder_finds_the_answer_sentence(bi_encoder):
    (scores,), = bi_encoder.score([QUESTION], [[passage_input(PASSAGE)]])
    assert scores.keep[1] == 1.0  # "Acme Industries was founded in 1875." is the best sentence
    assert all(0.0 <= k <= 1.0 for k in scores.keep)
    assert scores.rerank == pytest.approx(max(scores.raw))
    # raw scores are cosine similarities, checked against an independent encode
    model = bi_encoder.st_model
    q = model.encode([QUESTION], normalize_embeddings=True, convert_to_tensor=True)
    s = model.encode([t for t in passage_input(PASSAGE).sentences], normalize_embeddings=True, convert_to_tensor=True)
    assert torch.allclose(torch.tensor(scores.raw), (q @ s.T)[0].cpu(), atol=1e-4)


def test_default_pruner_prunes_the_distractors(bi_encoder):
    p = tp.ContextPruner(scorer=bi_encoder)
    res = p.prune(QUESTION, [{"title": "Acme", "text": PASSAGE}])
    assert "founded in 1875" in res.passages[0]["text"]
    assert "head office" not in res.passages[0]["text"]
    assert 0 < res.tokens_after < res.tokens_before
    # keep scores: 0.99, 1, 0.29, 0.55 -- a stricter threshold also drops the regulation sentence
    strict = tp.ContextPruner(scorer=bi_encoder, threshold=0.6).prune(QUESTION, [{"title": "Acme", "text": PASSAGE}])
    assert strict.kept_sentences == [[0, 1]]


def test_bi_encoder_empty_inputs(bi_encoder):
    p = tp.ContextPruner(scorer=bi_encoder)
    assert p.prune([], []) == []
    res = p.prune(QUESTION, ["", "  "])
    assert res.passages == ["", "  "] and res.kept_sentences == [[], []]


def test_bi_encoder_long_sentence_is_windowed_not_truncated(bi_encoder):
    # One "sentence" of ~600 tokens (no break) with the answer at its very end: a truncating
    # encoder (256 tokens) would never see it.
    filler = " ".join(["the weather was mild and the harvest ordinary"] * 70)
    long_sentence = f"{filler} and Acme Industries was founded in 1875"
    unrelated = "Bananas are rich in potassium and grow in warm climates."
    inp = passage_input(f"{unrelated} {long_sentence}")
    assert len(inp.sentences) == 2
    (scores,), = bi_encoder.score([QUESTION], [[inp]])
    assert len(bi_encoder.tokenizer(long_sentence)["input_ids"]) > bi_encoder.st_model.max_seq_length
    truncated = bi_encoder.st_model.encode([QUESTION, long_sentence], normalize_embeddings=True, convert_to_tensor=True)
    assert scores.raw[1] > float(truncated[0] @ truncated[1]) + 0.05
    assert scores.keep[1] == 1.0


def test_bi_encoder_non_english(bi_encoder):
    text = "Paris est la capitale de la France. M. Dupont y habite depuis 1990. Le ciel est bleu."
    res = tp.ContextPruner(scorer=bi_encoder, threshold=0.0).prune("Quelle est la capitale de la France ?", [text])
    assert res.passages == [text] and len(res.details[0].sentences) == 3


# ------------------------------------------------------------------ cross-encoder (tiny random)


def test_cross_encoder_scores_match_an_independent_forward(tiny_cross_encoder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = CrossEncoderScorer(model=tiny_cross_encoder)
    inp = passage_input("Short one. Another short sentence here.")
    (scores,), = scorer.score([QUESTION], [[inp]])
    tok = AutoTokenizer.from_pretrained(tiny_cross_encoder)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    enc = tok([QUESTION] * 2, list(inp.sentences), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits[:, 0].sigmoid()
    assert torch.allclose(torch.tensor(scores.raw), expected, atol=1e-5)
    assert max(scores.keep) == 1.0 and scores.rerank == pytest.approx(float(expected.max()))


def test_cross_encoder_long_sentence_slides(tiny_cross_encoder):
    scorer = CrossEncoderScorer(model=tiny_cross_encoder)
    long_sentence = " ".join(["word"] * 200)  # > 64-token window
    (scores,), = scorer.score([QUESTION], [[passage_input(long_sentence)]])
    assert len(scores.raw) == 1 and 0.0 < scores.raw[0] < 1.0
    p = tp.ContextPruner(scorer=scorer, threshold=0.0)
    assert p.prune(QUESTION, [long_sentence]).passages == [long_sentence]


def test_question_too_long_for_the_window_raises(tiny_cross_encoder):
    scorer = CrossEncoderScorer(model=tiny_cross_encoder)
    with pytest.raises(ValueError, match="question"):
        scorer.score([" ".join(["why"] * 80)], [[passage_input("A sentence.")]])


# ------------------------------------------------------------------ provence (tiny random)


def test_sentence_rounding_rule_by_hand():
    probs = [0.9, 0.05, 0.2, 0.3]
    # threshold 0.25: 2 of 4 tokens pass -> not more than half -> dropped
    assert not sentence_keep_score(probs) >= 0.25
    # threshold 0.2: 3 of 4 pass -> kept
    assert sentence_keep_score(probs) >= 0.2
    assert sentence_keep_score([0.4]) == 0.4 and sentence_keep_score([]) == 0.0
    assert sentence_keep_score([0.1, 0.8, 0.6]) == 0.6  # 2 of 3 must pass


def test_provence_loads_without_remote_code_and_matches_an_independent_forward(tiny_provence):
    path, backbone, heads = tiny_provence
    model, tok = load_provence(path)
    enc = tok(QUESTION, "Acme was founded in 1875.", return_tensors="pt")
    keep, rerank = model(enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():
        hidden = backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
        expected_keep = heads["token_classifier"](hidden).softmax(-1)[..., 1]
        pooled = torch.nn.functional.gelu(heads["pooler.dense"](hidden[:, 0]))
        expected_rank = heads["classifier"](pooled)[:, 0]
    assert torch.allclose(keep, expected_keep, atol=1e-5)
    assert torch.allclose(rerank, expected_rank, atol=1e-5)


def test_provence_decision_rule_end_to_end(tiny_provence):
    path, _, _ = tiny_provence
    scorer = ProvenceScorer(model=path)
    text = "Acme was founded in 1875 by two brothers. It sells anvils. The U.S. market is large for them."
    inp = passage_input(text)
    token_probs, rerank = scorer.token_probabilities([(QUESTION, text)])
    # independent reference of the rule: majority of the sentence's tokens at or above t
    per_sentence = [[] for _ in inp.sentences]
    for char, prob in token_probs[0].items():
        idx = max(i for i, start in enumerate(inp.starts) if start <= char)
        per_sentence[idx].append(prob)
    for t in (0.2, 0.4, 0.5, 0.6, 0.8):
        expected = [i for i, ps in enumerate(per_sentence) if sum(p >= t for p in ps) > len(ps) / 2]
        res = tp.ContextPruner(scorer=scorer, threshold=t, min_sentences=0, always_keep_title=False).prune(QUESTION, [text])
        assert res.kept_sentences == [expected], t
    assert res.rerank_scores == [pytest.approx(rerank[0])]


def test_provence_long_passage_slides_over_windows(tiny_provence):
    path, _, _ = tiny_provence
    scorer = ProvenceScorer(model=path, batch_size=4)
    text = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(40))  # ~400 tokens > 64
    inp = passage_input(text)
    token_probs, _ = scorer.token_probabilities([(QUESTION, text)])
    tok = scorer.tokenizer
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n_tokens > 64 and len(token_probs[0]) == n_tokens  # every token scored at least once
    (scores,), = scorer.score([QUESTION], [[inp]])
    assert len(scores.keep) == 40
    assert tp.ContextPruner(scorer=scorer, threshold=0.0).prune(QUESTION, [text]).passages == [text]


def test_provence_rejects_a_checkpoint_of_another_layout(tiny_cross_encoder):
    with pytest.raises(ValueError, match="Provence"):
        load_provence(tiny_cross_encoder)
    with pytest.raises(ValueError):
        load_provence("/nonexistent/dir")
