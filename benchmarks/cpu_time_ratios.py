"""Fused ``cpu`` backend against the upstream eager step, timed in THREAD CPU time on one thread, interleaved.

On a shared, overloaded machine (load averages of 50-270 on 2 cores have been seen) wall-clock medians, and even
the interleaved wall-clock ratios of ``dynamixer-bench``, move by 2-4x between runs. The CPU time one thread spends
is far less sensitive to other processes (caches and memory bandwidth are still shared), so this script is the
fallback measurement there; on a quiet machine ``dynamixer-bench`` (2 threads, wall clock) is the reference. It
times through dynamixer-bench's pipeline (:mod:`dynamixer_ops.bench.timing`, mode ``thread_cpu``): every variant
in each round, forward (no_grad) and forward+backward, N = 256 sequences:

    python benchmarks/cpu_time_ratios.py --dtype bfloat16 --shapes s1 l1 --isas "" avx512
"""
from __future__ import annotations

import argparse
import os

import torch

from dynamixer_ops.bench import make_closure, make_mix_fn, time_side_by_side
from dynamixer_ops.testing import MODEL_SHAPES, make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shapes", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    p.add_argument("--isas", nargs="+", default=[""], help="DYNAMIXER_OPS_CPU_ISA per fused variant ('' = best)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeat", type=float, default=1000.0, help="ms of calls per variant and direction")
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype, device = getattr(torch, args.dtype), torch.device("cpu")
    print(f"load {os.getloadavg()[0]:.1f}; {args.dtype}; 1 thread; thread CPU time, median over {args.rounds} "
          f"interleaved rounds")
    for name in args.shapes:
        L, C, S, d = MODEL_SHAPES[name]
        torch.manual_seed(0)
        inputs = list(make_inputs((256,), L, C, S, d, dtype=dtype, device=device))
        grad_y = torch.randn_like(inputs[0])
        fns = {"eager": make_mix_fn("eager", S, device)}
        for isa in args.isas:
            def fused(*tensors, isa=isa, cpu=make_mix_fn("cpu", S, device)):
                os.environ["DYNAMIXER_OPS_CPU_ISA"] = isa
                return cpu(*tensors)
            fns["cpu" + (f":{isa}" if isa else "")] = fused
        cells = {k: [] for k in fns}
        for direction in ("fwd", "fwdbwd"):
            runs = {k: make_closure(f, inputs, grad_y, direction) for k, f in fns.items()}
            rows = {k: {} for k in fns}
            time_side_by_side(runs, rows, device, warmup_ms=50, repeat_ms=args.repeat, rounds=args.rounds,
                              mode="thread_cpu")
            for k, row in rows.items():
                cells[k].append(f"{direction} {row['median_ms']:.2f} ms ({row['speedup_vs_eager']:.2f}x)"
                                if row.get("median_ms") else f"{direction} {row.get('status')} {row.get('message')}")
        print(f"{name:3s} " + " | ".join(f"{k}: {' '.join(c)}" for k, c in cells.items()), flush=True)


if __name__ == "__main__":
    main()
