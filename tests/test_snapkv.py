"""SnapKV in Hugging Face causal LMs: selection against an independent reference (eager attention
weights, pooled), decoding on the compressed cache, keep-all exactness, padded batches."""

import pytest
import torch

import tokenprune as tp
from causal_lm_utils import left_padded, load, prompt

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gqa_path(fixtures_dir):
    from tokenprune.fixtures import build_tiny_causal_lm

    return build_tiny_causal_lm(fixtures_dir / "tiny-mistral-gqa", arch="mistral", num_heads=4, num_kv_heads=2)


def reference_indices(model, ids, kept, window, kernel):
    """Kept prompt indices ``[layers][1, Hk, kept]`` from the eager attention weights of the unpatched
    model: votes of the last ``window`` queries summed, averaged over each KV head's query heads,
    average-pooled, top ``kept - window`` plus the window."""
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    length = ids.shape[1]
    hk = model.config.num_key_value_heads
    result = []
    for attn in out.attentions:
        b, hq = attn.shape[:2]
        votes = attn[:, :, -window:, : length - window].sum(2).view(b, hk, hq // hk, -1).mean(2)
        pooled = torch.nn.functional.avg_pool1d(votes, kernel, stride=1, padding=kernel // 2)
        top = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[..., : kept - window]
        window_idx = torch.arange(length - window, length).expand(b, hk, window)
        result.append(torch.sort(torch.cat([top, window_idx], -1), -1).values)
    return result


def test_bad_arguments():
    for kwargs, error in [({"keep": 0}, ValueError), ({"keep": 1.5}, ValueError), ({"keep": "all"}, TypeError),
                          ({"window": 0}, ValueError), ({"kernel": 4}, ValueError), ({"kernel": 0}, ValueError),
                          ({"impl": "x"}, ValueError)]:
        with pytest.raises(error, match=next(iter(kwargs))):
            tp.SnapKV(**kwargs)


@pytest.mark.parametrize("fixture", ["tiny_llama_path", "gqa_path"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_selection_matches_pooled_eager_attention(request, fixture, impl):
    path = request.getfixturevalue(fixture)
    ids = prompt(1, 60, seed=2)
    kept, window, kernel = 24, 8, 5
    ref = reference_indices(load(path, "eager"), ids, kept, window, kernel)
    model = load(path, impl)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True).past_key_values
        with tp.patch(model, tp.SnapKV(keep=kept, window=window, kernel=kernel)) as handle:
            out = model(input_ids=ids, use_cache=True)
    for layer, (compressed, original, idx) in enumerate(zip(out.past_key_values.layers, full.layers, ref)):
        gather = idx.unsqueeze(-1).expand(-1, -1, -1, original.keys.shape[-1])
        torch.testing.assert_close(compressed.keys, torch.gather(original.keys, 2, gather), rtol=0, atol=1e-6)
        torch.testing.assert_close(compressed.values, torch.gather(original.values, 2, gather), rtol=0, atol=1e-6)
    assert [(r.layer, r.before, r.after) for r in handle.stats.last()] == [(i, 60, 24) for i in range(4)]
    # the prefill itself is the unpruned one (SnapKV compresses after each layer's attention)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, load(path, impl)(input_ids=ids).logits)


def test_decoding_uses_the_compressed_cache(tiny_llama_path):
    model = load(tiny_llama_path)
    ids = prompt(1, 50, seed=4)
    kept, window = 20, 6
    ref = reference_indices(load(tiny_llama_path, "eager"), ids, kept, window, 5)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        for layer, idx in zip(cache.layers, ref):
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = torch.gather(layer.keys, 2, gather), torch.gather(layer.values, 2, gather)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        expected = model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[50]])).logits[:, -1]
    with tp.patch(model, tp.SnapKV(keep=kept, window=window)):
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(gen.scores[1], expected, rtol=1e-5, atol=1e-5)
    assert [layer.keys.shape[2] for layer in gen.past_key_values.layers] == [kept + 2] * 4


@pytest.mark.parametrize("keep", [1.0, 64])
def test_keep_all_is_identical(tiny_llama_path, keep):
    model = load(tiny_llama_path)
    ids = prompt(2, 40)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0

    def run():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)

    base = run()
    with tp.patch(model, tp.SnapKV(keep=keep, window=4)):
        same = run()
    assert torch.equal(base.sequences, same.sequences)
    assert torch.equal(torch.stack(base.scores), torch.stack(same.scores))
    after = run()
    assert torch.equal(base.sequences, after.sequences)
    for layer in model.model.layers:
        assert not layer._forward_hooks and not layer.self_attn._forward_pre_hooks


def test_left_padded_rows_are_independent(tiny_llama_path):
    model = load(tiny_llama_path)
    rows = [prompt(1, 44, seed=7), prompt(1, 30, seed=8)]
    method = tp.SnapKV(keep=0.5, window=4)

    def run(ids, mask):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)

    with tp.patch(model, method) as handle:
        singles = [run(ids, torch.ones_like(ids)) for ids in rows]
        batch, mask = left_padded(rows)
        out = run(batch, mask)
    assert [(r.row, r.before, r.after) for r in handle.stats.last() if r.layer == 0] == [(0, 44, 22), (1, 30, 15)]
    assert out.past_key_values.layers[0].keys.shape[2] == 22 + 4
    for i, single in enumerate(singles):
        assert torch.equal(out.sequences[i, 44:], single.sequences[0, -5:])
        torch.testing.assert_close(torch.stack(out.scores)[:, i], torch.stack(single.scores)[:, 0], rtol=1e-4, atol=1e-4)
