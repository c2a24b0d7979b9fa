"""DynaMixer-S/M/L with the fused mixing block, built the way timm builds its own models.

    import timm, dynamixer_ops.models              # importing registers dynamixer_s/m/l with timm
    model = timm.create_model("dynamixer_s", num_classes=10)
    model = timm.create_model("dynamixer_s", pretrained=True,
                              pretrained_cfg_overlay=dict(file="dynamixer_s.pth"))     # an upstream checkpoint
    backbone = timm.create_model("dynamixer_m", features_only=True, out_indices=(1, 3))   # NCHW feature maps

The network is :class:`DynaMixer`: :class:`dynamixer_ops.upstream.VisionModel` (same module tree, state_dict
keys and forward arithmetic) with :class:`dynamixer_ops.nn.DynaMixerBlock` as its mixing block, timm's ``Mlp``,
``DropPath`` and ``trunc_normal_`` where timm is installed (the plain-torch equivalents in
:mod:`dynamixer_ops.upstream` otherwise: same parameters, same initialisation), and timm's model API on top:
``forward_intermediates`` / ``prune_intermediate_layers`` (one feature per stage), ``set_grad_checkpointing``,
``group_matcher``, ``no_weight_decay``, ``get_classifier`` / ``reset_classifier``. Without timm the models build
the same and run, and :func:`load_checkpoint` loads weights; ``features_only``, ``pretrained=True`` and
``forward_intermediates`` need timm.
"""

import functools
import os
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import nn as fused_nn
from . import upstream
from .linear import linear

__all__ = ["DynaMixer", "dynamixer_s", "dynamixer_m", "dynamixer_l", "create", "load_checkpoint",
           "checkpoint_filter_fn", "default_cfgs"]

try:
    import timm
except ImportError:     # timm is optional: the models build the same without it
    timm = feature_take_indices = None
    DropPath, Mlp, trunc_normal_ = upstream.DropPath, upstream.Mlp, nn.init.trunc_normal_
else:                   # a timm that lacks these fails here, by name
    from timm.layers import DropPath, Mlp, register_notrace_module, trunc_normal_
    from timm.models import build_model_with_cfg, register_model, resolve_pretrained_cfg
    from timm.models._features import feature_take_indices      # what timm's own models use (not re-exported)

if timm is not None:
    class TokenMlp(Mlp):
        """timm's ``Mlp`` (same submodules, keys and arithmetic) whose Linears run through
        :func:`dynamixer_ops.linear.linear`: oneDNN's float32 CPU GEMM where that is exact, the layer itself
        everywhere else (a quantized, LoRA-wrapped or hooked ``fc1`` is called as it is)."""

        def forward(self, x: Tensor) -> Tensor:
            if torch.jit.is_scripting():        # TorchScript calls the layers (timm's Mlp.forward)
                return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
            x = self.drop1(self.act(linear(self.fc1, x)))
            return self.drop2(linear(self.fc2, self.norm(x)))
else:
    TokenMlp = Mlp

# Where weights come from: nowhere hosted (the upstream repository publishes none).
_NO_WEIGHTS = ("DynaMixer weights are not hosted anywhere (https://github.com/ziyuwwang/DynaMixer publishes none): "
               "pass a checkpoint you trained or obtained, timm.create_model({name!r}, pretrained=True, "
               "pretrained_cfg_overlay=dict(file='{name}.pth')), or build the model and call "
               "dynamixer_ops.models.load_checkpoint(model, path)")

# ImageNet mean / std (timm's IMAGENET_DEFAULT_MEAN / _STD) and upstream's evaluation crops. fixed_input_size:
# the mixing length of each stage (a weight shape) is tied to the image side.
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
default_cfgs = {
    f"dynamixer_{v}": dict(url="", num_classes=1000, input_size=(3, 224, 224), fixed_input_size=True,
                           pool_size=None, crop_pct=crop, interpolation="bicubic", mean=_MEAN, std=_STD,
                           first_conv="patch_embed.proj", classifier="head", license="mit",
                           origin_url="https://github.com/ziyuwwang/DynaMixer",
                           paper_name="DynaMixer: A Vision MLP Architecture with Dynamic Mixing",
                           paper_ids="arXiv:2201.12083")
    for v, crop in (("s", 0.9), ("m", 0.9), ("l", 0.875))
}


