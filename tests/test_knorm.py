"""Knorm (a KV policy written in one small file): selection against an independent reference (the
unpatched cache's key norms), decoding on the compressed cache, keep-all exactness, padded batches."""

from pathlib import Path

import pytest
import torch

import tokenprune as tp
from causal_lm_utils import left_padded, load, prompt

transformers = pytest.importorskip("transformers")


def test_the_method_is_a_small_file():
    """The decoder runtime owns hooks, ranking, gathers and masks: a KV method is its score."""
    source = Path(tp.Knorm.__module__.replace(".", "/") + ".py")
    lines = (Path(__file__).resolve().parents[1] / source).read_text().splitlines()
    assert len(lines) <= 40


def reference_indices(cache, kept):
    """Per layer ``[B, Hk, kept]``: the prompt entries whose keys have the smallest L2 norm (ties to the
    lowest index), ascending."""
    result = []
    for layer in cache.layers:
        norms = layer.keys.double().norm(dim=-1)
        top = torch.sort(-norms, dim=-1, descending=True, stable=True).indices[..., :kept]
        result.append(torch.sort(top, -1).values)
    return result


def test_bad_arguments():
    for kwargs, error in [({"keep": 0}, ValueError), ({"keep": 1.5}, ValueError), ({"keep": "all"}, TypeError)]:
        with pytest.raises(error, match="keep"):
            tp.Knorm(**kwargs)
    assert "knorm" in tp.available_methods() and tp.build("knorm", keep=8) == tp.Knorm(keep=8)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_selection_keeps_the_smallest_key_norms(tiny_llama_path, impl):
    model = load(tiny_llama_path, impl)
    ids = prompt(1, 40, seed=3)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True).past_key_values
        with tp.patch(model, tp.Knorm(keep=15)) as handle:
            out = model(input_ids=ids, use_cache=True)
    for compressed, original, idx in zip(out.past_key_values.layers, full.layers, reference_indices(full, 15)):
        gather = idx.unsqueeze(-1).expand(-1, -1, -1, original.keys.shape[-1])
        assert torch.equal(compressed.keys, torch.gather(original.keys, 2, gather))
        assert torch.equal(compressed.values, torch.gather(original.values, 2, gather))
    assert [(r.layer, r.before, r.after, r.kind) for r in handle.stats.last()] == [(i, 40, 15, "kv") for i in range(4)]


def test_decoding_uses_the_compressed_cache(tiny_llama_path):
    model = load(tiny_llama_path)
    ids = prompt(1, 36, seed=4)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        for layer, idx in zip(cache.layers, reference_indices(cache, 12)):
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = torch.gather(layer.keys, 2, gather), torch.gather(layer.values, 2, gather)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        expected = model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[36]])).logits[:, -1]
    with tp.patch(model, tp.Knorm(keep=12)):
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(gen.scores[1], expected, rtol=1e-5, atol=1e-5)
    assert [layer.keys.shape[2] for layer in gen.past_key_values.layers] == [12 + 2] * 4


def test_keep_all_is_identical_and_padded_rows_are_independent(tiny_llama_path):
    model = load(tiny_llama_path)

    def run(ids, mask):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)

    rows = [prompt(1, 30, seed=7), prompt(1, 21, seed=8)]
    batch, mask = left_padded(rows)
    base = run(batch, mask)
    with tp.patch(model, tp.Knorm(keep=1.0)):
        same = run(batch, mask)
    assert torch.equal(base.sequences, same.sequences)
    assert torch.equal(torch.stack(base.scores), torch.stack(same.scores))
    with tp.patch(model, tp.Knorm(keep=0.5)) as handle:
        singles = [run(ids, torch.ones_like(ids)) for ids in rows]
        out = run(batch, mask)
    assert [(r.row, r.before, r.after) for r in handle.stats.last() if r.layer == 0] == [(0, 30, 15), (1, 21, 11)]
    for i, single in enumerate(singles):
        assert torch.equal(out.sequences[i, 30:], single.sequences[0, -4:])
        torch.testing.assert_close(torch.stack(out.scores)[:, i], torch.stack(single.scores)[:, 0], rtol=1e-4, atol=1e-4)
