"""RAG context pruning: sentence-level pruning and reranking of retrieved passages."""

from tokenprune.methods.context.pruner import ContextPruner
from tokenprune.methods.context.result import ContextPruneResult, PrunedPassage
from tokenprune.methods.context.scorers import (
    BiEncoderScorer,
    CrossEncoderScorer,
    PassageInput,
    PassageScores,
    ProvenceScorer,
    SentenceScorer,
    available_scorers,
    build_scorer,
    register_scorer,
)
from tokenprune.methods.context.segment import Sentence, split_sentences

__all__ = [
    "ContextPruner",
    "ContextPruneResult",
    "PrunedPassage",
    "SentenceScorer",
    "PassageInput",
    "PassageScores",
    "BiEncoderScorer",
    "CrossEncoderScorer",
    "ProvenceScorer",
    "available_scorers",
    "build_scorer",
    "register_scorer",
    "Sentence",
    "split_sentences",
]
