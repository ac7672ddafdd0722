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
from tokenprune.methods.context import ContextPruner
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
    "ContextPruner",
    "DivPrune",
    "FastV",
]
