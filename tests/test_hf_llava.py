"""DivPrune and FastV on LlavaForConditionalGeneration in HF generate (tiny offline checkpoints)."""

import itertools

import pytest
import torch

import tokenprune as tp

transformers = pytest.importorskip("transformers")
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from causal_lm_utils import prefill_lengths  # noqa: E402
from tokenprune.fixtures import make_image  # noqa: E402

QUESTIONS = ["What is in this image?", "Describe the colours of the picture in many words please"]


@pytest.fixture(scope="module")
def processor(tiny_llava_path):
    proc = AutoProcessor.from_pretrained(tiny_llava_path)
    proc.tokenizer.padding_side = "left"
    return proc


@pytest.fixture(scope="module")
def models(tiny_llava_path):
    return {
        impl: LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, attn_implementation=impl).eval()
        for impl in ("sdpa", "eager")
    }


def prompt(processor, question, images=1):
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(processor, rows, images_per_row=1, size=56):
    texts = [prompt(processor, QUESTIONS[r % len(QUESTIONS)], images_per_row) for r in rows]
    images = [make_image(size, seed=10 * r + i) for r in rows for i in range(images_per_row)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def greedy(model, inputs, n=6):
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    return out.sequences, torch.stack(out.scores, dim=1)


# ----------------------------------------------------------------------------- references


def divprune_reference(features: torch.Tensor, k: int) -> list[int]:
    """Plain greedy max-min diversity over cosine distance (DESIGN.md §3), written independently."""
    x = features.double()
    n = x.shape[0]
    norms = [float(x[i].norm()) for i in range(n)]
    dist = [[1.0 - float(x[i] @ x[j]) / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < min(k, n):
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(dist[i][j] for j in chosen), -i)))
    return sorted(chosen)


def image_records(handle):
    return [(r.row, r.image, r.kept) for r in handle.stats.per_image()]


# ----------------------------------------------------------------------------- DivPrune


def test_divprune_selection_equals_reference(models, processor):
    model = models["sdpa"]
    inputs = batch(processor, [0, 1])
    with tp.patch(model, tp.DivPrune(keep=5)) as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    records = image_records(handle)
    assert [(r, i) for r, i, _ in records] == [(0, 0), (1, 0)]
    for (row, _, kept), f in zip(records, feats):
        assert list(kept) == divprune_reference(f, 5)


def test_divprune_shrinks_every_layer(models, processor):
    model = models["sdpa"]
    inputs = batch(processor, [0])
    full = inputs["input_ids"].shape[1]
    base = prefill_lengths(model, lambda: model.generate(**inputs, max_new_tokens=1))
    assert base == [full] * 4
    with tp.patch(model, tp.DivPrune(keep=3)):
        pruned = prefill_lengths(model, lambda: model.generate(**inputs, max_new_tokens=1))
    assert pruned == [full - 16 + 3] * 4


def test_divprune_576_to_64(tiny_llava_576_path):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_576_path).eval()
    proc = AutoProcessor.from_pretrained(tiny_llava_576_path)
    inputs = proc(images=make_image(336), text=prompt(proc, QUESTIONS[0]), return_tensors="pt")
    full = inputs["input_ids"].shape[1]
    with tp.patch(model, tp.DivPrune(keep=64)) as handle:
        lengths = prefill_lengths(model, lambda: model.generate(**inputs, max_new_tokens=2, do_sample=False))
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert lengths == [full - 512] * len(lengths)
    assert handle.stats.summary()["tokens_before"] == 576 and handle.stats.summary()["tokens_after"] == 64
    # generate returns the caller's prompt followed by the new tokens
    assert out.shape == (1, full + 2) and torch.equal(out[:, :full], inputs["input_ids"])


def test_direct_forward_is_pruned(models, processor):
    model = models["sdpa"]
    inputs = batch(processor, [1])
    with tp.patch(model, tp.DivPrune(keep=4)):
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 12


