"""Composition: ``tp.patch(target, [methods])`` / ``tp.compose(...)``: ordering, refused combinations,
keep-all exactness, and a composed result equal to applying each method in turn."""

import pytest
import torch

import tokenprune as tp

transformers = pytest.importorskip("transformers")

from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from tokenprune.fixtures import make_image  # noqa: E402

from test_context_pruner import KeywordScorer  # noqa: E402

QUESTION = "what colour is the thing"


@pytest.fixture(scope="module")
def llava(tiny_llava_path):
    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    processor.tokenizer.padding_side = "left"
    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_path).eval(), processor


def llava_inputs(processor, rows=2):
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": QUESTION * (r + 1)}]}], add_generation_prompt=True)
             for r in range(rows)]
    return processor(images=[make_image(56, seed=r) for r in range(rows)], text=texts, return_tensors="pt", padding=True)


def greedy(model, inputs, n=5):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


# ----------------------------------------------------------------------------- validation


def test_methods_are_ordered_by_stage():
    c = tp.compose(tp.SnapKV(keep=0.5), tp.DivPrune(keep=8), tp.ContextPruner(scorer=KeywordScorer()))
    assert c.stages == ("context", "visual", "kv")
    assert tp.compose([tp.FastV(), tp.DivPrune()]).stages == ("visual", "llm")
    assert tp.compose(c, tp.FastV()).stages == ("context", "visual", "llm", "kv")  # nested compositions flatten
    assert c.to_config()["methods"][1] == tp.DivPrune(keep=8).to_config()


@pytest.mark.parametrize("methods, error, match", [
    ([], ValueError, "at least one"),
    ([tp.DivPrune(), tp.HoloV()], ValueError, "both act at stage 'visual'"),
    ([tp.FastV(), tp.LazyLLM()], ValueError, "FastV and LazyLLM cannot be composed"),
    ([tp.SnapKV(), tp.DraftTree()], ValueError, "SnapKV and DraftTree cannot be composed"),
    ([tp.LazyLLM(revive=True), tp.Knorm()], ValueError, "revive=False"),
    ([tp.DivPrune(), "fastv"], TypeError, r"methods\[1\].*tp.build\('fastv'"),
    ([tp.DivPrune(), 3], TypeError, r"methods\[1\] must be a tokenprune method"),
])
def test_bad_compositions_are_refused_before_patching(llava, methods, error, match):
    model, _ = llava
    before = dict(model.__dict__)
    with pytest.raises(error, match=match):
        tp.patch(model, methods)
    with pytest.raises(error, match=match):
        tp.compose(*methods)
    assert model.__dict__ == before


def test_a_context_method_needs_its_target(llava):
    model, _ = llava
    with pytest.raises(ValueError, match=r"tokenizer, processor or vLLM LLM.*tp.patch\(\(processor, model\)"):
        tp.patch(model, [tp.ContextPruner(scorer=KeywordScorer()), tp.DivPrune(keep=4)])
    assert tp.active_handle(model) is None


# ----------------------------------------------------------------------------- behaviour


