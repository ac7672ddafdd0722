"""ToDRE (diversity, then task relevance) on tiny LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL.

Stage 1's selection equals a brute-force float64 greedy; stage 2's decision equals the attention
ratios measured on the unpatched model's eager attention weights; a dropped row's logits equal a
manual forward that removes the image tokens from layer K on; token counts per layer are what the
method promises; keep-all is the unpatched model bit for bit; batch rows equal single rows; ToDRE
equals its two stages applied in turn.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.todre import ToDREDiversity, ToDRERelevance, diverse_select

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from causal_lm_utils import prefill_lengths  # noqa: E402
from tokenprune.fixtures import make_image  # noqa: E402
from tokenprune.integrations.hf.adapters import get_adapter  # noqa: E402
from tokenprune.methods.base import ImageTokens  # noqa: E402

TEXTS = ["describe the red circle in the corner", "what is it"]
SIZES = {"llava": [(56, 56), (56, 56)], "next": [(112, 112), (112, 80)], "qwen": [(112, 112), (168, 112)]}
_CACHE: dict = {}


# ----------------------------------------------------------------------------- references


def greedy_reference(features: torch.Tensor, k: int, pivot: int, objective: str) -> list[int]:
    """Brute force in float64: at every step recompute each candidate's summed (max_sum) or largest
    (k_center) cosine similarity to the kept set from scratch; the smallest wins, lowest index on ties."""
    x = features.double()
    x = x / x.norm(dim=-1, keepdim=True)
    chosen = [pivot]
    while len(chosen) < min(k, x.shape[0]):
        best, best_value = None, None
        for v in range(x.shape[0]):
            if v in chosen:
                continue
            sims = [float(x[v] @ x[c]) for c in chosen]
            value = sum(sims) if objective == "max_sum" else max(sims)
            if best_value is None or value < best_value:
                best, best_value = v, value
        chosen.append(best)
    return sorted(chosen[:k])


def relevance_ratios(model, inputs, layer_index: int) -> tuple[list[float], list[float]]:
    """``(alpha_t->v, alpha_v->t)`` per row from the unpatched model's eager attention at ``layer_index``:
    V = image tokens, T = text after the first image, averaged over heads and query tokens."""
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[layer_index].double()  # [B, H, L, L]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_id = get_adapter(model).image_token_id
    tv, vt = [], []
    for row in range(ids.shape[0]):
        image = (ids[row] == image_id) & mask[row]
        first = int(torch.nonzero(image).min())
        positions = torch.arange(ids.shape[1])
        text = mask[row] & ~image & (positions > first)
        a = attn[row].mean(0)  # heads
        tv.append(float(a[text][:, image].sum(-1).mean()))
        vt.append(float(a[image][:, text].sum(-1).mean()))
    return tv, vt


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def paths(tiny_llava_path, tiny_llava_next_path, tiny_qwen2_5_vl_path):
    return {"llava": tiny_llava_path, "next": tiny_llava_next_path, "qwen": tiny_qwen2_5_vl_path}


def load(paths, name, attn="sdpa"):
    if (name, attn) not in _CACHE:
        processor = AutoProcessor.from_pretrained(paths[name])
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(paths[name], attn_implementation=attn).eval()
        _CACHE[(name, attn)] = (model, processor)
    return _CACHE[(name, attn)]


def inputs_for(processor, name, rows=(0, 1), images_per_row=1):
    prompts, images = [], []
    for r in rows:
        content = [{"type": "image"}] * images_per_row + [{"type": "text", "text": TEXTS[r]}]
        prompts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images += [make_image(64, seed=10 * r + j).resize(SIZES[name][(r + j) % 2]) for j in range(images_per_row)]
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


def generate(model, inputs, n=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


MODELS = ["llava", "next", "qwen"]


# ----------------------------------------------------------------------------- stage 1: diversity


@pytest.mark.parametrize("objective", ["max_sum", "k_center"])
def test_greedy_selection_equals_brute_force(objective):
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 12, generator=gen) for n in (30, 17, 5, 1)]
    ks = [9, 17, 8, 3]  # k == N and k > N keep everything
    pivots = [4, 0, 2, 0]
    got = diverse_select(features, ks, pivots, objective)
    for f, k, p, kept in zip(features, ks, pivots, got):
        assert kept.tolist() == greedy_reference(f, k, p, objective)
    assert [t.tolist() for t in diverse_select(features[:1], [0], [4], objective)] == [[]]
    # batching does not change an image's selection
    assert diverse_select(features[1:2], ks[1:2], pivots[1:2], objective)[0].equal(got[1])


def test_the_objectives_differ():
    """k-center (v1) and max-sum (v2) are different rules: on this set they disagree at k = 5."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    max_sum, k_center = (diverse_select([x], [5], [0], o)[0].tolist() for o in ("max_sum", "k_center"))
    assert max_sum == greedy_reference(x, 5, 0, "max_sum") == [0, 2, 4, 8, 9]
    assert k_center == greedy_reference(x, 5, 0, "k_center") == [0, 3, 4, 7, 9]


