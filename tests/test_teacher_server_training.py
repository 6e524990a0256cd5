"""ms-swift's STOCK GKDTrainer with `teacher_model_server` pointed at `kdcompose serve-teacher`.

After `install_vllm_free_teacher_client()` (vLLM is not installed here, so ms-swift's own client
would refuse to start), the stock trainer with `gkd_logits_topk: 8` and the served teacher logs the
same per-step losses as the stock trainer with the local `teacher_model` and `gkd_logits_topk: 8`.
Each run is a fresh interpreter (importing ms-swift's trainers patches TRL process-wide).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kdcompose.serve.process import ServerProcess, free_port
from kdcompose.testing import SWIFT_MODEL_TYPE, SWIFT_TEMPLATE, tiny_gkd_args
from swift_support import step_logs, subprocess_env

pytestmark = pytest.mark.swift

KEY = "training-key"
STEPS = 3


def _stock_gkd(out: Path, env: dict[str, str], server: str | None) -> list[dict[str, Any]]:
    code = textwrap.dedent(
        f"""
        import os
        from kdcompose.compat import ensure_torchvision_importable
        ensure_torchvision_importable()
        from kdcompose.testing import tiny_gkd_args, tiny_run_env
        os.environ.update(tiny_run_env())
        kw = tiny_gkd_args("qwen2_vl", {str(out)!r}, max_steps={STEPS}, gkd_logits_topk=8)
        server = {server!r}
        if server:
            from kdcompose.teachers.server_client import install_vllm_free_teacher_client
            assert install_vllm_free_teacher_client()
            kw.update(teacher_model=None, teacher_model_type=None, teacher_model_server=server)
        from swift import RLHFArguments, rlhf_main
        rlhf_main(RLHFArguments(**kw))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return step_logs(out)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**subprocess_env(tmp_path_factory.mktemp("env")), "KDCOMPOSE_TEACHER_SERVER_API_KEY": KEY}


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> list[float]:
    rows = _stock_gkd(tmp_path_factory.mktemp("local"), env, None)
    return [r["loss"] for r in rows]


def test_stock_trainer_with_served_teacher_matches_local_topk(
    tmp_path: Path, env: dict[str, str], local_losses: list[float]
) -> None:
    tiny = tiny_gkd_args("qwen2_vl", str(tmp_path / "unused"))
    extra = ["--api-key", KEY, "--torch-dtype", "float32"]
    with ServerProcess(
        model=tiny["teacher_model"],
        model_type=SWIFT_MODEL_TYPE["qwen2_vl"],
        template=SWIFT_TEMPLATE["qwen2_vl"],
        extra_args=extra,
        env=env,
    ) as server:
        served = [r["loss"] for r in _stock_gkd(tmp_path / "served", env, server.url)]
    assert len(served) == len(local_losses) == STEPS
    assert served == pytest.approx(local_losses, abs=1e-5, rel=0)
    assert len(set(served)) == STEPS  # the steps differ: a wrong (e.g. constant) teacher would show


def test_stock_trainer_pointed_at_a_dead_url_fails_naming_it(tmp_path: Path, env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AssertionError) as err:
        _stock_gkd(tmp_path / "dead", {**env, "KDCOMPOSE_TEACHER_SERVER_WAIT_S": "2"}, url)
    message = str(err.value)
    assert "TeacherServerUnavailable" in message and f"{url} not ready after 2 s" in message
