"""dynamixer_ops.linear.linear(layer, x): ``layer(x)``, with a plain float32 nn.Linear's CPU products on oneDNN. It
must compute F.linear (forward, all three gradients, double backward) and call the layer itself wherever oneDNN's
kernel is not the same computation (other dtypes, autocast, a layer that is not a plain nn.Linear, hooks, torch.func
transforms, forward-mode AD)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynamixer_ops.linear import linear, onednn_linear_enabled
from dynamixer_ops.testing import relative_error


@pytest.fixture
def onednn(monkeypatch):
    """oneDNN forced on (the default is on except on Intel CPUs); skip where this torch build lacks the kernel."""
    monkeypatch.setenv("DYNAMIXER_OPS_ONEDNN_LINEAR", "1")
    if not onednn_linear_enabled():
        pytest.skip("this torch build has no oneDNN Linear kernel")


def _kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


class _Through(nn.Module):
    """A layer whose calls go through linear(): the way the fused modules call their Linears."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return linear(self.layer, x)

    @property
    def weight(self):
        return self.layer.weight

    @property
    def bias(self):
        return self.layer.bias


def _layer(bias: bool, seed: int) -> _Through:
    torch.manual_seed(seed)
    return _Through(nn.Linear(48, 40, bias=bias))


INPUTS = {
    "2d": lambda: torch.randn(37, 48),
    "4d": lambda: torch.randn(2, 5, 7, 48),
    "transposed": lambda: torch.randn(2, 7, 5, 48).transpose(1, 2),
    "strided-channels": lambda: torch.randn(3, 11, 96)[..., ::2],
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("make_x", INPUTS.values(), ids=INPUTS.keys())
def test_matches_float64_linear_forward_and_gradients(make_x, bias, onednn, seed):
    layer = _layer(bias, seed)
    x = make_x().requires_grad_()
    y = layer(x)
    grad_y = torch.randn_like(y)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(y, params, grad_y)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_y = F.linear(ref_params[0], ref_params[1], ref_params[2] if bias else None)
    ref_grads = torch.autograd.grad(ref_y, ref_params, grad_y.double())
    assert y.dtype == torch.float32 and y.shape == ref_y.shape
    for name, out, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, *grads), (ref_y, *ref_grads)):
        assert relative_error(out, ref) < 1e-5, name


def test_float32_cpu_runs_on_onednn_forward_and_both_gradients(onednn, seed):
    layer = _layer(True, seed)
    x = torch.randn(16, 48, requires_grad=True)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _kernel_names(lambda: layer(x))
    y = layer(x)
    names = _kernel_names(lambda: torch.autograd.grad(y, x, torch.randn_like(y)))
    assert "mkldnn::_linear_pointwise" in names
    y = layer(x.detach())    # only the weight (and bias) need gradients: dW = grad^T x on oneDNN too
    names = _kernel_names(lambda: torch.autograd.grad(y, layer.weight, torch.randn_like(y)))
    assert "mkldnn::_linear_pointwise" in names


def test_switched_off_is_f_linear(monkeypatch, seed):
    monkeypatch.setenv("DYNAMIXER_OPS_ONEDNN_LINEAR", "0")
    layer = _layer(True, seed)
    x = torch.randn(9, 48)
    assert not onednn_linear_enabled()
    assert "mkldnn::_linear_pointwise" not in _kernel_names(lambda: layer(x))
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_other_dtypes_are_f_linear(dtype, onednn, seed):
    layer = _layer(True, seed).to(dtype)
    x = torch.randn(9, 48, dtype=dtype)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_autocast_is_f_linear_under_autocast(onednn, seed):
    layer = _layer(True, seed)
    x = torch.randn(9, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)


def test_double_backward_matches_f_linear(onednn, seed):
    layer = _layer(True, seed)
    x = torch.randn(6, 48, requires_grad=True)
    penalties = []
    for fn in (layer, lambda t: F.linear(t, layer.weight, layer.bias)):
        (gx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(gx.square().sum(), layer.weight)[0])
    assert relative_error(penalties[0], penalties[1]) < 1e-5


def test_layers_that_are_not_plain_are_called(onednn, seed):
    """A subclass, a hooked layer, a parametrized weight: linear() calls the layer (hooks run, subclass forward
    runs), never oneDNN on the bare weight."""
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(5, 48)
    sub = Doubled(48, 40)
    assert torch.equal(linear(sub, x), sub(x))
    hooked, seen = nn.Linear(48, 40), []
    hooked.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert "mkldnn::_linear_pointwise" not in _kernel_names(lambda: linear(hooked, x))
    assert seen == [torch.Size([5, 40])]
    scaled = nn.Linear(48, 40)
    torch.nn.utils.parametrize.register_parametrization(scaled, "weight", _Half())
    assert torch.equal(linear(scaled, x), F.linear(x, scaled.weight, scaled.bias))


class _Half(nn.Module):
    def forward(self, w):
        return w / 2


def test_func_transforms_and_forward_ad_call_the_layer(onednn, seed):
    layer = _layer(True, seed)
    x, t = torch.randn(4, 48), torch.randn(4, 48)
    _, tangent = torch.func.jvp(layer, (x,), (t,))
    assert relative_error(tangent, F.linear(t, layer.weight)) < 1e-6
    per_sample = torch.func.vmap(torch.func.grad(lambda w, xi: F.linear(xi, w).sum() + linear(layer.layer, xi).sum()),
                                 in_dims=(None, 0))(layer.weight.detach(), x)
    assert per_sample.shape == (4, 40, 48)
