"""Helpers shared by the text-pruning tests (LazyLLM, SnapKV) on tiny causal LMs."""

from __future__ import annotations

import torch


def load(path, impl: str = "sdpa"):
    """The tiny causal LM at ``path`` with attention implementation ``impl``, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()


def prompt(batch: int = 1, length: int = 48, seed: int = 0) -> torch.Tensor:
    """[batch, length] random token ids in [5, 500), reproducible by ``seed``."""
    return torch.randint(5, 500, (batch, length), generator=torch.Generator().manual_seed(seed))
