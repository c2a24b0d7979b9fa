"""DynaMixer-S/M/L with the fused mixing block: the upstream network, same state_dict keys and shapes.

    from dynamixer_ops.models import dynamixer_s, load_checkpoint
    model = dynamixer_s(num_classes=100, img_size=224, backend="auto")
    load_checkpoint(model, "dynamixer_s.pth")     # an upstream checkpoint loads as is

    import timm, dynamixer_ops.models             # importing registers dynamixer_s/m/l with timm
    model = timm.create_model("dynamixer_s", num_classes=10)

The network is :class:`dynamixer_ops.upstream.VisionModel` with :class:`dynamixer_ops.nn.DynaMixerBlock` as its
mixing block, and timm's ``Mlp``, ``DropPath`` and ``trunc_normal_`` where timm is installed (the plain-torch
equivalents in :mod:`dynamixer_ops.upstream` otherwise: same parameters, same initialisation).
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

from . import upstream
from .nn import DynaMixerBlock

__all__ = ["dynamixer_s", "dynamixer_m", "dynamixer_l", "create", "load_checkpoint", "default_cfgs"]

try:
    import timm
    from timm.layers import DropPath, Mlp, trunc_normal_
except ImportError:     # timm is optional: the models build the same without it
    timm = None
    DropPath, Mlp, trunc_normal_ = upstream.DropPath, upstream.Mlp, nn.init.trunc_normal_

# ImageNet mean / std (timm's IMAGENET_DEFAULT_MEAN / _STD) and upstream's evaluation crops.
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
default_cfgs = {
    f"dynamixer_{v}": dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=crop,
                           interpolation="bicubic", mean=_MEAN, std=_STD, first_conv="patch_embed.proj",
                           classifier="head")
    for v, crop in (("s", 0.9), ("m", 0.9), ("l", 0.875))
}

# Arguments timm.create_model passes to every entrypoint, meaningless here (no hosted weights).
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def create(variant: str, *, num_classes: int = 1000, img_size: int = 224, in_chans: int = 3,
           drop_path_rate: float = 0., backend: str = "auto", **kwargs) -> upstream.VisionModel:
    """DynaMixer-``variant`` (``"s"``, ``"m"``, ``"l"``) with fused mixing; ``kwargs`` go to ``VisionModel``.

    ``img_size`` sets the mixing lengths (``img_size // 7`` in the first stage, halved at a transition);
    ``backend`` is passed to :func:`dynamixer_ops.dynamic_mix`.
    """
    if kwargs.pop("pretrained", False):
        raise ValueError("dynamixer_ops ships no pretrained weights: build the model, then "
                         "load_checkpoint(model, path) with an upstream or dynamixer_ops checkpoint")
    for key in _TIMM_ARGS:
        kwargs.pop(key, None)
    model = upstream.build(variant, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                           drop_path_rate=drop_path_rate, mlp_fn=functools.partial(DynaMixerBlock, backend=backend),
                           mlp_layer=Mlp, drop_path_layer=DropPath, init_fn=trunc_normal_, **kwargs)
    model.default_cfg = model.pretrained_cfg = dict(default_cfgs[f"dynamixer_{variant}"],
                                                    num_classes=num_classes, input_size=(in_chans, img_size, img_size))
    return model


def dynamixer_s(pretrained=False, **kwargs) -> upstream.VisionModel:
    """DynaMixer-S, fused (26,265,960 parameters at 1000 classes). Options: see :func:`create`."""
    return create("s", pretrained=pretrained, **kwargs)


def dynamixer_m(pretrained=False, **kwargs) -> upstream.VisionModel:
    """DynaMixer-M, fused (57,128,264 parameters at 1000 classes). Options: see :func:`create`."""
    return create("m", pretrained=pretrained, **kwargs)


def dynamixer_l(pretrained=False, **kwargs) -> upstream.VisionModel:
    """DynaMixer-L, fused (97,818,088 parameters at 1000 classes). Options: see :func:`create`."""
    return create("l", pretrained=pretrained, **kwargs)


if timm is not None:
    from timm.models import register_model

    for _fn in (dynamixer_s, dynamixer_m, dynamixer_l):
        register_model(_fn)


def load_checkpoint(model: nn.Module, path, *, strict: bool = True, map_location="cpu",
                    weights_only: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model``; returns ``model``.

    Accepts a bare state_dict or a dict holding it under ``"model"``, ``"state_dict"`` or ``"state_dict_ema"``
    (tried in that order); a ``module.`` prefix (DistributedDataParallel) is stripped. With ``strict`` (default)
    a missing, unexpected or mis-shaped key raises a ``RuntimeError`` that lists them. ``weights_only`` is
    ``torch.load``'s: training checkpoints that pickle other objects (e.g. timm's ``args``) need ``False``, for
    files you trust.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {os.fspath(path)!r}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    state_dict = checkpoint
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "state_dict_ema"):
            if isinstance(checkpoint.get(key), dict):
                state_dict = checkpoint[key]
                break
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        found = f"keys {_head(list(checkpoint))}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"load_checkpoint: {os.fspath(path)!r} holds no state_dict (expected a dict of tensors, "
                         f"bare or under 'model' / 'state_dict'); found {found}")
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}

    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        parts = [f"{len(missing)} missing key(s): {_head(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected key(s): {_head(unexpected)}" if unexpected else "",
                 f"{len(mismatched)} shape mismatch(es): {_head(mismatched)}" if mismatched else ""]
        raise RuntimeError(f"load_checkpoint: {os.fspath(path)!r} does not fit {type(model).__name__}: "
                           + "; ".join(p for p in parts if p))
    model.load_state_dict(state_dict, strict=strict)
    return model


def _head(items, n: int = 10) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
