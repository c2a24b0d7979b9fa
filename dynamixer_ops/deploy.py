"""Deploying a model that uses :func:`dynamixer_ops.dynamic_mix`: ONNX, OpenVINO, ``torch.export`` and AOTInductor.

* **ONNX**: ``torch.onnx.export(model, (x,), dynamo=True)`` needs nothing from this module. While torch.onnx
  exports, the op is traced as its reference decomposition (:func:`dynamixer_ops.ops.decomposition`), which
  becomes standard ONNX ops (MatMul / Gemm, Softmax, Reshape, Transpose).
* **OpenVINO**: ``openvino.convert_model(model, example_input=x)`` and ``openvino.convert_model(ep)`` of an
  ExportedProgram that holds the op need nothing from this module either. While OpenVINO converts, the op is traced
  as the same decomposition (:func:`dynamixer_ops.ops.openvino_converting`): OpenVINO's ``torch.jit.trace`` of the
  model records it, and so does its ``run_decompositions`` of the program, whose table cannot name the op.
* **torch.export**: the exported graph keeps ``torch.ops.dynamixer_ops.dynamic_mix`` (also after
  ``ExportedProgram.run_decompositions()``: it is an opaque op). ``ep.run_decompositions(decompositions())``
  replaces it with the reference math, e.g. to hand an ExportedProgram to torch.onnx or to a runtime that
  knows only ATen ops.
* **AOTInductor**: a package (``torch._inductor.aoti_compile_and_package``) calls the op through the dispatcher.
  The native library :func:`native_library_path` defines the op and runs it with the native kernels without
  Python: a C++ program links libtorch, ``dlopen``\\s this library and loads the package with
  ``torch::inductor::AOTIModelPackageLoader``. Export with ``backend="auto"`` (or the device's native backend,
  ``"cpu"`` / ``"cuda"``): the reference and Triton backends need Python.

Why not register the decomposition in ``torch._decomp.decomposition_table``, where torch.onnx would also find
it: fake tensors with symbolic shapes prefer that table to the op's fake kernel, so ``torch.compile(dynamic=True)``
would trace the reference math and assume a contiguous output where the kernels keep x's layout.
"""
from __future__ import annotations

import torch

from ._library import CUDA_LIBRARY_PATH, LIBRARY_PATH, LOAD_ERROR
from .ops import FORWARD_OP, decomposition

__all__ = ["decompositions", "native_library_path", "native_library_paths"]


def decompositions() -> dict:
    """``{torch.ops.dynamixer_ops.dynamic_mix.default: its reference decomposition}``.

    ``ep.run_decompositions(decompositions())`` replaces the op with ATen ops and decomposes nothing else. To
    lower the rest to core ATen as well::

        table = torch.export.default_decompositions()
        table.update(dynamixer_ops.deploy.decompositions())
        ep = ep.run_decompositions(table)
    """
    namespace, name = FORWARD_OP.split("::")
    return {getattr(getattr(torch.ops, namespace), name).default: decomposition}


def native_library_path() -> str:
    """The native library (``.../dynamixer_ops/_C*.so``) a C++ program loads (``dlopen``) to run
    ``dynamixer_ops::dynamic_mix`` without Python: the op's schema, its Python-free kernel and the CPU kernels. It
    needs libtorch 2.11 or later (it is built on libtorch's stable ABI), and no libpython."""
    if LIBRARY_PATH is None:
        raise RuntimeError(LOAD_ERROR)
    return LIBRARY_PATH


def native_library_paths() -> list[str]:
    """Every native library this process loaded, in the order to ``dlopen`` them: :func:`native_library_path`, then
    the CUDA kernels' ``.../dynamixer_ops/_C_cuda*.so`` where they loaded (it needs libtorch_cuda)."""
    return [native_library_path(), *([CUDA_LIBRARY_PATH] if CUDA_LIBRARY_PATH else [])]
