"""The backend grid: every backend this machine can run x dtype x awkward shape x layout, forward and all five
gradients, against the float64 reference. A backend that registers itself is picked up here automatically."""
from __future__ import annotations

import pytest
import torch

import dynamixer_ops
from dynamixer_ops import dynamic_mix

from dynamixer_ops.testing import (assert_close_rel, assert_matches_reference, make_inputs, odd_shapes,
                                   reference_outputs, tolerance)
from helpers import backend_device_pairs, is_interpreted, supported_dtypes

# The grid's shapes are dynamixer_ops.testing's "backends" odd shapes: the GPU check (benchmarks/gpu_tasks.py) runs
# the same ones.
GRID_SHAPES = odd_shapes("backends")

# The Triton interpreter executes every program in Python: keep its share of the grid to small cases.
INTERPRETED = {"L7-S2-e24-d1-N1", "L14-S4-e24-d2-N3", "L16-S4-e32-d2-N2x3", "L28-S2-e24-d2-N2", "L5-S3-e1-d3-N4",
               "L14-S2-e24-d2-N2x3-transposed", "L7-S2-e24-d1-N3-sliced"}


def _cases():
    for backend, device in backend_device_pairs():
        for dtype in supported_dtypes(backend, device):
            for shape in GRID_SHAPES:
                yield pytest.param(backend, device, dtype, shape,
                                   id=f"{backend}-{device}-{str(dtype)[6:]}-{shape.name}")


@pytest.mark.parametrize("backend, device, dtype, shape", list(_cases()))
def test_forward_and_gradients_match_reference(backend, device, dtype, shape, seed):
    if is_interpreted(backend, device) and shape.name not in INTERPRETED:
        pytest.skip("too slow under the Triton interpreter; runs on a GPU")
    batch, L, C, S, d = shape.sizes
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device=device, layout=shape.layout)
    leaves = [t.requires_grad_() for t in inputs]
    y = dynamic_mix(*leaves, S, backend=backend)
    assert y.shape == inputs[0].shape and y.dtype == dtype and y.device.type == device
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    assert_matches_reference(y, grads, inputs, S, grad_y, tolerance(dtype, device))


@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_without_biases_and_noncontiguous_grad(backend, device, seed):
    """Biases of None act as zeros and get no gradient; a non-contiguous grad_y is read correctly."""
    dtypes = supported_dtypes(backend, device)
    dtype = torch.float32 if torch.float32 in dtypes else dtypes[0]
    x, wc, _, wg, _ = make_inputs((3,), 7, 48, 2, 2, dtype=dtype, device=device, bias=False)
    leaves = [t.requires_grad_() for t in (x, wc, wg)]
    y = dynamic_mix(leaves[0], leaves[1], None, leaves[2], None, 2, backend=backend)
    grad_y = torch.randn(48, 7, 3, dtype=dtype, device=device).permute(2, 1, 0)   # (3, 7, 48), last stride 21
    grads = torch.autograd.grad(y, leaves, grad_y)
    assert_matches_reference(y, grads, (x, wc, None, wg, None), 2, grad_y, tolerance(dtype, device))


@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_transposed_input_is_not_copied_and_output_keeps_layout(backend, device, seed):
    """Mixing along H of (B, H, W, C) through a transposed view: y comes back in the same layout."""
    dtype = supported_dtypes(backend, device)[0]
    x, *weights = make_inputs((2, 5), 7, 48, 2, 2, dtype=dtype, device=device, layout="transposed")
    y = dynamic_mix(x, *weights, 2, backend=backend)
    assert y.stride() == x.stride()
    assert y.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_repeated_backward_is_bitwise_deterministic(backend, device, seed):
    dtypes = supported_dtypes(backend, device)
    dtype = torch.float32 if torch.float32 in dtypes else dtypes[0]
    inputs = [t.requires_grad_() for t in make_inputs((37,), 7, 48, 2, 2, dtype=dtype, device=device)]
    grad_y = torch.randn(37, 7, 48, dtype=dtype, device=device)
    first = torch.autograd.grad(dynamic_mix(*inputs, 2, backend=backend), inputs, grad_y)
    second = torch.autograd.grad(dynamic_mix(*inputs, 2, backend=backend), inputs, grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend, device", [p for p in backend_device_pairs()
                                             if torch.float64 in supported_dtypes(*p)])
def test_gradcheck_float64(backend, device, seed):
    inputs = [t.requires_grad_() for t in make_inputs((2,), 5, 6, 2, 2, dtype=torch.float64, device=device)]
    assert torch.autograd.gradcheck(lambda *a: dynamic_mix(*a, 2, backend=backend), inputs)


@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_empty_batch(backend, device):
    dtype = supported_dtypes(backend, device)[0]
    x, *weights = make_inputs((0,), 7, 48, 2, 2, dtype=dtype, device=device)
    leaves = [x.requires_grad_()] + [w.requires_grad_() for w in weights]
    y = dynamic_mix(*leaves, 2, backend=backend)
    assert y.shape == (0, 7, 48)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert grads[0].shape == x.shape
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


def test_auto_picks_an_available_backend_for_bfloat16():
    x, *weights = make_inputs((2,), 7, 48, 2, 2, dtype=torch.bfloat16, device="cpu")
    y = dynamic_mix(x, *weights, 2)
    ref_y, _ = reference_outputs((x, *weights), 2, torch.ones_like(y))
    assert_close_rel(y, ref_y, 1e-2, "y")
    assert dynamixer_ops.available_backends("cpu")[-1] == "reference"
