"""Tree speculative decoding in HF generate: exactness, KV cache, sampling, patching (tiny random Llamas)."""

import pytest
import torch

import tokenprune as tp

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tokenprune.integrations.hf.speculative import HFTarget, tree_generate  # noqa: E402
from tokenprune.speculative import TokenTree  # noqa: E402
from tokenprune.speculative.verify import accept_greedy  # noqa: E402


def tiny_llama(seed: int, vocab: int = 96, layers: int = 2, init: float = 0.3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=init,
                      max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def draft():
    return tiny_llama(1, layers=1)


def prompts(vocab: int = 96):
    g = torch.Generator().manual_seed(0)
    out = [torch.randint(0, vocab, (1, n), generator=g) for n in (1, 5, 23)]
    motif = torch.randint(0, vocab, (7,), generator=g)
    out.append(torch.cat([motif] * 4)[None])  # repetitive: lookup sources fire
    code = torch.randint(0, vocab, (12,), generator=g)
    out.append(torch.cat([code, code[:5], torch.randint(0, vocab, (3,), generator=g), code])[None])
    return out


def greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)


def tree(model, ids, n, method, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, custom_generate=tree_generate,
                          draft_tree=method, **kw)


def test_random_model_depends_on_input(model):
    a = greedy(model, torch.tensor([[1, 2, 3]]), 8)
    b = greedy(model, torch.tensor([[1, 2, 4]]), 8)
    assert not torch.equal(a[:, 3:], b[:, 3:])