def test_multi_image_budget_is_per_image(models, processor):
    model = models["sdpa"]
    inputs = batch(processor, [0, 1], images_per_row=2)
    with tp.patch(model, tp.DivPrune(keep=0.25)) as handle:
        model.generate(**inputs, max_new_tokens=1)
    recs = handle.stats.per_image()
    assert [(r.row, r.image, r.before, r.after) for r in recs] == [
        (0, 0, 16, 4), (0, 1, 16, 4), (1, 0, 16, 4), (1, 1, 16, 4)
    ]


# ----------------------------------------------------------------------------- FastV


@pytest.mark.parametrize("layer, keep", [(2, 0.5), (1, 3), (3, 0.25)])
def test_fastv_selection_equals_eager_attention_topk(models, processor, layer, keep):
    inputs = batch(processor, [0, 1])  # row 0 is left-padded
    eager = models["eager"]
    with torch.no_grad():
        attn = eager(**inputs, output_attentions=True).attentions[layer - 1]  # [B, H, L, L]
    last_row = attn[:, :, -1, :].mean(dim=1)  # [B, L]
    image_id = eager.config.image_token_id
    method = tp.FastV(layer=layer, keep=keep)
    for impl in ("sdpa", "eager"):
        with tp.patch(models[impl], method) as handle:
            models[impl].generate(**inputs, max_new_tokens=1)
        for row, _, kept in image_records(handle):
            positions = torch.nonzero(inputs["input_ids"][row] == image_id).flatten()
            scores = last_row[row, positions]
            k = method.num_kept(len(positions))
            expected = sorted(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())
            assert list(kept) == expected, (impl, row)


def test_fastv_layer_lengths_and_cache(models, processor):
    model = models["sdpa"]
    inputs = batch(processor, [1])
    full = inputs["input_ids"].shape[1]
    with tp.patch(model, tp.FastV(layer=2, keep=4)):
        lengths = prefill_lengths(model, lambda: model.generate(**inputs, max_new_tokens=1))
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert lengths == [full, full, full - 12, full - 12]
    cache = [layer.get_seq_length() for layer in out.past_key_values.layers]
    # the last generated token is not fed back, so the cache holds prompt + 2 new tokens
    assert cache == [full + 2, full + 2, full - 12 + 2, full - 12 + 2]


def test_fastv_layer_out_of_range(models):
    model = models["sdpa"]
    before = dict(model.__dict__)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        tp.patch(model, tp.FastV(layer=4))
    assert model.__dict__.keys() == before.keys()
    assert all("forward" not in layer.__dict__ for layer in model.model.language_model.layers)


# ----------------------------------------------------------------------------- shared behaviour

