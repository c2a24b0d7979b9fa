"""Cases specific to the CUDA backend (csrc/cuda/), on top of the shared grid in test_dynamic_mix.py.

Two halves:

* ``test_emulated_*`` run the CUDA kernels' own source on the CPU through tests/cuda_emu/emu.h (a std::thread
  per CUDA thread, real barriers, NaN-filled shared memory and workspaces), against the float64 reference.
  They check the index arithmetic, the tiling, the barriers' placement and the math without a GPU, not the
  GPU itself. They run wherever the CUDA headers are found (CI included: the kernels' logic runs there, not
  only their compile); building the emulator takes about a minute on two cores (cached afterwards);
  ``DYNAMIXER_OPS_TEST_CUDA_EMU=0`` skips them. ``DYNAMIXER_OPS_TEST_CUDA_EMU=asan`` builds it with
  AddressSanitizer (every out-of-bounds access to shared memory or a tensor is an error); run it as
  ``LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
  ASAN_OPTIONS=detect_leaks=0 DYNAMIXER_OPS_TEST_CUDA_EMU=asan pytest tests/test_cuda_kernel.py`` (libstdc++
  preloaded too: without it ASan cannot intercept the C++ exception that importing triton throws, and aborts).
* ``test_gpu_*`` run the real kernels through ``dynamic_mix(..., backend="cuda")`` and need a GPU.
"""
from __future__ import annotations

import glob
import os

import pytest
import torch

import dynamixer_ops
from dynamixer_ops import dynamic_mix

from helpers import assert_matches_reference, make_inputs, tolerance
from jit_build import load_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_SMEM_OPTIN = 232448      # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 (227 KB)

# (batch shape, L, C, S, d), chosen for the CUDA kernels' own edges: channel chunks of 32 (e0 = 40 is 32 + 8,
# e0 = 33), reduce passes of 8 reduced values (d = 9), tiles of up to 8 sequences (N = 11: a ragged last
# tile), L = 1 (P = 1), the model shapes' L = 32 / 16 with C/S = 24 and 32.
KERNEL_SHAPES = {
    "L7-e40-d2-N11": ((11,), 7, 80, 2, 2),
    "L5-e33-d9": ((2,), 5, 66, 2, 9),
    "L1-e8-d2": ((3,), 1, 16, 2, 2),
    "L32-e24-d2": ((2,), 32, 48, 2, 2),
    "L16-e32-d8-N9": ((9,), 16, 64, 2, 8),
    "L14-e24-d1-2x3": ((2, 3), 14, 48, 2, 1),
}


def _check_all(out_y, out_grads, inputs, S, grad_y, dtype):
    assert out_y.dtype == dtype
    assert_matches_reference(out_y, out_grads, inputs, S, grad_y, tolerance(dtype, out_y.device.type))


# ---- the kernels' source, emulated on the CPU ------------------------------------------------------------

def _cuda_header_dirs():
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


@pytest.fixture(scope="module")
def emu():
    mode = os.environ.get("DYNAMIXER_OPS_TEST_CUDA_EMU", "1")
    if mode in ("", "0"):
        pytest.skip("DYNAMIXER_OPS_TEST_CUDA_EMU=0: the CPU emulation of the CUDA kernels is not built")
    headers = _cuda_header_dirs()
    if not headers:
        pytest.skip("no CUDA toolkit headers found (cuda_fp16.h and crt/host_defines.h)")
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if mode == "asan" else []
    load_extension(name="dynamixer_cuda_emu" + ("_asan" if asan else ""),
                   sources=[os.path.join(ROOT, "tests", "cuda_emu", "emu_ops.cpp")],
                   extra_include_paths=[os.path.join(ROOT, "csrc"), headers[0]],
                   extra_cflags=["-std=c++20", "-O1", *asan], extra_ldflags=asan,
                   is_python_module=False, verbose=False)
    return torch.ops.dynamixer_cuda_emu


