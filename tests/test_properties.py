"""Property-based tests: for random shapes, batch layouts, strides, biases and gradient layouts, the forward and all
five gradients of every available backend and dtype agree with the float64 reference.

Each (backend, device, dtype) runs ``scaled_settings(n)`` examples: ``n`` at hypothesis' default profile, 10x under
``pytest --hypothesis-profile=long``. A failing example is shrunk and printed by hypothesis; its torch seed is part
of the example, so the printed example replays exactly.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from dynamixer_ops import dynamic_mix

from _hypothesis_profiles import scaled_settings
from dynamixer_ops.testing import assert_close_rel, assert_matches_reference, make_inputs, reference_outputs, tolerance
from helpers import backend_dtype_triples, is_interpreted, torch_threads, triple_id


@pytest.fixture(autouse=True)
def _single_thread():
    with torch_threads(1):     # see helpers.torch_threads; test_determinism.py covers the thread count itself
        yield

# How x is laid out in memory (the op must read every one of these correctly):
LAYOUTS = (
    "contiguous",
    "transposed",        # (B, H=L, W, C) viewed as (B, W, L, C): mixing along H without a copy
    "sliced",            # a token- and channel-slice of a larger tensor: gaps between rows and sequences
    "channel_strided",   # every other channel of a wider tensor: stride(-1) == 2
    "token_major",       # a (..., C, L) tensor transposed: stride(-1) == L
    "batch_permuted",    # leading dims swapped: flattening them needs a copy
)
GRAD_LAYOUTS = ("contiguous", "reversed", "expanded")


@st.composite
def mix_cases(draw, interpreted: bool):
    """One call: shapes, layouts, bias flags, logit scale and the torch seed of its random tensors."""
    # The Triton interpreter runs each program in Python: keep its shapes small (its own grid covers L = 32).
    L = draw(st.integers(1, 12 if interpreted else 40))
    S = draw(st.integers(1, 3 if interpreted else 4))
    e0 = draw(st.integers(1, 6 if interpreted else 33))          # channels per segment, C / S
    d = draw(st.integers(1, 3 if interpreted else 8))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout in ("transposed", "batch_permuted"):
        lead = draw(st.lists(st.integers(1, 3), min_size=2, max_size=3 if layout == "batch_permuted" else 2))
    else:
        lead = draw(st.lists(st.integers(1, 2 if interpreted else 4), min_size=1, max_size=3))
    if draw(st.integers(0, 9)) == 0:                            # one example in ten: no sequences at all
        lead[draw(st.integers(0, len(lead) - 1))] = 0
    return dict(lead=tuple(lead), L=L, S=S, C=S * e0, d=d, layout=layout,
                compress_bias=draw(st.booleans()), generate_bias=draw(st.booleans()),
                logit_scale=draw(st.sampled_from([0.3, 1.0, 4.0])), grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)),
                seed=draw(st.integers(0, 2**31 - 1)))


def build_x(case, dtype, device):
    lead, L, C = case["lead"], case["L"], case["C"]
    layout = case["layout"]
    if layout == "contiguous":
        return torch.randn(*lead, L, C, dtype=dtype, device=device)
    if layout == "transposed":
        B, W = lead
        return torch.randn(B, L, W, C, dtype=dtype, device=device).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(*lead, L + 3, C + 2, dtype=dtype, device=device)[..., 2:L + 2, 1:C + 1]
    if layout == "channel_strided":
        return torch.randn(*lead, L, 2 * C, dtype=dtype, device=device)[..., ::2]
    if layout == "token_major":
        return torch.randn(*lead, C, L, dtype=dtype, device=device).transpose(-1, -2)
    if layout == "batch_permuted":
        return torch.randn(lead[1], lead[0], *lead[2:], L, C, dtype=dtype, device=device).transpose(0, 1)
    raise ValueError(layout)


def build_grad_y(case, shape, dtype, device):
    if case["grad_layout"] == "contiguous":
        return torch.randn(shape, dtype=dtype, device=device)
    if case["grad_layout"] == "reversed":       # every stride reversed, stride(-1) != 1 unless the shape is trivial
        return torch.randn(tuple(reversed(shape)), dtype=dtype, device=device).permute(*reversed(range(len(shape))))
    return torch.randn(shape[-2:], dtype=dtype, device=device).expand(shape)   # zero strides: the grad of y.sum(0)


@pytest.mark.parametrize("backend, device, dtype", backend_dtype_triples(),
                         ids=[triple_id(t) for t in backend_dtype_triples()])
def test_forward_and_all_gradients_match_float64_reference(backend, device, dtype):
    interpreted = is_interpreted(backend, device)

    @scaled_settings(6 if interpreted else 30)
    @given(case=mix_cases(interpreted))
    def check(case):
        torch.manual_seed(case["seed"])
        S, d = case["S"], case["d"]
        _, wc, bc, wg, bg = make_inputs((1,), case["L"], case["C"], S, d, dtype=dtype, device=device,
                                        bias=True, logit_scale=case["logit_scale"])
        x = build_x(case, dtype, device)
        bc = bc if case["compress_bias"] else None
        bg = bg if case["generate_bias"] else None
        inputs = (x, wc, bc, wg, bg)
        leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        y = dynamic_mix(*leaves, S, backend=backend)
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        grad_y = build_grad_y(case, y.shape, dtype, device)
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(y, wanted, grad_y)
        assert_matches_reference(y, grads, inputs, S, grad_y, tolerance(dtype, device))

    check()


@st.composite
def segment_shapes(draw):
    L = draw(st.integers(2, 9))
    S = draw(st.integers(2, 4))
    return L, S, draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend, device, dtype", backend_dtype_triples(),
                         ids=[triple_id(t) for t in backend_dtype_triples()])
def test_segments_and_sequences_are_independent(backend, device, dtype):
    """Changing one sequence's tokens in one segment's channels changes only that sequence's y, and only in that
    segment's channels (where a kernel mixes up tile or segment offsets, values leak across)."""
    interpreted = is_interpreted(backend, device)

    @scaled_settings(3 if interpreted else 10)
    @given(shape=segment_shapes())
    def check(shape):
        L, S, e0, d, seed = shape
        torch.manual_seed(seed)
        N, C = 3, S * e0
        x, *weights = make_inputs((N,), L, C, S, d, dtype=dtype, device=device)
        # Zero compress weights on segment 1's channels, so its x enters only through the apply step.
        weights[0] = weights[0].clone()
        weights[0][:, e0:2 * e0] = 0
        x2 = x.clone()
        x2[1, :, e0:2 * e0] = torch.randn(L, e0, dtype=dtype, device=device)
        y1 = dynamic_mix(x, *weights, S, backend=backend)
        y2 = dynamic_mix(x2, *weights, S, backend=backend)
        changed = torch.zeros(N, L, C, dtype=torch.bool, device=device)
        changed[1, :, e0:2 * e0] = True
        assert torch.equal(y1[~changed], y2[~changed]), "y changed outside the sequence and segment that changed"
        ref_y, _ = reference_outputs((x2, *weights), S, torch.ones_like(y2))
        assert_close_rel(y2, ref_y, tolerance(dtype, device), "y")
        assert math.isfinite(y2.double().norm().item())

    check()


