"""LazyLLM in Hugging Face causal LMs: schedule validation, exactness when nothing is pruned,
per-layer token counts and cache lengths, an independent reference for prefill pruning, revival
from the aux cache, left-padded batches, reversibility."""

import pytest
import torch

import tokenprune as tp
from causal_lm_utils import left_padded, load, prompt
from tokenprune.methods.base import resolve_keep

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gqa_path(fixtures_dir):
    from tokenprune.fixtures import build_tiny_causal_lm

    return build_tiny_causal_lm(fixtures_dir / "tiny-qwen2-gqa", arch="qwen2", num_heads=4, num_kv_heads=2)


def greedy(model, ids, mask=None, n=6):
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("schedule, error", [
    (((2, 0.5), (1, 0.3)), ValueError),  # unsorted layers
    (((1, 0.5), (1, 0.3)), ValueError),  # repeated layer
    (((1, 0.0),), ValueError),  # keep outside (0, 1]
    (((1, 1.5),), ValueError),
    (((1, -0.1),), ValueError),
    (((1, 0.3), (2, 0.5)), ValueError),  # keep increasing with depth
    (((0, 0.5),), ValueError),  # layer 0 has no previous layer to score with
    (((1, 0.5, 3),), ValueError),
    (((1.5, 0.5),), TypeError),
    (((1, "half"),), TypeError),
    ((), ValueError),
])
def test_bad_schedules(schedule, error):
    with pytest.raises(error, match="schedule"):
        tp.LazyLLM(schedule=schedule)


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        tp.LazyLLM(window=0)
    with pytest.raises(ValueError, match="impl"):
        tp.LazyLLM(impl="cuda")
    with pytest.raises(TypeError, match="revive"):
        tp.LazyLLM(revive=1)


def test_layer_out_of_range_at_patch_time(tiny_llama_path):
    model = load(tiny_llama_path)
    with pytest.raises(ValueError, match=r"out of range.*\[1, 3\]"):
        tp.patch(model, tp.LazyLLM(schedule=((2, 0.5), (4, 0.3))))
    assert tp.active_handle(model) is None  # nothing left half-patched


def test_default_schedule_scales_with_depth():
    assert tp.LazyLLM().resolve_schedule(32) == ((4, 0.7), (8, 0.5), (16, 0.3))
    assert tp.LazyLLM().resolve_schedule(12) == ((2, 0.7), (3, 0.5), (6, 0.3))
    assert tp.LazyLLM().resolve_schedule(4) == ((1, 0.5), (2, 0.3))
    assert tp.build("lazyllm", schedule=[[1, 0.5]]).schedule == ((1, 0.5),)
    config = tp.LazyLLM(window=4).to_config()
    assert tp.build(config.pop("method"), **config) == tp.LazyLLM(window=4)


def test_unsupported_model_and_attention(tiny_llama_path):
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM"):
        tp.patch(torch.nn.Linear(2, 2), tp.LazyLLM())
    model = load(tiny_llama_path)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="sdpa"):
        tp.patch(model, tp.LazyLLM())


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_keep_all_is_identical_and_remove_restores(tiny_llama_path, impl):
    model = load(tiny_llama_path, impl)
    ids = prompt(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    base_seq, base_scores = greedy(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with tp.patch(model, tp.LazyLLM(schedule=((1, 1.0), (3, 1.0)))):
        seq, scores = greedy(model, ids, mask)
    assert torch.equal(seq, base_seq)
    assert torch.equal(scores, base_scores)

    handle = tp.patch(model, tp.LazyLLM(schedule=((1, 0.5), (2, 0.25)), window=2))
    pruned_seq, _ = greedy(model, ids, mask)
    handle.remove()
    assert not torch.equal(pruned_seq, base_seq)  # the pruning had an effect
    for layer in model.model.layers:
        assert "forward" not in layer.__dict__
        assert not layer.self_attn._forward_hooks and not layer.self_attn._forward_pre_hooks
    assert not model.model._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    seq, scores = greedy(model, ids, mask)
    assert torch.equal(seq, base_seq) and torch.equal(scores, base_scores)


# ------------------------------------------------------------------------------ prefill reference


def reference_prefill(model, ids, schedule, window):
    """Independent LazyLLM prefill for one row: eager attention probabilities of the last token
    (mean over heads) rank the alive tokens; every layer runs, unmodified, on the alive
    subsequence with its original positions. Returns last-token logits and alive counts per layer."""
    inner = model.model
    length = ids.shape[1]
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(length)[None]
    cos, sin = inner.rotary_emb(hidden, positions)
    weights = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1]))
             for i, layer in enumerate(inner.layers)]
    alive = torch.arange(length)
    counts = []
    try:
        for i, layer in enumerate(inner.layers):
            if i in schedule:
                score = weights[i - 1][0, :, -1, :].mean(0)
                score = torch.where(alive >= length - window, torch.inf, score)
                k = resolve_keep(schedule[i], length)
                top = torch.sort(score, descending=True, stable=True).indices[:k]
                sel = torch.sort(top).values
                alive, hidden = alive[sel], hidden[:, sel]
            n = alive.numel()
            causal = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos[:, alive], sin[:, alive]),
                           position_ids=positions[:, alive])
            counts.append(n)
    finally:
        for h in hooks:
            h.remove()
    return model.lm_head(inner.norm(hidden))[:, -1], counts


