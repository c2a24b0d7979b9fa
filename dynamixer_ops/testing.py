"""What tests, benchmarks and tools agree on, written once: the model shapes, random inputs, the float64
reference, the relative error, and the tolerances that an honest check uses (``docs/dynamic_mix.md``).

    from dynamixer_ops.testing import MODEL_SHAPES, make_inputs, reference_outputs, relative_error, tolerance
"""
from __future__ import annotations

import math

import torch

from .reference import mix_forward
from .upstream import CONFIGS, stage_resolutions

__all__ = ["MODEL_SHAPES", "model_shapes", "TOLERANCE", "MODEL_TOLERANCE", "tolerance", "make_inputs",
           "linear_init_inputs", "reference_outputs", "relative_error"]


def model_shapes(img_size: int = 224, patch_size: int = 7) -> dict[str, tuple[int, int, int, int]]:
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
    (:func:`dynamixer_ops.reference.mix_forward`) in float64 on the CPU."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in inputs]
    y = mix_forward(*leaves, num_segments)
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
