"""The layout's promises: a broken Triton install and a broken install of our kernels are told apart, and the
model shapes come from the upstream configs (docs/dynamic_mix.md's table)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dynamixer_ops.testing import MODEL_SHAPES

# None in sys.modules makes `import name` raise ImportError, as a missing or broken package would.
_PROBE = """
import sys
sys.modules[{name!r}] = None
import dynamixer_ops
print(dynamixer_ops.unavailable_backends()["triton"])
"""


@pytest.mark.parametrize("missing, says, never", [
    ("triton", "triton could not be imported", "dynamixer_triton"),
    ("dynamixer_triton", "the project's Triton kernels (package dynamixer_triton", "triton could not be imported"),
])
def test_triton_import_failures_are_told_apart(missing, says, never):
    out = subprocess.run([sys.executable, "-c", _PROBE.format(name=missing)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert says in out.stdout and never not in out.stdout, out.stdout


def test_model_shapes_are_the_upstream_stages():
    assert MODEL_SHAPES == {"s1": (32, 192, 8, 2), "s2": (16, 384, 16, 2), "m1": (32, 256, 8, 2),
                            "m3": (16, 512, 16, 2), "l1": (32, 256, 8, 8), "l2": (16, 512, 16, 8)}
