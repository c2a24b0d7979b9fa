"""The build's switches, read in this one place: by ``setup.py`` (which loads this file by its path, before the
package is built) and by the tests that check what a build did. Standard library only.

    DYNAMIXER_OPS_BUILD_CUDA=0|1|auto   0: CPU kernels only; 1: the CUDA kernels too, or the build fails and says
                                        why; auto (unset): the CUDA kernels where a CUDA build of torch and a
                                        CUDA toolkit are present
    TORCH_CUDA_ARCH_LIST=portable       the CUDA kernels for PORTABLE_CUDA_ARCHS (a wheel for other machines)
"""
from __future__ import annotations

import os

# SASS for sm_80 and sm_90, and PTX that later GPUs compile at load time: the architectures of a wheel built for
# other machines, and of any build where TORCH_CUDA_ARCH_LIST is not set and no GPU is visible.
PORTABLE_CUDA_ARCHS = "8.0;9.0+PTX"

CUDA_SWITCH_VALUES = {"0": "off", "false": "off", "no": "off", "off": "off", "1": "on", "true": "on", "yes": "on",
                      "on": "on", "auto": "auto", "": "auto"}


def cuda_build_switch(environ=None) -> str:
    """``DYNAMIXER_OPS_BUILD_CUDA`` as ``"off"``, ``"on"`` or ``"auto"`` (see the module docstring); any other
    value is an error that names it."""
    raw = (os.environ if environ is None else environ).get("DYNAMIXER_OPS_BUILD_CUDA", "auto")
    try:
        return CUDA_SWITCH_VALUES[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"DYNAMIXER_OPS_BUILD_CUDA={raw!r}: expected 0 (CPU kernels only), 1 (the CUDA kernels "
                         f"too, or fail) or auto") from None


def cuda_arch_list(environ=None, gpu_visible: bool = False) -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` a build uses: the one set (``portable``: :data:`PORTABLE_CUDA_ARCHS`); unset,
    None (torch's choice: the visible GPU's) where a GPU is visible, else :data:`PORTABLE_CUDA_ARCHS`."""
    wanted = (os.environ if environ is None else environ).get("TORCH_CUDA_ARCH_LIST", "").strip()
    if wanted.lower() == "portable" or (not wanted and not gpu_visible):
        return PORTABLE_CUDA_ARCHS
    return wanted or None
