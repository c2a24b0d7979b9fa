"""``dynamic_mix``: one op, registered once with ``torch.library``; every backend is an implementation of it.

The forward and backward are two custom ops (``dynamixer_ops::dynamic_mix`` and
``dynamixer_ops::dynamic_mix_backward``) with one fake kernel each and one autograd formula; a backend that keeps
the mixing matrices for the backward runs an eager training step through a second pair (``dynamic_mix_keep`` /
``dynamic_mix_backward_kept``, defined here only). Which ops exist, who defines each schema and which kernel runs in
which process: docs/backends.md, "The ops, who defines them, what runs where". The backend is a string argument
resolved by :mod:`dynamixer_ops.backends` before the op is called, so ``torch.compile(fullgraph=True)``,
``torch.export`` and AOTInductor see one opaque op whatever runs inside it. Where the op would not compute what its
ATen decomposition computes (:func:`decomposition_reason`), :func:`dynamic_mix` runs the decomposition instead.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.flop_counter import register_flop_formula

from . import _library  # noqa: F401  (loads the native library, which defines the ops' schemas)
from .backends import env_flag, resolve_backend, get_backend
from .plain import eager_context_reason, plain_tensor
from .reference import reference_backward, reference_forward

__all__ = ["dynamic_mix", "scripted_dynamic_mix", "check_inputs", "dense_weights", "decomposition", "forward_kernel",
           "decomposition_reason", "forward_flops", "openvino_converting"]

# Tests switch this on so that an output element a kernel forgets to write shows up as NaN.
POISON_OUTPUTS = env_flag("DYNAMIXER_OPS_POISON")


def _new_like(t: Tensor) -> Tensor:
    out = torch.empty_like(t)     # keeps t's strides when t is dense: a transposed x gives a transposed y
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_inputs(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments):
    """Validate the arguments of :func:`dynamic_mix`; return ``(L, C, S, d)``.

    Every error names the argument and gives the expected and the actual value.
    """
    named = {"x": x, "compress_weight": compress_weight, "compress_bias": compress_bias,
             "generate_weight": generate_weight, "generate_bias": generate_bias}
    for name, t in named.items():
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"dynamic_mix: {name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"dynamic_mix: num_segments must be a positive int, got {num_segments!r}")
    if x.dim() < 3:
        raise ValueError(f"dynamic_mix: x must have shape (..., L, C) with at least one batch dim, "
                         f"got a {x.dim()}-D tensor of shape {_shape(x)}")
    L, C = x.shape[-2], x.shape[-1]
    S = num_segments
    if L < 1 or C < 1:
        raise ValueError(f"dynamic_mix: x must have L >= 1 tokens and C >= 1 channels, got shape {_shape(x)}")
    if C % S:
        raise ValueError(f"dynamic_mix: x's channel count C={C} is not divisible by num_segments={S}")
    if compress_weight.dim() != 2 or compress_weight.shape[1] != C:
        raise ValueError(f"dynamic_mix: compress_weight must have shape (S*d, C) = (S*d, {C}) for x of shape "
                         f"{_shape(x)}, got {_shape(compress_weight)}")
    Sd = compress_weight.shape[0]
    if Sd == 0 or Sd % S:
        raise ValueError(f"dynamic_mix: compress_weight has {Sd} rows, which is not a positive multiple of "
                         f"num_segments={S} (expected S*d rows)")
    d = Sd // S
    expected = {"compress_bias": (Sd,), "generate_weight": (L * L, L * d), "generate_bias": (L * L,)}
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            what = {"compress_bias": "(S*d,)", "generate_weight": "(L*L, L*d)", "generate_bias": "(L*L,)"}[name]
            raise ValueError(f"dynamic_mix: {name} must have shape {what} = {shape} for x of shape {_shape(x)}, "
                             f"num_segments={S} and d={d}, got {_shape(t)}")
    if not x.is_floating_point():
        raise TypeError(f"dynamic_mix: x must be a floating-point tensor, got {x.dtype}")
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"dynamic_mix: {name} has dtype {t.dtype} but x has dtype {x.dtype}; "
                            f"all inputs must share one dtype (cast them, or use torch.autocast)")
        if t.device != x.device:
            raise ValueError(f"dynamic_mix: {name} is on {t.device} but x is on {x.device}; "
                             f"all inputs must be on one device")
    return L, C, S, d


# The ops' schemas are defined in the native library (csrc/dynamic_mix.cpp), so that a process without Python
# (an AOTInductor runner) has them too, with Python-free kernels for the native backends. Everything else is
# registered here, once: the kernels that run every backend of the registry (for CPU and CUDA tensors, which the
# dispatcher prefers to the library's device-generic kernels), the fake kernels and the autograd formula.
FORWARD_OP = "dynamixer_ops::dynamic_mix"
BACKWARD_OP = "dynamixer_ops::dynamic_mix_backward"


def _kernel_backend(name: str, x: Tensor):
    """The backend a kernel runs: :func:`dynamic_mix` resolves "auto" before calling the op; a TorchScript caller
    (:func:`scripted_dynamic_mix`) passes it as it is."""
    return get_backend(name) if name != "auto" else resolve_backend(name, x.device.type, x.dtype)


def forward_kernel(x: Tensor, compress_weight: Tensor, compress_bias: Tensor, generate_weight: Tensor,
                   generate_bias: Tensor, num_segments: int, backend: str) -> Tensor:
    """The forward op's kernel for CPU and CUDA tensors: the one place a backend's forward runs. Besides the op,
    only :mod:`dynamixer_ops.inference` calls it, under no_grad on plain CPU tensors it has checked as the op would
    (the op's entry and two dispatcher hops cost more per call at batch 1 than the mixing of a small image)."""
    y = _new_like(x)
    if y.numel():
        _kernel_backend(backend, x).forward(x, compress_weight, compress_bias, generate_weight, generate_bias,
                                     num_segments, y)
    return y


def _dynamic_mix_backward_kernel(grad_y: Tensor, x: Tensor, compress_weight: Tensor, compress_bias: Tensor,
                                 generate_weight: Tensor, generate_bias: Tensor, num_segments: int,
                                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = [_new_like(t) for t in (x, compress_weight, compress_bias, generate_weight, generate_bias)]
    if x.numel():
        _kernel_backend(backend, x).backward(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias,
                                      num_segments, *grads)
    else:   # an empty batch contributes nothing to the weight gradients
        for g in grads[1:]:
            g.zero_()
    return tuple(grads)


# Backends that keep P from the forward (Backend.forward_keep) run the training step through these two instead:
# Python-only ops, used outside torch.compile / export (traced graphs hold the two above, so an exported model
# needs only the native library).
KEEP_OP = "dynamixer_ops::dynamic_mix_keep"
KEPT_BACKWARD_OP = "dynamixer_ops::dynamic_mix_backward_kept"


def _probs_like(x: Tensor, num_segments: int) -> Tensor:
    """The kept probabilities for a 4-D x: (A*B*S, L, L) in the kernels' compute type."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    L = x.shape[-2]
    return x.new_empty((x.shape[0] * x.shape[1] * num_segments, L, L), dtype=compute)


def _dynamic_mix_keep_kernel(x: Tensor, compress_weight: Tensor, compress_bias: Tensor, generate_weight: Tensor,
                             generate_bias: Tensor, num_segments: int, backend: str) -> tuple[Tensor, Tensor]:
    y, probs = _new_like(x), _probs_like(x, num_segments)
    if y.numel():
        get_backend(backend).forward_keep(x, compress_weight, compress_bias, generate_weight, generate_bias,
                                          num_segments, y, probs)
    return y, probs


def _dynamic_mix_backward_kept_kernel(grad_y: Tensor, x: Tensor, probs: Tensor, compress_weight: Tensor,
                                      compress_bias: Tensor, generate_weight: Tensor, generate_bias: Tensor,
                                      num_segments: int, backend: str
                                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = [_new_like(t) for t in (x, compress_weight, compress_bias, generate_weight, generate_bias)]
    if x.numel():
        get_backend(backend).backward_kept(grad_y, x, probs, compress_weight, compress_bias, generate_weight,
                                           generate_bias, num_segments, *grads)
    else:
        for g in grads[1:]:
            g.zero_()
    return tuple(grads)


_KERNELS = {FORWARD_OP: forward_kernel, BACKWARD_OP: _dynamic_mix_backward_kernel,
            KEEP_OP: _dynamic_mix_keep_kernel, KEPT_BACKWARD_OP: _dynamic_mix_backward_kept_kernel}


def inferred_schema(qualname: str) -> str:
    """The schema torch.library reads from the annotations of op ``qualname``'s Python kernel: the native library
    must define exactly this one."""
    return torch.library.infer_schema(_KERNELS[qualname], mutates_args=())


def _register(qualname: str) -> torch._ops.OpOverload:
    namespace, name = qualname.split("::")
    if not hasattr(getattr(torch.ops, namespace), name):   # no native library: the same schema, defined here
        torch.library.define(qualname, inferred_schema(qualname))
    torch.library.register_kernel(qualname, ("cpu", "cuda"), _KERNELS[qualname])
    return getattr(getattr(torch.ops, namespace), name).default


_dynamic_mix_op = _register(FORWARD_OP)
_dynamic_mix_backward_op = _register(BACKWARD_OP)
_dynamic_mix_keep_op = _register(KEEP_OP)
_dynamic_mix_backward_kept_op = _register(KEPT_BACKWARD_OP)


@torch.library.register_fake(FORWARD_OP)
def _(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, backend):
    return torch.empty_like(x)


@torch.library.register_fake(BACKWARD_OP)
def _(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, backend):
    return tuple(torch.empty_like(t) for t in (x, compress_weight, compress_bias, generate_weight, generate_bias))


@torch.library.register_fake(KEEP_OP)
def _(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, backend):
    return torch.empty_like(x), _probs_like(x, num_segments)


@torch.library.register_fake(KEPT_BACKWARD_OP)
def _(grad_y, x, probs, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, backend):
    return tuple(torch.empty_like(t) for t in (x, compress_weight, compress_bias, generate_weight, generate_bias))


def decomposition(x: Tensor, compress_weight: Tensor, compress_bias: Tensor | None, generate_weight: Tensor,
                  generate_bias: Tensor | None, num_segments: int, backend: str) -> Tensor:
    """``dynamixer_ops::dynamic_mix`` in plain ATen ops: :func:`dynamixer_ops.reference.reference_forward`, with
    float16 / bfloat16 inputs computed in float32 as every backend computes them. It has the op's signature, so it is
    the op's entry in a decomposition table (:func:`dynamixer_ops.deploy.decompositions`); the ONNX export and
    OpenVINO's conversion trace it.
    ``backend`` is ignored: every backend computes this function."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    inputs = (t if t is None else t.to(compute)
              for t in (x, compress_weight, compress_bias, generate_weight, generate_bias))
    return reference_forward(*inputs, num_segments).to(x.dtype)


# openvino.convert_model (the ovc tool) and the two decoders of its PyTorch frontend. Not OpenVINO's torch.compile
# backend: it runs the ops it cannot convert in PyTorch, and the decomposition traced there adds shape guards that
# dynamo cannot place.
_OPENVINO_CONVERTERS = ("openvino.tools.ovc.", "openvino.frontend.pytorch.ts_decoder",
                        "openvino.frontend.pytorch.fx_decoder")


def openvino_converting() -> bool:
    """Whether OpenVINO is converting a PyTorch model (``openvino.convert_model`` is on the call stack). It converts
    only the ops in its own tables, so while it traces a model (``torch.jit.trace``) or lowers an ``ExportedProgram``
    (``run_decompositions``) the op is traced as :func:`decomposition`; every other tracer keeps the op."""
    if "openvino" not in sys.modules:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_OPENVINO_CONVERTERS):
            return True
        frame = frame.f_back
    return False


