"""timm's own model tests (tests/test_models.py of pytorch-image-models, vendored in tests/timm_suite) on DynaMixer.

CI runs DynaMixer-S's rows with a 28x28 input (the models have fixed_input_size, so timm's tests take the
registry's input_size; 28 keeps every code path at a fraction of the time). ``DYNAMIXER_TIMM_SUITE=all`` runs
S, M and L at their 224x224 default (about 10 minutes on 2 cores). Every row must pass, the TorchScript ones
included; a row expected to fail would go in ``XFAIL`` (strict: a pass shows up as a failure to update it).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")

SUITE = Path(__file__).parent / "timm_suite"
ROWS = ("test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std",
        "test_model_forward_torchscript", "test_model_forward_fx", "test_model_backward_fx",
        "test_model_forward_fx_torchscript")
XFAIL: dict[str, str] = {}      # row -> why it is expected to fail


def test_timm_model_suite(tmp_path):
    run_all = os.environ.get("DYNAMIXER_TIMM_SUITE", "") == "all"
    names = ("dynamixer_s", "dynamixer_m", "dynamixer_l") if run_all else ("dynamixer_s",)
    shutil.copy(SUITE / "timm_test_models.py", tmp_path / "test_models.py")
    shutil.copy(SUITE / "conftest_dynamixer.py", tmp_path / "conftest.py")
    xfail = list(XFAIL)
    env = dict(os.environ, DYNAMIXER_TIMM_SUITE_XFAIL=",".join(xfail), DYNAMIXER_TIMM_SUITE_XFAIL_REASON="expected")
    env.pop("GITHUB_ACTIONS", None)         # the suite's GitHub-runner exclusions do not concern these models
    if not run_all:
        env["DYNAMIXER_TIMM_SUITE_SIDE"] = "28"
    ids = " or ".join(names)      # no other timm model's name contains these
    result = subprocess.run([sys.executable, "-m", "pytest", "test_models.py", "-q", "-p", "no:cacheprovider",
                             "-W", "ignore", "-k", ids, "-rfE"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3000)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|xfailed|xpassed|errors?|skipped)", summary)}
    expected = {"passed": len(names) * (len(ROWS) - len(xfail)), "xfailed": len(names) * len(xfail)}
    expected = {k: v for k, v in expected.items() if v}
    assert result.returncode == 0 and {k: v for k, v in counts.items() if k != "deselected"} == expected, \
        f"timm's test_models.py on {names}: {summary!r}, expected {expected}\n{result.stdout[-6000:]}\n" \
        f"{result.stderr[-2000:]}"
