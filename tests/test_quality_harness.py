"""The quality harness's shipped checkpoint: loads as a standard LLaVA in the classic layout, keep-all
pruning reproduces its answers exactly (through ``tp.patch``), and — once the model is trained well
enough — it answers the synthetic VQA task far above chance and loses answers when pruned hard."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import tokenprune as tp  # noqa: E402
from benchmarks.quality import data, evaluate  # noqa: E402

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


UNDERTRAINED = pytest.mark.xfail(
    strict=True,
    reason="the shipped model is under-trained (its decoder ignores the image; docs/quality.md); "
    "retrain with a larger budget and drop this mark",
)


@UNDERTRAINED
def test_unpruned_accuracy_clearly_above_chance(harness):
    model, processor, samples, batches, base = harness
    accuracy = sum(p == s.answer for p, s in zip(base, samples)) / len(samples)
    assert accuracy > data.majority_accuracy(samples) + 0.25, accuracy


@UNDERTRAINED
def test_pruning_loses_answers(harness):
    """The task needs the image regions: keeping 16 random tokens must lose accuracy."""
    model, processor, samples, batches, base = harness
    pruned = evaluate.answer(model, processor, batches, evaluate.HarnessRandom(keep=16))
    acc = lambda preds: sum(p == s.answer for p, s in zip(preds, samples)) / len(samples)  # noqa: E731
    assert acc(pruned) < acc(base) - 0.1