@pytest.mark.parametrize("fixture", ["tiny_llama_path", "gqa_path"])
def test_prefill_matches_independent_reference(request, fixture):
    path = request.getfixturevalue(fixture)
    model = load(path, "eager")
    ids = prompt(1, 45, seed=3)
    schedule, window = {1: 0.6, 2: 0.4, 3: 0.2}, 3
    with torch.no_grad():
        ref_logits, ref_counts = reference_prefill(model, ids, schedule, window)
    for impl in ("eager", "sdpa"):
        model = load(path, impl)
        with torch.no_grad(), tp.patch(model, tp.LazyLLM(schedule=tuple(schedule.items()), window=window)) as h:
            out = model(input_ids=ids, use_cache=True)
        torch.testing.assert_close(out.logits[:, -1], ref_logits, rtol=1e-4, atol=1e-4)
        counts = [r.after for r in h.stats.per_layer() if r.kind == "text-prefill"]
        assert counts == ref_counts == [45, 27, 18, 9]
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == ref_counts


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures(fixtures_dir, arch):
    from tokenprune.fixtures import build_tiny_causal_lm

    model = load(build_tiny_causal_lm(fixtures_dir / f"tiny-{arch}", arch=arch))
    ids = prompt(1, 30)
    base_seq, base_scores = greedy(model, ids)
    with tp.patch(model, tp.LazyLLM(schedule=((1, 1.0),))):
        seq, scores = greedy(model, ids)
    assert torch.equal(seq, base_seq) and torch.equal(scores, base_scores)
    with torch.no_grad():
        ref, _ = reference_prefill(load(model.name_or_path, "eager"), ids, {1: 0.5, 2: 0.3}, 2)
    with torch.no_grad(), tp.patch(model, tp.LazyLLM(schedule=((1, 0.5), (2, 0.3)), window=2)):
        torch.testing.assert_close(model(input_ids=ids).logits[:, -1], ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ per-layer counts, hooks, cache


def test_tokens_processed_per_layer_follow_the_schedule(tiny_llama_path):
    model = load(tiny_llama_path)
    seen = {}
    # The first module inside each decoder layer sees exactly the rows the layer processes.
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0].shape[1]))
             for i, layer in enumerate(model.model.layers)]
    ids = prompt(1, 64)
    with tp.patch(model, tp.LazyLLM(schedule=((1, 0.75), (3, 0.25)), window=4, revive=False)) as h:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
    for hook in hooks:
        hook.remove()
    assert [seen[i][0] for i in range(4)] == [64, 48, 48, 16]  # prefill
    assert all(steps[1:] == [1, 1, 1] for steps in seen.values())  # decoding: the new token only
    prefill = [r for r in h.stats.per_layer() if r.kind == "text-prefill"]
    assert [(r.layer, r.before, r.after) for r in prefill] == [(0, 64, 64), (1, 64, 48), (2, 64, 48), (3, 64, 16)]
    # 3 decoding steps wrote their token into every layer's cache (the 4th token is never fed back).
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [67, 51, 51, 19]


# ------------------------------------------------------------------------------ revival


