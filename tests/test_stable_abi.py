"""The native libraries are built against libtorch's stable C ABI: they import no libtorch C++ symbol (so one build
loads on every torch from 2.11 on) and no Python symbol (so the wheel is cp310-abi3)."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dynamixer_ops import deploy


def _loaded():
    try:
        return deploy.native_library_paths()
    except RuntimeError:   # not built
        return []


LIBRARIES = _loaded()
# Mangled names in libtorch's C++ namespaces (at::, c10::, torch::, caffe2::), plain or nested / const members.
CXX_TORCH = re.compile(r"^_ZN?K?(2at|3c10|5torch|6caffe2)")


def _undefined(path):
    done = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs nm (Linux)")
@pytest.mark.skipif(not LIBRARIES, reason="the native library is not built")
@pytest.mark.parametrize("path", LIBRARIES, ids=os.path.basename)
def test_imports_no_libtorch_cxx_or_python_symbol(path):
    symbols = _undefined(path)
    assert any(s.startswith(("torch_", "aoti_torch_")) for s in symbols), "the stable C shim is not used at all?"
    cxx = [s for s in symbols if CXX_TORCH.match(s)]
    assert not cxx, f"{os.path.basename(path)} imports libtorch C++ symbols (not the stable ABI): {cxx[:10]}"
    python = [s for s in symbols if s.startswith(("Py", "_Py"))]
    assert not python, f"{os.path.basename(path)} imports Python symbols: {python[:10]}"


def test_cpu_kernels_run_on_torch_threads():
    """The CPU kernels' threads are torch's pool (torch::stable::parallel_for): one thread or several, the same bits
    (the kernels' sums are fixed by the shape), and the op runs under either setting."""
    from dynamixer_ops import dynamic_mix
    from dynamixer_ops.testing import make_inputs
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in make_inputs((5, 3), 7, 24, 2, 2, dtype=torch.float32, device="cpu")]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y = dynamic_mix(*inputs, 2, backend="cpu")
            results.append((y, *torch.autograd.grad(y, inputs, torch.ones_like(y))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
