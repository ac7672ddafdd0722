"""Shared set-up of the vLLM tests (``tests/test_vllm_*.py``): environment, plugin entry point, engines.

* Every cache and temporary directory vLLM writes goes under a per-session tmp dir.
* The ``vllm.general_plugins`` entry point exists only when tokenprune is pip-installed (``make
  test`` installs it editable). In a bare checkout, :func:`plugin_path` writes a minimal
  ``*.dist-info`` declaring the same entry point into a tmp dir and puts it, with the checkout, on
  ``sys.path`` and ``PYTHONPATH``, so that vLLM's own plugin loading (in this process and in the
  processes it spawns) finds and calls ``tokenprune.integrations.vllm:register``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = "tokenprune.integrations.vllm:register"


def plugin_installed() -> bool:
    return any(ep.name == "tokenprune" for ep in entry_points(group="vllm.general_plugins"))


def write_plugin_dist_info(root: Path) -> Path:
    """A minimal distribution declaring the tokenprune entry point, under ``root``."""
    info = root / "tokenprune_vllm_test_plugin-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenprune-vllm-test-plugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\ntokenprune = {ENTRY_POINT}\n")
    return root


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory):
    """Environment for in-process engines; yields the extra ``PYTHONPATH`` entries children need."""
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("vllm-env")
    saved = {k: os.environ.get(k) for k in ("VLLM_CACHE_ROOT", "TMPDIR", "PYTHONPATH", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ["VLLM_CACHE_ROOT"] = str(root / "cache")
    os.environ["TMPDIR"] = str(root / "tmp")
    (root / "tmp").mkdir()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["HF_HUB_OFFLINE"] = "1"
    paths = [str(REPO)]
    if not plugin_installed():
        paths.append(str(write_plugin_dist_info(root / "plugin")))
        sys.path.append(paths[-1])
    # Children (vLLM's model-inspection subprocess, `vllm serve`) import tokenprune from here.
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    yield paths
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def reload_plugins() -> None:
    """Make the next engine start run vLLM's general-plugin loading again (once per process
    otherwise), as a fresh vLLM process would."""
    import vllm.plugins

    vllm.plugins.plugins_loaded = False


def engine_kwargs(**overrides):
    """Small, deterministic CPU engine settings for the tiny fixtures.

    Prefix caching and chunked prefill are on, with a 256-token step: unpruned image runs (576
    tokens) and batches of pruned ones are split across steps.
    """
    kwargs = dict(
        enforce_eager=True,
        dtype="float32",
        max_model_len=1536,
        max_num_seqs=4,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=256,
        limit_mm_per_prompt={"image": 2},
        kv_cache_memory_bytes=96 << 20,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def make_llm(model_path, **overrides):
    from vllm import LLM

    reload_plugins()
    return LLM(str(model_path), **engine_kwargs(**overrides))


def shutdown(llm) -> None:
    """Free an in-process engine so the next one can start in the same process."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort, the engine may be half-built
        pass
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001
        pass


def registered_target(arch: str) -> str:
    """``"module:Class"`` that vLLM's registry resolves ``arch`` to."""
    from vllm import ModelRegistry

    entry = ModelRegistry.models[arch]
    if hasattr(entry, "model_cls"):
        return f"{entry.model_cls.__module__}:{entry.model_cls.__name__}"
    return f"{entry.module_name}:{entry.class_name}"


def generate_records(llm, requests, max_tokens=6):
    """Greedy outputs of ``requests``: prompt length, tokens and the chosen tokens' logprobs."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
    outs = llm.generate(requests, params, use_tqdm=False)
    return [
        {
            "prompt_len": len(o.prompt_token_ids),
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
        }
        for o in outs
    ]


# Worker-side helpers for ``LLM.apply_model``: module functions, so that an engine in other processes
# can unpickle them (the tests directory is on their PYTHONPATH, see ``worker_import_path``).


def install_position_recorder(model) -> None:
    """Record the ``positions`` the runner passes to every forward of ``model``."""
    if not hasattr(model, "_test_positions"):
        model._test_positions = []
        model.register_forward_pre_hook(
            lambda module, args, kwargs: module._test_positions.append(kwargs["positions"].clone()),
            with_kwargs=True,
        )


def take_positions(model):
    """The positions recorded since the last call, one tensor per forward, and forget them."""
    out, model._test_positions = model._test_positions, []
    return out


def kept_per_image(model):
    """The kept token indices of every image of the model's last encoder call."""
    return [r.kept for r in model.tokenprune_stats.per_image()]


