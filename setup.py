"""Builds the native libraries (metadata and packages are in pyproject.toml), torch ops libraries without Python
symbols written against libtorch's stable C ABI: dynamixer_ops/_C.abi3.so (the op schemas and the C++ CPU kernels,
always) and dynamixer_ops/_C_cuda.abi3.so (the CUDA kernels, where a CUDA toolkit and a CUDA build of torch are
present). They import no libtorch C++ symbol (TORCH_TARGET_VERSION = torch 2.11) and no Python symbol (the wheel is
tagged cp310-abi3): one build runs on every torch >= 2.11 and every Python >= 3.10. Install with
``pip install .`` or, for development, ``pip install --no-build-isolation -e .``.

Environment knobs (DYNAMIXER_OPS_BUILD_CUDA and TORCH_CUDA_ARCH_LIST are read by dynamixer_ops/build_config.py):
  DYNAMIXER_OPS_BUILD_CUDA=0|1  0: CPU kernels only; 1: the CUDA kernels too, or the build fails with the reason
                                (default auto: the CUDA kernels where a CUDA torch and a CUDA toolkit are present)
  TORCH_CUDA_ARCH_LIST          GPU architectures (default: the visible GPU's, else build_config.PORTABLE_CUDA_ARCHS;
                                "portable": those)
  CUDA_HOME                     toolkit root (default: the TOP that `nvcc --dryrun` reports)
  MAX_JOBS                      parallel compile jobs (default: 2, so a 2-core machine does not run out of memory)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_config():
    """dynamixer_ops/build_config.py, loaded by its path: importing the package would need the libraries built."""
    spec = importlib.util.spec_from_file_location("dynamixer_ops_build_config",
                                                  os.path.join(ROOT, "dynamixer_ops", "build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        sys.exit("dynamixer_ops: the build needs torch >= 2.11 (its stable-ABI headers): `pip install .` fetches it "
                 "into the build environment; with --no-build-isolation install torch first")
    config = _build_config()
    try:
        switch = config.cuda_build_switch()
    except ValueError as exc:
        sys.exit(f"dynamixer_ops: {exc}")
    if switch == "off":
        return False, "DYNAMIXER_OPS_BUILD_CUDA=0"
    why_not = None
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU-only build"
    else:
        home = _toolkit_root()
        if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
            why_not = "no CUDA toolkit found (no nvcc on PATH and no CUDA_HOME)"
    if why_not is not None:
        if switch == "on":
            sys.exit(f"dynamixer_ops: DYNAMIXER_OPS_BUILD_CUDA=1, but the CUDA kernels cannot be built: {why_not}")
        return False, why_not
    os.environ["CUDA_HOME"] = home   # read by torch.utils.cpp_extension at import
    archs = config.cuda_arch_list(gpu_visible=torch.cuda.is_available())
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs   # read by torch.utils.cpp_extension when it compiles
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


# The oldest torch whose stable ABI the libraries target (torch/csrc/stable/version.h): the libraries load on it and
# on every later torch. pyproject.toml's torch floor says the same.
TORCH_TARGET_VERSION = (2, 11)
STABLE_ABI_MACROS = [
    ("TORCH_TARGET_VERSION", f"0x{TORCH_TARGET_VERSION[0]:02x}{TORCH_TARGET_VERSION[1]:02x}000000000000"),
]


def _extensions():
    build_cuda, why = _cuda_plan()      # first: it sets CUDA_HOME, which cpp_extension reads at import
    from torch.utils import cpp_extension
    os.environ.setdefault("MAX_JOBS", "2")
    macros = [f"-D{name}={value}" for name, value in STABLE_ABI_MACROS]
    cxx_flags = ["-O3", "-fvisibility=hidden", *macros]
    link_flags = []
    if sys.platform.startswith("linux"):
        # The libraries use no Python (a C++ AOTInductor runner loads them too): never record libtorch_python,
        # which cpp_extension may add, as a dependency (some toolchains do not default to --as-needed).
        link_flags.append("-Wl,--as-needed")

    def sources(*patterns):
        return sorted(os.path.relpath(p, ROOT) for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern)))

    include_dirs = [os.path.join(ROOT, "csrc")]
    # py_limited_api: cpp_extension defines Py_LIMITED_API (3.10) and links no libtorch_python.
    # _C: the schemas and the CPU kernels (their threads are torch's own pool: torch::stable::parallel_for).
    exts = [cpp_extension.CppExtension("dynamixer_ops._C", sources("csrc/*.cpp", "csrc/cpu/*.cpp"),
                                       include_dirs=include_dirs, py_limited_api=True,
                                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]
    if build_cuda:
        # _C_cuda: *.cu the kernels (nvcc, CUDA headers only), *.cpp their host side (host compiler). A library of
        # its own, so that a torch without CUDA, or a CUDA library that cannot load, leaves _C working.
        print(f"dynamixer_ops: building the CPU and CUDA kernels ({why})", file=sys.stderr)
        exts.append(cpp_extension.CUDAExtension(
            "dynamixer_ops._C_cuda", sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp"),
            include_dirs=include_dirs + _extra_cuda_includes(), py_limited_api=True,
            # USE_CUDA: declares the CUDA part of the stable shim (the current stream, STD_CUDA_CHECK's helpers)
            extra_compile_args={"cxx": [*cxx_flags, "-DUSE_CUDA"],
                                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *macros, "-DUSE_CUDA"]},
            extra_link_args=link_flags))
    else:
        print(f"dynamixer_ops: building the CPU kernels only; CUDA kernels skipped: {why}", file=sys.stderr)
    return exts, cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()

# Metadata, packages and the console script are in pyproject.toml; this file only builds the extensions. The wheel
# is tagged cp310-abi3: the libraries use no Python C API at all.
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext},
      options={"bdist_wheel": {"py_limited_api": "cp310"}})
