"""The drop-in modules (dynamixer_ops.nn) against the upstream eager layers (dynamixer_ops.upstream), and convert().

Every comparison runs the fused module in float32 against the upstream module in float64 on the same weights
(||out - ref|| / ||ref|| <= the float32 bound of docs/dynamic_mix.md), for every backend this machine can run.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import dynamixer_ops
from dynamixer_ops import nn as dnn
from dynamixer_ops import upstream
from dynamixer_ops.reference import upstream_mix
from dynamixer_ops.testing import assert_close_rel, odd_shapes, relative_error, tolerance

BACKENDS = dynamixer_ops.available_backends("cpu")
TOL32 = tolerance(torch.float32, "cpu")


def randomize_(module: nn.Module, logit_scale: float = 2.0) -> nn.Module:
    """Fresh random weights: O(1) activations, and mixing logits O(logit_scale) (a softmax that is neither
    uniform nor one-hot), unlike the default init whose tiny ``generate`` weights give an almost uniform mix."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 1:                                      # LayerNorm weights
                p.normal_(1, 0.2)
            else:
                scale = logit_scale if name.endswith("generate.weight") else 1.0
                p.normal_(0, scale / math.sqrt(p[0].numel()))
    return module


def compare_with_upstream(fused: nn.Module, eager: nn.Module, x: torch.Tensor, what: str, tol=TOL32):
    """Forward and the gradients of the input and of every parameter (by name): fused fp32 vs eager fp64.

    The bound is ``tol`` beyond the error of the eager module itself in fp32, or twice that error where it is
    larger: through a whole network (LayerNorms, residual sums) a small gradient (a bias summed over every token)
    can lose 1e-5 to fp32 rounding alone, and the fused layers must be as exact as the layers they replace, not
    more."""
    truth = copy.deepcopy(eager).double()
    eager32 = copy.deepcopy(eager).float()
    inputs = [x.detach().to(dtype).requires_grad_() for dtype in (torch.float32, torch.float64, torch.float32)]
    outs = [net(inp) for net, inp in zip((fused, truth, eager32), inputs)]
    grad_y = torch.randn_like(outs[1])
    for out in outs:
        out.backward(grad_y.to(out.dtype))
    named = [dict(net.named_parameters()) for net in (fused, truth, eager32)]
    assert named[0].keys() == named[1].keys()
    pairs = [("forward", *(o.detach() for o in outs)), ("grad of the input", *(i.grad for i in inputs))]
    pairs += [(f"grad of {name}", named[0][name].grad, named[1][name].grad, named[2][name].grad) for name in named[0]]
    for label, got, ref, eager_got in pairs:
        eager_error = relative_error(eager_got, ref)
        bound = max(tol + eager_error, 2 * eager_error)
        assert_close_rel(got, ref, bound, f"{what}: {label}")


