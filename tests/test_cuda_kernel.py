"""Cases specific to the CUDA backend (csrc/cuda/), on top of the shared grid in test_dynamic_mix.py.

Two halves:

* ``test_emulated_*`` run the CUDA kernels' own source on the CPU through tools/cuda_emu/emu.h (a std::thread
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

import os

import pytest
import torch

import dynamixer_ops
from dynamixer_ops import dynamic_mix

from cuda_emu_build import load_cuda_emulator
from helpers import assert_matches_reference, make_inputs, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_SMEM_OPTIN = 232448      # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 (227 KB)

# (batch shape, L, C, S, d), chosen for the CUDA kernels' own edges: SIMT channel chunks of 32 (e0 = 40 is 32 + 8,
# e0 = 33), reduce passes of 8 reduced values (d = 9), tiles of up to 8 sequences (N = 11: a ragged last
# tile), L = 1 (P = 1), the model shapes' L = 32 / 16 with C/S = 24 and 32.
KERNEL_SHAPES = {
    "L7-e40-d2-N11": ((11,), 7, 80, 2, 2),
    "L5-e33-d9": ((2,), 5, 66, 2, 9),
    "L1-e8-d2": ((3,), 1, 16, 2, 2),
    "L32-e24-d2": ((2,), 32, 48, 2, 2),
    "L16-e32-d8-N9": ((9,), 16, 64, 2, 8),
    "L14-e24-d1-2x3": ((2, 3), 14, 48, 2, 1),
    # The tensor-core kernels' edges: a block holds ceil(16 / S) sequences x S segments in 16-row tiles, so S = 3
    # (6 sequences, 18 rows: a second, partial tile; N = 7: a ragged last block) and S = 20 (1 sequence, 20 rows)
    # with N = 1 and L = 28 (padded to 32, L*L = 784).
    "L7-S3-e24-d2-N7": ((7,), 7, 72, 3, 2),
    "L28-S20-e8-d1-N1": ((1,), 28, 160, 20, 1),
}


def _check_all(out_y, out_grads, inputs, S, grad_y, dtype):
    assert out_y.dtype == dtype
    assert_matches_reference(out_y, out_grads, inputs, S, grad_y, tolerance(dtype, out_y.device.type))


# ---- the kernels' source, emulated on the CPU ------------------------------------------------------------

@pytest.fixture(scope="module")
def emu():
    return load_cuda_emulator()


def _expected_path(emu, kernel, x, S, d, smem_limit, tf32):
    tc_bytes = emu.smem_bytes(kernel, x.shape[2], x.shape[3], S, d, x.element_size())
    return "tensor_cores" if (x.dtype != torch.float32 or tf32) and tc_bytes <= smem_limit else "simt"


def _emulate(emu, inputs, S, grad_y, smem_limit=H100_SMEM_OPTIN, tf32=False):
    """y and the five gradients from the emulated kernels; outputs start as NaN. Asserts that forward and backward
    took the tensor-core path exactly where the CUDA build takes it (fp16/bf16, and fp32 with tf32 allowed, where
    the tiles fit)."""
    x, gy = inputs[0], grad_y
    if x.dim() == 3:
        x, gy = x.unsqueeze(0), gy.unsqueeze(0)
    weights = [t.contiguous() for t in inputs[1:]]
    y = torch.full_like(x, float("nan"))
    path = emu.forward(x, *weights, S, y, smem_limit, tf32)
    assert path == _expected_path(emu, "forward_tc", x, S, inputs[3].shape[1] // x.shape[2], smem_limit, tf32)
    grads = [torch.full_like(x, float("nan"))] + [torch.full_like(w, float("nan")) for w in weights]
    path = emu.backward(gy, x, *weights, S, *grads, smem_limit, tf32)
    assert path == _expected_path(emu, "backward_tc", x, S, inputs[3].shape[1] // x.shape[2], smem_limit, tf32)
    return y.reshape(inputs[0].shape), [grads[0].reshape(inputs[0].shape), *grads[1:]]


# fp32 twice: exact (SIMT) and with tf32 allowed (tensor cores, tf32 tolerance as on a GPU).
EMU_DTYPES = {"float32": (torch.float32, False), "float32-tf32": (torch.float32, True),
              "float16": (torch.float16, False), "bfloat16": (torch.bfloat16, False)}


def _emulated_tolerance(dtype, tf32):
    return tolerance(dtype, "cuda" if tf32 else "cpu")


@pytest.mark.parametrize("dtype_name", list(EMU_DTYPES))
@pytest.mark.parametrize("shape", list(KERNEL_SHAPES.values()), ids=list(KERNEL_SHAPES))
def test_emulated_kernels_match_reference(emu, shape, dtype_name, seed):
    dtype, tf32 = EMU_DTYPES[dtype_name]
    batch, L, C, S, d = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = _emulate(emu, inputs, S, grad_y, tf32=tf32)
    assert y.dtype == dtype
    assert_matches_reference(y, grads, inputs, S, grad_y, _emulated_tolerance(dtype, tf32),
                             tf32=tf32)


@pytest.mark.parametrize("dtype_name", list(EMU_DTYPES))
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_emulated_strided_x_and_grad_y(emu, layout, dtype_name, seed):
    """x as a transposed / sliced view, grad_y with other strides again, y and grad_x in x's layout."""
    dtype, tf32 = EMU_DTYPES[dtype_name]
    batch, L, C, S, d = ((2, 3), 7, 48, 2, 2) if layout == "transposed" else ((3, 2), 7, 48, 2, 2)
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu", layout=layout)
    x = inputs[0]
    grad_y = torch.randn(x.shape[1], x.shape[0], L, C + 3, dtype=dtype)[..., :C].transpose(0, 1)   # its own strides
    y = torch.full_like(x, float("nan"))          # empty_like keeps a dense x's strides, as ops.py does
    weights = [t.contiguous() for t in inputs[1:]]
    path = "simt" if dtype == torch.float32 and not tf32 else "tensor_cores"
    assert emu.forward(x, *weights, S, y, H100_SMEM_OPTIN, tf32) == path
    grads = [torch.full_like(x, float("nan"))] + [torch.full_like(w, float("nan")) for w in weights]
    assert emu.backward(grad_y, x, *weights, S, *grads, H100_SMEM_OPTIN, tf32) == path
    assert y.dtype == dtype
    assert_matches_reference(y, grads, inputs, S, grad_y, _emulated_tolerance(dtype, tf32),
                             tf32=tf32)


