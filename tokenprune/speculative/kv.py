"""KV-cache surgery for tree verification: keep the committed prefix plus the accepted path.

After a forward over a tree of ``N`` nodes, each cache layer holds ``prefix + N`` positions; only
the accepted root-to-node path must survive, contiguous, in path order (EAGLE / Medusa copy the
accepted rows to the first free slots; here the rows are gathered and the rest dropped).
Works on any cache whose layers expose ``keys`` / ``values`` tensors ``[batch, heads, seq, dim]``
(transformers' ``DynamicCache`` and its ``DynamicLayer``); sliding-window and static layers are
refused because their storage is not indexed by absolute position.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["keep_positions", "check_cache"]


def check_cache(cache: Any) -> None:
    """Raise ``NotImplementedError`` unless ``cache`` is a plain growing per-layer KV cache."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise NotImplementedError(
            f"tree verification needs a transformers DynamicCache-like cache with .layers, got {type(cache).__name__}"
        )
    for layer in layers:
        if getattr(layer, "is_sliding", False) or type(layer).__name__ != "DynamicLayer":
            raise NotImplementedError(
                "tree verification supports full-attention DynamicCache layers only (Llama, Qwen2, Mistral "
                f"without sliding window); got a {type(layer).__name__}"
            )


def keep_positions(cache: Any, prefix_len: int, nodes: Sequence[int]) -> None:
    """In place: keep positions ``[0, prefix_len)`` and ``prefix_len + nodes`` of every layer."""
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        index = torch.as_tensor(list(nodes), dtype=torch.long, device=layer.keys.device) + prefix_len
        layer.keys = torch.cat([layer.keys[:, :, :prefix_len], layer.keys.index_select(2, index)], dim=2)
        layer.values = torch.cat([layer.values[:, :, :prefix_len], layer.values.index_select(2, index)], dim=2)
