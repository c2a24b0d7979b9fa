"""Builds the CPU emulation of the CUDA kernels (tools/cuda_emu) for the tests that use it."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from jit_build import build_directory, load_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The sanitized builds' flags (.ci/sanitize builds the CPU kernels with the same): AddressSanitizer + UBSan, every
# report fatal, line tables (-g1: enough for a report's stack to name file and line, cheaper to build than -g).
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer", "-g1"]
# ... and gcc's line and function coverage of what the sanitized run executed (tools/native_coverage.py reads it).
# Without -fno-early-inlining gcc folds small functions into their callers before instrumenting them, and they are
# missing from the report.
COVERAGE_FLAGS = ["--coverage", "-fno-early-inlining"]


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


EMULATOR_NAME = "dynamixer_cuda_emu"


def sanitized_build_directory():
    """Where DYNAMIXER_OPS_TEST_CUDA_EMU=asan builds the emulator (its objects' coverage data lands there)."""
    return build_directory(EMULATOR_NAME + "_asan")


def load_cuda_emulator():
    """torch.ops.dynamixer_cuda_emu, built on first use (about a minute on two cores, cached afterwards); skips
    the calling test where DYNAMIXER_OPS_TEST_CUDA_EMU=0 or no CUDA headers are found. The one place the
    emulator is built: DYNAMIXER_OPS_TEST_CUDA_EMU=asan builds it with AddressSanitizer, UBSan and coverage
    (run by .ci/sanitize, which says how to load it; its build folder: sanitized_build_directory())."""
    mode = os.environ.get("DYNAMIXER_OPS_TEST_CUDA_EMU", "1")
    if mode in ("", "0"):
        pytest.skip("DYNAMIXER_OPS_TEST_CUDA_EMU=0: the CPU emulation of the CUDA kernels is not built")
    headers = cuda_header_dirs()
    if not headers:
        pytest.skip("no CUDA toolkit headers found (cuda_fp16.h and crt/host_defines.h)")
    sanitized = mode == "asan"
    # In this checkout's build/jit/, per torch version, under a lock that a dead build cannot leave behind.
    load_extension(name=EMULATOR_NAME + ("_asan" if sanitized else ""),
                   sources=[os.path.join(ROOT, "tools", "cuda_emu", "emu_ops.cpp")],
                   extra_include_paths=[os.path.join(ROOT, "csrc"), headers[0]],
                   extra_cflags=["-std=c++20", "-O1", *((*SANITIZE_FLAGS, *COVERAGE_FLAGS) if sanitized else ())],
                   extra_ldflags=[*SANITIZE_FLAGS, "--coverage"] if sanitized else [],
                   is_python_module=False, verbose=False)
    return torch.ops.dynamixer_cuda_emu
