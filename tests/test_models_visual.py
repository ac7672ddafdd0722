"""Visual pruning methods x models (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL) in HF generate.

Tiny offline fixtures: LLaVA 16 tokens per image (4 vision layers so FlowCut has a schedule),
NeXT 16-token crops (88 / 70 placeholders for a 112x112 / 112x80 image), Qwen 16 / 24 tokens.
"""

import pytest
import torch

import tokenprune as tp

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from tokenprune.fixtures import build_tiny_llava, make_image  # noqa: E402
from tokenprune.integrations.hf.adapters import get_adapter  # noqa: E402

SIZES = {"llava": [(56, 56), (56, 56)], "next": [(112, 112), (112, 80)], "qwen": [(112, 112), (168, 112)],
         "qwen2": [(112, 112), (168, 112)]}
TEXTS = ["describe the red circle in the corner", "what is it"]
VISUAL = {
    "divprune": lambda k: tp.DivPrune(keep=k, impl="torch"),
    "random": lambda k: tp.RandomPrune(keep=k, seed=1),
    "grid": lambda k: tp.UniformGrid(keep=k),
    "holov": lambda k: tp.HoloV(keep=k, crops=4),
    "visionzip": lambda k: tp.VisionZip(keep=k),
    "flowcut": lambda k: tp.FlowCut(keep=k),
}
FASTV = {
    "fastv_last": lambda k: tp.FastV(layer=2, keep=k, impl="torch"),
    "fastv_text_mean": lambda k: tp.FastV(layer=2, keep=k, impl="torch", query="text_mean"),
}
METHODS = {**VISUAL, **FASTV}
_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add synchronisation. On this shared 2-core machine two
    threads made each generate call 20-30x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def paths(fixtures_dir, tiny_llava_next_path, tiny_qwen2_5_vl_path, tiny_qwen2_vl_path):
    llava = fixtures_dir / "tiny-llava-56-v4"
    if not (llava / "config.json").exists():
        build_tiny_llava(llava, image_size=56, vision_layers=4)
    return {"llava": llava, "next": tiny_llava_next_path, "qwen": tiny_qwen2_5_vl_path, "qwen2": tiny_qwen2_vl_path}


def load(paths, name, attn="sdpa"):
    key = (name, attn)
    if key not in _CACHE:
        processor = AutoProcessor.from_pretrained(paths[name])
        model = AutoModelForImageTextToText.from_pretrained(paths[name], attn_implementation=attn).eval()
        _CACHE[key] = (model, processor)
    return _CACHE[key]


def inputs_for(processor, name, rows=(0, 1), images_per_row=1):
    prompts, images = [], []
    for r in rows:
        content = [{"type": "image"}] * images_per_row + [{"type": "text", "text": TEXTS[r]}]
        prompts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        for j in range(images_per_row):
            size = SIZES[name][(r + j) % 2]
            images.append(make_image(64, seed=10 * r + j).resize(size))
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


