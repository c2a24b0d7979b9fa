"""Bad input and misuse: every validation error, named before any kernel runs, on every backend (functional API
and modules); unknown backends and backends that cannot run the inputs; gradients for any subset of the inputs,
double backward, in-place changes after the forward, and the op under torch.no_grad() and
torch.inference_mode()."""
from __future__ import annotations

import itertools

import pytest
import torch

import dynamixer_ops
import dynamixer_ops.nn
from dynamixer_ops import BackendUnavailableError, dynamic_mix
from dynamixer_ops.backends import get_backend, registered_backends
from dynamixer_ops.reference import reference_forward as reference_mix

from dynamixer_ops.testing import GRAD_NAMES, assert_close_rel, make_inputs, reference_outputs, tolerance
from helpers import backend_device_pairs, is_interpreted, supported_dtypes, torch_threads

# Validation runs before a backend is chosen, so every backend name, runnable here or not, gives the same errors.
ALL_BACKENDS = ["auto", *sorted(set(registered_backends()) | {"cpu", "cuda", "triton"})]


@pytest.fixture(autouse=True)
def _single_thread():
    with torch_threads(1):     # see helpers.torch_threads
        yield


def _good(device="cpu", dtype=torch.float32):
    return list(make_inputs((2,), 7, 48, 2, 2, dtype=dtype, device=device))   # x, wc, bc, wg, bg; S = 2, d = 2


def _dtype(backend, device):
    dtypes = supported_dtypes(backend, device)
    return torch.float32 if torch.float32 in dtypes else dtypes[0]


# ---- validation: the functional API ----

