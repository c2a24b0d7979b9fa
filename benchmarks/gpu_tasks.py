"""The steps of benchmarks/gpu_session.sh that the bench CLI does not do: the correctness grid of every GPU backend
and a sweep over the Triton launch table (the training step is ``dynamixer-bench --model ... --optimizer adamw``).

    python benchmarks/gpu_tasks.py check  [--device cuda] [--workers 8] [--json PATH]
    python benchmarks/gpu_tasks.py tune   [--device cuda] [--budget 120] [--json PATH]

Each prints one line per case as it goes (a step stopped by its timeout keeps what it printed) and a table at the
end; ``--json`` is rewritten after every case. ``--dry-run`` shrinks every size so that the same code runs on a CPU
(the Triton kernels through the interpreter: set TRITON_INTERPRET=1 before starting Python). Where this has run:
README.md, "What has run where".

check: forward and all five gradients of every backend that runs on the device (``reference`` aside) in fp32,
bf16 and fp16 against the float64 reference, with the test suite's pass rule (dynamixer_ops.testing), at the six
model shapes (a few images each) and the test suite's backend grid of odd shapes
(``dynamixer_ops.testing.odd_shapes("backends")``: L = 5/7/14/28, C/S = 1/24, d = 1..8, transposed and sliced
inputs, N = 1 and N = 300). The cases are split over ``--workers`` processes: compiling the Triton kernels for each
shape and dtype is the slow part, and it runs on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

import dynamixer_ops
from dynamixer_ops.backends import get_backend
from dynamixer_ops.bench import DTYPE_BY_NAME, timing
from dynamixer_ops.testing import MODEL_SHAPES, assert_matches_reference, make_inputs, odd_shapes, tolerance

# The dtypes `check` runs, by their short names (dynamixer_ops.bench.DTYPE_BY_NAME).
CHECK_DTYPES = ("fp32", "bf16", "fp16")

# name -> (sequence batch shape, L, C, S, d, layout): the model shapes get `images` images (L sequences each); the odd
# ones are dynamixer_ops.testing's "backends" odd shapes, the test suite's backend grid.
ODD_CASES = {shape.name: (*shape.sizes, shape.layout) for shape in odd_shapes("backends")}
# --dry-run: the interpreter runs every program in Python: two small cases per backend and dtype
DRY_RUN_CASES = ("L7-S2-e24-d2-N1", "L7-S2-e24-d2-N2x7-transposed")


def _write_json(path, payload):
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        os.replace(tmp, path)


def _versions(device):
    import triton
    out = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
           "cuda": torch.version.cuda}
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name(device)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, budget_ms=200.0):
    """Median seconds per call of ``fn()`` through the one timing pipeline (dynamixer_ops.bench.timing, wall mode:
    CUDA events on a GPU, timer blocks on a CPU)."""
    return timing.median_seconds(fn, device, warmup_ms=max(10.0, budget_ms / 8), repeat_ms=budget_ms)


# ---------------------------------------------------------------------------------------------------------------
# check

def check_cases(device, images, dry_run):
    backends = [b for b in dynamixer_ops.available_backends(device.type) if b != "reference"]
    shapes = {f"model-{k}": ((images * v[0],), *v, "contiguous") for k, v in MODEL_SHAPES.items()}
    if dry_run:
        shapes, odd = {}, {k: ODD_CASES[k] for k in DRY_RUN_CASES}
    else:
        odd = ODD_CASES
    cases = []
    for backend in backends:
        for dname in CHECK_DTYPES:
            if get_backend(backend).why_not(device.type, DTYPE_BY_NAME[dname]) is not None:
                continue
            for name, case in {**shapes, **odd}.items():
                cases.append((backend, dname, name, case))
    return cases


def run_check_case(device, backend, dname, name, case, seed):
    batch, L, C, S, d, layout = case
    dtype = DTYPE_BY_NAME[dname]
    torch.manual_seed(seed)
    inputs = make_inputs(batch, L, C, S, d, dtype=dtype, device=device.type, layout=layout)
    leaves = [t.detach().requires_grad_() for t in inputs]
    row = dict(backend=backend, dtype=dname, case=name, L=L, C=C, S=S, d=d, sequences=math.prod(batch),
               layout=layout, seed=seed)
    start = time.perf_counter()
    try:
        y = dynamixer_ops.dynamic_mix(*leaves, S, backend=backend)
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, grad_y)
        _sync(device)
        assert_matches_reference(y, grads, inputs, S, grad_y, tolerance(dtype, device.type))
        row.update(status="ok", message="")
    except AssertionError as exc:
        row.update(status="WRONG", message=str(exc).splitlines()[0][:300])
    except Exception as exc:  # noqa: BLE001  (a launch error is a finding, not a reason to stop the grid)
        row.update(status="ERROR", message=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def cmd_check(args, device):
    cases = check_cases(device, args.images, args.dry_run)
    if args.worker is not None:           # one slice of the cases, one JSON line per case on stdout
        index, count = args.worker
        for i, (backend, dname, name, case) in enumerate(cases):
            if i % count == index:
                print(json.dumps(run_check_case(device, backend, dname, name, case, args.seed + i)), flush=True)
        return 0
    workers = max(1, min(args.workers, len(cases)))
    print(f"check: {len(cases)} cases ({', '.join(sorted({c[0] for c in cases}))} x "
          f"{', '.join(CHECK_DTYPES)}) on {device}, {workers} worker process(es)", flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "check", "--device", str(device), "--images",
           str(args.images), "--seed", str(args.seed)] + (["--dry-run"] if args.dry_run else [])
    procs = [subprocess.Popen(cmd + ["--worker", str(i), str(workers)], stdout=subprocess.PIPE, text=True)
             for i in range(workers)]
    rows = []
    import selectors
    sel = selectors.DefaultSelector()
    for p in procs:
        sel.register(p.stdout, selectors.EVENT_READ)
    open_streams = len(procs)
    while open_streams:
        for key, _ in sel.select():
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                print(line.rstrip(), flush=True)
                continue
            rows.append(row)
            print(f"{row['status']:5} {row['backend']:8} {row['dtype']:5} {row['case']:24} {row['seconds']:6.1f}s "
                  f"{row['message']}", flush=True)
            _write_json(args.json, {"versions": _versions(device), "rows": rows})
    codes = [p.wait() for p in procs]
    missing = len(cases) - len(rows)
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"check summary: {len(rows) - len(bad)} ok, {len(bad)} failed, {missing} not run "
          f"(worker exit codes {codes})")
    for r in bad:
        print(f"  {r['status']} {r['backend']} {r['dtype']} {r['case']} seed={r['seed']}: {r['message']}")
    return 0 if not bad and not missing and not any(codes) else 1


# ---------------------------------------------------------------------------------------------------------------
# tune

def tune_candidates(base, L, d):
    """Launch-table variants around ``base`` (the current table's config). Partitions stay the table's: they
    are a function of the shape, so results stay bitwise reproducible whatever is chosen."""
    import dataclasses
    seen, out = set(), []
    BL = triton_next_pow2(L)
    for warps in (4, 8, 16):
        for stages in (None, 1, 2, 3):
            for block_j in sorted({base.block_j, max(1, base.block_j // 2), min(BL, base.block_j * 2)}):
                for block_c in sorted({base.block_c, max(8, base.block_c // 2)}):
                    cfg = dataclasses.replace(base, num_warps=warps, num_stages=stages, block_j=block_j,
                                              block_c=block_c)
                    if cfg not in seen:
                        seen.add(cfg)
                        out.append(cfg)
    out.sort(key=lambda c: c != base)    # the table's own config first: the baseline of the sweep
    return out


def triton_next_pow2(v):
    import triton
    return triton.next_power_of_2(v)


def cmd_tune(args, device):
    """Time every candidate config of the Triton kernels directly (forward; forward + backward) at the six
    shapes in bf16, 128 images; each candidate is first checked against the table's config (relative error)
    and for bitwise-equal weight gradients over two runs. Stops at --budget seconds; the best per shape last."""
    from dynamixer_triton import dynamic_mix as km
    deadline = time.monotonic() + args.budget
    dtype = torch.bfloat16
    images = 1 if args.dry_run else args.images
    shapes = {"L7": (7, 48, 2, 2)} if args.dry_run else MODEL_SHAPES
    rows, best = [], {}
    for index, (shape, (L, C, S, d)) in enumerate(shapes.items()):
        # an equal share of what is left for each shape still to come (each candidate compiles four kernels)
        shape_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(shapes) - index)
        N = images * L
        torch.manual_seed(0)
        x = torch.randn(1, N, L, C, device=device, dtype=dtype)
        w = [torch.randn(S * d, C, device=device, dtype=dtype) / C ** 0.5,
             torch.randn(S * d, device=device, dtype=dtype),
             torch.randn(L * L, L * d, device=device, dtype=dtype) * (L * d) ** -0.5,
             torch.randn(L * L, device=device, dtype=dtype)]
        gy = torch.randn_like(x)
        base = km.default_config(N, L, C, S, d, device.type, dtype)
        cands = tune_candidates(base, L, d)[: 2 if args.dry_run else None]
        ref = None
        for cfg in cands:
            if time.monotonic() > shape_deadline:
                print(f"tune: {shape}'s share of the {args.budget:.0f} s budget spent", flush=True)
                break
            row = dict(shape=shape, images=images, config=str(cfg), is_table=cfg == base)
            y = torch.empty_like(x)
            grads = [torch.empty_like(x)] + [torch.empty_like(t) for t in w]

            def fwd(cfg=cfg, y=y):
                km.launch_forward(x, *w, S, y, config=cfg)

            def fwdbwd(cfg=cfg, y=y, grads=grads):
                km.launch_forward(x, *w, S, y, config=cfg)
                km.launch_backward(gy, x, *w, S, *grads, config=cfg)
            try:
                fwdbwd()
                _sync(device)
                outs = [y.clone()] + [g.clone() for g in grads]
                fwdbwd()
                _sync(device)
                row["deterministic"] = all(torch.equal(a, b) for a, b in zip(outs[2:], grads[1:]))
                if ref is None:
                    ref = outs
                row["max_rel_diff_vs_table"] = max(
                    ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
                    for a, b in zip(outs, ref))
                row["fwd_ms"] = median_seconds(fwd, device, 20 if args.dry_run else 100) * 1e3
                row["fwdbwd_ms"] = median_seconds(fwdbwd, device, 20 if args.dry_run else 100) * 1e3
                row["status"] = "ok" if row["deterministic"] and row["max_rel_diff_vs_table"] < 2e-2 else "WRONG"
            except Exception as exc:  # noqa: BLE001  (a config that does not fit is a finding)
                row.update(status="ERROR", message=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write_json(args.json, {"versions": _versions(device), "rows": rows})
            if row["status"] == "ok":
                for key in ("fwd_ms", "fwdbwd_ms"):
                    if shape + key not in best or row[key] < best[shape + key][key]:
                        best[shape + key] = row
    print("tune: best config per shape (bf16, forward / forward+backward), table config's time for comparison")
    for shape in shapes:
        table = next((r for r in rows if r["shape"] == shape and r["is_table"] and r["status"] == "ok"), None)
        for key in ("fwd_ms", "fwdbwd_ms"):
            b = best.get(shape + key)
            if b:
                print(f"  {shape} {key[:-3]:7} {b[key]:8.3f} ms (table {table[key] if table else float('nan'):8.3f})"
                      f"  {b['config']}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["check", "tune"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=None,
                   help="check: images per model shape (default 4); tune: images per call (default 128)")
    p.add_argument("--workers", type=int, default=8, help="check: processes (default 8)")
    p.add_argument("--budget", type=float, default=120.0, help="tune: seconds (default 120)")
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(3), "little"))
    p.add_argument("--json", help="results as JSON, rewritten after every case")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, so that the same code runs on a CPU")
    p.add_argument("--worker", type=int, nargs=2, metavar=("INDEX", "COUNT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 4 if args.task == "check" else 128
    device = torch.device(args.device)
    if args.worker is None:
        print(f"gpu_tasks {args.task}: {json.dumps(_versions(device))}", flush=True)
    return {"check": cmd_check, "tune": cmd_tune}[args.task](args, device)


if __name__ == "__main__":
    sys.exit(main())
