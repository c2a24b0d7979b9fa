"""DynaMixer-S/M/L as timm models: pretrained_cfg, features_only / forward_intermediates, gradient checkpointing,
layer decay, classifier API, pretrained loading from a local file, torch.compile, FX; numbers against upstream.

The S/M/L layouts (stage transitions, widths per stage, reduced_dim) are kept; depth and width shrink to one
narrow block per stage at 28x28 (mixing lengths 4 and 2) so that each test runs in well under a second.
"""
from __future__ import annotations

import argparse
import copy
import functools

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from dynamixer_ops import models, upstream  # noqa: E402
from dynamixer_ops import nn as dnn  # noqa: E402
from dynamixer_ops.testing import MODEL_TOLERANCE, assert_close_rel  # noqa: E402
from test_modules import randomize_  # noqa: E402

VARIANTS = ("s", "m", "l")
# Each variant's layout, one block per stage, narrow (embed_dims keep the variant's width pattern).
SMALL = {"s": dict(layers=[1, 1, 1, 1], embed_dims=[24, 48, 48, 48], num_heads=[2, 2, 2, 2]),
         "m": dict(layers=[1, 1, 1, 1], embed_dims=[24, 24, 48, 48], num_heads=[2, 2, 2, 2]),
         "l": dict(layers=[1, 1, 1, 1], embed_dims=[24, 48, 48, 48], num_heads=[2, 2, 2, 2])}
SIDE = 28
TOL = MODEL_TOLERANCE[torch.float32]     # a network's outputs (dynamixer_ops.testing)


def fused_small(variant, **kwargs):
    kwargs = dict(SMALL[variant], img_size=SIDE, num_classes=5) | kwargs
    return timm.create_model(f"dynamixer_{variant}", **kwargs)


def upstream_small(variant, **kwargs):
    kwargs = dict(SMALL[variant], img_size=SIDE, num_classes=5) | kwargs
    return randomize_(upstream.eager_model(variant, **kwargs)).eval()


def pair(variant, **kwargs):
    """(upstream with random weights, the fused timm model with the same weights), both in eval mode."""
    eager = upstream_small(variant, **kwargs)
    fused = fused_small(variant, **kwargs)
    fused.load_state_dict(eager.state_dict(), strict=True)
    return eager, fused.eval()


def upstream_stages(eager, x):
    """Upstream's stage outputs, (B, H, W, C), by running its own modules."""
    x = eager.forward_embeddings(x)
    outs = []
    for module in eager.network:
        x = module(x)
        if not isinstance(module, upstream.Downsample):
            outs.append(x)
    return outs


def meta_model(name, **kwargs):
    with torch.device("meta"):      # shapes only: no memory, no init time
        return timm.create_model(name, **kwargs)


@functools.cache
def published(variant):
    """The published configuration on the meta device, built once (tests must not modify it)."""
    return meta_model(f"dynamixer_{variant}")


# ---------------------------------------------------------------------------------------------------------------
# 1. built by build_model_with_cfg, with a pretrained_cfg

@pytest.mark.parametrize("variant", VARIANTS)
def test_pretrained_cfg_and_keys(variant):
    name = f"dynamixer_{variant}"
    model = published(variant)
    cfg = model.pretrained_cfg
    assert type(model) is models.DynaMixer and cfg["architecture"] == name
    assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"] is True
    assert cfg["classifier"] == "head" and cfg["first_conv"] == "patch_embed.proj"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert model.num_features == model.head_hidden_size == upstream.CONFIGS[variant]["embed_dims"][-1]
    with torch.device("meta"):
        eager = upstream.eager_model(variant)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in eager.state_dict().items()]
    # the data config follows img_size / in_chans (the mixing lengths are weight shapes)
    small = meta_model(name, img_size=56, in_chans=1)
    assert small.pretrained_cfg["input_size"] == (1, 56, 56)
    assert timm.data.resolve_data_config({}, model=small)["input_size"] == (1, 56, 56)
    assert small.network[0][0].attn.mix_h.seq_len == 8
    with pytest.raises(ValueError, match=r"square input .* img_size=\(56, 28\)"):
        meta_model(name, img_size=(56, 28))


# ---------------------------------------------------------------------------------------------------------------
# 2. features_only, forward_intermediates, prune_intermediate_layers

