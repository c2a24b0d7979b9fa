"""What differs between the Triton versions the project supports (3.6, the GPU run's tested stack; 3.8 here), each
behind a version check whose branches are all run here."""
from __future__ import annotations

import pytest
import torch

from dynamixer_ops.testing import assert_matches_reference, make_inputs

kernels = pytest.importorskip("dynamixer_triton.dynamic_mix", reason="triton is not installed")

pytestmark = pytest.mark.skipif(not (kernels.INTERPRET or torch.cuda.is_available()),
                                reason="needs a CUDA device or TRITON_INTERPRET=1")
DEVICE = "cpu" if kernels.INTERPRET else "cuda"


@pytest.mark.parametrize("triton_version, numpy_version, needed", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.5.2", True), ("3.7.1", "2.4.0rc1", True),
    ("3.6.0", "2.3.5", False), ("3.6.0", "1.26.4", False), ("3.8.0", "2.4.6", False), ("4.0.0", "2.4.6", False),
    ("3.10.0", "3.0.0", False)])
def test_static_loop_bounds_version_check(triton_version, numpy_version, needed):
    assert kernels.interpreter_needs_static_loop_bounds(triton_version, numpy_version) is needed


@pytest.mark.parametrize("static", [True, False], ids=["constexpr-trip-count", "run-time-trip-count"])
def test_both_loop_bound_branches(static, monkeypatch, seed):
    """The weight-gradient kernels' tile loops with their trip count as a constexpr and at run time. 9 tiles in
    4 partitions: 3 iterations, the last partial. Where the interpreter cannot take a run-time bound (what
    STATIC_LOOP_BOUNDS detects), that branch must fail with the interpreter's error, not compute something."""
    monkeypatch.setattr(kernels, "STATIC_LOOP_BOUNDS", static)
    S = 2
    inputs = list(make_inputs((3, 3), 7, 24 * S, S, 2, dtype=torch.float32, device=DEVICE))
    config = kernels.MixConfig(block_n=1, block_j=4, block_jw=4, block_c=32, dot=False, partitions=4)
    y = torch.full_like(inputs[0], float("nan"))
    kernels.launch_forward(*inputs, S, y, config=config)
    grad_y = torch.randn_like(inputs[0])
    grads = [torch.full_like(t, float("nan")) for t in inputs]
    if kernels.INTERPRET and not static and kernels.interpreter_needs_static_loop_bounds(
            __import__("triton").__version__, __import__("numpy").__version__):
        with pytest.raises(Exception, match="only 0-dimensional arrays can be converted to Python scalars"):
            kernels.launch_backward(grad_y, *inputs, S, *grads, config=config)
        return
    kernels.launch_backward(grad_y, *inputs, S, *grads, config=config)
    assert_matches_reference(y, grads, inputs, S, grad_y, 1e-5 if DEVICE == "cpu" else 2e-3)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "Yes", "y", "0", "false", "off", "no", "", "2", " 1"])
def test_env_flag_reads_flags_as_triton_does(value, monkeypatch):
    """dynamixer_ops reads TRITON_INTERPRET (and its own flags) by Triton's rule, so the tests, the backend and
    the kernels (which take Triton's own reading) never disagree on whether the interpreter is on."""
    from dynamixer_ops.backends import env_flag
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("DYNAMIXER_OPS_TEST_FLAG", value)
    for default in (False, True):
        assert (env_flag("DYNAMIXER_OPS_TEST_FLAG", default)
                == triton.knobs.env_bool("DYNAMIXER_OPS_TEST_FLAG", default).get())
    monkeypatch.delenv("DYNAMIXER_OPS_TEST_FLAG")
    assert env_flag("DYNAMIXER_OPS_TEST_FLAG", True) and not env_flag("DYNAMIXER_OPS_TEST_FLAG")
