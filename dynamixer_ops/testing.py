"""What tests, benchmarks and tools agree on, written once: the model shapes, the odd shapes of every check grid,
the CPU kernel's instruction sets (and which of them run here), random inputs, the float64 reference, and the pass
rule (relative error, tolerances, and the rounding floors of outputs that cancel; ``docs/dynamic_mix.md``). The test
suite, ``dynamixer-bench``'s correctness column and ``benchmarks/gpu_tasks.py`` all judge with these functions, so
the same numbers get the same verdict.

    from dynamixer_ops.testing import MODEL_SHAPES, make_inputs, reference_outputs, assert_matches_reference
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

from .reference import backward_terms, reference_forward, segments, unsegment
from .upstream import CONFIGS, PATCH_SIZE, stage_resolutions

__all__ = ["MODEL_SHAPES", "model_shapes", "OddShape", "ODD_SHAPES", "odd_shapes", "CPU_ISAS", "REHEARSED_CPU_ISA",
           "cpu_isa_missing", "TOLERANCE", "MODEL_TOLERANCE", "tolerance", "make_inputs",
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

@dataclasses.dataclass(frozen=True)
class OddShape:
    """An awkward problem: x is ``(*batch, L, C)`` in ``layout`` (:func:`make_inputs`; "transposed" takes a
    two-dim batch (B, W)), S segments of C/S channels, reduced dim d. ``checks``: the grids that run it
    (:data:`ODD_SHAPES`)."""
    batch: tuple[int, ...]
    L: int
    C: int
    S: int
    d: int
    layout: str = "contiguous"
    checks: tuple[str, ...] = ("backends",)

    @property
    def name(self) -> str:
        """e.g. ``L7-S2-e24-d1-N1`` (e = C/S), ``L14-S2-e24-d2-N2x3-transposed``: a test id."""
        layout = "" if self.layout == "contiguous" else f"-{self.layout}"
        return f"L{self.L}-S{self.S}-e{self.C // self.S}-d{self.d}-N{'x'.join(map(str, self.batch))}{layout}"

    @property
    def sizes(self) -> tuple[tuple[int, ...], int, int, int, int]:
        """``(batch, L, C, S, d)``: the first five arguments of :func:`make_inputs`."""
        return self.batch, self.L, self.C, self.S, self.d


def _odd(batch, L, C, S, d, layout="contiguous", checks="backends") -> OddShape:
    return OddShape(tuple(batch), L, C, S, d, layout, tuple(checks.split()))


# Every awkward shape the checks run, once. ``checks`` names the grids that take a shape:
#   backends  every backend x dtype, forward and five gradients (tests/test_dynamic_mix.py on this machine's
#             devices, benchmarks/gpu_tasks.py check on a GPU: one grid)
#   cuda      the CUDA kernels' own edges (emulated on the CPU, tests/cuda_emu_cases.py; run on a GPU)
#   cpu       the C++ CPU kernel's vector tails on every instruction set (tests/test_cpu_kernel.py)
#   modules   DynaMixerOp against the upstream layer (tests/test_modules.py; contiguous, one batch dim)
ODD_SHAPES = (
    # backends: L = 7/14/28 pad in Triton, C/S = 24 is not a power of two, d = 1..8, one sequence, several hundred
    # sequences (ragged against any block size), C/S = 1, transposed and sliced views of x.
    _odd((1,), 7, 48, 2, 1),
    _odd((3,), 14, 96, 4, 2),
    _odd((2, 3), 16, 128, 4, 2),
    _odd((2,), 32, 64, 2, 8),
    _odd((2,), 28, 48, 2, 2),
    _odd((300,), 7, 64, 2, 2),
    _odd((4,), 5, 3, 3, 3),
    _odd((2, 3), 14, 48, 2, 2, "transposed"),
    _odd((3,), 7, 48, 2, 1, "sliced"),
    _odd((5,), 7, 48, 2, 1),
    _odd((6,), 14, 96, 4, 3),
    _odd((3,), 14, 48, 2, 8),
    _odd((4,), 28, 96, 4, 2),
    _odd((2, 7), 7, 48, 2, 2, "transposed"),
    _odd((2, 32), 32, 64, 2, 8, "transposed"),
    _odd((1,), 7, 48, 2, 2),
    _odd((1,), 32, 48, 2, 2),
    # cuda: SIMT channel chunks of 32 (e = 40 is 32 + 8, e = 33), reduce passes of 8 reduced values (d = 9), tiles
    # of up to 8 sequences (N = 11: a ragged last tile), L = 1 (P = 1), the model shapes' L = 32 / 16 with
    # C/S = 24 and 32.
    _odd((11,), 7, 80, 2, 2, checks="cuda"),
    _odd((2,), 5, 66, 2, 9, checks="cuda"),
    _odd((3,), 1, 16, 2, 2, checks="cuda"),
    _odd((2,), 32, 48, 2, 2, checks="cuda"),
    _odd((9,), 16, 64, 2, 8, checks="cuda"),
    _odd((2, 3), 14, 48, 2, 1, checks="cuda"),
    # cuda, the tensor-core kernels' edges: a block holds ceil(16 / S) sequences x S segments in 16-row tiles, so
    # S = 3 (6 sequences, 18 rows: a second, partial tile; N = 7: a ragged last block) and S = 20 (1 sequence, 20
    # rows) with N = 1 and L = 28 (padded to 32, L*L = 784); S * d = 40 reduced values: grad_x on tensor cores
    # stages them in two steps of 32.
    _odd((7,), 7, 72, 3, 2, checks="cuda"),
    _odd((1,), 28, 160, 20, 1, checks="cuda"),
    _odd((3,), 7, 40, 5, 8, checks="cuda"),
    # cpu: every vector-width tail (L and C/S of 1..40, not multiples of 16 or 8), d = 1..8, and batches that are
    # not a multiple of the block size, nor of the chunk count.
    _odd((1,), 7, 24, 1, 1, checks="cpu modules"),
    _odd((5,), 14, 72, 3, 8, checks="cpu"),
    _odd((37,), 32, 192, 8, 2, checks="cpu"),
    _odd((70,), 32, 64, 2, 2, checks="cpu"),              # 18 blocks in 16 chunks: chunks of one and two blocks
    _odd((3, 4), 28, 96, 4, 2, "transposed", checks="cpu"),
    _odd((4,), 5, 3, 3, 1, "sliced", checks="cpu"),
    _odd((2,), 40, 80, 2, 3, checks="cpu"),
    _odd((3,), 1, 8, 8, 2, checks="cpu"),
    _odd((9,), 7, 24, 1, 3, checks="cpu"),                # bf16 dots: odd L and odd S*d padded to pairs
    _odd((2, 9), 9, 8, 4, 1, "transposed", checks="cpu"),  # bf16 dots: segments of one channel pair, strided rows
    _odd((2,), 1, 1, 1, 1, checks="cpu"),                 # bf16 weight packing of 1 x 1 matrices (size-1 strides)
    # modules (with the first cpu shape): a few sequences of L = 8/14/28, one to four segments, d = 2/8.
    _odd((3,), 14, 48, 2, 2, checks="modules"),
    _odd((2,), 8, 64, 4, 8, checks="modules"),
    _odd((2,), 28, 24, 1, 2, checks="modules"),
)


def odd_shapes(check: str) -> list[OddShape]:
    """The shapes of :data:`ODD_SHAPES` that the grid ``check`` runs ("backends", "cuda", "cpu", "modules")."""
    shapes = [s for s in ODD_SHAPES if check in s.checks]
    if not shapes:
        raise ValueError(f"no odd shape is run by {check!r}; checks: "
                         f"{sorted({c for s in ODD_SHAPES for c in s.checks})}")
    return shapes


# The C++ CPU kernel's instruction sets, best first: a CPU that has one has every one after it. The kernel runs the
# best this CPU has; DYNAMIXER_OPS_CPU_ISA forces one (csrc/cpu/dynamic_mix_cpu.cpp).
CPU_ISAS = ("avx512bf16", "avx512", "avx2", "generic")
# DYNAMIXER_OPS_CPU_ISA as this process started, before any test forces a set: the tests and .ci/sanitize take it as
# this CPU's best set, so that one CPU rehearses another with less (DYNAMIXER_OPS_CPU_ISA=avx2 on an AVX-512 CPU: the
# kernels run avx2, and the tests and code of avx512 and avx512bf16 skip and are named not checked, as on an AVX2 CPU).
REHEARSED_CPU_ISA = os.environ.get("DYNAMIXER_OPS_CPU_ISA") or None


def cpu_isa_missing(isa: str, rehearsed: str | None = REHEARSED_CPU_ISA) -> str | None:
    """Why the ``cpu`` backend cannot run the instruction set ``isa`` (one of :data:`CPU_ISAS`) here, or None where
    it can: ``rehearsed`` (default :data:`REHEARSED_CPU_ISA`; None for this CPU as it is) is a lower set, or this
    CPU (or build) has not got it. Needs the ``cpu`` backend."""
    for name, value in (("isa", isa), ("DYNAMIXER_OPS_CPU_ISA", rehearsed)):
        if value is not None and value not in CPU_ISAS:
            raise ValueError(f"{name} must be one of {', '.join(CPU_ISAS)}, got '{value}'")
    if rehearsed is not None and CPU_ISAS.index(isa) < CPU_ISAS.index(rehearsed):
        return f"no {isa} here: DYNAMIXER_OPS_CPU_ISA={rehearsed} rehearses a CPU without it"
    return None if _cpu_runs(isa) else f"this CPU has no {isa}"


@functools.cache
def _cpu_runs(isa: str) -> bool:
    """Whether the cpu kernel runs ``isa`` when DYNAMIXER_OPS_CPU_ISA forces it (it refuses a set this CPU lacks)."""
    from .ops import dynamic_mix
    saved = os.environ.get("DYNAMIXER_OPS_CPU_ISA")
    os.environ["DYNAMIXER_OPS_CPU_ISA"] = isa
    try:
        dynamic_mix(*make_inputs((1,), 2, 2, 1, 1, dtype=torch.float32, device="cpu"), 1, backend="cpu")
    except RuntimeError as exc:
        if "only supports a lower instruction set" not in str(exc):
            raise
        return False
    finally:
        if saved is None:
            del os.environ["DYNAMIXER_OPS_CPU_ISA"]
        else:
            os.environ["DYNAMIXER_OPS_CPU_ISA"] = saved
    return True


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
