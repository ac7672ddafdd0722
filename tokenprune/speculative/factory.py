"""Build a :class:`TreeSpeculator` from a :class:`~tokenprune.methods.draft_tree.DraftTree` config."""

from __future__ import annotations

from typing import Any, Optional

from tokenprune.speculative.decode import TreeSpeculator
from tokenprune.speculative.sources import DraftModelSource, NGramSource, RecyclingSource, RetrievalSource

__all__ = ["build_speculator"]


def _encode_corpus(corpus: tuple, tokenizer: Optional[Any]) -> list[list[int]]:
    docs = []
    for doc in corpus:
        if isinstance(doc, str):
            if tokenizer is None:
                raise ValueError("corpus contains strings: pass corpus_tokenizer= to generate (or give token ids)")
            docs.append(list(tokenizer(doc, add_special_tokens=False)["input_ids"]))
        else:
            docs.append([int(t) for t in doc])
    return docs


def build_speculator(config: Any, tokenizer: Optional[Any] = None) -> TreeSpeculator:
    sources = []
    rescorer = None
    for name in config.sources:
        if name == "ngram":
            sources.append(NGramSource(max_ngram=config.ngram_max, min_ngram=config.ngram_min))
        elif name == "recycling":
            sources.append(RecyclingSource(topk=config.recycling_topk))
        elif name == "retrieval":
            sources.append(RetrievalSource(_encode_corpus(config.corpus, tokenizer), max_ngram=config.ngram_max + 1,
                                           min_ngram=config.ngram_min))
        elif name == "draft_model":
            model = config.draft_model
            if isinstance(model, str):
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(model).eval()
            rescorer = DraftModelSource(model, topk=config.draft_topk)
            sources.append(rescorer)
    return TreeSpeculator(sources, budget=config.budget, max_depth=config.max_depth, max_width=config.max_width,
                          max_budget=config.max_budget, rescorer=rescorer)