class DynaMixer(upstream.VisionModel):
    """The DynaMixer network (:class:`dynamixer_ops.upstream.VisionModel`) with timm's model API.

    Adds to ``VisionModel``'s arguments ``global_pool`` (``"avg"``: mean over tokens, upstream's head; ``""``:
    none, ``forward_head`` keeps the tokens). One feature per stage (``feature_info``): the stage's output
    (B, C, H, W), reduction = the patch stride times 2 per transition before it.
    """

    def __init__(self, layers, *, global_pool: str = "avg", **kwargs):
        super().__init__(layers, **kwargs)
        _check_pool(global_pool)
        self.global_pool = global_pool
        self.head_hidden_size = self.num_features
        self.grad_checkpointing = False
        self.stage_indices: List[int] = []      # positions in `network` of the stages (the rest: Downsamples)
        self.feature_info = []
        reduction = self.patch_embed.proj.stride[0]
        for idx, module in enumerate(self.network):
            if isinstance(module, upstream.Downsample):
                reduction *= module.proj.stride[0]
            else:
                self.stage_indices.append(idx)
                self.feature_info.append(dict(num_chs=module[0].norm1.normalized_shape[0], reduction=reduction,
                                              module=f"network.{idx}"))

    # --- timm's optimizer / training API ------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer decay: the stem, then one group per block (per stage when ``coarse``),
        a Downsample between the stages it joins, the final norm with the last block; the head last."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^network\.(\d+)" if coarse else [
                (r"^network\.(\d+)\.(\d+)\.", None),     # a block: (stage position, block)
                (r"^network\.(\d+)\.proj\.", (0,)),     # a Downsample: its own position in `network`
                (r"^norm\.", (99999,)),                 # 99999: timm's "merge with the previous group"
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward (``torch.utils.checkpoint``, RNG state kept, so
        drop-path draws and gradients are the same as without)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()    # no position embeddings or tokens; timm's optimizers already skip 1-D parameters

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none, the model returns pooled features); ``global_pool``
        (``"avg"`` or ``""``) when given."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        super().reset_classifier(num_classes)

    # --- forward -------------------------------------------------------------------------------------------
    def _run(self, module: nn.Module, x: Tensor) -> Tensor:
        """One entry of ``network`` (a stage or a Downsample); blocks checkpointed when enabled."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            if isinstance(module, nn.Sequential):
                for block in module:
                    x = checkpoint(block, x, use_reentrant=False)
                return x
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normalised tokens (B, tokens, C), as ``VisionModel.forward_features``."""
        x = self.forward_embeddings(x)
        for module in self.network:
            if torch.jit.is_scripting():    # TorchScript takes no module as an argument (nor checkpoints)
                x = module(x)
            else:
                x = self._run(module, x)
        return self.norm(x.flatten(1, 2))       # (B, H, W, C) -> (B, H*W, C): upstream's reshape(B, -1, C)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """The stages' outputs, as timm 1.0 models return them.

        Args:
            indices: stages to return: the last n if an int, these (negative from the end) if a sequence, all if
                None. norm: pass the last stage's output through the final norm (the other stages have no norm
                of their own). stop_early: stop after the last stage asked for (with ``intermediates_only``).
            output_fmt: ``"NCHW"`` (default) or ``"NHWC"`` (the blocks' own layout, no copy).
            intermediates_only: return only the list.

        Returns:
            ``(forward_features(x), intermediates)``, or the list of intermediates.
        """
        if feature_take_indices is None:
            raise ImportError("DynaMixer.forward_intermediates needs timm (pip install timm)")
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stage_indices), indices)
        take = [self.stage_indices[i] for i in take_indices]
        last_stage = self.stage_indices[-1]
        network = self.network
        if stop_early and intermediates_only:
            network = network[:self.stage_indices[max_index] + 1]
        x = self.forward_embeddings(x)
        intermediates = []
        for idx, module in enumerate(network):
            x = self._run(module, x)
            if idx in take:
                y = self.norm(x) if norm and idx == last_stage else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x.flatten(1, 2)), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (and the final norm / the head); returns the indices."""
        if feature_take_indices is None:
            raise ImportError("DynaMixer.prune_intermediate_layers needs timm (pip install timm)")
        take_indices, max_index = feature_take_indices(len(self.stage_indices), indices)
        self.network = self.network[:self.stage_indices[max_index] + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _check_pool(global_pool) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"DynaMixer: global_pool must be 'avg' (mean over tokens) or '' (none), got {global_pool!r}")


def _square(img_size) -> int:
    """img_size as an int; timm passes (H, W) for a fixed-input-size model, which must be square."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f"DynaMixer needs a square input (H = W: both are mixing lengths), got "
                             f"img_size={tuple(img_size)}")
        img_size = img_size[0]
    return int(img_size)


def _fused_model(variant: str, *, img_size=224, backend: str = "auto", **kwargs) -> DynaMixer:
    if variant not in upstream.CONFIGS:
        raise ValueError(f"unknown DynaMixer variant {variant!r}; expected one of {sorted(upstream.CONFIGS)}")
    config = dict(upstream.CONFIGS[variant], patch_size=upstream.PATCH_SIZE, img_size=_square(img_size),
                  mlp_fn=functools.partial(fused_nn.DynaMixerBlock, backend=backend), mlp_layer=TokenMlp,
                  drop_path_layer=DropPath, init_fn=trunc_normal_)
    config.update(kwargs)
    return DynaMixer(**config)


def create(variant: str, pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer-``variant`` (``"s"``, ``"m"``, ``"l"``) with fused mixing, through timm's
    ``build_model_with_cfg`` where timm is installed.

    Keyword arguments: ``num_classes`` (1000), ``img_size`` (224; sets the mixing lengths, ``img_size //
    upstream.PATCH_SIZE`` in the first stage, halved at a transition), ``in_chans`` (3), ``drop_path_rate``,
    ``global_pool``, ``backend`` (passed to :func:`dynamixer_ops.dynamic_mix`), any other
    :class:`dynamixer_ops.upstream.VisionModel` argument, and timm's ``features_only`` / ``out_indices`` /
    ``feature_cls``, ``pretrained_cfg`` / ``pretrained_cfg_overlay`` (``file=`` a local checkpoint for
    ``pretrained=True``, in any form :func:`checkpoint_filter_fn` accepts). The model's
    ``pretrained_cfg["input_size"]`` follows ``img_size`` and ``in_chans``. The upstream eager network of the same
    variant: :func:`dynamixer_ops.upstream.eager_model`.
    """
    name = f"dynamixer_{variant}"
    if timm is None:
        if pretrained or kwargs.get("features_only"):
            what = "pretrained=True" if pretrained else "features_only=True"
            raise ImportError(f"{name}({what}) needs timm (pip install timm); without it build the model and call "
                              f"dynamixer_ops.models.load_checkpoint(model, path)")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        model = _fused_model(variant, **kwargs)
        img_size, in_chans = _square(kwargs.get("img_size", 224)), kwargs.get("in_chans", 3)
        model.default_cfg = model.pretrained_cfg = dict(default_cfgs[name], num_classes=model.num_classes,
                                                        input_size=(in_chans, img_size, img_size))
        return model

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    base = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.get("pretrained_cfg"))
    kwargs["img_size"] = img_size = _square(kwargs.get("img_size", base.input_size[-2:]))
    kwargs["in_chans"] = in_chans = kwargs.get("in_chans", base.input_size[0])
    overlay["input_size"] = (in_chans, img_size, img_size)     # the data config follows the model
    if pretrained:
        cfg = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay)
        if not any((cfg.file, cfg.url, cfg.hf_hub_id, cfg.state_dict)):
            raise ValueError(_NO_WEIGHTS.format(name=name))
    return build_model_with_cfg(functools.partial(_fused_model, variant), name, pretrained,
                                pretrained_cfg_overlay=overlay, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)


