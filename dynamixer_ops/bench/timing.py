"""The one timing pipeline: warm-up, interleaved rounds, quantiles, speedups, and what happens when a timed call
raises. dynamixer-bench's op sweep and network benchmark, the pytest-benchmark suite (``benchmarks/``),
``benchmarks/cpu_time_ratios.py`` and ``benchmarks/gpu_tasks.py`` all time through it.

Modes (what one sample is):

* ``"wall"``: on a CPU, the mean wall-clock time per call of a ``torch.utils.benchmark.Timer`` block (with the
  program's thread count); on a GPU, one call timed by CUDA events (``triton.testing.do_bench``, L2 flushed).
* ``"thread_cpu"``: the CPU time of the calling thread per call of a block (``time.thread_time``; CPU only). Far
  less sensitive than wall time to other processes on a shared machine, but it counts no other thread: only
  single-threaded runs are measured whole.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

# The providers every speedup is relative to: the upstream eager step and torch.compile of it.
BASELINES = ("eager", "compile")
MODES = ("wall", "thread_cpu")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 240 characters): what a report row says about an error."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line if len(line) <= 240 else line[:240] + ' ...'}"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(run: Callable, device: torch.device) -> Callable:
    """``run`` followed by a device synchronize (on a GPU), for timers that read a host clock."""
    if device.type != "cuda":
        return run

    def call():
        out = run()
        sync(device)
        return out
    return call


def calls_within(budget_ms: float, per_call_s: float) -> int:
    """How many calls of ``per_call_s`` seconds fit in ``budget_ms`` (at least one)."""
    return max(1, round(budget_ms / 1e3 / max(per_call_s, 1e-7)))


def warm_up(run: Callable, device: torch.device, warmup_ms: float) -> float:
    """Run until ``warmup_ms`` has passed (at least twice, so lazy compilation is over); return s per call."""
    run()
    sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if calls >= 1 and elapsed * 1e3 >= warmup_ms:
            return elapsed / calls


class Sampler:
    """Collects per-call times (seconds) for one run in rounds, in one of :data:`MODES`."""

    def __init__(self, run: Callable, device: torch.device, threads: int, per_call_s: float, mode: str = "wall"):
        if mode not in MODES:
            raise ValueError(f"timing mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode == "thread_cpu" and device.type != "cpu":
            raise ValueError(f"timing mode 'thread_cpu' measures CPU work; the device is {device}")
        self.run, self.device, self.threads, self.per_call_s, self.mode = run, device, threads, per_call_s, mode
        self.samples: list[float] = []
        self._timer = None

    def round(self, budget_ms: float, blocks: int = 4):
        if self.device.type == "cuda":
            self.samples += _do_bench_samples(self.run, budget_ms)
            return
        number = calls_within(budget_ms / blocks, self.per_call_s)
        if self.mode == "thread_cpu":
            for _ in range(blocks):
                start = time.thread_time()
                for _ in range(number):
                    self.run()
                self.samples.append((time.thread_time() - start) / number)
            return
        from torch.utils import benchmark
        if self._timer is None:
            # Timer defaults to one thread: run with the threads the rest of the program uses.
            self._timer = benchmark.Timer(stmt="run()", globals={"run": self.run}, num_threads=self.threads)
        for _ in range(blocks):
            self.samples.append(self._timer.timeit(number).mean)


def _do_bench_samples(run: Callable, budget_ms: float) -> list[float]:
    from triton.testing import do_bench
    try:
        times = do_bench(run, warmup=1, rep=max(1, budget_ms), return_mode="all")
    except (AssertionError, TypeError):     # an older triton without return_mode="all": keep its quantiles
        times = do_bench(run, warmup=1, rep=max(1, budget_ms), quantiles=[0.2, 0.5, 0.8])
    return [t / 1e3 for t in times]


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def add_speedups(rows: dict[str, dict]) -> None:
    """``speedup_vs_<baseline>`` = the baseline's median / the row's, for rows measured side by side."""
    for ref_name in BASELINES:
        ref_t = rows[ref_name].get("median_ms") if ref_name in rows else None
        for row in rows.values():
            t = row.get("median_ms")
            row[f"speedup_vs_{ref_name}"] = ref_t / t if (t and ref_t) else None


def time_side_by_side(runs: dict[str, Callable], rows: dict[str, dict], device: torch.device, *, warmup_ms: float,
                      repeat_ms: float, rounds: int, blocks: int = 4, mode: str = "wall",
                      on_round: Callable[[int], None] | None = None) -> dict[str, float]:
    """Time ``runs`` (name -> a call) against each other and write the figures into ``rows[name]``.

    Each run is warmed up, then all are timed in ``rounds`` interleaved rounds (every run once per round, in
    turn), so that a load change on a shared machine hits all of them alike; each round gets
    ``repeat_ms / rounds`` per run (``blocks`` timer blocks on a CPU), each sample taken in ``mode``. A run
    that raises, in its warm-up or in any round, gets ``status="ERROR"`` with the message and is timed no
    further. The others get ``median_ms``, ``p20_ms``, ``p80_ms`` and ``samples``; then every row gets its
    speedups over the baselines. Returns the median seconds per call of each run that finished."""
    threads = torch.get_num_threads()
    samplers = {}
    for name, run in runs.items():
        try:
            per_call = warm_up(run, device, warmup_ms)
            samplers[name] = Sampler(run, device, threads, per_call, mode)
        except Exception as exc:
            rows[name].update(status="ERROR", message=first_line(exc))
    for rnd in range(rounds):
        if on_round is not None:
            on_round(rnd)
        for name, sampler in list(samplers.items()):
            try:
                sampler.round(repeat_ms / rounds, blocks)
            except Exception as exc:
                rows[name].update(status="ERROR", message=first_line(exc))
                del samplers[name]
    medians = {}
    for name, sampler in samplers.items():
        t = sampler.samples
        medians[name] = quantile(t, 0.5)
        rows[name].update(median_ms=medians[name] * 1e3, p20_ms=quantile(t, 0.2) * 1e3,
                          p80_ms=quantile(t, 0.8) * 1e3, samples=len(t))
    add_speedups(rows)
    return medians


def median_seconds(run: Callable, device: torch.device, *, warmup_ms: float, repeat_ms: float, rounds: int = 1,
                   mode: str = "wall") -> float:
    """The median seconds per call of one ``run`` (warm-up, then :class:`Sampler` rounds); an exception
    propagates."""
    sampler = Sampler(run, device, torch.get_num_threads(), warm_up(run, device, warmup_ms), mode)
    for _ in range(rounds):
        sampler.round(repeat_ms / rounds)
    return quantile(sampler.samples, 0.5)
