"""Misuse: every validation error for every backend (functional API and modules), a GPU-only backend given CPU
tensors, gradients for any subset of the inputs, double backward, in-place changes after the forward, and the op
under torch.no_grad() and torch.inference_mode()."""
from __future__ import annotations

import itertools

import pytest
import torch

import dynamixer_ops
import dynamixer_ops.nn
from dynamixer_ops import BackendUnavailableError, dynamic_mix
from dynamixer_ops.backends import get_backend, registered_backends

from helpers import (GRAD_NAMES, assert_close_rel, backend_device_pairs, is_interpreted, make_inputs, reference_outputs,
                     supported_dtypes, tolerance, torch_threads)
from test_errors import CASES, _good

# Validation runs before a backend is chosen, so every backend name, runnable here or not, gives the same errors.
ALL_BACKENDS = ["auto", *sorted(set(registered_backends()) | {"cpu", "cuda", "triton"})]


@pytest.fixture(autouse=True)
def _single_thread():
    with torch_threads(1):     # see helpers.torch_threads
        yield


def _dtype(backend, device):
    dtypes = supported_dtypes(backend, device)
    return torch.float32 if torch.float32 in dtypes else dtypes[0]


# ---- validation: the functional API ----

MORE_CASES = [
    # (what to break, breaker, num_segments, expected message fragments)
    ("num_segments float", lambda a: None, 2.0, ["num_segments must be a positive int", "2.0"]),
    ("num_segments bool", lambda a: None, True, ["num_segments must be a positive int", "True"]),
    ("num_segments negative", lambda a: None, -2, ["num_segments must be a positive int", "-2"]),
    ("x 1-D", lambda a: a.__setitem__(0, torch.randn(48)), 2, ["x must have shape (..., L, C)", "1-D"]),
    ("x zero channels", lambda a: a.__setitem__(0, torch.randn(2, 7, 0)), 2, ["C >= 1", "(2, 7, 0)"]),
    ("x complex", lambda a: a.__setitem__(0, torch.randn(2, 7, 48, dtype=torch.complex64)), 2, ["floating-point"]),
    ("generate transposed", lambda a: a.__setitem__(3, a[3].t()), 2,
     ["generate_weight must have shape (L*L, L*d) = (49, 14)", "got (14, 49)"]),
    ("compress 1-D", lambda a: a.__setitem__(1, torch.randn(48)), 2, ["compress_weight must have shape", "(48)"]),
    ("compress bias dtype", lambda a: a.__setitem__(2, a[2].half()), 2,
     ["compress_bias has dtype torch.float16", "x has dtype torch.float32"]),
    ("generate bias device", lambda a: a.__setitem__(4, a[4].to("meta")), 2, ["generate_bias is on meta"]),
    ("generate weight not a tensor", lambda a: a.__setitem__(3, None), 2, ["generate_weight must be a torch.Tensor"]),
    ("x not a tensor", lambda a: a.__setitem__(0, 1.0), 2, ["x must be a torch.Tensor"]),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("what, breaker, num_segments, fragments", CASES + MORE_CASES,
                         ids=[c[0] for c in CASES + MORE_CASES])
def test_every_validation_error_on_every_backend(backend, what, breaker, num_segments, fragments):
    args = _good()
    breaker(args)
    with pytest.raises((ValueError, TypeError)) as info:
        dynamic_mix(*args, num_segments, backend=backend)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_backend_name_must_be_known():
    for bad in ("", "CPU", None):
        with pytest.raises(ValueError, match="unknown backend"):
            dynamic_mix(*_good(), 2, backend=bad)


# ---- validation: the modules ----

def _module(name):
    module = getattr(dynamixer_ops.nn, name, None)
    if module is None:
        pytest.skip(f"dynamixer_ops.nn has no {name} yet")
    return module


MODULE_CASES = [
    # (input shape for DynaMixerOp(dim=48, seq_len=7, num_head=2, reduced_dim=2), expected fragments)
    ((2, 8, 48), ["(2, 8, 48)"]),                 # 8 tokens, the module mixes 7
    ((2, 7, 40), ["(2, 7, 40)"]),                 # 40 channels, the module has 48
    ((7, 48), ["x must have shape (..., L, C)"]),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape, fragments", MODULE_CASES, ids=[str(c[0]) for c in MODULE_CASES])
def test_mixer_module_rejects_bad_input(backend, shape, fragments):
    op = _module("DynaMixerOp")(48, 7, 2, 2, backend=backend)
    with pytest.raises((ValueError, TypeError)) as info:
        op(torch.randn(shape))
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_mixer_module_rejects_bad_construction():
    with pytest.raises(ValueError, match="num_head"):
        _module("DynaMixerOp")(48, 7, 5, 2)


def test_mixer_module_rejects_wrong_dtype():
    op = _module("DynaMixerOp")(48, 7, 2, 2)
    with pytest.raises(TypeError, match="dtype"):
        op(torch.randn(2, 7, 48, dtype=torch.float64))


BLOCK_CASES = [
    # (input shape for DynaMixerBlock(48, resolution=7, num_head=2, reduced_dim=2), fragments the error must show)
    ((2, 8, 7, 48), ["8"]),                       # H = 8, the block mixes 7 tokens
    ((2, 7, 7, 40), ["40"]),                      # 40 channels, the block has 48
    ((2, 7, 48), ["(2, 7, 48)"]),                 # not (B, H, W, C)
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape, fragments", BLOCK_CASES, ids=[str(c[0]) for c in BLOCK_CASES])
def test_block_module_rejects_bad_input(backend, shape, fragments):
    """A clear error that shows the offending size (or shape), not an unpacking error from inside forward."""
    block = _module("DynaMixerBlock")(48, resolution=7, num_head=2, reduced_dim=2, backend=backend)
    with pytest.raises((ValueError, TypeError)) as info:
        block(torch.randn(shape))
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


# ---- a backend that cannot run the inputs ----

def test_gpu_only_backend_given_cpu_tensors():
    x, *weights = _good()
    with pytest.raises(BackendUnavailableError) as info:
        dynamic_mix(x, *weights, 2, backend="cuda")
    message = str(info.value)
    assert message.startswith("backend 'cuda' cannot run these inputs: ") or "backend 'cuda' is not available" in message
    if get_backend("cuda").unavailable_reason() is None:      # built and a GPU is visible: the device is the reason
        assert "inputs are on cpu" in message
    else:
        assert get_backend("cuda").unavailable_reason() in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_only_backend_given_gpu_tensors():
    x, *weights = _good(device="cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cpu'.*inputs are on cuda"):
        dynamic_mix(x, *weights, 2, backend="cpu")


# ---- gradients for any subset of the inputs ----

def _subsets(n, interpreted):
    every = [s for k in range(n + 1) for s in itertools.combinations(range(n), k)]
    if not interpreted:
        return every
    return [s for s in every if len(s) in (0, 1, n - 1, n)]      # the interpreter is slow: edges only


@pytest.mark.parametrize("with_biases", [True, False], ids=["biases", "no-biases"])
@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_gradients_only_for_the_inputs_that_require_them(backend, device, with_biases, seed):
    dtype = _dtype(backend, device)
    inputs = make_inputs((3,), 7, 24, 2, 2, dtype=dtype, device=device, bias=with_biases)
    present = [i for i, t in enumerate(inputs) if t is not None]
    grad_y = torch.randn(3, 7, 24, dtype=dtype, device=device)
    ref_y, ref_grads = reference_outputs(inputs, 2, grad_y)
    ref_by_index = dict(zip(present, ref_grads))
    tol = tolerance(dtype, device)
    for subset in _subsets(len(present), is_interpreted(backend, device)):
        wanted = {present[k] for k in subset}
        leaves = [t.detach().clone().requires_grad_(i in wanted) if t is not None else None
                  for i, t in enumerate(inputs)]
        y = dynamic_mix(*leaves, 2, backend=backend)
        assert y.requires_grad == bool(wanted) and (y.grad_fn is None) == (not wanted)
        assert_close_rel(y, ref_y, tol, f"y (grad for {sorted(wanted)})")
        if not wanted:
            continue
        y.backward(grad_y)
        for i, leaf in enumerate(leaves):
            if leaf is None:
                continue
            if i in wanted:
                assert_close_rel(leaf.grad, ref_by_index[i], tol, f"{GRAD_NAMES[i]} (grad for {sorted(wanted)})")
            else:
                assert leaf.grad is None, f"{GRAD_NAMES[i]} got a gradient but does not require one"


# ---- double backward, in-place changes, no_grad, inference_mode ----

@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_double_backward_says_it_is_not_supported(backend, device, seed):
    dtype = _dtype(backend, device)
    inputs = [t.requires_grad_() for t in make_inputs((2,), 7, 24, 2, 2, dtype=dtype, device=device)]
    y = dynamic_mix(*inputs, 2, backend=backend)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y, create_graph=True)
    first_order = torch.autograd.grad(dynamic_mix(*inputs, 2, backend=backend), inputs, grad_y)
    for name, g, expected in zip(GRAD_NAMES, grads, first_order):   # create_graph alone changes nothing
        assert torch.equal(g.detach(), expected), name
    for g in (grads[0], grads[3]):      # dx (through a view of the backward's output) and d generate_weight
        with pytest.raises(RuntimeError, match="dynamic_mix: double backward .* is not supported"):
            torch.autograd.grad((g * g).sum(), inputs)


@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_inplace_change_after_forward_is_caught(backend, device):
    """Only the inputs are saved for the backward (P is recomputed): changing one in place before the backward
    (an optimizer step between forward and backward) must raise, not give gradients of other inputs."""
    dtype = _dtype(backend, device)
    for index in (0, 1, 3):
        inputs = [t.requires_grad_() for t in make_inputs((2,), 7, 24, 2, 2, dtype=dtype, device=device)]
        y = dynamic_mix(*inputs, 2, backend=backend)
        with torch.no_grad():
            inputs[index].mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_no_grad_and_inference_mode(backend, device, mode, seed):
    dtype = _dtype(backend, device)
    inputs = [t.requires_grad_() for t in make_inputs((2, 3), 7, 24, 2, 2, dtype=dtype, device=device)]
    expected = dynamic_mix(*inputs, 2, backend=backend)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        y = dynamic_mix(*inputs, 2, backend=backend)
    assert not y.requires_grad and y.grad_fn is None
    assert y.is_inference() == (mode == "inference_mode")
    assert torch.equal(y, expected.detach())
    with torch.inference_mode():           # inference tensors as inputs, too
        frozen = [t.detach().clone() for t in inputs]
        assert torch.equal(dynamic_mix(*frozen, 2, backend=backend), expected.detach())
