"""Bad input gets a clear error naming the argument, before any kernel runs, on every backend."""
from __future__ import annotations

import pytest
import torch

import dynamixer_ops
from dynamixer_ops import BackendUnavailableError, dynamic_mix

from helpers import make_inputs


def _good(device="cpu", dtype=torch.float32):
    return list(make_inputs((2,), 7, 48, 2, 2, dtype=dtype, device=device))   # x, wc, bc, wg, bg; S = 2, d = 2


CASES = [
    # (what to break, replacement builder, num_segments, expected message fragments)
    ("x rank", lambda a: a.__setitem__(0, torch.randn(7, 48)), 2, ["x must have shape (..., L, C)", "2-D"]),
    ("C % S", lambda a: None, 5, ["C=48 is not divisible by num_segments=5"]),
    ("compress rows % S", lambda a: (a.__setitem__(1, torch.randn(5, 48)), a.__setitem__(2, torch.randn(5))), 2,
     ["compress_weight has 5 rows", "num_segments=2"]),
    ("compress cols", lambda a: a.__setitem__(1, torch.randn(4, 40)), 2, ["compress_weight must have shape", "(4, 40)"]),
    ("generate shape", lambda a: a.__setitem__(3, torch.randn(49, 7)), 2,
     ["generate_weight must have shape (L*L, L*d) = (49, 14)", "got (49, 7)"]),
    ("generate for another L", lambda a: (a.__setitem__(3, torch.randn(64, 16)), a.__setitem__(4, torch.randn(64))), 2,
     ["generate_weight must have shape (L*L, L*d) = (49, 14)"]),
    ("compress bias", lambda a: a.__setitem__(2, torch.randn(3)), 2, ["compress_bias must have shape (S*d,) = (4,)", "got (3)"]),
    ("generate bias", lambda a: a.__setitem__(4, torch.randn(48)), 2, ["generate_bias must have shape (L*L,) = (49,)"]),
    ("dtype mismatch", lambda a: a.__setitem__(3, a[3].double()), 2, ["generate_weight has dtype torch.float64",
                                                                      "x has dtype torch.float32"]),
    ("integer x", lambda a: a.__setitem__(0, torch.ones(2, 7, 48, dtype=torch.int64)), 2, ["floating-point"]),
    ("not a tensor", lambda a: a.__setitem__(1, [[1.0]]), 2, ["compress_weight must be a torch.Tensor"]),
    ("num_segments", lambda a: None, 0, ["num_segments must be a positive int"]),
    ("empty L", lambda a: a.__setitem__(0, torch.randn(2, 0, 48)), 2, ["L >= 1"]),
]


# CASES run on every backend in tests/test_misuse.py::test_every_validation_error_on_every_backend.


def test_device_mismatch_is_named():
    args = _good()
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match="generate_weight is on meta but x is on cpu"):
        dynamic_mix(*args, 2)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*known backends: auto, reference"):
        dynamic_mix(*_good(), 2, backend="fast")


@pytest.mark.parametrize("backend", ["cuda", "cpu", "triton"])
def test_explicit_backend_that_cannot_run_says_why(backend):
    x, *weights = _good(dtype=torch.float16)     # no native CPU kernel takes float16; "cuda" needs a GPU
    try:
        can_run = dynamixer_ops.backends.get_backend(backend).why_not("cpu", torch.float16) is None
    except BackendUnavailableError:
        can_run = False
    if can_run:
        pytest.skip(f"{backend} runs float16 on cpu here")
    with pytest.raises(BackendUnavailableError, match=f"backend '{backend}'"):
        dynamic_mix(x, *weights, 2, backend=backend)


def test_available_backends_and_reasons_are_reported():
    assert "reference" in dynamixer_ops.available_backends()
    for name, reason in dynamixer_ops.unavailable_backends().items():
        assert name not in dynamixer_ops.available_backends()
        assert isinstance(reason, str) and len(reason) > 10
