"""Draft-tree IR, pruning, latency budget and acceptance rules (no model needed)."""

import math
import random

import pytest
import torch

import tokenprune as tp
from tokenprune.speculative import LatencyModel, TokenTree, choose_budget, prune_tree, ranked_nodes
from tokenprune.speculative.sources import NGramSource, RecyclingSource, RetrievalSource, tree_from_continuations
from tokenprune.speculative.verify import accept_greedy, accept_sample


def random_tree(seed: int, n: int = 40, vocab: int = 12) -> TokenTree:
    rng = random.Random(seed)
    tree = TokenTree(rng.randrange(vocab))
    while len(tree) < n:
        tree.add(rng.randrange(len(tree)), rng.randrange(vocab), math.log(rng.uniform(0.05, 1.0)))
    return tree


def ancestors_brute(tree: TokenTree, i: int) -> set:
    out = {i}
    while tree.parents[i] >= 0:
        i = tree.parents[i]
        out.add(i)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_mask_positions_paths_match_brute_force(seed):
    tree = random_tree(seed)
    n = len(tree)
    mask = tree.ancestor_mask()
    for i in range(n):
        expected = ancestors_brute(tree, i)
        assert {j for j in range(n) if mask[i, j]} == expected
        assert int(tree.position_ids(7)[i]) == 7 + len(expected) - 1
    full = tree.attention_mask(5)
    assert full.shape == (1, 1, n, 5 + n)
    assert (full[0, 0, :, :5] == 0).all()
    assert torch.equal(full[0, 0, :, 5:] == 0, mask)
    # root-to-leaf paths: every leaf exactly once, each row a parent chain
    paths = tree.paths()
    leaves = {i for i in range(n) if i not in set(tree.parents)}
    assert {int(r[r >= 0][-1]) for r in paths} == leaves
    for row in paths:
        row = row[row >= 0].tolist()
        assert row[0] == 0 and all(tree.parents[b] == a for a, b in zip(row, row[1:]))
    # topological order and scores = sum of edge log-probs along the path
    scores = tree.scores()
    for i in range(1, n):
        assert tree.parents[i] < i
        assert scores[i] == pytest.approx(sum(tree.logq[j] for j in ancestors_brute(tree, i)))


def test_merge_by_longest_common_prefix():
    a = TokenTree(1)
    a.add_path([2, 3, 4], [-0.1, -0.2, -0.3])
    b = TokenTree(1)
    b.add_path([2, 3, 5], [-0.5, -0.05, -0.1])
    b.add_path([6], [-1.0])
    a.merge(b)
    assert len(a) == 1 + 2 + 2 + 1  # shared 2,3 then branches 4 / 5, and 6
    node3 = a.child(a.child(0, 2), 3)
    assert a.logq[node3] == pytest.approx(-0.05)  # merged edge keeps the larger estimate
    with pytest.raises(ValueError, match="different roots"):
        a.merge(TokenTree(9))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [0, 1, 5, 17, 100])
def test_pruned_tree_connected_in_budget_and_best(seed, budget):
    tree = random_tree(seed, n=60)
    pruned = prune_tree(tree, budget)
    assert len(pruned) == min(budget, len(tree) - 1) + 1
    assert all(pruned.parents[i] < i for i in range(1, len(pruned)))  # connected, topological
    # the kept nodes are exactly the best `budget` paths by score (ties: shallower first)
    scores = tree.scores()
    order = sorted(range(1, len(tree)), key=lambda i: (-float(scores[i]), tree.depths[i], i))
    best = {tuple(tree.tokens[j] for j in tree.path_to(i)) for i in order[:budget]}
    kept = {tuple(pruned.tokens[j] for j in pruned.path_to(i)) for i in range(1, len(pruned))}
    assert kept == best


def test_depth_and_width_limits():
    tree = random_tree(3, n=80)
    pruned = prune_tree(tree, 50, max_depth=2, max_width=3)
    assert max(pruned.depths) <= 2
    for d in (1, 2):
        assert sum(1 for x in pruned.depths if x == d) <= 3
    # the width limit is a beam: depth-2 nodes only under kept depth-1 nodes (connectivity)
    assert all(pruned.parents[i] < i for i in range(1, len(pruned)))
    ranked = ranked_nodes(tree, max_depth=2, max_width=3)
    assert len(ranked) == len(pruned) - 1
    with pytest.raises(ValueError, match="budget"):
        prune_tree(tree, -1)
    with pytest.raises(TypeError, match="max_width"):
        prune_tree(tree, 3, max_width=1.5)


def test_ngram_source_builds_trie_of_recent_matches():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    tree = NGramSource(max_ngram=3).propose(ctx, max_depth=2)
    assert tree.root == 3
    first = {tree.tokens[c] for c in tree.children(0)}
    assert first == {9, 7}
    assert tree.child(tree.child(0, 7), 8) is not None and tree.child(tree.child(0, 9), 1) is not None
    assert len(NGramSource().propose([4, 5, 6], 4)) == 1  # no match: empty tree


