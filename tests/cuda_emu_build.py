"""Builds the CPU emulation of the CUDA kernels (tools/cuda_emu) for the tests that use it."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from jit_build import load_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_header_dirs():
    """Include dirs with the CUDA headers the emulation needs (the nvidia wheels alone lack crt/)."""
    from torch.utils import cpp_extension
    roots = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    dirs = [os.path.join(r, "include") for r in roots if r]
    try:
        import nvidia
        for base in getattr(nvidia, "__path__", []):
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    except ImportError:
        pass
    return [d for d in dirs if all(os.path.exists(os.path.join(d, f)) for f in ("cuda_fp16.h", "crt/host_defines.h"))]


def load_cuda_emulator():
    """torch.ops.dynamixer_cuda_emu, built on first use (about a minute on two cores, cached afterwards); skips
    the calling test where DYNAMIXER_OPS_TEST_CUDA_EMU=0 or no CUDA headers are found. The one place the
    emulator is built: DYNAMIXER_OPS_TEST_CUDA_EMU=asan builds it with AddressSanitizer and UBSan (run by
    .ci/sanitize, which says how to load it)."""
    mode = os.environ.get("DYNAMIXER_OPS_TEST_CUDA_EMU", "1")
    if mode in ("", "0"):
        pytest.skip("DYNAMIXER_OPS_TEST_CUDA_EMU=0: the CPU emulation of the CUDA kernels is not built")
    headers = cuda_header_dirs()
    if not headers:
        pytest.skip("no CUDA toolkit headers found (cuda_fp16.h and crt/host_defines.h)")
    asan = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"] if mode == "asan" else []
    # In this checkout's build/jit/, per torch version, under a lock that a dead build cannot leave behind.
    load_extension(name="dynamixer_cuda_emu" + ("_asan" if asan else ""),
                   sources=[os.path.join(ROOT, "tools", "cuda_emu", "emu_ops.cpp")],
                   extra_include_paths=[os.path.join(ROOT, "csrc"), headers[0]],
                   extra_cflags=["-std=c++20", "-O1", *asan], extra_ldflags=asan,
                   is_python_module=False, verbose=False)
    return torch.ops.dynamixer_cuda_emu
