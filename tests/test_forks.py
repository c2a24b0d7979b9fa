"""Research forks of the seed's classes: same names and parts, a changed forward. convert() and optimize() recognise
code, not names (dynamixer_ops.known): each fork keeps its own answer (with one warning naming its class), its inner
layers whose code is the seed's are still fused, and the seed's own network (a verbatim copy of its code in
tests/seed_dynamixer.py) converts and optimizes fully."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import dynamixer_ops
import seed_dynamixer as seed
from dynamixer_ops import inference, known, nn as dnn, upstream
from dynamixer_ops.testing import relative_error
from helpers import count_calls
from test_modules import randomize_

# fp32 against the fork itself in fp32: the fused parts differ from eager only in rounding; a replaced forward
# differs by 1e-3 or more.
FORK_TOLERANCE = 1e-6


def seed_network():
    """The seed's VisionModel, small: L = 7 then 3, C/S = 24, d = 1 and 8."""
    return seed.VisionModel([1, 2], img_size=49, patch_size=7, embed_dims=[48, 72], transitions=[True, False],
                            resolutions=[7, 3], num_heads=[2, 3], reduced_dims=[1, 8], mlp_ratios=[3, 2],
                            num_classes=11)


# --- the forks: each changes one forward and keeps the names and parts ---------------------------------------

class TemperatureOp(seed.DynaMixerOp):
    """Mixing logits divided by a temperature."""

    def forward(self, x):
        B, L, C = x.shape
        w = self.compress(x).reshape(B, L, self.num_head, self.reduced_dim).permute(0, 2, 1, 3).reshape(
            B, self.num_head, -1)
        w = self.activation(self.generate(w).reshape(B, self.num_head, L, L) / 0.5)
        x = torch.matmul(x.reshape(B, L, self.num_head, C // self.num_head).permute(0, 2, 3, 1), w)
        return self.out(x.permute(0, 3, 1, 2).reshape(B, L, C))


TemperatureOp.__name__ = TemperatureOp.__qualname__ = "DynaMixerOp"


class SumBlock(seed.DynaMixerBlock):
    """The three branches summed, without the reweighting."""

    def forward(self, x):
        B, H, W, C = x.shape
        h = self.mix_h(x.permute(0, 2, 1, 3).reshape(-1, H, C)).reshape(B, W, H, C).permute(0, 2, 1, 3)
        w = self.mix_w(x.reshape(-1, W, C)).reshape(B, H, W, C)
        return self.proj_drop(self.proj(h + w + self.mlp_c(x)))


SumBlock.__name__ = SumBlock.__qualname__ = "DynaMixerBlock"


class LayerScaleBlock(seed.VisionBlock):
    """x + gamma1 * attn(norm1(x)), x + gamma2 * mlp(norm2(x))."""

    def forward(self, x):
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class VisionBlock(nn.Module):
    """A class of the seed's name and parts, not a subclass, with a post-norm forward."""

    def forward(self, x):
        x = self.norm1(x + self.drop_path(self.attn(x)))
        return self.norm2(x + self.drop_path(self.mlp(x)))


class SquaredMlp(seed.Mlp):
    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)).square())))


SquaredMlp.__name__ = SquaredMlp.__qualname__ = "Mlp"


def _swap(model, kind: str, cls: type) -> int:
    """Make every module of the seed's ``kind`` an instance of the fork ``cls`` (same parts); returns how many."""
    n = 0
    for m in list(model.modules()):
        if type(m).__name__ == kind and known.known_kind(m) == kind:
            m.__class__ = cls
            if cls is LayerScaleBlock:
                dim = m.norm1.normalized_shape[0]
                m.gamma1, m.gamma2 = nn.Parameter(torch.rand(dim)), nn.Parameter(torch.rand(dim))
            n += 1
    return n


