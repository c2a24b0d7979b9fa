"""Registers, spills, shared memory and tensor-core instructions of every CUDA kernel, and the blocks per SM they
allow at the model shapes. Needs nvcc (and cuobjdump for the SASS column), not a GPU:

    python tools/cuda_resource_usage.py [--arch 80 --arch 90] [--json]

ptxas -v gives registers and spills; `cuobjdump --dump-sass` counts HMMA instructions per kernel (found on PATH,
in CUDA_HOME/bin, in triton's wheel at triton/backends/nvidia/bin, or in the nvidia-cuda-cuobjdump wheel);
c++filt names the kernels.
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

from dynamixer_ops.testing import MODEL_SHAPES

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
THREADS = 256                                   # kThreads in dynamic_mix_cuda.h
# Per SM: registers, shared memory, most resident threads; the largest opt-in shared memory per block.
SM = {"80": dict(name="A100", regs=65536, smem=167936, block_smem=166912, threads=2048),
      "90": dict(name="H100/H200", regs=65536, smem=233472, block_smem=232448, threads=2048)}
# (name, L, C, S, d): the model shapes, defined once in dynamixer_ops.testing.
SHAPES = [(name, *shape) for name, shape in MODEL_SHAPES.items()]
TC_KERNELS = ("mix_forward_tc_kernel", "mix_backward_tc_kernel", "grad_x_tc_kernel", "splitk_atb_tc_kernel")
KERNELS = TC_KERNELS + ("mix_forward_kernel", "mix_backward_kernel", "grad_x_kernel", "splitk_atb_kernel")
NAMES = {"float": "float", "__half": "half", "__nv_bfloat16": "bfloat16"}
KERNEL_RE = re.compile(r"\b(" + "|".join(KERNELS) + r")<([^<>]*)>")


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
      if (!backward && elem == 2)
        printf("padded %ld %ld %ld %ld %ld %ld\n", (long)tc.Lp, (long)tc.e0p, (long)tc.SDp, (long)tc.Ldp,
               (long)tc.LLp, (long)tc.ts);
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


def _demangle(symbols):
    """C++ names of mangled symbols (c++filt, binutils), in order."""
    out = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _kernel_of(name):
    """(kernel, dtype) of a demangled kernel name; dtype lists every template argument ("float", or
    "float, bfloat16, bfloat16" for splitk_atb_tc_kernel<a's, b's, operand type>)."""
    k = KERNEL_RE.search(name)
    if k is None:
        sys.exit(f"tools/cuda_resource_usage.py: unknown kernel {name}: add it to KERNELS")
    return k.group(1), ", ".join(NAMES[t.strip()] for t in k.group(2).split(","))


def compile_kernels(archs, tmp):
    import torch.utils.cpp_extension as ext
    includes = [f"-I{p}" for p in ext.include_paths()] + [f"-I{CSRC}"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    obj = os.path.join(tmp, "k.o")
    # -DUSE_CUDA as setup.py: the kernels' launch checks (STD_CUDA_CHECK) use the CUDA part of torch's stable shim
    out = subprocess.run(["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-DUSE_CUDA", "-Xptxas", "-v", *gencode,
                          *includes,
                          "-c", os.path.join(CSRC, "cuda", "dynamic_mix_cuda.cu"), "-o", obj],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    rows, current = [], None
    lines = out.stderr.splitlines()
    entries = [re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line) for line in lines]
    names = iter(_demangle([m.group(1) for m in entries if m]))
    for line, m in zip(lines, entries):
        if m:
            kernel, dtype = _kernel_of(next(names))
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
        lines = sass.splitlines()
        functions = [re.search(r"Function : (\S+)", line) for line in lines]
        names = iter(_demangle([f.group(1) for f in functions if f]))
        for line, f in zip(lines, functions):
            a = re.search(r"arch = sm_(\d+)", line)
            if a:
                arch = a.group(1)
            if f:
                kernel = _kernel_of(next(names))
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
            if line.startswith("padded"):
                entry["padded"] = dict(zip(("Lp", "e0p", "SDp", "Ldp", "LLp", "ts"), map(int, line.split()[1:])))
                continue
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


# The H200 figures the prediction uses (measured on an H200, 2026-10/11), and an
# assumed rate for WMMA: it issues HMMA (mma.sync), not Hopper's wgmma, from 16-row tiles with 8-16 warps per SM.
COPY_BYTES_PER_S = 4.3e12
HMMA_FLOP_PER_S = 330e12          # assumption: a third of the 990 TFLOP/s bf16 datasheet rate
EXP_PER_S = 16 * 132 * 1.755e9    # MUFU ex2: 16 per clock per SM on sm_90, 132 SMs, 1.755 GHz boost
IMAGES = 128


def _ceil(a, b):
    return (a + b - 1) // b * b


def predict(table, elem=2):
    """Bytes and FLOPs the tensor-core kernels issue per call (one direction of one layer, 128 images, bf16) and
    the times they imply. Padded FLOPs are what the tensor cores execute; DRAM bytes count each tensor once per
    kernel that reads or writes it (L2 hits not subtracted except for the weights)."""
    rows = []
    for name, L, C, S, d in SHAPES:
        pd = table[(L, C, S, d)]["padded"]
        Lp, e0p, SDp, Ldp, LLp, ts = (pd[k] for k in ("Lp", "e0p", "SDp", "Ldp", "LLp", "ts"))
        N = IMAGES * L                           # sequences: batch x rows
        blocks = -(-N // ts)
        groups = blocks * -(-(ts * S) // 16)     # 16-row tiles of the generate
        e0 = C // S
        useful_fwd = 2 * N * L * C * S * d + 2 * N * S * L * d * L * L + 2 * N * S * L * L * e0
        reduce = blocks * 2 * ts * Lp * S * e0p * SDp
        generate = groups * 2 * 16 * Ldp * LLp
        apply = N * S * 2 * Lp * Lp * e0p
        fwd_flops = reduce + generate + apply
        x_bytes = N * L * C * elem
        wg_l2 = groups * Ldp * LLp * elem + blocks * SDp * S * e0p * elem
        fwd_bytes = 2 * x_bytes
        exps = N * S * L * L
        fwd_t = max(fwd_bytes / COPY_BYTES_PER_S, fwd_flops / HMMA_FLOP_PER_S, exps / EXP_PER_S)
        # Backward: the fused kernel (x, dy in; z, dr in fp32, dG, dx_mix in bf16 and per-block dbg sums out),
        # grad_x (dx_mix, dr in; dx out), the two split-K reductions (dG, z; dr, x in) and the bias sums (dbg
        # partials, dr in).
        z_b, dr_b = N * S * L * d * 4, N * L * S * d * 4
        dg_b, dxm_b, dbg_b = N * S * L * L * elem, N * L * C * elem, blocks * L * L * 4
        bwd_bytes = (2 * x_bytes + z_b + dg_b + dr_b + dxm_b + dbg_b) + (dxm_b + dr_b + x_bytes) \
            + (dg_b + z_b + dr_b + x_bytes) + (dbg_b + dr_b)
        dp = dxm = N * S * 2 * Lp * Lp * e0p
        dz = groups * 2 * 16 * LLp * Ldp
        dwg = 2 * N * S * _ceil(L * L, 64) * _ceil(L * d, 32)
        dwc = 2 * N * L * _ceil(S * d, 64) * _ceil(C, 32)
        grad_x = 2 * _ceil(N * L, 64) * _ceil(S * d, 32) * _ceil(C, 32)
        bwd_tc = reduce + generate + dp + dxm + dz + dwg + dwc + grad_x
        bwd_t = max(bwd_bytes / COPY_BYTES_PER_S, bwd_tc / HMMA_FLOP_PER_S, exps / EXP_PER_S)
        rows.append(dict(shape=name, L=L, C=C, S=S, d=d, N=N, blocks=blocks, fwd_bytes=fwd_bytes, wg_l2=wg_l2,
                         useful_fwd=useful_fwd, fwd_flops=fwd_flops, exps=exps, fwd_us=fwd_t * 1e6,
                         fwd_mem_us=fwd_bytes / COPY_BYTES_PER_S * 1e6, fwd_tc_us=fwd_flops / HMMA_FLOP_PER_S * 1e6,
                         fwd_exp_us=exps / EXP_PER_S * 1e6, bwd_bytes=bwd_bytes, bwd_tc=bwd_tc, grad_x=grad_x,
                         bwd_mem_us=bwd_bytes / COPY_BYTES_PER_S * 1e6, bwd_tc_us=bwd_tc / HMMA_FLOP_PER_S * 1e6,
                         bwd_us=bwd_t * 1e6, dg_bytes=dg_b))
    return rows


def print_prediction(rows):
    print("| shape (L, C, S, d) | sequences | fwd DRAM MB (x + y) | fwd Wg+Wc L2 MB | fwd GFLOP useful / issued "
          "| fwd us: memory / tensor / exp | **fwd us** | bwd DRAM MB (of it dG) | bwd GFLOP issued "
          "| bwd us: memory / tensor | **bwd us** |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} ({r['L']}, {r['C']}, {r['S']}, {r['d']}) | {r['N']} | {r['fwd_bytes'] / 1e6:.1f} | "
              f"{r['wg_l2'] / 1e6:.0f} | {r['useful_fwd'] / 1e9:.2f} / {r['fwd_flops'] / 1e9:.2f} | "
              f"{r['fwd_mem_us']:.1f} / {r['fwd_tc_us']:.1f} / {r['fwd_exp_us']:.1f} | **{r['fwd_us']:.0f}** | "
              f"{r['bwd_bytes'] / 1e6:.0f} ({r['dg_bytes'] / 1e6:.0f}) | {r['bwd_tc'] / 1e9:.1f} | "
              f"{r['bwd_mem_us']:.0f} / {r['bwd_tc_us']:.0f} | **{r['bwd_us']:.0f}** |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability without the dot (default 80, 90)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (kernels, plan) instead")
    parser.add_argument("--predict", action="store_true",
                        help="only the H200 time prediction per model shape (bf16, 128 images; no ptxas)")
    args = parser.parse_args()
    archs = args.arch or ["80", "90"]
    if args.predict:
        with tempfile.TemporaryDirectory() as tmp:
            print_prediction(predict(smem_table(tmp)))
        return
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
