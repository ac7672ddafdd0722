"""``tokenprune-bench``: measure what token pruning buys on a model and a machine.

    tokenprune-bench                      # = latency on the embedded tiny-llava preset, offline
    tokenprune-bench latency --model medium-llava --methods divprune:keep=64,fastv:layer=2:keep=0.5
    tokenprune-bench sweep --methods divprune,fastv --keep 192,128,64 --plot sweep.png
    tokenprune-bench models
    tokenprune-bench report results.json --plot speedup.png
    tokenprune-bench quality --methods divprune,fastv --keep 192,64 --plot retention.png

Methods are written ``name[:param=value...]`` and separated by commas. Every run measures the
baseline and the methods interleaved (see :mod:`tokenprune.bench.timing`). Bad input (unknown
preset or method, keep out of range, engine not installed) prints one line and exits with code 2;
so does an output path that cannot be written, collides with another output or an input, or
names an existing file without ``--force`` (checked before anything is measured).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

__all__ = ["main", "build_parser", "parse_methods"]

PROG = "tokenprune-bench"
DEFAULT_SWEEP_METHODS = "divprune,fastv:layer=2"
DEFAULT_SWEEP_KEEP = "192,128,64"
SUBCOMMANDS = ("latency", "sweep", "models", "report", "quality")


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


# ------------------------------------------------------------------------------------ parsing
def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _keep_list(text: str) -> list[int | float]:
    try:
        values = [_value(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UsageError(f"--keep must be a comma-separated list of numbers, got {text!r}")
    return values


def _label(name: str, kwargs: dict[str, Any]) -> str:
    return f"{name}({','.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else name


def parse_methods(spec: str, keep: Optional[Sequence[int | float]] = None) -> list[tuple[str, Any]]:
    """``"divprune:keep=64,fastv:layer=2"`` -> ``[(label, method)]`` built with ``tp.build``.

    With ``keep`` given, every method without its own ``keep=`` is built once per keep value.

    Raises:
        UsageError: malformed spec, unknown method or invalid parameter (message from the method).
    """
    import tokenprune as tp

    out: list[tuple[str, Any]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, *params = item.split(":")
        kwargs: dict[str, Any] = {}
        for param in params:
            key, sep, value = param.partition("=")
            if not sep or not key:
                raise UsageError(f"method parameter {param!r} in {item!r} must be written key=value")
            kwargs[key.strip()] = _value(value.strip())
        explicit = "keep" in kwargs  # keep=none is a bad value, not "use the default"
        keeps = [kwargs.pop("keep")] if explicit else list(keep or [None])
        for k in keeps:
            full = {**kwargs, "keep": k} if explicit or k is not None else dict(kwargs)
            try:
                method = tp.build(name, **full)
            except TypeError as exc:
                raise UsageError(f"{name}: {exc}") from None
            except ValueError as exc:
                raise UsageError(f"{name}: {exc}" if not str(exc).startswith("unknown method") else str(exc)) from None
            out.append((_label(method.name, full), method))
    if not out:
        raise UsageError("no method given")
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise UsageError(f"the same method is listed twice: {', '.join(labels)}")
    return out


def _positive(name: str, minimum: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _threads(text: str) -> int | str:
    return text if text == "auto" else _positive("--threads")(text)


def _resolve_threads(requested: int | str) -> int:
    import torch

    if requested != "auto":
        return int(requested)
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


def _add_run_arguments(p: argparse.ArgumentParser, sweep: bool) -> None:
    from tokenprune.bench.modes import ENGINES, MODES
    from tokenprune.bench.presets import DEFAULT_PRESET

    p.add_argument("--model", default=DEFAULT_PRESET,
                   help=f"preset name (see `{PROG} models`) or a local checkpoint directory (default: %(default)s)")
    if sweep:
        p.add_argument("--methods", default=DEFAULT_SWEEP_METHODS,
                       help="comma-separated methods, name[:param=value...] (default: %(default)s)")
        p.add_argument("--keep", default=DEFAULT_SWEEP_KEEP,
                       help="comma-separated keep values: token counts or fractions in (0, 1] (default: %(default)s)")
    else:
        p.add_argument("--methods", default=None,
                       help="comma-separated methods, name[:param=value...] (default: the mode's, in visual mode "
                            "divprune:keep=64,fastv:layer=2:keep=0.5)")
        p.add_argument("--keep", default=None,
                       help="keep value(s) for methods that do not set keep= themselves")
    p.add_argument("--engine", default="hf", choices=ENGINES, help="inference engine (default: %(default)s)")
    p.add_argument("--mode", default="auto", choices=("auto", *MODES),
                   help="what is pruned: visual tokens, text prompt, RAG context, speculative drafts "
                        "(default: from the methods' stage)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--dtype", default="auto",
                   help="auto (fp32 on CPU, bf16 for GPU presets) | float32 | bfloat16 | float16")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=1)
    p.add_argument("--prompt-tokens", type=_positive("--prompt-tokens", 0), default=None,
                   help="text tokens in the prompt besides image tokens (visual mode, default 32); "
                        "prompt length (text mode)")
    p.add_argument("--image-size", type=_positive("--image-size"), default=None,
                   help="image side in pixels for presets (multiple of the patch size; default: the model's)")
    p.add_argument("--new-tokens", type=_positive("--new-tokens"), default=16,
                   help="tokens generated per row, forced equal in every run (default: %(default)s)")
    p.add_argument("--reps", type=_positive("--reps"), default=3 if sweep else 5,
                   help="measured repetitions per variant (default: %(default)s)")
    p.add_argument("--warmup", type=_positive("--warmup", 0), default=1,
                   help="warm-up rounds per variant, discarded (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=_positive("--samples"), default=None,
                   help="spec mode: prompts per kind (default 2); rag mode: questions (default 8)")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="CPU threads for torch; auto: torch's default, or 1 when the load average exceeds the "
                        "core count (threads that wait on each other make timings meaningless) (default: auto)")
    _add_output_arguments(p)


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    from tokenprune.bench import report

    p.add_argument("--json", metavar="PATH", help="write results (with machine, versions, parameters) as JSON "
                   "(PATH ends in .json)")
    p.add_argument("--csv", metavar="PATH", help="write results as CSV (PATH ends in .csv)")
    p.add_argument("--plot", metavar="PNG", help="plot TTFT speedup against keep (matplotlib; .png, .pdf, .svg...)")
    report.add_force_argument(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no table, no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Latency benchmark of tokenprune's pruning methods "
                     "(no arguments: tiny-llava preset, baseline vs DivPrune vs FastV, offline).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_run_arguments(sub.add_parser("latency", help="baseline vs one or more methods on one model (default)"),
                       sweep=False)
    _add_run_arguments(sub.add_parser("sweep", help="methods x keep values; table and speedup-vs-keep plot"),
                       sweep=True)
    sub.add_parser("models", help="list the model presets")
    rep = sub.add_parser("report", help="tables/plots from saved JSON or CSV results")
    rep.add_argument("files", nargs="+", help="results files written with --json or --csv")
    rep.add_argument("--markdown", metavar="PATH", help="write the tables as GitHub markdown (for READMEs)")
    _add_output_arguments(rep)
    q = sub.add_parser("quality", help="answer accuracy of visual methods on the quality harness's trained LLaVA")
    q.add_argument("--decoder", choices=["tiny", "smollm2"], default="tiny",
                   help="tiny: the shipped 4-layer harness model; smollm2: SmolLM2-135M (needs tokenprune[real])")
    q.add_argument("--model", default=None, help="quality-harness checkpoint or adapter directory (default: the decoder's shipped one)")
    q.add_argument("--methods", default=None,
                   help="comma-separated method names (default: every visual/in-LLM method; random is always added)")
    q.add_argument("--keep", default=None,
                   help="visual tokens kept, comma-separated (default: tiny 192,128,64,32; smollm2 48,32,16,8)")
    q.add_argument("--layers", default=None, help="layers of FastV-like methods (default: tiny 1,2,3; smollm2 2,8,16)")
    q.add_argument("--samples", type=_positive("--samples"), default=600, help="test questions (default: %(default)s)")
    q.add_argument("--seed", type=int, default=0, help="seed of the test split")
    q.add_argument("--batch-size", type=_positive("--batch-size"), default=16)
    q.add_argument("--threads", type=_threads, default="1",
                   help="CPU threads (default 1: bit-reproducible answers, fastest on a shared machine)")
    _add_output_arguments(q)
    return parser


# ------------------------------------------------------------------------------------ commands
def _track(quiet: bool) -> Callable[..., Iterable]:
    def track(iterable: Iterable, description: str = "", total: Optional[int] = None) -> Iterable:
        if quiet:
            return iterable
        from tqdm.auto import tqdm

        # disable=None: a bar on terminals only, nothing in logs and pipes.
        return tqdm(iterable, desc=description, total=total, disable=None, leave=False, file=sys.stderr)

    return track


def _console(quiet: bool):
    from tokenprune.bench import report

    return report.wide_console(quiet)


def _emit(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]], title: str) -> None:
    from tokenprune.bench import report

    report.print_table(rows, meta, console=_console(args.quiet), title=title)
    _write_outputs(args, meta, rows)


def _check_outputs(args: argparse.Namespace, inputs: Sequence[str] = ()) -> None:
    """Every output of the command checked before it measures or reads anything (see ``report.check_outputs``)."""
    from tokenprune.bench import report

    report.check_outputs([("--json", args.json, "json"), ("--csv", args.csv, "csv"), ("--plot", args.plot, "plot"),
                          ("--markdown", getattr(args, "markdown", None), "file")], inputs=inputs, force=args.force)


def _write_outputs(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``--json`` / ``--csv`` / ``--plot`` of a run or a report (paths checked by :func:`_check_outputs`)."""
    from tokenprune.bench import report

    if args.json:
        report.write_json(args.json, meta, rows)
    if args.csv:
        report.write_csv(args.csv, meta, rows)
    if args.plot:
        report.plot_results(rows, args.plot, meta)


