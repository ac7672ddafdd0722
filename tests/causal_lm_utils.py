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


def left_padded(rows: list[torch.Tensor], pad_id: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[len(rows), longest]`` of ``[1, n]`` prompts, left-padded."""
    length = max(ids.shape[1] for ids in rows)
    batch = torch.full((len(rows), length), pad_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, ids in enumerate(rows):
        batch[i, length - ids.shape[1]:] = ids[0]
        mask[i, length - ids.shape[1]:] = 1
    return batch, mask
