"""DynaMixer-S/M/L: upstream parameter counts and state_dict keys, fused vs eager logits, timm, checkpoints."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dynamixer_ops import models, upstream
from dynamixer_ops import nn as dnn
from dynamixer_ops.testing import MODEL_TOLERANCE, assert_close_rel
from test_modules import randomize_

# Upstream README / docs/dynamic_mix.md: 1000 classes, 224x224.
PARAMS = {"s": 26_265_960, "m": 57_128_264, "l": 97_818_088}


def meta(factory, **kwargs):
    with torch.device("meta"):       # shapes only: no memory, no init time
        return factory(**kwargs)


@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_parameter_counts_and_keys_match_upstream(variant):
    fused = meta(getattr(models, f"dynamixer_{variant}"))
    eager = meta(upstream.eager_model, variant=variant)
    assert sum(p.numel() for p in eager.parameters()) == PARAMS[variant]
    assert sum(p.numel() for p in fused.parameters()) == PARAMS[variant]
    fused_sd, eager_sd = fused.state_dict(), eager.state_dict()
    assert list(fused_sd) == list(eager_sd)
    assert all(fused_sd[k].shape == eager_sd[k].shape for k in eager_sd)
    for key in ("patch_embed.proj.weight", "network.0.0.attn.mix_h.generate.weight", "norm.weight", "head.bias",
                "network.0.0.attn.reweight.fc2.weight", "network.1.proj.weight" if variant != "m" else
                "network.2.proj.weight"):                       # M's first Downsample follows stage 2
        assert key in eager_sd, key
    n_blocks = sum(isinstance(m, dnn.DynaMixerBlock) for m in fused.modules())
    assert n_blocks == sum(upstream.CONFIGS[variant]["layers"])
    assert not any(type(m) is upstream.DynaMixerBlock for m in fused.modules())   # fused blocks subclass it


def test_img_size_sets_mixing_lengths_and_options_apply():
    model = meta(models.dynamixer_m, img_size=112, num_classes=7, in_chans=1, drop_path_rate=0.2,
                 backend="reference")
    lengths = [b.attn.mix_h.seq_len for stage in model.network if isinstance(stage, nn.Sequential) for b in stage]
    assert lengths == [16] * 4 + [16] * 3 + [8] * 14 + [8] * 3           # M: transition after stage 2
    assert model.head.out_features == 7 and model.patch_embed.proj.in_channels == 1
    assert {m.backend for m in model.modules() if isinstance(m, dnn.DynaMixerOp)} == {"reference"}
    drop = [b.drop_path for stage in model.network if isinstance(stage, nn.Sequential) for b in stage]
    assert type(drop[0]) is nn.Identity and drop[-1].drop_prob == pytest.approx(0.2)
    with pytest.raises(ValueError, match="img_size=6 is too small for patch_size=7"):
        models.dynamixer_s(img_size=6)
    if models.timm is not None:
        with pytest.raises(ValueError, match="DynaMixer weights are not hosted anywhere"):
            models.dynamixer_s(pretrained=True)


@pytest.fixture(scope="module")
def s_pair():
    """DynaMixer-S at 28x28 (L = 4 then 2), eager with random weights and fused with the same weights; built on
    the meta device and materialised with to_empty() to skip the (slow, then overwritten) default init."""
    torch.manual_seed(0)
    eager = meta(upstream.eager_model, variant="s", num_classes=10, img_size=28)
    fused = meta(models.dynamixer_s, num_classes=10, img_size=28)
    eager = randomize_(eager.to_empty(device="cpu")).eval()
    fused = fused.to_empty(device="cpu").eval()
    fused.load_state_dict(eager.state_dict(), strict=True)
    return eager, fused


def test_fused_model_matches_upstream_model(seed, s_pair):
    """The whole DynaMixer-S network with random weights: the same logits."""
    eager, fused = s_pair
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert_close_rel(fused(x), copy.deepcopy(eager).double()(x.double()), MODEL_TOLERANCE[torch.float32],
                         "DynaMixer-S logits, fused fp32 vs upstream fp64 (18 blocks deep)")


def test_timm_create_model():
    timm = pytest.importorskip("timm")
    assert {"dynamixer_s", "dynamixer_m", "dynamixer_l"} <= set(timm.list_models("dynamixer*"))
    with torch.device("meta"):
        model = timm.create_model("dynamixer_s", num_classes=10, img_size=56, drop_path_rate=0.1)
    eager = meta(upstream.eager_model, variant="s", num_classes=10, img_size=56)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in eager.state_dict().items()}
    assert isinstance(model.network[0][0].attn, dnn.DynaMixerBlock)
    assert model.network[0][0].attn.mix_h.seq_len == 8 and model.network[2][0].attn.mix_h.seq_len == 4
    assert isinstance(model.network[0][1].drop_path, timm.layers.DropPath)
    assert isinstance(model.network[0][0].mlp, timm.layers.Mlp)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 56, 56)
    # keyword arguments reach the network: a narrow, shallow S that runs fast
    small = timm.create_model("dynamixer_s", num_classes=10, img_size=28, layers=[1, 1, 1, 1],
                              embed_dims=[24, 48, 48, 48], num_heads=[2, 2, 2, 2])
    with torch.no_grad():
        assert small(torch.randn(2, 3, 28, 28)).shape == (2, 10)
    small.reset_classifier(4)
    assert small.get_classifier().out_features == 4


def test_package_imports_without_timm():
    """timm is optional: dynamixer_ops and dynamixer_ops.models import and build with it blocked."""
    code = ("import sys; sys.modules['timm'] = None\n"
            "import dynamixer_ops, dynamixer_ops.models as m, torch\n"
            "with torch.device('meta'): model = m.dynamixer_s(drop_path_rate=0.1)\n"
            "assert sum(p.numel() for p in model.parameters()) == 26265960\n"
            "assert type(model.network[0][1].drop_path).__module__ == 'dynamixer_ops.upstream'\n"
            "assert model.pretrained_cfg['input_size'] == (3, 224, 224) and model.feature_info[1]['reduction'] == 14\n"
            "try: m.dynamixer_s(pretrained=True)\n"
            "except ImportError as e: assert 'needs timm' in str(e) and 'load_checkpoint' in str(e)\n"
            "else: raise AssertionError('pretrained=True without timm built a model')\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# load_checkpoint

def tiny_model(num_classes=3):
    return upstream.VisionModel([1, 1], img_size=14, patch_size=2, in_chans=1, num_classes=num_classes,
                                embed_dims=[24, 24], transitions=[True, False], num_heads=[2, 2], reduced_dims=[2, 2],
                                mlp_ratios=[2, 2], mlp_fn=dnn.DynaMixerBlock)


@pytest.mark.parametrize("layout", ["bare", "model", "state_dict", "ddp", "compiled", "ema"])
def test_load_checkpoint_round_trip(tmp_path, seed, layout):
    source = randomize_(tiny_model())
    sd = source.state_dict()
    payload = {"bare": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd, "epoch": 3},
               "ddp": {f"module.{k}": v for k, v in sd.items()},
               "compiled": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
               "ema": {"model_ema": sd, "epoch": 3}}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    target = tiny_model()
    assert models.load_checkpoint(target, path) is target
    for key, value in target.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_upstream_checkpoint_loads_into_fused_model(tmp_path, seed, s_pair):
    eager, _ = s_pair
    path = tmp_path / "upstream.pth"
    torch.save({"state_dict": eager.state_dict(), "epoch": 300}, path)
    fused = models.load_checkpoint(meta(models.dynamixer_s, num_classes=10, img_size=28).to_empty(device="cpu"),
                                   path)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert_close_rel(fused.eval()(x), eager(x), MODEL_TOLERANCE[torch.float32],
                         "logits after load_checkpoint")


def test_load_checkpoint_errors(tmp_path):
    sd = tiny_model().state_dict()
    path = tmp_path / "ckpt.pth"

    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")} | {"extra.weight": torch.ones(1)}, path)
    with pytest.raises(RuntimeError, match=r"2 missing key\(s\): head\.weight, head\.bias; "
                                           r"1 unexpected key\(s\): extra\.weight"):
        models.load_checkpoint(tiny_model(), path)

    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"2 shape mismatch\(es\): head\.weight: checkpoint \(3, 24\) vs "
                                           r"model \(5, 24\), head\.bias: checkpoint \(3,\) vs model \(5,\)"):
        models.load_checkpoint(tiny_model(num_classes=5), path, strict=False)

    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match=r"holds no state_dict .* found keys epoch, optimizer"):
        models.load_checkpoint(tiny_model(), path)

    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        models.load_checkpoint(tiny_model(), os.path.join(tmp_path, "missing.pth"))

    # strict=False tolerates missing and unexpected keys (e.g. a new head), never wrong shapes
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, path)
    models.load_checkpoint(tiny_model(), path, strict=False)
