"""What tests, benchmarks and tools agree on, written once: the model shapes, random inputs, the float64
reference, and the pass rule (relative error, tolerances, and the rounding floors of outputs that cancel;
``docs/dynamic_mix.md``). The test suite, ``dynamixer-bench``'s correctness column and
``benchmarks/gpu_tasks.py`` all judge with these functions, so the same numbers get the same verdict.

    from dynamixer_ops.testing import MODEL_SHAPES, make_inputs, reference_outputs, assert_matches_reference
"""
from __future__ import annotations

import math

import torch

from .reference import backward_terms, reference_forward, segments, unsegment
from .upstream import CONFIGS, PATCH_SIZE, stage_resolutions

__all__ = ["MODEL_SHAPES", "model_shapes", "TOLERANCE", "MODEL_TOLERANCE", "tolerance", "make_inputs",
           "linear_init_inputs", "reference_outputs", "relative_error", "GRAD_NAMES", "CANCELLATION_FLOOR",
           "ROUNDED_OPERANDS_FLOOR", "cancellation_floor", "rounding_scales", "reference_floors",
           "assert_close_rel", "assert_all_close", "assert_matches_reference"]


def model_shapes(img_size: int = 224, patch_size: int = PATCH_SIZE) -> dict[str, tuple[int, int, int, int]]:
    """The distinct ``(L, C, S, d)`` of the DynaMixer-S/M/L stages (:data:`dynamixer_ops.upstream.CONFIGS`),
    each named by its variant and the first stage that has it: ``s1`` = DynaMixer-S stage 1, ``m3`` =
    DynaMixer-M stages 3-4. L is the stage's side length (every row and column is one sequence)."""
    shapes: dict[str, tuple[int, int, int, int]] = {}
    for variant, config in CONFIGS.items():
        sides = stage_resolutions(img_size, patch_size, config["transitions"])
        for stage, (L, C, S, d) in enumerate(zip(sides, config["embed_dims"], config["num_heads"],
                                                 config["reduced_dims"]), start=1):
            if (L, C, S, d) not in shapes.values():
                shapes[f"{variant}{stage}"] = (L, C, S, d)
    return shapes


# At 224x224 input: s1 (32, 192, 8, 2), s2 (16, 384, 16, 2), m1 (32, 256, 8, 2), m3 (16, 512, 16, 2),
# l1 (32, 256, 8, 8), l2 (16, 512, 16, 8).
MODEL_SHAPES = model_shapes()

# Bounds on ||out - ref|| / ||ref|| against the float64 reference on the same inputs (docs/dynamic_mix.md,
# "Tolerances"): float32 under 1e-5 on a CPU and about 1e-3 where a GPU may run its dots in tf32 (2e-3 leaves
# room for the batch-wide weight-gradient sums); fp16/bf16 inputs with float32 accumulation land between 1e-3
# and 1e-2, so 1e-2 (an 8-bit bf16 mantissa rounds each stored value by at most 2**-9 ~ 2e-3 relative, and the
# interpreter's truncating bf16 stores by 2**-8 ~ 4e-3: both inside it). Per dtype: (CPU, GPU).
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 2e-3), torch.float16: (1e-2, 1e-2),
             torch.bfloat16: (1e-2, 1e-2)}
# Whole networks amplify rounding through ~20 blocks: the bound for a network's output and parameter gradients.
MODEL_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 6e-2}


def tolerance(dtype: torch.dtype, device: str | torch.device) -> float:
    """The bound for one op's output and gradients in ``dtype`` on ``device`` (see :data:`TOLERANCE`)."""
    cpu, gpu = TOLERANCE[dtype]
    return cpu if torch.device(device).type == "cpu" else gpu