CONFIGS = [
    dict(sources=("ngram",), budget=0),
    dict(sources=("ngram",), budget=1),
    dict(sources=("ngram",), budget=6),
    dict(sources=("recycling",), budget=16),
    dict(sources=("ngram", "recycling"), budget="auto", max_budget=16),
    dict(sources=("retrieval",), budget=8, corpus=((3, 4, 5, 6, 7, 8), (9, 10, 11, 12))),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{'+'.join(c['sources'])}-{c['budget']}")
def test_greedy_identical_to_generate(model, config):
    method = tp.DraftTree(**config)
    for ids in prompts():
        for n in (1, 9, 40):
            assert torch.equal(tree(model, ids, n, method), greedy(model, ids, n)), (ids, n)


@pytest.mark.parametrize("budget", [3, 12])
def test_greedy_identical_with_draft_model(model, draft, budget):
    for method in (tp.DraftTree(sources=("draft_model",), draft_model=draft, budget=budget),
                   tp.DraftTree(sources=("ngram", "draft_model"), draft_model=draft, budget=budget)):
        for ids in prompts()[3:]:
            assert torch.equal(tree(model, ids, 20, method), greedy(model, ids, 20))


def test_self_draft_accepts_long_paths_and_stops_mid_path(model):
    """The target as its own draft accepts whole paths: max_new_tokens and EOS fall inside them."""
    ids = prompts()[2]
    method = tp.DraftTree(sources=("draft_model",), draft_model=model, budget=8, max_depth=6, draft_topk=1)
    for n in (3, 7, 13):
        out = tree(model, ids, n, method)
        assert torch.equal(out, greedy(model, ids, n)) and out.shape[1] == ids.shape[1] + n
    stats = method.speculator().stats
    assert max(stats.accepted) == 6 and stats.forwards_per_token < 0.5
    # EOS: the 5th generated token; plain greedy stops there, and so must the tree (inside a path)
    ref = greedy(model, ids, 30)
    eos = int(ref[0, ids.shape[1] + 4])
    first = int((ref[0, ids.shape[1]:] == eos).nonzero()[0])
    out = tree(model, ids, 30, method, eos_token_id=eos)
    assert torch.equal(out, greedy(model, ids, 30, eos_token_id=eos))
    assert out.shape[1] == ids.shape[1] + first + 1
    assert method.speculator().stats.accepted[-1] > 0


def test_fewer_forwards_when_text_is_in_the_datastore(model):
    """Text the datastore already holds (a quoted document) is verified many tokens per forward:
    >= 2x fewer target forwards than plain decoding, same output."""
    ids = prompts()[2]
    ref = greedy(model, ids, 60)
    method = tp.DraftTree(sources=("retrieval", "ngram"), corpus=(ref[0].tolist(),), budget=16)
    assert torch.equal(tree(model, ids, 60, method), ref)
    stats = method.speculator().stats
    assert stats.forwards_per_token <= 0.5, stats.summary()


def test_kv_cache_equals_sequential_decoding(model):
    ids = prompts()[2]
    ref = greedy(model, ids, 6)[0, ids.shape[1]:].tolist()
    cache = transformers.DynamicCache(config=model.config)
    target = HFTarget(model, cache)
    with torch.no_grad():
        root = int(target.prefill(ids).argmax())
        assert root == ref[0]
        t = TokenTree(root)
        t.add_path([7, 8])  # wrong branch
        t.add_path(ref[1:4])  # greedy path
        t.add_path([ref[1], 5])  # branch off the greedy path
        logits = target.verify(t)
        path, bonus = accept_greedy(t, logits, torch.cat([ids, torch.tensor([[root]])], 1))
        target.commit(path)
    assert [t.tokens[i] for i in path] == ref[:4] and bonus == ref[4]
    seq = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=seq, use_cache=True)
        for token in ref[:4]:
            model(torch.tensor([[token]]), past_key_values=seq, use_cache=True)
    assert cache.get_seq_length() == seq.get_seq_length() == ids.shape[1] + 4
    for a, b in zip(cache.layers, seq.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_sampling_matches_target_distribution():
    """Joint law of the first two sampled tokens vs the exact target probabilities (chi-square)."""
    from scipy.stats import chisquare

    vocab = 5
    m = tiny_llama(2, vocab=vocab, init=0.15)
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    with torch.no_grad():
        p1 = torch.softmax(m(ids).logits[0, -1].double(), -1)
        both = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
        p2 = torch.softmax(m(both).logits[:, -1].double(), -1)
    joint = (p1[:, None] * p2).flatten()
    method = tp.DraftTree(sources=("draft_model",), draft_model=m, budget=4, draft_topk=2)
    counts = torch.zeros(vocab * vocab)
    torch.manual_seed(0)
    n = 1000
    for _ in range(n):
        out = m.generate(ids, max_new_tokens=2, do_sample=True, top_k=0, custom_generate=tree_generate,
                         draft_tree=method)
        counts[int(out[0, -2]) * vocab + int(out[0, -1])] += 1
    assert sum(method.speculator().stats.accepted) >= 0  # drafts were verified every call
    keep = joint * n >= 5  # chi-square validity: pool the rare cells
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([joint[keep], joint[~keep].sum()[None]]) * n
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_patch_and_prune_decorator(model):
    ids = prompts()[3]
    ref = greedy(model, ids, 20)
    method = tp.DraftTree(sources=("ngram", "recycling"), budget=8)
    with tp.patch(model, method) as handle:
        assert "generate" in model.__dict__
        assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False), ref)
        assert handle.stats.calls == 1 and handle.stats.last()
        assert handle.spec_stats.new_tokens == 20
    assert "generate" not in model.__dict__ and "_tokenprune_handle" not in model.__dict__
    gen = tp.prune(tp.DraftTree(budget=4))(model.generate)
    assert torch.equal(gen(ids, max_new_tokens=20, do_sample=False), ref)
    assert gen.last_stats.calls == 1


def test_recycling_table_persists_across_calls(model):
    ids = prompts()[2]
    method = tp.DraftTree(sources=("recycling",), budget=16)
    tree(model, ids, 30, method)
    first = method.speculator().stats.forwards
    tree(model, ids, 30, method)
    assert method.speculator().stats.forwards < first  # hot start: the table remembers the continuation


def test_errors(model):
    with pytest.raises(ValueError, match="batch size 1"):
        tree(model, torch.tensor([[1, 2], [3, 4]]), 4, tp.DraftTree())
    with pytest.raises(TypeError, match="draft_tree"):
        tree(model, torch.tensor([[1, 2]]), 4, "ngram")
    with pytest.raises(ValueError, match="corpus_tokenizer"):
        tree(model, torch.tensor([[1, 2]]), 4, tp.DraftTree(sources=("retrieval",), corpus=("some text",)))
    with pytest.raises(NotImplementedError, match="llama"):
        tp.patch(torch.nn.Linear(2, 2), tp.DraftTree())