def _emulate(emu, inputs, S, grad_y, smem_limit=H100_SMEM_OPTIN):
    """y and the five gradients from the emulated kernels; outputs start as NaN."""
    x, gy = inputs[0], grad_y
    if x.dim() == 3:
        x, gy = x.unsqueeze(0), gy.unsqueeze(0)
    weights = [t.contiguous() for t in inputs[1:]]
    y = torch.full_like(x, float("nan"))
    emu.forward(x, *weights, S, y, smem_limit)
    grads = [torch.full_like(x, float("nan"))] + [torch.full_like(w, float("nan")) for w in weights]
    emu.backward(gy, x, *weights, S, *grads, smem_limit)
    return y.reshape(inputs[0].shape), [grads[0].reshape(inputs[0].shape), *grads[1:]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("shape", list(KERNEL_SHAPES.values()), ids=list(KERNEL_SHAPES))
def test_emulated_kernels_match_reference(emu, shape, dtype, seed):
    batch, L, C, S, d = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = _emulate(emu, inputs, S, grad_y)
    _check_all(y, grads, inputs, S, grad_y, dtype)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_emulated_strided_x_and_grad_y(emu, layout, seed):
    """x as a transposed / sliced view, grad_y with other strides again, y and grad_x in x's layout."""
    batch, L, C, S, d = ((2, 3), 7, 48, 2, 2) if layout == "transposed" else ((3, 2), 7, 48, 2, 2)
    inputs = make_inputs(batch, L, C, S, d, dtype=torch.float32, device="cpu", layout=layout)
    x = inputs[0]
    grad_y = torch.randn(x.shape[1], x.shape[0], L, C + 3)[..., :C].transpose(0, 1)   # its own strides
    y = torch.full_like(x, float("nan"))          # empty_like keeps a dense x's strides, as ops.py does
    weights = [t.contiguous() for t in inputs[1:]]
    emu.forward(x, *weights, S, y, H100_SMEM_OPTIN)
    grads = [torch.full_like(x, float("nan"))] + [torch.full_like(w, float("nan")) for w in weights]
    emu.backward(grad_y, x, *weights, S, *grads, H100_SMEM_OPTIN)
    _check_all(y, grads, inputs, S, grad_y, torch.float32)


def test_emulated_small_shared_memory_gives_small_tiles(emu, seed):
    """A device limit that fits only 3 sequences per block in the backward (7 in the forward): ragged tiles
    of other sizes than the default 8, same results. Sizes as in csrc/cuda/dynamic_mix_cuda.h."""
    L, d = 14, 2
    backward_3 = 4 * (3 * L * d + 2 * 3 * L * (L | 1) + 2 * L * 33)
    inputs = make_inputs((13,), L, 48, 2, d, dtype=torch.float32, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = _emulate(emu, inputs, 2, grad_y, smem_limit=backward_3)
    _check_all(y, grads, inputs, 2, grad_y, torch.float32)


def test_emulated_too_little_shared_memory_is_a_clear_error(emu):
    inputs = make_inputs((2,), 16, 32, 2, 2, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match=r"needs \d+ bytes of shared memory per block for L=16 and d=2, "
                                           r"but the device allows 1000"):
        _emulate(emu, inputs, 2, torch.randn_like(inputs[0]), smem_limit=1000)


def test_emulated_weight_gradients_are_deterministic(emu, seed):
    inputs = make_inputs((40,), 7, 48, 2, 2, dtype=torch.float32, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    _, first = _emulate(emu, inputs, 2, grad_y)
    _, second = _emulate(emu, inputs, 2, grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- the real kernels, on a GPU -------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif("cuda" not in dynamixer_ops.available_backends("cuda") if torch.cuda.is_available()
                               else True, reason="the cuda backend needs a visible GPU and the CUDA build of _C")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("shape", list(KERNEL_SHAPES.values()) + [((3,), 64, 64, 2, 8)],
                         ids=list(KERNEL_SHAPES) + ["L64-e32-d8"])
def test_gpu_kernels_match_reference(shape, dtype, seed):
    batch, L, C, S, d = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cuda")
    leaves = [t.requires_grad_() for t in inputs]
    y = dynamic_mix(*leaves, S, backend="cuda")
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    _check_all(y, grads, inputs, S, grad_y, dtype)


@needs_gpu
def test_gpu_weight_gradients_are_deterministic(seed):
    inputs = make_inputs((512,), 16, 64, 2, 2, dtype=torch.float32, device="cuda")
    leaves = [t.requires_grad_() for t in inputs]
    grad_y = torch.randn(inputs[0].shape, device="cuda")
    first = torch.autograd.grad(dynamic_mix(*leaves, 2, backend="cuda"), leaves, grad_y)
    second = torch.autograd.grad(dynamic_mix(*leaves, 2, backend="cuda"), leaves, grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_gpu
def test_gpu_too_long_sequences_are_a_clear_error():
    L = 256    # the forward alone needs > 256 KB of shared memory for one sequence
    inputs = make_inputs((1,), L, 16, 2, 1, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
        dynamic_mix(*inputs, 2, backend="cuda")


# ---- the build -----------------------------------------------------------------------------------------------

def test_cuda_kernels_are_built_where_a_toolkit_is_present():
    """setup.py builds the CUDA kernels whenever torch is a CUDA build and nvcc is found: on such a machine (CI
    included) a build that quietly left them out must fail here, not pass with every GPU case skipped."""
    import shutil
    if os.environ.get("DYNAMIXER_OPS_BUILD_CUDA", "auto").lower() in ("0", "false", "no", "off"):
        pytest.skip("DYNAMIXER_OPS_BUILD_CUDA=0")
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no CUDA toolkit on this machine")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dynamixer_ops_C::mix_forward", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dynamixer_ops_C::mix_backward", "CUDA")
