"""examples/train.py: a shortened digits run learns, fused and eager agree from one seed, and DDP under torchrun
(2 processes, gloo) keeps the replicas identical."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")

TRAIN = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train.py")
SMALL = ["--dims", "24,48", "--depths", "1,1", "--batch-size", "32", "--threads", "1"]


def load_train():
    spec = importlib.util.spec_from_file_location("dynamixer_train_example", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return load_train()


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_short_run_learns(train, tmp_path):
    metrics = train.main(SMALL + ["--max-steps", "80", "--epochs", "2", "--metrics", str(tmp_path / "m.json")])
    assert metrics["steps"] == 80
    assert metrics["test_loss"] < 0.8 * metrics["test_loss_before"], metrics
    assert metrics["test_acc"] > metrics["test_acc_before"], metrics
    assert json.loads((tmp_path / "m.json").read_text())["test_loss"] == metrics["test_loss"]


def test_fused_and_eager_train_alike(train):
    """Same seed: the same initial weights, data order and (up to float rounding) the same trajectory."""
    runs = {backend: train.main(SMALL + ["--backend", backend, "--max-steps", "12", "--epochs", "1"])
            for backend in ("eager", "auto")}
    eager, fused = runs["eager"], runs["auto"]
    assert fused["test_loss_before"] == pytest.approx(eager["test_loss_before"], rel=1e-5)
    assert fused["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-3)
    assert fused["history"][0]["train_loss"] == pytest.approx(eager["history"][0]["train_loss"], rel=1e-3)
    assert fused["test_loss"] < eager["test_loss_before"]


def test_torchrun_two_processes_keep_replicas_identical(tmp_path):
    """DistributedDataParallel over gloo: both ranks end with the same weights, and the loss went down."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN, *SMALL,
           "--device", "cpu", "--max-steps", "10", "--epochs", "1", "--dump-weights", str(tmp_path),
           "--metrics", str(tmp_path / "m.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x2" in result.stdout, result.stdout          # the log line names the world size
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"replicas differ at {key}"
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 10
    assert metrics["test_loss"] < metrics["test_loss_before"], metrics
