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
import dataclasses
import datetime
import json
import os
import re
import shlex
import sys

import torch

from ..testing import MODEL_SHAPES, TOLERANCE
from ..upstream import PATCH_SIZE
from .machine import loadavg, machine_info, measure_roofline, versions
from .model import MODELS, OPTIMIZERS, BenchError, resolve_variants, run_model, summary
from .op import (BYTES_CONVENTION, DEFAULTS, DIRECTIONS, DTYPE_BY_NAME, FLOP_CONVENTION, ROOFLINE_CONVENTION,
                 Shape, compile_mode, parse_shape, resolve_backends, run_op_sweep)
from .report import case_label, json_safe, plot, print_table


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


# "float64 1e-10, float32 1e-05 on CPU / 0.002 on GPU, ...": dynamixer_ops.testing.TOLERANCE, for the help.
_TOLERANCES = ", ".join(f"{str(t).replace('torch.', '')} {cpu:g}"
                        + (f" on CPU / {gpu:g} on GPU" if gpu != cpu else "") for t, (cpu, gpu) in TOLERANCE.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamixer-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time the fused dynamic_mix backends against the upstream eager step (or, with --model, the "
                    "whole network), after checking each against the float64 reference.",
        epilog=f"""\
shapes (L, C, S, d), from the upstream model configs:
  {'  '.join(f'{k}={v}' for k, v in MODEL_SHAPES.items())}
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
  check   every backend is first run on the timed inputs and compared with dynamixer_ops.reference.reference_forward
          in float64 (and its autograd gradients for bwd/fwdbwd) by the test suite's rule
          (dynamixer_ops.testing): ||out - ref|| / max(||ref||, floor), the floor a fraction of the output's
          rounding scale where its exact result cancels; above the tolerance it is reported WRONG and not
          timed; an exception is reported as ERROR. Tolerances: {_TOLERANCES}.

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
                        "variants of the network: the rivals 'eager' (the upstream network), 'compile', "
                        "'compile-freezing' (torch.compile of it, with Inductor freezing), 'onnxruntime' (its "
                        "ONNX export) and 'openvino' (openvino.convert_model of it), and ours: a fused backend B "
                        "(e.g. 'cpu') and B+compile, B+compile-freezing, B+optimize (dynamixer_ops.optimize), "
                        "B+aoti (an AOTInductor package), B+openvino (openvino.convert_model of the fused network); "
                        "default there: every rival and B, B+compile, B+optimize, B+openvino of the automatic "
                        "backends (--quick: no compiled variant)")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help="named shapes (s1 s2 m1 m3 l1 l2, or 'all') or custom L,C,S,d (default: all named "
                        "shapes; --quick: s1 s2)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch", type=int, metavar="IMAGES",
                      help="images per call; the model mixes every row (and column) of an image, so one call "
                           "mixes N = IMAGES * L sequences (default: 128 on GPU, 8 on CPU, 2 with --quick). "
                           "With --model: images per forward / training step")
    size.add_argument("--sequences", type=int, metavar="N",
                      help="sequences per call, instead of --batch (e.g. 256 at s1, the CPU acceptance shape)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BY_NAME), metavar="DTYPE",
                   help=f"one of {', '.join(sorted(DTYPE_BY_NAME))} (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--direction", nargs="+", choices=DIRECTIONS, metavar="DIR",
                   help="one or more of fwd, bwd, fwdbwd (default: fwd fwdbwd). With --model: fwd = inference, "
                        "fwdbwd = a training step (forward, cross-entropy, backward, --optimizer step)")
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
                        "dynamixer_ops.models.<model>(backend=...) against dynamixer_ops.upstream.eager_model(V) "
                        "(V: the model's s, m or l) with the same weights")
    p.add_argument("--autocast", choices=sorted(DTYPE_BY_NAME), metavar="DTYPE",
                   help="with --model: run every network's forward under torch.autocast(device, DTYPE), parameters "
                        "and input in --dtype (e.g. --autocast bfloat16: mixed-precision inference and training)")
    p.add_argument("--convert", action="store_true",
                   help="with --model: the fused networks are dynamixer_ops.convert(dynamixer_ops.upstream."
                        "eager_model(V)) (only the DynaMixer layers swapped) instead of dynamixer_ops.models.<model>")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS),
                   help="with --model: the optimizer of the training step (fwdbwd) (default: sgd)")
    p.add_argument("--img-size", type=int, default=224, metavar="PX",
                   help=f"with --model: input resolution; the mixing length is PX/{PATCH_SIZE} in the first stage "
                        "(default 224)")
    p.add_argument("--json", metavar="PATH", help="write machine, versions, settings and every figure as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write a PNG of the speedups over eager (needs matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds: shapes s1 s2 at 2 images, short warm-up and timing, and "
                        "'compile' left out unless named in --backends")
    p.add_argument("--plain", action="store_true", help="plain-text table even when rich is installed")
    p.add_argument("--require", nargs="+", metavar="BACKEND:DIR>=X", default=[],
                   help="acceptance targets checked after the run, e.g. 'cpu:fwd>=1.3 cpu:fwdbwd>=1.2': "
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
            where = r.get("model") or f"{case_label(r).replace(chr(10), ' ')}"
            value = f"{got:.2f}x" if got is not None else r["status"]
            lines.append(f"{'PASS' if passed else 'FAIL'} {backend} {direction} >= {target:g}x eager at {where}: "
                         f"{value}")
    return ok, lines


def finish_args(p: argparse.ArgumentParser, args) -> tuple[torch.device, torch.dtype, list[Shape]]:
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
    defaults = DEFAULTS[device.type]
    dtype = DTYPE_BY_NAME[args.dtype] if args.dtype else defaults["dtype"]
    for name, value in (("--batch", args.batch), ("--sequences", args.sequences), ("--threads", args.threads),
                        ("--rounds", args.rounds)):
        if value is not None and value < 1:
            p.error(f"argument {name}: must be >= 1, got {value}")
    for name, value in (("--warmup", args.warmup), ("--repeat", args.repeat)):
        if value is not None and not value > 0:
            p.error(f"argument {name}: must be > 0 ms, got {value}")
    if args.model and args.sequences is not None:
        p.error("argument --sequences: not allowed with --model (use --batch, in images)")
    if args.img_size < PATCH_SIZE or args.img_size % PATCH_SIZE:
        p.error(f"argument --img-size: must be a positive multiple of the patch size {PATCH_SIZE}, "
                f"got {args.img_size}")
    if args.autocast and not args.model:
        p.error("argument --autocast: only with --model (the op's benchmark takes --dtype)")
    if args.convert and not args.model:
        p.error("argument --convert: only with --model")
    if args.optimizer and not args.model:
        p.error("argument --optimizer: only with --model")
    args.optimizer = args.optimizer or ("sgd" if args.model else None)
    if args.model and args.shapes:
        p.error("argument --shapes: not allowed with --model (the network fixes its shapes)")
    args.direction = list(dict.fromkeys(args.direction or ["fwd", "fwdbwd"]))
    if args.model and "bwd" in args.direction:
        p.error("argument --direction: with --model use fwd (inference) and/or fwdbwd (training step)")
    if args.batch is None and args.sequences is None:
        args.batch = 2 if args.quick else defaults["images"]
    args.warmup = args.warmup or (5 if args.quick else defaults["warmup_ms"])
    args.repeat = args.repeat or (40 if args.quick else defaults["repeat_ms"])
    args.rounds = args.rounds or (2 if args.quick else 5)
    names = args.shapes or (["s1", "s2"] if args.quick else list(MODEL_SHAPES))
    if "all" in names:
        names = list(MODEL_SHAPES) + [n for n in names if n not in MODEL_SHAPES and n != "all"]
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
    device, dtype, shapes = finish_args(p, args)
    requirements = parse_requirements(p, args.require)
    from .. import __version__  # noqa: F401  (imports the package: registers every backend)
    try:
        if args.model:      # the network's variants: rivals and our paths (.model.resolve_variants)
            backends, skipped = resolve_variants(args.backends, device, dtype, args.quick, args.autocast)
        else:
            backends, skipped = resolve_backends(args.backends, device, dtype, args.quick)
    except ValueError as exc:
        p.error(f"argument --backends: {exc}")
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
                     "autocast": args.autocast, "convert": args.convert, "optimizer": args.optimizer,
                     "timer": "triton.testing.do_bench" if device.type == "cuda" else "torch.utils.benchmark.Timer"},
        "conventions": {"flops": FLOP_CONVENTION, "bytes": BYTES_CONVENTION, "roofline": ROOFLINE_CONVENTION},
    }
    where = (report["machine"].get("gpu", {}).get("name") if device.type == "cuda" else
             f"{report['machine']['cpu']} ({' '.join(report['machine']['instruction_sets']) or 'no AVX2'})")
    report["title"] = f"dynamixer-bench on {where}, {dname}, torch {torch.__version__}"
    if args.autocast:
        report["title"] += f", under autocast({args.autocast})"
    if args.convert:
        report["title"] += ", fused = convert(upstream)"
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
            report["results"], report["work"] = run_model(args, device, dtype, backends, skipped, log)
            report["summary"] = summary(report["results"])
        else:
            log(f"dynamixer-bench: measuring the roofline on {device} ...")
            report["roofline"] = measure_roofline(device, dtype, threads, args.quick)
            report["shapes"] = [dataclasses.asdict(s) for s in shapes]
            report["results"] = run_op_sweep(args, device, dtype, shapes, backends, skipped, report["roofline"], log)
            log.done()
    except BenchError as exc:
        print(f"dynamixer-bench: error: {exc}", file=sys.stderr)
        return 1
    report["machine"]["loadavg_at_end"] = loadavg()
    print_table(report, plain=args.plain)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(report), f, indent=1, allow_nan=False)
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
