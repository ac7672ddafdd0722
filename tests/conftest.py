"""Shared pytest setup: offline environment, Triton interpreter, tiny checkpoints built once per session."""

import os

# Must be set before anything imports triton (kernels are tested through the interpreter on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one intra-op thread is faster than two (no fork/join overhead) and
# keeps timings sane when the machine is shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenprune-fixtures")


@pytest.fixture(scope="session")
def tiny_llava_path(fixtures_dir):
    """Tiny LLaVA, 56 px images -> 16 image tokens, 4 decoder layers."""
    pytest.importorskip("transformers")
    from tokenprune.fixtures import build_tiny_llava

    return build_tiny_llava(fixtures_dir / "tiny-llava-56", image_size=56)


@pytest.fixture(scope="session")
def tiny_llava_576_path(fixtures_dir):
    """Tiny LLaVA, 336 px images -> 576 image tokens (the LLaVA-1.5 count)."""
    pytest.importorskip("transformers")
    from tokenprune.fixtures import build_tiny_llava

    return build_tiny_llava(fixtures_dir / "tiny-llava-336", image_size=336)


@pytest.fixture(scope="session")
def tiny_llama_path(fixtures_dir):
    pytest.importorskip("transformers")
    from tokenprune.fixtures import build_tiny_llama

    return build_tiny_llama(fixtures_dir / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llava_next_path(fixtures_dir):
    """Tiny LLaVA-NeXT: 56 px crops (16 tokens each), pinpoints 1x2 / 2x1 / 2x2 crops."""
    pytest.importorskip("transformers")
    from tokenprune.fixtures import build_tiny_llava_next

    return build_tiny_llava_next(fixtures_dir / "tiny-llava-next")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_path(fixtures_dir):
    """Tiny Qwen2.5-VL: 112x112 px -> 16 visual tokens, 112x168 -> 24; text head_dim 64."""
    pytest.importorskip("transformers")
    from tokenprune.fixtures import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(fixtures_dir / "tiny-qwen2_5-vl")


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.real(name, ...)`` tests unless those real models' weight packages are installed."""
    from tokenprune.real_weights import real_lm_installed

    for item in items:
        marker = item.get_closest_marker("real")
        if marker is None:
            continue
        missing = [name for name in (marker.args or ("smollm2-135m",)) if not real_lm_installed(name)]
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"real weights not installed: {', '.join(missing)} "
                                                    "(make real-weights)"))
