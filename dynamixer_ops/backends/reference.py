"""The ``reference`` backend: the plain-PyTorch math, on any device and floating dtype (fp16/bf16 computed in fp32)."""
from __future__ import annotations

import torch

from . import Backend, register_backend
from ..reference import reference_backward, reference_forward

_HALF = (torch.float16, torch.bfloat16)


def _upcast(*tensors):
    return [t.float() if t.dtype in _HALF else t for t in tensors]


def _forward(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, y):
    upcast = _upcast(x, compress_weight, compress_bias, generate_weight, generate_bias)
    y.copy_(reference_forward(*upcast, num_segments))


def _backward(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, *grads):
    inputs = _upcast(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias)
    for out, value in zip(grads, reference_backward(*inputs, num_segments)):
        out.copy_(value)


register_backend(Backend(
    name="reference", forward=_forward, backward=_backward, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    priority={"cpu": 90, "cuda": 90},
))