def dynamixer_s(pretrained=False, **kwargs) -> DynaMixer:
    """DynaMixer-S, fused (26,265,960 parameters at 1000 classes). Options: see :func:`create`."""
    return create("s", pretrained=pretrained, **kwargs)


def dynamixer_m(pretrained=False, **kwargs) -> DynaMixer:
    """DynaMixer-M, fused (57,128,264 parameters at 1000 classes). Options: see :func:`create`."""
    return create("m", pretrained=pretrained, **kwargs)


def dynamixer_l(pretrained=False, **kwargs) -> DynaMixer:
    """DynaMixer-L, fused (97,818,088 parameters at 1000 classes). Options: see :func:`create`."""
    return create("l", pretrained=pretrained, **kwargs)


if timm is not None:
    for _fn in (dynamixer_s, dynamixer_m, dynamixer_l):
        register_model(_fn)
    # FX (timm's and torchvision's feature extraction, timm's FX tests) keeps the fused layers whole: their
    # input checks branch on shapes, and the op is one opaque call anyway.
    register_notrace_module(fused_nn.DynaMixerBlock)
    register_notrace_module(fused_nn.DynaMixerOp)
    register_notrace_module(TokenMlp)      # a leaf too: its eager oneDNN products and a traced F.linear differ in bits


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

_WRAPPERS = ("model", "state_dict", "state_dict_ema", "model_ema")     # checked in this order by load_checkpoint
_PREFIXES = ("module.", "_orig_mod.")                                  # DistributedDataParallel, torch.compile