def worker_import_path() -> None:
    """Let vLLM's spawned processes import this module (``apply_model`` pickles its helpers by reference)."""
    here = str(Path(__file__).resolve().parent)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here] + [p for p in paths if p])


def record_positions(llm) -> None:
    """Record the positions of every forward of an in-process engine (read with :func:`recorded_positions`)."""
    llm.apply_model(install_position_recorder)


def recorded_positions(llm):
    """The positions recorded since the last call (first worker), one tensor per forward."""
    return llm.apply_model(take_positions)[0]


@contextlib.contextmanager
def untouched_engine(model_path, **overrides):
    """An in-process engine with the plugin loaded and nothing configured (vLLM's own classes)."""
    from tokenprune.integrations.vllm import ENV_VAR, register

    saved = os.environ.pop(ENV_VAR, None)
    try:
        register()
        llm = make_llm(model_path, **overrides)
        try:
            yield llm
        finally:
            shutdown(llm)
    finally:
        if saved is not None:
            os.environ[ENV_VAR] = saved


@contextlib.contextmanager
def pruned_engine(model_path, method, **overrides):
    """An in-process engine pruning with ``method`` (``tpv.enable``, undone afterwards)."""
    from tokenprune.integrations import vllm as tpv

    tpv.enable(method)
    try:
        llm = make_llm(model_path, **overrides)
        try:
            yield llm
        finally:
            shutdown(llm)
    finally:
        tpv.disable()


def assert_same_outputs(outs, refs) -> None:
    """Same prompt lengths, greedy tokens and chosen-token logprobs (:func:`generate_records`)."""
    import torch

    assert len(outs) == len(refs)
    for got, ref in zip(outs, refs):
        assert got["prompt_len"] == ref["prompt_len"]
        assert got["tokens"] == ref["tokens"]
        torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(ref["logprobs"]), rtol=0, atol=1e-5)


#: a configuration of every pre-LLM method the vLLM models run (``TOKENPRUNE_CONFIG`` form).
VISUAL_METHODS = {
    "divprune": {"method": "divprune", "impl": "torch"},
    "random": {"method": "random", "seed": 1},
    "grid": {"method": "grid"},
    "holov": {"method": "holov", "crops": 4},
    "visionzip": {"method": "visionzip"},
    "flowcut": {"method": "flowcut"},
}


def assert_same_image_tokens(got, ref, requires) -> None:
    """A vLLM model's ``ImageTokens`` equal the Hugging Face adapter's: features, layout and the
    vision statistics ``requires`` asks for (float tolerance: two implementations)."""
    import torch

    torch.testing.assert_close(got.features, ref.features, rtol=1e-4, atol=1e-4)
    assert got.grid == ref.grid and got.blocks == ref.blocks
    if ref.cls_attention is not None:
        torch.testing.assert_close(got.cls_attention, ref.cls_attention, rtol=1e-4, atol=1e-6)
    if "keys" in requires:
        torch.testing.assert_close(got.extras["keys"], ref.extras["keys"], rtol=1e-4, atol=1e-5)
    if "flow_layers" in requires:
        assert got.extras.get("flow_final_layer") == ref.extras.get("flow_final_layer")
        for g, r in zip(got.extras["flow_layers"], ref.extras["flow_layers"], strict=True):
            assert g.keys() == r.keys()
            for key in g:
                torch.testing.assert_close(g[key], r[key], rtol=1e-4, atol=1e-5)
