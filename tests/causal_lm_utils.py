"""Helpers shared by the decoder-pruning tests (FastV, ToDRE, LazyLLM, SnapKV, Knorm) on tiny models."""

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


def prefill_lengths(model, fn) -> list[int]:
    """Tokens each decoder layer's attention runs on at prefill while ``fn`` runs (batch of one);
    a pruned layer gathers its tokens inside its (wrapped) forward, so this hooks the attention."""
    from tokenprune.integrations.hf.adapters import get_adapter

    seen: dict[int, int] = {}
    layers = get_adapter(model).decoder_layers

    def hook(index):
        def record(module, args, kwargs):
            seen.setdefault(index, (args[0] if args else kwargs["hidden_states"]).shape[1])
        return record

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(layers))]