def make_inputs(num_seq_shape, L, C, S, d, *, dtype, device, layout="contiguous", bias=True, logit_scale=2.0):
    """Random ``(x, compress_weight, compress_bias, generate_weight, generate_bias)`` (never zeros), from
    torch's global generator. ``layout``:

    * "contiguous": x is (*num_seq_shape, L, C), contiguous;
    * "transposed": x is a (B, H=L, W, C) tensor viewed as (B, W, L, C) (mixing along H, no copy);
    * "sliced": x is a channel- and token-sliced view with a gap between rows.
    """
    if layout == "contiguous":
        x = torch.randn(*num_seq_shape, L, C, dtype=dtype, device=device)
    elif layout == "transposed":
        B, W = num_seq_shape
        x = torch.randn(B, L, W, C, dtype=dtype, device=device).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(*num_seq_shape, L + 2, C + 5, dtype=dtype, device=device)[..., 1:L + 1, 3:C + 3]
    else:
        raise ValueError(f"layout {layout!r}: expected 'contiguous', 'transposed' or 'sliced'")
    # Scales chosen so that the logits are O(logit_scale): a softmax that is neither uniform nor one-hot.
    compress_weight = torch.randn(S * d, C, dtype=dtype, device=device) / math.sqrt(C)
    generate_weight = torch.randn(L * L, L * d, dtype=dtype, device=device) * (logit_scale / math.sqrt(L * d))
    compress_bias = torch.randn(S * d, dtype=dtype, device=device) * 0.5 if bias else None
    generate_bias = torch.randn(L * L, dtype=dtype, device=device) * 0.5 if bias else None
    return x, compress_weight, compress_bias, generate_weight, generate_bias


def linear_init_inputs(N: int, L: int, C: int, S: int, d: int, dtype: torch.dtype, device, seed: int = 0):
    """``(inputs, grad_y)`` for N sequences, reproducible from ``seed`` (drawn on the CPU): x and grad_y standard
    normal, weights and biases with nn.Linear's initialisation, so the logits are O(1) as in a fresh model."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    Sd, LL, Ld = S * d, L * L, L * d
    tensors = [torch.randn(N, L, C, generator=g), uniform((Sd, C), C), uniform((Sd,), C), uniform((LL, Ld), Ld),
               uniform((LL,), Ld)]
    grad_y = torch.randn(N, L, C, generator=g)
    return [t.to(device=device, dtype=dtype) for t in tensors], grad_y.to(device=device, dtype=dtype)


def reference_outputs(inputs, num_segments: int, grad_y):
    """``y`` and the gradients of the inputs that are not None, by autograd of the reference math
    (:func:`dynamixer_ops.reference.reference_forward`) in float64 on the CPU."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in inputs]
    y = reference_forward(*leaves, num_segments)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y.double().cpu())
    return y.detach(), grads


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)`` in float64; infinite where ``out`` has a NaN or Inf (an unwritten,
    poisoned element never passes) or a shape other than ``ref``'s."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return math.inf
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(max(floor, 1e-300))).item()


# ---- The pass rule: a relative error against float64, with a floor where the exact result cancels ----

GRAD_NAMES = ("dx", "d compress_weight", "d compress_bias", "d generate_weight", "d generate_bias")

# Floors are this fraction of the rounding scales: an output whose exact result cancels by less than 10x is held to
# tol * ||ref|| exactly as before; only heavier cancellation is measured against the scale its rounding has.
CANCELLATION_FLOOR = 0.1
# Where the kernels round the operands of their products (bf16/fp16 inputs: the CPU's bf16 dots, tensor cores; fp32
# with tf32 dots), the gradients come out of a chain of such products (G, dP, dG -> dz, the sums), so their error is
# a few units of that rounding times the whole scale, not a tenth of it: held to the tolerance relative to the
# whole scale. Seen: dbc of a 1 x 1 bf16 problem 1.8e-3 of its scale on the avx512bf16 path (seed 3019233647), and
# dbc 2.0e-4 of it with tf32 operands (seed 2306332305), each past tol x 0.1 x scale.
ROUNDED_OPERANDS_FLOOR = 1.0


def cancellation_floor(dtype: torch.dtype, tf32: bool = False) -> float:
    """The fraction of :func:`rounding_scales` below which an output's reference norm is not trusted."""
    return ROUNDED_OPERANDS_FLOOR if tf32 or dtype in (torch.float16, torch.bfloat16) else CANCELLATION_FLOOR


