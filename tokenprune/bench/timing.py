"""Measurement primitives of tokenprune-bench: schedules, summaries, clocks and memory probes.

Everything here is independent of models and engines so that every benchmark mode (visual, text,
RAG, speculative; HF or vLLM) measures the same way:

* :func:`interleaved_schedule`: warm-up runs, then repetitions in which every variant runs once,
  the order rotating from one repetition to the next, so slow drifts of a shared machine (other
  jobs, thermal state) hit baseline and methods alike;
* :func:`summarize` / :class:`Summary`: median with quartiles and min/max of a sample;
* :func:`paired_ratios`: per-repetition ratios baseline / method (the runs of one repetition are
  adjacent in time, so their ratio is steadier than the ratio of two medians on a noisy machine);
* :class:`Stopwatch`: wall-clock and process CPU time of a block, device work included
  (:data:`CLOCKS`: ``"wall"`` or ``"cpu"``);
* :func:`time_interleaved`: callables timed along an interleaved schedule, one summary each;
* :class:`TokenClock`: a ``transformers`` streamer that timestamps the prompt and every new token,
  giving time-to-first-token and decode throughput from one ``generate`` call;
* :class:`PeakMemory`: CUDA max-allocated on GPU, resident-set high-water mark on CPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = [
    "Run",
    "Summary",
    "summarize",
    "interleaved_schedule",
    "paired_ratios",
    "CLOCKS",
    "Stopwatch",
    "time_interleaved",
    "TokenClock",
    "PeakMemory",
    "synchronize",
]


@dataclass(frozen=True)
class Run:
    """One entry of a schedule: run ``variant`` as repetition ``rep`` (``warmup`` runs are discarded)."""

    variant: str
    rep: int
    warmup: bool


def interleaved_schedule(variants: Sequence[str], reps: int, warmup: int = 1) -> list[Run]:
    """Order of runs: ``warmup`` rounds, then ``reps`` rounds of every variant, order rotated per round.

    Round ``r`` starts at variant ``r mod V`` so that each variant occupies every slot of a round
    equally often: a cost tied to a slot (the first run after a model switch, a background job
    that starts mid-round) does not bias one variant.

    Raises:
        ValueError: no variants, duplicate variant names, ``reps < 1`` or ``warmup < 0``.
    """
    if not variants:
        raise ValueError("variants must not be empty")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variant names must be unique, got {list(variants)}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    n = len(variants)
    schedule = [Run(v, w, True) for w in range(warmup) for v in variants]
    for rep in range(reps):
        order = [variants[(rep + i) % n] for i in range(n)]
        schedule += [Run(v, rep, False) for v in order]
    return schedule


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted sample."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Median, quartiles and range of a sample of ``n`` measurements."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self, prefix: str) -> dict[str, float]:
        """``{prefix: median, prefix_q1: ..., prefix_q3, prefix_min, prefix_max}`` for result rows."""
        d = asdict(self)
        d.pop("n")
        return {(prefix if k == "median" else f"{prefix}_{k}"): v for k, v in d.items()}


def summarize(values: Sequence[float]) -> Summary:
    """Summary of a non-empty sample (NaN-free)."""
    values = sorted(float(v) for v in values)
    if not values:
        raise ValueError("cannot summarize an empty sample")
    return Summary(
        median=statistics.median(values),
        q1=_quantile(values, 0.25),
        q3=_quantile(values, 0.75),
        min=values[0],
        max=values[-1],
        n=len(values),
    )


def paired_ratios(baseline: dict[int, float], method: dict[int, float]) -> list[float]:
    """``baseline[rep] / method[rep]`` for every repetition measured in both (ascending rep)."""
    return [baseline[r] / method[r] for r in sorted(baseline.keys() & method.keys()) if method[r] > 0]


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock readings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "wall": time.perf_counter; "cpu": time.process_time, the CPU time of this process (all its
# threads). CPU time does not count the time a process waits for a core, so on a shared,
# oversubscribed machine it is far steadier than wall time for work that waits on nothing else
# (one thread, no device).
CLOCKS = ("wall", "cpu")


class Stopwatch:
    """Wall-clock and process CPU seconds of a ``with`` block, queued device work included.

    Attributes:
        wall_s / cpu_s: the block's wall and CPU time (set on exit).
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device
        self.wall_s = self.cpu_s = 0.0
        self._wall = self._cpu = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.device is not None:
            synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device is not None:
            synchronize(self.device)
        self.wall_s, self.cpu_s = time.perf_counter() - self._wall, time.process_time() - self._cpu

    def seconds(self, clock: str = "wall") -> float:
        """The block's time on ``clock`` (a key of :data:`CLOCKS`)."""
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        return self.wall_s if clock == "wall" else self.cpu_s


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, clock: str = "wall",
                     device: Optional[torch.device] = None) -> dict[str, Summary]:
    """Milliseconds of each callable, run along :func:`interleaved_schedule` (every callable once
    per round, the order rotating), summarised per callable.

    Raises:
        ValueError: bad ``reps``/``warmup`` (see :func:`interleaved_schedule`) or unknown ``clock``.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for run in interleaved_schedule(list(fns), reps, warmup):
        with Stopwatch(device) as watch:
            fns[run.variant]()
        if not run.warmup:
            samples[run.variant].append(watch.seconds(clock) * 1e3)
    return {name: summarize(values) for name, values in samples.items()}


class TokenClock:
    """A ``transformers`` streamer that records when the prompt and each new token reach the host.

    ``generate`` calls ``put(prompt_ids)`` once, then ``put(next_tokens)`` after every step; on
    CUDA each ``put`` follows a device-to-host copy of the tokens, i.e. a synchronisation, so the
    timestamps are completion times, not launch times. Call :meth:`start` right before ``generate``.

    Args:
        on_first_token: called once, right after the first new token is timestamped (e.g. to read
            the KV cache the prefill left); its duration is excluded from the later timestamps,
            and its return value kept in :attr:`first_token_result`.

    Attributes:
        token_times: seconds since :meth:`start` at which each new token was available.
    """

    def __init__(self, on_first_token: Optional[Callable[[], Any]] = None) -> None:
        self.t0 = 0.0
        self.token_times: list[float] = []
        self.on_first_token = on_first_token
        self.first_token_result: Any = None
        self._prompt_seen = False

    def start(self) -> None:
        self.token_times = []
        self.first_token_result = None
        self._prompt_seen = False
        self.t0 = time.perf_counter()

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first put is the prompt itself
            self._prompt_seen = True
            return
        now = time.perf_counter()
        self.token_times.append(now - self.t0)
        if len(self.token_times) == 1 and self.on_first_token is not None:
            self.first_token_result = self.on_first_token()
            self.t0 += time.perf_counter() - now  # later tokens are timed as if the callback took no time

    def end(self) -> None:
        pass

    @property
    def new_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft_s(self) -> float:
        """Prefill + first token, in seconds."""
        if not self.token_times:
            raise RuntimeError("no token was generated")
        return self.token_times[0]

    def decode_tokens_per_s(self, batch_size: int) -> Optional[float]:
        """New tokens per second after the first (all rows of the batch); None with < 2 tokens."""
        if len(self.token_times) < 2:
            return None
        span = self.token_times[-1] - self.token_times[0]
        return batch_size * (len(self.token_times) - 1) / span if span > 0 else None


def _rss_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory a run adds above what was in use when it started, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak counter. CPU (Linux):
    the resident-set high-water mark (``VmHWM``) after resetting it through
    ``/proc/self/clear_refs``; where that is impossible, :attr:`peak_bytes` is ``None``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.peak_bytes: Optional[int] = None
        self._cpu_reset_ok = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self._cpu_reset_ok = True
            except OSError:
                self._cpu_reset_ok = False
            self.base = _rss_bytes("VmRSS") or 0
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self._cpu_reset_ok:
            hwm = _rss_bytes("VmHWM")
            self.peak_bytes = max(0, hwm - self.base) if hwm is not None else None