def test_pivot_rules():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(20, 8, generator=gen)
    cls = torch.rand(20, generator=gen)
    cls[3], cls[15] = 5.0, 9.0
    image = ImageTokens(features=features, cls_attention=cls)
    assert ToDREDiversity(pivot="cls").pivot_index(image) == 15
    # any-resolution: the pivot comes from the global thumbnail (the first of several grids)
    anyres = ImageTokens(features=features, cls_attention=cls, blocks=[(0, 2, 2), (4, 4, 4)])
    assert ToDREDiversity(pivot="cls").pivot_index(anyres) == 3
    x = features / features.norm(dim=-1, keepdim=True)
    mean = x.mean(0) / x.mean(0).norm()
    assert ToDREDiversity(pivot="center").pivot_index(image) == int((x @ mean).argmax())
    assert ToDREDiversity(pivot="farthest").pivot_index(image) == int((x @ mean).argmin())
    assert ToDREDiversity(pivot="cls").requires == {"cls_attention"} and not ToDREDiversity(pivot="center").requires
    with pytest.raises(ValueError, match="needs 'cls_attention'"):
        ToDREDiversity(pivot="cls").pivot_index(ImageTokens(features=features))


@pytest.mark.parametrize("name", MODELS)
def test_stage_one_selection_equals_reference_in_the_model(paths, name):
    """The tokens each image keeps are the brute-force greedy's on the adapter's features, from the
    [CLS] (Qwen: mean-query) attention's pivot (the base crop's for LLaVA-NeXT)."""
    model, processor = load(paths, name)
    inputs = inputs_for(processor, name, images_per_row=2)
    image_inputs = {k: inputs[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in inputs}
    with torch.no_grad():
        images = get_adapter(model).encode_images(image_inputs, frozenset({"cls_attention"}))
    method = tp.ToDRE(keep=5, threshold=0.0, impl="torch")
    with tp.patch(model, method) as handle:
        generate(model, inputs, n=1)
    records = [r for r in handle.stats.last() if r.kind == "visual"]
    assert len(records) == len(images) == 4
    for record, image in zip(records, images):
        attention = image.cls_attention
        if image.blocks is not None and len(image.blocks) > 1:
            attention = attention[: image.blocks[0][1] * image.blocks[0][2]]
        expected = greedy_reference(image.features, 5, int(attention.argmax()), "max_sum")
        assert list(record.kept) == expected
        assert image.num_tokens > 5  # (NeXT's record counts its row newlines too)


# ----------------------------------------------------------------------------- stage 2: relevance


@pytest.mark.parametrize("name", MODELS)
def test_stage_two_decision_equals_eager_attention_ratios(paths, name):
    """A row drops all its visual tokens iff both ratios, measured on the unpatched model's eager
    attention at layer K - 1, are below the threshold; two images per row so alpha_v->t is not 0."""
    eager, processor = load(paths, name, "eager")
    model, _ = load(paths, name)
    inputs = inputs_for(processor, name, images_per_row=2)
    depth = len(get_adapter(model).decoder_layers)
    layer = min(depth * 7 // 8 + 1, depth - 1)
    tv, vt = relevance_ratios(eager, inputs, layer - 1)
    assert all(v > 0 for v in vt)
    values = sorted(set(tv + vt))
    # thresholds in every gap between the measured ratios (and beyond both ends)
    cuts = [values[0] / 2] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [(values[-1] + 1) / 2]
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-4  # the cuts are far from float noise
    for threshold in cuts:
        expected = [a < threshold and b < threshold for a, b in zip(tv, vt)]
        for target in (model, eager):
            with tp.patch(target, tp.ToDRE(keep=1.0, threshold=threshold, impl="torch")) as handle:
                generate(target, inputs, n=1)
            llm = [r for r in handle.stats.last() if r.kind == "llm"]
            assert len(llm) == 4 and all(r.layer == layer for r in llm)
            for r in llm:
                assert r.after == (0 if expected[r.row] else r.before), (threshold, r)


class StubView:
    """A DecoderView whose attention is given: ``text_to`` / ``image_to`` ``[B, n]`` are what the text /
    image queries attend to."""

    def __init__(self, groups, text_to, image_to):
        self.layer, self.groups = 2, torch.tensor(groups)
        self.index = torch.arange(self.groups.shape[1]).expand_as(self.groups)
        self.valid = torch.ones_like(self.groups, dtype=torch.bool)
        self.text_to, self.image_to = torch.tensor(text_to), torch.tensor(image_to)

    def attention_from(self, queries, impl="auto"):
        image = self.groups >= 0
        is_image_query = (queries & image).any(1, keepdim=True)
        return torch.where(is_image_query, self.image_to, self.text_to) * queries.any(1, keepdim=True)


def test_both_ratios_must_be_below_the_threshold():
    """Rows: [system, image, image, text, text]; alpha_t->v = text attention on the image slots,
    alpha_v->t = image attention on the text slots (here from text placed between images)."""
    groups = [[-1, 0, 0, -1, -1]] * 4 + [[-1, -1, -1, -1, -1]]
    text_to = [[0.9, 0.05, 0.0, 0.05, 0.0],  # t->v 0.05, v->t 0.02: dropped
               [0.9, 0.05, 0.0, 0.05, 0.0],  # t->v 0.05, v->t 0.30: kept (image attends to text)
               [0.5, 0.3, 0.1, 0.1, 0.0],  # t->v 0.40: kept
               [0.5, 0.3, 0.1, 0.1, 0.0],
               [0.5, 0.3, 0.1, 0.1, 0.0]]  # no image: nothing to drop
    image_to = [[0.98, 0.0, 0.0, 0.02, 0.0], [0.7, 0.0, 0.0, 0.3, 0.0], [1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0],
                [1.0, 0, 0, 0, 0]]
    view = StubView(groups, text_to, image_to)
    policy = ToDRERelevance(threshold=0.1)
    image, text = policy.partition(view)
    assert image[0].tolist() == [False, True, True, False, False] and text[0].tolist() == [False, False, False, True, True]
    assert not text[4].any()  # no image: no text after it
    sizes = torch.tensor([[2], [2], [2], [2], [0]])
    budget = policy.budget(view, policy.score(view), 1.0, sizes)
    assert budget.flatten().tolist() == [0, 2, 2, 2, 0]
    assert ToDRERelevance(threshold=0.5).budget(view, policy.score(view), 1.0, sizes).flatten().tolist() == [0, 0, 0, 0, 0]
    assert ToDRERelevance(threshold=0.0).budget(view, policy.score(view), 1.0, sizes).flatten().tolist() == [2, 2, 2, 2, 0]


def test_default_layer_is_seven_eighths_of_the_depth():
    assert ToDRERelevance().resolve_schedule(32) == ((29, 1.0),)  # ratios at layer 28 = 7L/8
    assert ToDRERelevance().resolve_schedule(28) == ((25, 1.0),)
    assert ToDRERelevance().resolve_schedule(4) == ((3, 1.0),)  # capped at L - 1
    assert ToDRERelevance(layer=2).resolve_schedule(4) == ((2, 1.0),)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        ToDRERelevance(layer=4).resolve_schedule(4)


def test_dropping_every_visual_token_equals_a_manual_forward(paths):
    """LLaVA, one row: the first generated token's logits equal running layers < K on the whole
    (stage-1-pruned) prompt and layers >= K on its text tokens only, at their original positions."""
    from tokenprune.integrations.hf.visual import prune_inputs

    model, processor = load(paths, "llava")
    inputs = inputs_for(processor, "llava", rows=(0,))
    method = tp.ToDRE(keep=6, layer=2, threshold=1.0, impl="torch")
    with tp.patch(model, method) as handle, torch.no_grad():
        patched = model(**inputs).logits[0, -1]
    assert [r.after for r in handle.stats.last() if r.kind == "llm"] == [0]

    adapter = get_adapter(model)
    stage_one = method.components()[0]
    with tp.patch(model, stage_one) as first:
        pruned = prune_inputs(first, adapter, stage_one, inputs["input_ids"], inputs["attention_mask"],
                              {"pixel_values": inputs["pixel_values"]})
    seen = {}
    lm = adapter.text_model()

    def capture(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = lm.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=pruned.input_ids, attention_mask=pruned.attention_mask, **pruned.encoder_kwargs)
    finally:
        hook.remove()
    with torch.no_grad():
        hidden = seen["embeds"]
        positions = torch.arange(hidden.shape[1])[None]
        cos, sin = lm.rotary_emb(hidden, positions)
        text = torch.nonzero(pruned.input_ids[0] != adapter.image_token_id).flatten()
        for i, layer in enumerate(lm.layers):
            if i == 2:
                hidden, cos, sin, positions = hidden[:, text], cos[:, text], sin[:, text], positions[:, text]
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
            hidden = out[0] if isinstance(out, tuple) else out
        logits = model.lm_head(lm.norm(hidden[:, -1]))
    torch.testing.assert_close(patched, logits[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the whole method


@pytest.mark.parametrize("name", MODELS)
def test_keep_all_is_the_unpatched_model(paths, name):
    model, processor = load(paths, name)
    inputs = inputs_for(processor, name)
    base = generate(model, inputs)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    with tp.patch(model, tp.ToDRE(keep=1.0, threshold=0.0, impl="torch")):
        out = generate(model, inputs)
        with torch.no_grad():
            logits = model(**inputs).logits
    assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
    assert torch.equal(logits, base_logits)
    assert torch.equal(generate(model, inputs)[0], base[0])  # removed


@pytest.mark.parametrize("name", MODELS)
def test_token_counts_per_layer(paths, name):
    """Layers < K run on the stage-1-pruned prompt; layers >= K on its text alone when the row drops."""
    model, processor = load(paths, name)
    inputs = inputs_for(processor, name, rows=(1,))
    adapter = get_adapter(model)
    depth = len(adapter.decoder_layers)
    n_image = int((inputs["input_ids"] == adapter.image_token_id).sum())
    length = inputs["input_ids"].shape[1]
    for threshold, dropped in ((0.0, False), (1.0, True)):
        method = tp.ToDRE(keep=5, layer=2, threshold=threshold, impl="torch")
        with tp.patch(model, method) as handle:
            lengths = prefill_lengths(model, lambda: generate(model, inputs, n=1))
        visual = [r for r in handle.stats.last() if r.kind == "visual"]
        kept_slots = length - n_image + sum(r.after for r in visual)  # NeXT: kept row newlines too
        text = length - n_image
        assert lengths == [kept_slots] * 2 + [text if dropped else kept_slots] * (depth - 2)
        per_layer = [r.after for r in handle.stats.last() if r.kind == "llm-prefill"]
        assert per_layer == lengths
        assert [r.after for r in handle.stats.last() if r.kind == "llm"] == [0 if dropped else sum(r.after for r in visual)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_batch_rows_match_single_rows(paths, name, threshold):
    model, processor = load(paths, name)
    batch = inputs_for(processor, name)
    singles = [inputs_for(processor, name, rows=(r,)) for r in (0, 1)]
    assert batch["attention_mask"][1, 0] == 0  # row 1 is left-padded
    width = batch["input_ids"].shape[1]
    with tp.patch(model, tp.ToDRE(keep=5, layer=2, threshold=threshold, impl="torch")) as handle:
        out, scores = generate(model, batch)
        assert [r.after for r in handle.stats.last() if r.kind == "llm"] == [0 if threshold else 5] * 2 or name == "next"
        for r in (0, 1):
            single, single_scores = generate(model, singles[r])
            assert torch.equal(out[r, width:], single[0, singles[r]["input_ids"].shape[1]:])
            torch.testing.assert_close(scores[:, r], single_scores[:, 0], rtol=1e-3, atol=1e-3)


def test_todre_equals_its_stages_in_turn(paths):
    """ToDRE == stage 1 (the pruned prompt it hands the decoder), then stage 2 on that prompt."""
    from tokenprune.integrations.hf.visual import prune_inputs

    model, processor = load(paths, "llava")
    inputs = inputs_for(processor, "llava")
    method = tp.ToDRE(keep=6, layer=2, threshold=1.0, impl="torch")
    with tp.patch(model, method) as handle:
        composed = generate(model, inputs)
    assert {r.kind for r in handle.stats.last()} == {"visual", "llm", "llm-prefill"}
    assert [r.after for r in handle.stats.last() if r.kind == "llm"] == [0, 0]
    assert {r.call for r in handle.stats.records} == {1}
    stage_one, stage_two = method.components()
    with tp.patch(model, stage_one) as first:
        pruned = prune_inputs(first, get_adapter(model), stage_one, inputs["input_ids"], inputs["attention_mask"],
                              {"pixel_values": inputs["pixel_values"]})
    with tp.patch(model, stage_two):
        ids = pruned.input_ids
        alone = generate(model, {"input_ids": ids, "attention_mask": pruned.attention_mask, **pruned.encoder_kwargs})
    assert torch.equal(composed[0][:, inputs["input_ids"].shape[1]:], alone[0][:, ids.shape[1]:])
    assert torch.equal(composed[1], alone[1])


# ----------------------------------------------------------------------------- API


def test_registry_config_and_composition():
    method = tp.build("todre", keep=32, threshold=0.2)
    assert isinstance(method, tp.ToDRE) and method.stage == "composite"
    config = method.to_config()
    assert config == {"method": "todre", "keep": 32, "objective": "max_sum", "pivot": "cls", "layer": None,
                      "threshold": 0.2, "impl": "auto"}
    assert tp.build(config.pop("method"), **config) == method
    assert [c.stage for c in method.components()] == ["visual", "llm"]
    composed = tp.compose(tp.SnapKV(keep=0.5), method)
    assert composed.stages == ("visual", "llm", "kv")
    assert composed.methods == (method, tp.SnapKV(keep=0.5))  # ToDRE stays whole
    assert composed.to_config()["methods"][0] == method.to_config()


@pytest.mark.parametrize("other, match", [
    (tp.FastV(), r"ToDRE \(its 'llm' stage\) and FastV both act at stage 'llm'"),
    (tp.DivPrune(), r"ToDRE \(its 'visual' stage\) and DivPrune both act at stage 'visual'"),
    (tp.LazyLLM(), r"ToDRE \(its 'llm' stage\) and LazyLLM cannot be composed"),
])
def test_conflicting_compositions_name_todre(other, match):
    with pytest.raises(ValueError, match=match):
        tp.compose(tp.ToDRE(), other)


def test_patch_names_todre_and_is_reversible(paths):
    model, processor = load(paths, "llava")
    inputs = inputs_for(processor, "llava")
    base = generate(model, inputs)
    before = dict(model.__dict__)
    hooks = {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}
    handle = tp.patch(model, tp.ToDRE(keep=4, threshold=1.0, impl="torch"))
    assert isinstance(handle.method, tp.ToDRE) and tp.active_handle(model) is handle
    pruned = generate(model, inputs)
    handle.remove()
    assert not torch.equal(pruned[1], base[1])
    assert model.__dict__.keys() == before.keys()
    assert {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert torch.equal(generate(model, inputs)[1], base[1])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keep=0), ValueError, "keep must be >= 1"),
    (dict(keep=1.5), ValueError, r"keep must be in \(0, 1\]"),
    (dict(keep="64"), TypeError, "keep must be an int"),
    (dict(objective="max_min"), ValueError, "objective must be one of 'max_sum', 'k_center'"),
    (dict(objective=None), TypeError, "objective must be a str"),
    (dict(pivot="random"), ValueError, "pivot must be one of 'cls', 'center', 'farthest'"),
    (dict(layer=0), ValueError, "layer must be >= 1"),
    (dict(layer=2.0), TypeError, "layer must be an int or None"),
    (dict(layer=True), TypeError, "layer must be an int or None"),
    (dict(threshold=-0.1), ValueError, r"threshold must be in \[0, 1\]"),
    (dict(threshold=float("nan")), ValueError, r"threshold must be in \[0, 1\]"),
    (dict(threshold="0.1"), TypeError, "threshold must be a float"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tp.ToDRE(**kwargs)


def test_layer_out_of_range_leaves_the_model_untouched(paths):
    model, _ = load(paths, "llava")
    before = dict(model.__dict__)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        tp.patch(model, tp.ToDRE(layer=4))
    assert model.__dict__.keys() == before.keys() and tp.active_handle(model) is None


def test_text_only_models_are_refused(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    with pytest.raises(NotImplementedError, match="ToDREDiversity \\(stage 'visual'\\) cannot be applied"):
        tp.patch(model, tp.ToDRE())
    assert tp.active_handle(model) is None


@pytest.mark.parametrize("raw", [tp.ToDRE(), '{"method": "todre", "keep": 64}', [tp.ToDRE()], tp.compose(tp.ToDRE())])
def test_vllm_config_refuses_todre_with_the_reason(raw):
    from tokenprune.integrations.vllm.config import parse_config

    with pytest.raises(ValueError, match="names ToDRE, which prunes inside the language model"):
        parse_config(raw)