@torch.library.register_torch_dispatch(FORWARD_OP, ProxyTorchDispatchMode)
def _(mode, func, types, args, kwargs):
    # The tracer of torch.export, run_decompositions and torch.compile. openvino.convert_model(ExportedProgram)
    # lowers the program by run_decompositions with its own table, which lacks the op: there the decomposition is
    # recorded instead.
    if openvino_converting():
        with mode:
            return decomposition(*args, **kwargs)
    return mode.__torch_dispatch__(func, types, args, kwargs)


def _unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself, or a copy with ``stride(-1) == 1`` (the kernel contract). ``t.contiguous()`` is not enough:
    with C = 1 a tensor can count as contiguous while its last stride is anything."""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, backend = inputs
    # Only the inputs are kept: the mixing matrices are recomputed in the backward.
    ctx.save_for_backward(x, compress_weight, compress_bias, generate_weight, generate_bias)
    ctx.num_segments, ctx.backend = num_segments, backend


def _differentiable_backward(grad_y: Tensor, inputs, num_segments: int):
    """The five gradients in differentiable ATen ops (:func:`dynamixer_ops.reference.reference_backward`, half types in
    float32 as every backend computes them), for a backward that is itself differentiated: under
    ``create_graph=True`` (a gradient penalty, double backward) and under ``torch.func.grad``, which always builds
    the graph of the gradient."""
    compute = torch.float32 if grad_y.dtype in (torch.float16, torch.bfloat16) else grad_y.dtype
    grads = reference_backward(*(t.to(compute) for t in (grad_y, *inputs)), num_segments)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))


def _backward_is_differentiated(grad_y: Tensor, saved) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, *saved))


def _backward(ctx, grad_y):
    saved = ctx.saved_tensors             # once: activation checkpointing unpacks each saved tensor only once
    if _backward_is_differentiated(grad_y, saved):
        return (*_differentiable_backward(grad_y, saved, ctx.num_segments), None, None)
    grad_y = _unit_last_stride(grad_y)    # e.g. the expanded gradient of y.sum(): kernels read rows of C
    grads = _dynamic_mix_backward_op(grad_y, *saved, ctx.num_segments, ctx.backend)
    return (*grads, None, None)


torch.library.register_autograd(FORWARD_OP, _backward, setup_context=_setup_context)


def _not_differentiable(ctx, *grads):
    # Reached only when the backward op itself is recorded in a graph, which _backward avoids (a differentiated
    # backward runs in ATen ops): a call of the internal op by hand.
    raise RuntimeError("dynamixer_ops::dynamic_mix_backward is not differentiable: differentiate dynamic_mix "
                       "(torch.autograd.grad(..., create_graph=True)) instead of calling the backward op")


torch.library.register_autograd(BACKWARD_OP, _not_differentiable)


def _setup_keep_context(ctx, inputs, output):
    x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, backend = inputs
    probs = output[1]
    ctx.mark_non_differentiable(probs)
    ctx.save_for_backward(x, probs, compress_weight, compress_bias, generate_weight, generate_bias)
    ctx.num_segments, ctx.backend = num_segments, backend


def _keep_backward(ctx, grad_y, grad_probs):
    x, probs, *weights = ctx.saved_tensors
    if _backward_is_differentiated(grad_y, (x, *weights)):
        return (*_differentiable_backward(grad_y, (x, *weights), ctx.num_segments), None, None)
    grads = _dynamic_mix_backward_kept_op(_unit_last_stride(grad_y), x, probs, *weights, ctx.num_segments,
                                          ctx.backend)
    return (*grads, None, None)


torch.library.register_autograd(KEEP_OP, _keep_backward, setup_context=_setup_keep_context)
torch.library.register_autograd(KEPT_BACKWARD_OP, _not_differentiable)


# torch.vmap: a vmapped x is just more sequences for the forward; anything else (vmapped weights, or any vmapped
# argument of the backward, whose weight gradients must stay per vmapped slice) runs the op once per slice.
def _slice(args, in_dims, i: int):
    out = []
    for a, dim in zip(args, in_dims):
        if dim is not None:
            a = a.select(dim, i)
            a = _unit_last_stride(a) if a.dim() == 4 else a.contiguous()   # the kernel contract, per slice
        out.append(a)
    return out


def _per_slice(op, info, in_dims, args):
    results = [op(*_slice(args, in_dims, i)) for i in range(info.batch_size)]
    if isinstance(results[0], Tensor):
        return torch.stack(results), 0
    stacked = tuple(torch.stack(r) for r in zip(*results))
    return stacked, (0,) * len(stacked)


@torch.library.register_vmap(FORWARD_OP)
def _(info, in_dims, x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, backend):
    args = (x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments, backend)
    if in_dims[0] is not None and all(dim is None for dim in in_dims[1:]):
        xb = x.movedim(in_dims[0], 0)                                    # (V, A, B, L, C)
        y = _dynamic_mix_op(_unit_last_stride(xb.flatten(0, 1)), *args[1:])
        return y.unflatten(0, xb.shape[:2]), 0
    return _per_slice(_dynamic_mix_op, info, in_dims, args)


@torch.library.register_vmap(BACKWARD_OP)
def _(info, in_dims, *args):
    return _per_slice(_dynamic_mix_backward_op, info, in_dims, args)


def forward_flops(num_sequences: int, L: int, C: int, S: int, d: int) -> int:
    """FLOPs of one forward over ``num_sequences`` sequences: twice the multiply-adds of the upstream layer's three
    products, compress (L*C*S*d), generate (S*(L*d)*(L*L)) and apply (L*L*C), so a model's count matches the
    paper's. The backward computes every gradient: two products per forward product, twice this. Read by
    FlopCounterMode (below) and by ``dynamixer-bench``'s GFLOP/s."""
    return 2 * num_sequences * (L * C * S * d + S * (L * d) * (L * L) + C * L * L)


