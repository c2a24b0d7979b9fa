"""The op sweep: shapes, work conventions, the providers that are timed, and the sweep over shapes and
directions (each backend checked against the float64 reference, then timed by :mod:`.timing`)."""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable

import torch

from .. import backends as registry
from ..ops import forward_flops
from ..testing import (MODEL_SHAPES, linear_init_inputs, reference_floors, reference_outputs, relative_error,
                       tolerance)
from .timing import BASELINES, first_line, sync, time_side_by_side

DIRECTIONS = ("fwd", "bwd", "fwdbwd")

# The names --dtype and --autocast accept.
DTYPE_BY_NAME = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# What a run measures when the options leave it open, by device type: dynamixer-bench's defaults, and the
# pytest-benchmark suite's (benchmarks/test_bench_dynamic_mix.py).
DEFAULTS = {"cuda": {"dtype": torch.bfloat16, "images": 128, "warmup_ms": 25, "repeat_ms": 200},
            "cpu": {"dtype": torch.float32, "images": 8, "warmup_ms": 100, "repeat_ms": 1000}}

FLOP_CONVENTION = ("fwd = reduce 2*N*L*C*S*d + generate 2*N*S*(L*d)*(L*L) + apply 2*N*S*L*L*(C/S); "
                   "bwd = 2 x fwd (the backward's GEMM-shaped products: dP, dx_mix, dWg, dz, dWc, dx); "
                   "fwdbwd = 3 x fwd. Model FLOPs: the recompute of P that fused backwards do is not counted, "
                   "so GFLOP/s is the same multiple of 1/time for every backend.")

BYTES_CONVENTION = ("minimal traffic, X = N*L*C*element size, W = all weights and biases: fwd = 2X + W "
                    "(x read, y written); bwd = 3X + 2W (x and dy read, dx written, weights read, weight "
                    "gradients written); fwdbwd = 5X + 3W.")

ROOFLINE_CONVENTION = ("roofline time = max(bytes / copy bandwidth, FLOPs / GEMM rate in the run's dtype); the "
                       "GEMM rate is the machine's best: the fastest of torch.mm and (on a CPU) oneDNN's GEMM, "
                       "measured once per run on this machine, or the FMA peak where that is higher (every "
                       "candidate in the JSON's roofline.gemm_candidates); % of roofline = roofline time / "
                       "median time.")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A named shape: one of :data:`dynamixer_ops.testing.MODEL_SHAPES` (s1 s2 m1 m3 l1 l2), or "custom"."""
    name: str
    L: int
    C: int
    S: int
    d: int

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return self.L, self.C, self.S, self.d

    def label(self) -> str:
        dims = f"L{self.L} C{self.C} S{self.S} d{self.d}"
        return dims if self.name == "custom" else f"{self.name} ({dims})"


def parse_shape(text: str) -> Shape:
    text = text.strip()
    if text in MODEL_SHAPES:
        return Shape(text, *MODEL_SHAPES[text])
    parts = text.split(",")
    if len(parts) == 4 and all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        L, C, S, d = (int(p) for p in parts)
        if min(L, C, S, d) < 1:
            raise ValueError(f"shape {text!r}: L, C, S and d must all be >= 1")
        if C % S:
            raise ValueError(f"shape {text!r}: C={C} is not divisible by S={S}")
        return Shape("custom", L, C, S, d)
    raise ValueError(f"unknown shape {text!r}: use one of {', '.join(MODEL_SHAPES)} or a custom 'L,C,S,d' "
                     f"such as 32,192,8,2")


def work(direction: str, N: int, s: Shape, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, FLOPs) of one call under BYTES_CONVENTION and FLOP_CONVENTION."""
    elt = torch.empty((), dtype=dtype).element_size()
    X = N * s.L * s.C * elt
    W = (s.S * s.d * s.C + s.S * s.d + s.L * s.L * s.L * s.d + s.L * s.L) * elt
    f = forward_flops(N, *s.dims)
    return {"fwd": (2 * X + W, f), "bwd": (3 * X + 2 * W, 2 * f), "fwdbwd": (5 * X + 3 * W, 3 * f)}[direction]


def compile_mode(device: torch.device, override: str | None) -> str | None:
    if override is not None:
        return None if override == "default" else override
    return "max-autotune" if device.type == "cuda" else None


def make_mix_fn(backend: str, S: int, device: torch.device, compile_override: str | None = None) -> Callable:
    """``fn(x, compress_weight, compress_bias, generate_weight, generate_bias) -> y`` for one backend name."""
    from ..reference import upstream_mix
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
    from ..ops import dynamic_mix
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


