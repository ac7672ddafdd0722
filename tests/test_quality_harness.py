"""The quality harness's shipped checkpoint: loads as a standard LLaVA in the classic layout, keep-all
pruning reproduces its answers exactly (through ``tp.patch``), it answers the synthetic VQA task far
above the no-image baseline and loses answers when pruned hard; plus the data and training pieces."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import tokenprune as tp  # noqa: E402
from tokenprune.bench.suites.quality import data, evaluate  # noqa: E402

MODEL_DIR = Path(evaluate.DEFAULT_MODEL)
N = 48  # a fixed slice of the test split: a few seconds on two cores


@pytest.fixture(scope="module")
def harness():
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.fail(f"the quality model is not shipped at {MODEL_DIR}; run `make quality-model`")
    model, processor = evaluate.load(MODEL_DIR)
    samples = data.dataset("test", N, seed=0)
    batches = evaluate.prepare(processor, samples)
    return model, processor, samples, batches, evaluate.answer(model, processor, batches)


def test_dataset_is_deterministic_and_closed():
    a, b = data.dataset("test", 20, seed=0), data.dataset("test", 20, seed=0)
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    assert list(a[0].scene.render().getdata()) == list(b[0].scene.render().getdata())
    train = data.dataset("train", 20, seed=0)
    assert [s.question for s in train] != [s.question for s in a]  # splits differ
    assert all(s.answer in data.ANSWERS for s in data.dataset("test", 300, seed=1))
    with pytest.raises(ValueError, match="split"):
        data.sample("dev", 0)


def test_checkpoint_layout_and_geometry(harness):
    from safetensors import safe_open

    model, processor, samples, batches, base = harness
    with safe_open(MODEL_DIR / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    inputs = processor(images=samples[0].scene.render(), text=samples[0].prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)


def test_keep_all_reproduces_unpruned_answers(harness):
    model, processor, samples, batches, base = harness
    for method in (tp.DivPrune(keep=576), tp.FastV(layer=2, keep=576), evaluate.HarnessRandom(keep=576)):
        assert evaluate.answer(model, processor, batches, method) == base, type(method).__name__


def accuracy(preds: list[str], samples: list[data.Sample], qtype: str | None = None) -> float:
    pairs = [(p, s) for p, s in zip(preds, samples) if qtype in (None, s.qtype)]
    return sum(p == s.answer for p, s in pairs) / len(pairs)


def test_unpruned_model_reads_the_image(harness):
    """Far above the no-image baseline overall, and colour-of-a-cell questions (one object, located
    by name) are answered almost perfectly: the model routes from the question to the region."""
    model, processor, samples, batches, base = harness
    assert accuracy(base, samples) > data.majority_accuracy(samples) + 0.15
    assert accuracy(base, samples, "color") >= 0.9


def test_pruning_loses_answers(harness):
    """The task needs the image regions: keeping 64 random tokens of 576 must lose accuracy."""
    model, processor, samples, batches, base = harness
    pruned = evaluate.answer(model, processor, batches, evaluate.HarnessRandom(keep=64))
    assert accuracy(pruned, samples) < accuracy(base, samples) - 0.1


def test_questions_name_the_objects_they_are_about():
    """``refs`` (what training supervises attention with) agree with the question and answer."""
    for s in data.dataset("test", 200, seed=3):
        objs = s.scene.objects
        if s.qtype in ("color", "shape"):
            (i,), = s.refs
            assert f"cell {data.cell_name(objs[i])}" in s.question
            assert s.answer == getattr(objs[i], s.qtype)
        elif s.qtype == "exist":
            assert (s.answer == "yes") == bool(s.refs)
            if s.refs:
                (i,), = s.refs
                assert f"{objs[i].color} {objs[i].shape}" in s.question
        elif s.qtype == "count":
            assert int(s.answer) == (len(s.refs[0]) if s.refs else 0)
        else:
            (a,), (b,) = s.refs
            assert s.question.startswith(f"is the {objs[a].color} {objs[a].shape} ")
            assert s.question.endswith(f"the {objs[b].color} {objs[b].shape} ?")
            key = "col" if "left of" in s.question else "row"
            assert (s.answer == "yes") == (getattr(objs[a], key) < getattr(objs[b], key))


def test_patch_objects_cover_each_object_and_its_centre():
    scene = data.dataset("test", 1, seed=4)[0].scene
    objects = data.patch_objects(scene)
    assert objects.shape == (576,)
    for i, centre in enumerate(data.centre_patches(scene)):
        assert objects[centre] == i  # an object covers the patch at its centre
    colors, shapes = data.patch_labels(scene)
    assert ((colors > 0) == (objects >= 0)).all() and ((shapes > 0) == (objects >= 0)).all()


def test_training_tokenisation_and_attention_probe_match_the_model():
    """The trainer's own tokenisation equals the processor's, and the attention it supervises is the
    layer's real attention (eager ``output_attentions``), on a tiny untrained model."""
    from tokenprune.bench.suites.quality import train

    tokenizer = train.build_tokenizer()
    model = train.build_model(tokenizer, seed=0, text_width=32, text_layers=2, text_heads=2)
    conversations = train.Conversations(tokenizer)
    conversations.check(train.build_processor(tokenizer), data.dataset("val", 2))
    encoded = [conversations.encode(data.sample("val", i, questions=3), 40 + 9 * i) for i in range(3)]
    for ids, labels, turns in encoded:
        for question, answer in turns:
            assert labels[answer] == ids[answer] and labels[answer - 1] == -100
            assert tokenizer.decode(ids[answer - 2 : answer]).strip() == "ASSISTANT:"
    ids = train.pad_right([e[0] for e in encoded], tokenizer.pad_token_id)
    mask = train.pad_right([[1] * len(e[0]) for e in encoded], 0)
    lm = model.model.language_model
    lm.config._attn_implementation = "eager"
    probe = train.AttentionProbe(lm.layers[-1].self_attn)
    with torch.no_grad():
        out = lm(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, output_attentions=True)
        rows = torch.tensor([0, 1, 2, 2])
        positions = torch.tensor([encoded[0][2][0][1] - 1, encoded[1][2][1][1] - 1, encoded[2][2][2][1] - 1, 7])
        torch.testing.assert_close(probe.weights(rows, positions, mask), out.attentions[-1][rows, :, positions])
    probe.remove()


