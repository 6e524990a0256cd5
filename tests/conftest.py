"""Shared test settings.

Hypothesis: no per-example deadline (the machines are shared and noisy; speed is measured
by benchmarks, not tests) and a bounded example count so the suite stays fast on 2 cores
(30 per property; `HYPOTHESIS_PROFILE=thorough pytest tests/core` runs 500 each).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _offline_as_every_command_the_tests_start() -> None:
    """The session runs with the environment the tests give the commands they start
    (`tiny_run_env`: offline hub, no telemetry), set before anything imports the hub clients,
    which read it once. So a test that hands a command `os.environ` and one that hands it
    `tiny_run_env()` get the same forked-command server (`tests/support/forked_cli.py`)."""
    from kdcompose.testing import tiny_run_env

    os.environ.update(tiny_run_env())


_offline_as_every_command_the_tests_start()


def _share_the_cores_between_workers() -> None:
    """Under `pytest -n N`: each worker (and every process it starts, through the environment)
    uses its share of the cores, so N workers do not each spin one thread per core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


_share_the_cores_between_workers()


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


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most 4. Many tests start two or three processes of their
    own (torchrun ranks, a teacher server), so more workers than that only queue for the cores."""
    return max(1, min(4, os.cpu_count() or 1))


LONGEST_FIRST = (
    "test_demo.py",
    "test_preemption.py",
    "test_engines_deepspeed.py",
    "test_scale_out.py",
    "test_teacher_sources_training.py",
    "test_swift_launcher.py",
    "test_long_run.py",
    "test_tiny_models.py",
    "test_engines_resume.py",
)
"""The files that take longest (measured, `--durations`; the demo first, as on a clean machine it
also trains its teacher), started first: with one file per worker (`--dist loadfile`) a long
file started last would leave the other workers idle at the end. Only the order changes; every
test still runs."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