def _run(args: argparse.Namespace) -> None:
    import torch

    _check_outputs(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(_resolve_threads(args.threads))
    try:
        _measure(args)
    finally:  # in-process callers (tests, notebooks) get their setting back
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> None:
    from tokenprune.bench import report
    from tokenprune.bench.modes import DEFAULT_METHODS, BenchConfig, load_runner, resolve_mode

    keep = _keep_list(args.keep) if args.keep is not None else None
    spec = args.methods
    if spec is None:
        default_mode = "visual" if args.mode == "auto" else args.mode
        if default_mode not in DEFAULT_METHODS:
            raise UsageError(f"--methods is required in {default_mode} mode")
        spec = DEFAULT_METHODS[default_mode]
    methods = parse_methods(spec, keep)
    mode = resolve_mode(args.mode, [m for _, m in methods])
    if args.plot:
        report.check_plottable(mode)
    runner = load_runner(args.engine, mode)
    config = BenchConfig(
        model=args.model, methods=methods, engine=args.engine, mode=mode, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, prompt_tokens=args.prompt_tokens, image_size=args.image_size,
        new_tokens=args.new_tokens, reps=args.reps, warmup=args.warmup, seed=args.seed,
        extra={"samples": args.samples} if args.samples is not None else {},
    )
    rows = runner(config, _track(args.quiet))
    device = rows[0].get("device", "cpu") if rows else "cpu"
    meta = {**report.environment(device), "subcommand": args.command, "parameters": config.to_dict()}
    _emit(args, meta, rows, title=f"tokenprune-bench {args.command}: {args.model} ({args.engine}, {mode})")


def _int_list(name: str, text: str) -> list[int]:
    values = _keep_list(text)
    if not all(isinstance(v, int) and v >= 1 for v in values):
        raise UsageError(f"{name} must be a comma-separated list of integers >= 1, got {text!r}")
    return [int(v) for v in values]


def _quality(args: argparse.Namespace) -> None:
    import torch

    from tokenprune.bench import report
    from tokenprune.bench.suites.quality.evaluate import run as run_quality

    _check_outputs(args)
    keeps = None if args.keep is None else _int_list("--keep", args.keep)
    layers = None if args.layers is None else _int_list("--layers", args.layers)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    threads = torch.get_num_threads()
    torch.set_num_threads(_resolve_threads(args.threads))
    try:
        rows = run_quality(args.model, methods, keeps, layers, args.samples, args.seed, args.batch_size, args.decoder)
        parameters = {k: getattr(args, k) for k in ("decoder", "model", "methods", "samples", "seed", "batch_size",
                                                    "threads")}
        meta = {**report.environment("cpu"), "subcommand": "quality",
                "parameters": {**parameters, "keep": keeps, "layers": layers}}
    finally:
        torch.set_num_threads(threads)
    _emit(args, meta, rows, title=f"tokenprune-bench quality: {rows[0]['model']} (n={args.samples})")


def _models(args: argparse.Namespace) -> None:
    from rich.table import Table

    from tokenprune.bench.presets import FAMILY_CLASSES, PRESETS, count_parameters

    table = Table(title="tokenprune-bench model presets (random weights, real shapes; or pass a checkpoint path)")
    for column in ("preset", "architecture", "params", "image tokens", "runs on", "description"):
        table.add_column(column)
    for p in PRESETS.values():
        config = p.make_config(None)
        vision = getattr(config, "vision_config", None)
        tokens = "-"
        if p.family == "llava":
            tokens = str((vision.image_size // vision.patch_size) ** 2)
        elif p.family == "llava_next":
            tokens = "~576 x (1 + tiles)"
        elif p.family == "qwen2_5_vl":
            tokens = "(H/28) x (W/28)"
        table.add_row(p.name, FAMILY_CLASSES[p.family], f"{count_parameters(config, p.family) / 1e6:,.0f}M",
                      tokens, "GPU (bf16)" if p.gpu_only else "CPU or GPU", p.description)
    _console(False).print(table)


def _report(args: argparse.Namespace) -> None:
    from tokenprune.bench import report

    _check_outputs(args, inputs=args.files)
    all_rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    markdown = []
    console = _console(args.quiet)
    for path in args.files:
        meta, rows = report.load_results(path)
        if not rows:
            raise UsageError(f"{path} holds no results")
        report.print_table(rows, meta, console=console, title=f"{path} ({meta.get('date', '?')}, "
                           f"{meta.get('device_name', '?')}, commit {str(meta.get('git_commit', '?'))[:10]})")
        markdown.append(report.markdown_table(rows, meta))
        all_rows += rows
    if args.markdown:
        report.write_text(args.markdown, "\n".join(markdown))
    _write_outputs(args, meta, all_rows)


COMMANDS = {"latency": _run, "sweep": _run, "models": _models, "report": _report, "quality": _quality}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit code (0 ok, 2 bad input or missing backend)."""
    from tokenprune.bench.modes import BackendUnavailable

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "latency")  # the default subcommand
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except (UsageError, ValueError, NotImplementedError, BackendUnavailable) as exc:
        if os.environ.get("TOKENPRUNE_BENCH_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if os.environ.get("TOKENPRUNE_BENCH_DEBUG"):
            raise
        print(f"{PROG}: error: missing package {exc.name!r} (pip install 'tokenprune[bench,hf]')", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
