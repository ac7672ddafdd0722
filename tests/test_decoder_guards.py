"""The decoder runtime (FastV, LazyLLM, SnapKV, Knorm) under generate options it cannot follow, and row
independence of KV policies on padded batches with short rows. Each case failed silently before:
wrong tokens or a raw torch error deep inside generate."""

import pytest
import torch

import tokenprune as tp
from causal_lm_utils import left_padded, load, prompt

transformers = pytest.importorskip("transformers")

POLICIES = {
    "lazyllm": lambda: tp.LazyLLM(schedule=((1, 0.5),), window=4),
    "lazyllm-norevive": lambda: tp.LazyLLM(schedule=((1, 0.5),), window=4, revive=False),
    "snapkv": lambda: tp.SnapKV(keep=0.5, window=4),
    "knorm": lambda: tp.Knorm(keep=0.5),
    "lazyllm+snapkv": lambda: [tp.LazyLLM(schedule=((1, 0.5),), window=4, revive=False), tp.SnapKV(keep=0.5, window=4)],
}
GREEDY = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def model(tiny_llama_path):
    return load(tiny_llama_path)


def _filled_cache(model, ids):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **GREEDY)
    return out.past_key_values


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("option, error, match", [
    ({"use_cache": False}, ValueError, "use_cache"),
    ({"cache_implementation": "static"}, NotImplementedError, "cache_implementation='static'"),
    ({"prompt_lookup_num_tokens": 3}, NotImplementedError, "prompt_lookup_num_tokens"),
    ("generation_config", NotImplementedError, "prompt_lookup_num_tokens"),
    ("past", ValueError, "empty cache"),
])
def test_unsupported_generate_options_are_refused_before_any_work(model, name, option, error, match):
    ids = prompt(1, 24)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY)
    if option == "generation_config":
        kwargs["generation_config"] = transformers.GenerationConfig(prompt_lookup_num_tokens=3, **GREEDY)
    elif option == "past":
        kwargs["past_key_values"] = _filled_cache(model, ids)
        kwargs["input_ids"] = kwargs["attention_mask"] = torch.cat([ids, ids[:, :2]], 1)
    else:
        kwargs.update(option)
    with tp.patch(model, POLICIES[name]()) as handle:
        with pytest.raises(error, match=match):
            model.generate(**kwargs)
        assert handle.stats.calls == 0  # refused before the prefill
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY)  # the patch still works
        assert handle.stats.calls == 1


def test_an_assistant_model_is_refused(model):
    ids = prompt(1, 24)
    with tp.patch(model, tp.Knorm(keep=0.5)):
        with pytest.raises(NotImplementedError, match="assistant_model"):
            model.generate(input_ids=ids, assistant_model=model, **GREEDY)


def test_a_non_dynamic_cache_object_is_refused(model):
    ids = prompt(1, 24)
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    with tp.patch(model, tp.SnapKV(keep=0.5, window=4)):
        with pytest.raises(NotImplementedError, match="DynamicCache.*StaticCache"):
            model.generate(input_ids=ids, past_key_values=cache, **GREEDY)


@pytest.mark.parametrize("name", ["snapkv", "lazyllm+snapkv"])
def test_a_short_row_in_a_padded_batch_is_pruned_as_if_alone(model, name):
    """A prompt no longer than SnapKV's window keeps every entry alone; in a batch beside a long row
    it must too (the long row decides the padded width, not the short row's budget)."""
    long, short = prompt(1, 40, seed=1), prompt(1, 3, seed=2)
    ids, mask = left_padded([long, short])
    with tp.patch(model, POLICIES[name]()) as handle:
        batch = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                               **GREEDY)
        kv = [r for r in handle.stats.last() if r.kind == "kv" and r.row == 1]
        alone = model.generate(input_ids=short, attention_mask=torch.ones_like(short), output_scores=True,
                               return_dict_in_generate=True, **GREEDY)
    assert kv and all(r.after == r.before for r in kv)  # the short row kept every entry it had
    assert torch.equal(batch.sequences[1, -3:], alone.sequences[0, -3:])
    for step_batch, step_alone in zip(batch.scores, alone.scores):
        torch.testing.assert_close(step_batch[1], step_alone[0], atol=1e-4, rtol=1e-4)


def test_summary_of_a_decoder_composition_spans_first_to_last_stage(model):
    ids = prompt(1, 40)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY)
    summaries = []
    for method in (tp.Knorm(keep=0.5), [tp.LazyLLM(schedule=((1, 1.0),), revive=False), tp.Knorm(keep=0.5)]):
        with tp.patch(model, method) as handle:
            model.generate(**inputs)
        summaries.append(handle.stats.summary())
    alone, composed = summaries
    assert composed["tokens_before"] == alone["tokens_before"] == 40 * model.config.num_hidden_layers
    assert composed["tokens_after"] == alone["tokens_after"] == 20 * model.config.num_hidden_layers


def test_a_one_element_tuple_target_takes_a_single_method(model):
    ids = prompt(1, 24)
    with tp.patch((model,), tp.Knorm(keep=0.5)) as handle:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY)
    assert handle.stats.calls == 1
