"""Loads the native libraries (once, for every module that needs them).

* ``dynamixer_ops/_C*.so``: the ops' schemas, their Python-free kernels and the C++ CPU kernels;
* ``dynamixer_ops/_C_cuda*.so``: the CUDA kernels (built where a CUDA toolkit was present), loaded after ``_C``
  where torch has CUDA. When it cannot load, one line says why (:data:`CUDA_LOAD_ERROR`) and ``_C`` still works.

Both are plain torch ops libraries, not Python extension modules: they define no Python API and use no Python
symbols, so a C++ program can load them too (see :func:`dynamixer_ops.deploy.native_library_path`). They are built
against libtorch's stable C ABI: one build loads on every torch from 2.11 on. Loading ``_C`` registers
``torch.ops.dynamixer_ops`` (the public op's schema and its Python-free kernels) and ``torch.ops.dynamixer_ops_C``
(the native ops, with their CPU kernels); ``_C_cuda`` adds the CUDA kernels of ``torch.ops.dynamixer_ops_C``.
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

__all__ = ["LIBRARY_PATH", "LOAD_ERROR", "CUDA_LIBRARY_PATH", "CUDA_LOAD_ERROR"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_BUILD = "`pip install .` (or `pip install --no-build-isolation -e .` in a checkout)"


def _find(stem: str) -> tuple[str | None, str | None]:
    found = sorted(glob.glob(os.path.join(_HERE, f"{stem}.*so")) + glob.glob(os.path.join(_HERE, f"{stem}.*pyd")))
    if len(found) > 1:   # e.g. an old _C.cpython-*.so next to a new _C.abi3.so: loading both would clash
        names = [os.path.basename(p) for p in found]
        return None, f"more than one {stem} library in {_HERE}: {names}; delete the stale one"
    return (found[0], None) if found else (None, None)


def _load(path: str) -> str | None:
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:   # a missing libtorch symbol (a torch older than 2.11), a broken file
        return (f"the native library {path} could not be loaded on torch {torch.__version__} ({exc}); it needs "
                f"torch >= 2.11: rebuild it with {_BUILD}")
    return None


def _load_cpu() -> tuple[str | None, str | None]:
    path, error = _find("_C")
    if error:
        return None, error
    if path is None:
        return None, f"the native library dynamixer_ops/_C*.so is not built; build it with {_BUILD}"
    error = _load(path)
    return (None, error) if error else (path, None)


def _load_cuda() -> tuple[str | None, str | None]:
    if LOAD_ERROR:
        return None, LOAD_ERROR
    path, error = _find("_C_cuda")
    if error:
        return None, error
    if path is None:
        return None, ("the package was built without its CUDA kernels (dynamixer_ops/_C_cuda*.so: no CUDA toolkit "
                      "or a CPU-only torch at build time)")
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build: the CUDA kernels are not loaded"
    error = _load(path)
    if error:
        warnings.warn(f"dynamixer_ops: the CUDA kernels are unavailable: {error}", RuntimeWarning, stacklevel=3)
        return None, error
    return path, None


LIBRARY_PATH, LOAD_ERROR = _load_cpu()
CUDA_LIBRARY_PATH, CUDA_LOAD_ERROR = _load_cuda()
