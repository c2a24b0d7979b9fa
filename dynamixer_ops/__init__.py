"""dynamixer_ops: fused kernels for DynaMixer's dynamic token mixing.

    from dynamixer_ops import dynamic_mix, available_backends
"""
from .backends import BackendUnavailableError, available_backends, unavailable_backends
from .ops import dynamic_mix
from .backends import reference as _reference_backend  # noqa: F401  (registers "reference")
from .backends import native as _native_backend        # noqa: F401  (registers "cpu" and "cuda")
from .backends import triton as _triton_backend        # noqa: F401  (registers "triton")
from . import nn
from . import deploy              # decompositions() for torch.export, native_library_path() for C++ runners
from .nn import convert
from .inference import optimize     # the CPU inference path of whole networks

__version__ = "0.1.0"
__all__ = ["dynamic_mix", "available_backends", "unavailable_backends", "BackendUnavailableError", "convert",
           "optimize", "nn", "deploy", "__version__"]
