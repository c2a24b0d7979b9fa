"""Builds dynamixer_ops/_C*.so, a torch ops library without Python symbols (metadata and packages are in
pyproject.toml): the C++ CPU kernels always, the CUDA kernels where a CUDA toolkit and a CUDA build of torch are
present. Install with ``pip install --no-build-isolation -e .`` (build isolation would fetch a second, unpinned
torch to build against).

Environment knobs:
  DYNAMIXER_OPS_BUILD_CUDA=0|1  force the CUDA kernels off / on (default: on when possible)
  TORCH_CUDA_ARCH_LIST          GPU architectures (default: the visible GPU's, else "8.0;9.0")
  CUDA_HOME                     toolkit root (default: the TOP that `nvcc --dryrun` reports)
  MAX_JOBS                      parallel compile jobs (default: 2, so a 2-core machine does not run out of memory)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root() -> str | None:
    """The CUDA toolkit root. The `nvcc` on PATH may be a wrapper script, so ask nvcc where its TOP is."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _cuda_plan() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        sys.exit("dynamixer_ops: torch must be installed before building (the version README.md's commands pin), "
                 "and the build must see it: pip install --no-build-isolation -e .")
    wanted = os.environ.get("DYNAMIXER_OPS_BUILD_CUDA", "auto").lower()
    if wanted in ("0", "false", "no", "off"):
        return False, "DYNAMIXER_OPS_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    home = _toolkit_root()
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return False, "no CUDA toolkit found (no nvcc on PATH and no CUDA_HOME)"
    os.environ["CUDA_HOME"] = home   # read by torch.utils.cpp_extension at import
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return True, f"toolkit {home}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')}"


def _extra_cuda_includes() -> list[str]:
    """Headers some toolkits lack (e.g. cusparse.h) ship in the nvidia/cu* wheels that torch depends on."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return dirs


def _extensions():
    build_cuda, why = _cuda_plan()      # first: it sets CUDA_HOME, which cpp_extension reads at import
    from torch.utils import cpp_extension
    os.environ.setdefault("MAX_JOBS", "2")
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # The library uses no Python (a C++ AOTInductor runner loads it too): never record libtorch_python, which
        # cpp_extension adds to every extension, as a dependency (some toolchains do not default to --as-needed).
        link_flags.append("-Wl,--as-needed")
        # at::parallel_for is a header template: without -fopenmp here its `omp parallel` is compiled out and the
        # CPU kernels run on one thread whatever torch.set_num_threads says. The libgomp this links is the one
        # torch has already loaded (same soname), so both share one thread pool.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        # *.cu: the kernels (nvcc, CUDA headers only); *.cpp: their host side (checks, ATen), host compiler.
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                                                             + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]
        include_dirs += _extra_cuda_includes()
        print(f"dynamixer_ops: building the CPU and CUDA kernels ({why})", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            "dynamixer_ops._C", sources, include_dirs=include_dirs, py_limited_api=False,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link_flags)
    else:
        print(f"dynamixer_ops: building the CPU kernels only; CUDA kernels skipped: {why}", file=sys.stderr)
        ext = cpp_extension.CppExtension("dynamixer_ops._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()

# Metadata, packages and the console script are in pyproject.toml; this file only builds the extension.
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