def rounding_scales(inputs, num_segments, grad_y):
    """Per output (y, then the five gradients), the norm its float rounding error scales with: the same last
    product or sum with every term made positive (float64, from the reference's intermediates). Where an exact
    result cancels (a weight gradient of one element summed over 37 tokens, say), ``||ref||`` is far below that
    scale and any summation order misses it by more than ``tol * ||ref||``: seen at 1.2e-5 for a 1 x 1 dWc."""
    x, wc, bc, wg, bg = [t.detach().double().cpu() if t is not None else None for t in inputs]
    S, L = num_segments, x.shape[-2]
    z, P, dG, dr, dys = backward_terms(grad_y.detach().double().cpu(), x, wc, bc, wg, bg, S)
    dG_rows, z_rows = dG.reshape(-1, L * L).abs(), z.reshape(-1, z.shape[-1]).abs()
    dr_rows, x_rows = dr.reshape(-1, dr.shape[-1]).abs(), x.reshape(-1, x.shape[-1]).abs()
    y_abs = unsegment(P.transpose(-1, -2) @ segments(x.abs(), S))               # P >= 0
    dx_abs = unsegment(P @ dys.abs()) + dr.abs() @ wc.abs()
    scales = (y_abs, dx_abs, dr_rows.T @ x_rows, dr_rows.sum(0), dG_rows.T @ z_rows, dG_rows.sum(0))
    return [s.norm().item() for s in scales]


def reference_floors(inputs, num_segments, grad_y, tf32: bool = False) -> list[float]:
    """The ``floor`` of :func:`relative_error` for ``y`` and the gradient of each input that is not None, in that
    order: :func:`cancellation_floor` times its :func:`rounding_scales`. ``tf32``: float32 products ran on tf32
    operands."""
    present = [True] + [t is not None for t in inputs]
    fraction = cancellation_floor(inputs[0].dtype, tf32)
    return [fraction * f for f, there in zip(rounding_scales(inputs, num_segments, grad_y), present) if there]


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, floor: float = 0.0) -> None:
    """Pass when ||out - ref|| / max(||ref||, floor) <= tol; otherwise say where and by how much the values differ.
    ``floor``: for values whose exact result cancels (see :func:`rounding_scales`), the norm that float rounding
    error scales with."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    err = relative_error(out, ref, floor)
    if err <= tol:
        return
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out64 - ref64).abs().nan_to_num(math.inf)
    worst = diff.flatten().argmax().item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape))
    nonfinite = (~torch.isfinite(out64)).sum().item()
    relative_to = f" (relative to the floor {floor:.3e} > ||ref||)" if floor > ref64.norm().item() else ""
    raise AssertionError(f"{what}: relative error{relative_to} {err:.3e} > {tol:.1e}; worst at {index}: got "
                         f"{out64[index].item():.6g}, expected {ref64[index].item():.6g}; "
                         f"{nonfinite} non-finite element(s) of {out.numel()}")


def assert_all_close(y, grads, ref_y, ref_grads, tol: float, names=None, prefix: str = "", floors=None) -> None:
    """``y`` and every gradient within ``tol`` of the reference (:func:`assert_close_rel`), each gradient in
    ``y``'s dtype. ``names`` label the gradients (default: all five, in the op's argument order); ``floors``:
    one per output, ``y`` first (default: none)."""
    names = GRAD_NAMES if names is None else names
    floors = [0.0] * (1 + len(grads)) if floors is None else floors
    assert len(grads) == len(ref_grads) == len(names), f"{len(grads)} gradients, {len(ref_grads)} expected"
    assert_close_rel(y, ref_y, tol, prefix + "y", floors[0])
    for name, g, ref, floor in zip(names, grads, ref_grads, floors[1:]):
        assert g.dtype == y.dtype, f"{prefix}{name}: dtype {g.dtype}, expected {y.dtype}"
        assert_close_rel(g, ref, tol, prefix + name, floor)


def assert_matches_reference(y, grads, inputs, num_segments, grad_y, tol: float, prefix: str = "",
                             tf32: bool = False) -> None:
    """``y`` (in x's dtype) and the gradients of the inputs that are not None against the float64 reference on
    the same inputs and ``grad_y``, each relative to max(its reference's norm, its :func:`reference_floors`).
    ``tf32``: the kernels ran float32 products on tf32 operands."""
    assert y.dtype == inputs[0].dtype, f"{prefix}y: dtype {y.dtype}, expected x's {inputs[0].dtype}"
    ref_y, ref_grads = reference_outputs(inputs, num_segments, grad_y)
    names = [name for name, t in zip(GRAD_NAMES, inputs) if t is not None]
    assert_all_close(y, grads, ref_y, ref_grads, tol, names, prefix,
                     reference_floors(inputs, num_segments, grad_y, tf32))
