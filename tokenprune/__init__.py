"""tokenprune: token and context pruning for multimodal and RAG inference.

Importing the package needs torch only and patches nothing; transformers, vLLM, triton and
sentence-transformers are imported lazily by the parts that use them.

    import tokenprune as tp
    with tp.patch(model, tp.DivPrune(keep=64)):
        out = model.generate(**inputs)
"""

from tokenprune.api import compose, patch, prune
from tokenprune.api import Compose
from tokenprune.methods import (
    CDPruner,
    DivPrune,
    DraftTree,
    FastV,
    FlowCut,
    HoloV,
    ImageTokens,
    InLLMPruner,
    KVPruner,
    Pruner,
    ScoredVisualPruner,
    SequencePruner,
    RandomPrune,
    UniformGrid,
    VisionZip,
    VisualPruner,
    available_methods,
    build,
)
from tokenprune.methods.context import ContextPruner
from tokenprune.patching import PatchHandle, active_handle
from tokenprune.stats import PruneRecord, PruneStats

__version__ = "0.1.0"

__all__ = [
    "patch",
    "prune",
    "compose",
    "Compose",
    "build",
    "available_methods",
    "active_handle",
    "PatchHandle",
    "PruneStats",
    "PruneRecord",
    "Pruner",
    "VisualPruner",
    "ScoredVisualPruner",
    "SequencePruner",
    "InLLMPruner",
    "KVPruner",
    "ImageTokens",
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

from tokenprune.methods import Knorm, LazyLLM, SnapKV, ToDRE  # noqa: E402

__all__ += ["LazyLLM", "SnapKV", "Knorm", "ToDRE"]
