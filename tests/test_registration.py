"""The op as torch sees it: opcheck of both custom ops for every backend, and torch.compile(fullgraph=True)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dynamixer_ops import dynamic_mix

from dynamixer_ops.testing import assert_close_rel, make_inputs, reference_outputs
from helpers import backend_device_pairs, supported_dtypes


def _dtype(backend, device):
    dtypes = supported_dtypes(backend, device)
    return torch.float32 if torch.float32 in dtypes else dtypes[0]


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_opcheck_forward_and_backward(backend, device, layout, seed):
    x, wc, bc, wg, bg = make_inputs((2, 3), 7, 48, 2, 2, dtype=_dtype(backend, device), device=device, layout=layout)
    args = (x.requires_grad_(), wc.requires_grad_(), bc.requires_grad_(), wg.requires_grad_(),
            bg.requires_grad_(), 2, backend)
    torch.library.opcheck(torch.ops.dynamixer_ops.dynamic_mix.default, args)
    grad_y = torch.randn_like(args[0]).detach()
    torch.library.opcheck(torch.ops.dynamixer_ops.dynamic_mix_backward.default,
                          (grad_y, *(a.detach() for a in args[:5]), 2, backend))


@pytest.mark.skipif(not any(b == "cpu" for b, _ in backend_device_pairs()),
                    reason="the native CPU backend is not built")
def test_opcheck_keep_variants_cpu(seed):
    """The training-step pair that keeps P (used by backends with forward_keep: cpu, from d = 4)."""
    x, wc, bc, wg, bg = make_inputs((2, 3), 7, 48, 2, 4, dtype=torch.float32, device="cpu", layout="transposed")
    args = (x.requires_grad_(), wc.requires_grad_(), bc.requires_grad_(), wg.requires_grad_(), bg.requires_grad_(),
            2, "cpu")
    torch.library.opcheck(torch.ops.dynamixer_ops.dynamic_mix_keep.default, args)
    _, probs = torch.ops.dynamixer_ops.dynamic_mix_keep(*(a.detach() if torch.is_tensor(a) else a for a in args))
    grad_y = torch.randn_like(x).detach()
    torch.library.opcheck(torch.ops.dynamixer_ops.dynamic_mix_backward_kept.default,
                          (grad_y, x.detach(), probs, *(a.detach() for a in args[1:5]), 2, "cpu"))


class _Mixer(torch.nn.Module):
    def __init__(self, L, C, S, d, backend):
        super().__init__()
        self.compress = torch.nn.Linear(C, S * d)
        self.generate = torch.nn.Linear(L * d, L * L)
        self.S, self.backend = S, backend

    def forward(self, x):   # x: (B, H, W, C); mixes along H through a transposed view, as the block does
        y = dynamic_mix(x.transpose(1, 2), self.compress.weight, self.compress.bias, self.generate.weight,
                        self.generate.bias, self.S, backend=self.backend)
        return torch.relu(y.transpose(1, 2)) * 2


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("backend, device", backend_device_pairs())
def test_torch_compile_fullgraph(backend, device, compile_backend, seed):
    torch._dynamo.reset()
    module = _Mixer(7, 48, 2, 2, backend).to(device=device, dtype=_dtype(backend, device))
    x = torch.randn(2, 7, 3, 48, device=device, dtype=_dtype(backend, device), requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend=compile_backend)
    out = compiled(x)
    expected = module(x)
    assert_close_rel(out, expected, 1e-6, "compiled output")
    grad_compiled = torch.autograd.grad(out.sum(), [x, module.generate.weight])
    grad_eager = torch.autograd.grad(expected.sum(), [x, module.generate.weight])
    for a, b in zip(grad_compiled, grad_eager):
        assert_close_rel(a, b, 1e-6, "compiled gradient")


def test_autocast_casts_inputs_to_the_autocast_dtype(seed):
    inputs = make_inputs((2,), 7, 48, 2, 2, dtype=torch.float32, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dynamic_mix(*inputs, 2)
    assert y.dtype == torch.bfloat16
    ref_y, _ = reference_outputs(inputs, 2, torch.ones(2, 7, 48))
    assert_close_rel(y, ref_y, 2e-2, "y under autocast")


def test_import_loads_neither_timm_nor_torchvision():
    """The op costs an import of torch and nothing heavier: timm and torchvision load only with the models (and a
    torchvision that cannot load beside this torch does not break the op)."""
    code = ("import sys, dynamixer_ops, dynamixer_ops.nn; from dynamixer_ops import dynamic_mix, convert, optimize; "
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
