"""pytest-benchmark suite for dynamic_mix: the cases, providers and checks of ``dynamixer-bench``, one test each.

Not part of the default test run (``pytest tests``). Typical use::

    pytest benchmarks --bench-device cpu --bench-shapes "s1" --bench-sequences 256 --benchmark-autosave
    pytest benchmarks ... --benchmark-compare          # against the last saved run
    pytest benchmarks --bench-device cuda --bench-dtype bfloat16 --benchmark-json=out.json

Every case is first checked against the float64 reference on the timed inputs by the test suite's rule (a wrong
backend fails, it is not timed); cases of one shape and direction share a ``benchmark.group``, so the table
compares backends. The call, its warm-up and the number of rounds come from the one timing pipeline
(:mod:`dynamixer_ops.bench.timing`: on a GPU each call ends with a synchronize); the clock and the statistics are
pytest-benchmark's (wall clock), so that its ``--benchmark-compare`` and ``--benchmark-autosave`` work.
"""
from __future__ import annotations

import pytest
import torch

from dynamixer_ops import bench
from dynamixer_ops.bench import timing
from dynamixer_ops.testing import MODEL_SHAPES, linear_init_inputs, reference_floors, reference_outputs, tolerance


def _settings(config):
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    name = config.getoption("--bench-dtype")
    dtype = bench.DTYPE_BY_NAME[name] if name else bench.DEFAULTS[device.type]["dtype"]
    return device, dtype


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device, dtype = _settings(config)
    names = config.getoption("--bench-shapes").split()
    shapes = [bench.parse_shape(n) for n in (list(MODEL_SHAPES) if names == ["all"] else names)]
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
    images = config.getoption("--bench-images") or bench.DEFAULTS[device.type]["images"]
    N = sequences or images * shape.L
    inputs, dy = linear_init_inputs(N, *shape.dims, dtype, device)
    ref_y, ref_grads = reference_outputs(inputs, shape.S, dy)
    run = bench.make_closure(bench.make_mix_fn(backend, shape.S, device), inputs, dy, direction)
    err = bench.check(run, direction, ref_y, ref_grads, reference_floors(inputs, shape.S, dy))
    tol = tolerance(dtype, device)
    assert err <= tol, f"WRONG: {backend} relative error {err:.3g} > tolerance {tol:g} against float64"

    timed = timing.synchronized(run, device)
    per_call_s = timing.warm_up(timed, device, warmup_ms=100)
    nbytes, flops = bench.work(direction, N, shape, dtype)
    benchmark.group = f"{shape.label()} N={N} {direction} {str(dtype).replace('torch.', '')} {device.type}"
    benchmark.extra_info.update(backend=backend, sequences=N, bytes=nbytes, flops=flops, rel_error=err,
                                L=shape.L, C=shape.C, S=shape.S, d=shape.d, direction=direction)
    benchmark.pedantic(timed, rounds=min(200, max(5, timing.calls_within(500, per_call_s))), iterations=1)