def _forward_flops(x_shape, compress_weight_shape, generate_weight_shape) -> int:
    *lead, L, C = x_shape
    d = generate_weight_shape[1] // L
    return forward_flops(math.prod(lead), L, C, compress_weight_shape[0] // d, d)


@register_flop_formula(torch.ops.dynamixer_ops.dynamic_mix)
def _(x_shape, compress_weight_shape, compress_bias_shape, generate_weight_shape, *args, **kwargs) -> int:
    return _forward_flops(x_shape, compress_weight_shape, generate_weight_shape)


@register_flop_formula(torch.ops.dynamixer_ops.dynamic_mix_keep)
def _(x_shape, compress_weight_shape, compress_bias_shape, generate_weight_shape, *args, **kwargs) -> int:
    return _forward_flops(x_shape, compress_weight_shape, generate_weight_shape)


@register_flop_formula(torch.ops.dynamixer_ops.dynamic_mix_backward)
def _(grad_y_shape, x_shape, compress_weight_shape, compress_bias_shape, generate_weight_shape, *args, **kwargs):
    return 2 * _forward_flops(x_shape, compress_weight_shape, generate_weight_shape)


@register_flop_formula(torch.ops.dynamixer_ops.dynamic_mix_backward_kept)
def _(grad_y_shape, x_shape, probs_shape, compress_weight_shape, compress_bias_shape, generate_weight_shape,
      *args, **kwargs):
    return 2 * _forward_flops(x_shape, compress_weight_shape, generate_weight_shape)


def decomposition_reason(tensors) -> str | None:
    """Why a call with these inputs must run :func:`decomposition` (the op's math in ATen ops, which every
    transform and tensor subclass understands) instead of the op, or ``None`` when the op computes exactly that.

    The reasons: ONNX export (the exporter knows only its own tables); OpenVINO's conversion of a model (it traces
    with torch.jit.trace, and knows only its own tables too); a torch.func transform other than ``vmap``
    (``grad`` / ``jvp`` / ``jacrev``: the op's autograd formula is not one they can transform; ``vmap`` has a rule);
    an input with a forward-mode tangent (``torch.autograd.forward_ad``: the op has no forward-mode formula); a
    tensor subclass that wraps other tensors (quantized weights, DTensor, ...) and the meta device (the kernels read
    plain dense memory). Inside a compiled graph the op is always kept (the graph is traced with plain fake
    tensors)."""
    if torch.onnx.is_in_onnx_export():
        # torch.onnx translates only the ops in its own tables (or in a custom_translation_table the user would have
        # to pass): the decomposition becomes standard ONNX ops.
        return "ONNX export"
    if torch.compiler.is_compiling():
        return None
    if torch.jit.is_tracing() and openvino_converting():
        # openvino.convert_model traces the model with torch.jit.trace and has no conversion rule for the op.
        return "OpenVINO conversion"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        # The op's autograd formula is not one torch.func's grad / jvp can transform; vmap has the rule above.
        kinds = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        if kinds - {TransformType.Vmap}:
            return "a torch.func transform other than vmap"
    dual = forward_ad._current_level >= 0      # inside a dual level (torch.func.jvp enters one too)
    for t in tensors:
        if t is None:
            continue
        if not plain_tensor(t) and is_traceable_wrapper_subclass(t):
            return f"an input is a {type(t).__name__}"
        if dual and forward_ad.unpack_dual(t).tangent is not None:
            return "forward-mode AD"
    if tensors[0].device.type == "meta":        # check_inputs put every input on x's device
        return "the meta device"
    return None


def _keeps_probabilities(backend, L: int, C: int, S: int, d: int, tensors) -> bool:
    """Whether this call runs the keep-P variant: a training step (something requires grad) of a backend that keeps
    P where that pays, outside traced graphs and torch.func transforms (the keep ops have no vmap rule)."""
    if torch.compiler.is_compiling() or backend.forward_keep is None or not backend.keep_probabilities(L, C, S, d):
        return False
    if not torch.is_grad_enabled() or eager_context_reason(tensors) is not None:
        return False
    return any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _to_4d(x: Tensor) -> Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    elif x.dim() > 4:
        x = x.flatten(0, -4)      # a view where the leading dims allow it, else a copy
    return _unit_last_stride(x)


def _from_4d(y4: Tensor, x: Tensor) -> Tensor:
    """The op's (N, B, L, C) output in the shape of the caller's x (:func:`_to_4d`'s inverse)."""
    if x.dim() == 3:
        return y4.squeeze(0)
    if x.dim() > 4:
        return y4.reshape(x.shape)
    return y4


def dense_weights(compress_weight: Tensor, compress_bias: Optional[Tensor], generate_weight: Tensor,
                  generate_bias: Optional[Tensor], L: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four weights as every kernel takes them: contiguous, a missing bias as zeros (TorchScript-compilable, for
    :func:`scripted_dynamic_mix`)."""
    if compress_bias is None:
        compress_bias = compress_weight.new_zeros([compress_weight.size(0)])
    if generate_bias is None:
        generate_bias = generate_weight.new_zeros([L * L])
    return (compress_weight.contiguous(), compress_bias.contiguous(), generate_weight.contiguous(),
            generate_bias.contiguous())


def dynamic_mix(x: Tensor, compress_weight: Tensor, compress_bias: Tensor | None, generate_weight: Tensor,
                generate_bias: Tensor | None, num_segments: int, *, backend: str = "auto") -> Tensor:
    r"""DynaMixer's dynamic token mixing, fused: reduce, generate, softmax over the source token, apply.

    For every sequence ``n`` and segment ``s`` (``e0 = C // S``, ``d = compress_weight.shape[0] // S``)::

        r[n,l,s,k]   = x[n,l,:] . compress_weight[s*d+k, :] + compress_bias[s*d+k]
        G[n,s,i,j]   = sum_{l,k} r[n,l,s,k] generate_weight[i*L+j, l*d+k] + generate_bias[i*L+j]
        P[n,s,:,j]   = softmax_i(G[n,s,:,j])
        y[n,j,s*e0+e] = sum_i P[n,s,i,j] x[n,i,s*e0+e]

    Args:
        x: ``(..., L, C)``, any number (>= 1) of leading batch dims and any strides. A transposed view of a
            ``(B, H, W, C)`` tensor (``x.transpose(1, 2)``) mixes along H without a copy on the fused
            backends, and the result keeps that layout.
        compress_weight: ``(S*d, C)``; compress_bias: ``(S*d,)`` or ``None``.
        generate_weight: ``(L*L, L*d)``; generate_bias: ``(L*L,)`` or ``None``.
        num_segments: ``S`` (``num_head`` upstream); must divide ``C`` and the rows of ``compress_weight``.
        backend: ``"auto"`` (the fastest available for the inputs' device and dtype), or one of
            :func:`dynamixer_ops.available_backends`: ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
            An explicit backend that cannot run the inputs raises :class:`BackendUnavailableError` saying why.

    Returns:
        ``y`` with the shape of ``x``. Differentiable in ``x`` and all four weights; under
        ``torch.autocast`` the inputs are cast to the autocast dtype.
    """
    # is_autocast_available: is_autocast_enabled raises for devices without autocast (meta); torch 2.11's dynamo
    # cannot trace it, and a compiled graph never runs on those devices.
    if (isinstance(x, Tensor)
            and (torch.compiler.is_compiling() or torch.amp.is_autocast_available(x.device.type))
            and torch.is_autocast_enabled(x.device.type)):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, compress_weight, compress_bias, generate_weight, generate_bias = (
            t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in (x, compress_weight, compress_bias, generate_weight, generate_bias))
    L, C, S, d = check_inputs(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments)
    if decomposition_reason((x, compress_weight, compress_bias, generate_weight, generate_bias)) is not None:
        return decomposition(x, compress_weight, compress_bias, generate_weight, generate_bias, S, backend)
    chosen = resolve_backend(backend, x.device.type, x.dtype)
    x4 = _to_4d(x)
    weights = dense_weights(compress_weight, compress_bias, generate_weight, generate_bias, L)
    if _keeps_probabilities(chosen, L, C, S, d, (x4, *weights)):
        y4 = _dynamic_mix_keep_op(x4, *weights, S, chosen.name)[0]
    else:
        y4 = _dynamic_mix_op(x4, *weights, S, chosen.name)
    return _from_4d(y4, x)


def scripted_dynamic_mix(x: Tensor, compress_weight: Tensor, compress_bias: Optional[Tensor], generate_weight: Tensor,
                         generate_bias: Optional[Tensor], num_segments: int, backend: str) -> Tensor:
    """:func:`dynamic_mix` for TorchScript, which cannot compile its Python-side checks: the same op call on the
    same arguments (the op's kernels resolve ``"auto"`` by the inputs' device and dtype), for the fused layers'
    scripted forward. The layer's shapes were checked when it was built; autocast is not applied."""
    cw, cb, gw, gb = dense_weights(compress_weight, compress_bias, generate_weight, generate_bias, x.size(-2))
    return _from_4d(torch.ops.dynamixer_ops.dynamic_mix(_to_4d(x), cw, cb, gw, gb, num_segments, backend), x)
