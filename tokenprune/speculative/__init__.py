"""Speculative decoding with pruned draft trees (torch only; engines live in ``integrations``)."""

from tokenprune.speculative.decode import SpecStats, TreeSpeculator, speculative_generate
from tokenprune.speculative.latency import LatencyModel, choose_budget
from tokenprune.speculative.prune import prune_tree, ranked_nodes
from tokenprune.speculative.tree import TokenTree

__all__ = ["TokenTree", "prune_tree", "ranked_nodes", "LatencyModel", "choose_budget", "TreeSpeculator",
           "SpecStats", "speculative_generate"]
