"""Argument checks of the vLLM benchmark (the measurement itself runs in
tokenprune/bench/suites/vllm_visual.py)."""

import pytest


@pytest.fixture(scope="module")
def bench():
    from tokenprune.bench.suites import vllm_visual

    return vllm_visual


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(presets=["huge"]), "unknown preset"),
        (dict(keep=0), "keep must be an int"),
        (dict(keep=577), "keep must be an int"),
        (dict(presets=["tiny", "qwen-tiny"], keep=257), r"keep must be an int in \[1, 256\]"),
        (dict(trials=0), "must be >= 1"),
    ],
)
def test_bad_arguments(bench, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.run_vllm_benchmark(**kwargs)


def test_presets_run_on_vllm_cpu_attention(bench):
    """head_dim must be one vLLM's CPU attention supports (DESIGN.md §5)."""
    for preset in bench.PRESETS.values():
        hidden = preset.build.get("hidden_size", 128)
        heads = preset.build.get("num_heads", 2)
        assert hidden // heads in (32, 64, 80, 96, 112, 128)


def test_every_cli_model_name_is_a_preset(bench):
    assert set(bench.CLI_PRESETS.values()) == set(bench.PRESETS)
    assert {p.family for p in bench.PRESETS.values()} == {"llava", "qwen2_5_vl"}
