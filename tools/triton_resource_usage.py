"""Compile every Triton kernel for a GPU without one: registers, spills and shared memory at the model shapes.

    python tools/triton_resource_usage.py [--arch 90] [--dtype bfloat16 float32 ...] [--shapes s1 l1 ...] [--images 128]

The launchers of ``kernels/dynamixer_triton/dynamic_mix.py`` run on 'meta' tensors with ``gpu_config`` (the
launch table a GPU gets), each kernel replaced by a recorder; every recorded launch is then compiled by
``triton.compile`` for ``sm_<arch>`` (ptxas included) with the argument types and 16-byte alignment hints the JIT
would give it. What the interpreter that runs the tests on a CPU accepts and a GPU does not shows up here: a
``tl.dot`` shape, a tile that needs more shared memory than a block may have, a register spill. The compiled code
is not run: this says nothing about results or speed. Needs no GPU, and must run without TRITON_INTERPRET (the
interpreter replaces the kernels when they are defined). It compiles the kernels of THIS source tree
(``kernels/`` is put first on ``sys.path``), whatever copy is installed; ``dynamixer_ops`` (for the model
shapes) must be importable.

Exit status 1 when a kernel fails to compile or needs more shared memory than one block may have.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if triton.knobs.runtime.interpret:     # Triton's own reading of TRITON_INTERPRET, before any kernel is defined
    sys.exit("tools/triton_resource_usage.py: unset TRITON_INTERPRET (the interpreter replaces the kernels at import)")

# The source tree's kernels, not an installed copy: first on the path, before dynamixer_ops imports them.
SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
sys.path.insert(0, SOURCE)
from dynamixer_triton import dynamic_mix as dm  # noqa: E402

from dynamixer_ops.testing import MODEL_SHAPES  # noqa: E402

if not os.path.abspath(dm.__file__).startswith(SOURCE + os.sep):
    sys.exit(f"tools/triton_resource_usage.py: imported {dm.__file__}, not the source tree's kernels under {SOURCE}")

KERNELS = ("_forward_kernel", "_backward_dx_kernel", "_backward_dwg_kernel", "_backward_dwc_kernel")
# Largest opt-in shared memory per block, registers per SM.
SM = {80: dict(name="A100", block_smem=166912, regs=65536), 90: dict(name="H100/H200", block_smem=232448,
                                                                     regs=65536)}
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, grid, args, kwargs))


def record_launches(L, C, S, d, sequences, dtype):
    """Every kernel launch of one forward and one backward at this shape, on meta tensors."""
    launches = []
    originals = {name: getattr(dm, name) for name in KERNELS}
    for name, fn in originals.items():
        setattr(dm, name, _Recorder(fn, launches))
    try:
        meta = dict(device="meta", dtype=dtype)
        x = torch.empty(1, sequences, L, C, **meta)
        weights = (torch.empty(S * d, C, **meta), torch.empty(S * d, **meta), torch.empty(L * L, L * d, **meta),
                   torch.empty(L * L, **meta))
        config = dm.gpu_config(sequences, L, C, S, d, dtype)
        dm.launch_forward(x, *weights, S, torch.empty_like(x), config=config)
        dm.launch_backward(torch.empty_like(x), x, *weights, S, torch.empty_like(x),
                        *(torch.empty_like(w) for w in weights), config=config)
    finally:
        for name, fn in originals.items():
            setattr(dm, name, fn)
    return launches


def compile_launch(fn, args, kwargs, arch):
    """triton.compile of one recorded launch, typed and hinted as the JIT would (pointers and multiples of 16
    get tt.divisibility = 16)."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name} of type {type(value).__name__}")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options), options


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) as ptxas reports them for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              path, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode:
        raise RuntimeError(text)
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SM), help="compute capability x10 (default 90)")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "float16", "bfloat16"],
                   help="input dtypes; each has its own launch table (default: bfloat16)")
    p.add_argument("--tf32", action="store_true",
                   help="float32 dots as tf32, as with torch.backends.cuda.matmul.allow_tf32 = True")
    p.add_argument("--shapes", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES), metavar="SHAPE",
                   help=f"model shapes (default: all of {' '.join(MODEL_SHAPES)})")
    p.add_argument("--images", type=int, default=128, help="images per call: L sequences each (default 128)")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32      # read by the launchers (dm._dot_operands)
    limits = SM[args.arch]
    print(f"Triton {triton.__version__}, sm_{args.arch} ({limits['name']}), {args.images} images, float32 dots "
          f"{'tf32' if args.tf32 else 'ieee'}; shared memory "
          f"per block at most {limits['block_smem']} bytes; blocks/SM: as the registers allow")
    print(f"{'dtype':9} {'shape':6} {'kernel':22} {'warps':>5} {'regs':>5} {'spill B':>8} {'smem B':>8} "
          f"{'blocks/SM':>9}")
    failures = 0
    for dtype_name in args.dtype:
        for shape in args.shapes:
            L, C, S, d = MODEL_SHAPES[shape]
            row = f"{dtype_name:9} {shape:6}"
            for fn, grid, launch_args, kwargs in record_launches(L, C, S, d, args.images * L,
                                                                 getattr(torch, dtype_name)):
                try:
                    compiled, options = compile_launch(fn, launch_args, dict(kwargs), args.arch)
                    regs, spills = ptxas_usage(compiled.asm["ptx"], args.arch)
                except Exception as exc:  # noqa: BLE001  (any compile error is the finding)
                    failures += 1
                    print(f"{row} {fn.__name__:22} COMPILE ERROR: {str(exc).strip().splitlines()[-1][:300]}")
                    continue
                warps, smem = options.get("num_warps", 4), compiled.metadata.shared
                by_regs = limits["regs"] // max(1, regs * 32 * warps)
                too_big = smem > limits["block_smem"]
                failures += too_big
                print(f"{row} {fn.__name__:22} {warps:5} {regs:5} {spills:8} {smem:8} {by_regs:9}"
                      + ("  SHARED MEMORY OVER THE LIMIT" if too_big else "") + ("  spills" if spills else ""),
                      flush=True)
    print(f"{failures} kernel(s) failed" if failures else "every kernel compiled within the limits")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