def _state_dict_of(checkpoint, where: str) -> dict:
    """The state_dict in ``checkpoint``: bare or under one of ``_WRAPPERS``, with ``_PREFIXES`` stripped."""
    state_dict = checkpoint
    if isinstance(checkpoint, dict) and not _is_state_dict(checkpoint):
        for key in _WRAPPERS:
            if isinstance(checkpoint.get(key), dict):
                state_dict = checkpoint[key]
                break
    if not _is_state_dict(state_dict):
        found = f"keys {_head(list(checkpoint))}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{where} holds no state_dict (expected a dict of tensors, bare or under "
                         f"{' / '.join(map(repr, _WRAPPERS))}); found {found}")
    for prefix in _PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _mismatch(state_dict: dict, model: nn.Module, ignore=()) -> tuple[list, list, list]:
    """(missing, unexpected, mis-shaped) keys of ``state_dict`` against ``model``; keys under the module names
    in ``ignore`` aside."""
    own = model.state_dict()
    skip = tuple(f"{name}." for name in ignore)
    missing = [k for k in own if k not in state_dict and not k.startswith(skip)]
    unexpected = [k for k in state_dict if k not in own and not k.startswith(skip)]
    mismatched = [k for k in own if k in state_dict and not k.startswith(skip) and state_dict[k].shape != own[k].shape]
    return missing, unexpected, mismatched


def _describe(state_dict: dict, model: nn.Module, missing, unexpected, mismatched) -> str:
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
    parts = [f"{len(missing)} missing key(s): {_head(missing)}" if missing else "",
             f"{len(unexpected)} unexpected key(s): {_head(unexpected)}" if unexpected else "",
             f"{len(shapes)} shape mismatch(es): {_head(shapes)}" if shapes else ""]
    return "; ".join(p for p in parts if p)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm's ``pretrained_filter_fn``: an upstream or dynamixer_ops checkpoint -> ``model``'s state_dict.

    timm has already unwrapped the file (EMA weights first, then ``state_dict`` / ``model``; ``module.`` and
    ``_orig_mod.`` prefixes stripped); this unwraps what is left the same way, then checks every key outside the
    classifier against the model (the first conv's input channels aside: timm adapts them to ``in_chans``), so
    a checkpoint of another variant or image size fails here, naming the keys, instead of loading in part. The
    classifier is left to timm: loaded when ``num_classes`` matches the checkpoint's, dropped (a new head) when
    it differs.
    """
    state_dict = _state_dict_of(state_dict, "the pretrained checkpoint")
    missing, unexpected, mismatched = _mismatch(state_dict, model, ignore=("head",))
    conv = "patch_embed.proj.weight"
    if conv in mismatched and state_dict[conv].shape[0] == model.state_dict()[conv].shape[0] \
            and state_dict[conv].shape[2:] == model.state_dict()[conv].shape[2:]:
        mismatched.remove(conv)
    if missing or unexpected or mismatched:
        raise RuntimeError(f"the pretrained checkpoint does not fit this {type(model).__name__} (another variant, "
                           f"or another img_size?): {_describe(state_dict, model, missing, unexpected, mismatched)}")
    return state_dict


def load_checkpoint(model: nn.Module, path, *, strict: bool = True, map_location="cpu",
                    weights_only: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model``; returns ``model``.

    Accepts a bare state_dict or a dict holding it under ``"model"``, ``"state_dict"``, ``"state_dict_ema"`` or
    ``"model_ema"`` (tried in that order: the plain weights before the EMA ones, unlike timm's pretrained path);
    a ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (torch.compile) prefix is stripped. With ``strict``
    (default) a missing, unexpected or mis-shaped key raises a ``RuntimeError`` that lists them. ``weights_only``
    is ``torch.load``'s: training checkpoints that pickle other objects (e.g. timm's ``args``) need ``False``,
    for files you trust. With timm, ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path))`` does the same.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {os.fspath(path)!r}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    state_dict = _state_dict_of(checkpoint, f"load_checkpoint: {os.fspath(path)!r}")
    missing, unexpected, mismatched = _mismatch(state_dict, model)
    if mismatched or (strict and (missing or unexpected)):
        raise RuntimeError(f"load_checkpoint: {os.fspath(path)!r} does not fit {type(model).__name__}: "
                           + _describe(state_dict, model, missing, unexpected, mismatched))
    model.load_state_dict(state_dict, strict=strict)
    return model


def _head(items, n: int = 10) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
