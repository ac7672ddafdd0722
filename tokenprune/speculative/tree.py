"""The draft-tree IR shared by every source, the pruner and the verifiers.

A tree of ``N`` nodes is stored flat and topologically sorted (every parent before its children).
Node 0 is the *root*: the last committed token, whose KV the target has not computed yet, so it is
verified together with the guesses below it. Each other node ``i`` is a guess ``tokens[i]`` for the
token that follows the path root -> ``parents[i]``, with a draft log-probability ``logq[i]`` of that
edge (exact for a draft model, an estimate for lookup sources).

Derived buffers (SpecInfer / Medusa / EAGLE "tree buffers", see research/spec_tree.md §0):

* ``ancestor_mask()``: ``[N, N]`` bool, ``M[i, j]`` iff ``j`` is ``i`` or an ancestor of ``i``;
* ``position_ids(prefix)``: ``[N]`` ``prefix + depth`` (siblings share a position);
* ``paths()``: ``[leaves, max_depth + 1]`` root-to-leaf node indices padded with -1;
* ``scores()``: ``[N]`` cumulative log-probability of each node's path (EAGLE-2's value).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["TokenTree"]


class TokenTree:
    """A draft token tree; build with :meth:`add` / :meth:`add_path`, merge with :meth:`merge`.

    Adding a (parent, token) pair that already exists does not duplicate the node: the edge keeps
    the larger log-probability. Trees therefore merge by longest common prefix.

    Args:
        root: token id of the root (the last committed token).
    """

    def __init__(self, root: int):
        self.tokens: list[int] = [int(root)]
        self.parents: list[int] = [-1]
        self.logq: list[float] = [0.0]
        self.depths: list[int] = [0]
        self._children: dict[int, dict[int, int]] = {0: {}}

    # ------------------------------------------------------------------ building
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def root(self) -> int:
        return self.tokens[0]

    def add(self, parent: int, token: int, logq: float = 0.0) -> int:
        """Add the edge ``parent -> token`` (or raise its log-prob if present); return the node index.

        ``logq`` is clamped to ``<= 0`` so that a child never outscores its parent, which keeps every
        top-k-by-score set ancestor-closed (EAGLE-2's rerank relies on it).
        """
        if not 0 <= parent < len(self.tokens):
            raise ValueError(f"parent must be an existing node index in [0, {len(self.tokens) - 1}], got {parent}")
        logq = min(float(logq), 0.0)
        if math.isnan(logq):
            raise ValueError("logq must not be NaN")
        token = int(token)
        siblings = self._children[parent]
        if token in siblings:
            node = siblings[token]
            self.logq[node] = max(self.logq[node], logq)
            return node
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.logq.append(logq)
        self.depths.append(self.depths[parent] + 1)
        self._children[node] = {}
        siblings[token] = node
        return node

    def add_path(self, tokens: Iterable[int], logqs: Optional[Iterable[float]] = None, parent: int = 0) -> list[int]:
        """Insert a chain of guesses below ``parent``; returns the node index of each token."""
        tokens = list(tokens)
        logqs = [0.0] * len(tokens) if logqs is None else list(logqs)
        if len(logqs) != len(tokens):
            raise ValueError(f"logqs must have one entry per token ({len(tokens)}), got {len(logqs)}")
        nodes = []
        for token, lq in zip(tokens, logqs):
            parent = self.add(parent, token, lq)
            nodes.append(parent)
        return nodes

    def merge(self, other: "TokenTree") -> "TokenTree":
        """Insert ``other``'s nodes into this tree (same root token), sharing common prefixes."""
        if other.root != self.root:
            raise ValueError(f"cannot merge trees with different roots ({self.root} vs {other.root})")
        mapping = [0] * len(other)
        for i in range(1, len(other)):
            mapping[i] = self.add(mapping[other.parents[i]], other.tokens[i], other.logq[i])
        return self

    def child(self, node: int, token: int) -> Optional[int]:
        """Index of ``node``'s child carrying ``token``, or ``None``."""
        return self._children[node].get(int(token))

    def children(self, node: int) -> list[int]:
        """Children of ``node`` in insertion order."""
        return list(self._children[node].values())

    def subtree(self, keep: Sequence[int]) -> "TokenTree":
        """The tree restricted to ``keep`` (must contain 0 and be ancestor-closed), re-indexed in
        the original (topological) order."""
        keep = sorted(set(int(i) for i in keep) | {0})
        kept = set(keep)
        out = TokenTree(self.root)
        new_index = {0: 0}
        for i in keep[1:]:
            p = self.parents[i]
            if p not in kept:
                raise ValueError(f"keep is not ancestor-closed: node {i} kept without its parent {p}")
            new_index[i] = out.add(new_index[p], self.tokens[i], self.logq[i])
        return out

    # ------------------------------------------------------------------ derived buffers
    def scores(self) -> torch.Tensor:
        """``[N]`` float64 cumulative log-probability of the path root -> i (root: 0)."""
        s = [0.0] * len(self)
        for i in range(1, len(self)):
            s[i] = s[self.parents[i]] + self.logq[i]
        return torch.tensor(s, dtype=torch.float64)

    def token_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.tokens, dtype=torch.long, device=device)

    def depth_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.depths, dtype=torch.long, device=device)

    def ancestor_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[N, N]`` bool: row i is True at i and at every ancestor of i (``M[i] = M[p(i)] | e_i``),
        built by walking all rows up one level at a time (``max depth`` vector steps)."""
        n = len(self)
        rows = torch.arange(n)
        up = torch.tensor(self.parents, dtype=torch.long).clamp_(min=0)  # the root is its own parent
        mask = torch.zeros(n, n, dtype=torch.bool)
        current = rows
        for _ in range(max(self.depths) + 1):
            mask[rows, current] = True
            current = up[current]
        return mask.to(device)

    def position_ids(self, prefix_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[N]`` positions ``prefix_len + depth`` (the root sits right after the committed prefix)."""
        return self.depth_tensor(device) + int(prefix_len)

    def attention_mask(self, prefix_len: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
        """Additive 4-D mask ``[1, 1, N, prefix_len + N]`` for one target forward over the tree:
        every node sees the whole committed prefix and its own ancestors; 0 = attend, dtype-min = masked."""
        n = len(self)
        allowed = torch.cat([torch.ones(n, prefix_len, dtype=torch.bool), self.ancestor_mask()], dim=1)
        mask = torch.zeros(n, prefix_len + n, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.to(device)[None, None]

    def leaves(self) -> list[int]:
        return [i for i in range(len(self)) if not self._children[i]]

    def path_to(self, node: int) -> list[int]:
        """Node indices root -> ``node`` inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def paths(self) -> torch.Tensor:
        """``[num_leaves, max_depth + 1]`` long: root-to-leaf node indices, padded with -1
        (EAGLE/Medusa ``retrieve_indices``)."""
        rows = [self.path_to(leaf) for leaf in self.leaves()]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)

    def __repr__(self) -> str:
        return f"TokenTree(root={self.root}, nodes={len(self)}, depth={max(self.depths)})"
