"""The network benchmark: every way to run a DynaMixer network on one machine, side by side.

Rivals (the upstream network, :mod:`dynamixer_ops.upstream`, run as a user would without this package):

* ``eager``: the upstream network as it is (the baseline of every ratio);
* ``compile``: ``torch.compile`` of it; ``compile-freezing``: the same with Inductor's ``freezing`` (weights
  folded into the graph and prepacked; inference only);
* ``onnxruntime``: ONNX Runtime on the upstream network's ONNX export (``torch.onnx.export``), with the run's
  thread count (inference only, float32 only);
* ``openvino``: OpenVINO on the upstream network converted by ``openvino.convert_model``, compiled for the CPU in
  float32 with the run's thread count (inference only).

Ours (the fused network: :mod:`dynamixer_ops.models`, or ``convert(upstream)`` with ``--convert``), per fused
backend ``B`` (e.g. ``cpu``): ``B`` (eager), ``B+compile`` (``torch.compile`` of it), ``B+optimize``
(:func:`dynamixer_ops.optimize`, the CPU inference path; inference only), ``B+openvino`` (the fused network
converted by ``openvino.convert_model``, which traces the op as its decomposition: the ``openvino`` rival's graph, run
the same way; inference only), and on request only (``--backends``: minutes of compilation each)
``B+compile-freezing`` (with Inductor freezing; inference only) and ``B+aoti`` (an AOTInductor package of
``torch.export`` of it, loaded back; inference only).

Every variant is first checked against the float64 upstream network on the very inputs that are then timed (the
output under ``no_grad`` for inference; the output and the parameter gradients of a training-mode forward for the
training step). Then the variants of one mode are timed in interleaved rounds in one process
(:func:`.timing.time_side_by_side`). Work: the FLOPs of the upstream network (``torch.utils.flop_counter``: the
products of the Linears, convolutions and the mixing's matmuls, per image, measured once), so GFLOP/s is the same
multiple of 1/time for every variant; % of the GEMM peak: that rate over the best rate of a square GEMM in the
run's compute dtype (torch.mm and oneDNN), timed in the same interleaved rounds (:func:`gemm_runs`).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
import tempfile
import time

import torch

from .. import backends as registry
from ..nn import convert
from ..testing import MODEL_TOLERANCE, relative_error
from .machine import gemm_candidates
from .op import DTYPE_BY_NAME, compile_mode
from .timing import first_line, time_side_by_side

MODELS = ("dynamixer_s", "dynamixer_m", "dynamixer_l")
# The optimizers --optimizer accepts for the training step.
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}

# The upstream network, run as a user would without this package. The first is the baseline of every ratio.
RIVALS = ("eager", "compile", "compile-freezing", "onnxruntime", "openvino")
# What each fused backend B runs as: "B" (eager) and "B+<path>".
PATHS = ("compile", "compile-freezing", "optimize", "aoti", "openvino")
# Built on request only (--backends), not by default: each costs minutes of compilation at 224 px.
ON_REQUEST = ("compile-freezing", "aoti")
INFERENCE_ONLY = {"compile-freezing": "Inductor freezing is an inference transform",
                  "onnxruntime": "inference only", "openvino": "inference only",
                  "optimize": "an inference path (training runs the eager row)",
                  "aoti": "an inference package"}


class BenchError(Exception):
    """A problem the user can fix (missing module, unusable request); reported without a traceback."""


def _load_model_modules():
    try:
        from .. import models, upstream
    except ImportError as exc:
        raise BenchError(f"--model needs dynamixer_ops.models and dynamixer_ops.upstream, which failed to import "
                         f"({exc})") from None
    return models, upstream


def _split(name: str) -> tuple[str, str | None]:
    """``"cpu+optimize"`` -> ``("cpu", "optimize")``; a rival -> ``(name, None)``."""
    backend, _, path = name.partition("+")
    return backend, (path or None)


def resolve_variants(requested: list[str] | None, device: torch.device, dtype: torch.dtype, quick: bool,
                     autocast: str | None) -> tuple[list[str], dict[str, str]]:
    """(variants to run, {variant: why it is skipped}) for ``--model``. Unknown names raise ValueError.

    Default: every rival and, per fused backend that is chosen automatically here (not ``reference``), eager,
    ``+compile`` and ``+optimize`` (CPU). ``--quick``: no compiled variant (compiling a network takes minutes)."""
    registered = registry.registered_backends()
    fused = [b.name for b in sorted(registered.values(), key=lambda b: b.priority.get(device.type, 100))
             if b.name != "reference" and b.why_not(device.type, dtype) is None and b.auto(device.type)]
    if requested is None or requested == ["all"]:
        names = [r for r in RIVALS if not (quick and "compile" in r)]
        for b in fused:
            names += [b] + [f"{b}+{p}" for p in PATHS
                            if not (p in ON_REQUEST or (quick and p == "compile")
                                    or (p in CPU_ONLY and device.type != "cpu"))]
    else:
        names = list(dict.fromkeys(requested))
    known_backends = list(registered) + [n for n in registry.load_errors() if n not in registered]
    unknown = [n for n in names if n not in RIVALS and not (_split(n)[0] in known_backends
                                                            and _split(n)[1] in (None, *PATHS))]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(RIVALS)}, a backend "
                         f"({', '.join(known_backends)}) or backend+path ({', '.join(PATHS)})")
    skipped = {}
    for name in names:
        backend, path = _split(name)
        runtime = name if name in RUNTIMES else path if path in RUNTIMES else None
        if runtime:
            why = RUNTIMES[runtime].missing()
            if why is None and (dtype != torch.float32 or autocast):
                why = "run in float32 only here (the network exported in float32)"
            if why is None and device.type != "cpu":
                why = "run on the CPU only here"
            if why:
                skipped[name] = why
                continue
        if name in RIVALS:
            continue
        if path == "optimize" and device.type != "cpu":
            skipped[name] = "dynamixer_ops.optimize is a CPU inference path"
            continue
        try:
            registry.resolve_backend(backend, device.type, dtype)
        except Exception as exc:  # BackendUnavailableError, or a load error recorded by the registry
            skipped[name] = str(exc)
    return names, skipped


class _Runtime:
    """A network handed to another runtime, called like an eval-mode module: ``net(x) -> torch.Tensor``."""
    NEEDS: tuple[str, ...] = ()      # the Python packages it imports
    training = False

    @classmethod
    def missing(cls) -> str | None:
        try:
            for name in cls.NEEDS:
                importlib.import_module(name)
        except ImportError as exc:
            return f"needs {' and '.join(cls.NEEDS)} ({exc})"
        return None

    def eval(self):
        return self


class _OnnxRuntime(_Runtime):
    """The upstream network exported to ONNX, run by an ONNX Runtime session."""
    NEEDS = ("onnx", "onnxruntime")

    def __init__(self, net, x: torch.Tensor, threads: int):
        import onnxruntime as ort
        self.dir = tempfile.TemporaryDirectory(prefix="dynamixer-bench-onnx-")
        path = os.path.join(self.dir.name, "model.onnx")
        with torch.no_grad():
            program = torch.onnx.export(net.eval(), (x,), dynamo=True, verbose=False)
        program.save(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


class _OpenVino(_Runtime):
    """A network converted by ``openvino.convert_model`` (traced by OpenVINO; the fused op as its decomposition) and
    compiled for the CPU in float32 (the CPU plugin's default is bfloat16 where the CPU has it) with the run's thread
    count."""
    NEEDS = ("openvino",)

    def __init__(self, net, x: torch.Tensor, threads: int):
        import openvino as ov
        with torch.no_grad():
            model = ov.convert_model(net.eval(), example_input=x)
        self.compiled = ov.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                        "INFERENCE_NUM_THREADS": threads})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(x.numpy())[0])


# The runtimes a network is handed to (a rival, and for openvino also a path of ours): float32 on the CPU only.
RUNTIMES = {"onnxruntime": _OnnxRuntime, "openvino": _OpenVino}
# Paths that run on the CPU only (the runtimes are checked with RUNTIMES).
CPU_ONLY = ("optimize", "openvino")


class _Aoti:
    """An AOTInductor package of ``torch.export`` of the network, loaded back: ``net(x)``."""

    def __init__(self, net, x: torch.Tensor):
        self.dir = tempfile.TemporaryDirectory(prefix="dynamixer-bench-aoti-")
        with torch.no_grad():
            program = torch.export.export(net.eval(), (x,))
            path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(self.dir.name,
                                                                                                  "net.pt2"))
        self.runner = torch._inductor.aoti_load_package(path)
        self.training = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)

    def eval(self):
        return self


def count_flops(net, x: torch.Tensor, train: bool) -> float:
    """FLOPs of one forward (or forward + backward) of ``net`` on ``x``, by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            net(x).float().square().mean().backward()
        else:
            with torch.no_grad():
                net(x)
    if train:
        net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def gemm_runs(device: torch.device, dtype: torch.dtype, quick: bool) -> dict[str, tuple]:
    """``{label: (call, FLOPs per call)}``: square GEMMs in ``dtype`` on torch.mm and (on a CPU) oneDNN, timed in
    the same interleaved rounds as the networks so that the peak sees the load they see."""
    n = 1024 if quick else 2048
    return {label: (call, 2 * n ** 3) for label, call in gemm_candidates(device, dtype, n).items()}


def run_model(args, device, dtype, variants, skipped, log) -> tuple[list[dict], dict]:
    """The rows (one per variant and mode) and the run's work figures (``flops_per_image``, ``gemm_peak``)."""
    models, upstream = _load_model_modules()
    name = args.model
    variant = name.removeprefix("dynamixer_")
    torch.manual_seed(0)
    kw = {"img_size": args.img_size}
    base = upstream.eager_model(variant, **kw).eval()
    state = base.state_dict()
    size = (3, args.img_size, args.img_size)
    B = args.batch
    x = torch.randn(B, *size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    n_check = min(B, 2 if device.type == "cpu" else 8)
    # float64 upstream network: the truth for outputs and parameter gradients on the first n_check images
    ref_net = copy.deepcopy(base).double().eval().to(device)       # on the device x is on
    x64 = x[:n_check].double()
    ref_out = ref_net(x64)
    names, params = zip(*ref_net.named_parameters())
    ref_grads = dict(zip(names, torch.autograd.grad(ref_out.square().mean(), params)))
    ref_out = ref_out.detach()
    del ref_net
    work = {"flops_per_image": {"inference": count_flops(base, x[:1].float().to(device), False),
                                "train_step": count_flops(base.train(), x[:1].float().to(device), True)}}
    base.eval()

    # --autocast: parameters and input stay in --dtype, the forward runs under torch.autocast (as users train)
    amp_dtype = DTYPE_BY_NAME[args.autocast] if args.autocast else None
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    threads = torch.get_num_threads()
    compute = amp_dtype or dtype
    gemms = gemm_runs(device, compute, args.quick)
    work["gemm_peak"] = {}
    modes = {"fwd": "inference", "fwdbwd": "train_step"}
    wanted = [modes[d] for d in args.direction]

    def build(vname):
        backend, path = _split(vname)
        if vname in RIVALS:
            net = copy.deepcopy(base)
        elif args.convert:
            net = convert(copy.deepcopy(base), backend=backend)
        else:
            with torch.device("meta"):          # no initialisation: the weights are loaded next
                net = getattr(models, name)(backend=backend, **kw)
            net = net.to_empty(device="cpu")
            net.load_state_dict(state)
        net = net.to(device=device, dtype=dtype).eval()
        if vname in RUNTIMES or path in RUNTIMES:
            return RUNTIMES[path or vname](net, x, threads)
        if path == "optimize":
            from ..inference import optimize
            return optimize(net)
        if path == "aoti":
            return _Aoti(net, x)
        if vname == "compile-freezing" or path == "compile-freezing":
            # options, not the global config: a backend of its own, so dynamo never hands this variant the graph
            # it compiled for "compile" (same forward code) or the reverse
            return torch.compile(net, options={"freezing": True})
        if vname == "compile" or path == "compile":
            return torch.compile(net, mode=compile_mode(device, args.compile_mode))
        return net

    nets, rows = {}, {}
    for vname in variants:
        for mode in wanted:
            rows[vname, mode] = {"model": name, "backend": vname, "images": B,
                                 "dtype": str(dtype).replace("torch.", ""), "autocast": args.autocast,
                                 "device": str(device), "mode": mode, "status": "ok", "message": None}
        if vname in skipped:
            for mode in wanted:
                rows[vname, mode].update(status="SKIPPED", message=skipped[vname])
            continue
        try:
            start = time.perf_counter()
            nets[vname] = build(vname)
            if vname in RUNTIMES or _split(vname)[1] in ("aoti", *RUNTIMES):
                log(f"dynamixer-bench: built {vname} in {time.perf_counter() - start:.0f} s")
        except Exception as exc:
            for mode in wanted:
                rows[vname, mode].update(status="ERROR", message=first_line(exc))
    for (vname, mode), row in rows.items():
        why = INFERENCE_ONLY.get(vname) or INFERENCE_ONLY.get(_split(vname)[1] or "")
        if mode == "train_step" and why and row["status"] == "ok":
            row.update(status="SKIPPED", message=why)

    # correctness against the float64 upstream network, on the timed input (compiled variants see one shape)
    errs = {}
    named_ref = list(ref_grads)
    for (vname, mode), row in rows.items():
        net = nets.get(vname)
        if net is None or row["status"] != "ok":
            continue
        start = time.perf_counter()
        try:
            if mode == "inference":
                with torch.no_grad(), amp():
                    out = net.eval()(x)[:n_check]
                errs[vname, mode] = relative_error(out, ref_out)
            else:
                net.train()
                with amp():
                    out = net(x)[:n_check]
                named = dict(getattr(net, "_orig_mod", net).named_parameters())
                grads = torch.autograd.grad(out.double().square().mean(),
                                            [named[n] for n in named_ref])
                g = torch.cat([t.double().flatten() for t in grads])
                r = torch.cat([t.flatten() for t in ref_grads.values()])
                errs[vname, mode] = max(relative_error(out, ref_out), relative_error(g, r))
        except Exception as exc:
            row.update(status="ERROR", message=first_line(exc))
        took = time.perf_counter() - start
        if took > 20:
            log(f"dynamixer-bench: {vname} ({mode}): first call (compilation) took {took:.0f} s")
    own = [e for (v, _), e in errs.items() if v == "eager" and math.isfinite(e)]
    tol = max(MODEL_TOLERANCE[amp_dtype or dtype], 2 * max(own) if own else 0)
    for key, err in errs.items():
        rows[key].update(error=err if math.isfinite(err) else None, tolerance=tol)
        if not err <= tol:
            rows[key].update(status="WRONG", message=f"relative error {err:.3g} > tolerance {tol:.3g}")

    out_rows = []
    for mode in wanted:
        mode_rows = {v: rows[v, mode] for v in variants}
        runs = {}
        for vname, row in mode_rows.items():
            net = nets.get(vname)
            if row["status"] != "ok":
                continue
            if mode == "inference":
                net.eval()

                def run(net=net):
                    with torch.no_grad(), amp():
                        return net(x)
            else:
                net.train()
                opt = OPTIMIZERS[args.optimizer](net.parameters(), lr=1e-6)
                labels = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(2)).to(device)

                def run(net=net, opt=opt, labels=labels):
                    opt.zero_grad(set_to_none=True)
                    with amp():
                        loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
                    loss.backward()
                    opt.step()
            runs[vname] = run
        gemm_rows = {label: {"status": "ok"} for label in gemms}
        runs.update({label: call for label, (call, _) in gemms.items()})
        # one block per sample: a network call is long enough to time alone
        medians = time_side_by_side(runs, {**mode_rows, **gemm_rows}, device, warmup_ms=args.warmup,
                                    repeat_ms=args.repeat, rounds=args.rounds, blocks=1)
        rates = {label: gemms[label][1] / medians[label] / 1e9 for label in gemms if label in medians}
        if rates:
            best = max(rates, key=rates.get)
            work["gemm_peak"][mode] = {"GFLOPs": rates[best], "gemm": best,
                                       "dtype": str(compute).replace("torch.", "")}
        flops = work["flops_per_image"][mode]
        for vname, med in medians.items():
            if vname in gemms:
                continue
            r = mode_rows[vname]
            r["images_per_s"] = B / med
            r["GFLOPs"] = flops * B / med / 1e9
            if rates:
                r["gemm_peak_pct"] = 100 * r["GFLOPs"] / rates[best]
        add_rival_ratios(mode_rows)
        out_rows += mode_rows.values()
        log(f"[{name}, {B} images, {mode}] " + ", ".join(
            f"{n} {r['images_per_s']:.3g} img/s" if r.get("images_per_s") else f"{n} {r['status']}"
            for n, r in mode_rows.items()))
    return out_rows, work


def add_rival_ratios(rows: dict[str, dict]) -> None:
    """``best_rival`` (the fastest timed rival of these rows) and, on every row, ``speedup_vs_best_rival``."""
    timed = {n: r["median_ms"] for n, r in rows.items() if n in RIVALS and r.get("median_ms")}
    best = min(timed, key=timed.get) if timed else None
    for r in rows.values():
        r["best_rival"] = best
        t = r.get("median_ms")
        r["speedup_vs_best_rival"] = timed[best] / t if (best and t) else None


def summary(results: list[dict]) -> list[str]:
    """One line per mode: the best rival, and the best of ours against it and against eager."""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        rows = [r for r in results if r["mode"] == mode and r.get("median_ms")]
        rivals = [r for r in rows if r["backend"] in RIVALS]
        ours = [r for r in rows if r["backend"] not in RIVALS]
        if not rivals or not ours:
            continue
        best_rival = min(rivals, key=lambda r: r["median_ms"])
        best = min(ours, key=lambda r: r["median_ms"])
        lines.append(f"{mode}: best rival {best_rival['backend']} ({_vs_eager(best_rival)}); "
                     f"best of ours {best['backend']}: {best['speedup_vs_best_rival']:.2f}x the best rival, "
                     f"{_vs_eager(best)}")
    return lines


def _vs_eager(row: dict) -> str:
    ratio = row.get("speedup_vs_eager")
    return f"{ratio:.2f}x eager" if ratio else "eager not timed"
