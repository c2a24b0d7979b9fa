"""dynamixer_ops.optimize: the CPU inference path of whole networks against the upstream network (float64), its
fallbacks (each part that it does not cover runs the block's own forward), and its packed weights following
in-place updates."""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import dynamixer_ops
from dynamixer_ops import inference, linear, models, upstream
from dynamixer_ops.linear import onednn_dtype_reason, packed_linear_reason
from dynamixer_ops.testing import MODEL_TOLERANCE, relative_error
from helpers import count_calls
from test_modules import randomize_

pytestmark = pytest.mark.skipif(packed_linear_reason(torch.float32) is not None,
                                reason=str(packed_linear_reason(torch.float32)))

# A small network with odd shapes: L = 7 then 3 (img 49, patch 7, one transition), C/S = 24, d = 1 and 8.
TINY = dict(layers=[1, 2], img_size=49, patch_size=7, transitions=[True, False], embed_dims=[48, 72],
            num_heads=[2, 3], reduced_dims=[1, 8], mlp_ratios=[3, 2], num_classes=11)

# DynaMixer-S's stages and transitions, narrower (C/S = 24) so that a test builds it in milliseconds.
SMALL_S = dict(num_classes=13, layers=[2, 1, 1, 1], embed_dims=[48, 72, 72, 72], num_heads=[2, 3, 3, 3])


def _pair(kind: str):
    """(upstream network, our optimized network with its weights); ``kind``: models (a narrow DynaMixer-S at 35 px:
    L = 5 then 2) or convert (the tiny network, converted)."""
    if kind == "models":
        ref = randomize_(upstream.eager_model("s", img_size=35, **SMALL_S))
        ours = models.dynamixer_s(img_size=35, **SMALL_S)
        ours.load_state_dict(ref.state_dict())
    else:
        ref = randomize_(upstream.VisionModel(**TINY))
        ours = dynamixer_ops.convert(copy.deepcopy(ref))
    return ref.eval(), dynamixer_ops.optimize(ours.eval())


@pytest.fixture
def calls(monkeypatch):
    """How many blocks ran the inference path."""
    return count_calls(monkeypatch, inference, "_inference_forward")


def _image(batch, size, dtype=torch.float32):
    return torch.randn(batch, 3, size, size).to(dtype)


def _size(kind):
    return 35 if kind == "models" else 49


@pytest.mark.parametrize("kind,batch", [("models", 1), ("convert", 1), ("convert", 3)])
def test_float32_inference_matches_upstream(kind, batch, seed, calls):
    ref, ours = _pair(kind)
    blocks = inference.optimized_blocks(ours)
    assert blocks and len(blocks) == sum(type(m).__name__ == "VisionBlock" for m in ref.modules())
    x = _image(batch, _size(kind))
    want = copy.deepcopy(ref).double()(x.double())
    with torch.no_grad():
        got = ours(x)
    assert calls[0] == len(blocks)
    err = relative_error(got, want)
    assert err <= MODEL_TOLERANCE[torch.float32], err


