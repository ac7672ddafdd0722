"""Knorm: KV-cache compression by key norm (Devoto et al., EMNLP 2024, "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression", arXiv 2406.11430; kvpress's ``KnormPress``).

Keys with a *low* L2 norm draw high attention, so each KV head keeps the prompt entries whose keys
have the smallest norm. RoPE rotates key pairs, so the norm is the same before and after it. No
attention is computed: the score needs only the cached keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.methods.base import KVPruner, KVView, register


@register("knorm")
@dataclass(frozen=True)
class Knorm(KVPruner):
    """Args:
        keep: KV entries kept per layer and KV head: a count (>= 1) or a fraction in (0, 1] of the prompt.
    """

    def score(self, view: KVView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)
