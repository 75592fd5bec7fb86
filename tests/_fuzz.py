"""Hypothesis profiles for the property-based tests (tests/test_fuzz_*.py).  Not a test module.

* default (CI): ``derandomize=True`` (the examples are a fixed function of the test, so a
  run is reproducible and never flaky), few examples per test (each test's own count).
* ``FASTLM_FUZZ=1``: the big run, random and 25x the examples; ``FASTLM_FUZZ=<n>`` (n > 1):
  n x.  A failure prints the falsifying example (every tensor is drawn from a seed that
  hypothesis draws, so the example alone reproduces it) and a ``@reproduce_failure`` blob.

No example database is written (``database=None``): the checkout stays clean.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_FUZZ = os.environ.get("FASTLM_FUZZ", "").strip()
SCALE = 0 if _FUZZ in ("", "0") else (25 if _FUZZ == "1" else int(_FUZZ))

settings.register_profile(
    "fastlm-ci", derandomize=True, database=None, deadline=None, print_blob=True,
    # the function-scoped fixtures used (``poison``: a process-wide allocation mode; the
    # backend name) hold no per-example state
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("fastlm-fuzz", parent=settings.get_profile("fastlm-ci"), derandomize=False)
settings.load_profile("fastlm-fuzz" if SCALE else "fastlm-ci")


def examples(n: int) -> settings:
    """``@examples(n)``: n examples per run in CI, ``n * SCALE`` in the big run."""
    return settings(max_examples=n * max(SCALE, 1))