FORKS = {
    "op_temperature": ("DynaMixerOp", TemperatureOp),
    "block_without_reweighting": ("DynaMixerBlock", SumBlock),
    "vision_block_layer_scale": ("VisionBlock", LayerScaleBlock),
    "vision_block_post_norm": ("VisionBlock", VisionBlock),
    "mlp_squared": ("Mlp", SquaredMlp),
}


def _count_fused_calls(monkeypatch):
    return count_calls(monkeypatch, dnn, "fused_dynamic_mix")


@pytest.mark.parametrize("step", ["convert", "optimize"])
@pytest.mark.parametrize("fork", sorted(FORKS))
def test_fork_keeps_its_own_answer(fork, step, seed, monkeypatch):
    kind, cls = FORKS[fork]
    model = randomize_(seed_network()).eval()
    assert _swap(model, kind, cls) > 0
    x = torch.randn(2, 3, 49, 49)
    with torch.no_grad():
        want = model(x)
    ours = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = dynamixer_ops.convert(ours)
        if step == "optimize":
            ours = dynamixer_ops.optimize(ours)
    said = [str(w.message) for w in caught if cls.__qualname__ in str(w.message) and "kept" in str(w.message)]
    if kind in ("DynaMixerOp", "DynaMixerBlock") or (kind == "VisionBlock" and step == "optimize"):
        assert len(said) == 1, [str(w.message) for w in caught]
        assert f"{cls.__module__}.{cls.__qualname__}" in said[0]
    assert sum(isinstance(m, cls) for m in ours.modules()) == sum(isinstance(m, cls) for m in model.modules())
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        got = ours(x)
    err = relative_error(got, want)
    assert err <= FORK_TOLERANCE, f"{fork} after {step}: rel {err:.2e} against the fork itself"
    # What is still the seed's code is fused: the mixers of a forked block, the blocks around a forked Mlp.
    mixers = sum(type(m).__name__ == "DynaMixerOp" for m in model.modules())
    fused = 0 if kind == "DynaMixerOp" else mixers
    assert calls[0] == fused, (calls[0], fused)


@pytest.mark.parametrize("step", ["convert", "optimize"])
def test_seed_network_converts_and_optimizes_fully(step, seed, monkeypatch):
    model = randomize_(seed_network()).eval()
    blocks = sum(known.known_kind(m) == "VisionBlock" for m in model.modules())
    x = torch.randn(2, 3, 49, 49)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dynamixer_ops.convert(copy.deepcopy(model))
        if step == "optimize":
            ours = dynamixer_ops.optimize(ours)
    assert sum(type(m) is dnn.DynaMixerBlock for m in ours.modules()) == blocks
    assert len(inference.optimized_blocks(ours)) == (blocks if step == "optimize" else 0)
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        got = ours(x)
    if step == "convert":
        assert calls[0] == 2 * blocks
    assert relative_error(got, want) <= 1e-5


def test_copy_of_the_seed_under_another_path_is_known():
    for cls in (seed.DynaMixerOp, seed.DynaMixerBlock, seed.VisionBlock, seed.Mlp):
        assert known.known_kind(cls.__new__(cls)) == cls.__name__
    for cls in (upstream.DynaMixerOp, upstream.DynaMixerBlock, upstream.VisionBlock, upstream.Mlp):
        assert known.known_kind(cls.__new__(cls)) == cls.__name__


def test_changed_helper_method_or_instance_forward_is_unknown():
    class MixFork(upstream.DynaMixerOp):      # upstream's forward calls mix: overriding it changes the layer
        def mix(self, x):
            return super().mix(x) * 2

    assert known.known_kind(MixFork(24, 7, 2)) is None
    op = upstream.DynaMixerOp(24, 7, 2)
    op.forward = lambda x: x
    assert known.known_kind(op) is None and "instance" in known.unknown_reason(op)
    with pytest.warns(UserWarning, match="kept DynaMixerOp layers as they are"):
        assert type(dynamixer_ops.convert(nn.Sequential(op))[0]) is upstream.DynaMixerOp
