"""vLLM ``custom_class`` drafter: the best path of a pruned draft tree, proposed as a chain.

vLLM V1 verifies chains only (tree attention was removed in 2026, PR #42121), so the tree is built
and pruned here and its most valuable root-to-leaf path is proposed; the pruning decides the length
(empty when nothing is confident). Use::

    LLM(model, speculative_config={
        "method": "custom_class",
        "model": "tokenprune.integrations.vllm.spec.TreeDrafter",
        "num_speculative_tokens": 8,
    })

vLLM imports the class from the dotted path in ``model`` and calls ``TreeDrafter(vllm_config)``, then
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None)`` once per step
(``vllm/v1/spec_decode/custom_class_proposer.py``, ``GPUModelRunner.propose_draft_token_ids``).
The drafter's configuration is a :class:`tokenprune.DraftTree` given as JSON in the
``TOKENPRUNE_DRAFT_TREE`` environment variable (default: n-gram lookup); string entries of its
``corpus`` are tokenized with the served model's tokenizer. Sources that need the
target's logits (recycling) or a draft model are not available in this position and are refused.
vLLM's rejection sampler makes the proposal lossless (greedy and sampling, one-hot draft q).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from tokenprune.integrations.vllm.config import draft_min_prob_from_env, draft_tree_from_env
from tokenprune.speculative.prune import prune_tree
from tokenprune.speculative.tree import TokenTree

__all__ = ["TreeDrafter", "best_path"]

VLLM_SOURCES = ("ngram", "retrieval")


def best_path(tree: TokenTree, min_prob: float) -> list[int]:
    """Tokens of the root-to-node path with the largest expected accepted length.

    A node on a chain is accepted with probability ``exp(score)`` (all its ancestors accepted), so
    a chain's expected accepted length is the sum of those along it; nodes with
    ``exp(score) < min_prob`` are not worth a verification slot and end the chain.
    """
    scores = tree.scores().tolist()
    gain = [0.0] * len(tree)
    best, best_gain = 0, 0.0
    for i in range(1, len(tree)):  # topological order: the parent's gain is final
        if math.exp(scores[i]) < min_prob:
            gain[i] = -math.inf
            continue
        gain[i] = gain[tree.parents[i]] + math.exp(scores[i])
        if gain[i] > best_gain:
            best, best_gain = i, gain[i]
    return [tree.tokens[n] for n in tree.path_to(best)[1:]]


class TreeDrafter:
    """vLLM ``custom_class`` proposer built from a :class:`tokenprune.DraftTree` config.

    Args:
        vllm_config: vLLM's ``VllmConfig`` (``speculative_config.num_speculative_tokens`` caps the chain).
        method: the DraftTree (default: ``TOKENPRUNE_DRAFT_TREE`` JSON, else n-gram lookup).
        min_prob: smallest path probability worth proposing (``TOKENPRUNE_DRAFT_MIN_PROB``, default 0.1).
    """

    def __init__(self, vllm_config: Any, method: Optional[Any] = None, min_prob: Optional[float] = None):
        from tokenprune.methods.draft_tree import DraftTree

        spec = getattr(vllm_config, "speculative_config", None)
        self.k = int(getattr(spec, "num_speculative_tokens", None) or 1)
        model_config = getattr(vllm_config, "model_config", None)
        self.max_model_len = getattr(model_config, "max_model_len", None)
        if method is None:
            method = draft_tree_from_env()
        if not isinstance(method, DraftTree):
            raise TypeError(f"method must be a tokenprune.DraftTree, got {type(method).__name__}")
        unsupported = [s for s in method.sources if s not in VLLM_SOURCES]
        if unsupported:
            raise ValueError(f"sources {unsupported} are not available in vLLM's custom_class position; use {VLLM_SOURCES}")
        self.method = method
        if min_prob is None:
            min_prob = draft_min_prob_from_env()
        elif isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) or not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be a number in [0, 1], got {min_prob!r}")
        self.min_prob = float(min_prob)
        tokenizer = None
        if any(isinstance(doc, str) for doc in method.corpus):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(getattr(model_config, "tokenizer", None) or model_config.model)
        self.speculator = method.speculator(tokenizer)
        vocab_size = getattr(model_config, "get_vocab_size", None)
        if callable(vocab_size):  # a corpus of ids outside the served model's vocabulary: refuse at start
            self.speculator.check_vocab(int(vocab_size()))
        self.proposed: list[int] = []  # chain length per request and step (statistics)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load: the sources are lookups."""

    def propose_one(self, context: list[int]) -> list[int]:
        depth = min(self.k, self.method.max_depth)
        if self.max_model_len is not None:
            depth = min(depth, self.max_model_len - len(context))
        if depth < 1:
            return []
        merged = TokenTree(int(context[-1]))
        for source in self.speculator.sources:
            merged.merge(source.propose(context, depth))
        budget = self.method.max_budget if self.method.budget == "auto" else self.method.budget
        pruned = prune_tree(merged, budget, depth, self.method.max_width)
        return best_path(pruned, self.min_prob)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: Any, token_ids_cpu: Any,
                slot_mappings: Any = None) -> list[list[int]]:
        drafts = []
        for i, sampled in enumerate(sampled_token_ids):
            if not len(sampled):  # request not decoding this step (e.g. partial prefill)
                drafts.append([])
                continue
            n = int(num_tokens_no_spec[i])
            chain = self.propose_one([int(t) for t in token_ids_cpu[i, :n]])
            self.proposed.append(len(chain))
            drafts.append(chain)
        return drafts
