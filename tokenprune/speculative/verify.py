"""Acceptance rules over a verified tree: greedy longest match and lossless multi-candidate sampling.

Both walk the tree from the root. At a node the target's next-token distribution is the logits row
of that node (computed with the ancestor mask, so it is exactly the distribution given the path),
processed by the generation's logits processors with the path as context.

* Greedy: follow the child whose token is the target's argmax; stop when none matches. The tokens
  emitted equal what greedy decoding would emit, token for token.
* Sampling (``qx = 1`` recursive rejection, EAGLE-2 / SpecInfer with deterministic drafts): try the
  children in a fixed order; accept child ``x`` with probability ``p(x)``; on rejection set
  ``p(x) = 0`` and renormalise, then try the next child; if all are rejected, sample the bonus token
  from the renormalised residual. For one candidate ``P(y) = p(x)[y = x] + (1 - p(x)) p(y) / (1 - p(x))
  = p(y)``; induction over siblings and depth gives the tree case, for any tree chosen before the
  target's random draws (research/spec_tree.md §1.4). Pruning is deterministic, so it stays lossless.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tokenprune.speculative.tree import TokenTree

__all__ = ["accept_greedy", "accept_sample"]

# (context ids [1, L], logits [1, V]) -> processed scores [1, V]
Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _walk(tree: TokenTree, logits: torch.Tensor, prefix: torch.Tensor, process: Optional[Processor],
          pick: Callable[[TokenTree, int, torch.Tensor], tuple[Optional[int], int]]) -> tuple[list[int], int]:
    node, path = 0, [0]
    context = prefix
    while True:
        scores = logits[node : node + 1].float()
        if process is not None:
            scores = process(context, scores)
        child, token = pick(tree, node, scores[0])
        if child is None:
            return path, token
        path.append(child)
        node = child
        context = torch.cat([context, context.new_tensor([[token]])], dim=1)


def accept_greedy(tree: TokenTree, logits: torch.Tensor, prefix: torch.Tensor,
                  process: Optional[Processor] = None) -> tuple[list[int], int]:
    """Longest root-to-node path matching the target's argmax.

    Args:
        tree: the verified tree (``N`` nodes).
        logits: ``[N, V]`` target logits at each node.
        prefix: ``[1, L]`` committed ids ending with the root token (the processors' context).
        process: logits processor applied to each row before the argmax.

    Returns:
        (accepted node indices starting with the root, bonus token).
    """

    def pick(tree: TokenTree, node: int, scores: torch.Tensor) -> tuple[Optional[int], int]:
        token = int(scores.argmax())
        return tree.child(node, token), token

    return _walk(tree, logits, prefix, process, pick)


def accept_sample(tree: TokenTree, logits: torch.Tensor, prefix: torch.Tensor,
                  process: Optional[Processor] = None, generator: Optional[torch.Generator] = None
                  ) -> tuple[list[int], int]:
    """Lossless multi-candidate acceptance for a deterministic tree (children tried best-first).

    Same arguments and return value as :func:`accept_greedy`; ``process`` must include the
    sampling warpers (temperature, top-k/p) so that ``softmax(process(...))`` is the target's
    sampling distribution.
    """
    scores_of = tree.scores()

    def pick(tree: TokenTree, node: int, scores: torch.Tensor) -> tuple[Optional[int], int]:
        p = torch.softmax(scores.double().cpu(), dim=-1)
        for child in sorted(tree.children(node), key=lambda c: (-float(scores_of[c]), c)):
            x = tree.tokens[child]
            r = torch.rand((), dtype=torch.float64, generator=generator)
            if r < p[x]:
                return child, x
            # r < 1 always, so a token holding all the mass is accepted and the sum stays > 0
            p[x] = 0.0
            p = p / p.sum()
        token = int(torch.multinomial(p.float(), 1, generator=generator))
        return None, token

    return _walk(tree, logits, prefix, process, pick)
