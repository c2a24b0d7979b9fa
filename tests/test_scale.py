"""Scale: batches far larger than any tile, block or thread split; launches split into chunks; offsets into x past
2**31 elements (int32 index math would wrap) without allocating them."""
from __future__ import annotations

import pytest
import torch


from dynamixer_ops.testing import assert_matches_reference, make_inputs, tolerance
from helpers import backend_device_pairs, is_interpreted, op_outputs, supported_dtypes


def _dtype(backend, device):
    dtypes = supported_dtypes(backend, device)
    return torch.float32 if torch.float32 in dtypes else dtypes[0]


def _check(inputs, S, grad_y, backend, dtype, device):
    y, grads = op_outputs(inputs, S, grad_y, backend)
    assert_matches_reference(y, grads, inputs, S, grad_y, tolerance(dtype, device))


@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_a_few_hundred_thousand_sequences(backend, device, seed):
    """300,001 sequences of L = 3 (the Triton interpreter: 3,001, every tile and partition ragged), at the default
    thread count: every per-thread or per-program partial sum of the weight gradients is exercised."""
    N = 3_001 if is_interpreted(backend, device) else 300_001
    dtype = _dtype(backend, device)
    inputs = make_inputs((N,), 3, 4, 2, 1, dtype=dtype, device=device)
    _check(inputs, 2, torch.randn(N, 3, 4, dtype=dtype, device=device), backend, dtype, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend, device", [p for p in backend_device_pairs() if p[1] == "cuda"])
def test_more_sequences_than_a_grid_dimension_holds(backend, device, seed):
    """2**20 + 3 sequences: more programs than grid dims y/z allow (65,535) for any layout of sequences."""
    N = 2**20 + 3
    dtype = _dtype(backend, device)
    inputs = make_inputs((N,), 2, 4, 2, 1, dtype=dtype, device=device)
    _check(inputs, 2, torch.randn(N, 2, 4, dtype=dtype, device=device), backend, dtype, device)


@pytest.mark.parametrize("backend, device", [p for p in backend_device_pairs() if p[1] == "cpu"])
def test_offsets_past_2_31_elements(backend, device, seed):
    """x's second sequence starts 2**31 + 64 elements after its first: a kernel that forms sequence offsets in
    int32 reads the wrong memory. The 8 GiB buffer is only reserved (torch.empty does not touch it); two sequences
    of it are written."""
    L, C, S, d = 7, 24, 2, 2
    dtype = _dtype(backend, device)
    stride = 2**31 + 64
    try:
        buffer = torch.empty(stride + L * C, dtype=dtype, device=device)
    except RuntimeError as exc:         # an address space or overcommit limit
        pytest.skip(f"cannot reserve {stride * dtype.itemsize / 2**30:.0f} GiB of address space: {exc}")
    x = buffer.as_strided((2, L, C), (stride, C, 1))
    x.copy_(torch.randn(2, L, C, dtype=dtype, device=device))
    _, *weights = make_inputs((2,), L, C, S, d, dtype=dtype, device=device)
    _check((x, *weights), S, torch.randn(2, L, C, dtype=dtype, device=device), backend, dtype, device)


def _triton_kernels():
    try:
        from dynamixer_triton import dynamic_mix as module
    except ImportError:
        module = None
    if module is None or not hasattr(module, "MAX_GRID"):
        pytest.skip("no Triton launcher with a MAX_GRID chunking limit")
    return module


@pytest.mark.parametrize("device", [dev for b, dev in backend_device_pairs() if b == "triton"])
def test_triton_launch_split_into_chunks(device, monkeypatch, seed):
    """The Triton launcher splits a launch of more than MAX_GRID programs (2**31 - 1, grid dim 0) into chunks of
    sequences, each with its own first sequence. Real chunking needs ~2**31 programs; lowering MAX_GRID makes
    every tile its own launch, and the last one ragged."""
    kernels = _triton_kernels()
    monkeypatch.setattr(kernels, "MAX_GRID", 1)
    N, L, C, S, d = 37, 5, 12, 3, 2
    dtype = _dtype("triton", device)
    inputs = make_inputs((N,), L, C, S, d, dtype=dtype, device=device)
    launches = []
    original = kernels._Plan.chunks

    def counting_chunks(plan):
        for chunk in original(plan):
            launches.append(chunk)
            yield chunk

    monkeypatch.setattr(kernels._Plan, "chunks", counting_chunks)
    _check(inputs, S, torch.randn(N, L, C, dtype=dtype, device=device), "triton", dtype, device)
    assert len(launches) > 2, f"expected several chunks per launch, got {launches}"
