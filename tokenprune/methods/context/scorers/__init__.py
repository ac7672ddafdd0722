"""Sentence scorers of the context pruner, one per file behind :class:`SentenceScorer`.

Importing this package imports no model library: each scorer loads its model lazily.
"""

from tokenprune.methods.context.scorers.base import (
    PassageInput,
    PassageScores,
    SentenceScorer,
    available_scorers,
    build_scorer,
    register_scorer,
)
from tokenprune.methods.context.scorers.bi_encoder import BiEncoderScorer
from tokenprune.methods.context.scorers.cross_encoder import CrossEncoderScorer
from tokenprune.methods.context.scorers.provence import ProvenceScorer

__all__ = [
    "SentenceScorer",
    "PassageInput",
    "PassageScores",
    "available_scorers",
    "build_scorer",
    "register_scorer",
    "BiEncoderScorer",
    "CrossEncoderScorer",
    "ProvenceScorer",
]
