"""The tests' JIT builds (tests/jit_build.py): a folder per checkout and torch, and no silent hang on a lock."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import jit_build


def test_build_folder_is_this_checkouts_and_this_torchs():
    path = jit_build.build_directory("probe")
    assert os.path.isdir(path)
    assert os.path.commonpath([path, os.path.join(jit_build.ROOT, "build")]) == os.path.join(jit_build.ROOT, "build")
    assert torch.__version__ in os.path.basename(path)
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in os.path.basename(path)


def test_stale_torch_lock_is_removed(tmp_path):
    """A torch ``lock`` left by a killed build: gone once the folder's OS lock is held, so that torch 2.11's
    FileBaton (the file's existence is the lock) acquires at once instead of waiting forever."""
    from torch.utils.file_baton import FileBaton
    stale = tmp_path / jit_build.TORCH_LOCK
    stale.write_text("")
    start = time.monotonic()
    with jit_build.build_lock(str(tmp_path), timeout=5):
        assert not stale.exists()
        baton = FileBaton(str(stale))
        assert baton.try_acquire()
        baton.release()
    assert time.monotonic() - start < 2


def test_a_held_lock_ends_in_an_error_naming_the_file(tmp_path, capsys):
    """A build that really is running (here: this process holding the OS lock through another open file) is
    waited for, with a note, and past the timeout the wait ends in an error naming the lock file."""
    held = open(tmp_path / jit_build.OUR_LOCK, "a")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"has held .*build\.lock for over 1 s.*fuser -v"):
            with jit_build.build_lock(str(tmp_path), timeout=1, notice_after=0.3):
                pass
        assert time.monotonic() - start < 3
        assert "waiting for another process's JIT build" in capsys.readouterr().err
    finally:
        held.close()
    with jit_build.build_lock(str(tmp_path), timeout=1):    # released by its holder: free again
        pass


def test_a_killed_holder_releases_the_lock(tmp_path):
    """The OS lock goes with its process: a holder killed mid-build blocks nobody."""
    code = textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(tmp_path / jit_build.OUR_LOCK)!r}, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        open({str(tmp_path / jit_build.TORCH_LOCK)!r}, "w").close()     # as torch does when it starts a build
        print("held", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait()
    with jit_build.build_lock(str(tmp_path), timeout=5):
        assert not (tmp_path / jit_build.TORCH_LOCK).exists()


def test_load_with_a_stale_lock_builds_instead_of_hanging(tmp_path):
    """End to end, in a child process bounded by a timeout: torch's own cpp_extension.load of a tiny library
    (no torch headers: it builds in seconds) into a folder where an interrupted build left ``lock``."""
    source = tmp_path / "probe.cpp"
    source.write_text('extern "C" int dynamixer_probe() { return 42; }\n')
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / jit_build.TORCH_LOCK).write_text("")
    code = textwrap.dedent(f"""
        import ctypes, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(jit_build.__file__))!r})
        import jit_build
        path = jit_build.load_extension("dynamixer_jit_probe", directory={str(folder)!r},
                                        sources=[{str(source)!r}], is_python_module=False, is_standalone=False)
        print("loaded", flush=True)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"cpp_extension.load hung on the stale lock: {exc}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded" in out.stdout
    assert f"removing {folder / jit_build.TORCH_LOCK}" in out.stderr
