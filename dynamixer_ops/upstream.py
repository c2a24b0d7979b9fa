"""The upstream eager DynaMixer, restated in plain PyTorch: the baseline that tests and benchmarks compare with, and
the semantics the fused layers (:mod:`dynamixer_ops.nn`, subclasses of these) fall back to wherever their fused
path would not compute exactly this code.

Restates ``models/dynamixer.py``, ``models/vision_model.py``, ``models/utils.py`` and
``models/configs/conf_dynamixer.py`` of https://github.com/ziyuwwang/DynaMixer (MIT License, Copyright (c) 2022
ziyuwwang; DynaMixer, Wang et al., ICML 2022, arXiv 2201.12083), as described in ``docs/dynamic_mix.md``:
same module tree, parameter names, state_dict keys, initialisation and forward arithmetic. It needs no timm.

Differences from the upstream files, none of which changes a parameter or an output:

* :class:`DynaMixerOp` runs the mixing step through the two halves of :func:`dynamixer_ops.reference.upstream_chain`
  (the upstream permute chain, op for op, calling ``compress``, ``generate`` and ``activation`` as modules) so that
  chain is written once in this project; its first half is public as :meth:`DynaMixerOp.mixing_matrices`;
* :class:`DynaMixerBlock`'s forward is :meth:`DynaMixerBlock.upstream_forward`, a name of its own that the fused
  block calls where it does not fuse (TorchScript has no ``super()``);
* the stage resolutions (the mixing length L) follow ``img_size`` (``img_size // patch_size``, halved at each
  transition) where upstream hard-codes 32/16 for 224x224 input: at 224 they are the same;
* :class:`VisionModel` takes the layers of a block (``mlp_fn``, ``mlp_layer``, ``drop_path_layer``, ``init_fn``)
  as arguments, so :mod:`dynamixer_ops.models` builds the same network with the fused block and timm's layers;
  it also has timm's classifier API (``num_features``, ``forward_features``, ``forward_head``,
  ``reset_classifier``), which upstream half-implements.
"""

from torch import Tensor, nn

from .reference import apply_mixing, generate_input

__all__ = ["DynaMixerOp", "DynaMixerBlock", "Mlp", "DropPath", "PatchEmbed", "Downsample", "VisionBlock",
           "VisionModel", "CONFIGS", "PATCH_SIZE", "stage_resolutions", "eager_model"]


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): zero a whole residual branch, rescale the kept ones."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1. - self.drop_prob
        mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)      # lists: TorchScript
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch embeddings (B, D, H/p, W/p) by a strided convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, overlap=False):
        super().__init__()
        padding, stride = ((patch_size - 1) // 2, (patch_size + 1) // 2) if overlap else (0, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, padding=padding, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Between stages, on (B, H, W, C): Conv2d with kernel = stride = ``patch_size`` (2 at a transition, else 1)."""

    def __init__(self, in_embed_dim, out_embed_dim, patch_size, overlap=False):
        super().__init__()
        if overlap:
            assert patch_size == 2
            self.proj = nn.Conv2d(in_embed_dim, out_embed_dim, kernel_size=3, padding=1, stride=2)
        else:
            self.proj = nn.Conv2d(in_embed_dim, out_embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class DynaMixerOp(nn.Module):
    """Dynamic mixing of L tokens, eager: ``out(mix(x))`` on x (B, L, C).

    ``compress``: C -> num_head * reduced_dim; ``generate``: seq_len * reduced_dim -> seq_len**2 logits per
    segment; ``activation``: ``nn.Softmax(dim=-2)`` on the (B, S, L, L) logits, over the source token (a module,
    as upstream, so it can be replaced or hooked); ``out``: Linear(C, C).
    """

    def __init__(self, dim, seq_len, num_head, reduced_dim=2):
        super().__init__()
        self.dim = dim
        self.seq_len = seq_len
        self.num_head = num_head
        self.reduced_dim = reduced_dim
        self.out = nn.Linear(dim, dim)
        self.compress = nn.Linear(dim, num_head * reduced_dim)
        self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len)
        self.activation = nn.Softmax(dim=-2)

    def mixing_matrices(self, x: Tensor) -> Tensor:
        """The mixing matrices P (..., S, L_source, L_target) this layer applies to x (..., L, C): ``activation`` of
        ``generate``'s logits, computed by calling the layer's own ``compress``, ``generate`` and ``activation`` as
        :meth:`mix` does (any leading dims are flattened into upstream's one batch dim, and restored)."""
        x3 = x.flatten(0, -3)
        B, L, _ = x3.shape
        P = self.activation(self.generate(generate_input(self.compress(x3), self.num_head)).reshape(
            B, self.num_head, L, L))
        return P.reshape(x.shape[:-2] + P.shape[1:])

    def mix(self, x: Tensor) -> Tensor:
        """The mixing step without ``out``, on x (B, L, C): ``compress``, ``generate`` and ``activation`` are called
        as modules."""
        return apply_mixing(x, self.mixing_matrices(x), self.num_head)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.mix(x))


