"""Pruning methods: one small dataclass per file, registered by name."""

from tokenprune.methods.base import (
    ImageTokens,
    InLLMPruner,
    KVPruner,
    Pruner,
    ScoredVisualPruner,
    SequencePruner,
    VisualPruner,
    available_methods,
    build,
)
from tokenprune.methods.cdpruner import CDPruner
from tokenprune.methods.context import ContextPruner
from tokenprune.methods.divprune import DivPrune
from tokenprune.methods.fastv import FastV
from tokenprune.methods.flowcut import FlowCut
from tokenprune.methods.grid import UniformGrid
from tokenprune.methods.holov import HoloV
from tokenprune.methods.random import RandomPrune
from tokenprune.methods.visionzip import VisionZip
from tokenprune.methods.draft_tree import DraftTree

__all__ = [
    "Pruner",
    "VisualPruner",
    "ScoredVisualPruner",
    "SequencePruner",
    "InLLMPruner",
    "KVPruner",
    "ImageTokens",
    "available_methods",
    "build",
    "CDPruner",
    "ContextPruner",
    "DivPrune",
    "FastV",
    "FlowCut",
    "HoloV",
    "RandomPrune",
    "UniformGrid",
    "VisionZip",
    "DraftTree",
]

from tokenprune.methods.knorm import Knorm  # noqa: E402
from tokenprune.methods.lazyllm import LazyLLM  # noqa: E402
from tokenprune.methods.snapkv import SnapKV  # noqa: E402
from tokenprune.methods.todre import ToDRE  # noqa: E402

__all__ += ["LazyLLM", "SnapKV", "Knorm", "ToDRE"]