CASES = [
    # (what to break, breaker, num_segments, expected message fragments)
    ("x rank", lambda a: a.__setitem__(0, torch.randn(7, 48)), 2, ["x must have shape (..., L, C)", "2-D"]),
    ("x 1-D", lambda a: a.__setitem__(0, torch.randn(48)), 2, ["x must have shape (..., L, C)", "1-D"]),
    ("empty L", lambda a: a.__setitem__(0, torch.randn(2, 0, 48)), 2, ["L >= 1"]),
    ("x zero channels", lambda a: a.__setitem__(0, torch.randn(2, 7, 0)), 2, ["C >= 1", "(2, 7, 0)"]),
    ("integer x", lambda a: a.__setitem__(0, torch.ones(2, 7, 48, dtype=torch.int64)), 2, ["floating-point"]),
    ("x complex", lambda a: a.__setitem__(0, torch.randn(2, 7, 48, dtype=torch.complex64)), 2, ["floating-point"]),
    ("x not a tensor", lambda a: a.__setitem__(0, 1.0), 2, ["x must be a torch.Tensor"]),
    ("C % S", lambda a: None, 5, ["C=48 is not divisible by num_segments=5"]),
    ("num_segments", lambda a: None, 0, ["num_segments must be a positive int"]),
    ("num_segments float", lambda a: None, 2.0, ["num_segments must be a positive int", "2.0"]),
    ("num_segments bool", lambda a: None, True, ["num_segments must be a positive int", "True"]),
    ("num_segments negative", lambda a: None, -2, ["num_segments must be a positive int", "-2"]),
    ("compress rows % S", lambda a: (a.__setitem__(1, torch.randn(5, 48)), a.__setitem__(2, torch.randn(5))), 2,
     ["compress_weight has 5 rows", "num_segments=2"]),
    ("compress cols", lambda a: a.__setitem__(1, torch.randn(4, 40)), 2,
     ["compress_weight must have shape", "(4, 40)"]),
    ("compress 1-D", lambda a: a.__setitem__(1, torch.randn(48)), 2, ["compress_weight must have shape", "(48)"]),
    ("not a tensor", lambda a: a.__setitem__(1, [[1.0]]), 2, ["compress_weight must be a torch.Tensor"]),
    ("generate shape", lambda a: a.__setitem__(3, torch.randn(49, 7)), 2,
     ["generate_weight must have shape (L*L, L*d) = (49, 14)", "got (49, 7)"]),
    ("generate transposed", lambda a: a.__setitem__(3, a[3].t()), 2,
     ["generate_weight must have shape (L*L, L*d) = (49, 14)", "got (14, 49)"]),
    ("generate for another L", lambda a: (a.__setitem__(3, torch.randn(64, 16)), a.__setitem__(4, torch.randn(64))), 2,
     ["generate_weight must have shape (L*L, L*d) = (49, 14)"]),
    ("generate weight not a tensor", lambda a: a.__setitem__(3, None), 2, ["generate_weight must be a torch.Tensor"]),
    ("compress bias", lambda a: a.__setitem__(2, torch.randn(3)), 2,
     ["compress_bias must have shape (S*d,) = (4,)", "got (3)"]),
    ("generate bias", lambda a: a.__setitem__(4, torch.randn(48)), 2, ["generate_bias must have shape (L*L,) = (49,)"]),
    ("dtype mismatch", lambda a: a.__setitem__(3, a[3].double()), 2, ["generate_weight has dtype torch.float64",
                                                                      "x has dtype torch.float32"]),
    ("compress bias dtype", lambda a: a.__setitem__(2, a[2].half()), 2,
     ["compress_bias has dtype torch.float16", "x has dtype torch.float32"]),
    ("device mismatch", lambda a: a.__setitem__(3, a[3].to("meta")), 2, ["generate_weight is on meta but x is on cpu"]),
    ("generate bias device", lambda a: a.__setitem__(4, a[4].to("meta")), 2, ["generate_bias is on meta"]),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("what, breaker, num_segments, fragments", CASES, ids=[c[0] for c in CASES])
def test_every_validation_error_on_every_backend(backend, what, breaker, num_segments, fragments):
    args = _good()
    breaker(args)
    with pytest.raises((ValueError, TypeError)) as info:
        dynamic_mix(*args, num_segments, backend=backend)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_backend_name_must_be_known():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*known backends: auto, reference"):
        dynamic_mix(*_good(), 2, backend="fast")
    for bad in ("", "CPU", None):
        with pytest.raises(ValueError, match="unknown backend"):
            dynamic_mix(*_good(), 2, backend=bad)


def test_available_backends_and_reasons_are_reported():
    assert "reference" in dynamixer_ops.available_backends()
    for name, reason in dynamixer_ops.unavailable_backends().items():
        assert name not in dynamixer_ops.available_backends()
        assert isinstance(reason, str) and len(reason) > 10


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

@pytest.mark.parametrize("backend", ["cuda", "cpu", "triton"])
def test_explicit_backend_that_cannot_run_says_why(backend):
    x, *weights = _good(dtype=torch.float16)     # no native CPU kernel takes float16; "cuda" needs a GPU
    try:
        can_run = get_backend(backend).why_not("cpu", torch.float16) is None
    except BackendUnavailableError:
        can_run = False
    if can_run:
        pytest.skip(f"{backend} runs float16 on cpu here")
    with pytest.raises(BackendUnavailableError, match=f"backend '{backend}'"):
        dynamic_mix(x, *weights, 2, backend=backend)


def test_gpu_only_backend_given_cpu_tensors():
    x, *weights = _good()
    with pytest.raises(BackendUnavailableError) as info:
        dynamic_mix(x, *weights, 2, backend="cuda")
    message = str(info.value)
    assert (message.startswith("backend 'cuda' cannot run these inputs: ")
            or "backend 'cuda' is not available" in message)
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
def test_double_backward_matches_float64_autograd(backend, device, seed):
    """A gradient penalty: the first-order gradients under create_graph and the gradients of a function of them
    are those of float64 autograd through the reference math."""
    dtype = _dtype(backend, device)
    inputs = [t.requires_grad_() for t in make_inputs((2,), 7, 24, 2, 2, dtype=dtype, device=device)]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    grad_y = torch.randn(inputs[0].shape, dtype=torch.float64, device=device)
    results = []
    for args, mix in ((inputs, lambda *a: dynamic_mix(*a, 2, backend=backend)),
                      (ref_inputs, lambda *a: reference_mix(*a, 2))):
        y = mix(*args)
        grads = torch.autograd.grad(y, args, grad_y.to(y.dtype), create_graph=True)
        penalty = sum((g * g).sum() for g in (grads[0], grads[3]))    # dx and d generate_weight
        results.append((grads, torch.autograd.grad(penalty, args)))
    tol = tolerance(dtype, device)
    for (grads, second), (ref_grads, ref_second) in zip([results[0]], [results[1]]):
        for name, g, ref in zip(GRAD_NAMES, grads, ref_grads):
            assert_close_rel(g, ref, tol, f"first order, create_graph: {name}")
        for name, g, ref in zip(GRAD_NAMES, second, ref_second):
            assert_close_rel(g, ref, 10 * tol, f"gradient of the penalty: {name}")


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