def test_keep_all_composition_is_the_unpatched_model(llava):
    model, processor = llava
    inputs = llava_inputs(processor)
    base = greedy(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with tp.patch(model, [tp.DivPrune(keep=1.0, impl="torch"), tp.FastV(keep=1.0, impl="torch"), tp.SnapKV(keep=1.0)]):
        same = greedy(model, inputs)
    assert torch.equal(base[0], same[0]) and torch.equal(base[1], same[1])
    assert greedy(model, inputs)[0].equal(base[0])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__


def test_visual_then_inllm_equals_each_in_turn(llava):
    """DivPrune then FastV == FastV run on the prompt DivPrune produces."""
    from tokenprune.integrations.hf.adapters import get_adapter
    from tokenprune.integrations.hf.visual import prune_inputs

    model, processor = llava
    inputs = llava_inputs(processor)
    divprune, fastv = tp.DivPrune(keep=8, impl="torch"), tp.FastV(layer=2, keep=4, impl="torch")
    with tp.patch(model, tp.compose(divprune, fastv)) as handle:
        composed = greedy(model, inputs)
    summary = handle.stats.summary()
    assert (summary["tokens_before"], summary["tokens_after"]) == (2 * 16, 2 * 4)  # DivPrune saw 16, FastV kept 4
    assert {r.call for r in handle.stats.records} == {1}  # one generate call, one call number

    with tp.patch(model, divprune) as first:  # step 1: the pruned prompt DivPrune hands the decoder
        image_inputs = {"pixel_values": inputs["pixel_values"]}
        pruned = prune_inputs(first, get_adapter(model), divprune, inputs["input_ids"], inputs["attention_mask"],
                              image_inputs)
    with tp.patch(model, fastv):  # step 2: FastV on that prompt
        ids, mask = pruned.input_ids, pruned.attention_mask
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **pruned.encoder_kwargs, max_new_tokens=5,
                                 min_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(composed[0][:, inputs["input_ids"].shape[1]:], out.sequences[:, ids.shape[1]:])
    assert torch.equal(composed[1], torch.stack(out.scores))


@pytest.mark.parametrize("fastv_keep, kv_keep", [(4, 1.0), (1.0, 0.5)])
def test_inllm_with_kv_equals_the_other_alone_when_one_keeps_all(llava, fastv_keep, kv_keep):
    model, processor = llava
    inputs = llava_inputs(processor)
    fastv, snapkv = tp.FastV(layer=2, keep=fastv_keep, impl="torch"), tp.SnapKV(keep=kv_keep, window=4)
    with tp.patch(model, [fastv, snapkv]):
        composed = greedy(model, inputs)
    with tp.patch(model, snapkv if fastv_keep == 1.0 else fastv):
        alone = greedy(model, inputs)
    assert torch.equal(composed[0], alone[0])
    torch.testing.assert_close(composed[1], alone[1], rtol=1e-5, atol=1e-5)


def test_inllm_with_kv_compresses_the_pruned_layers(llava):
    """FastV drops image tokens before layer 2; SnapKV then keeps half of what each layer holds."""
    model, processor = llava
    inputs = llava_inputs(processor, rows=1)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), tp.patch(model, [tp.FastV(layer=2, keep=4, impl="torch"), tp.SnapKV(keep=0.5, window=4)]) as h:
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    pruned = length - 12  # 16 image tokens, 4 kept
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [(length + 1) // 2 + 2] * 2 + [(pruned + 1) // 2 + 2] * 2
    kv = [(r.layer, r.before, r.after) for r in h.stats.last() if r.kind == "kv"]
    assert kv == [(0, length, (length + 1) // 2), (1, length, (length + 1) // 2),
                  (2, pruned, (pruned + 1) // 2), (3, pruned, (pruned + 1) // 2)]


def test_context_then_visual_on_processor_and_model(llava):
    """ContextPruner on the tokenizer + DivPrune on the model == the documents pruned first, then DivPrune."""
    from test_context_hooks import DOCS, TEMPLATE

    from tokenprune.integrations.chat import prune_documents

    model, processor = llava
    tokenizer = processor.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = TEMPLATE.replace("{% if part['type'] == 'text' %}", "{% if part['type'] == 'image' %}<image>{% endif %}{% if part['type'] == 'text' %}")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "When was acme founded"}]}]
    pruner, divprune = tp.ContextPruner(scorer=KeywordScorer(), threshold=0.5, always_keep_title=False), tp.DivPrune(keep=6)

    def run():
        text = tokenizer.apply_chat_template(messages, documents=DOCS, tokenize=False, add_generation_prompt=True)
        return text, greedy(model, processor(images=[make_image(56, seed=1)], text=[text], return_tensors="pt"))

    try:
        with tp.patch((tokenizer, model), [divprune, pruner]) as handle:
            text, composed = run()
        assert tp.active_handle(tokenizer) is None and tp.active_handle(model) is None
        manual_docs = prune_documents(pruner, messages, DOCS)
        assert "anvils" in str(DOCS) and "anvils" not in text
        with tp.patch(model, divprune):
            manual = greedy(model, processor(images=[make_image(56, seed=1)], return_tensors="pt", text=[
                tokenizer.apply_chat_template(messages, documents=manual_docs, tokenize=False, add_generation_prompt=True)]))
    finally:
        tokenizer.chat_template = saved
    assert torch.equal(composed[0], manual[0]) and torch.equal(composed[1], manual[1])
    assert {r.kind for r in handle.stats.records} == {"context", "visual"}


def test_compose_as_a_decorator(llava):
    model, processor = llava
    inputs = llava_inputs(processor)

    @tp.compose(tp.DivPrune(keep=4, impl="torch"), tp.SnapKV(keep=0.5, window=4))
    def answer(m, batch):
        return greedy(m, batch)

    out = answer(model, inputs)
    assert answer.last_stats.summary()["tokens_after"] == 2 * 4
    assert {r.kind for r in answer.last_stats.records} == {"visual", "kv"}
    assert tp.active_handle(model) is None
    with tp.patch(model, [tp.DivPrune(keep=4, impl="torch"), tp.SnapKV(keep=0.5, window=4)]):
        assert torch.equal(greedy(model, inputs)[0], out[0])


def test_inllm_with_kv_keeps_padded_rows_independent(llava):
    """Fillers of both stages stay masked: each row of a padded batch decodes as it does alone."""
    model, processor = llava
    inputs = llava_inputs(processor)
    methods = [tp.FastV(layer=2, keep=4, impl="torch"), tp.SnapKV(keep=0.6, window=3)]
    with tp.patch(model, methods):
        batch = greedy(model, inputs)
        for r in range(2):
            keep = inputs["attention_mask"][r].bool()
            single = {"input_ids": inputs["input_ids"][r: r + 1, keep], "attention_mask": inputs["attention_mask"][r: r + 1, keep],
                      "pixel_values": inputs["pixel_values"][r: r + 1]}
            alone = greedy(model, single)
            assert torch.equal(batch[0][r, inputs["input_ids"].shape[1]:], alone[0][0, -5:])
            torch.testing.assert_close(batch[1][:, r], alone[1][:, 0], rtol=1e-4, atol=1e-4)
