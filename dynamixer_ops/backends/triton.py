"""The ``triton`` backend: the Triton kernels of ``dynamixer_triton.dynamic_mix`` (``kernels/dynamixer_triton/``).

Registered as a plain implementation behind the project's one ``torch.library.custom_op``
(``dynamixer_ops::dynamic_mix`` and its backward, in :mod:`dynamixer_ops.ops`), not through
``torch.library.triton_op`` + ``wrap_triton``. Why: the custom op, whose fake kernel and autograd formula live
once in ``ops.py``, passes ``opcheck`` and ``torch.compile(fullgraph=True)`` (eager, aot_eager, inductor) with
the launchers called inside it, under the Triton interpreter as on a GPU. ``triton_op`` works in eager only
under the interpreter: opcheck's fake-tensor / AOT tests and every compile backend fail ("Cannot access data
pointer of Tensor ... tracing into a custom kernel"), and skipping the launch for fake inputs makes inductor
return garbage (``docs/kernel_design.md``). ``triton_op`` would also be a second op with a second autograd.
What it would buy on a GPU (inductor seeing the kernels and fusing around them) is unmeasured here.

Where it runs: CUDA tensors when a CUDA device is visible; CPU tensors (and CUDA ones) under the Triton
interpreter (``TRITON_INTERPRET=1`` set before this package is imported), which is exact but slow, so
``backend="auto"`` never picks it there.
"""
from __future__ import annotations

import torch

from . import Backend, record_load_error, env_flag, register_backend

# Two imports, two messages: triton itself missing is the user's to install; our kernels package failing to
# import with triton present is a broken install of this project, and saying "triton" there would mislead.
_kernels = None
try:
    import triton as _triton  # noqa: F401
except ImportError as exc:   # e.g. a CPU-only machine on a platform without triton wheels
    _IMPORT_ERROR = f"triton could not be imported ({exc}); install it with `pip install triton`"
else:
    try:
        from dynamixer_triton import dynamic_mix as _kernels
        _IMPORT_ERROR = None
    except ImportError as exc:
        _IMPORT_ERROR = (f"triton imports, but the project's Triton kernels (package dynamixer_triton, source "
                         f"kernels/dynamixer_triton/) do not ({exc}); reinstall dynamixer_ops")


def _unavailable_reason() -> str | None:
    if _kernels.INTERPRET or torch.cuda.is_available():
        return None
    if env_flag("TRITON_INTERPRET"):
        return ("TRITON_INTERPRET=1 was set after dynamixer_ops was imported; Triton reads it when the kernels "
                "are defined, so set it before the first import")
    return ("no CUDA device is visible, and the Triton interpreter is off (set TRITON_INTERPRET=1 before "
            "importing dynamixer_ops to run the Triton kernels on CPU tensors, slowly)")


if _IMPORT_ERROR:
    record_load_error("triton", _IMPORT_ERROR)
else:
    register_backend(Backend(
        name="triton", forward=_kernels.launch_forward, backward=_kernels.launch_backward,
        # CPU tensors only through the interpreter (compiled kernels need device pointers).
        devices=("cuda", "cpu") if _kernels.INTERPRET else ("cuda",),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        # After the native CUDA kernels until a GPU measurement says otherwise (none exists: README.md, "What has
        # run where"; the reason for the order is at the `cuda` backend's registration, backends/native.py).
        priority={"cuda": 20, "cpu": 50},
        unavailable_reason=_unavailable_reason,
        auto=lambda device_type: not _kernels.INTERPRET,
    ))
