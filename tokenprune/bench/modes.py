"""Benchmark modes and engines: which runner measures a given (engine, mode) pair.

A runner is a function ``run(config: BenchConfig, progress: Progress) -> list[dict]`` that returns
one result row per variant (``"baseline"`` first, then each method), built with
:func:`tokenprune.bench.results.variant_rows` so every mode reports the same columns. Runners live
in :mod:`tokenprune.bench.suites`, are referenced as ``"module:function"`` strings and imported
(by package name, never by file path) only when chosen; a runner whose module (or whose backend:
vLLM, sentence-transformers...) cannot be imported makes the CLI exit 2 with one line. Wiring a new
mode is one entry in :data:`RUNNERS` (and one in :data:`STAGE_MODES` when a method stage implies it).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

__all__ = ["BenchConfig", "RUNNERS", "STAGE_MODES", "ENGINES", "MODES", "DEFAULT_METHODS", "resolve_mode",
           "load_runner", "BackendUnavailable"]

# (engine, mode) -> runner, one module of tokenprune.bench.suites per suite.
RUNNERS: dict[tuple[str, str], str] = {
    ("hf", "visual"): "tokenprune.bench.suites.hf_visual:run",
    ("vllm", "visual"): "tokenprune.bench.suites.vllm_visual:run",
    ("hf", "text"): "tokenprune.bench.suites.text:run",
    ("hf", "rag"): "tokenprune.bench.suites.rag.run:run",
    ("hf", "spec"): "tokenprune.bench.suites.spec:run",
}
ENGINES = ("hf", "vllm")
# mode -> methods measured when --methods is not given (the published defaults).
DEFAULT_METHODS = {"visual": "divprune:keep=64,fastv:layer=2:keep=0.5", "text": "lazyllm,snapkv:keep=0.5",
                   "rag": "context:threshold=0.3,context,context:threshold=0.8",
                   "spec": "draft_tree:sources=ngram:budget=4,draft_tree:sources=ngram:budget=auto,draft_tree"}
MODES = ("visual", "text", "rag", "spec")
# method stage -> the mode that measures it ("auto" mode picks from the methods given).
STAGE_MODES = {"visual": "visual", "llm": "visual", "prompt": "text", "kv": "text", "context": "rag",
               "speculative": "spec"}
# (engine, mode) -> modules whose absence means "backend not installed" rather than a bug.
BACKENDS: dict[str, tuple[str, ...]] = {"vllm": ("vllm",), "hf": ("transformers",)}


class BackendUnavailable(RuntimeError):
    """A mode's runner or its backend cannot be imported (reported as one line, exit code 2)."""


@dataclass
class BenchConfig:
    """Every parameter of a benchmark run; written verbatim into the JSON/CSV results.

    Attributes:
        model: preset name or checkpoint directory.
        methods: ``[(label, method)]``: the pruners to compare with the baseline (``tp.Pruner``).
        engine / mode: see :data:`RUNNERS`.
        batch_size, prompt_tokens, image_size: input shape (``prompt_tokens``: text tokens of the
            prompt besides image tokens in visual mode; the prompt length in text mode;
            ``None`` = the mode's default). ``image_size``: pixels (None = the model's).
        new_tokens: tokens generated per row, forced equal in every run (EOS ignored).
        reps / warmup: measured repetitions and discarded warm-up rounds of every variant.
        extra: mode-specific options (``samples``: prompts per kind in spec mode, questions in rag mode).
    """

    model: str = "tiny-llava"
    methods: list[tuple[str, Any]] = field(default_factory=list)
    engine: str = "hf"
    mode: str = "visual"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1
    prompt_tokens: Optional[int] = None
    image_size: Optional[int] = None
    new_tokens: int = 16
    reps: int = 5
    warmup: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [{"label": label, **method.to_config()} for label, method in self.methods]
        return d


def resolve_mode(mode: str, methods: list[Any]) -> str:
    """``mode`` itself, or for ``"auto"`` the single mode implied by the methods' stages."""
    if mode != "auto":
        if mode not in MODES:
            raise ValueError(f"mode must be auto or one of {', '.join(MODES)}, got {mode!r}")
        return mode
    stages = [c.stage for m in methods for c in m.components()]  # a multi-stage method: each of its stages
    implied = {STAGE_MODES.get(s) for s in stages} or {"visual"}
    if None in implied:
        unknown = sorted({s for s in stages if s not in STAGE_MODES})
        raise ValueError(f"no benchmark mode measures methods of stage {', '.join(unknown)}")
    if len(implied) > 1:
        raise ValueError(f"these methods need different benchmark modes ({', '.join(sorted(implied))}); "
                         "benchmark them in separate runs")
    return implied.pop()


def load_runner(engine: str, mode: str) -> Callable[..., list[dict]]:
    """Import the runner of ``(engine, mode)``.

    Raises:
        ValueError: unknown engine, or a combination no runner measures.
        BackendUnavailable: the runner or its backend is not importable here.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    ref = RUNNERS.get((engine, mode))
    if ref is None:
        raise ValueError(f"the {engine} engine has no {mode} mode; available: "
                         f"{', '.join(f'{e}/{m}' for e, m in RUNNERS)}")
    for backend in BACKENDS.get(engine, ()):
        if importlib.util.find_spec(backend) is None:
            raise BackendUnavailable(f"engine {engine!r} needs the {backend} package, which is not installed "
                                     f"(pip install 'tokenprune[{engine}]')")
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"{engine}/{mode} benchmark unavailable: cannot import {module_name} ({exc})") from None
    runner = getattr(module, attr, None)
    if runner is None:
        raise BackendUnavailable(f"{engine}/{mode} benchmark unavailable: {module_name} has no {attr}")
    return runner
