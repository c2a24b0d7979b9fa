"""Loads the native library ``dynamixer_ops/_C*.so`` (once, for every module that needs it).

It is a plain torch ops library, not a Python extension module: it defines no Python API and uses no Python
symbols, so a C++ program can load it too (see :func:`dynamixer_ops.native_library_path`). Loading it registers
``torch.ops.dynamixer_ops`` (the public op's schema and its Python-free kernels) and ``torch.ops.dynamixer_ops_C``
(the native CPU / CUDA kernels).
"""
from __future__ import annotations

import glob
import os

import torch

__all__ = ["LIBRARY_PATH", "LOAD_ERROR"]


def _load() -> tuple[str | None, str | None]:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C.*so")) + glob.glob(os.path.join(here, "_C.*pyd")))
    if not found:
        return None, (f"the native library dynamixer_ops/_C*.so is not built; build it with "
                      f"`pip install --no-build-isolation -e .` against the torch you run ({torch.__version__})")
    if len(found) > 1:   # e.g. an old _C.cpython-*.so next to a new _C.abi3.so: loading both would clash
        return None, f"more than one native library in {here}: {[os.path.basename(p) for p in found]}; delete the stale one"
    try:
        torch.ops.load_library(found[0])
    except OSError as exc:   # a torch ABI mismatch, typically an undefined symbol
        return None, (f"the native library {found[0]} could not be loaded ({exc}); rebuild it with "
                      f"`pip install --no-build-isolation -e .` against the torch you run ({torch.__version__})")
    return found[0], None


LIBRARY_PATH, LOAD_ERROR = _load()