@pytest.mark.parametrize("backend, device, dtype", backend_dtype_triples(),
                         ids=[triple_id(t) for t in backend_dtype_triples()])
def test_one_channel_with_a_last_stride_other_than_one(backend, device, dtype, seed):
    """Found by the property test: with C = 1, x and grad_y can be "contiguous" while stride(-1) != 1, so
    ``.contiguous()`` returned them unchanged and a kernel that checks the contract rejected them."""
    def one_channel():      # (4, 3, 1) with strides (3, 1, 3): the last stride is free, C being 1
        return torch.randn(4, 3, dtype=dtype, device=device).unsqueeze(-1).as_strided((4, 3, 1), (3, 1, 3))

    x, grad_y = one_channel(), one_channel()
    _, *weights = make_inputs((4,), 3, 1, 1, 2, dtype=dtype, device=device)
    assert x.is_contiguous() and x.stride(-1) != 1
    inputs = (x, *weights)
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = dynamic_mix(*leaves, 1, backend=backend)
    grads = torch.autograd.grad(y, leaves, grad_y)
    assert_matches_reference(y, grads, inputs, 1, grad_y, tolerance(dtype, device))


def test_hypothesis_profile_option_works():
    """``pytest --hypothesis-profile=long`` needs the profiles registered before hypothesis reads the option
    (tests/conftest.py imports them); without that, pytest stops with "Profile 'long' is not registered"."""
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-m", "pytest", "--hypothesis-profile=long", "--collect-only", "-q",
                             "-p", "no:cacheprovider", os.path.join(here, "test_properties.py")],
                            cwd=os.path.dirname(here), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
