"""conftest for timm's own tests/test_models.py run on dynamixer_s/m/l (copied next to it by test_timm_suite.py).

Registers the models with timm. DYNAMIXER_TIMM_SUITE_SIDE (an image side, a multiple of 14) sets the models'
input_size in timm's registry: the models have fixed_input_size, so timm's tests use it as it is (224 by
default); a small side runs the same code paths on smaller tensors. DYNAMIXER_TIMM_SUITE_XFAIL: comma-separated
test-name prefixes expected to fail (strict: a pass is reported), with the reason in
DYNAMIXER_TIMM_SUITE_XFAIL_REASON.
"""
import dataclasses
import os

import pytest

import dynamixer_ops.models  # noqa: F401  (registers dynamixer_s/m/l with timm)
from timm.models import get_pretrained_cfg

side = os.environ.get("DYNAMIXER_TIMM_SUITE_SIDE")
if side:
    from timm.models import _registry
    for name in ("dynamixer_s", "dynamixer_m", "dynamixer_l"):
        cfg = get_pretrained_cfg(name)
        _registry._model_pretrained_cfgs[name] = dataclasses.replace(cfg, input_size=(3, int(side), int(side)))


def pytest_collection_modifyitems(config, items):
    prefixes = [p for p in os.environ.get("DYNAMIXER_TIMM_SUITE_XFAIL", "").split(",") if p]
    reason = os.environ.get("DYNAMIXER_TIMM_SUITE_XFAIL_REASON", "")
    for item in items:
        if any(item.name.startswith(p + "[") for p in prefixes):
            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
