"""JIT builds of the tests' C++ extensions (``torch.utils.cpp_extension.load``) in a folder of this checkout's own.

torch's default folder, ``~/.cache/torch_extensions/py<python>_<cuda>/<name>``, is one folder and one ``lock``
file for every checkout and every torch of that Python and CUDA version: torch 2.11 and 2.14 rebuild over each
other there, and torch 2.11 waits for the lock file to disappear (``FileBaton``: its existence is the lock), so a
build interrupted there (Ctrl-C, a killed job) left every later run sleeping at that test forever, silently.
(torch 2.14 holds an OS lock on that file instead, which a dead process cannot keep.)

Here each build gets ``<checkout>/build/jit/<name>-torch<version>-py<major><minor>`` and runs under an OS lock
(``fcntl.flock``) on ``<folder>/build.lock``, which the kernel releases when its holder dies. While this process
holds it no other build of that folder is running, so a torch ``lock`` file found there is a leftover of a dead
build: it is removed (with a note naming it) and torch rebuilds or reloads as usual. A live build holding the
folder is waited for; past ``DYNAMIXER_OPS_JIT_LOCK_TIMEOUT`` seconds (default 1800) that wait ends in an error
naming the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_LOCK = "lock"                # the file torch.utils.cpp_extension locks inside the build folder
OUR_LOCK = "build.lock"


def build_directory(name: str) -> str:
    """``<checkout>/build/jit/<name>-torch<version>-py<major><minor>`` (created)."""
    tag = f"{name}-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    path = os.path.join(ROOT, "build", "jit", re.sub(r"[^A-Za-z0-9._+-]", "_", tag))
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def build_lock(directory: str, timeout: float | None = None, notice_after: float = 10.0):
    """Hold ``directory``'s OS lock; remove a torch ``lock`` file that a dead build left there."""
    if timeout is None:
        timeout = float(os.environ.get("DYNAMIXER_OPS_JIT_LOCK_TIMEOUT", "1800"))
    path = os.path.join(directory, OUR_LOCK)
    with open(path, "a") as handle:
        start, noticed = time.monotonic(), False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > timeout:
                    raise TimeoutError(
                        f"another process has held {path} for over {timeout:.0f} s (a JIT build of this checkout "
                        f"with this torch; `fuser -v {path}` shows which). Stop it, or if it is hung, kill it: the "
                        f"lock goes with it. DYNAMIXER_OPS_JIT_LOCK_TIMEOUT sets this wait.") from None
                if waited > notice_after and not noticed:
                    print(f"waiting for another process's JIT build in {directory} (it holds {path})",
                          file=sys.stderr, flush=True)
                    noticed = True
                time.sleep(0.2)
        try:
            stale = os.path.join(directory, TORCH_LOCK)
            if os.path.exists(stale):
                print(f"removing {stale}, left by an interrupted JIT build (no build holds {path})",
                      file=sys.stderr, flush=True)
                os.remove(stale)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_extension(name: str, directory: str | None = None, **kwargs):
    """``torch.utils.cpp_extension.load(name=name, **kwargs)`` built in :func:`build_directory` (or
    ``directory``) under :func:`build_lock`."""
    from torch.utils import cpp_extension
    directory = directory or build_directory(name)
    with build_lock(directory):
        return cpp_extension.load(name=name, build_directory=directory, **kwargs)