def test_feature_info_of_the_published_variants():
    infos = {v: published(v).feature_info for v in VARIANTS}
    assert infos["s"] == [dict(num_chs=192, reduction=7, module="network.0"),
                          dict(num_chs=384, reduction=14, module="network.2"),
                          dict(num_chs=384, reduction=14, module="network.3"),
                          dict(num_chs=384, reduction=14, module="network.4")]
    assert infos["m"] == [dict(num_chs=256, reduction=7, module="network.0"),       # no Downsample: same width
                          dict(num_chs=256, reduction=7, module="network.1"),
                          dict(num_chs=512, reduction=14, module="network.3"),
                          dict(num_chs=512, reduction=14, module="network.4")]
    assert [i["num_chs"] for i in infos["l"]] == [256, 512, 512, 512]
    for variant, info in infos.items():
        model = published(variant)
        for entry in info:
            assert isinstance(model.get_submodule(entry["module"]), nn.Sequential)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_intermediates_match_upstream(seed, variant):
    eager, fused = pair(variant)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        ref = upstream_stages(copy.deepcopy(eager).double(), x.double())
        ref_features = copy.deepcopy(eager).double().forward_features(x.double())
        final, inter = fused.forward_intermediates(x)
        assert len(inter) == 4
        for i, (got, want) in enumerate(zip(inter, ref)):
            assert got.shape == want.permute(0, 3, 1, 2).shape == (2, fused.feature_info[i]["num_chs"],
                                                                    SIDE // fused.feature_info[i]["reduction"],
                                                                    SIDE // fused.feature_info[i]["reduction"])
            assert_close_rel(got, want.permute(0, 3, 1, 2), TOL, f"stage {i} (NCHW)")
        assert_close_rel(final, ref_features, TOL, "forward_intermediates' final features")
        assert torch.equal(final, fused.forward_features(x))

        nhwc = fused.forward_intermediates(x, indices=[0, -1], output_fmt="NHWC", intermediates_only=True)
        assert [t.shape for t in nhwc] == [ref[0].shape, ref[-1].shape]
        assert torch.equal(nhwc[0], inter[0].permute(0, 2, 3, 1)) and torch.equal(nhwc[1], inter[3].permute(0, 2, 3, 1))
        last2 = fused.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        assert [torch.equal(a, b) for a, b in zip(last2, inter[2:])] == [True, True]
        normed = fused.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        assert torch.equal(normed.permute(0, 2, 3, 1).flatten(1, 2), final)     # norm: the final norm, last stage
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NHWC', got 'NLC'"):
        fused.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("variant", VARIANTS)
def test_features_only_backbone(seed, variant):
    eager = upstream_small(variant)
    backbone = fused_small(variant, features_only=True, out_indices=(1, 3))
    assert type(backbone).__name__ == "FeatureGetterNet"
    backbone.model.load_state_dict(eager.state_dict(), strict=False)    # pruned: no head, norm
    info = backbone.feature_info
    full = fused_small(variant).feature_info
    assert info.channels() == [full[1]["num_chs"], full[3]["num_chs"]]
    assert info.reduction() == [full[1]["reduction"], full[3]["reduction"]]
    assert info.module_name() == [full[1]["module"], full[3]["module"]]
    assert isinstance(backbone.model.norm, nn.Identity) and isinstance(backbone.model.head, nn.Identity)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        feats = backbone.eval()(x)
        ref = upstream_stages(copy.deepcopy(eager).double(), x.double())
    assert len(feats) == 2
    for got, want, i in zip(feats, (ref[1], ref[3]), (1, 3)):
        assert_close_rel(got, want.permute(0, 3, 1, 2), TOL, f"features_only stage {i}")
    # default: every stage
    assert len(fused_small(variant, features_only=True).feature_info) == 4


def test_prune_intermediate_layers():
    model = fused_small("s")
    assert model.prune_intermediate_layers(indices=(0, 1)) == [0, 1]
    assert len(model.network) == 3 and isinstance(model.head, nn.Identity) and model.num_classes == 0
    assert isinstance(model.norm, nn.LayerNorm)
    model.prune_intermediate_layers(indices=1, prune_norm=True)
    assert isinstance(model.norm, nn.Identity)


# ---------------------------------------------------------------------------------------------------------------
# 3. gradient checkpointing, group_matcher / layer decay, classifier API

@pytest.mark.parametrize("variant", VARIANTS)
def test_grad_checkpointing_same_gradients(seed, variant):
    """Training mode with drop-path (random) and the backward through the op: the same loss and gradients
    (bit for bit) with checkpointing, for forward and forward_intermediates."""
    model = fused_small(variant, drop_path_rate=0.3)
    randomize_(model).train()
    x = torch.randn(2, 3, SIDE, SIDE)

    def step(enable, intermediates):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        if intermediates:
            final, inter = model.forward_intermediates(x)
            loss = final.square().mean() + sum(t.square().mean() for t in inter)
        else:
            loss = model(x).square().mean()
        loss.backward()
        # a branch that drop-path removed for the whole batch leaves its parameters without a gradient
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    for intermediates in (False, True):
        loss, grads = step(False, intermediates)
        loss_ckpt, grads_ckpt = step(True, intermediates)
        assert torch.equal(loss, loss_ckpt)
        assert grads.keys() == grads_ckpt.keys()
        assert [n for n, g in grads.items() if g is None] == [n for n, g in grads_ckpt.items() if g is None]
        for name in grads:
            assert grads[name] is None or torch.equal(grads[name], grads_ckpt[name]), name
    # the drop-path masks did vary: another seed gives another loss
    model.set_grad_checkpointing(False)
    torch.manual_seed(2)
    assert not torch.equal(model(x).square().mean().detach(), loss)


@pytest.mark.parametrize("variant, blocks", [("s", 18), ("m", 24), ("l", 36)])
def test_layer_decay_groups(variant, blocks):
    """timm's layer decay: stem, one group per block, the Downsample between stages, the head; the final norm
    with the last block."""
    from timm.optim import param_groups_layer_decay
    model = published(variant)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale = {name_of[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert sorted(scale) == sorted(name_of.values())
    n_layers = 1 + blocks + 1 + 1                       # stem, blocks, one Downsample, head
    assert len({g["lr_scale"] for g in groups}) == n_layers
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.75 ** (n_layers - 1))
    assert scale["head.weight"] == 1.0
    last = f"network.{len(model.network) - 1}.{upstream.CONFIGS[variant]['layers'][-1] - 1}.mlp.fc2.weight"
    assert scale["norm.weight"] == scale[last] == pytest.approx(0.75)
    first_down = next(i for i, m in enumerate(model.network) if isinstance(m, upstream.Downsample))
    down = scale[f"network.{first_down}.proj.weight"]
    before = scale[f"network.{first_down - 1}.0.norm1.weight"]
    after = scale[f"network.{first_down + 1}.0.norm1.weight"]
    assert before < down < after
    assert model.no_weight_decay() == set()
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + len(model.network) + 1     # stem, each stage / Downsample, the rest (norm, head)


def test_classifier_api(seed):
    eager, fused = pair("s")
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        logits = fused(x)
        assert_close_rel(logits, copy.deepcopy(eager).double()(x.double()), TOL, "logits")
        pooled = fused.forward_head(fused.forward_features(x), pre_logits=True)
        assert fused.get_classifier() is fused.head
        fused.reset_classifier(0)
        assert fused.num_classes == 0 and torch.equal(fused(x), pooled) and pooled.shape == (2, 48)
        fused.reset_classifier(7, global_pool="")
        assert fused(x).shape == (2, 4, 7)                  # per token: no pooling
        assert fused_small("s", num_classes=0, global_pool="")(x).shape == (2, 4, 48)
    with pytest.raises(ValueError, match="global_pool must be 'avg' .* got 'max'"):
        fused.reset_classifier(3, global_pool="max")


# ---------------------------------------------------------------------------------------------------------------
# 4. pretrained=True from a local file

@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "ddp", "timm_train_ema", "model_ema"])
def test_pretrained_from_file(tmp_path, seed, layout):
    eager = upstream_small("m")
    other = randomize_(upstream_small("m"))         # the non-EMA weights where a file has both
    sd, decoy = eager.state_dict(), other.state_dict()
    payload = {"bare": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd, "epoch": 3},
               "ddp": {"model": {f"module.{k}": v for k, v in sd.items()}},
               # timm's train script: args pickled, EMA weights next to the plain ones (timm loads the EMA)
               "timm_train_ema": {"epoch": 300, "arch": "dynamixer_m", "state_dict": decoy, "state_dict_ema": sd,
                                  "args": argparse.Namespace(model="dynamixer_m", lr=2e-3)},
               "model_ema": {"model": decoy, "model_ema": sd}}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    # num_classes: the checkpoint's classes (else timm drops its head: see the next test)
    model = fused_small("m", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert_close_rel(model(x), copy.deepcopy(eager).double()(x.double()), TOL, f"logits after loading ({layout})")


def test_pretrained_head_resized_or_dropped(tmp_path, seed):
    eager = upstream_small("l")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": eager.state_dict()}, path)
    overlay = dict(file=str(path), num_classes=5)        # the checkpoint's classes
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        ref_features = copy.deepcopy(eager).double().forward_features(x.double())
        for num_classes in (3, 0):
            model = fused_small("l", num_classes=num_classes, pretrained=True, pretrained_cfg_overlay=overlay).eval()
            assert model.num_classes == num_classes
            assert_close_rel(model.forward_features(x), ref_features, TOL, f"features (num_classes={num_classes})")
            if num_classes:
                assert model.head.weight.shape == (3, 48)
            else:
                assert isinstance(model.head, nn.Identity) and model(x).shape == (2, 48)
        backbone = fused_small("l", features_only=True, pretrained=True, pretrained_cfg_overlay=overlay)
        assert_close_rel(backbone.eval()(x)[-1], upstream_stages(copy.deepcopy(eager).double(), x.double())[-1]
                         .permute(0, 3, 1, 2), TOL, "features_only from a checkpoint")


def test_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match=r"not hosted anywhere .*ziyuwwang/DynaMixer.*pretrained_cfg_overlay="
                                         r"dict\(file="):
        timm.create_model("dynamixer_s", pretrained=True)
    path = tmp_path / "ckpt.pth"
    torch.save(upstream_small("s", img_size=56).state_dict(), path)          # another image size
    with pytest.raises(RuntimeError, match=r"does not fit this DynaMixer .* shape mismatch\(es\): "
                                           r"network\.0\.0\.attn\.mix_h\.generate\.weight: checkpoint \(64, 16\) vs "
                                           r"model \(16, 8\)"):
        fused_small("s", num_classes=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="holds no state_dict"):
        fused_small("s", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


# ---------------------------------------------------------------------------------------------------------------
# 5. torch.compile: no graph break from the model-level code

@pytest.mark.parametrize("variant, what, ckpt", [("s", "forward", False), ("s", "forward", True),
                                                ("s", "forward_intermediates", False),
                                                ("s", "forward_intermediates", True),
                                                ("m", "forward", True), ("l", "forward_intermediates", True)])
def test_no_graph_breaks(variant, what, ckpt):
    """forward and forward_intermediates, with and without checkpointing, trace into one graph."""
    model = fused_small(variant, drop_path_rate=0.1).train()
    model.set_grad_checkpointing(ckpt)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(getattr(model, what))(torch.randn(2, 3, SIDE, SIDE))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_training_step_matches_eager(seed):
    """One fullgraph-compiled training step (aot_eager: the autograd graph, no codegen) of the S layout with
    checkpointing: the loss and gradients of eager mode."""
    model = fused_small("s").train()
    randomize_(model)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, SIDE, SIDE)
    target = torch.randint(0, 5, (2,))

    def step(fn):
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(fn(x), target)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    loss, grads = step(model)
    loss_c, grads_c = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert_close_rel(loss_c, loss, TOL, "compiled loss")
    for g, gc in zip(grads, grads_c):
        assert_close_rel(gc, g, TOL, "compiled gradient")


# ---------------------------------------------------------------------------------------------------------------
# 6. FX: the fused layers are leaves

def test_fx_feature_extraction(seed):
    from timm.models import create_feature_extractor
    eager, fused = pair("s")
    assert timm.layers.is_notrace_module(dnn.DynaMixerBlock) and timm.layers.is_notrace_module(dnn.DynaMixerOp)
    extractor = create_feature_extractor(fused, return_nodes={"network.0": "s0", "network.4": "s3", "head": "out"})
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        got = extractor(x)
        ref = upstream_stages(copy.deepcopy(eager).double(), x.double())
        assert_close_rel(got["s0"], ref[0], TOL, "FX stage 0")
        assert_close_rel(got["s3"], ref[3], TOL, "FX stage 3")
        assert torch.equal(got["out"], fused(x))