# (N, L, C, S, d) of dynamixer_ops.testing's "modules" odd shapes.
OP_SHAPES = [(math.prod(s.batch), s.L, s.C, s.S, s.d) for s in odd_shapes("modules")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,L,C,S,d", OP_SHAPES)
def test_op_matches_upstream(seed, backend, N, L, C, S, d):
    eager = randomize_(upstream.DynaMixerOp(C, L, S, reduced_dim=d))
    fused = dnn.DynaMixerOp(C, L, S, reduced_dim=d, backend=backend)
    fused.load_state_dict(eager.state_dict(), strict=True)
    compare_with_upstream(fused, eager, torch.randn(N, L, C), f"DynaMixerOp {backend} N={N} L={L} C={C} S={S} d={d}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("B,R,C,S,d", [(2, 7, 48, 2, 2), (1, 14, 24, 1, 8)])
def test_block_matches_upstream(seed, backend, qkv_bias, B, R, C, S, d):
    eager = randomize_(upstream.DynaMixerBlock(C, resolution=R, num_head=S, reduced_dim=d, qkv_bias=qkv_bias))
    fused = dnn.DynaMixerBlock(C, resolution=R, num_head=S, reduced_dim=d, qkv_bias=qkv_bias, backend=backend)
    fused.load_state_dict(eager.state_dict(), strict=True)
    assert list(fused.state_dict()) == list(eager.state_dict())
    compare_with_upstream(fused, eager, torch.randn(B, R, R, C), f"DynaMixerBlock {backend} qkv_bias={qkv_bias}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_view_mixes_along_h_without_changing_layout(seed, backend):
    B, H, W, C, S, d = 2, 7, 5, 48, 2, 2
    op = randomize_(dnn.DynaMixerOp(C, H, S, d, backend=backend))
    x = torch.randn(B, H, W, C)
    xt = x.transpose(1, 2)                                      # (B, W, H, C) view: sequences run along H
    y = op.mix(xt)
    assert y.shape == xt.shape
    assert y.transpose(1, 2).is_contiguous(), f"y strides {y.stride()}: the transposed layout was not kept"
    # the upstream way, in float64: permute to contiguous (B*W, H, C) sequences, then mix
    weights = [t.detach().double() for t in (op.compress.weight, op.compress.bias, op.generate.weight,
                                             op.generate.bias)]
    expected = upstream_mix(x.double().permute(0, 2, 1, 3).reshape(-1, H, C), *weights, S)
    assert_close_rel(y, expected.reshape(B, W, H, C), TOL32, f"{backend}: mix of a transposed view")
    assert_close_rel(op(xt), op(xt.contiguous()), 1e-6, f"{backend}: transposed view vs contiguous copy")


def test_op_rejects_channels_not_divisible_by_heads():
    with pytest.raises(ValueError, match="dim=30 must be divisible by num_head=4"):
        dnn.DynaMixerOp(30, 7, 4)


def test_unknown_backend_is_named():
    op = dnn.DynaMixerOp(24, 7, 2, backend="nonexistent")
    with pytest.raises(ValueError, match="unknown backend 'nonexistent'"):
        op(torch.randn(1, 7, 24))


# ---------------------------------------------------------------------------------------------------------------
# convert()

def small_network(**kwargs) -> upstream.VisionModel:
    """Two stages (L = 7 then 3), a transition and a width change: every kind of module the real models have."""
    config = dict(img_size=28, patch_size=4, in_chans=2, num_classes=5, embed_dims=[24, 48],
                  transitions=[True, False], num_heads=[2, 2], reduced_dims=[2, 1], mlp_ratios=[2, 2])
    config.update(kwargs)
    return upstream.VisionModel([2, 1], **config)


def count(model, cls_name, module):
    return sum(type(m).__name__ == cls_name and type(m).__module__ == module.__name__ for m in model.modules())


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_whole_network_keeps_weights_and_logits(seed, backend):
    eager = randomize_(small_network(qkv_bias=True))
    model = copy.deepcopy(eager).eval()
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    assert count(model, "DynaMixerBlock", upstream) == 3
    out = dynamixer_ops.convert(model, backend=backend)
    assert out is model
    assert count(model, "DynaMixerBlock", upstream) == 0 and count(model, "DynaMixerOp", upstream) == 0
    assert count(model, "DynaMixerBlock", dnn) == 3 and count(model, "DynaMixerOp", dnn) == 6
    assert all(m.backend == backend for m in model.modules() if isinstance(m, dnn.DynaMixerOp))
    assert list(model.state_dict()) == keys_before
    # the very same Parameter objects: an optimizer built before convert() keeps working
    assert all(params_before[name] is p for name, p in model.named_parameters())
    assert not any(m.training for m in model.modules()), "eval mode was not kept"
    compare_with_upstream(model, eager.eval(), torch.randn(3, 2, 28, 28), f"converted network ({backend})")


def test_convert_keeps_dtype_and_sets_backend_of_fused_layers():
    model = dynamixer_ops.convert(small_network().double(), backend="reference")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, 2, 28, 28, dtype=torch.float64)).dtype == torch.float64
    dynamixer_ops.convert(model, backend="auto")         # already fused: only the backend changes
    assert {m.backend for m in model.modules() if isinstance(m, dnn.DynaMixerOp)} == {"auto"}


def test_convert_root_layer_returns_fused_replacement(seed):
    eager = randomize_(upstream.DynaMixerBlock(24, resolution=7, num_head=2))
    fused = dynamixer_ops.convert(copy.deepcopy(eager))
    assert isinstance(fused, dnn.DynaMixerBlock)
    compare_with_upstream(fused, eager, torch.randn(2, 7, 7, 24), "converted root block")
    op = dynamixer_ops.convert(upstream.DynaMixerOp(24, 7, 2))
    assert isinstance(op, dnn.DynaMixerOp)


# A stand-in for the original repository's classes: same names and structure, defined elsewhere (its
# DynaMixerOp builds its own Softmax module, as the original does).
class DynaMixerOp(upstream.DynaMixerOp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = nn.Softmax(dim=-2)


class DynaMixerBlock(upstream.DynaMixerBlock):
    def __init__(self, dim, resolution=32, num_head=8, reduced_dim=2, **kwargs):
        super().__init__(dim, resolution, num_head, reduced_dim, **kwargs)
        self.mix_h = DynaMixerOp(dim, resolution, num_head, reduced_dim)
        self.mix_w = DynaMixerOp(dim, resolution, num_head, reduced_dim)


def test_convert_recognises_foreign_classes_by_name(seed):
    eager = randomize_(nn.Sequential(nn.Linear(24, 24), DynaMixerOp(24, 7, 2, reduced_dim=1)))
    model = dynamixer_ops.convert(copy.deepcopy(eager))
    assert isinstance(model[1], dnn.DynaMixerOp)
    compare_with_upstream(model, eager, torch.randn(2, 7, 24), "converted foreign DynaMixerOp")
    block = dynamixer_ops.convert(nn.ModuleList([DynaMixerBlock(24, resolution=7, num_head=2)]))
    assert isinstance(block[0], dnn.DynaMixerBlock) and isinstance(block[0].mix_w, dnn.DynaMixerOp)


def _nested(layer):
    return nn.ModuleDict({"stage": nn.ModuleList([layer])})


def test_convert_rejects_malformed_layers():
    bad = upstream.DynaMixerOp(24, 7, 2)
    bad.generate = nn.Linear(14, 50)                                     # 50 logits is not L*L
    with pytest.raises(ValueError, match=r"stage\.0 \(DynaMixerOp\) is not a well-formed upstream DynaMixerOp: "
                                         r"generate\.weight \(50, 14\) is not \(L\*L, L\*d\)"):
        dynamixer_ops.convert(_nested(bad))
    bad = upstream.DynaMixerOp(24, 7, 2)
    bad.seq_len = 8
    with pytest.raises(ValueError, match=r"attribute seq_len=8 disagrees with the weights \(7\)"):
        dynamixer_ops.convert(_nested(bad))
    bad = upstream.DynaMixerOp(24, 7, 2)
    bad.compress = nn.Identity()
    with pytest.raises(TypeError, match=r"stage\.0 looks like an upstream DynaMixerOp but its 'compress' is "
                                        r"Identity"):
        dynamixer_ops.convert(_nested(bad))
    bad = upstream.DynaMixerBlock(24, resolution=7, num_head=2)
    del bad.mix_w
    with pytest.raises(TypeError, match=r"stage\.0 runs the DynaMixerBlock forward but lacks the submodule\(s\) "
                                        r"\['mix_w'\]"):
        dynamixer_ops.convert(_nested(bad))
    bad = upstream.DynaMixerBlock(24, resolution=7, num_head=2)
    bad.mix_h = upstream.DynaMixerOp(24, 5, 2)
    with pytest.raises(ValueError, match=r"mix_h \(dim 24, seq_len 5\) and mix_w \(dim 24, seq_len 7\) differ"):
        dynamixer_ops.convert(_nested(bad))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        dynamixer_ops.convert("model")
