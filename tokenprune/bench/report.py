"""Reporting of tokenprune-bench results: environment metadata, tables, JSON/CSV files, plots.

Results files hold ``{"meta": {...}, "results": [row, ...]}`` (JSON) or one row per line with the
metadata repeated in ``meta_*`` columns (CSV); :func:`load_results` reads both back, so
``tokenprune-bench report`` can redraw tables and plots from committed results.

Every entry point that writes files (the CLI's subcommands and the suites' own command lines)
calls :func:`check_outputs` on all its output paths before it measures anything, so a path that
cannot be written, two outputs on one file, an output over an input or over an existing file
(without ``--force``) is refused in one line instead of losing or destroying results.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

__all__ = ["environment", "write_json", "write_csv", "write_text", "load_results", "wide_console", "print_table",
           "markdown_table", "plot_results", "check_plottable", "UNPLOTTABLE_MODES", "check_outputs",
           "check_outputs_or_exit", "add_force_argument", "OutputPathError", "OUTPUT_KINDS", "RANDOM_WEIGHTS_NOTE"]

RANDOM_WEIGHTS_NOTE = ("random weights: latency and token counts are real, output quality is meaningless "
                       "(use a trained checkpoint path for quality)")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """Commit of the checkout this package runs from (``+dirty`` with uncommitted changes), if any."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Machine, device and software facts to store beside every result."""
    import tokenprune

    dev = torch.device(device)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # how shared it was
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "vllm": _version("vllm"),
        "triton": _version("triton"),
        "tokenprune": tokenprune.__version__,
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if dev.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


# ----------------------------------------------------------------------------------------- output paths
#: kind of output -> the extensions its path must have: ``json``/``csv`` results (``load_results``
#: tells them apart by extension), ``plot`` (any format matplotlib writes), ``file`` (any name) and
#: ``directory`` (a checkpoint directory, written file by file).
OUTPUT_KINDS: dict[str, Optional[tuple[str, ...]]] = {
    "json": (".json",), "csv": (".csv",), "plot": None, "file": None, "directory": None}


class OutputPathError(ValueError):
    """An output path that cannot, or must not, be written (one line, exit code 2)."""


def _plot_extensions() -> tuple[str, ...]:
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes())


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file: equal once resolved (``./a.json``, symbolic links), or hard links."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _check_writable(flag: str, path: Path) -> None:
    """``path`` (a file or directory that does not exist yet) can be created: its nearest existing
    ancestor is a directory in which a file can be created (missing directories are made at write time)."""
    ancestor = path.absolute().parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag}: cannot create {str(path)!r}: {str(ancestor)!r} is not a directory")
    try:  # try it: permission bits do not tell root, read-only mounts or /proc apart
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise OutputPathError(f"{flag}: cannot create {str(path)!r}: {str(ancestor)!r} is not writable "
                              f"(creating a file there failed: {exc.strerror or exc})") from None


def _check_output(flag: str, path: Path, kind: str, force: bool) -> None:
    shown = repr(str(path))
    if kind == "directory":
        if os.path.lexists(path) and not path.is_dir():
            raise OutputPathError(f"{flag}: {shown} exists and is not a directory")
        if not path.is_dir():
            _check_writable(flag, path)
        elif any(path.iterdir()) and not force:
            raise OutputPathError(f"{flag}: directory {shown} is not empty; pass --force to write into it "
                                  "(files of the same name are replaced)")
        else:
            _check_writable(flag, path / "file")  # a file can be created in it
        return
    if path.is_dir():
        raise OutputPathError(f"{flag}: {shown} is a directory; give a file name")
    if kind == "plot" and path.suffix.lower() not in _plot_extensions():
        raise OutputPathError(f"{flag}: {shown} has no image extension matplotlib writes (.png, .pdf, .svg, ...)")
    extensions = OUTPUT_KINDS[kind]
    if extensions is not None and path.suffix.lower() not in extensions:
        raise OutputPathError(f"{flag}: {shown} must end in {' or '.join(extensions)} "
                              "(tokenprune-bench report reads results back by extension)")
    if not os.path.lexists(path):
        _check_writable(flag, path)
    elif not force:
        raise OutputPathError(f"{flag}: {shown} exists; pass --force to overwrite it")
    else:
        try:
            open(path, "ab").close()  # writable, without changing it
        except OSError as exc:
            raise OutputPathError(f"{flag}: cannot overwrite {shown} ({exc.strerror or exc})") from None