def test_emulated_small_shared_memory_gives_small_tiles(emu, seed):
    """A device limit that fits only 3 sequences per block in the backward (7 in the forward): ragged tiles
    of other sizes than the default 8, same results. Sizes from csrc/cuda/dynamic_mix_cuda.h via the emulator."""
    L, d = 14, 2
    backward_3 = emu.smem_bytes("backward", L, 48, 2, d, 3)
    assert emu.smem_bytes("backward", L, 48, 2, d, 4) > backward_3
    inputs = make_inputs((13,), L, 48, 2, d, dtype=torch.float32, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = _emulate(emu, inputs, 2, grad_y, smem_limit=backward_3)
    _check_all(y, grads, inputs, 2, grad_y, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32-tf32"])
def test_emulated_tensor_core_tiles_that_do_not_fit_fall_back_to_simt(emu, dtype, seed):
    """Where the tensor-core tiles exceed the device's shared memory the fused SIMT kernels run (same results);
    the limit here is the tensor-core forward's need minus one byte (the backward's is larger)."""
    L, C, S, d = 14, 48, 2, 2
    limit = emu.smem_bytes("forward_tc", L, C, S, d, 2 if dtype == torch.bfloat16 else 4) - 1
    assert emu.smem_bytes("backward_tc", L, C, S, d, 2 if dtype == torch.bfloat16 else 4) > limit
    inputs = make_inputs((5,), L, C, S, d, dtype=dtype, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = _emulate(emu, inputs, S, grad_y, smem_limit=limit, tf32=True)   # asserts the SIMT path
    assert_matches_reference(y, grads, inputs, S, grad_y, _emulated_tolerance(dtype, False))


def test_emulated_too_little_shared_memory_is_a_clear_error(emu):
    inputs = make_inputs((2,), 16, 32, 2, 2, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match=r"needs \d+ bytes of shared memory per block for L=16 and d=2, "
                                           r"but the device allows 1000"):
        _emulate(emu, inputs, 2, torch.randn_like(inputs[0]), smem_limit=1000)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_emulated_outputs_are_deterministic(emu, dtype_name, seed):
    dtype, tf32 = EMU_DTYPES[dtype_name]
    inputs = make_inputs((40,), 7, 48, 2, 2, dtype=dtype, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    first = _emulate(emu, inputs, 2, grad_y, tf32=tf32)
    second = _emulate(emu, inputs, 2, grad_y, tf32=tf32)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
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
@pytest.mark.parametrize("shape", list(KERNEL_SHAPES.values()), ids=list(KERNEL_SHAPES))
def test_gpu_float32_on_tf32_tensor_cores_matches_reference(shape, seed):
    """fp32 inputs take the tensor-core kernels when torch allows tf32 for matmuls (the host reads the flag)."""
    batch, L, C, S, d = shape
    inputs = make_inputs(batch, L, C, S, d, dtype=torch.float32, device="cuda")
    leaves = [t.requires_grad_() for t in inputs]
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        y = dynamic_mix(*leaves, S, backend="cuda")
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, grad_y)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    _check_all(y, grads, inputs, S, grad_y, torch.float32)


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


def test_cuda_kernels_compile_without_spills_and_use_tensor_cores():
    """tools/cuda_resource_usage.py (nvcc + cuobjdump, no GPU): every kernel compiles for sm_80 and sm_90 without
    spills, the tensor-core kernels' SASS holds HMMA instructions in every dtype and the SIMT kernels' none, and
    the tiles fit a block's shared memory at every model shape where the host is meant to pick them."""
    import json
    import shutil
    import subprocess
    import sys
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    script = os.path.join(ROOT, "tools", "cuda_resource_usage.py")
    out = subprocess.run([sys.executable, script, "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    kernels = report["kernels"]
    assert {(k["arch"], k["kernel"], k["dtype"]) for k in kernels} >= {
        (a, k, t) for a in ("80", "90") for k in ("mix_forward_tc_kernel", "mix_backward_tc_kernel")
        for t in ("float", "half", "bfloat16")}
    for k in kernels:
        assert k["spills"] == "none", k
    # Where the tensor-core tiles must fit (the SIMT kernels run elsewhere: at L = 32 the fp32-as-tf32 tiles on an
    # A100 and the tf32 backward's on an H100, and the fp16/bf16 backward's on an A100).
    must_fit = {("90", "mix_forward_tc_kernel/2"), ("90", "mix_forward_tc_kernel/4"),
                ("90", "mix_backward_tc_kernel/2"), ("80", "mix_forward_tc_kernel/2")}
    for p in report["plan"]:
        if (p["arch"], p["kernel"]) in must_fit or "tc_kernel" not in p["kernel"]:
            assert p["tile"] is not None and p["blocks"] >= 1, p
    if report["cuobjdump"] is None:
        pytest.skip("no cuobjdump (PATH, CUDA_HOME/bin, triton's wheel or nvidia-cuda-cuobjdump): SASS not checked")
    for k in kernels:
        if k["kernel"].endswith("_tc_kernel"):
            assert k["hmma"] > 0, k
        else:
            assert k["hmma"] == 0, k
