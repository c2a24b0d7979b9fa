"""pytest-benchmark suite for dynamic_mix: the cases, providers and checks of ``dynamixer-bench``, one test each.

Not part of the default test run (``pytest tests``). Typical use::

    pytest benchmarks --bench-device cpu --bench-shapes "s1" --bench-sequences 256 --benchmark-autosave
    pytest benchmarks ... --benchmark-compare          # against the last saved run
    pytest benchmarks --bench-device cuda --bench-dtype bfloat16 --benchmark-json=out.json

Every case is first checked against the float64 reference on the timed inputs (a wrong backend fails, it is
not timed); cases of one shape and direction share a ``benchmark.group``, so the table compares backends.
The timer is pytest-benchmark's (wall clock; on a GPU each call ends with a synchronize).
"""
from __future__ import annotations

import pytest
import torch

from dynamixer_ops import bench
from dynamixer_ops.testing import reference_outputs, tolerance


def _settings(config):
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    name = config.getoption("--bench-dtype")
    dtype = bench.DTYPES[name] if name else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device, dtype = _settings(config)
    names = config.getoption("--bench-shapes").split()
    shapes = [bench.parse_shape(n) for n in (list(bench.SHAPES) if names == ["all"] else names)]
    requested = config.getoption("--bench-backends")
    backends, skipped = bench.resolve_backends(requested.split() if requested else None, device, dtype, False)
    directions = config.getoption("--bench-directions").split()
    cases, ids = [], []
    for shape in shapes:
        for direction in directions:
            for backend in backends:
                cases.append((shape, direction, backend, skipped.get(backend)))
                label = shape.name if shape.name != "custom" else f"{shape.L},{shape.C},{shape.S},{shape.d}"
                ids.append(f"{label}-{direction}-{backend}")
    metafunc.parametrize("case", cases, ids=ids)


def test_dynamic_mix(benchmark, case, request):
    shape, direction, backend, why_skipped = case
    if why_skipped:
        pytest.skip(why_skipped)
    config = request.config
    device, dtype = _settings(config)
    sequences = config.getoption("--bench-sequences")
    images = config.getoption("--bench-images") or (128 if device.type == "cuda" else 8)
    N = sequences or images * shape.L
    inputs, dy = bench.make_inputs(N, shape, dtype, device)
    ref_y, ref_grads = reference_outputs(inputs, shape.S, dy)
    run = bench.make_closure(bench.make_mix_fn(backend, shape.S, device), inputs, dy, direction)
    err = bench.check(run, direction, ref_y, ref_grads)
    tol = tolerance(dtype, device)
    assert err <= tol, f"WRONG: {backend} relative error {err:.3g} > tolerance {tol:g} against float64"

    if device.type == "cuda":
        def timed():
            run()
            torch.cuda.synchronize(device)
    else:
        timed = run
    nbytes, flops = bench.work(direction, N, shape, dtype)
    benchmark.group = f"{shape.label()} N={N} {direction} {str(dtype).replace('torch.', '')} {device.type}"
    benchmark.extra_info.update(backend=backend, sequences=N, bytes=nbytes, flops=flops, rel_error=err,
                                L=shape.L, C=shape.C, S=shape.S, d=shape.d, direction=direction)
    benchmark.pedantic(timed, warmup_rounds=3, rounds=min(200, max(5, int(0.5 / max(_one_call(timed), 1e-6)))),
                       iterations=1)


def _one_call(fn) -> float:
    import time
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