METHODS = [tp.DivPrune(keep=3), tp.DivPrune(keep=0.5), tp.FastV(layer=2, keep=0.5), tp.FastV(layer=1, keep=2)]
KEEP_ALL = [tp.DivPrune(keep=16), tp.DivPrune(keep=1.0), tp.DivPrune(keep=10_000), tp.FastV(layer=2, keep=1.0),
            tp.FastV(layer=1, keep=16)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method", KEEP_ALL, ids=repr)
def test_keep_all_reproduces_unpatched_model(models, processor, impl, method):
    model = models[impl]
    inputs = batch(processor, [0, 1])
    seq, scores = greedy(model, inputs)
    with tp.patch(model, method):
        seq_p, scores_p = greedy(model, inputs)
    assert torch.equal(seq, seq_p)
    assert torch.equal(scores, scores_p)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_batch_rows_are_independent(models, processor, impl, method):
    model = models[impl]
    inputs = batch(processor, [0, 1])
    singles = [batch(processor, [r]) for r in (0, 1)]
    # the unpatched model has the property (up to float noise) ...
    _, base_scores = greedy(model, inputs)
    for r, single in enumerate(singles):
        assert torch.allclose(base_scores[r], greedy(model, single)[1][0], atol=1e-3)
    # ... and so does the patched one
    with tp.patch(model, method):
        seq, scores = greedy(model, inputs)
        for r, single in enumerate(singles):
            seq_r, scores_r = greedy(model, single)
            assert torch.allclose(scores[r], scores_r[0], atol=1e-3), r
            assert torch.equal(seq[r, -6:], seq_r[0, -6:])


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_pruning_changes_the_computation(models, processor, method):
    model = models["sdpa"]
    inputs = batch(processor, [0, 1])
    _, scores = greedy(model, inputs, n=1)
    with tp.patch(model, method):
        _, scores_p = greedy(model, inputs, n=1)
    assert not torch.allclose(scores, scores_p)


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dicts": {name: set(m.__dict__) for name, m in model.named_modules()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()},
    }


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_remove_restores_model_exactly(models, processor, method):
    model = models["sdpa"]
    inputs = batch(processor, [0, 1])
    seq, scores = greedy(model, inputs)
    before = _snapshot(model)
    handle = tp.patch(model, method)
    assert tp.active_handle(model) is handle
    greedy(model, inputs)
    handle.remove()
    handle.remove()  # idempotent
    after = _snapshot(model)
    assert before["dicts"] == after["dicts"] and before["hooks"] == after["hooks"]
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    seq2, scores2 = greedy(model, inputs)
    assert torch.equal(seq, seq2) and torch.equal(scores, scores2)
    assert tp.active_handle(model) is None


def test_patch_twice_is_refused(models):
    model = models["sdpa"]
    with tp.patch(model, tp.DivPrune(keep=4)):
        with pytest.raises(RuntimeError, match="already patched"):
            tp.patch(model, tp.FastV())
    assert tp.active_handle(model) is None


def test_decorator_on_generate_and_on_user_function(models, processor):
    model = models["sdpa"]
    inputs = batch(processor, [0])
    method = tp.DivPrune(keep=2)
    with tp.patch(model, method):
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    generate = tp.prune(method)(model.generate)
    assert torch.equal(generate(**inputs, max_new_tokens=4, do_sample=False), expected)
    assert generate.last_stats.summary()["tokens_after"] == 2

    @tp.prune(method)
    def answer(m, batch_inputs):
        return m.generate(**batch_inputs, max_new_tokens=4, do_sample=False)

    assert torch.equal(answer(model, inputs), expected)
    assert answer.last_stats.summary()["tokens_after"] == 2
    assert tp.active_handle(model) is None
    with pytest.raises(TypeError, match="could not find what to patch"):
        tp.prune(method)(lambda: None)()


def test_image_less_prompt_is_a_no_op(models, processor):
    model = models["sdpa"]
    text = processor.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    inputs = processor.tokenizer(text, return_tensors="pt")
    seq, scores = greedy(model, inputs)
    for method in (tp.DivPrune(keep=2), tp.FastV(layer=2, keep=2)):
        with tp.patch(model, method) as handle:
            seq_p, scores_p = greedy(model, inputs)
        assert torch.equal(seq, seq_p) and torch.equal(scores, scores_p)
        assert handle.stats.per_image() == []


def test_inputs_embeds_with_pixels_is_rejected(models, processor):
    model = models["sdpa"]
    inputs = batch(processor, [0])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with tp.patch(model, tp.DivPrune(keep=2)):
        with pytest.raises(ValueError, match="needs input_ids"):
            model.generate(inputs_embeds=embeds, pixel_values=inputs["pixel_values"],
                           attention_mask=inputs["attention_mask"], max_new_tokens=1)


def test_sampling_and_num_return_sequences(models, processor):
    model = models["sdpa"]
    inputs = batch(processor, [0, 1])
    with tp.patch(model, tp.DivPrune(keep=4)):
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert out.shape == (4, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[::2, : inputs["input_ids"].shape[1]], inputs["input_ids"])
