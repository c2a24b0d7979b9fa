"""Cases specific to the CUDA backend (csrc/cuda/), on top of the shared grid in test_dynamic_mix.py.

Two halves:

* ``test_emulated_*`` run the CUDA kernels' own source on the CPU through tools/cuda_emu/emu.h (a fiber per
  CUDA thread, one at a time, real barriers, NaN-filled shared memory and workspaces), against the float64
  reference, and with racecheck: every call runs under three thread and block orders (ascending, descending, a
  seeded shuffle) that must give bitwise identical outputs and identical shared memory at every barrier, so a
  missing ``__syncthreads`` fails deterministically (tests/test_cuda_barriers.py shows it for every barrier).
  They check the index arithmetic, the tiling, the barriers' placement and the math without a GPU, not the
  GPU itself. They run wherever the CUDA headers are found (CI included: the kernels' logic runs there, not
  only their compile); building the emulator takes about a minute on two cores (cached afterwards);
  ``DYNAMIXER_OPS_TEST_CUDA_EMU=0`` skips them. ``DYNAMIXER_OPS_TEST_CUDA_EMU=asan`` builds it with
  AddressSanitizer and UBSan (every out-of-bounds access to shared memory or a tensor is an error); .ci/sanitize
  runs these tests so (docs/checking_gpu_code.md).
* ``test_gpu_*`` run the real kernels through ``dynamic_mix(..., backend="cuda")`` and need a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

import dynamixer_ops
from dynamixer_ops import dynamic_mix

from cuda_emu_build import load_cuda_emulator
from cuda_emu_cases import (EMU_DTYPES, H100_SMEM_OPTIN, KERNEL_SHAPES, check_case, emulate, emulated_tolerance,
                            run_emulator, run_racechecked)
from dynamixer_ops.testing import assert_matches_reference, make_inputs, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_all(out_y, out_grads, inputs, S, grad_y, dtype):
    assert out_y.dtype == dtype
    assert_matches_reference(out_y, out_grads, inputs, S, grad_y, tolerance(dtype, out_y.device.type))


# ---- the kernels' source, emulated on the CPU ------------------------------------------------------------

@pytest.fixture(scope="module")
def emu():
    return load_cuda_emulator()


@pytest.mark.parametrize("dtype_name", list(EMU_DTYPES))
@pytest.mark.parametrize("shape", list(KERNEL_SHAPES.values()), ids=list(KERNEL_SHAPES))
def test_emulated_kernels_match_reference(emu, shape, dtype_name, seed):
    check_case(emu, shape, dtype_name)


@pytest.mark.parametrize("dtype_name", list(EMU_DTYPES))
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_emulated_strided_x_and_grad_y(emu, layout, dtype_name, seed):
    """x as a transposed / sliced view, grad_y with other strides again, y and grad_x in x's layout."""
    dtype, tf32 = EMU_DTYPES[dtype_name]
    batch, L, C, S, d = ((2, 3), 7, 48, 2, 2) if layout == "transposed" else ((3, 2), 7, 48, 2, 2)
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device="cpu", layout=layout)
    x = inputs[0]
    grad_y = torch.randn(x.shape[1], x.shape[0], L, C + 3, dtype=dtype)[..., :C].transpose(0, 1)   # its own strides
    weights = [t.contiguous() for t in inputs[1:]]
    path = "simt" if dtype == torch.float32 and not tf32 else "tensor_cores"
    forward_path, backward_path, (y, *grads) = run_racechecked(emu, x, grad_y, weights, S, tf32=tf32)
    assert (forward_path, backward_path) == (path, path)
    assert y.dtype == dtype
    assert_matches_reference(y, grads, inputs, S, grad_y, emulated_tolerance(dtype, tf32),
                             tf32=tf32)


def test_emulated_small_shared_memory_gives_small_tiles(emu, seed):
    """A device limit that fits only 3 sequences per block in the backward (7 in the forward): ragged tiles
    of other sizes than the default 8, same results. Sizes from csrc/cuda/dynamic_mix_cuda.h via the emulator."""
    L, d = 14, 2
    backward_3 = emu.smem_bytes("backward", L, 48, 2, d, 3)
    assert emu.smem_bytes("backward", L, 48, 2, d, 4) > backward_3
    inputs = make_inputs((13,), L, 48, 2, d, dtype=torch.float32, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = emulate(emu, inputs, 2, grad_y, smem_limit=backward_3)
    _check_all(y, grads, inputs, 2, grad_y, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bfloat16", "float16", "float32-tf32"])
def test_emulated_tensor_core_tiles_that_do_not_fit_fall_back_to_simt(emu, dtype, seed):
    """Where the tensor-core tiles exceed the device's shared memory the fused SIMT kernels run (same results);
    the limit here is the tensor-core forward's need minus one byte (the backward's is larger). The only cases of
    the SIMT kernels in 16-bit types."""
    L, C, S, d = 14, 48, 2, 2
    limit = emu.smem_bytes("forward_tc", L, C, S, d, dtype.itemsize) - 1
    assert emu.smem_bytes("backward_tc", L, C, S, d, dtype.itemsize) > limit
    inputs = make_inputs((5,), L, C, S, d, dtype=dtype, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    y, grads = emulate(emu, inputs, S, grad_y, smem_limit=limit, tf32=True)   # asserts the SIMT path
    assert_matches_reference(y, grads, inputs, S, grad_y, emulated_tolerance(dtype, False))


def test_emulated_too_little_shared_memory_is_a_clear_error(emu):
    inputs = make_inputs((2,), 16, 32, 2, 2, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match=r"needs \d+ bytes of shared memory per block for L=16 and d=2, "
                                           r"but the device allows 1000"):
        emulate(emu, inputs, 2, torch.randn_like(inputs[0]), smem_limit=1000)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_emulated_outputs_are_deterministic(emu, dtype_name, seed):
    """40 sequences, many blocks: the racechecked call runs them in three block orders (and thread orders) and
    asserts bitwise identical outputs; a second call gives the same bits again."""
    dtype, tf32 = EMU_DTYPES[dtype_name]
    inputs = make_inputs((40,), 7, 48, 2, 2, dtype=dtype, device="cpu")
    grad_y = torch.randn_like(inputs[0])
    first = emulate(emu, inputs, 2, grad_y, tf32=tf32)
    x, weights = inputs[0].unsqueeze(0), [t.contiguous() for t in inputs[1:]]
    second = run_emulator(emu, x, grad_y.unsqueeze(0), weights, 2, H100_SMEM_OPTIN, tf32)[2]
    for a, b in zip([first[0], *first[1]], [second[0].reshape(first[0].shape), *second[1:]]):
        assert torch.equal(a.reshape(b.shape), b)


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
    """setup.py builds the CUDA kernels whenever torch is a CUDA build and nvcc is found (and with
    DYNAMIXER_OPS_BUILD_CUDA=1 always): on such a machine (CI included) a build that quietly left them out must fail
    here, not pass with every GPU case skipped."""
    import shutil
    from dynamixer_ops.build_config import cuda_build_switch
    switch = cuda_build_switch()
    if switch == "off":
        pytest.skip("DYNAMIXER_OPS_BUILD_CUDA=0")
    if switch == "auto" and torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build")
    if switch == "auto" and shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no CUDA toolkit on this machine")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dynamixer_ops_C::dynamic_mix_out", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dynamixer_ops_C::dynamic_mix_backward_out", "CUDA")


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