def test_a_newly_registered_visual_method_is_evaluated(monkeypatch):
    """The harness's method list comes from the registry: a visual method registered later is swept over
    every keep with its METHOD_ARGS, an in-LLM one over the layers too; other stages are not evaluated."""
    from dataclasses import dataclass

    from tokenprune.methods import base

    @dataclass(frozen=True)
    class Strided(base.VisualPruner):
        stride: int = 1

        def select(self, image):
            return torch.arange(0, image.num_tokens, self.stride)[: base.resolve_keep(self.keep, image.num_tokens)]

    monkeypatch.setitem(base._REGISTRY, "strided_test", Strided)
    Strided.name = "strided_test"
    monkeypatch.setitem(evaluate.METHOD_ARGS, "strided_test", {"stride": 3})
    assert "strided_test" in evaluate.evaluated_methods() and "snapkv" not in evaluate.evaluated_methods()
    configs = evaluate.method_configs(num_layers=4, keeps=(64, 32), layers=(1, 2, 9), only=["strided_test", "fastv"])
    assert [(label, m.keep) for label, m in configs if label == "strided_test"] == [("strided_test", 64),
                                                                                   ("strided_test", 32)]
    assert all(m.stride == 3 for label, m in configs if label == "strided_test")
    assert sorted({(m.layer, m.keep) for label, m in configs if label.startswith("fastv")}) == [
        (1, 32), (1, 64), (2, 32), (2, 64)]  # layer 9 does not exist in a 4-layer decoder
    assert not any(label == "random" for label, _ in configs)  # not asked for


def test_versus_random_pairs_the_questions_when_outcomes_are_recorded():
    """Same n questions: the paired standard error (McNemar's Wald form) is used when both rows
    record per-question outcomes; it flags a +0.10 difference that the unpaired test calls noise."""
    n = 100
    ref = {"label": "random", "keep": 64, "n": n, "accuracy": 0.5, "correct": "+" * 50 + "." * 50}
    method = {"label": "m", "keep": 64, "n": n, "accuracy": 0.6, "correct": "+" * 60 + "." * 40}
    diff, se, kind = evaluate.difference(method, ref)
    # d_i = 1 on 10 questions, 0 on 90: sample variance 9 / 99
    assert kind == "paired" and diff == pytest.approx(0.1) and se == pytest.approx((9 / 99 / n) ** 0.5)
    diff, se, kind = evaluate.difference({**method, "correct": None}, ref)
    assert kind == "unpaired" and se == pytest.approx(((0.6 * 0.4 + 0.5 * 0.5) / n) ** 0.5)
    assert "beats random (paired 2 SE" in evaluate.versus_random([{"label": "none"}, ref, method])
    assert "within noise of random (unpaired" in evaluate.versus_random([{"label": "none"}, ref, {**method, "correct": None}])


def test_evaluate_resumes_from_finished_configurations(tmp_path, monkeypatch):
    """Finished configurations (answers included) are appended to the resume file and not rerun."""
    resume = tmp_path / "rows.jsonl"
    kwargs = dict(n=8, keeps=(64,), only=["divprune", "random"], progress=False, resume=resume)
    first = evaluate.evaluate(MODEL_DIR, **kwargs)
    assert [r["label"] for r in first] == ["none", "divprune", "random"] and len(resume.read_text().splitlines()) == 3

    def fail(*args, **kwargs):
        raise AssertionError("a finished configuration ran again")

    monkeypatch.setattr(evaluate, "answer", fail)
    again = evaluate.evaluate(MODEL_DIR, **kwargs)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in first]