@pytest.mark.parametrize("kind", ["models", "convert"])
@pytest.mark.parametrize("how", ["bf16_model", "autocast"])
def test_bfloat16_inference_matches_upstream(kind, how, seed, calls):
    ref, ours = _pair(kind)
    x = _image(2, _size(kind))
    want = copy.deepcopy(ref).double()(x.double())
    with torch.no_grad():
        if how == "bf16_model":
            got = ours.bfloat16()(x.bfloat16())
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = ours(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                upstream_err = relative_error(ref(x), want)
    # Where oneDNN has no bf16 kernels (an AVX2-only CPU) every block runs its own forward, saying why.
    unsupported = onednn_dtype_reason(torch.bfloat16)
    assert calls[0] == (0 if unsupported else len(inference.optimized_blocks(ours)))
    if unsupported:
        block = _first_block(ours)
        side, channels = block.attn.resolution, block.norm1.normalized_shape[0]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert "bfloat16" in block.inference_reason(x.new_empty(1, side, side, channels))
    err = relative_error(got, want)
    assert err <= MODEL_TOLERANCE[torch.bfloat16], err
    if how == "autocast":   # the same arithmetic as the upstream network under autocast: errors of one size
        assert err <= 2 * upstream_err + 1e-3, (err, upstream_err)


def test_training_and_grad_run_the_blocks_own_forward(seed, calls):
    ref, ours = _pair("convert")
    plain = dynamixer_ops.convert(copy.deepcopy(ref)).eval()
    x = _image(2, 49)
    assert torch.equal(ours(x), plain(x))                  # grad enabled: the fused training path, bit for bit
    ours.train(), plain.train()
    assert torch.equal(ours(x), plain(x))
    assert calls[0] == 0
    ours(x).square().mean().backward()
    plain(x).square().mean().backward()
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def _first_block(model):
    return next(m for m in model.modules() if isinstance(m, inference.InferenceBlock))


@pytest.mark.parametrize("change", ["hook", "relu", "skip_lam", "wrapped_linear", "tanh_gelu", "training",
                                    "dropout_training"])
def test_what_the_path_does_not_cover_falls_back(change, seed, calls):
    ref, ours = _pair("convert")
    block, ref_block = _first_block(ours), next(m for m in ref.modules() if type(m).__name__ == "VisionBlock")
    if change == "hook":
        block.mlp.fc1.register_forward_hook(lambda m, i, o: o * 2)
        ref_block.mlp.fc1.register_forward_hook(lambda m, i, o: o * 2)
    elif change == "relu":
        block.mlp.act = ref_block.mlp.act = nn.ReLU()
    elif change == "skip_lam":
        block.skip_lam = ref_block.skip_lam = 2.0
    elif change == "wrapped_linear":
        block.attn.proj = nn.Sequential(block.attn.proj)
        ref_block.proj = None
        ref_block.attn.proj = nn.Sequential(ref_block.attn.proj)
    elif change == "tanh_gelu":
        block.mlp.act = ref_block.mlp.act = nn.GELU(approximate="tanh")
    elif change == "training":
        block.train()
        ref_block.train()
    elif change == "dropout_training":      # one submodule in training mode: p = 0, so the same answer
        block.attn.proj_drop.train()
    x = _image(2, 49)
    with torch.no_grad():
        why = block.inference_reason(x.new_empty(2, 7, 7, 48))
        want = copy.deepcopy(ref).double()(x.double())
        got = ours(x)
    blocks = len(inference.optimized_blocks(ours))
    if change == "tanh_gelu":              # covered: oneDNN's tanh GELU post-op
        assert why is None and calls[0] == blocks
    else:
        assert why is not None and calls[0] == blocks - 1, why
    err = relative_error(got, want)
    assert err <= MODEL_TOLERANCE[torch.float32], err


@pytest.mark.parametrize("update", ["in_place", "load_state_dict", "new_parameter", "optimizer"])
def test_packed_weights_follow_weight_updates(update, seed):
    ref, ours = _pair("convert")
    x = _image(1, 49)
    with torch.no_grad():
        ours(x)                                            # packs every Linear
    block = _first_block(ours)
    if update == "in_place":
        with torch.no_grad():
            block.mlp.fc1.weight.mul_(1.5)
    elif update == "load_state_dict":
        ref2 = randomize_(copy.deepcopy(ref))
        ours.load_state_dict(ref2.state_dict())
    elif update == "new_parameter":
        block.attn.proj.weight = nn.Parameter(torch.randn_like(block.attn.proj.weight))
    else:
        opt = torch.optim.SGD(ours.parameters(), lr=0.5)
        ours.train()
        ours(x).square().mean().backward()
        opt.step()
        ours.eval()
    want = dynamixer_ops.convert(_unoptimized(ours)).double()(x.double())
    with torch.no_grad():
        got = ours(x)
    err = relative_error(got, want)
    assert err <= MODEL_TOLERANCE[torch.float32], err


def _unoptimized(model):
    """A copy of ``model`` whose blocks run their own forward."""
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if isinstance(m, inference.InferenceBlock):
            m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, inference.InferenceBlock))
    return copied


def test_optimize_keeps_keys_classes_and_copies(seed):
    ref, ours = _pair("convert")
    keys = list(ref.state_dict())
    assert list(ours.state_dict()) == keys
    block = _first_block(ours)
    assert isinstance(block, upstream.VisionBlock) and type(block).__name__ == "VisionBlock"
    twin = copy.deepcopy(ours)
    x = _image(1, 49)
    with torch.no_grad():
        assert relative_error(twin(x), ours(x)) <= 1e-6
    buffer = io.BytesIO()
    torch.save(ours, buffer)                               # a whole model, pickled
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert len(inference.optimized_blocks(loaded)) == len(inference.optimized_blocks(ours))
    with torch.no_grad():
        assert relative_error(loaded(x), ours(x)) <= 1e-6
    assert dynamixer_ops.optimize(ours) is ours            # idempotent
    upstream_only = dynamixer_ops.optimize(copy.deepcopy(ref))     # nothing fused: nothing changes
    assert not inference.optimized_blocks(upstream_only)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dynamixer_ops.optimize("model")