def check(run: Callable, direction: str, ref_y, ref_grads, floors) -> float:
    """Largest relative error of what ``run`` returns (y, and the five gradients) against float64, each relative
    to max(its reference's norm, its floor): the test suite's pass rule (``floors`` from
    :func:`dynamixer_ops.testing.reference_floors`)."""
    out = run()
    if direction == "fwd":
        return relative_error(out, ref_y, floors[0])
    y, grads = out
    return max(relative_error(y, ref_y, floors[0]),
               *(relative_error(g, r, f) for g, r, f in zip(grads, ref_grads, floors[1:])))


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


def resolve_backends(requested: list[str] | None, device: torch.device, dtype: torch.dtype, quick: bool
                     ) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {backend: why it is skipped}). Unknown names raise ValueError."""
    registered = registry.registered_backends()
    known = list(BASELINES) + list(registered) + [n for n in registry.load_errors() if n not in registered]
    if requested is None or requested == ["all"]:
        every = requested is not None
        chosen = [b.name for b in sorted(registered.values(), key=lambda b: b.priority.get(device.type, 100))
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


def run_op_sweep(args, device, dtype, shapes, backends, skipped, roofline, log) -> list[dict]:
    """One row per shape, direction and backend: checked against the float64 reference, then (when right)
    timed side by side with the others by :func:`.timing.time_side_by_side`."""
    results = []
    steps, total = 0, len(shapes) * len(args.direction) * (len(backends) + args.rounds)   # checks + rounds
    progress = getattr(log, "progress", lambda *a: None)
    for si, shape in enumerate(shapes):
        N = args.sequences if args.sequences is not None else args.batch * shape.L
        if "compile" in backends:
            torch._dynamo.reset()     # a fresh cache per shape: no recompile limit across a long sweep
        inputs, dy = linear_init_inputs(N, *shape.dims, dtype, device, seed=si)
        ref_y, ref_grads = reference_outputs(inputs, shape.S, dy)
        floors = reference_floors(inputs, shape.S, dy)
        tol = tolerance(dtype, device)
        fns = {}
        for name in backends:
            if name not in skipped:
                try:
                    fns[name] = make_mix_fn(name, shape.S, device, args.compile_mode)
                except Exception as exc:
                    skipped[name] = first_line(exc)
        for direction in args.direction:
            nbytes, flops = work(direction, N, shape, dtype)
            base = {"shape": shape.name, "L": shape.L, "C": shape.C, "S": shape.S, "d": shape.d, "sequences": N,
                    "images": N / shape.L, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                    "direction": direction, "bytes": nbytes, "flops": flops, "tolerance": tol}
            rows, runs = {}, {}
            for name in backends:
                progress(steps, total, f"{shape.name} {direction} {name}: check")
                steps += 1
                row = dict(base, backend=name, status="ok", error=None, message=None)
                rows[name] = row
                if name in skipped:
                    row.update(status="SKIPPED", message=skipped[name])
                    continue
                try:
                    t0 = time.perf_counter()
                    run = make_closure(fns[name], inputs, dy, direction)
                    err = check(run, direction, ref_y, ref_grads, floors)
                    row["first_call_s"] = time.perf_counter() - t0    # includes torch.compile's compile
                    row["error"] = err if math.isfinite(err) else None
                    if not err <= tol:
                        row.update(status="WRONG", message=f"relative error {err:.3g} > tolerance {tol:g}"
                                   if math.isfinite(err) else "output has NaN/inf or the wrong shape")
                        continue
                    if direction != "fwd" and name != "compile":   # compiled graphs save outside the hooks
                        row["saved_MiB"] = saved_for_backward_bytes(fns[name], inputs) / 2 ** 20
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        run()
                        sync(device)
                        row["peak_memory_MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
                    runs[name] = run
                except Exception as exc:
                    row.update(status="ERROR", message=first_line(exc))

            def on_round(rnd, shape=shape, direction=direction):
                nonlocal steps
                progress(steps, total, f"{shape.name} {direction}: timing round {rnd + 1}/{args.rounds}")
                steps += 1

            medians = time_side_by_side(runs, rows, device, warmup_ms=args.warmup, repeat_ms=args.repeat,
                                        rounds=args.rounds, on_round=on_round)
            for name, med in medians.items():
                rows[name].update(GBps=nbytes / med / 1e9, GFLOPs=flops / med / 1e9,
                                  roofline_pct=100 * max(nbytes / (roofline["copy_GBps"] * 1e9),
                                                         flops / (roofline["gemm_GFLOPs"] * 1e9)) / med)
            results += rows.values()
            log(f"[{shape.label()}, N={N}, {direction}] " + ", ".join(
                f"{n} {r['median_ms']:.3g} ms" if r.get("median_ms") else f"{n} {r['status']}"
                for n, r in rows.items()))
    return results
