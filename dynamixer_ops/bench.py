"""dynamixer-bench: time every backend of ``dynamic_mix`` against the upstream eager step, side by side.

Run ``dynamixer-bench --help`` (or ``python -m dynamixer_ops.bench --help``) for the options. In short:

* every backend (the registered ones, ``eager`` = :func:`dynamixer_ops.reference.upstream_mix` and
  ``compile`` = ``torch.compile`` of it) is first checked against the float64 reference on the very inputs and
  code path that are then timed; a wrong or failing backend is reported (WRONG / ERROR) and not timed;
* the backends of one shape and direction are timed in one process, in interleaved rounds, so that a load
  change on a shared machine hits all of them alike; GPU: ``triton.testing.do_bench`` samples (one call each,
  L2 flushed), CPU: ``torch.utils.benchmark.Timer`` blocks (mean per call of a block);
* the report gives the median and the p20-p80 spread, speedups over ``eager`` and ``compile`` (ratios of
  medians), GB/s and GFLOP/s under a stated convention, and % of a roofline measured on the same machine.

``--model dynamixer_s|m|l`` times the whole network instead (images/s, inference and training step).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Callable

import torch

# Named shapes (L, C, S, d) from the model configs in DYNAMIC_MIX.md.
SHAPES = {
    "s1": (32, 192, 8, 2),    # DynaMixer-S stage 1
    "s2": (16, 384, 16, 2),   # DynaMixer-S stages 2-4
    "m1": (32, 256, 8, 2),    # DynaMixer-M stages 1-2
    "m3": (16, 512, 16, 2),   # DynaMixer-M stages 3-4
    "l1": (32, 256, 8, 8),    # DynaMixer-L stage 1
    "l2": (16, 512, 16, 8),   # DynaMixer-L stages 2-4
}
DIRECTIONS = ("fwd", "bwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
BASELINES = ("eager", "compile")
MODELS = ("dynamixer_s", "dynamixer_m", "dynamixer_l")

# ||out - ref|| / ||ref|| against float64 above which a result is WRONG. float32 on a GPU allows tf32 dots;
# bf16/fp16 inputs with float32 accumulation land between 1e-3 and 1e-2 (DYNAMIC_MIX.md); the backward's
# batch-wide weight-gradient reductions get the same bound.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
TOLERANCE_CUDA_FP32 = 2e-3
# Whole networks amplify rounding through ~20 blocks; a fused network may also be at most 2x as far from
# the float64 upstream network as the upstream network in the same dtype is.
MODEL_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 6e-2}

FLOP_CONVENTION = ("fwd = reduce 2*N*L*C*S*d + generate 2*N*S*(L*d)*(L*L) + apply 2*N*S*L*L*(C/S); "
                   "bwd = 2 x fwd (the backward's GEMM-shaped products: dP, dx_mix, dWg, dz, dWc, dx); "
                   "fwdbwd = 3 x fwd. Model FLOPs: the recompute of P that fused backwards do is not counted, "
                   "so GFLOP/s is the same multiple of 1/time for every backend.")
BYTES_CONVENTION = ("minimal traffic, X = N*L*C*element size, W = all weights and biases: fwd = 2X + W "
                    "(x read, y written); bwd = 3X + 2W (x and dy read, dx written, weights read, weight "
                    "gradients written); fwdbwd = 5X + 3W.")
ROOFLINE_CONVENTION = ("roofline time = max(bytes / copy bandwidth, FLOPs / GEMM rate in the run's dtype), both "
                       "measured once per run on this machine; % of roofline = roofline time / median time.")


class BenchError(Exception):
    """A problem the user can fix (missing module, unusable request); reported without a traceback."""


# ---------------------------------------------------------------------------------------------------------
# shapes, work, tolerances

@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    L: int
    C: int
    S: int
    d: int

    def label(self) -> str:
        dims = f"L{self.L} C{self.C} S{self.S} d{self.d}"
        return dims if self.name == "custom" else f"{self.name} ({dims})"


def parse_shape(text: str) -> Shape:
    text = text.strip()
    if text in SHAPES:
        return Shape(text, *SHAPES[text])
    parts = text.split(",")
    if len(parts) == 4 and all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        L, C, S, d = (int(p) for p in parts)
        if min(L, C, S, d) < 1:
            raise ValueError(f"shape {text!r}: L, C, S and d must all be >= 1")
        if C % S:
            raise ValueError(f"shape {text!r}: C={C} is not divisible by S={S}")
        return Shape("custom", L, C, S, d)
    raise ValueError(f"unknown shape {text!r}: use one of {', '.join(SHAPES)} or a custom 'L,C,S,d' "
                     f"such as 32,192,8,2")


def forward_flops(N: int, s: Shape) -> int:
    reduce = 2 * N * s.L * s.C * s.S * s.d
    generate = 2 * N * s.S * (s.L * s.d) * (s.L * s.L)
    apply = 2 * N * s.S * s.L * s.L * (s.C // s.S)
    return reduce + generate + apply


def work(direction: str, N: int, s: Shape, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, FLOPs) of one call under BYTES_CONVENTION and FLOP_CONVENTION."""
    elt = torch.empty((), dtype=dtype).element_size()
    X = N * s.L * s.C * elt
    W = (s.S * s.d * s.C + s.S * s.d + s.L * s.L * s.L * s.d + s.L * s.L) * elt
    f = forward_flops(N, s)
    return {"fwd": (2 * X + W, f), "bwd": (3 * X + 2 * W, 2 * f), "fwdbwd": (5 * X + 3 * W, 3 * f)}[direction]


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float32 and device.type == "cuda":
        return TOLERANCE_CUDA_FP32
    return TOLERANCE[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN/inf or the wrong shape."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------------------
# providers: what is timed

def make_inputs(N: int, s: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Fresh random x, weights (nn.Linear's init scale, so logits are O(1)) and dy, in ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    Sd, LL, Ld = s.S * s.d, s.L * s.L, s.L * s.d
    tensors = [torch.randn(N, s.L, s.C, generator=g), uniform((Sd, s.C), s.C), uniform((Sd,), s.C),
               uniform((LL, Ld), Ld), uniform((LL,), Ld)]
    dy = torch.randn(N, s.L, s.C, generator=g)
    return [t.to(device=device, dtype=dtype) for t in tensors], dy.to(device=device, dtype=dtype)


def reference_outputs(inputs, dy, S: int):
    """Float64 forward output and the five gradients of ``dynamixer_ops.reference.mix_forward``."""
    from .reference import mix_forward
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    y = mix_forward(*leaves, S)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return y.detach(), [g.detach() for g in grads]


def compile_mode(device: torch.device, override: str | None) -> str | None:
    if override is not None:
        return None if override == "default" else override
    return "max-autotune" if device.type == "cuda" else None


def make_mix_fn(backend: str, S: int, device: torch.device, compile_override: str | None = None) -> Callable:
    """``fn(x, compress_weight, compress_bias, generate_weight, generate_bias) -> y`` for one backend name."""
    from .reference import upstream_mix
    if backend == "eager":
        return lambda x, cw, cb, gw, gb: upstream_mix(x, cw, cb, gw, gb, S)
    if backend == "compile":
        compiled = torch.compile(upstream_mix, mode=compile_mode(device, compile_override), dynamic=False)
        mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)

        def run(x, cw, cb, gw, gb):
            if mark_step is not None and device.type == "cuda":
                mark_step()      # max-autotune uses CUDA graphs: each timed call is a new step
            return compiled(x, cw, cb, gw, gb, S)
        return run
    from .ops import dynamic_mix
    return lambda x, cw, cb, gw, gb: dynamic_mix(x, cw, cb, gw, gb, S, backend=backend)


def make_closure(fn: Callable, inputs, dy, direction: str) -> Callable[[], object]:
    """The exact call that is checked and then timed. fwd: inference (no autograd graph), returns y; bwd: only
    the backward of a graph built once (``retain_graph``); fwdbwd: forward with autograd + backward. Both
    return ``(y, grads)``, so the check covers the forward that feeds the backward too."""
    if direction == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if direction == "fwdbwd":
        def run():
            y = fn(*leaves)
            return y, torch.autograd.grad(y, leaves, dy)
        return run
    y = fn(*leaves)
    return lambda: (y, torch.autograd.grad(y, leaves, dy, retain_graph=True))


def check(run: Callable, direction: str, ref_y, ref_grads) -> float:
    """Largest relative error of what ``run`` returns (y, and the five gradients) against float64."""
    out = run()
    if direction == "fwd":
        return rel_error(out, ref_y)
    y, grads = out
    return max(rel_error(y, ref_y), *(rel_error(g, r) for g, r in zip(grads, ref_grads)))


def add_speedups(rows: dict[str, dict]) -> None:
    """``speedup_vs_<baseline>`` = the baseline's median / the row's, for rows measured side by side."""
    for ref_name in BASELINES:
        ref_t = rows[ref_name].get("median_ms") if ref_name in rows else None
        for row in rows.values():
            t = row.get("median_ms")
            row[f"speedup_vs_{ref_name}"] = ref_t / t if (t and ref_t) else None


def saved_for_backward_bytes(fn: Callable, inputs) -> int:
    """Bytes the autograd graph of one forward keeps for the backward, counting each storage once. The inputs
    themselves count too (every backend keeps x): this is the memory a training step holds per layer."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*leaves)
    del y
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------------------
# timing

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(run: Callable, device: torch.device, warmup_ms: float) -> float:
    """Run until ``warmup_ms`` has passed (at least twice, so lazy compilation is over); return s per call."""
    run()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if calls >= 1 and elapsed * 1e3 >= warmup_ms:
            return elapsed / calls


class Sampler:
    """Collects per-call times (seconds) for one backend in rounds."""

    def __init__(self, run: Callable, device: torch.device, threads: int, per_call_s: float):
        self.run, self.device, self.threads, self.per_call_s = run, device, threads, per_call_s
        self.samples: list[float] = []
        self._timer = None

    def round(self, budget_ms: float, blocks: int = 4):
        if self.device.type == "cuda":
            self.samples += _do_bench_samples(self.run, budget_ms)
            return
        from torch.utils import benchmark
        if self._timer is None:
            # Timer defaults to one thread: run with the threads the rest of the program uses.
            self._timer = benchmark.Timer(stmt="run()", globals={"run": self.run}, num_threads=self.threads)
        number = max(1, round(budget_ms / 1e3 / blocks / max(self.per_call_s, 1e-7)))
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


# ---------------------------------------------------------------------------------------------------------
# machine: roofline, info

def measure_roofline(device: torch.device, dtype: torch.dtype, threads: int, quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and GEMM rate in ``dtype``, measured here, now.

    Peaks: the fastest sample counts (a ceiling, not a typical rate)."""
    copy_mb = 64 if quick else 256
    n = 1024 if quick else (2048 if device.type == "cpu" else 8192)
    src = torch.empty(copy_mb * 2 ** 20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    copy = lambda: dst.copy_(src)         # noqa: E731
    gemm = lambda: torch.mm(a, b)         # noqa: E731
    if device.type == "cuda":
        from triton.testing import do_bench
        copy_s = do_bench(copy, warmup=25, rep=100, return_mode="min") / 1e3
        gemm_s = do_bench(gemm, warmup=25, rep=100, return_mode="min") / 1e3
    else:
        # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on a machine without a GPU
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils import benchmark
        budget = 0.2 if quick else 1.0
        copy_s = min(benchmark.Timer("f()", globals={"f": copy}, num_threads=threads).blocked_autorange(
            min_run_time=budget).times)
        gemm_s = min(benchmark.Timer("f()", globals={"f": gemm}, num_threads=threads).blocked_autorange(
            min_run_time=budget).times)
    name = str(dtype).replace("torch.", "")
    return {"copy_GBps": 2 * src.numel() * 4 / copy_s / 1e9, "copy_MiB": copy_mb,
            "gemm_GFLOPs": 2 * n ** 3 / gemm_s / 1e9, "gemm": f"{n}x{n}x{n} {name} torch.mm"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> dict | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return None


def _loadavg():
    """Other work on the machine (1, 5, 15 min load averages): CPU timings are only as good as this is low."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device, threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "loadavg_at_start": _loadavg(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRITON_INTERPRET",
                                               "CUDA_VISIBLE_DEVICES") if k in os.environ}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_GiB":
                       round(p.total_memory / 2 ** 30, 1), "sm_count": p.multi_processor_count}
    return info


def versions() -> dict:
    from . import __version__
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "dynamixer_ops": __version__,
           "git": _git_state()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


# ---------------------------------------------------------------------------------------------------------
# the op sweep

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line if len(line) <= 240 else line[:240] + ' ...'}"


def resolve_backends(requested: list[str] | None, device: torch.device, dtype: torch.dtype, quick: bool
                     ) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {backend: why it is skipped}). Unknown names raise ValueError."""
    from . import backends as registry
    known = list(BASELINES) + list(registry._REGISTRY) + [n for n in registry._LOAD_ERRORS
                                                          if n not in registry._REGISTRY]
    if requested is None or requested == ["all"]:
        every = requested is not None
        chosen = [b.name for b in sorted(registry._REGISTRY.values(), key=lambda b: b.priority.get(device.type, 100))
                  if b.why_not(device.type, dtype) is None and (every or b.auto(device.type))]
        baselines = ["eager"] if quick and not every else ["eager", "compile"]
        return baselines + chosen, {}
    unknown = [n for n in requested if n not in known]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(known)}")
    skipped = {}
    for name in requested:
        if name in BASELINES:
            continue
        try:
            registry.resolve_backend(name, device.type, dtype)
        except Exception as exc:  # BackendUnavailableError, or a load error recorded by the registry
            skipped[name] = str(exc)
    return list(dict.fromkeys(requested)), skipped


class Console:
    """Messages on stderr, and a one-line progress bar under them while a sweep runs (terminals only: a log
    file or a pipe gets the messages alone)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = ""

    def __call__(self, msg: str) -> None:
        self._clear()
        print(msg, file=self.stream, flush=True)
        if self.bar:
            print(self.bar, end="", file=self.stream, flush=True)

    def progress(self, done: int, total: int, label: str, width: int = 24) -> None:
        if not self.tty:
            return
        self._clear()
        filled = width * done // max(total, 1)
        self.bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"[:150]
        print(self.bar, end="", file=self.stream, flush=True)

    def done(self) -> None:
        self._clear()
        self.bar = ""

    def _clear(self) -> None:
        if self.tty and self.bar:
            print("\r" + " " * len(self.bar) + "\r", end="", file=self.stream, flush=True)


def run_op_sweep(args, device, dtype, shapes, backends, skipped, roofline, log) -> list[dict]:
    results = []
    threads = torch.get_num_threads()
    steps, total = 0, len(shapes) * len(args.direction) * (len(backends) + args.rounds)   # checks + rounds
    progress = getattr(log, "progress", lambda *a: None)
    for si, shape in enumerate(shapes):
        N = args.sequences if args.sequences is not None else args.batch * shape.L
        if "compile" in backends:
            torch._dynamo.reset()     # a fresh cache per shape: no recompile limit across a long sweep
        inputs, dy = make_inputs(N, shape, dtype, device, seed=si)
        ref_y, ref_grads = reference_outputs(inputs, dy, shape.S)
        tol = tolerance(dtype, device)
        fns = {}
        for name in backends:
            if name not in skipped:
                try:
                    fns[name] = make_mix_fn(name, shape.S, device, args.compile_mode)
                except Exception as exc:
                    skipped[name] = _first_line(exc)
        for direction in args.direction:
            nbytes, flops = work(direction, N, shape, dtype)
            base = {"shape": shape.name, "L": shape.L, "C": shape.C, "S": shape.S, "d": shape.d, "sequences": N,
                    "images": N / shape.L, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                    "direction": direction, "bytes": nbytes, "flops": flops, "tolerance": tol}
            rows, samplers = {}, {}
            for name in backends:
                progress(steps, total, f"{shape.name} {direction} {name}: check, warm-up")
                steps += 1
                row = dict(base, backend=name, status="ok", error=None, message=None)
                rows[name] = row
                if name in skipped:
                    row.update(status="SKIPPED", message=skipped[name])
                    continue
                try:
                    t0 = time.perf_counter()
                    run = make_closure(fns[name], inputs, dy, direction)
                    err = check(run, direction, ref_y, ref_grads)
                    row["first_call_s"] = time.perf_counter() - t0    # includes torch.compile's compile
                    row["error"] = err if math.isfinite(err) else None
                    if not err <= tol:
                        row.update(status="WRONG", message=f"relative error {err:.3g} > tolerance {tol:g}"
                                   if math.isfinite(err) else "output has NaN/inf or the wrong shape")
                        continue
                    if direction != "fwd" and name != "compile":   # compiled graphs save outside the hooks
                        row["saved_MiB"] = saved_for_backward_bytes(fns[name], inputs) / 2 ** 20
                    per_call = warm_up(run, device, args.warmup)
                    samplers[name] = Sampler(run, device, threads, per_call)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        run()
                        _sync(device)
                        row["peak_memory_MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
                except Exception as exc:
                    row.update(status="ERROR", message=_first_line(exc))
            for rnd in range(args.rounds):     # interleaved: every backend once per round
                progress(steps, total, f"{shape.name} {direction}: timing round {rnd + 1}/{args.rounds}")
                steps += 1
                for name, sampler in samplers.items():
                    try:
                        sampler.round(args.repeat / args.rounds)
                    except Exception as exc:
                        rows[name].update(status="ERROR", message=_first_line(exc))
                samplers = {n: s for n, s in samplers.items() if rows[n]["status"] == "ok"}
            for name, sampler in samplers.items():
                t = sampler.samples
                med = quantile(t, 0.5)
                rows[name].update(median_ms=med * 1e3, p20_ms=quantile(t, 0.2) * 1e3, p80_ms=quantile(t, 0.8) * 1e3,
                                  samples=len(t), GBps=nbytes / med / 1e9, GFLOPs=flops / med / 1e9,
                                  roofline_pct=100 * max(nbytes / (roofline["copy_GBps"] * 1e9),
                                                         flops / (roofline["gemm_GFLOPs"] * 1e9)) / med)
            add_speedups(rows)
            results += rows.values()
            log(f"[{shape.label()}, N={N}, {direction}] " + ", ".join(
                f"{n} {r['median_ms']:.3g} ms" if r.get("median_ms") else f"{n} {r['status']}"
                for n, r in rows.items()))
    return results


# ---------------------------------------------------------------------------------------------------------
# the whole network

def _load_model_modules():
    try:
        from . import models, upstream
    except ImportError as exc:
        raise BenchError(f"--model needs dynamixer_ops.models and dynamixer_ops.upstream, which failed to import "
                         f"({exc})") from None
    return models, upstream


def run_model(args, device, dtype, backends, skipped, log) -> list[dict]:
    models, upstream = _load_model_modules()
    name = args.model
    for mod, what in ((models, "dynamixer_ops.models"), (upstream, "dynamixer_ops.upstream")):
        if not hasattr(mod, name):
            raise BenchError(f"{what} has no {name}()")
    torch.manual_seed(0)
    kw = {"img_size": args.img_size}
    base = getattr(upstream, name)(**kw).eval()
    state = base.state_dict()
    size = (3, args.img_size, args.img_size)
    B = args.batch
    x = torch.randn(B, *size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    n_check = min(B, 2 if device.type == "cpu" else 8)
    # float64 upstream network: the truth for outputs and parameter gradients on the first n_check images
    ref_net = getattr(upstream, name)(**kw).double().eval()
    ref_net.load_state_dict(state)
    x64 = x[:n_check].double()
    ref_out = ref_net(x64)
    names, params = zip(*ref_net.named_parameters())
    ref_grads = dict(zip(names, torch.autograd.grad(ref_out.square().mean(), params)))
    ref_out = ref_out.detach()
    del ref_net

    # --autocast: parameters and input stay in --dtype, the forward runs under torch.autocast (as users train)
    amp_dtype = DTYPES[args.autocast] if args.autocast else None
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    nets, results = {}, []
    for bname in backends:
        row = {"model": name, "backend": bname, "images": B, "dtype": str(dtype).replace("torch.", ""),
               "autocast": args.autocast, "device": str(device), "status": "ok", "message": None}
        if bname in skipped:
            nets[bname] = None
            results.append(dict(row, status="SKIPPED", message=skipped[bname]))
            continue
        try:
            if bname in BASELINES:
                net = getattr(upstream, name)(**kw)
            else:
                net = getattr(models, name)(backend=bname, **kw)
            net.load_state_dict(state)
            net = net.to(device=device, dtype=dtype)
            if bname == "compile":
                net = torch.compile(net, mode=compile_mode(device, args.compile_mode))
            nets[bname] = net
        except Exception as exc:
            nets[bname] = None
            results.append(dict(row, status="ERROR", message=_first_line(exc)))
            continue
        results.append(row)

    # correctness, in eval mode (no dropout / drop-path), against the float64 upstream network
    errs = {}
    for row in results:
        net = nets.get(row["backend"])
        if net is None or row["status"] != "ok":
            continue
        try:
            net.eval()
            with amp():
                out = net(x[:n_check])
            # parameters matched by name: a fused module may register them in another order
            named = dict(getattr(net, "_orig_mod", net).named_parameters())
            grads = torch.autograd.grad(out.double().square().mean(), [named[n] for n in ref_grads])
            g = torch.cat([t.double().flatten() for t in grads])
            r = torch.cat([t.flatten() for t in ref_grads.values()])
            errs[row["backend"]] = max(rel_error(out, ref_out), rel_error(g, r))
        except Exception as exc:
            row.update(status="ERROR", message=_first_line(exc))
    own = errs.get("eager")
    tol = max(MODEL_TOLERANCE[amp_dtype or dtype], 2 * own if own is not None and math.isfinite(own) else 0)
    for row in results:
        if row["backend"] in errs:
            err = errs[row["backend"]]
            row.update(error=err if math.isfinite(err) else None, tolerance=tol)
            if not err <= tol:
                row.update(status="WRONG", message=f"relative error {err:.3g} > tolerance {tol:.3g}")

    threads = torch.get_num_threads()
    mode_of = {"fwd": "inference", "fwdbwd": "train_step"}
    out_rows = []
    for direction in args.direction:
        mode = mode_of[direction]
        samplers = {}
        rows = {}
        for row in results:
            r = dict(row, mode=mode)
            rows[r["backend"]] = r
            net = nets.get(r["backend"])
            if r["status"] != "ok":
                continue
            try:
                if mode == "inference":
                    net.eval()

                    def run(net=net):
                        with torch.no_grad(), amp():
                            return net(x)
                else:
                    net.train()
                    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
                    labels = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(2)).to(device)

                    def run(net=net, opt=opt, labels=labels):
                        opt.zero_grad(set_to_none=True)
                        with amp():
                            loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
                        loss.backward()
                        opt.step()
                per_call = warm_up(run, device, args.warmup)
                samplers[r["backend"]] = Sampler(run, device, threads, per_call)
            except Exception as exc:
                r.update(status="ERROR", message=_first_line(exc))
        for _ in range(args.rounds):
            for bname, sampler in samplers.items():
                sampler.round(args.repeat / args.rounds, blocks=1)
        for bname, sampler in samplers.items():
            t = sampler.samples
            med = quantile(t, 0.5)
            rows[bname].update(median_ms=med * 1e3, p20_ms=quantile(t, 0.2) * 1e3, p80_ms=quantile(t, 0.8) * 1e3,
                               samples=len(t), images_per_s=B / med)
        add_speedups(rows)
        out_rows += rows.values()
        log(f"[{name}, {B} images, {mode}] " + ", ".join(
            f"{n} {r['images_per_s']:.3g} img/s" if r.get("images_per_s") else f"{n} {r['status']}"
            for n, r in rows.items()))
    return out_rows


# ---------------------------------------------------------------------------------------------------------
# output

def _fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    _, numbers = _notes(report)
    if report["mode"] == "model":
        head = ["model", "mode", "backend", "images/s", "median ms", "spread", "vs eager", "vs compile",
                "status"]
        rows = []
        for r in report["results"]:
            rows.append([r["model"], r["mode"], r["backend"], _fmt(r.get("images_per_s"), ".1f"),
                         _fmt(r.get("median_ms"), ".2f"), _spread(r), _fmt(r.get("speedup_vs_eager"), ".2f") + "x"
                         * (r.get("speedup_vs_eager") is not None), _fmt(r.get("speedup_vs_compile"), ".2f") + "x"
                         * (r.get("speedup_vs_compile") is not None), _status(r, numbers)])
        return head, rows
    head = ["shape", "N", "dir", "backend", "median ms", "spread", "vs eager", "vs compile", "GB/s", "GFLOP/s",
            "% roof", "saved MiB", "max rel err", "status"]
    rows = []
    for r in report["results"]:
        shape = r["shape"] if r["shape"] != "custom" else f"{r['L']},{r['C']},{r['S']},{r['d']}"
        rows.append([shape, str(r["sequences"]), r["direction"], r["backend"], _fmt(r.get("median_ms"), ".3f"),
                     _spread(r), _x(r.get("speedup_vs_eager")), _x(r.get("speedup_vs_compile")),
                     _fmt(r.get("GBps"), ".1f"), _fmt(r.get("GFLOPs"), ".1f"), _fmt(r.get("roofline_pct"), ".1f"),
                     _fmt(r.get("saved_MiB"), ".2f"), _fmt(r.get("error"), ".1e"), _status(r, numbers)])
    return head, rows


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _spread(r):
    if r.get("median_ms") is None:
        return "-"
    return f"±{50 * (r['p80_ms'] - r['p20_ms']) / r['median_ms']:.1f}%"


def _notes(report: dict) -> tuple[dict[int, str], dict[str, int]]:
    """Distinct messages, numbered: the table shows "ERROR [1]" and the text follows it."""
    numbers: dict[str, int] = {}
    for r in report["results"]:
        if r.get("message"):
            numbers.setdefault(f"{r['backend']}: {r['message']}", len(numbers) + 1)
    return {n: text for text, n in numbers.items()}, numbers


def _status(r, numbers=None):
    if not r.get("message") or numbers is None:
        return r["status"]
    return f"{r['status']} [{numbers[r['backend'] + ': ' + r['message']]}]"


def print_table(report: dict, stream=None, plain: bool = False):
    stream = stream or sys.stdout
    head, rows = table_rows(report)
    notes, _ = _notes(report)
    title = report.get("title", "")
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if not plain:
        table = Table(title=title)
        for i, h in enumerate(head):
            table.add_column(h, justify="left" if i in (0, 2, 3) or h == "status" else "right", no_wrap=True)
        for row in rows:
            style = None if row[-1] == "ok" else ("red" if row[-1].startswith(("WRONG", "ERROR")) else "dim")
            table.add_row(*row, style=style)
        console = Console(file=stream, width=None if stream.isatty() else 200)
        console.print(table)
        for n, text in notes.items():
            console.print(f"[{n}] {text}", markup=False, soft_wrap=True)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    if title:
        print(title, file=stream)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)), file=stream)
    print("  ".join("-" * w for w in widths), file=stream)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=stream)
    for n, text in notes.items():
        print(f"[{n}] {text}", file=stream)


def _case_label(r: dict) -> str:
    if "model" in r:
        return r["model"]
    shape = r["shape"] if r["shape"] != "custom" else f"{r['L']},{r['C']},{r['S']},{r['d']}"
    return f"{shape}\nN={r['sequences']}"


def plot(report: dict, path: str):
    """Grouped bars of speedup over eager (log scale, bars grow from 1x), one panel per direction / mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    field = "mode" if report["mode"] == "model" else "direction"
    rows = [r for r in report["results"] if r["backend"] != "eager"]
    panels = list(dict.fromkeys(r[field] for r in report["results"])) or ["none"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    timed = [r["speedup_vs_eager"] for r in rows if r.get("speedup_vs_eager") is not None]
    lo, hi = min(timed + [1.0]) / 1.5, max(timed + [1.0]) * 1.5
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.8 * len(panels)), 4.8), squeeze=False,
                             sharey=True)
    for ax, panel in zip(axes[0], panels):
        sub = [r for r in rows if r[field] == panel]
        labels = list(dict.fromkeys(_case_label(r) for r in sub))
        width = 0.8 / max(1, len(backends))
        for bi, b in enumerate(backends):
            for li, lab in enumerate(labels):
                match = [r for r in sub if r["backend"] == b and _case_label(r) == lab]
                if not match:
                    continue
                r, x = match[0], li + (bi - (len(backends) - 1) / 2) * width
                y = r.get("speedup_vs_eager")
                if y is None:     # not timed: say why where the bar would be
                    ax.text(x, 1.0, f"{b} {r['status']}", rotation=90, ha="center", va="bottom", fontsize=7,
                            color="red" if r["status"] in ("WRONG", "ERROR") else "gray")
                    continue
                ax.bar(x, y - 1.0, width, bottom=1.0, color=f"C{bi}")
                ax.annotate(f"{y:.2f}x", (x, y), ha="center", va="bottom" if y >= 1 else "top", fontsize=7,
                            xytext=(0, 2 if y >= 1 else -2), textcoords="offset points")
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(0.1, 0.2, 0.25, 0.5, 0.75, 1.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_title(panel)
        ax.grid(axis="y", which="major", alpha=0.3)
    axes[0][0].set_ylabel("speedup over eager (log scale; 1x = eager)")
    handles = [Patch(color=f"C{i}", label=b) for i, b in enumerate(backends)]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(report.get("title", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamixer-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time the fused dynamic_mix backends against the upstream eager step (or, with --model, the "
                    "whole network), after checking each against the float64 reference.",
        epilog=f"""\
shapes (L, C, S, d), from the upstream model configs:
  {'  '.join(f'{k}={v}' for k, v in SHAPES.items())}
  or a custom 'L,C,S,d'. One call mixes N sequences of L tokens of C channels.

conventions:
  times   median over samples; spread = half the p20-p80 range, in % of the median. GPU: do_bench samples
          (one call each, L2 cache flushed); CPU: torch.utils.benchmark blocks (mean per call of a block).
          Backends are timed in --rounds interleaved rounds in one process. fwd is timed without autograd
          (inference); bwd is the backward alone of a graph built once; fwdbwd is forward + backward.
  speedup median time of eager (or compile) / median time of the backend.
  GB/s    {BYTES_CONVENTION}
  GFLOP/s {FLOP_CONVENTION}
  % roof  {ROOFLINE_CONVENTION}
  saved   MiB the autograd graph of one forward keeps for the backward (bwd/fwdbwd rows; each storage counted
          once, inputs included; not measured for compile, whose graph saves outside autograd's hooks).
  check   every backend is first run on the timed inputs and compared with dynamixer_ops.reference.mix_forward
          in float64 (and its autograd gradients for bwd/fwdbwd), as ||out - ref|| / ||ref||; above the
          tolerance (fp64 1e-10, fp32 1e-5 on CPU / 2e-3 on GPU, fp16 1e-2, bf16 2e-2) it is reported WRONG
          and not timed; an exception is reported as ERROR.

examples:
  dynamixer-bench --quick
  dynamixer-bench --device cpu --dtype float32 --shapes s1 --sequences 256 --direction fwd fwdbwd
  dynamixer-bench --device cuda --dtype bf16 --batch 128 --json out.json --plot out.png
  dynamixer-bench --model dynamixer_s --batch 8 --direction fwd fwdbwd
""")
    p.add_argument("--backends", nargs="+", metavar="NAME",
                   help="backends to time (default: every registered backend that runs on the device and dtype "
                        "and is chosen automatically, plus 'eager' (dynamixer_ops.reference.upstream_mix, the "
                        "upstream eager step) and 'compile' (torch.compile of it; mode max-autotune on GPU, the "
                        "default mode on CPU). 'all': every registered backend that can run here, including "
                        "those never chosen automatically (e.g. the Triton interpreter), plus eager and compile. "
                        "Named backends that cannot run here are listed as SKIPPED with the reason. With --model: "
                        "the fused networks' backends, 'eager' = the upstream network, 'compile' = torch.compile "
                        "of it (default there: eager and the fused backends except 'reference')")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help="named shapes (s1 s2 m1 m3 l1 l2, or 'all') or custom L,C,S,d (default: all named "
                        "shapes; --quick: s1 s2)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch", type=int, metavar="IMAGES",
                      help="images per call; the model mixes every row (and column) of an image, so one call "
                           "mixes N = IMAGES * L sequences (default: 128 on GPU, 8 on CPU, 2 with --quick). "
                           "With --model: images per forward / training step")
    size.add_argument("--sequences", type=int, metavar="N",
                      help="sequences per call, instead of --batch (the CPU acceptance target of issue 3 is "
                           "stated for N = 256 at s1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), metavar="DTYPE",
                   help=f"one of {', '.join(sorted(DTYPES))} (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--direction", nargs="+", choices=DIRECTIONS, metavar="DIR",
                   help="one or more of fwd, bwd, fwdbwd (default: fwd fwdbwd). With --model: fwd = inference, "
                        "fwdbwd = a training step (forward, cross-entropy, backward, SGD step)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="CPU threads for torch (default: torch's own default, unchanged)")
    p.add_argument("--warmup", type=float, metavar="MS",
                   help="warm-up time per backend, shape and direction before timing, in ms (at least two "
                        "calls; torch.compile's compilation happens before it) (default: 25 GPU, 100 CPU, 5 "
                        "with --quick)")
    p.add_argument("--repeat", type=float, metavar="MS",
                   help="timed time per backend, shape and direction, in ms, split over --rounds (default: 200 "
                        "GPU, 1000 CPU, 40 with --quick)")
    p.add_argument("--rounds", type=int, metavar="R",
                   help="interleaved rounds: every backend is timed once per round in turn, so that a load change "
                        "on a shared machine hits all of them alike (default: 5, 2 with --quick)")
    p.add_argument("--compile-mode", metavar="MODE",
                   help="torch.compile mode for 'compile' (default: max-autotune on GPU, 'default' on CPU)")
    p.add_argument("--model", choices=MODELS,
                   help="time the whole network instead of the op: images/s for inference and a training step, "
                        "dynamixer_ops.models.<model>(backend=...) against dynamixer_ops.upstream.<model>() "
                        "with the same weights")
    p.add_argument("--autocast", choices=sorted(DTYPES), metavar="DTYPE",
                   help="with --model: run every network's forward under torch.autocast(device, DTYPE), parameters "
                        "and input in --dtype (e.g. --autocast bfloat16: mixed-precision inference and training)")
    p.add_argument("--img-size", type=int, default=224, metavar="PX",
                   help="with --model: input resolution; the mixing length is PX/7 in the first stage (default 224)")
    p.add_argument("--json", metavar="PATH", help="write machine, versions, settings and every figure as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write a PNG of the speedups over eager (needs matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds: shapes s1 s2 at 2 images, short warm-up and timing, and "
                        "'compile' left out unless named in --backends")
    p.add_argument("--plain", action="store_true", help="plain-text table even when rich is installed")
    p.add_argument("--require", nargs="+", metavar="BACKEND:DIR>=X", default=[],
                   help="acceptance targets checked after the run, e.g. 'cpu:fwd>=1.3 cpu:fwdbwd>=1.2' (issue 3): "
                        "the backend's speedup over eager in that direction must be at least X for every shape "
                        "run (a WRONG/ERROR/untimed backend fails); prints PASS/FAIL per shape, exit code 3 "
                        "when any fails. With --model, DIR is fwd or fwdbwd as for --direction")
    return p


_REQUIRE = re.compile(r"^([A-Za-z0-9_.-]+):(fwd|bwd|fwdbwd)>=([0-9]*\.?[0-9]+)$")


def parse_requirements(p: argparse.ArgumentParser, texts: list[str]) -> list[tuple[str, str, float]]:
    out = []
    for text in texts:
        m = _REQUIRE.match(text.replace(" ", ""))
        if not m:
            p.error(f"argument --require: {text!r} is not BACKEND:DIR>=X (e.g. cpu:fwd>=1.3)")
        out.append((m.group(1), m.group(2), float(m.group(3))))
    return out


def check_requirements(report: dict, requirements) -> tuple[bool, list[str]]:
    """(all met, one line per requirement and shape)."""
    mode_of = {"fwd": "inference", "fwdbwd": "train_step"}
    lines, ok = [], True
    for backend, direction, target in requirements:
        if report["mode"] == "model":
            rows = [r for r in report["results"] if r["backend"] == backend and r["mode"] == mode_of.get(direction)]
        else:
            rows = [r for r in report["results"] if r["backend"] == backend and r["direction"] == direction]
        if not rows:
            ok = False
            lines.append(f"FAIL {backend} {direction} >= {target:g}x eager: not run")
        for r in rows:
            got = r.get("speedup_vs_eager")
            passed = got is not None and got >= target
            ok &= passed
            where = r.get("model") or f"{_case_label(r).replace(chr(10), ' ')}"
            value = f"{got:.2f}x" if got is not None else r["status"]
            lines.append(f"{'PASS' if passed else 'FAIL'} {backend} {direction} >= {target:g}x eager at {where}: "
                         f"{value}")
    return ok, lines


def _finish_args(p: argparse.ArgumentParser, args) -> tuple[torch.device, torch.dtype, list[Shape]]:
    """Defaults that depend on the device, and the checks argparse cannot do; errors exit with code 2."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"argument --device: expected cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda was requested but no CUDA device is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    gpu = device.type == "cuda"
    for name, value in (("--batch", args.batch), ("--sequences", args.sequences), ("--threads", args.threads),
                        ("--rounds", args.rounds)):
        if value is not None and value < 1:
            p.error(f"argument {name}: must be >= 1, got {value}")
    for name, value in (("--warmup", args.warmup), ("--repeat", args.repeat)):
        if value is not None and not value > 0:
            p.error(f"argument {name}: must be > 0 ms, got {value}")
    if args.model and args.sequences is not None:
        p.error("argument --sequences: not allowed with --model (use --batch, in images)")
    if args.autocast and not args.model:
        p.error("argument --autocast: only with --model (the op's benchmark takes --dtype)")
    if args.img_size < 7 or args.img_size % 7:
        p.error(f"argument --img-size: must be a positive multiple of the patch size 7, got {args.img_size}")
    if args.model and args.shapes:
        p.error("argument --shapes: not allowed with --model (the network fixes its shapes)")
    args.direction = list(dict.fromkeys(args.direction or ["fwd", "fwdbwd"]))
    if args.model and "bwd" in args.direction:
        p.error("argument --direction: with --model use fwd (inference) and/or fwdbwd (training step)")
    if args.batch is None and args.sequences is None:
        args.batch = 2 if args.quick else (128 if gpu else 8)
    args.warmup = args.warmup or (5 if args.quick else (25 if gpu else 100))
    args.repeat = args.repeat or (40 if args.quick else (200 if gpu else 1000))
    args.rounds = args.rounds or (2 if args.quick else 5)
    names = args.shapes or (["s1", "s2"] if args.quick else list(SHAPES))
    if "all" in names:
        names = list(SHAPES) + [n for n in names if n not in SHAPES and n != "all"]
    shapes = []
    for text in names:
        try:
            shapes.append(parse_shape(text))
        except ValueError as exc:
            p.error(f"argument --shapes: {exc}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("argument --plot: matplotlib is not installed; pip install matplotlib (or drop --plot)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, dtype, shapes


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    device, dtype, shapes = _finish_args(p, args)
    requirements = parse_requirements(p, args.require)
    from . import __version__  # noqa: F401  (imports the package: registers every backend)
    try:
        backends, skipped = resolve_backends(args.backends, device, dtype, args.quick)
    except ValueError as exc:
        p.error(f"argument --backends: {exc}")
    if args.model and args.backends is None:
        backends = [b for b in backends if b != "reference"]   # the plain-math backend: slow, not a contender
    log = Console()
    for name, why in skipped.items():
        log(f"dynamixer-bench: skipping {name}: {why}")
    threads = torch.get_num_threads()
    dname = str(dtype).replace("torch.", "")
    report = {
        "schema": 1,
        "tool": "dynamixer-bench",
        "mode": "model" if args.model else "op",
        "command": shlex.join(["dynamixer-bench", *(argv if argv is not None else sys.argv[1:])]),  # pastes as is
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(device, threads),
        "versions": versions(),
        "settings": {"device": str(device), "dtype": dname, "backends": backends, "directions": args.direction,
                     "images": args.batch, "sequences": args.sequences, "warmup_ms": args.warmup,
                     "repeat_ms": args.repeat, "rounds": args.rounds, "threads": threads, "quick": args.quick,
                     "compile_mode": compile_mode(device, args.compile_mode) or "default", "model": args.model,
                     "autocast": args.autocast,
                     "timer": "triton.testing.do_bench" if device.type == "cuda" else "torch.utils.benchmark.Timer"},
        "conventions": {"flops": FLOP_CONVENTION, "bytes": BYTES_CONVENTION, "roofline": ROOFLINE_CONVENTION},
    }
    where = report["machine"].get("gpu", {}).get("name") if device.type == "cuda" else report["machine"]["cpu"]
    report["title"] = f"dynamixer-bench on {where}, {dname}, torch {torch.__version__}"
    if args.autocast:
        report["title"] += f", under autocast({args.autocast})"
    load = report["machine"]["loadavg_at_start"]
    if device.type == "cpu" and load is not None:
        report["title"] += f", {threads} threads, load {load[0]:.1f} on {os.cpu_count()} cores"
        if load[0] > 0.75 * (os.cpu_count() or 1):
            log(f"dynamixer-bench: warning: the machine is busy (load average {load[0]:.1f} on {os.cpu_count()} "
                f"cores): CPU times are inflated and noisy; the interleaved ratios are the figures to trust, "
                f"and only when repeated")
    try:
        if args.model:
            report["shapes"] = []
            report["results"] = run_model(args, device, dtype, backends, skipped, log)
        else:
            log(f"dynamixer-bench: measuring the roofline on {device} ...")
            report["roofline"] = measure_roofline(device, dtype, threads, args.quick)
            report["shapes"] = [dataclasses.asdict(s) for s in shapes]
            report["results"] = run_op_sweep(args, device, dtype, shapes, backends, skipped, report["roofline"], log)
            log.done()
    except BenchError as exc:
        print(f"dynamixer-bench: error: {exc}", file=sys.stderr)
        return 1
    report["machine"]["loadavg_at_end"] = _loadavg()
    print_table(report, plain=args.plain)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(report), f, indent=1, allow_nan=False)
        log(f"dynamixer-bench: wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        log(f"dynamixer-bench: wrote {args.plot}")
    if requirements:
        met, lines = check_requirements(report, requirements)
        print("\n".join(lines))
        if not met:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