_NO_BF16_SCRIPT = """
import copy, torch, dynamixer_ops
from dynamixer_ops import upstream
from dynamixer_ops.linear import onednn_dtype_reason, packed_linear_reason
from dynamixer_ops.testing import MODEL_TOLERANCE, relative_error
assert onednn_dtype_reason(torch.bfloat16) is not None
torch.manual_seed(0)
ref = upstream.VisionModel(layers=[1, 1], img_size=49, patch_size=7, transitions=[True, False], embed_dims=[48, 72],
                           num_heads=[2, 3], reduced_dims=[1, 8], mlp_ratios=[3, 2], num_classes=11).eval()
ours = dynamixer_ops.optimize(dynamixer_ops.convert(copy.deepcopy(ref)))
x = torch.randn(2, 3, 49, 49)
want = copy.deepcopy(ref).double()(x.double())
with torch.no_grad():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = ours(x)
    bf16 = ours.bfloat16()(x.bfloat16())
for got in (amp, bf16):
    assert relative_error(got, want) <= MODEL_TOLERANCE[torch.bfloat16], relative_error(got, want)
"""


def test_bfloat16_without_onednn_bf16_falls_back_and_agrees():
    """A CPU without oneDNN bf16 kernels (AVX2 only), rehearsed on any CPU by capping oneDNN at AVX2."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    subprocess.run([sys.executable, "-c", _NO_BF16_SCRIPT], env=env, check=True, timeout=300)


@pytest.mark.parametrize("post", ["none", "gelu", "tanh_gelu", "residual"])
@pytest.mark.parametrize("product", linear.PRODUCTS)
def test_every_product_computes_the_linear(product, post, seed, monkeypatch):
    """Each candidate of the per-shape choice is F.linear (+ GELU or the residual), odd shapes, float64 truth."""
    if product not in linear.product_candidates(torch.float32):
        pytest.skip(f"{product} cannot run float32 here")
    monkeypatch.setenv("DYNAMIXER_OPS_PRODUCT", product)
    layer = nn.Linear(24, 37)
    x = torch.randn(3, 7, 7, 24)
    residual = torch.randn(3, 7, 7, 37) if post == "residual" else None
    act, algorithm = {"gelu": ("gelu", "none"), "tanh_gelu": ("gelu", "tanh")}.get(post, ("none", "none"))
    state = torch.get_rng_state()
    with torch.no_grad():
        got = linear.packed_linear(layer, x, torch.float32, act, algorithm, residual)
    assert torch.equal(torch.get_rng_state(), state), "choosing a product drew from the user's random stream"
    want = nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    if act == "gelu":
        want = nn.functional.gelu(want, approximate=algorithm)
    if residual is not None:
        want = want + residual.double()
    assert relative_error(got, want) <= 1e-6


def test_product_choice_is_made_once_per_shape(seed, monkeypatch):
    monkeypatch.delenv("DYNAMIXER_OPS_PRODUCT", raising=False)
    layer = nn.Linear(17, 9)
    with torch.no_grad():
        for _ in range(3):
            linear.packed_linear(layer, torch.randn(5, 17), torch.float32)
    (kind,) = [kind for key, kind in linear.product_choices().items() if key[:3] == (5, 17, 9)]
    assert kind in linear.product_candidates(torch.float32)


def test_forward_ad_under_no_grad_keeps_the_tangent(seed, calls):
    """no_grad does not switch forward-mode AD off: the inference path (which would drop the tangent) stands aside."""
    from torch.autograd import forward_ad
    ref, ours = _pair("convert")
    x, v = _image(1, 49), _image(1, 49)
    with torch.no_grad(), forward_ad.dual_level():
        want = forward_ad.unpack_dual(ref(forward_ad.make_dual(x, v))).tangent
        got = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, v))).tangent
    assert calls[0] == 0 and got is not None
    assert relative_error(got, want) <= MODEL_TOLERANCE[torch.float32]