def test_frequency_scores():
    tree = tree_from_continuations(0, [[1, 2], [1, 3], [1, 2], [4]], confidence=0.5)
    n1 = tree.child(0, 1)
    assert tree.logq[n1] == pytest.approx(math.log(0.5 * 3 / 4))
    assert tree.logq[tree.child(n1, 2)] == pytest.approx(math.log(0.5 * 2 / 3))


def test_retrieval_source_suffix_match():
    corpus = [[10, 11, 12, 13, 14], [20, 11, 12, 15]]
    source = RetrievalSource(corpus, max_ngram=3)
    tree = source.propose([5, 11, 12], max_depth=2)
    assert {tree.tokens[c] for c in tree.children(0)} == {13, 15}
    tree = source.propose([10, 11, 12], max_depth=3)  # the longer match wins
    assert [tree.tokens[c] for c in tree.children(0)] == [13]


def test_recycling_table_update_and_expansion():
    source = RecyclingSource(topk=2, branching=(2, 1))
    tree = TokenTree(0)
    tree.add_path([1])
    logits = torch.full((2, 5), -10.0)
    logits[0, 1], logits[0, 2] = 3.0, 2.0  # after token 0: 1 then 2
    logits[1, 4] = 5.0  # after token 1: 4
    source.observe(tree, logits)
    drafted = source.propose([7, 0], max_depth=3)
    assert [drafted.tokens[c] for c in drafted.children(0)] == [1, 2]
    assert drafted.tokens[drafted.children(drafted.child(0, 1))[0]] == 4
    p = torch.softmax(logits[0], -1)
    assert drafted.logq[drafted.child(0, 1)] == pytest.approx(float(p[1].log()), rel=1e-5)


def test_latency_model_and_budget_choice():
    lat = LatencyModel([1, 8, 32], [1.0, 1.0, 4.0])
    assert lat.time(4) == pytest.approx(1.0) and lat.time(20) == pytest.approx(2.5)
    # free up to 8 tokens: take every confident node up to 7 drafts
    scores = torch.log(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]))
    assert choose_budget(scores, lat, max_budget=32) == 7
    # expensive tokens: verify nothing unless confident
    steep = LatencyModel([1, 2], [1.0, 3.0])
    assert choose_budget(torch.log(torch.tensor([0.3])), steep, 8) == 0
    with pytest.raises(ValueError, match="increasing"):
        LatencyModel([2, 1], [1.0, 1.0])


def _toy_tree():
    tree = TokenTree(0)
    a = tree.add(0, 1, -0.1)
    tree.add(0, 2, -0.5)
    tree.add(a, 3, -0.2)
    tree.add(a, 1, -0.4)
    return tree


def test_accept_greedy_follows_argmax():
    tree = _toy_tree()
    logits = torch.zeros(len(tree), 5)
    logits[0, 1] = 5  # root -> 1 (node 1)
    logits[1, 3] = 5  # node 1 -> 3 (node 3)
    logits[3, 4] = 5  # bonus 4
    path, bonus = accept_greedy(tree, logits, torch.tensor([[0]]))
    assert path == [0, 1, 3] and bonus == 4
    logits[0, 1], logits[0, 0] = 0, 5  # root's argmax 0 is not drafted
    assert accept_greedy(tree, logits, torch.tensor([[0]])) == ([0], 0)


def test_accept_sample_is_lossless():
    """First emitted token ~ p_root; second token given a drafted first token ~ p_child."""
    torch.manual_seed(0)
    tree = _toy_tree()
    logits = torch.randn(len(tree), 5) * 1.5
    gen = torch.Generator().manual_seed(1)
    n = 20000
    first = torch.zeros(5)
    second = torch.zeros(5)  # given first token 1 (drafted node 1)
    for _ in range(n):
        path, bonus = accept_sample(tree, logits, torch.tensor([[0]]), generator=gen)
        emitted = [tree.tokens[i] for i in path[1:]] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 1:
            second[emitted[1]] += 1
    from scipy.stats import chisquare

    for counts, row in ((first, 0), (second, 1)):
        expected = torch.softmax(logits[row].double(), -1) * counts.sum()
        assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_method_validation_and_registry():
    assert "draft_tree" in tp.available_methods()
    m = tp.build("draft_tree", budget=4, sources=["ngram"])
    assert m.stage == "speculative" and m.sources == ("ngram",)
    config = m.to_config()
    assert config["budget"] == 4 and config.pop("method") == "draft_tree"
    assert tp.build("draft_tree", **config) == m  # the config round-trips
    with pytest.raises(ValueError, match="unknown source"):
        tp.DraftTree(sources=("magic",))
    with pytest.raises(ValueError, match="budget"):
        tp.DraftTree(budget=-1)
    with pytest.raises(TypeError, match="budget"):
        tp.DraftTree(budget="many")
    with pytest.raises(ValueError, match="corpus"):
        tp.DraftTree(sources=("retrieval",))
    with pytest.raises(ValueError, match="draft_model"):
        tp.DraftTree(sources=("draft_model",))
    with pytest.raises(ValueError, match="ngram_min"):
        tp.DraftTree(ngram_min=4, ngram_max=2)