def generate(model, inputs, n=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


MODELS = ["llava", "next", "qwen", "qwen2"]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", MODELS)
def test_keep_all_is_identical(paths, name, method):
    model, processor = load(paths, name)
    inputs = inputs_for(processor, name)
    base = generate(model, inputs)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    with tp.patch(model, METHODS[method](1.0)):
        out = generate(model, inputs)
        with torch.no_grad():
            logits = model(**inputs).logits
    assert torch.equal(out, base)
    assert torch.equal(logits, base_logits)


@pytest.mark.parametrize("method", ["holov", "fastv_last"])
@pytest.mark.parametrize("name", MODELS)
def test_patch_is_reversible(paths, name, method):
    model, processor = load(paths, name)
    inputs = inputs_for(processor, name)
    base = generate(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: set(m.__dict__) for n, m in model.named_modules()}
    hooks = {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}
    handle = tp.patch(model, METHODS[method](4))
    pruned = generate(model, inputs)
    handle.remove()
    assert not torch.equal(pruned, base)  # the patch did act
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == modules
    assert {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert torch.equal(generate(model, inputs), base)


def _decoder_inputs(model, adapter):
    """Capture (input_ids, inputs_embeds) the language model receives at prefill."""
    seen = {}

    def base_hook(module, args, kwargs):
        if "ids" not in seen:
            seen["ids"] = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]

    def lm_hook(module, args, kwargs):
        if "embeds" not in seen:
            seen["embeds"] = kwargs.get("inputs_embeds")
            seen["positions"] = kwargs.get("position_ids")

    handles = [model.model.register_forward_pre_hook(base_hook, with_kwargs=True),
               adapter.text_model().register_forward_pre_hook(lm_hook, with_kwargs=True)]
    return seen, handles


def _subsequence(rows: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """Index in ``reference`` of every row of ``rows`` (exact match), asserting strictly increasing."""
    found = []
    for r in rows:
        hit = torch.nonzero((reference == r).all(dim=1)).flatten()
        assert hit.numel() >= 1, "a decoder image row is not one of the image's embeddings"
        found.append(int(hit[0]))
    assert found == sorted(set(found)), "image tokens reached the decoder out of order"
    return found


def _check_newlines(rows, packed, found, newline, base_tokens=16):
    """LLaVA-NeXT: the decoder reads the kept content rows of the packed image in order, each grid
    row that keeps a token still closed by its newline, and no other newline."""
    is_newline = (packed == newline).all(dim=1)
    slots = torch.nonzero(is_newline).flatten().tolist()
    grid_row = torch.cumsum(is_newline.long(), 0)  # newline j closes the tokens with grid_row == j
    # Several crops: the base crop's tokens come first and have no newline; one crop: a newline closes it.
    first_grid = base_tokens if len(slots) > 1 else 0
    kept_rows = {int(grid_row[i]) for i in found if i >= first_grid}
    expected = packed[sorted(found + [slot for j, slot in enumerate(slots) if j in kept_rows])]
    assert torch.equal(rows, expected)


@pytest.mark.parametrize("method", list(VISUAL))
@pytest.mark.parametrize("name", MODELS)
def test_exactly_keep_tokens_in_order(paths, name, method):
    model, processor = load(paths, name)
    adapter = get_adapter(model)
    inputs = inputs_for(processor, name, images_per_row=2)
    keep = 5
    with torch.no_grad():
        image_kwargs = {k: inputs[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in inputs}
        reference = list(model.model.get_image_features(**image_kwargs, return_dict=True).pooler_output)
    seen, handles = _decoder_inputs(model, adapter)
    try:
        with tp.patch(model, METHODS[method](keep)) as handle:
            generate(model, inputs, n=2)
    finally:
        for h in handles:
            h.remove()
    ids, embeds = seen["ids"], seen["embeds"]
    image_id = adapter.image_token_id
    newline = model.model.image_newline if name == "next" else None
    image = 0
    for row in range(ids.shape[0]):
        for start, end in adapter.image_runs(ids[row]):
            pos = start
            while pos < end:  # adjacent images: split by their kept counts (from the stats)
                n = handle.stats.records[image].after
                rows = embeds[row, pos : pos + n]
                content = rows if newline is None else rows[~(rows == newline).all(dim=1)]
                assert content.shape[0] == keep
                if method != "visionzip":  # contextual tokens are merged, not copies
                    found = _subsequence(content, reference[image])
                    if newline is not None:
                        _check_newlines(rows, reference[image], found, newline)
                pos += n
                image += 1
            assert (ids[row, start:end] == image_id).all()
    assert image == len(reference)
    assert all(r.before > keep for r in handle.stats.records)


@pytest.mark.parametrize("method", ["holov", "flowcut", "visionzip", "random", "fastv_last", "fastv_text_mean"])
@pytest.mark.parametrize("name", MODELS)
def test_batch_rows_match_single_rows(paths, name, method):
    model, processor = load(paths, name)
    batch = inputs_for(processor, name)
    singles = [inputs_for(processor, name, rows=(r,)) for r in (0, 1)]
    assert batch["attention_mask"][1, 0] == 0  # row 1 is left-padded
    with torch.no_grad():
        base_single = [model(**s).logits[0, -1] for s in singles]
        base_batch = model(**batch).logits[:, -1]
    for r in (0, 1):  # the unpatched model has the property (up to float noise)
        torch.testing.assert_close(base_batch[r], base_single[r], atol=1e-4, rtol=1e-4)
    with tp.patch(model, METHODS[method](5)):
        out = generate(model, batch)
        single_out = [generate(model, s) for s in singles]
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
            single_logits = [model(**s).logits[0, -1] for s in singles]
    width = batch["input_ids"].shape[1]
    for r in (0, 1):
        torch.testing.assert_close(logits[r], single_logits[r], atol=1e-4, rtol=1e-4)
        assert torch.equal(out[r, width:], single_out[r][0, singles[r]["input_ids"].shape[1] :])
        assert torch.equal(out[r, :width], batch["input_ids"][r])  # caller's prompt restored


@pytest.mark.parametrize("name", MODELS)
def test_multi_image_budget_is_per_image(paths, name):
    model, processor = load(paths, name)
    inputs = inputs_for(processor, name, images_per_row=2)
    with tp.patch(model, tp.HoloV(keep=6, crops=4)) as handle:
        generate(model, inputs, n=2)
    records = handle.stats.records
    # `kept` lists the method's kept tokens (NeXT: content tokens; `after` also counts row newlines).
    assert len(records) == 4 and all(len(r.kept) == 6 for r in records)
    assert all(r.after == 6 for r in records) or name == "next"
    assert sorted((r.row, r.image) for r in records) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("name", MODELS)
def test_eager_attention(paths, name):
    model, processor = load(paths, name)
    eager, _ = load(paths, name, attn="eager")
    inputs = inputs_for(processor, name)
    for method in ("flowcut", "visionzip", "fastv_last"):
        with tp.patch(eager, METHODS[method](1.0)):
            assert torch.equal(generate(eager, inputs), generate(model, inputs))
        with tp.patch(eager, METHODS[method](5)), tp.patch(model, METHODS[method](5)):
            with torch.no_grad():
                torch.testing.assert_close(eager(**inputs).logits[:, -1], model(**inputs).logits[:, -1],
                                           atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_imageless_prompt_and_huge_keep(paths, name):
    model, processor = load(paths, name)
    text = processor.tokenizer(["describe the red circle"], return_tensors="pt")
    base_text = generate(model, dict(text))
    inputs = inputs_for(processor, name)
    base = generate(model, inputs)
    with tp.patch(model, tp.HoloV(keep=4)) as handle:
        assert torch.equal(generate(model, dict(text)), base_text)
        assert not handle.stats.records
    with tp.patch(model, tp.FlowCut(keep=10_000)) as handle:
        assert torch.equal(generate(model, inputs), base)
    assert all(r.after == r.before for r in handle.stats.records)


@pytest.mark.parametrize("name", ["qwen", "qwen2"])
def test_qwen_positions_are_gathered_and_decode_continues(paths, name):
    model, processor = load(paths, name)
    adapter = get_adapter(model)
    inputs = inputs_for(processor, name)
    calls = []

    def hook(module, args, kwargs):
        calls.append(kwargs.get("position_ids").clone())

    h = adapter.text_model().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(model, inputs, n=3)
        full, full_deltas = calls[:], model.model.rope_deltas.clone()
        calls.clear()
        with tp.patch(model, tp.HoloV(keep=5, crops=4)):
            generate(model, inputs, n=3)
        pruned, pruned_deltas = calls[:], model.model.rope_deltas.clone()
    finally:
        h.remove()
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"].bool()
    for row in range(ids.shape[0]):
        full_pos = full[0][1:, row][:, mask[row]]  # [3, L] M-RoPE rows of the real tokens
        full_img = (ids[row][mask[row]] == adapter.image_token_id)
        pruned_pos = pruned[0][1:, row]
        pruned_len = pruned_pos.shape[1]
        # Text tokens: same positions in the same order; image tokens: 5 of the original ones, in order.
        full_cols = [tuple(full_pos[:, j].tolist()) for j in range(full_pos.shape[1])]
        text_cols = [c for c, img in zip(full_cols, full_img.tolist()) if not img]
        image_cols = [c for c, img in zip(full_cols, full_img.tolist()) if img]
        got = [tuple(pruned_pos[:, j].tolist()) for j in range(pruned_len)][-(len(text_cols) + 5):]
        got_text = got[: full_img.tolist().index(True)] + got[full_img.tolist().index(True) + 5 :]
        got_image = got[full_img.tolist().index(True) : full_img.tolist().index(True) + 5]
        assert got_text == text_cols
        assert len(set(got_image)) == 5 and all(c in image_cols for c in got_image)
        assert [image_cols.index(c) for c in got_image] == sorted(image_cols.index(c) for c in got_image)
        # rope_deltas (position = text index + delta) grow by the number of dropped image tokens.
        removed = int(full_img.sum()) - 5
        assert int(pruned_deltas[row]) == int(full_deltas[row]) + removed
        # Decoding: the new tokens get the unpruned model's positions.
        for step in (1, 2):
            assert torch.equal(pruned[step][1:, row], full[step][1:, row])


@pytest.mark.parametrize("name", MODELS)
def test_fastv_keeps_k_image_tokens_per_image_from_layer_k(paths, name):
    model, processor = load(paths, name)
    adapter = get_adapter(model)
    inputs = inputs_for(processor, name)
    lengths = {}

    def hook(index):
        def fn(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            lengths.setdefault(index, hs.shape[1])
        return fn

    # Attention inputs: layer K's wrapper gathers the kept tokens before its attention runs.
    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(adapter.decoder_layers)]
    try:
        with tp.patch(model, tp.FastV(layer=2, keep=4, impl="torch")) as handle:
            generate(model, inputs, n=2)
    finally:
        for h in handles:
            h.remove()
    ids = inputs["input_ids"]
    # Layers >= K drop the rows' padding with the pruned tokens: the batch is as long as its longest
    # pruned row (shorter rows are left-filled with masked slots).
    real = inputs["attention_mask"].sum(1)
    per_row = [int(real[r]) - sum(e - s - 4 for s, e in adapter.image_runs(ids[r])) for r in range(ids.shape[0])]
    assert lengths[0] == lengths[1] == ids.shape[1]
    assert lengths[2] == lengths[3] == max(per_row)
    assert [r.after for r in handle.stats.records if r.kind == "llm"] == [4, 4]


@pytest.mark.parametrize("name", ["llava", "next"])
def test_clip_probe_matches_eager_attention_weights(paths, name):
    """The [CLS] rows the probe computes from q/k under SDPA equal the eager attention weights."""
    model, processor = load(paths, name)
    eager, _ = load(paths, name, attn="eager")
    inputs = inputs_for(processor, name)
    images = get_adapter(model).encode_images(dict(inputs), frozenset({"cls_attention", "flow_layers"}))
    pixels = inputs["pixel_values"]
    crops = pixels[0] if pixels.dim() == 5 else pixels[:1]  # image 0: its crops (NeXT) or itself
    with torch.no_grad():
        out = eager.model.vision_tower(crops, output_attentions=True)
    reference = [a[:, :, 0, 1:].mean(dim=1) for a in out.attentions]  # [crops, N] per layer
    image = images[0]
    layers = image.extras["flow_layers"]
    assert len(layers) == len(reference) - 1  # every layer up to the feature layer (-2)
    for record, ref in zip(layers, reference):
        torch.testing.assert_close(record["attention"][:16], ref[0][:16], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(image.cls_attention[:16], reference[-2][0][:16], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("score", ["last", "text_mean"])
@pytest.mark.parametrize("name", ["llava", "next", "qwen"])
def test_fastv_selection_matches_eager_attention(paths, name, score):
    """FastV's kept tokens = top-k of layer K-1's eager attention weights (last token, or the mean
    over the text after the image), per image."""
    eager, processor = load(paths, name, attn="eager")
    adapter = get_adapter(eager)
    inputs = inputs_for(processor, name)
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1: [B, H, L, L]
    with tp.patch(eager, tp.FastV(layer=2, keep=4, impl="torch", query=score)) as handle:
        with torch.no_grad():
            eager(**inputs)
    records = [r for r in handle.stats.records if r.kind == "llm"]
    ids = inputs["input_ids"]
    for record in records:
        start, end = adapter.image_runs(ids[record.row])[record.image]
        queries = slice(ids.shape[1] - 1, None) if score == "last" else slice(end, None)
        weights = attentions[record.row, :, queries, start:end].float().mean(dim=(0, 1))
        expected = torch.sort(torch.topk(weights, 4).indices).values
        assert list(record.kept) == expected.tolist()


def _mixed_batch(processor, name):
    """Rows 0 and 2 carry an image each, row 1 none."""
    prompts, images = [], []
    for r, with_image in enumerate([True, False, True]):
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": TEXTS[r % 2]}]
        prompts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        if with_image:
            images.append(make_image(64, seed=r).resize(SIZES[name][r % 2]))
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


def _row(inputs, name, r, image_row):
    """Row ``r`` of a batch as its own unpadded batch (image inputs sliced by image)."""
    keep = inputs["attention_mask"][r].bool()
    single = {"input_ids": inputs["input_ids"][r: r + 1, keep], "attention_mask": inputs["attention_mask"][r: r + 1, keep]}
    if "mm_token_type_ids" in inputs:
        single["mm_token_type_ids"] = inputs["mm_token_type_ids"][r: r + 1, keep]
    if image_row is None:
        return single
    if name.startswith("qwen"):
        sizes = inputs["image_grid_thw"].prod(-1).tolist()
        start = sum(sizes[:image_row])
        single["pixel_values"] = inputs["pixel_values"][start: start + sizes[image_row]]
        single["image_grid_thw"] = inputs["image_grid_thw"][image_row: image_row + 1]
    else:
        single["pixel_values"] = inputs["pixel_values"][image_row: image_row + 1]
        if "image_sizes" in inputs:
            single["image_sizes"] = inputs["image_sizes"][image_row: image_row + 1]
    return single


@pytest.mark.parametrize("name", MODELS)
def test_fastv_prunes_each_row_of_a_batch_with_imageless_rows(paths, name):
    """Issue 15.1: a row without an image must not switch pruning off for the whole batch."""
    model, processor = load(paths, name)
    adapter = get_adapter(model)
    inputs = _mixed_batch(processor, name)
    method = tp.FastV(layer=2, keep=4, impl="torch")
    lengths = {}
    def record(module, args, kwargs):
        lengths.setdefault("layer2", kwargs["hidden_states"].shape[1])

    hook = adapter.decoder_layers[2].self_attn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with tp.patch(model, method) as handle:
            batch = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True)
            singles = [model.generate(**_row(inputs, name, r, image), max_new_tokens=4, min_new_tokens=4,
                                      do_sample=False, output_scores=True, return_dict_in_generate=True)
                       for r, image in enumerate([0, None, 1])]
    finally:
        hook.remove()
    real = inputs["attention_mask"].sum(1).tolist()
    ids = inputs["input_ids"]
    dropped = [sum(e - s - 4 for s, e in adapter.image_runs(ids[r])) for r in range(3)]
    assert dropped[0] > 0 and dropped[1] == 0 and dropped[2] > 0
    assert lengths["layer2"] == max(n - d for n, d in zip(real, dropped))  # image rows really shrank
    images = [r for r in handle.stats.per_image(call=1) if r.kind == "llm"]
    assert [(r.row, r.after) for r in images] == [(0, 4), (2, 4)]
    layer2 = [(r.row, r.before, r.after) for r in handle.stats.per_layer(call=1) if r.layer == 2 and r.kind == "llm-prefill"]
    assert layer2 == [(r, real[r], real[r] - dropped[r]) for r in range(3)]
    for r, single in enumerate(singles):
        assert torch.equal(batch.sequences[r, ids.shape[1]:], single.sequences[0, -4:]), r
        torch.testing.assert_close(torch.stack(batch.scores)[:, r], torch.stack(single.scores)[:, 0],
                                   rtol=1e-4, atol=1e-4)
