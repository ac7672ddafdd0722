"""Pruning methods: one small dataclass per file, registered by name."""

from tokenprune.methods.base import (
    ImageTokens,
    InLLMPruner,
    Pruner,
    ScoredVisualPruner,
    VisualPruner,
    available_methods,
    build,
)
from tokenprune.methods.divprune import DivPrune
from tokenprune.methods.fastv import FastV

__all__ = [
    "Pruner",
    "VisualPruner",
    "ScoredVisualPruner",
    "InLLMPruner",
    "ImageTokens",
    "available_methods",
    "build",
    "DivPrune",
    "FastV",
]

from tokenprune.methods.base import TextPruner  # noqa: E402
from tokenprune.methods.lazyllm import LazyLLM  # noqa: E402
from tokenprune.methods.snapkv import SnapKV  # noqa: E402

__all__ += ["TextPruner", "LazyLLM", "SnapKV"]
