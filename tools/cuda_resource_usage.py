"""Registers, spills and shared memory of every CUDA kernel (ptxas -v), and the blocks per SM they allow at the
model shapes. Needs nvcc, not a GPU:  python tools/cuda_resource_usage.py [--arch 80 --arch 90]

The numbers printed here are the ones recorded in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
THREADS, MAX_TILE, CHUNK = 256, 8, 32          # kThreads, kMaxTile, kChunk in dynamic_mix_cuda.h
# Per SM: registers, shared memory, most resident threads; the largest opt-in shared memory per block.
SM = {"80": dict(name="A100", regs=65536, smem=167936, block_smem=166912, threads=2048),
      "90": dict(name="H100", regs=65536, smem=233472, block_smem=232448, threads=2048)}
SHAPES = [("S/M stage 1", 32, 2), ("S/M stages 2-4", 16, 2), ("L stage 1", 32, 8), ("L stages 2-4", 16, 8)]


def forward_smem(L, d, ts):
    return 4 * (ts * L * d + ts * L * (L | 1) + L * CHUNK)


def backward_smem(L, d, ts):
    return 4 * (ts * L * d + 2 * ts * L * (L | 1) + 2 * L * (CHUNK + 1))


def ptxas(archs):
    import torch.utils.cpp_extension as ext
    includes = [f"-I{p}" for p in ext.include_paths()] + [f"-I{CSRC}"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v", *gencode, *includes,
                              "-c", os.path.join(CSRC, "cuda", "dynamic_mix_cuda.cu"), "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    rows, current = [], None
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            k = re.search(r"(mix_forward_kernel|mix_backward_kernel|grad_x_kernel|splitk_atb_kernel)I(f|6__half|"
                          r"13__nv_bfloat16)E", m.group(1))
            dtype = {"f": "float", "6__half": "half", "13__nv_bfloat16": "bfloat16"}[k.group(2)]
            current = dict(arch=m.group(2), kernel=k.group(1), dtype=dtype)
        elif current and "spill stores" in line:
            stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line).groups()
            current["spills"] = "none" if stores == loads == "0" else f"{stores} B stores, {loads} B loads"
        elif current and "Used" in line:
            current["regs"] = int(re.search(r"Used (\d+) registers", line).group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
            rows.append(current)
            current = None
    return rows


def blocks_per_sm(arch, regs, smem):
    sm = SM[arch]
    by_regs = sm["regs"] // (((regs + 7) // 8 * 8) * THREADS)
    by_smem = sm["smem"] // (smem + 1024)          # 1 KB per block is reserved by the driver (sm_80+)
    return min(by_regs, by_smem, sm["threads"] // THREADS), by_regs, by_smem


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability without the dot (default 80, 90)")
    archs = parser.parse_args().arch or ["80", "90"]
    rows = ptxas(archs)
    print("| arch | kernel | dtype | registers | static smem (B) | spills |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['regs']} | {r['static_smem']} | {r['spills']} |")
    regs = {(r["arch"], r["kernel"]): max(x["regs"] for x in rows if (x["arch"], x["kernel"]) == (r["arch"], r["kernel"]))
            for r in rows}
    print("\n| arch | shape (L, d) | kernel | tile ts | dynamic smem (B) | blocks/SM (regs, smem) | warps/SM |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in archs:
        for name, L, d in SHAPES:
            for kernel, smem_fn in (("mix_forward_kernel", forward_smem), ("mix_backward_kernel", backward_smem)):
                ts = next(t for t in range(MAX_TILE, 0, -1) if smem_fn(L, d, t) <= SM[arch]["block_smem"])
                smem = smem_fn(L, d, ts)
                n, by_regs, by_smem = blocks_per_sm(arch, regs[(arch, kernel)], smem)
                print(f"| sm_{arch} ({SM[arch]['name']}) | {name} ({L}, {d}) | {kernel} | {ts} | {smem} | "
                      f"{n} ({by_regs}, {by_smem}) | {n * THREADS // 32} |")


if __name__ == "__main__":
    main()
