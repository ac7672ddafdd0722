"""Budgeted pruning of draft trees (EAGLE-2 rerank with depth and width limits).

Li et al., "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees" (EMNLP 2024):
a node's value is the product of draft confidences along its path (here the sum of log-probs,
:meth:`TokenTree.scores`). Expansion keeps a beam of the best ``max_width`` nodes per depth; the
rerank then keeps the global top ``budget`` nodes by value. Because an edge log-prob is <= 0, a
child never outscores its parent; ties are broken toward shallower nodes, so the kept set is
ancestor-closed (a tree) without repair. The loop below still adds a node only when its parent is
kept, which makes connectivity hold by construction rather than by assumption.
"""

from __future__ import annotations

from typing import Optional

from tokenprune.speculative.tree import TokenTree

__all__ = ["prune_tree", "ranked_nodes"]


def _validate(name: str, value: Optional[int], minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum} or None, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def ranked_nodes(tree: TokenTree, max_depth: Optional[int] = None, max_width: Optional[int] = None) -> list[int]:
    """Non-root nodes allowed by the depth/width limits, best first.

    Width limit = EAGLE-2's per-depth beam: at depth ``d`` only the ``max_width`` best children of
    the nodes kept at depth ``d - 1`` survive. Order: score descending, then depth, then index, so
    every node comes after its parent.
    """
    _validate("max_depth", max_depth, 1)
    _validate("max_width", max_width, 1)
    scores = tree.scores().tolist()
    key = lambda i: (-scores[i], tree.depths[i], i)  # noqa: E731
    frontier = [0]
    allowed: list[int] = []
    depth = 0
    while frontier and (max_depth is None or depth < max_depth):
        candidates = [c for p in frontier for c in tree.children(p)]
        candidates.sort(key=key)
        if max_width is not None:
            candidates = candidates[:max_width]
        allowed.extend(candidates)
        frontier = candidates
        depth += 1
    allowed.sort(key=key)
    return allowed


def prune_tree(tree: TokenTree, budget: int, max_depth: Optional[int] = None,
               max_width: Optional[int] = None) -> TokenTree:
    """Keep the root and the best ``budget`` draft nodes as a connected tree.

    Args:
        tree: the candidate tree (any size).
        budget: draft nodes kept, excluding the root (the target forward sees ``budget + 1`` tokens).
        max_depth: deepest level kept (root = depth 0); ``None`` = unlimited.
        max_width: nodes kept per depth (beam width); ``None`` = unlimited.

    Returns:
        a new :class:`TokenTree` with at most ``budget + 1`` nodes, topologically ordered.
    """
    _validate("budget", budget, 0)
    kept = {0}
    for node in ranked_nodes(tree, max_depth, max_width):
        if len(kept) > budget:
            break
        if tree.parents[node] in kept:
            kept.add(node)
    return tree.subtree(sorted(kept))
