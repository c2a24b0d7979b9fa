"""Plain-PyTorch statements of the dynamic mixing step (``docs/dynamic_mix.md``).

Three things live here and nowhere else:

* :func:`reference_forward` — the op's math on ``(..., L, C)``, written for clarity. Tests run it in float64
  (through autograd) as the truth every backend is compared with.
* :func:`reference_backward` — the closed-form backward of docs/dynamic_mix.md (its intermediates:
  :func:`backward_terms`).
  The ``reference`` backend uses it, and the tests check it against autograd of :func:`reference_forward`, so the
  formula itself is verified.
* :func:`upstream_chain` — a faithful restatement of the upstream eager layer's permute chain (without its
  ``out`` projection), calling the two Linears and the ``activation`` (a softmax over the source token) as the
  upstream code does; :func:`upstream_mix` is the same chain on bare weights, the baseline of every benchmark. The
  chain is two steps, :func:`generate_input` and :func:`apply_mixing`, which :class:`dynamixer_ops.upstream.DynaMixerOp`
  calls as well (TorchScript can compile them; it cannot pass modules to a function).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _mixing_matrices(x: Tensor, compress_weight: Tensor, compress_bias: Tensor | None,
                     generate_weight: Tensor, generate_bias: Tensor | None, num_segments: int):
    """Return ``z`` (..., S, L*d) and ``P`` (..., S, L_source, L_target)."""
    *lead, L, _ = x.shape
    d = compress_weight.shape[0] // num_segments
    r = F.linear(x, compress_weight, compress_bias)                             # (..., L, S*d)
    z = r.reshape(*lead, L, num_segments, d).transpose(-3, -2).reshape(*lead, num_segments, L * d)
    logits = F.linear(z, generate_weight, generate_bias).reshape(*lead, num_segments, L, L)
    return z, logits.softmax(dim=-2)                                           # softmax over the source i


def segments(t: Tensor, num_segments: int) -> Tensor:
    """(..., L, C) -> (..., S, L, C/S)."""
    *lead, L, C = t.shape
    return t.reshape(*lead, L, num_segments, C // num_segments).transpose(-3, -2)


def unsegment(t: Tensor) -> Tensor:
    """(..., S, L, C/S) -> (..., L, C)."""
    *lead, S, L, e0 = t.shape
    return t.transpose(-3, -2).reshape(*lead, L, S * e0)


def reference_forward(x: Tensor, compress_weight: Tensor, compress_bias: Tensor | None,
                generate_weight: Tensor, generate_bias: Tensor | None, num_segments: int) -> Tensor:
    """``y[..., j, s*e0+e] = sum_i P[..., s, i, j] x[..., i, s*e0+e]``; differentiable with autograd."""
    _, P = _mixing_matrices(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments)
    return unsegment(P.transpose(-1, -2) @ segments(x, num_segments))


def backward_terms(grad_y: Tensor, x: Tensor, compress_weight: Tensor, compress_bias: Tensor | None,
                   generate_weight: Tensor, generate_bias: Tensor | None, num_segments: int):
    """The backward's intermediates: ``z`` (..., S, L*d), ``P`` and ``dG`` (..., S, L, L), ``dr`` (..., L, S*d)
    and ``dys``, the segmented ``grad_y`` (..., S, L, C/S). Every gradient is one more product or sum of these."""
    *lead, L, _ = x.shape
    d = compress_weight.shape[0] // num_segments
    z, P = _mixing_matrices(x, compress_weight, compress_bias, generate_weight, generate_bias, num_segments)
    xs, dys = segments(x, num_segments), segments(grad_y, num_segments)      # (..., S, L, e0)
    dP = xs @ dys.transpose(-1, -2)                                            # [i, j] = sum_e x_i dy_j
    dG = P * (dP - (P * dP).sum(dim=-2, keepdim=True))                         # softmax over i
    dz = (dG.reshape(*lead, num_segments, L * L) @ generate_weight).reshape(*lead, num_segments, L, d)
    dr = dz.transpose(-3, -2).reshape(*lead, L, num_segments * d)              # (..., L, S*d)
    return z, P, dG, dr, dys


def reference_backward(grad_y: Tensor, x: Tensor, compress_weight: Tensor, compress_bias: Tensor | None,
                 generate_weight: Tensor, generate_bias: Tensor | None, num_segments: int):
    """Closed-form gradients ``(dx, d compress_weight, d compress_bias, d generate_weight, d generate_bias)``."""
    L, C = x.shape[-2:]
    z, P, dG, dr, dys = backward_terms(grad_y, x, compress_weight, compress_bias, generate_weight, generate_bias,
                                       num_segments)
    dG_rows, z_rows = dG.reshape(-1, L * L), z.reshape(-1, z.shape[-1])
    d_generate_weight = dG_rows.T @ z_rows
    d_generate_bias = dG_rows.sum(0)
    dr_rows, x_rows = dr.reshape(-1, dr.shape[-1]), x.reshape(-1, C)
    d_compress_weight = dr_rows.T @ x_rows
    d_compress_bias = dr_rows.sum(0)
    dx = unsegment(P @ dys) + dr @ compress_weight                           # dx_mix[i] = sum_j P[i, j] dy_j
    return dx, d_compress_weight, d_compress_bias, d_generate_weight, d_generate_bias


def generate_input(r: Tensor, num_segments: int) -> Tensor:
    """The upstream chain's reshuffle of ``compress``'s output r (B, L, S*d) into ``generate``'s input (B, S, L*d)."""
    B, L, Sd = r.shape
    d = Sd // num_segments
    return r.reshape(B, L, num_segments, d).permute(0, 2, 1, 3).reshape(B, num_segments, L * d)


def apply_mixing(x: Tensor, P: Tensor, num_segments: int) -> Tensor:
    """The upstream chain's last step: ``y[b, j, s*e0+e] = sum_i P[b, s, i, j] x[b, i, s*e0+e]`` on x (B, L, C) and
    the mixing matrices P (B, S, L, L), op for op."""
    B, L, C = x.shape
    return (x.reshape(B, L, num_segments, C // num_segments).permute(0, 2, 3, 1) @ P).permute(0, 3, 1, 2).reshape(
        B, L, C)


def upstream_chain(x: Tensor, compress, generate, activation, num_segments: int) -> Tensor:
    """The upstream ``DynaMixerOp.forward`` on (B, L, C), minus its ``out`` projection, op for op; ``compress``,
    ``generate`` and ``activation`` (upstream: ``nn.Softmax(dim=-2)`` on the (B, S, L, L) logits) are called as the
    upstream code calls them (modules, or any callables). Written as :func:`generate_input` and
    :func:`apply_mixing`, which :class:`dynamixer_ops.upstream.DynaMixerOp` (TorchScript-compilable) calls too."""
    B, L, _ = x.shape
    P = activation(generate(generate_input(compress(x), num_segments)).reshape(B, num_segments, L, L))
    return apply_mixing(x, P, num_segments)


def upstream_mix(x: Tensor, compress_weight: Tensor, compress_bias: Tensor | None,
                 generate_weight: Tensor, generate_bias: Tensor | None, num_segments: int) -> Tensor:
    """:func:`upstream_chain` with the two Linears as ``F.linear`` of these weights and the softmax over the source
    token."""
    return upstream_chain(x, lambda t: F.linear(t, compress_weight, compress_bias),
                          lambda t: F.linear(t, generate_weight, generate_bias), lambda t: t.softmax(dim=-2),
                          num_segments)
