"""The machine a benchmark ran on: its measured roofline, hardware, load and software versions."""
from __future__ import annotations

import logging
import os
import platform
import subprocess

import torch


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_ghz() -> float | None:
    """The highest clock /proc/cpuinfo reports (MHz -> GHz): the current clock, not a guaranteed maximum."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) / 1e3 if mhz else None
    except (OSError, ValueError):
        return None


def fma_peak(dtype: torch.dtype, threads: int) -> tuple[float | None, str]:
    """(GFLOP/s, how it was computed): threads x clock x FLOPs per cycle and core for ``dtype`` on the widest
    vector unit ATen dispatches to, assuming two FMA pipes per core (the most any x86 core has; a ceiling, not a
    rate). None where the clock or the instruction set is unknown."""
    ghz = _cpu_ghz()
    if ghz is None:
        return None, "clock unknown (no 'cpu MHz' in /proc/cpuinfo)"
    capability = torch.backends.cpu.get_cpu_capability()
    lanes = {"AVX512": 16, "AVX2": 8}.get(capability)      # float32 lanes of one vector
    if lanes is None:
        return None, f"instruction set {capability}: no vector FMA width known"
    flags = _cpu_flags()
    per_cycle = 2 * 2 * lanes                              # 2 pipes x 2 FLOPs per FMA x lanes (float32)
    kind = f"{capability}, float32"
    if dtype == torch.float64:
        per_cycle, kind = per_cycle // 2, f"{capability}, float64"
    elif dtype == torch.bfloat16 and "amx_bf16" in flags or dtype == torch.float16 and "amx_fp16" in flags:
        per_cycle, kind = 2048, "AMX tiles, 1024 FMAs"
    elif dtype == torch.bfloat16 and "avx512_bf16" in flags or dtype == torch.float16 and "avx512fp16" in flags:
        per_cycle, kind = 2 * per_cycle, f"{capability} 16-bit dot products, twice float32"
    cores = min(threads, os.cpu_count() or threads)
    return cores * ghz * per_cycle, (f"{cores} threads x {ghz:.3f} GHz (/proc/cpuinfo) x {per_cycle} FLOP/cycle "
                                     f"({kind}; two FMA pipes per core assumed)")


def gemm_candidates(device: torch.device, dtype: torch.dtype, n: int) -> dict:
    """``{label: call}``: an n x n x n GEMM in ``dtype`` on torch.mm and, on a CPU, on every product the inference
    path can choose (:func:`dynamixer_ops.linear.product_candidates`: oneDNN with its weight prepacked, MKL's packed
    sgemm as Inductor's freezing runs float32 Linears); fresh random operands."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    name = str(dtype).replace("torch.", "")
    gemms = {f"{n}x{n}x{n} {name} torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu":
        from ..linear import product_candidates
        layer = torch.nn.Linear(n, n, bias=False)
        with torch.no_grad():
            layer.weight.copy_(b)
        for kind in product_candidates(dtype):
            if kind != "aten":      # torch's own product is torch.mm's
                gemms[f"{n}x{n}x{n} {name} {PRODUCT_LABELS[kind]}"] = _packed_gemm(layer, a, dtype, kind)
    return gemms


PRODUCT_LABELS = {"onednn": "oneDNN prepacked (torch.ops.mkldnn._linear_pointwise)",
                  "mkl": "MKL packed sgemm (torch.ops.mkl._mkl_linear)"}


def _packed_gemm(layer, a: torch.Tensor, dtype: torch.dtype, kind: str):
    from ..linear import packed_linear

    def gemm():
        with torch.no_grad():
            return packed_linear(layer, a, dtype, product=kind)
    gemm()      # packs the weight once, outside the timing
    return gemm


def instruction_sets() -> list[str]:
    """The vector instruction sets of this CPU that decide which kernels run (ours, oneDNN's, MKL's)."""
    flags = _cpu_flags()
    wanted = (("avx2", "avx2"), ("fma", "fma"), ("avx512f", "avx512f"), ("avx512_bf16", "avx512_bf16"),
              ("avx_vnni", "avx_vnni"), ("amx_bf16", "amx"), ("avx_ne_convert", "avx_ne_convert"))
    return [name for flag, name in wanted if flag in flags]


def measure_roofline(device: torch.device, dtype: torch.dtype, threads: int, quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and the machine's best GEMM rate in ``dtype``, measured
    here, now: the fastest of torch.mm (MKL on a CPU, cuBLAS on a GPU) and, on a CPU, the prepacked products
    (oneDNN's, MKL's packed sgemm), or the FMA
    peak (:func:`fma_peak`) where that is higher, so that no kernel can pass 100% of it. Every candidate is in
    the result (``gemm_candidates``), the one used in ``gemm``.

    Peaks: the fastest sample counts (a ceiling, not a typical rate)."""
    copy_mb = 64 if quick else 256
    n = 1024 if quick else (2048 if device.type == "cpu" else 8192)
    src = torch.empty(copy_mb * 2 ** 20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    gemms = gemm_candidates(device, dtype, n)
    copy = lambda: dst.copy_(src)         # noqa: E731
    if device.type == "cuda":
        from triton.testing import do_bench

        def fastest(f):
            return do_bench(f, warmup=25, rep=100, return_mode="min") / 1e3
    else:
        # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on a machine without a GPU
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils import benchmark
        budget = 0.2 if quick else 1.0

        def fastest(f):
            timer = benchmark.Timer("f()", globals={"f": f}, num_threads=threads)
            return min(timer.blocked_autorange(min_run_time=budget).times)
    copy_s = fastest(copy)
    candidates = {label: 2 * n ** 3 / fastest(gemm) / 1e9 for label, gemm in gemms.items()}
    if device.type == "cpu":
        peak, how = fma_peak(dtype, threads)
        if peak is not None:
            candidates[f"FMA peak: {how}"] = peak
    best = max(candidates, key=candidates.get)
    return {"copy_GBps": 2 * src.numel() * 4 / copy_s / 1e9, "copy_MiB": copy_mb,
            "gemm_GFLOPs": candidates[best], "gemm": best,
            "gemm_candidates": {label: round(v, 1) for label, v in candidates.items()}}


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


def loadavg():
    """Other work on the machine (1, 5, 15 min load averages): CPU timings are only as good as this is low."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device, threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "instruction_sets": instruction_sets(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "loadavg_at_start": loadavg(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRITON_INTERPRET",
                                               "CUDA_VISIBLE_DEVICES") if k in os.environ}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_GiB":
                       round(p.total_memory / 2 ** 30, 1), "sm_count": p.multi_processor_count}
    return info


def versions() -> dict:
    from .. import __version__
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "dynamixer_ops": __version__,
           "git": _git_state()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out
