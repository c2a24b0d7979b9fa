"""Drop-in fused modules for DynaMixer, and :func:`convert` to swap them into an existing model.

:class:`DynaMixerOp` and :class:`DynaMixerBlock` are subclasses of the upstream layers
(:mod:`dynamixer_ops.upstream`): same constructors, submodules, parameter names and state_dict keys (``out``,
``compress``, ``generate``; ``mix_h``, ``mix_w``, ``mlp_c``, ``reweight.fc1/fc2``, ``proj``), so an upstream layer's
state_dict loads with ``strict=True`` and gives the same output. The mixing step runs through
:func:`dynamixer_ops.dynamic_mix` where that computes exactly what the upstream code would (the checks are in
:mod:`dynamixer_ops.plain`); anywhere else (a LoRA-wrapped or quantized ``compress``, a hook on ``generate``, a
pruned weight, ...) the layer runs the upstream code itself and says so once with a warning. The Linears stay the
user's ``nn.Linear`` objects; the fused path runs its own Linears' float32 CPU products on oneDNN where that is
exact (:func:`dynamixer_ops.linear.linear`).

    from dynamixer_ops import convert
    model = convert(model)          # every upstream-style DynaMixerOp / DynaMixerBlock, weights kept
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import upstream
from .linear import linear
from .ops import dynamic_mix, scripted_dynamic_mix
from .known import known_kind, named_like, unknown_reason
from .plain import has_hooks, linear_reason, softmax_reason
from .reference import apply_mixing

__all__ = ["DynaMixerOp", "DynaMixerBlock", "convert", "fused_dynamic_mix", "Primitives", "block_forward"]

_WARNED: set[str] = set()


def fused_dynamic_mix(x: Tensor, compress_weight: Tensor, compress_bias: Optional[Tensor], generate_weight: Tensor,
                      generate_bias: Optional[Tensor], num_segments: int, backend: str) -> Tensor:
    """The fused layers' op call: :func:`dynamic_mix`, or under TorchScript (which cannot compile its Python-side
    checks) :func:`dynamixer_ops.ops.scripted_dynamic_mix`. An FX leaf function: ``torch.fx.symbolic_trace`` records
    it as one call (the fused op stays in the graph, and the graph can be scripted) instead of tracing into it."""
    if torch.jit.is_scripting():
        return scripted_dynamic_mix(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments,
                                    backend)
    return dynamic_mix(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments,
                       backend=backend)


torch.fx.wrap("fused_dynamic_mix")


def _say_once(message: str) -> None:
    """One warning per distinct fallback in a process: the fallback is correct, only slower."""
    if message not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


# What the fused mixing step replaces, and the check that each part is exactly what the kernels compute.
_FUSED_PARTS = (("compress", linear_reason), ("generate", linear_reason), ("activation", softmax_reason))


class DynaMixerOp(upstream.DynaMixerOp):
    """Fused ``DynaMixerOp(dim, seq_len, num_head, reduced_dim=2)``: ``out(dynamic_mix(x))`` on x (..., L, C).

    Args:
        dim: channels C. seq_len: tokens L. num_head: segments S (must divide C). reduced_dim: d.
        backend: passed to :func:`dynamixer_ops.dynamic_mix` (``"auto"``, ``"cpu"``, ``"reference"``, ...).

    Under ``torch.fx.symbolic_trace`` the fused op stays one call (:func:`fused_dynamic_mix` is an FX leaf
    function) and the decision is made from the module structure at trace time. ``torch.jit.script`` decides at
    script time (``__prepare_scriptable__``): a layer that fuses then calls the op, any other scripts the upstream
    computation.
    """
    # Set by __prepare_scriptable__ (torch.jit.script); a constant to TorchScript, which compiles only the branch
    # it selects (the other may hold code it cannot compile, e.g. a quantized Linear's weight).
    __constants__ = ["fuses_when_scripted"]
    fuses_when_scripted = False

    def __init__(self, dim, seq_len, num_head, reduced_dim=2, *, backend="auto"):
        if dim % num_head:
            raise ValueError(f"DynaMixerOp: dim={dim} must be divisible by num_head={num_head}")
        super().__init__(dim, seq_len, num_head, reduced_dim)
        self.backend = backend

    def fallback_reason(self) -> str | None:
        """Why :meth:`mix` runs the upstream code now, or None when it runs the fused op: ``compress`` and
        ``generate`` must be plain Linears and ``activation`` a plain ``nn.Softmax(dim=-2)`` (:mod:`.plain`)."""
        for name, reason in _FUSED_PARTS:
            why = reason(getattr(self, name))
            if why is not None:
                return f"{name} {why}"
        return None

    def fuses(self) -> bool:
        """Whether :meth:`mix` runs the fused op now (:meth:`fallback_reason` is None)."""
        return self.fallback_reason() is None

    def __prepare_scriptable__(self):
        self.fuses_when_scripted = self.fuses()
        return self

    def mix(self, x: Tensor) -> Tensor:
        """The mixing step without ``out``; y has x's shape and (for a dense x on the fused path) x's layout."""
        if torch.jit.is_scripting():
            if self.fuses_when_scripted:
                return self.fused_mix(x)
            return self.unfused_mix(x)
        why = self.fallback_reason()
        if why is None:
            return self.fused_mix(x)
        _say_once(f"DynaMixerOp runs the upstream (unfused) mixing: {why}")
        return self.unfused_mix(x)

    def fused_mix(self, x: Tensor) -> Tensor:
        """The fused op on x (..., L, C), without asking whether it applies: for callers that decided (:meth:`mix`,
        :class:`DynaMixerBlock`)."""
        return fused_dynamic_mix(x, self.compress.weight, self.compress.bias, self.generate.weight,
                                 self.generate.bias, self.num_head, self.backend)

    def unfused_mix(self, x: Tensor) -> Tensor:
        """The upstream mixing step on x (..., L, C) (upstream takes (B, L, C) only: leading dims are flattened)."""
        x3 = x.flatten(0, -3)
        return apply_mixing(x3, self.mixing_matrices(x3), self.num_head).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.out(self.mix(x))
        return linear(self.out, self.mix(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, seq_len={self.seq_len}, num_head={self.num_head}, "
                f"reduced_dim={self.reduced_dim}, backend={self.backend!r}")


class DynaMixerBlock(upstream.DynaMixerBlock):
    """Fused ``DynaMixerBlock``: mixing along H and W, a channel Linear and their learned reweighting.

    On x (B, H, W, C) with H = W = ``resolution``. Mixing along H hands :func:`dynamic_mix` the transposed view
    ``x.transpose(1, 2)`` (no copy); the result keeps that layout, so transposing it back is free and ``out``
    sees a contiguous tensor. ``qk_scale`` and ``attn_drop`` are accepted and unused, as upstream. Where a mixer
    is not a fused :class:`DynaMixerOp` that fuses (or has hooks of its own, which the transposed-view path would
    skip), the block runs the upstream forward. FX and TorchScript: as :class:`DynaMixerOp`.
    """
    mixer = DynaMixerOp
    __constants__ = ["fuses_when_scripted"]
    fuses_when_scripted = False

    def __init__(self, dim, resolution=32, num_head=8, reduced_dim=2, qkv_bias=False, qk_scale=None,
                 attn_drop=0., proj_drop=0., *, backend="auto"):
        super().__init__(dim, resolution, num_head, reduced_dim, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self.mix_h.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.mix_h.backend = self.mix_w.backend = name

    def fuses(self) -> bool:
        """Whether :meth:`forward` runs the fused path: both mixers are fused ops that fuse, without hooks."""
        return all(type(m) is DynaMixerOp and not has_hooks(m) and m.fuses() for m in (self.mix_h, self.mix_w))

    def __prepare_scriptable__(self):
        self.fuses_when_scripted = self.fuses()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            if self.fuses_when_scripted:
                return self.fused_forward(x)
            return self.upstream_forward(x)
        if isinstance(x, Tensor) and x.dim() != 4:       # not on an FX Proxy
            raise ValueError(f"DynaMixerBlock: x must be (B, H, W, C) with H = W = resolution = {self.resolution}, "
                             f"got shape {tuple(x.shape)}")
        if not self.fuses():
            return self.upstream_forward(x)
        return self.fused_forward(x)

    def fused_forward(self, x: Tensor) -> Tensor:
        """The fused path, without asking whether it applies (:meth:`forward` decided, once for both mixers)."""
        if torch.jit.is_scripting():
            # TorchScript takes no module as a function argument: the same arithmetic, the layers called.
            h = self.mix_h.out(self.mix_h.fused_mix(x.transpose(1, 2)).transpose(1, 2))
            w, c = self.mix_w.out(self.mix_w.fused_mix(x)), self.mlp_c(x)
            a = self.reweight((h + w + c).mean(dim=(1, 2)))
            a = a.unflatten(-1, (-1, 3)).permute(2, 0, 1).softmax(dim=0)[:, :, None, None, :]
            return self.proj_drop(self.proj(h * a[0] + w * a[1] + c * a[2]))
        return block_forward(self, x, FUSED)


class Primitives:
    """The steps of the fused block's arithmetic (:func:`block_forward`), as the fused layers run them: the op
    through the layer (:meth:`DynaMixerOp.fused_mix`), the Linears through :func:`dynamixer_ops.linear.linear`
    (the layer itself wherever oneDNN's product is not exact), the ``Mlp`` as a module call; autograd throughout.
    :mod:`dynamixer_ops.inference` has the inference path's (prepacked products with post-ops, in-place sums)."""

    def mix(self, op: DynaMixerOp, x: Tensor) -> Tensor:
        return op.fused_mix(x)

    def linear(self, layer: nn.Module, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = linear(layer, x)
        return y if residual is None else residual + y

    def mlp(self, mlp: nn.Module, x: Tensor) -> Tensor:
        return mlp(x)

    def branch_sum(self, h: Tensor, w: Tensor, c: Tensor) -> Tensor:
        return h + w + c

    def weighted_sum(self, h: Tensor, w: Tensor, c: Tensor, a: Tensor) -> Tensor:
        return h * a[0] + w * a[1] + c * a[2]


FUSED = Primitives()


def block_forward(block: DynaMixerBlock, x: Tensor, p: Primitives, residual: Tensor | None = None) -> Tensor:
    """The fused block on x (B, H, W, C), written once over the primitives ``p``; ``residual + block(x)`` where a
    residual is given (``proj_drop`` must then be the identity: the caller checked). Mixing along H hands the op
    the transposed view (no copy), so the result transposed back is contiguous for ``out``."""
    h = p.linear(block.mix_h.out, p.mix(block.mix_h, x.transpose(1, 2)).transpose(1, 2))
    w = p.linear(block.mix_w.out, p.mix(block.mix_w, x))
    c = p.linear(block.mlp_c, x)
    a = p.mlp(block.reweight, p.branch_sum(h, w, c).mean(dim=(1, 2)))          # (B, 3C)
    a = a.unflatten(-1, (-1, 3)).permute(2, 0, 1).softmax(dim=0)[:, :, None, None, :]
    y = p.weighted_sum(h, w, c, a)
    if residual is None:
        return block.proj_drop(p.linear(block.proj, y))
    return p.linear(block.proj, y, residual)


# ---------------------------------------------------------------------------------------------------------------
# convert(): recognise upstream-style layers by their code (dynamixer_ops.known) and check their structure, never by
# import path, so that it works on dynamixer_ops.upstream and on the original repository's classes alike.

def _linear_shape(module, attr: str, where: str):
    """(out_features, in_features) of ``module.<attr>``, read without running anything: a parametrized weight is
    not evaluated (spectral_norm's would advance its power iteration), a quantized or wrapped Linear is not asked
    for a weight it may not have as a tensor."""
    layer = getattr(module, attr, None)
    if isinstance(layer, nn.Module):
        features = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if all(type(f) is int for f in features):
            return features
        parametrizations = getattr(layer, "parametrizations", None)
        original = getattr(parametrizations, "weight", None)
        weight = getattr(original, "original", None) if original is not None else layer._parameters.get("weight")
        if isinstance(weight, Tensor) and weight.dim() == 2:
            return tuple(weight.shape)
    raise TypeError(f"convert: {where} looks like an upstream DynaMixerOp but its {attr!r} is "
                    f"{type(layer).__name__}, not a Linear layer (no int in_features / out_features, no 2-D weight "
                    f"Parameter)")


# A module's hooks (forward, backward, state_dict, load_state_dict): the fused replacement shares these dicts with
# the layer it replaces, so the hooks run as before and their handles still remove them.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _take_hooks(fused: nn.Module, module: nn.Module) -> nn.Module:
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            fused.__dict__[name] = module.__dict__[name]
    return fused


def _fused_op(op: nn.Module, backend: str, where: str) -> DynaMixerOp:
    """A fused DynaMixerOp that shares ``op``'s submodules (same Parameters, device, dtype and hooks)."""
    for attr in ("num_head",):
        if not isinstance(getattr(op, attr, None), int):
            raise TypeError(f"convert: {where} looks like an upstream DynaMixerOp but has no int attribute "
                            f"{attr!r} (got {getattr(op, attr, None)!r})")
    S = op.num_head
    out_shape = _linear_shape(op, "out", where)
    Sd, C = _linear_shape(op, "compress", where)
    LL, Ld = _linear_shape(op, "generate", where)
    L = round(LL ** 0.5)
    d = Sd // S
    problems = []
    if Sd % S or C % S:
        problems.append(f"compress.weight {(Sd, C)} needs num_head={S} to divide both dims")
    if L * L != LL or L * d != Ld:
        problems.append(f"generate.weight {(LL, Ld)} is not (L*L, L*d) with d = compress rows / num_head = {d}")
    if out_shape != (C, C):
        problems.append(f"out.weight {out_shape} is not ({C}, {C})")
    for attr, want in (("dim", C), ("seq_len", L), ("reduced_dim", d)):
        have = getattr(op, attr, want)
        if have != want:
            problems.append(f"attribute {attr}={have!r} disagrees with the weights ({want})")
    if problems:
        raise ValueError(f"convert: {where} ({type(op).__name__}) is not a well-formed upstream DynaMixerOp: "
                         + "; ".join(problems))
    with torch.device("meta"):      # a shell: its Linears are replaced by op's own
        fused = DynaMixerOp(C, L, S, d, backend=backend)
    fused.out, fused.compress, fused.generate = op.out, op.compress, op.generate
    activation = getattr(op, "activation", None)
    if activation is not None:      # the user's own object, hooks and all; a layer without one used the softmax
        del fused.activation        # so that a plain callable (not a Module) can take its place too
        fused.activation = activation
    return _take_hooks(fused, op).train(op.training)


def _fused_block(block: nn.Module, backend: str, where: str) -> DynaMixerBlock | None:
    missing = [a for a in ("mix_h", "mix_w", "mlp_c", "reweight", "proj") if not isinstance(getattr(block, a, None),
                                                                                       nn.Module)]
    if missing:
        raise TypeError(f"convert: {where} runs the DynaMixerBlock forward but lacks the submodule(s) {missing} of an "
                        f"upstream DynaMixerBlock")
    if not all(known_kind(m) == "DynaMixerOp" for m in (block.mix_h, block.mix_w)):
        return None       # the block's own forward stays; _convert_children looks at its mixers
    mix_h = _fused_op(block.mix_h, backend, f"{where}.mix_h")
    mix_w = _fused_op(block.mix_w, backend, f"{where}.mix_w")
    if (mix_h.dim, mix_h.seq_len) != (mix_w.dim, mix_w.seq_len):
        raise ValueError(f"convert: {where}: mix_h (dim {mix_h.dim}, seq_len {mix_h.seq_len}) and mix_w "
                         f"(dim {mix_w.dim}, seq_len {mix_w.seq_len}) differ; the block needs H = W")
    with torch.device("meta"):
        fused = DynaMixerBlock(mix_h.dim, mix_h.seq_len, mix_h.num_head, mix_h.reduced_dim, backend=backend)
    fused.mix_h, fused.mix_w = mix_h, mix_w
    fused.mlp_c, fused.reweight, fused.proj = block.mlp_c, block.reweight, block.proj
    fused.proj_drop = getattr(block, "proj_drop", nn.Identity())
    return _take_hooks(fused, block).train(block.training)


# Class names that say "a DynaMixer layer": such a layer whose code is not one we implement is kept, with a warning.
_LAYER_NAMES = ("DynaMixerOp", "DynaMixerBlock")


def _fuse(module: nn.Module, backend: str, where: str, kept: dict):
    """The fused replacement of ``module``, or None where it is not a layer whose code we implement (recognised by
    code, :mod:`dynamixer_ops.known`; ``kept`` collects the classes named like one whose code differs)."""
    if isinstance(module, (DynaMixerOp, DynaMixerBlock)):
        return None
    kind = known_kind(module)
    if kind == "DynaMixerBlock":
        return _fused_block(module, backend, where)
    if kind == "DynaMixerOp":
        return _fused_op(module, backend, where)
    if named_like(module, _LAYER_NAMES):
        kept.setdefault(type(module), (where, unknown_reason(module)))
    return None


def _convert_children(module: nn.Module, backend: str, prefix: str, kept: dict) -> None:
    for name, child in module.named_children():
        where = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (DynaMixerOp, DynaMixerBlock)):
            child.backend = backend
            continue
        fused = _fuse(child, backend, where, kept)
        if fused is not None:
            setattr(module, name, fused)
        else:
            _convert_children(child, backend, where, kept)


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap, in place, every upstream-style ``DynaMixerOp`` / ``DynaMixerBlock`` in ``model`` for the fused one.

    Layers are recognised by their code, not their names (:mod:`dynamixer_ops.known`): a module is replaced only
    when its forward is the seed repository's (a copy under any module path) or :mod:`dynamixer_ops.upstream`'s,
    and checked by structure (``out``, ``compress``, ``generate``, ``num_head``; ``mix_h``, ``mix_w``, ``mlp_c``,
    ``reweight``, ``proj``). A fork that changes a forward keeps its own, and its inner layers whose code is known
    are still fused (a forked block's seed ``DynaMixerOp`` mixers, a seed block's forked mixers stay the user's and
    the block its own); one warning per such class named like a DynaMixer layer says so. The fused layers take over
    the original submodules (the Linears and the ``activation``): the Parameters (and an optimizer that holds them),
    device, dtype, hooks and train/eval mode are kept; no other module changes class. Layers that are already fused
    get ``backend`` set. A layer with a known forward but a malformed structure raises, naming it.

    Returns ``model`` (or, when ``model`` itself is such a layer, its fused replacement).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (DynaMixerOp, DynaMixerBlock)):
        model.backend = backend
        return model
    kept: dict = {}
    root = _fuse(model, backend, "model", kept)
    if root is None:
        _convert_children(model, backend, "", kept)
    for cls, (where, why) in kept.items():
        warnings.warn(f"convert: kept {cls.__name__} layers as they are (first at {where}): {why}", stacklevel=2)
    return model if root is None else root