def check_outputs(
    outputs: Iterable[tuple[str, Optional[str | os.PathLike], str]],
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
) -> None:
    """Refuse, before anything is measured, every output that would fail or destroy data.

    Args:
        outputs: ``(flag, path, kind)`` per output; ``path`` None (flag not given) is skipped;
            ``kind`` one of :data:`OUTPUT_KINDS`. ``flag`` names the output in messages.
        inputs: files the command reads; no output may be one of them, even with ``force``.
        force: overwrite existing files (and write into non-empty ``directory`` outputs).

    Refused, in this order per output: an empty path; the same file as an earlier output or an
    input (paths compared resolved: ``./a.json``, ``a.json``, symbolic and hard links); a
    directory where a file goes (and a file where a directory goes); a wrong extension; a path
    whose nearest existing ancestor is not a directory or not writable (missing parent
    directories are fine: the writers create them); an existing file (a non-empty directory)
    without ``force``.

    Raises:
        OutputPathError: (a ``ValueError``) one line naming the flag and the path.
    """
    done: list[tuple[str, Path]] = []
    read = [Path(p) for p in inputs]
    for flag, path, kind in outputs:
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(OUTPUT_KINDS)}")
        if path is None:
            continue
        if not str(path):
            raise OutputPathError(f"{flag}: empty path")
        p = Path(path)
        for other_flag, other in done:
            if _same_file(p, other):
                raise OutputPathError(f"{other_flag} and {flag} both write {str(path)!r}")
        if any(_same_file(p, i) for i in read):
            raise OutputPathError(f"{flag}: {str(path)!r} is also an input file; write the output elsewhere")
        _check_output(flag, p, kind, force)
        done.append((flag, p))


def add_force_argument(parser: Any) -> None:
    """``--force`` on an argparse parser: the one switch that lets :func:`check_outputs` overwrite."""
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing output files (without it, an existing output is refused)")


def check_outputs_or_exit(
    parser: Any,
    outputs: Iterable[tuple[str, Optional[str | os.PathLike], str]],
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
) -> None:
    """:func:`check_outputs` for a suite's own command line: a refusal ends the program with one
    line on stderr and exit code 2, as argparse does for bad arguments."""
    try:
        check_outputs(outputs, inputs, force)
    except OutputPathError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


