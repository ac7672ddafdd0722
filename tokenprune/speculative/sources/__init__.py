"""Draft sources: each proposes a :class:`~tokenprune.speculative.tree.TokenTree` for a context."""

from tokenprune.speculative.sources.base import DraftSource, tree_from_continuations
from tokenprune.speculative.sources.draft_model import DraftModelSource
from tokenprune.speculative.sources.ngram import NGramSource
from tokenprune.speculative.sources.recycling import RecyclingSource
from tokenprune.speculative.sources.retrieval import RetrievalSource

__all__ = ["DraftSource", "tree_from_continuations", "NGramSource", "RecyclingSource", "RetrievalSource",
           "DraftModelSource"]