class DynaMixerBlock(nn.Module):
    """Mixing along H and W, a channel Linear, and a learned softmax reweighting of the three; on (B, H, W, C)."""
    mixer = DynaMixerOp     # the class of mix_h / mix_w (the fused block's is the fused op)

    def __init__(self, dim, resolution=32, num_head=8, reduced_dim=2, qkv_bias=False, qk_scale=None,
                 attn_drop=0., proj_drop=0.):
        super().__init__()
        self.resolution = resolution
        self.num_head = num_head
        self.mix_h = self.mixer(dim, resolution, num_head, reduced_dim=reduced_dim)
        self.mix_w = self.mixer(dim, resolution, num_head, reduced_dim=reduced_dim)
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.upstream_forward(x)

    def upstream_forward(self, x: Tensor) -> Tensor:
        """The upstream forward on x (B, H, W, C)."""
        B, H, W, C = x.shape
        h = self.mix_h(x.permute(0, 2, 1, 3).reshape(-1, H, C)).reshape(B, W, H, C).permute(0, 2, 1, 3)
        w = self.mix_w(x.reshape(-1, W, C)).reshape(B, H, W, C)
        c = self.mlp_c(x)
        a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
        x = h * a[0] + w * a[1] + c * a[2]
        return self.proj_drop(self.proj(x))