# ----------------------------------------------------------------------------------------- files
def _make_parent(path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def write_json(path: str | os.PathLike, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    _make_parent(path)
    Path(path).write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")


def write_csv(path: str | os.PathLike, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """One line per row; nested values as JSON; metadata repeated as ``meta_<key>`` columns."""
    flat = [{**{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()},
             **{f"meta_{k}": (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in meta.items()}}
            for row in rows]
    columns: list[str] = []
    for row in flat:
        columns += [k for k in row if k not in columns]
    _make_parent(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Markdown tables and other text outputs."""
    _make_parent(path)
    Path(path).write_text(text)


def _parse_cell(value: str) -> Any:
    if value == "":
        return None
    if value in ("True", "False"):  # csv writes Python booleans with str()
        return value == "True"
    try:
        return json.loads(value)
    except ValueError:
        return value


def load_results(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(meta, rows)`` from a JSON or CSV file written by :func:`write_json` / :func:`write_csv`.

    Raises:
        ValueError: missing file or not a results file.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"results file {str(path)!r} does not exist")
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            raw = list(csv.DictReader(f))
        if not raw or "method" not in raw[0]:
            raise ValueError(f"{path} is not a tokenprune-bench CSV (no 'method' column)")
        rows = [{k: _parse_cell(v) for k, v in r.items() if not k.startswith("meta_")} for r in raw]
        meta = {k[5:]: _parse_cell(v) for k, v in raw[0].items() if k.startswith("meta_")}
        for row in rows:  # "method" and "label" are names even when they look like numbers
            row["method"], row["label"] = str(row["method"]), str(row.get("label") or row["method"])
        return meta, rows
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path} is not a tokenprune-bench results file (no 'results' list)")
    return data.get("meta", {}), data["results"]


# ----------------------------------------------------------------------------------------- tables
def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _spread(row: dict[str, Any], metric: str, spec: str) -> str:
    """``median [q1-q3]``."""
    if row.get(metric) is None:
        return "-"
    if row.get(f"{metric}_q1") is None:
        return _fmt(row[metric], spec)
    return f"{row[metric]:{spec}} [{row[f'{metric}_q1']:{spec}}-{row[f'{metric}_q3']:{spec}}]"


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.0%}"


# mode -> (header, cell) columns for modes whose figures are not TTFT/tokens kept (visual, text, vLLM).
MODE_COLUMNS: dict[str, list[tuple[str, Callable[[dict[str, Any]], str]]]] = {
    "spec": [
        ("prompts", lambda r: str(r.get("prompt_kind", "-"))),
        ("decoding", lambda r: str(r.get("decoding", "-"))),
        ("method", lambda r: str(r.get("label", r.get("method")))),
        ("source", lambda r: str(r.get("source", "-"))),
        ("budget", lambda r: str(r.get("budget") if r.get("budget") not in (None, "") else "-")),
        ("tokens/target fwd", lambda r: _fmt(r.get("tokens_per_forward"), ".2f")),
        ("target fwd/token", lambda r: _fmt(r.get("forwards_per_token"), ".3f")),
        # e2e_speedup: whole generate call; "speedup" in results written before the suites shared variant_rows
        ("wall-clock speedup", lambda r: _ratio(r.get("e2e_speedup", r.get("speedup")))),
        ("identical", lambda r: str(r.get("identical", "-"))),
    ],
    "text": [
        ("method", lambda r: str(r.get("label", r.get("method")))),
        ("prompt tokens", lambda r: _fmt(r.get("prompt_tokens"), "d")),
        ("TTFT ms", lambda r: _spread(r, "ttft_ms", ".1f")),
        ("TTFT speedup", lambda r: _ratio(r.get("speedup"))),
        ("decode tok/s", lambda r: _fmt(r.get("decode_tok_s"), ".1f")),
        ("decode speedup", lambda r: _ratio(r.get("decode_speedup"))),
        ("KV memory", lambda r: _pct(r.get("kv_ratio"))),
        ("next-token agreement", lambda r: _pct(r.get("next_token_agreement"))),
        ("KL", lambda r: _fmt(r.get("kl"), ".4f")),
    ],
    "quality": [
        ("method", lambda r: str(r.get("label", r.get("method")))),
        ("visual tokens kept", lambda r: _fmt(r.get("keep"), "d")),
        ("accuracy", lambda r: _fmt(r.get("accuracy"), ".3f")),
        ("retention", lambda r: _pct(r.get("retention"))),
        ("agreement with unpruned", lambda r: _pct(r.get("agreement"))),
        ("majority answer", lambda r: _fmt(r.get("majority_baseline"), ".3f")),
        ("seconds", lambda r: _fmt(r.get("seconds"), ".1f")),
    ],
    "kernels": [
        ("kernel", lambda r: str(r.get("kernel", "-"))),
        ("shape", lambda r: str(r.get("shape", "-"))),
        ("impl", lambda r: str(r.get("method"))),
        ("ms", lambda r: _spread(r, "time_ms", ".3f")),
        ("floor", lambda r: str(r.get("floor") or "-")),
        ("x floor", lambda r: _fmt(r.get("ratio_vs_floor"), ".2f")),
        ("speedup vs loop", lambda r: _ratio(r.get("ratio_vs_loop"))),
        ("same picks", lambda r: "-" if r.get("same_picks") is None else str(r["same_picks"])),
    ],
    "rag": [
        ("method", lambda r: str(r.get("label", r.get("method")))),
        ("answer-sentence recall", lambda r: _pct(r.get("gold_sentence_recall"))),
        ("token compression", lambda r: _pct(r.get("token_compression"))),
        ("prompt tokens", lambda r: f"{_fmt(r.get('prompt_tokens_after'), 'd')}/{_fmt(r.get('prompt_tokens'), 'd')}"),
        ("prune ms/passage", lambda r: _fmt(r.get("prune_ms_per_passage"), ".2f")),
        ("TTFT ms", lambda r: _spread(r, "ttft_ms", ".1f")),
        ("TTFT speedup", lambda r: _ratio(r.get("speedup"))),
        ("incl. pruning", lambda r: _ratio(r.get("speedup_with_pruning"))),
        # real generators only (--model smollm2-135m): greedy answers scored against the gold answer
        ("answer accuracy", lambda r: "-" if r.get("answer_accuracy") is None
         else f"{r['answer_accuracy']:.2f} ±{r['answer_accuracy_2se']:.2f}"),
    ],
}


def _visual_cells(row: dict[str, Any]) -> list[str]:
    before, after = row.get("visual_tokens_before"), row.get("visual_tokens_after")
    speedup = row.get("speedup")
    speed_txt = "-" if speedup is None else (
        f"{speedup:.2f}x" if row.get("speedup_q1") is None
        else f"{speedup:.2f}x [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}]")
    return [
        str(row.get("label", row.get("method"))),
        f"{after}/{before}" if before is not None else "-",
        _fmt(row.get("prompt_tokens_after"), "d"),
        _spread(row, "ttft_ms", ".1f"),
        _spread(row, "decode_tok_s", ".1f"),
        _fmt(row.get("peak_mem_mb"), ".0f"),
        speed_txt,
        _ratio(row.get("ideal_ratio")),
        _fmt(row.get("ratio_to_ideal"), ".0%"),
    ]


VISUAL_HEADERS = ["method", "visual tokens", "prompt tokens", "TTFT ms", "decode tok/s", "peak +MB", "TTFT speedup",
                  "ideal", "speedup/ideal"]


def _columns(rows: Sequence[dict[str, Any]]) -> tuple[list[str], Callable[[dict[str, Any]], list[str]]]:
    """Headers and the row -> cells function for the mode of ``rows`` (visual layout by default)."""
    columns = MODE_COLUMNS.get(str(rows[0].get("mode"))) if rows else None
    if columns is None:
        return VISUAL_HEADERS, _visual_cells
    return [h for h, _ in columns], lambda row: [cell(row) for _, cell in columns]


def wide_console(quiet: bool = False) -> Any:
    """A rich console; in logs and pipes wide enough that no column is truncated."""
    from rich.console import Console

    out = Console(quiet=quiet)
    if not out.is_terminal:
        out = Console(quiet=quiet, width=max(out.width, 180))
    return out


def print_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any], console: Any = None, title: str = "") -> None:
    """A rich table per variant: TTFT, decode tok/s, tokens kept, speedup and the ideal ratio, or
    the mode's own figures (:data:`MODE_COLUMNS`: spec, rag)."""
    from rich.table import Table

    console = console or wide_console()
    first = rows[0] if rows else {}
    params = first.get("num_parameters")
    caption_bits = [
        f"{first.get('model', '?')}" + (f" ({params / 1e6:.1f}M params)" if params else "") if first else "",
        f"{meta.get('device_name', '')} ({first.get('device', '')}, {first.get('dtype', '')}, "
        f"{meta.get('torch_threads', '?')} threads)",
    ]
    if first.get("reps") is not None:  # timing runs (quality runs are not timed)
        caption_bits.append(f"batch {first.get('batch_size')}, {first.get('new_tokens')} new tokens, "
                            f"median [IQR] of {first.get('reps')} interleaved reps after {first.get('warmup')} warm-up")
    table = Table(title=title or "tokenprune-bench", caption=" | ".join(b for b in caption_bits if b))
    headers, cells = _columns(rows)
    for i, name in enumerate(headers):
        table.add_column(name, justify="left" if i == 0 or name in ("method", "source") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*cells(row))
    console.print(table)
    if any(r.get("random_weights") for r in rows):
        console.print(f"[dim]note: {RANDOM_WEIGHTS_NOTE}[/dim]")


def markdown_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table of :func:`print_table` as GitHub markdown, with a provenance line (for READMEs)."""
    if rows and str(rows[0].get("mode")) in MODE_COLUMNS:
        headers, cells = _columns(rows)
        lines = ["| model | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
        lines += [f"| {row.get('model', '-')} | " + " | ".join(cells(row)) + " |" for row in rows]
    else:
        lines = _visual_markdown(rows)
    first = rows[0] if rows else {}
    lines.append("")
    lines.append(f"{meta.get('date', '?')[:10]}, {meta.get('device_name', '?')} ({first.get('device', '?')}, "
                 f"{meta.get('torch_threads', '?')} threads), torch {meta.get('torch', '?')}, transformers "
                 f"{meta.get('transformers', '?')}, commit {str(meta.get('git_commit', '?'))[:10]}; batch "
                 f"{first.get('batch_size')}, {first.get('new_tokens')} new tokens, median of {first.get('reps')} "
                 "interleaved repetitions." + (" Random weights: latency is real, quality meaningless."
                                                if any(r.get("random_weights") for r in rows) else ""))
    return "\n".join(lines) + "\n"


def _visual_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| model | method | visual tokens | prompt tokens | TTFT ms (median) | TTFT speedup [IQR] | ideal "
             "| speedup / ideal | decode tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        speed = row.get("speedup")
        speed_txt = "-" if speed is None else f"{speed:.2f}x" + (
            f" [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}]" if row.get("speedup_q1") is not None else "")
        lines.append(
            f"| {row.get('model', '-')} | {row.get('label', row.get('method'))} "
            f"| {row.get('visual_tokens_after', '-')}/{row.get('visual_tokens_before', '-')} "
            f"| {_fmt(row.get('prompt_tokens_after'), 'd')} | {_fmt(row.get('ttft_ms'), '.1f')} | {speed_txt} "
            f"| {_fmt(row.get('ideal_ratio'), '.2f')}x | {_fmt(row.get('ratio_to_ideal'), '.0%')} "
            f"| {_fmt(row.get('decode_tok_s'), '.1f')} |")
    return lines


# ----------------------------------------------------------------------------------------- plots
#: modes whose rows have no keep to draw a speedup against (:func:`plot_results` refuses them).
UNPLOTTABLE_MODES = ("spec", "rag", "kernels")


def check_plottable(mode: Any) -> None:
    """Refuse ``--plot`` for a mode whose rows :func:`plot_results` cannot draw (callable before measuring).

    Raises:
        ValueError: ``mode`` is one of :data:`UNPLOTTABLE_MODES`.
    """
    if mode in UNPLOTTABLE_MODES:
        raise ValueError(f"--plot draws speedup against keep; {mode} mode rows have no keep")


def plot_results(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, meta: Optional[dict[str, Any]] = None
) -> None:
    """TTFT speedup against keep, one line per method, with each method's ideal ratio dashed
    (quality rows: accuracy retention against keep).

    Methods measured at a single keep become points; a ``quality`` column, when present, is drawn
    on a second axis.
    """
    if rows:
        check_plottable(rows[0].get("mode"))
    if rows and rows[0].get("mode") == "quality":
        plot_retention(rows, path)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("method") != "baseline" and row.get("speedup") is not None:
            if row.get("visual_tokens_after") is None and row.get("keep") is None:
                raise ValueError(f"--plot draws speedup against keep; {row.get('mode')} mode rows have no keep")
            methods.setdefault(str(row["method"]), []).append(row)
    if not methods:
        raise ValueError("no method rows with a speedup to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    has_quality = any(r.get("quality") is not None for rs in methods.values() for r in rs)
    ax_q = ax.twinx() if has_quality else None

    def keep_tokens(row: dict[str, Any]) -> float:
        # Fractions are drawn at the token count they keep, so int and float keeps share an axis.
        return float(row.get("visual_tokens_after") if row.get("visual_tokens_after") is not None else row["keep"])

    for i, (name, rs) in enumerate(sorted(methods.items())):
        rs = sorted(rs, key=keep_tokens)
        xs = [keep_tokens(r) for r in rs]
        color = f"C{i}"
        ys = [r["speedup"] for r in rs]
        # The bars show the paired per-repetition ratios' IQR, which need not contain the ratio of
        # medians drawn as the point: clamp instead of failing.
        lo = [max(0.0, r["speedup"] - r.get("speedup_q1", r["speedup"])) for r in rs]
        hi = [max(0.0, r.get("speedup_q3", r["speedup"]) - r["speedup"]) for r in rs]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", color=color, capsize=3, label=f"{name} measured")
        if all(r.get("ideal_ratio") for r in rs):
            ax.plot(xs, [r["ideal_ratio"] for r in rs], linestyle="--", color=color, alpha=0.6,
                    label=f"{name} ideal (token-layers)")
        if ax_q is not None:
            qs = [(x, r["quality"]) for x, r in zip(xs, rs) if r.get("quality") is not None]
            if qs:
                ax_q.plot(*zip(*qs), marker="s", linestyle=":", color=color, label=f"{name} quality")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("visual tokens kept per image")
    ax.set_ylabel("TTFT speedup vs baseline (x)")
    first = rows[0]
    device = (meta or {}).get("device_name") or first.get("device", "")
    ax.set_title(f"{first.get('model', '')}: TTFT speedup vs keep\n{device}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax_q is not None:
        ax_q.set_ylabel("quality")
        h2, l2 = ax_q.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_retention(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Quality rows (the quality harness): accuracy retention against keep, one line per method, with
    the random and majority-answer baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows[1:]):
        pts = sorted((r["keep"], 100 * (r["retention"] or 0.0)) for r in rows[1:] if r["label"] == label)
        style = dict(color="black", linestyle="--", linewidth=2) if label == "random" else {}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
    ax.axhline(100, color="grey", linewidth=0.8)
    if base["accuracy"]:
        ax.axhline(100 * base["majority_baseline"] / base["accuracy"], color="grey", linestyle=":",
                   label="majority answer (no image)")
    ax.set_xscale("log", base=2)
    keeps = sorted({r["keep"] for r in rows[1:]})
    ax.set_xticks(keeps, [str(k) for k in keeps])
    ax.set_xlabel(f"visual tokens kept (of {base['keep']})")
    ax.set_ylabel("accuracy retention (% of unpruned)")
    ax.set_title(f"Quality harness: unpruned accuracy {base['accuracy']:.3f}, n={base['n']}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