def test_revival_resumes_from_the_saved_layer(tiny_llama_path):
    """A token pruned at layer 2 in prefill and selected again by the first generated token is
    computed from its saved layer-2 input: layers 0-1 never see it again, and its layer-2 output
    equals layer 2 run from scratch on the unpruned model's hidden states."""
    model = load(tiny_llama_path, "eager")
    length, layer = 32, 2
    ids = prompt(1, length, seed=1)
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
    first_token = full.logits[:, -1].argmax(-1, keepdim=True)
    hidden_in = full.hidden_states[layer]  # input of layer 2, every prompt token

    shapes, captured = {}, {}
    method = tp.LazyLLM(schedule=((layer, 0.5),), window=1)
    handle = tp.patch(model, method)
    runtime = handle.runtime

    def pre(i):
        def hook(module, args):
            shapes.setdefault(i, []).append(args[0].shape[1])
            if i == layer and not runtime.state.prefill:
                captured["index"] = runtime.state.cur.index.clone()
                captured["visible"] = runtime.state.visible[0, :length].clone()
        return hook

    hooks = [lay.input_layernorm.register_forward_pre_hook(pre(i)) for i, lay in enumerate(model.model.layers)]
    hooks.append(model.model.layers[layer].register_forward_hook(
        lambda m, a, kw, out: captured.__setitem__("out", out), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                 do_sample=False, return_dict_in_generate=True)
    finally:
        for hook in hooks:
            hook.remove()
        handle.remove()
    assert out.sequences[0, length] == first_token[0, 0]
    revived = captured["index"][0, :-1]
    assert revived.numel() > 0, "this prompt was chosen so that the decoding step revives tokens"
    assert [r.after for r in handle.stats.last() if r.kind == "text-revive"] == [revived.numel()]
    kept_in_prefill = runtime.state.slots[layer].index[0, :16]
    assert not set(revived.tolist()) & set(kept_in_prefill.tolist())
    # Layers 0-1 processed the new token alone at the decoding step; layers 2-3 also the revived ones.
    assert [shapes[i][1] for i in range(4)] == [1, 1, 1 + revived.numel(), 1 + revived.numel()]

    # The decoding step selected the top half by the new token's layer-1 attention (unpatched eager).
    with torch.no_grad():
        weights = {}
        hook = model.model.layers[layer - 1].self_attn.register_forward_hook(
            lambda m, a, o: weights.__setitem__("w", o[1]))
        model(input_ids=torch.cat([ids, first_token], 1))
        hook.remove()
    score = weights["w"][0, :, -1, :length].mean(0)
    score[-1] = torch.inf  # window = 1
    expected = torch.zeros(length, dtype=torch.bool)
    expected[torch.sort(score, descending=True, stable=True).indices[:16]] = True
    assert torch.equal(captured["visible"], expected)

    # From scratch: layer 2 on the unpruned hidden states of the selected tokens, original positions.
    sel = torch.nonzero(expected).flatten()
    with torch.no_grad():
        inner = model.model
        cos, sin = inner.rotary_emb(hidden_in, torch.arange(length)[None])
        n = sel.numel()
        causal = torch.full((n, n), torch.finfo(hidden_in.dtype).min).triu(1)[None, None]
        ref = inner.layers[layer](hidden_in[:, sel], attention_mask=causal,
                                  position_embeddings=(cos[:, sel], sin[:, sel]), position_ids=sel[None])
    rows = torch.searchsorted(sel, revived)
    # Same arithmetic; only the order of the keys in the softmax sums differs (cache slots vs sorted).
    torch.testing.assert_close(captured["out"][0, :-1], ref[0, rows], rtol=1e-4, atol=1e-4)


def test_static_mode_never_revives(tiny_llama_path):
    model = load(tiny_llama_path)
    ids = prompt(1, 32, seed=1)
    with tp.patch(model, tp.LazyLLM(schedule=((2, 0.5),), window=1, revive=False)) as h:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    assert not [r for r in h.stats.last() if r.kind == "text-revive"]
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [34, 34, 18, 18]


# ------------------------------------------------------------------------------ batches, sampling


@pytest.mark.parametrize("revive", [True, False])
def test_left_padded_rows_are_independent(tiny_llama_path, revive):
    model = load(tiny_llama_path)
    method = tp.LazyLLM(schedule=((1, 0.6), (2, 0.3)), window=3, revive=revive)
    rows = [prompt(1, 40, seed=5), prompt(1, 29, seed=6)]
    singles = []
    with tp.patch(model, method):
        for ids in rows:
            singles.append(greedy(model, ids, n=5))
        batch, mask = left_padded(rows)
        seq, scores = greedy(model, batch, mask, n=5)
    for i, (single_seq, single_scores) in enumerate(singles):
        assert torch.equal(seq[i, 40:], single_seq[0, single_seq.shape[1] - 5:])
        torch.testing.assert_close(scores[i], single_scores[0], rtol=1e-4, atol=1e-4)


def test_sampling_runs_and_is_seeded(tiny_llama_path):
    model = load(tiny_llama_path)
    ids = prompt(2, 36)
    with tp.patch(model, tp.LazyLLM(schedule=((1, 0.5), (2, 0.3)), window=2)):
        outs = []
        for _ in range(2):
            torch.manual_seed(7)
            outs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                       do_sample=True, top_k=50))
    assert outs[0].shape == (2, 44) and torch.equal(outs[0], outs[1])


def test_prune_decorator(tiny_llama_path):
    model = load(tiny_llama_path)
    ids = prompt(1, 32)
    generate = tp.prune(tp.LazyLLM(schedule=((1, 0.5),), window=2))(model.generate)
    generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert [r.after for r in generate.last_stats.per_layer() if r.kind == "text-prefill"] == [32, 16, 16, 16]
    assert tp.active_handle(model) is None


def test_language_model_inside_llava(tiny_llava_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokenprune.fixtures import make_image

    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the red square"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[make_image(56)], text=[text], return_tensors="pt")
    length = inputs["input_ids"].shape[1]

    def run():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)

    base_seq, base_scores = run()
    with tp.patch(model, tp.LazyLLM(schedule=((1, 1.0),))):
        seq, scores = run()
    assert torch.equal(seq, base_seq) and torch.equal(scores, base_scores)
    with tp.patch(model, tp.LazyLLM(schedule=((1, 0.5), (2, 0.25)), window=2)) as h:
        run()
    expected = [length, resolve_keep(0.5, length), resolve_keep(0.25, length), resolve_keep(0.25, length)]
    assert [r.after for r in h.stats.per_layer() if r.kind == "text-prefill"] == expected
