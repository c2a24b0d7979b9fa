"""The machine a benchmark ran on: its measured roofline, hardware, load and software versions."""
from __future__ import annotations

import logging
import os
import platform
import subprocess

import torch


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


def loadavg():
    """Other work on the machine (1, 5, 15 min load averages): CPU timings are only as good as this is low."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device, threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
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
