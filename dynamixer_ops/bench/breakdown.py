"""Where a network's CPU inference time goes, per path: the Linears by shape, the mixing, LayerNorm, GELU, the
reweighting's element-wise work, copies, the rest. The torch profiler's self time of every op, grouped.

    python -m dynamixer_ops.bench.breakdown --batch 8 --threads 2          # DynaMixer-S 224, fp32, no_grad

Each path is checked against the upstream network first; times are the profiler's (its overhead inflates small ops
alike in every path), averaged over ``--rounds`` forwards after two warm-up calls.
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .. import convert, optimize, upstream
from ..testing import relative_error

__all__ = ["breakdown", "main"]

# op name -> part (the first pattern contained in the name wins)
_PARTS = (
    (("_linear_pointwise", "_mkl_linear", "addmm", "aten::mm", "aten::linear"), "Linear"),
    (("dynamixer_ops::", "softmax", "bmm", "aten::matmul"), "mixing"),
    (("layer_norm",), "LayerNorm"),
    (("gelu",), "GELU"),
    (("aten::add", "aten::mul", "aten::addcmul", "aten::mean", "aten::sum", "aten::div"), "element-wise"),
    (("copy_", "clone", "contiguous", "aten::cat", "aten::to", "_to_copy", "empty"), "copies"),
    (("convolution", "conv2d", "mkldnn_convolution"), "convolutions"),
)


def _rows(shape) -> int:
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows


def _linear_shape(name: str, shapes) -> str | None:
    """``rows x in -> out`` of a Linear-like op from its input shapes, or None where they do not say."""
    try:
        if "addmm" in name:                         # (bias, x, w.T)
            (m, k), n = shapes[1], shapes[2][1]
        elif name == "aten::mm":                    # (x, w.T)
            (m, k), n = shapes[0], shapes[1][1]
        elif "_mkl_linear" in name:                 # (x, packed, w, bias, batch)
            m, k, n = _rows(shapes[0]), shapes[0][-1], shapes[2][0]
        elif "_linear_pointwise" in name:           # (x, [residual,] w or packed w, bias, ...)
            m, k = _rows(shapes[0]), shapes[0][-1]
            bias = [s for s in shapes[1:] if len(s) == 1]
            n = bias[0][0] if bias else next(s[0] for s in shapes[1:] if len(s) == 2)
        else:                                        # aten::linear (x, w, bias)
            m, k, n = _rows(shapes[0]), shapes[0][-1], shapes[1][0]
    except (IndexError, TypeError, ValueError):
        return None
    return f"Linear {m}x{k}->{n}"


def _part(name: str, shapes) -> str:
    for patterns, part in _PARTS:
        if any(p in name for p in patterns):
            if part == "Linear":
                return _linear_shape(name, shapes) or "Linear"
            return part
    return "rest"


def breakdown(net, x: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """``{part: ms per forward}`` of ``net(x)`` under no_grad (profiler self times)."""
    with torch.no_grad():
        for _ in range(2):
            net(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(rounds):
                net(x)
    parts: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        parts[_part(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e3 / rounds
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dynamixer_ops.bench.breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="s", choices=sorted(upstream.CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    up = upstream.eager_model(args.variant, img_size=args.img_size).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    paths = {"upstream eager": up, "convert": convert(copy.deepcopy(up)).eval(),
             "optimize(convert)": optimize(convert(copy.deepcopy(up))).eval()}
    with torch.no_grad():
        want = up(x)
        for name, net in paths.items():
            err = relative_error(net(x), want)
            if err > 1e-4:
                raise SystemExit(f"{name} disagrees with the upstream network: rel {err:.2e}")
    tables = {name: breakdown(net, x, args.rounds) for name, net in paths.items()}
    parts = sorted({k for t in tables.values() for k in t}, key=lambda k: -max(t.get(k, 0) for t in tables.values()))
    names = list(tables)
    print(f"DynaMixer-{args.variant.upper()} {args.img_size}, batch {args.batch}, {args.threads} threads, fp32, "
          f"ms per forward (profiler self time)")
    print(f"{'part':28s}" + "".join(f"{n:>20s}" for n in names))
    for part in parts:
        print(f"{part:28s}" + "".join(f"{tables[n].get(part, 0):20.2f}" for n in names))
    print(f"{'total':28s}" + "".join(f"{sum(tables[n].values()):20.2f}" for n in names))


if __name__ == "__main__":
    main()
