"""Registers, spills, shared memory and tensor-core instructions of every CUDA kernel, and the blocks per SM they
allow at the model shapes. Needs nvcc (and cuobjdump for the SASS column), not a GPU:

    python tools/cuda_resource_usage.py [--arch 80 --arch 90] [--json]

ptxas -v gives registers and spills; `cuobjdump --dump-sass` counts HMMA instructions per kernel (found on PATH,
in CUDA_HOME/bin, in triton's wheel at triton/backends/nvidia/bin, or in the nvidia-cuda-cuobjdump wheel).
Shared-memory sizes are not restated here: a tiny host program compiled against csrc/cuda/dynamic_mix_cuda.h
prints what the header defines. The numbers printed are the ones recorded in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
THREADS = 256                                   # kThreads in dynamic_mix_cuda.h
# Per SM: registers, shared memory, most resident threads; the largest opt-in shared memory per block.
SM = {"80": dict(name="A100", regs=65536, smem=167936, block_smem=166912, threads=2048),
      "90": dict(name="H100/H200", regs=65536, smem=233472, block_smem=232448, threads=2048)}
# (name, L, C, S, d) from shared/DYNAMIC_MIX.md.
SHAPES = [("S stage 1", 32, 192, 8, 2), ("S stages 2-4", 16, 384, 16, 2), ("M stages 1-2", 32, 256, 8, 2),
          ("M stages 3-4", 16, 512, 16, 2), ("L stage 1", 32, 256, 8, 8), ("L stages 2-4", 16, 512, 16, 8)]
KERNELS = ("mix_forward_tc_kernel", "mix_backward_tc_kernel", "mix_forward_kernel", "mix_backward_kernel", "grad_x_kernel", "splitk_atb_kernel")
DTYPES = {"f": "float", "6__half": "half", "13__nv_bfloat16": "bfloat16"}
KERNEL_RE = re.compile(r"(" + "|".join(KERNELS) + r")I(f|6__half|13__nv_bfloat16)E")

SMEM_PROGRAM = r"""
#include <cstdio>
#include "cuda/dynamic_mix_cuda.h"
using namespace dynamixer_ops::cuda;
int main(int argc, char** argv) {   // argv: L C S d; prints kernel tile bytes, one per line
  long L = atol(argv[1]), C = atol(argv[2]), S = atol(argv[3]), d = atol(argv[4]);
  for (int ts = 1; ts <= kMaxTile; ++ts) {
    printf("mix_forward_kernel %d %zu\n", ts, forward_smem_bytes(L, d, ts));
    printf("mix_backward_kernel %d %zu\n", ts, backward_smem_bytes(L, d, ts));
  }
  for (int elem : {2, 4}) {
    for (bool backward : {false, true}) {
      TcDims tc = tc_dims(L, C, S, d, elem, backward);
      printf("%s/%d %ld %zu\n", backward ? "mix_backward_tc_kernel" : "mix_forward_tc_kernel", elem, (long)tc.ts,
             tc.bytes);
    }
  }
}
"""


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    try:
        import nvidia
        for base in getattr(nvidia, "__path__", []):
            candidates += glob.glob(os.path.join(base, "cuda_cuobjdump", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _kernel_of(symbol):
    k = KERNEL_RE.search(symbol)
    return (k.group(1), DTYPES[k.group(2)]) if k else None


def compile_kernels(archs, tmp):
    import torch.utils.cpp_extension as ext
    includes = [f"-I{p}" for p in ext.include_paths()] + [f"-I{CSRC}"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    obj = os.path.join(tmp, "k.o")
    out = subprocess.run(["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v", *gencode, *includes,
                          "-c", os.path.join(CSRC, "cuda", "dynamic_mix_cuda.cu"), "-o", obj],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    rows, current = [], None
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            kernel, dtype = _kernel_of(m.group(1))
            current = dict(arch=m.group(2), kernel=kernel, dtype=dtype)
        elif current and "spill stores" in line:
            stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line).groups()
            current["spills"] = "none" if stores == loads == "0" else f"{stores} B stores, {loads} B loads"
        elif current and "Used" in line:
            current["regs"] = int(re.search(r"Used (\d+) registers", line).group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
            rows.append(current)
            current = None
    return rows, obj


def count_hmma(obj, rows):
    """Adds 'hmma' (tensor-core instructions in the kernel's SASS) to every row; None without cuobjdump."""
    tool = find_cuobjdump()
    counts = {}
    if tool:
        sass = subprocess.run([tool, "--dump-sass", obj], capture_output=True, text=True, check=True).stdout
        arch = kernel = None
        for line in sass.splitlines():
            a = re.search(r"arch = sm_(\d+)", line)
            if a:
                arch = a.group(1)
            f = re.search(r"Function : (\S+)", line)
            if f:
                kernel = _kernel_of(f.group(1))
                counts.setdefault((arch, kernel), 0)
            elif kernel and re.search(r"\bHMMA\b", line):
                counts[(arch, kernel)] += 1
    for r in rows:
        r["hmma"] = counts.get((r["arch"], (r["kernel"], r["dtype"]))) if tool else None
    return tool


def smem_table(tmp):
    """{(L, C, S, d): {kernel: [(tile, bytes), ...]}} as csrc/cuda/dynamic_mix_cuda.h computes it."""
    src, exe = os.path.join(tmp, "smem.cpp"), os.path.join(tmp, "smem")
    with open(src, "w") as f:
        f.write(SMEM_PROGRAM)
    subprocess.run(["nvcc", "-std=c++17", f"-I{CSRC}", src, "-o", exe], check=True)
    table = {}
    for _, L, C, S, d in SHAPES:
        out = subprocess.run([exe, str(L), str(C), str(S), str(d)], capture_output=True, text=True, check=True).stdout
        entry = table.setdefault((L, C, S, d), {})
        for line in out.splitlines():
            kernel, tile, nbytes = line.split()
            entry.setdefault(kernel, []).append((int(tile), int(nbytes)))
    return table


def blocks_per_sm(arch, regs, smem):
    sm = SM[arch]
    by_regs = sm["regs"] // (((regs + 7) // 8 * 8) * THREADS)
    by_smem = sm["smem"] // (smem + 1024)          # 1 KB per block is reserved by the driver (sm_80+)
    return min(by_regs, by_smem, sm["threads"] // THREADS), by_regs, by_smem


def launch_plan(archs, rows, table):
    """Per arch, shape and fused kernel: the tile the host picks (csrc/cuda/dynamic_mix_cuda_host.cpp: the
    largest SIMT tile that fits; the tensor-core tile when it fits, per operand width), its shared memory and the
    blocks per SM."""
    regs = {}
    for r in rows:
        key = (r["arch"], r["kernel"])
        regs[key] = max(regs.get(key, 0), r["regs"])
    plan = []
    for arch in archs:
        limit = SM[arch]["block_smem"]
        for name, L, C, S, d in SHAPES:
            entry = table[(L, C, S, d)]
            for kernel, label in (("mix_forward_tc_kernel/2", "fp16/bf16"), ("mix_forward_tc_kernel/4", "fp32 as tf32"),
                                  ("mix_forward_kernel", "any"), ("mix_backward_tc_kernel/2", "fp16/bf16"),
                                  ("mix_backward_tc_kernel/4", "fp32 as tf32"), ("mix_backward_kernel", "any")):
                fitting = [(tile, b) for tile, b in entry[kernel] if b <= limit]
                if not fitting:
                    plan.append(dict(arch=arch, shape=name, L=L, C=C, S=S, d=d, kernel=kernel, dtypes=label,
                                     tile=None, smem=entry[kernel][0][1], blocks=0))
                    continue
                tile, smem = max(fitting)
                n, by_regs, by_smem = blocks_per_sm(arch, regs[(arch, kernel.split("/")[0])], smem)
                plan.append(dict(arch=arch, shape=name, L=L, C=C, S=S, d=d, kernel=kernel, dtypes=label, tile=tile,
                                 smem=smem, blocks=n, by_regs=by_regs, by_smem=by_smem))
    return plan


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability without the dot (default 80, 90)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (kernels, plan) instead")
    args = parser.parse_args()
    archs = args.arch or ["80", "90"]
    with tempfile.TemporaryDirectory() as tmp:
        rows, obj = compile_kernels(archs, tmp)
        tool = count_hmma(obj, rows)
        table = smem_table(tmp)
    plan = launch_plan(archs, rows, table)
    if args.json:
        print(json.dumps(dict(kernels=rows, plan=plan, cuobjdump=tool)))
        return
    print("| arch | kernel | dtype | registers | static smem (B) | spills | HMMA in SASS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        hmma = "no cuobjdump" if r["hmma"] is None else r["hmma"]
        print(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['regs']} | {r['static_smem']} | {r['spills']} "
              f"| {hmma} |")
    print("\n| arch | shape (L, C, S, d) | kernel | inputs | tile (sequences) | dynamic smem (B) | blocks/SM "
          "(regs, smem) | warps/SM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in plan:
        arch = f"sm_{p['arch']} ({SM[p['arch']]['name']})"
        shape = f"{p['shape']} ({p['L']}, {p['C']}, {p['S']}, {p['d']})"
        kernel = p["kernel"].split("/")[0]
        if p["tile"] is None:
            print(f"| {arch} | {shape} | {kernel} | {p['dtypes']} | does not fit: SIMT kernel | {p['smem']} | - | - |")
            continue
        print(f"| {arch} | {shape} | {kernel} | {p['dtypes']} | {p['tile']} | {p['smem']} | "
              f"{p['blocks']} ({p['by_regs']}, {p['by_smem']}) | {p['blocks'] * THREADS // 32} |")


if __name__ == "__main__":
    main()
