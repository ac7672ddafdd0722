"""Registry, keep convention, validation and import hygiene of the public API."""

import subprocess
import sys

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.base import resolve_keep, topk_ascending


def test_import_is_light():
    code = (
        "import sys, tokenprune; "
        "heavy = [m for m in ('transformers', 'vllm', 'triton', 'sentence_transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_registry_and_build():
    names = tp.available_methods()
    assert {"divprune", "fastv"} <= set(names)
    method = tp.build("divprune", keep=32)
    assert isinstance(method, tp.DivPrune) and method.keep == 32
    assert tp.build("FastV", layer=3, keep=0.25) == tp.FastV(layer=3, keep=0.25)
    assert tp.build("divprune", **{k: v for k, v in tp.DivPrune(keep=5).to_config().items() if k != "method"}) == tp.DivPrune(keep=5)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'.*available"):
        tp.build("nope")
    with pytest.raises(TypeError, match="unexpected argument.*colour"):
        tp.build("divprune", colour=3)
    with pytest.raises(TypeError):
        tp.build(3)


@pytest.mark.parametrize("cls", [tp.DivPrune, tp.FastV])
@pytest.mark.parametrize(
    "keep, error, match",
    [
        (0, ValueError, "keep must be >= 1"),
        (-3, ValueError, "keep must be >= 1"),
        (0.0, ValueError, r"keep must be in \(0, 1\]"),
        (1.5, ValueError, r"keep must be in \(0, 1\]"),
        (float("nan"), ValueError, r"keep must be in \(0, 1\]"),
        ("64", TypeError, "keep must be an int"),
        (True, TypeError, "keep must be an int"),
        (None, TypeError, "keep must be an int"),
    ],
)
def test_keep_validation(cls, keep, error, match):
    with pytest.raises(error, match=match):
        cls(keep=keep)


def test_fastv_layer_validation():
    with pytest.raises(ValueError, match="layer must be >= 1"):
        tp.FastV(layer=0)
    with pytest.raises(TypeError, match="layer must be an int"):
        tp.FastV(layer=2.0)
    with pytest.raises(ValueError, match="impl must be"):
        tp.FastV(impl="cuda")


def test_resolve_keep():
    assert resolve_keep(64, 576) == 64
    assert resolve_keep(1000, 576) == 576  # more than exist keeps all
    assert resolve_keep(0.5, 576) == 288
    assert resolve_keep(1.0, 7) == 7
    assert resolve_keep(0.01, 10) == 1  # a fraction never drops an image entirely
    assert resolve_keep(0.25, 6) == 2  # 1.5 rounds half up
    assert resolve_keep(5, 0) == 0


def test_topk_ascending_ties_to_lowest_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])
    assert topk_ascending(scores, 2).tolist() == [1, 2]
    assert topk_ascending(scores, 10).tolist() == [0, 1, 2, 3, 4]


def test_patch_rejects_non_methods():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="tp.build"):
        tp.patch(model, "divprune")
    with pytest.raises(TypeError, match="tokenprune method"):
        tp.patch(model, object())
    with pytest.raises(TypeError, match="tokenprune method"):
        tp.prune(object())


def test_unsupported_architecture_names_supported_ones():
    pytest.importorskip("transformers")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration"):
        tp.patch(model, tp.DivPrune(keep=4))
    assert "_tokenprune_handle" not in model.__dict__