def test_fused_prefill_tree_cache_and_logits(model):
    """Prefill + first tree in one forward: same logits as separate forwards, same cache as sequential."""
    ids = prompts()[2]
    ref = greedy(model, ids, 4)[0, ids.shape[1]:].tolist()
    t = TokenTree(int(ids[0, -1]))
    t.add_path(ref[:3])
    t.add_path([ref[0], 9, 9])
    target = HFTarget(model, transformers.DynamicCache(config=model.config))
    with torch.no_grad():
        logits = target.prefill_tree(ids[:, :-1], t)
        full = model(torch.cat([ids, torch.tensor([ref[:3]])], 1)).logits[0, -4:]
    path_nodes = t.path_to(t.child(t.child(t.child(0, ref[0]), ref[1]), ref[2]))
    torch.testing.assert_close(logits[path_nodes], full, atol=1e-4, rtol=1e-4)
    path, bonus = accept_greedy(t, logits, ids)
    target.commit(path)
    assert [t.tokens[i] for i in path[1:]] == ref[:3] and bonus == ref[3]
    seq = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.cat([ids, torch.tensor([ref[:3]])], 1), past_key_values=seq, use_cache=True)
    for a, b in zip(target.cache.layers, seq.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_logits_processors_apply_along_each_path(model):
    """Repetition penalty and min_new_tokens (EOS suppression) see each node's own path."""
    method = tp.DraftTree(sources=("ngram", "recycling"), budget=12)
    for ids in prompts()[2:4]:
        kw = dict(repetition_penalty=1.8, no_repeat_ngram_size=3)
        assert torch.equal(tree(model, ids, 30, method, **kw), greedy(model, ids, 30, **kw))
        eos = int(greedy(model, ids, 3)[0, -1])
        kw = dict(eos_token_id=eos, min_new_tokens=10)
        assert torch.equal(tree(model, ids, 30, method, **kw), greedy(model, ids, 30, **kw))


def test_return_dict_in_generate(model):
    ids = prompts()[3]
    out = tree(model, ids, 12, tp.DraftTree(budget=8), return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(model, ids, 12))
    # the cache holds every token but the last emitted one (the next root)
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1
    # also when EOS stops generation inside an accepted path of the target as its own draft
    method = tp.DraftTree(sources=("draft_model",), draft_model=model, budget=8, max_depth=6, draft_topk=1)
    eos = int(greedy(model, ids, 4)[0, -1])
    out = tree(model, ids, 12, method, eos_token_id=eos, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(model, ids, 12, eos_token_id=eos))
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1


def test_one_method_on_two_models_keeps_state_per_model(model):
    """One DraftTree reused on models with different vocabularies: the recycling table learned on
    one model (token ids of its vocabulary) never drafts for the other, and both stay exact."""
    big = tiny_llama(2, vocab=160)
    ids_big = torch.tensor([[150, 151, 152, 150, 151, 152, 150, 151]])  # ids only the big model has
    ids_small = prompts()[3]
    method = tp.DraftTree(sources=("ngram", "recycling"), budget=8)
    with tp.patch(big, method):
        assert torch.equal(big.generate(ids_big, max_new_tokens=16, do_sample=False), greedy(big, ids_big, 16))
    big_table = next(s for s in method.speculator(model=big).sources if s.name == "recycling").next_tokens.clone()
    assert int(big_table.max()) >= 96  # the big model's table learned ids the small model does not have
    with tp.patch(model, method):  # raised IndexError inside the embedding before per-model state
        assert torch.equal(model.generate(ids_small, max_new_tokens=16, do_sample=False),
                           greedy(model, ids_small, 16))
    small = method.speculator()  # no model: the speculator of the latest call
    assert small is method.speculator(model=model) and small is not method.speculator(model=big)
    recycling = next(s for s in small.sources if s.name == "recycling")
    assert recycling.next_tokens.shape[0] == 96 and int(recycling.next_tokens.max()) < 96
    # the big model's state is untouched by the other model's calls, and still exact
    big_spec = method.speculator(model=big)
    assert torch.equal(next(s for s in big_spec.sources if s.name == "recycling").next_tokens, big_table)
    assert torch.equal(tree(big, ids_big, 16, method), greedy(big, ids_big, 16))


def test_draft_and_corpus_outside_the_target_vocabulary_are_refused(model):
    ids = prompts()[3]
    with pytest.raises(ValueError, match=r"corpus.*vocabulary.*96"):
        tree(model, ids, 4, tp.DraftTree(sources=("retrieval",), corpus=((5, 6, 500),), budget=4))
    with pytest.raises(ValueError, match=r"draft_model.*vocabulary"):
        tree(model, ids, 4, tp.DraftTree(sources=("draft_model",), draft_model=tiny_llama(3, vocab=200), budget=4))
