"""Configuration of the vLLM plugin: parsing and validation (no vLLM needed), then the engine
start-up behaviour through vLLM's own plugin loading (marked ``vllm``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

import tokenprune as tp
from tokenprune.integrations import vllm as tpv
from tokenprune.integrations.vllm.config import method_from_hf_config, parse_config, parse_context_config, request_keep

from _vllm_support import make_llm, registered_target, shutdown, vllm_env  # noqa: F401

VLLM_LLAVA = "vllm.model_executor.models.llava:LlavaForConditionalGeneration"


# --------------------------------------------------------------------------- parsing


def test_empty_means_not_configured():
    assert parse_config(None) is None
    assert parse_config("") is None
    assert parse_config("  ") is None


@pytest.mark.parametrize(
    "raw",
    ['{"method": "divprune", "keep": 64}', {"method": "DivPrune", "keep": 64}, tp.DivPrune(keep=64)],
)
def test_parses_json_mapping_and_instances(raw):
    method = parse_config(raw)
    assert isinstance(method, tp.DivPrune) and method.keep == 64


def test_fraction_keep_stays_a_fraction():
    method = parse_config('{"method": "divprune", "keep": 0.25}')
    assert method.keep == 0.25 and method.num_kept(576) == 144


@pytest.mark.parametrize(
    "raw, match",
    [
        ('{"method": "divprune", "keep": 64', "not valid JSON"),
        ('"divprune"', "JSON object"),
        ('["divprune"]', r'\[0\] must be an object with a "method" name'),
        ('{"keep": 64}', 'needs a "method"'),
        ('{"method": "nope"}', "unknown method 'nope'"),
        ('{"method": "divprune", "keep": 0}', "keep must be >= 1"),
        ('{"method": "divprune", "keep": 1.5}', r"keep must be in \(0, 1\]"),
        ('{"method": "divprune", "keep": "64"}', "keep must be an int"),
        ('{"method": "divprune", "budget": 64}', "unexpected argument"),
        ('{"method": "fastv", "layer": 2, "keep": 0.5}', "vLLM has no hook"),
    ],
)
def test_bad_configurations_are_rejected_with_the_reason(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_config(raw, source="TOKENPRUNE_CONFIG")


def test_methods_needing_inputs_vllm_does_not_compute_are_rejected():
    from tokenprune.methods.base import VisualPruner

    @dataclass(frozen=True)
    class NeedsLLMAttention(VisualPruner):
        requires = frozenset({"text_attention"})

    with pytest.raises(ValueError, match="text_attention"):
        parse_config(NeedsLLMAttention(keep=8))


def test_round_trip_through_json():
    method = tp.DivPrune(keep=0.1, impl="torch")
    assert parse_config(tpv.config.config_to_json(method)) == method


def test_request_keep_overrides_only_the_budget():
    base = tp.DivPrune(keep=64, impl="torch")
    assert request_keep(base, {}) is base
    assert request_keep(base, {"tokenprune_keep": 32}) == tp.DivPrune(keep=32, impl="torch")
    with pytest.raises(ValueError, match="tokenprune_keep"):
        request_keep(base, {"tokenprune_keep": -1})
    with pytest.raises(TypeError, match="tokenprune_keep"):
        request_keep(base, {"tokenprune_keep": "all"})


def test_hf_overrides_win_over_the_environment(monkeypatch):
    class Config:
        tokenprune = {"method": "divprune", "keep": 8}

    monkeypatch.setenv("TOKENPRUNE_CONFIG", '{"method": "divprune", "keep": 64}')
    assert method_from_hf_config(Config()).keep == 8
    assert method_from_hf_config(object()).keep == 64
    monkeypatch.delenv("TOKENPRUNE_CONFIG")
    assert method_from_hf_config(object()) is None


@pytest.mark.parametrize("raw, expected", [
    ("{not json", "TOKENPRUNE_DRAFT_TREE is not valid JSON"),
    ("[1, 2]", "TOKENPRUNE_DRAFT_TREE must be a JSON object"),
    ('{"method": "fastv"}', "draft_tree method only"),
    ('{"budget": -3}', "invalid TOKENPRUNE_DRAFT_TREE: .*budget"),
    ('{"nonsense": 1}', "invalid TOKENPRUNE_DRAFT_TREE: .*nonsense"),
])
def test_malformed_draft_tree_environment_names_the_variable(monkeypatch, raw, expected):
    from tokenprune.integrations.vllm.config import draft_tree_from_env

    monkeypatch.setenv("TOKENPRUNE_DRAFT_TREE", raw)
    with pytest.raises(ValueError, match=expected):
        draft_tree_from_env()


def test_draft_tree_environment_builds_the_method(monkeypatch):
    from tokenprune.integrations.vllm.config import draft_tree_from_env

    monkeypatch.delenv("TOKENPRUNE_DRAFT_TREE", raising=False)
    assert draft_tree_from_env() == tp.DraftTree(sources=("ngram",))
    monkeypatch.setenv("TOKENPRUNE_DRAFT_TREE", '{"method": "draft_tree", "sources": ["ngram"], "budget": 16}')
    assert draft_tree_from_env() == tp.DraftTree(sources=("ngram",), budget=16)


@pytest.mark.parametrize("raw", ["abc", "1.5", "-0.1", "nan", "inf"])
def test_malformed_draft_min_prob_environment_names_the_variable(monkeypatch, raw):
    from tokenprune.integrations.vllm.config import draft_min_prob_from_env

    monkeypatch.setenv("TOKENPRUNE_DRAFT_MIN_PROB", raw)
    with pytest.raises(ValueError, match=r"TOKENPRUNE_DRAFT_MIN_PROB must be a number in \[0, 1\]"):
        draft_min_prob_from_env()


def test_draft_min_prob_environment(monkeypatch):
    from tokenprune.integrations.vllm.config import draft_min_prob_from_env

    monkeypatch.delenv("TOKENPRUNE_DRAFT_MIN_PROB", raising=False)
    assert draft_min_prob_from_env() == 0.1
    monkeypatch.setenv("TOKENPRUNE_DRAFT_MIN_PROB", "0.25")
    assert draft_min_prob_from_env() == 0.25


def test_tokenprune_overrides():
    overrides = tpv.tokenprune_overrides(tp.DivPrune(keep=32))
    assert overrides["architectures"] == ["TokenpruneLlavaForConditionalGeneration"]
    assert parse_config(overrides["tokenprune"]) == tp.DivPrune(keep=32)
    qwen = tpv.tokenprune_overrides(tp.HoloV(keep=8), "Qwen2_5_VLForConditionalGeneration")
    assert qwen["architectures"] == ["TokenpruneQwen2_5_VLForConditionalGeneration"]
    assert set(tpv.PRUNED_ARCHITECTURES) == {
        f"Tokenprune{arch}" for arch in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                                         "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                                         "Qwen3VLForConditionalGeneration")
    }
    with pytest.raises(ValueError, match="no hook"):
        tpv.tokenprune_overrides(tp.FastV())
    with pytest.raises(ValueError, match="architecture must be one of"):
        tpv.tokenprune_overrides(tp.DivPrune(keep=8), "MllamaForConditionalGeneration")


def test_enable_refuses_when_engine_processes_would_not_load_the_plugin(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    monkeypatch.delenv("TOKENPRUNE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="VLLM_PLUGINS"):
        tpv.enable(tp.DivPrune(keep=64))
    assert "TOKENPRUNE_CONFIG" not in os.environ


def test_version_range_is_checked(monkeypatch, caplog):
    from tokenprune.integrations.vllm import plugin

    monkeypatch.setattr(plugin, "_vllm_version", lambda: "0.35.1")
    with pytest.raises(RuntimeError, match=r"supports vllm >=0.32.0,<0.34 \(found 0.35.1\)"):
        tpv.check_vllm_version(strict=True)
    assert tpv.check_vllm_version(strict=False) is False
    assert "found 0.35.1" in caplog.text
    monkeypatch.setattr(plugin, "_vllm_version", lambda: "0.33.2")
    assert tpv.check_vllm_version(strict=True) is True


# --------------------------------------------------------------------------- engine start


@pytest.fixture
def config_env(vllm_env):  # noqa: F811
    """Restore TOKENPRUNE_CONFIG and the registry after each test."""
    saved = os.environ.pop(tpv.ENV_VAR, None)
    yield
    os.environ.pop(tpv.ENV_VAR, None)
    if saved is not None:
        os.environ[tpv.ENV_VAR] = saved
    tpv.register()


@pytest.mark.vllm
def test_enable_keeps_the_context_entry_and_disable_restores_only_what_it_changed(config_env):
    user = '{"context": {"keep_ratio": 0.5}}'
    os.environ[tpv.ENV_VAR] = user
    tpv.register()
    tpv.enable(tp.DivPrune(keep=8, impl="torch"))
    enabled = os.environ[tpv.ENV_VAR]
    assert parse_config(enabled) == tp.DivPrune(keep=8, impl="torch")
    assert parse_context_config(enabled) == {"keep_ratio": 0.5}  # context pruning stays on
    assert registered_target("LlavaForConditionalGeneration").endswith(":TokenpruneLlavaForConditionalGeneration")
    tpv.disable()
    assert os.environ[tpv.ENV_VAR] == user
    assert registered_target("LlavaForConditionalGeneration") == VLLM_LLAVA
    tpv.disable()  # nothing left to undo: the user's own setting stays
    assert os.environ[tpv.ENV_VAR] == user


@pytest.mark.vllm
def test_register_is_idempotent_and_inert_without_configuration(config_env):
    tpv.register()
    tpv.register()
    assert registered_target("LlavaForConditionalGeneration") == VLLM_LLAVA
    assert registered_target("TokenpruneLlavaForConditionalGeneration").endswith(":TokenpruneLlavaForConditionalGeneration")


@pytest.mark.vllm
@pytest.mark.parametrize(
    "raw, match",
    [
        ('{"method": "divprune", "keep": ', "not valid JSON"),
        ('{"method": "fastv"}', "vLLM has no hook"),
        ('{"method": "divprune", "keep": 0}', "keep must be >= 1"),
    ],
)
def test_bad_config_fails_at_engine_start_and_changes_nothing(config_env, tiny_llava_path, raw, match):
    os.environ[tpv.ENV_VAR] = raw
    with pytest.raises(ValueError, match=match):
        make_llm(tiny_llava_path)
    assert registered_target("LlavaForConditionalGeneration") == VLLM_LLAVA


@pytest.fixture
def cls_test_method():
    """A method that needs the vision [CLS] attention (as HoloV/VisionZip do): keep the tokens
    [CLS] attends to most. Registered for one test only (the registry-driven tests see every
    registered method)."""
    from tokenprune.methods import base

    name = "test_cls_topk"

    @base.register(name)
    @dataclass(frozen=True)
    class ClsTopK(base.ScoredVisualPruner):
        requires = frozenset({"cls_attention"})

        def score(self, image):
            return image.cls_attention

    yield name
    base._REGISTRY.pop(name, None)


@pytest.mark.vllm
def test_hf_overrides_configure_one_engine(config_env, tiny_llava_path, cls_test_method):
    """No environment: ``hf_overrides`` selects the pruned class and the method for this engine
    (here one that needs [CLS] attention, computed in the worker); a bad value fails the start."""
    from vllm import SamplingParams

    from tokenprune.fixtures import make_image

    with pytest.raises(Exception, match="keep must be >= 1"):
        make_llm(
            tiny_llava_path,
            hf_overrides={"architectures": ["TokenpruneLlavaForConditionalGeneration"], "tokenprune": {"method": "divprune", "keep": 0}},
        )
    method = {"method": cls_test_method, "keep": 4}
    llm = make_llm(tiny_llava_path, hf_overrides=tpv.tokenprune_overrides(method))
    try:
        prompt = {"prompt": "USER: <image>\nDescribe it.\nASSISTANT:", "multi_modal_data": {"image": make_image(56)}}
        out = llm.generate([prompt, {**prompt, "mm_processor_kwargs": {"tokenprune_keep": 16}}],
                           SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        assert len(out[1].prompt_token_ids) - len(out[0].prompt_token_ids) == 16 - 4
        assert all(len(o.outputs[0].token_ids) == 4 for o in out)

        def inspect(model):
            return type(model).__name__, model._vision_probe is not None, model.tokenprune_stats.calls

        name, has_probe, calls = llm.apply_model(inspect)[0]
        assert name == "TokenpruneLlavaForConditionalGeneration" and has_probe and calls >= 1
    finally:
        shutdown(llm)
    assert json.loads(json.dumps(tpv.tokenprune_overrides(tp.DivPrune(keep=4))))  # JSON-able for --hf-overrides


def test_a_composition_list_configures_visual_and_context_pruning():
    raw = json.dumps([{"method": "context", "threshold": 0.4}, {"method": "divprune", "keep": 16}])
    assert parse_config(raw) == tp.DivPrune(keep=16)
    context = parse_context_config(raw)
    assert context["threshold"] == 0.4 and "method" not in context
    assert parse_config([tp.DivPrune(keep=8)], source="enable()") == tp.DivPrune(keep=8)
    assert parse_config(tp.compose(tp.DivPrune(keep=8)), source="enable()") == tp.DivPrune(keep=8)


@pytest.mark.parametrize("raw, match", [
    ('[{"method": "divprune"}, {"method": "holov"}]', "both act at stage 'visual'"),
    ('[{"method": "divprune"}, {"method": "snapkv"}]', "SnapKV.*vLLM plugin runs visual pruning methods only"),
    ('[{"method": "fastv"}]', "FastV, which prunes inside the language model"),
    ('[{"keep": 3}]', r'TOKENPRUNE_CONFIG\[0\] must be an object with a "method" name'),
    ('[{"method": "divprune", "keep": -1}]', r"invalid TOKENPRUNE_CONFIG\[0\]: keep"),
])
def test_bad_composition_lists_name_the_problem(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_config(raw)


# --------------------------------------------------------------------------- platform checks


def _engine_config(tp=1, pp=1, compile_mm_encoder=False, tp_mode="weights"):
    from types import SimpleNamespace

    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        compilation_config=SimpleNamespace(compile_mm_encoder=compile_mm_encoder),
        model_config=SimpleNamespace(multimodal_config=SimpleNamespace(mm_encoder_tp_mode=tp_mode)),
    )


def test_engine_options_that_break_vision_statistics_are_rejected():
    from tokenprune.integrations.vllm.checks import check_engine

    check_engine(tp.HoloV(keep=8), _engine_config(), "Qwen2_5_VLForConditionalGeneration")
    check_engine(tp.DivPrune(keep=8), _engine_config(tp=2, compile_mm_encoder=True, tp_mode="data"), "X")
    check_engine(tp.HoloV(keep=8), _engine_config(tp=1, tp_mode="data"), "X")  # one rank sees every image
    with pytest.raises(ValueError, match=r"compilation_config\['compile_mm_encoder'\]"):
        check_engine(tp.FlowCut(keep=8), _engine_config(compile_mm_encoder=True), "X")
    with pytest.raises(ValueError, match="mm_encoder_tp_mode = 'data'"):
        check_engine(tp.VisionZip(keep=8), _engine_config(tp=2, tp_mode="data"), "X")


@pytest.mark.parametrize("raw, match", [
    ({"device": "cuda:0"}, r"\['device'\] = 'cuda:0', but this machine has no cuda device"),
    ({"device": "not-a-device"}, r": device must be a torch device such as 'cpu'.*got 'not-a-device'"),
    ({"model": "/nonexistent/minilm"}, r"\['model'\] = '/nonexistent/minilm' is not a local directory"),
])
def test_context_scorer_that_cannot_load_here_is_rejected(raw, match):
    import torch

    from tokenprune.integrations.vllm.config import parse_context_config

    if raw.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"TOKENPRUNE_CONFIG\['context'\]" + match):
        parse_context_config({"context": {"scorer": "bi-encoder", **raw}})


@pytest.mark.vllm
def test_triton_impl_needs_a_device_triton_runs_on(monkeypatch):
    from tokenprune.integrations.vllm.checks import check_method

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_method(tp.DivPrune(keep=8, impl="triton"), "TOKENPRUNE_CONFIG")  # the interpreter runs it
    monkeypatch.delenv("TRITON_INTERPRET")
    check_method(tp.DivPrune(keep=8, impl="auto"), "TOKENPRUNE_CONFIG")
    with pytest.raises(ValueError, match=r"TOKENPRUNE_CONFIG\['impl'\] = 'triton' cannot run on this cpu engine"):
        check_method(tp.DivPrune(keep=8, impl="triton"), "TOKENPRUNE_CONFIG")


@pytest.mark.vllm
def test_qwen_position_repair_needs_one_pipeline_stage():
    from tokenprune.integrations.vllm.checks import check_mrope_runner

    check_mrope_runner(_engine_config(tp=2), "Qwen2_5_VLForConditionalGeneration")
    with pytest.raises(ValueError, match="pipeline_parallel_size = 1"):
        check_mrope_runner(_engine_config(pp=2), "Qwen2_5_VLForConditionalGeneration")


@pytest.mark.vllm
def test_platform_options_fail_at_engine_start_not_on_the_first_request(config_env, monkeypatch, tiny_llava_path):
    """``"impl": "triton"`` on a CPU engine used to start fine and kill the engine on the first image
    request; now the engine does not start, whether configured by the environment or per engine,
    and nothing is left registered."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    os.environ[tpv.ENV_VAR] = '{"method": "divprune", "keep": 4, "impl": "triton"}'
    with pytest.raises(ValueError, match=r"TOKENPRUNE_CONFIG\['impl'\] = 'triton' cannot run"):
        make_llm(tiny_llava_path)
    assert registered_target("LlavaForConditionalGeneration") == VLLM_LLAVA
    os.environ.pop(tpv.ENV_VAR)
    with pytest.raises(Exception, match=r"hf_overrides\['tokenprune'\]\['impl'\] = 'triton' cannot run"):
        make_llm(tiny_llava_path, hf_overrides=tpv.tokenprune_overrides({"method": "divprune", "keep": 4, "impl": "triton"}))
    with pytest.raises(Exception, match=r"compilation_config\['compile_mm_encoder'\]"):
        make_llm(tiny_llava_path, hf_overrides=tpv.tokenprune_overrides({"method": "holov", "keep": 4}),
                 compilation_config={"compile_mm_encoder": True})
