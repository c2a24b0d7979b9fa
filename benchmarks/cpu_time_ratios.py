"""Fused ``cpu`` backend against the upstream eager step, timed in THREAD CPU time on one thread, interleaved.

On a shared, overloaded box (load averages of 50-270 on 2 cores were seen while issue 15 was worked on) wall-clock
medians, and even the interleaved wall-clock ratios of ``dynamixer-bench``, move by 2-4x between runs. The CPU time
one thread spends is far less sensitive to other processes (caches and memory bandwidth are still shared), so
this script is the fallback measurement there; on a quiet machine ``dynamixer-bench`` (2 threads, wall clock) is
the reference. Each round times every variant once, forward (no_grad) and forward+backward, N = 256 sequences:

    python benchmarks/cpu_time_ratios.py --dtype bfloat16 --shapes s1 l1 --isas "" avx512
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from dynamixer_ops import dynamic_mix
from dynamixer_ops.reference import upstream_mix
from dynamixer_ops.testing import MODEL_SHAPES, make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shapes", nargs="+", default=["s1", "s2", "m1", "m3", "l1", "l2"])
    p.add_argument("--isas", nargs="+", default=[""], help="DYNAMIXER_OPS_CPU_ISA per fused variant ('' = best)")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"load {os.getloadavg()[0]:.1f}; {args.dtype}; 1 thread; thread CPU time, median of {args.rounds} rounds")
    for name in args.shapes:
        L, C, S, d = MODEL_SHAPES[name]
        torch.manual_seed(0)
        leaves = [t.requires_grad_() for t in make_inputs((256,), L, C, S, d, dtype=dtype, device="cpu")]
        grad_y = torch.randn_like(leaves[0])
        variants = {"eager": lambda: upstream_mix(*leaves, S)}
        for isa in args.isas:
            def fused(isa=isa):
                os.environ["DYNAMIXER_OPS_CPU_ISA"] = isa
                return dynamic_mix(*leaves, S, backend="cpu")
            variants["cpu" + (f":{isa}" if isa else "")] = fused
        times = {k: ([], []) for k in variants}
        for _ in range(args.rounds):
            for k, f in variants.items():
                t0 = time.thread_time()
                with torch.no_grad():
                    f()
                t1 = time.thread_time()
                torch.autograd.grad(f(), leaves, grad_y)
                times[k][0].append(t1 - t0)
                times[k][1].append(time.thread_time() - t1)
        med = {k: [sorted(v)[len(v) // 2] * 1e3 for v in t] for k, t in times.items()}
        e = med["eager"]
        print(f"{name:3s} " + " | ".join(f"{k}: fwd {m[0]:.2f} ms ({e[0] / m[0]:.2f}x) fwdbwd {m[1]:.2f} ms "
                                         f"({e[1] / m[1]:.2f}x)" for k, m in med.items()), flush=True)


if __name__ == "__main__":
    main()
