"""Hypothesis settings for the property tests.

The tests scale their example counts with the active profile's ``max_examples`` (hypothesis' default is 100), so
``pytest --hypothesis-profile=long`` runs 10x more examples of every property. For that option to find the
profile, this module must be imported before pytest configures hypothesis, i.e. from ``tests/conftest.py``
(``import _hypothesis_profiles``); ``DYNAMIXER_HYPOTHESIS_PROFILE=long`` loads it without that line.
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=1000, **_COMMON)
settings.register_profile("quick", max_examples=20, **_COMMON)

if os.environ.get("DYNAMIXER_HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["DYNAMIXER_HYPOTHESIS_PROFILE"])


def scaled_settings(base_examples: int) -> settings:
    """``base_examples`` at hypothesis' default of 100 examples, scaled by the active profile; never a deadline
    (the first call of a kernel compiles), never derandomized (fresh examples every run)."""
    n = max(1, round(base_examples * settings.default.max_examples / 100))
    return settings(max_examples=n, **_COMMON)