class VisionBlock(nn.Module):
    """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))); ``attn`` is ``mlp_fn(...)``."""

    def __init__(self, dim, resolution, num_head, reduced_dim, mlp_ratio=4., qkv_bias=False, qk_scale=None,
                 drop=0., attn_drop=0., drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm, skip_lam=1.0,
                 mlp_fn=DynaMixerBlock, mlp_layer=Mlp, drop_path_layer=DropPath):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = mlp_fn(dim, resolution=resolution, num_head=num_head, reduced_dim=reduced_dim,
                           qkv_bias=qkv_bias, qk_scale=None, attn_drop=attn_drop)
        self.drop_path = drop_path_layer(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.skip_lam = skip_lam

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        return x


def basic_blocks(dim, index, layers, resolution, num_head, reduced_dim, mlp_ratio=3., qkv_bias=False,
                 qk_scale=None, attn_drop=0, drop_path_rate=0., skip_lam=1.0, **block_kwargs):
    """Stage ``index``: ``layers[index]`` VisionBlocks, drop-path rate rising linearly over the whole network."""
    blocks = []
    for block_idx in range(layers[index]):
        # max(.., 1): a one-block network would divide by zero upstream
        block_dpr = drop_path_rate * (block_idx + sum(layers[:index])) / max(sum(layers) - 1, 1)
        blocks.append(VisionBlock(dim, resolution, num_head, reduced_dim, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                  qk_scale=qk_scale, attn_drop=attn_drop, drop_path=block_dpr, skip_lam=skip_lam,
                                  **block_kwargs))
    return nn.Sequential(*blocks)


def stage_resolutions(img_size: int, patch_size: int, transitions) -> list[int]:
    """The side length (= mixing length L) of each stage: the patch grid, halved after each transition."""
    res, out = img_size // patch_size, []
    for i in range(len(transitions)):
        out.append(res)
        if transitions[i]:
            res //= 2
    if min(out) < 1:
        raise ValueError(f"img_size={img_size} is too small for patch_size={patch_size} and "
                         f"{sum(map(bool, transitions[:-1]))} downsampling transition(s): stage sides {out}")
    return out


class VisionModel(nn.Module):
    """The DynaMixer network: patch embedding, stages of VisionBlocks with Downsamples between them (one
    ``network`` ModuleList), LayerNorm, mean over tokens, Linear head."""

    def __init__(self, layers, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dims=None,
                 transitions=None, resolutions=None, num_heads=None, reduced_dims=None, mlp_ratios=None,
                 skip_lam=1.0, qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 norm_layer=nn.LayerNorm, mlp_fn=DynaMixerBlock, overlap=False, *, mlp_layer=Mlp,
                 drop_path_layer=DropPath, init_fn=nn.init.trunc_normal_):
        super().__init__()
        if resolutions is None:
            resolutions = stage_resolutions(img_size, patch_size, transitions)
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dims[-1]
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dims[0], overlap=overlap)
        network = []
        for i in range(len(layers)):
            network.append(basic_blocks(embed_dims[i], i, layers, resolutions[i], num_heads[i], reduced_dims[i],
                                        mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, qk_scale=qk_scale,
                                        attn_drop=attn_drop_rate, drop_path_rate=drop_path_rate,
                                        norm_layer=norm_layer, skip_lam=skip_lam, mlp_fn=mlp_fn,
                                        mlp_layer=mlp_layer, drop_path_layer=drop_path_layer))
            if i >= len(layers) - 1:
                break
            if transitions[i] or embed_dims[i] != embed_dims[i + 1]:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], 2 if transitions[i] else 1,
                                          overlap=overlap))
        self.network = nn.ModuleList(network)
        self.norm = norm_layer(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_fn = init_fn
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            self._init_fn(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_embeddings(self, x: Tensor) -> Tensor:
        return self.patch_embed(x).permute(0, 2, 3, 1)          # (B, C, H, W) -> (B, H, W, C)

    def forward_tokens(self, x: Tensor) -> Tensor:
        for block in self.network:
            x = block(x)
        B, H, W, C = x.shape
        return x.reshape(B, -1, C)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normalised tokens (B, tokens, C)."""
        return self.norm(self.forward_tokens(self.forward_embeddings(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# The three published configurations (upstream models/configs/conf_dynamixer.py), patch size PATCH_SIZE at 224x224.
CONFIGS = {
    "s": dict(layers=[4, 3, 8, 3], transitions=[True, False, False, False], num_heads=[8, 16, 16, 16],
              mlp_ratios=[3, 3, 3, 3], embed_dims=[192, 384, 384, 384], reduced_dims=[2, 2, 2, 2]),
    "m": dict(layers=[4, 3, 14, 3], transitions=[False, True, False, False], num_heads=[8, 8, 16, 16],
              mlp_ratios=[3, 3, 3, 3], embed_dims=[256, 256, 512, 512], reduced_dims=[2, 2, 2, 2]),
    "l": dict(layers=[8, 8, 16, 4], transitions=[True, False, False, False], num_heads=[8, 16, 16, 16],
              mlp_ratios=[3, 3, 3, 3], embed_dims=[256, 512, 512, 512], reduced_dims=[8, 8, 8, 8]),
}
PATCH_SIZE = 7


def eager_model(variant: str, *, num_classes=1000, img_size=224, in_chans=3, patch_size=PATCH_SIZE,
                **kwargs) -> VisionModel:
    """DynaMixer-``variant`` (``"s"``, ``"m"``, ``"l"``: 26,265,960 / 57,128,264 / 97,818,088 parameters at 1000
    classes) with the eager upstream layers; ``kwargs`` go to :class:`VisionModel`. The fused network of the same
    variant: :func:`dynamixer_ops.models.create`."""
    if variant not in CONFIGS:
        raise ValueError(f"unknown DynaMixer variant {variant!r}; expected one of {sorted(CONFIGS)}")
    config = dict(CONFIGS[variant], **kwargs)
    return VisionModel(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                       **config)
