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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
