"""Shared test settings.

Hypothesis: no per-example deadline (the machines are shared and noisy; speed is measured
by benchmarks, not tests) and a bounded example count so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test ends with the environment it started with. `monkeypatch.setenv` alone is not
    enough here: `datasets.Dataset.map(num_proc>1)` (which ms-swift runs) replaces `os.environ`
    with a deep copy of itself, so monkeypatch later restores the old object while the new one
    keeps the value, and the next test inherits it (found as an order-dependent failure)."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)
