"""tokenprune.fixtures never overwrites what a user owns: a non-empty directory is refused unless
``overwrite=True``, and even then only the checkpoint's own files are written."""

import pytest
import torch

pytest.importorskip("transformers")

from tokenprune import fixtures  # noqa: E402


def _user_files(path):
    """A directory a user owns: notes and an unrelated safetensors file with a CLIP-like key."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("mine")
    (path / "config.json").write_text('{"mine": true}')
    save_file({"vision_tower.encoder.weight": torch.arange(6.0).reshape(2, 3)}, str(path / "adapter.safetensors"))
    return {p.name: p.read_bytes() for p in path.iterdir()}


BUILDERS = {
    "llama": lambda p, **kw: fixtures.build_tiny_llama(p, num_layers=1, **kw),
    "llava": lambda p, **kw: fixtures.build_tiny_llava(p, num_layers=1, vision_layers=1, **kw),
    "qwen2": lambda p, **kw: fixtures.build_tiny_causal_lm(p, arch="qwen2", num_layers=1, **kw),
}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_non_empty_directory_is_refused_before_any_work(tmp_path, arch):
    before = _user_files(tmp_path / "mine")
    with pytest.raises(FileExistsError, match=r"mine.*not empty.*overwrite=True"):
        BUILDERS[arch](tmp_path / "mine")
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == before


def test_every_builder_takes_overwrite():
    import inspect

    builders = [getattr(fixtures, n) for n in fixtures.__all__ if n.startswith("build_tiny")]
    assert len(builders) >= 6
    for build in builders:
        assert "overwrite" in inspect.signature(build).parameters, build.__name__


def test_overwrite_writes_only_the_checkpoint_files(tmp_path):
    """The LLaVA builder rewrites the weight files it saved (classic key layout): never a file it did not write."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    path = tmp_path / "mine"
    before = _user_files(path)
    fixtures.build_tiny_llava(path, num_layers=1, vision_layers=1, overwrite=True)
    after = {p.name: p.read_bytes() for p in path.iterdir()}
    assert after["notes.txt"] == before["notes.txt"]
    assert after["adapter.safetensors"] == before["adapter.safetensors"]
    assert list(load_file(str(path / "adapter.safetensors"))) == ["vision_tower.encoder.weight"]
    assert after["config.json"] != before["config.json"]  # the checkpoint's own file, replaced as asked
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(str(path / "model.safetensors")))
    LlavaForConditionalGeneration.from_pretrained(path)


def test_empty_or_missing_directory_and_bad_targets(tmp_path):
    (tmp_path / "empty").mkdir()
    fixtures.build_tiny_llama(tmp_path / "empty", num_layers=1)
    fixtures.build_tiny_llama(tmp_path / "new" / "nested", num_layers=1)
    assert (tmp_path / "new" / "nested" / "config.json").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="a-file.*not a directory"):
        fixtures.build_tiny_llama(tmp_path / "a-file")
    with pytest.raises(TypeError, match="overwrite"):
        fixtures.build_tiny_llama(tmp_path / "other", overwrite="yes")
