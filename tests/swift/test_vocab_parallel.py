"""Vocabulary parallelism on 2 gloo ranks: every divergence (and the autograd fallback), chunked and
fused, with and without token selection, equals the single-process engine within 1e-6 relative.

Two real processes (``vocab_parallel_worker.py``) share a gloo group over a FileStore in the test's
temporary directory (no port to race for); each holds its own uneven slice of the vocabulary (of
the logits, or of both LM heads' rows) and computes the same loss plus the gradient of its slice.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import forked_cli
import pytest
import torch
from swift_support import subprocess_env

pytestmark = pytest.mark.swift

WORKER = Path(__file__).parents[1] / "support" / "vocab_parallel_worker.py"
WORLD = 2
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    python, env = forked_cli.python(subprocess_env(tmp))  # forked: tests/support/forked_cli.py
    procs = [
        subprocess.Popen(
            [
                python,
                str(WORKER),
                str(rank),
                str(WORLD),
                str(tmp / "store"),
                str(tmp / f"rank{rank}.pt"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S))
    finally:
        for proc in procs:  # never leave a rank behind, whatever failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{err[-4000:]}"
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    scale = max(want.abs().max().item(), 1e-12)
    assert torch.all((got - want).abs() <= rel * scale + rel * want.abs()), f"{got}\nvs\n{want}"


def test_both_ranks_equal_the_single_process_engine_in_value_and_gradient(ranks):
    keys = set(ranks[0])
    assert len(keys) == 2 * 11 * 2 and all(set(r) == keys for r in ranks)
    for key in sorted(keys):
        for rank, results in enumerate(ranks):
            r = results[key]
            where = f"{key} rank {rank}"
            assert r["par"].item() == pytest.approx(r["ref"].item(), rel=1e-6), where
            assert r["fused_par"].item() == pytest.approx(r["fused_ref"].item(), rel=1e-6), where
            _close(r["grad_par"], r["grad_ref"])
            for got, want in zip(r["fused_grads_par"], r["fused_grads_ref"], strict=True):
                _close(got, want, rel=2e-6)
        assert ranks[0][key]["par"].item() == ranks[1][key]["par"].item(), f"{key}: ranks disagree"
