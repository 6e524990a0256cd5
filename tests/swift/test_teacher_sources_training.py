"""Training with the teacher elsewhere, through `kdcompose train`, on the tiny Qwen2-VL pair:
a top-K cache with the teacher's files absent, ms-swift's `teacher_model_server` pointed at a real
`kdcompose serve-teacher` process on 127.0.0.1, and two named teachers in one run -- each against
the live local teacher with the same top-8 `lm_jsd` (per-step losses within 1e-5)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from forked_cli import ForkedServerProcess, run_cli
from swift_support import (
    kdcompose_command,
    run_command,
    sections,
    step_logs,
    subprocess_env,
    train_as_user,
    write_config,
)

from kdcompose.serve.process import free_port
from kdcompose.testing import SWIFT_MODEL_TYPE, SWIFT_TEMPLATE

TOL = 1e-5
STEPS = 3


def _train(tmp: Path, name: str, rlhf: dict, drop: tuple[str, ...] = (), env: dict | None = None, **kw):
    config = write_config(
        tmp / f"{name}.yaml", sections(tmp / name, rlhf=rlhf, drop=drop, max_steps=STEPS, **kw)
    )
    result = (
        run_command(kdcompose_command("train", str(config)), tmp) if env is None else _run(config, tmp, env)
    )
    return result, config


def _run(config: Path, tmp: Path, env: dict):
    return run_cli(["train", str(config)], env)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="module")
def live(tmp: Path) -> list[dict]:
    result, _ = _train(tmp, "live", {"gkd_logits_topk": 8})
    assert result.returncode == 0, result.stderr[-4000:]
    return step_logs(tmp / "live")


@pytest.fixture(scope="module")
def cache_dir(tmp: Path, live) -> Path:
    out = tmp / "cache"
    command = kdcompose_command(
        "teacher-cache", str(tmp / "live.yaml"), "--out", str(out), "--dtype", "float32"
    )
    result = run_command(command, tmp)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def server(tmp: Path):
    teacher = sections(tmp / "unused")["model"]["teacher_model"]
    with ForkedServerProcess(
        model=teacher,
        model_type=SWIFT_MODEL_TYPE["qwen2_vl"],
        template=SWIFT_TEMPLATE["qwen2_vl"],
        extra_args=["--torch-dtype", "float32"],
        env=subprocess_env(tmp),
    ) as process:
        yield process


def _losses(rows: list[dict], key: str = "loss") -> list[float]:
    assert len(rows) == STEPS
    return [r[key] for r in rows]


@pytest.mark.swift
def test_a_float32_cache_reproduces_the_live_topk_run_with_the_teacher_files_absent(tmp, live, cache_dir):
    rlhf = {"gkd_logits_topk": 8, "teacher_cache": str(cache_dir)}
    result, _ = _train(tmp, "cached", rlhf, teacher_model="/nonexistent/teacher")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"kdcompose: teacher: cache {cache_dir} (top-8, " in result.stdout, (
        "the start-up line names the cache"
    )
    assert "self-distillation" not in result.stdout + result.stderr, "the student is not its own teacher"
    rows = step_logs(tmp / "cached")
    assert _losses(rows) == pytest.approx(_losses(live), abs=TOL, rel=0)
    assert _losses(rows, "llm_kd_loss_topk_mass") == pytest.approx(
        _losses(live, "llm_kd_loss_topk_mass"), abs=TOL
    )


@pytest.mark.swift
def test_stock_config_with_teacher_model_server_trains_like_the_local_top8_teacher(tmp, live, server):
    rlhf = {"gkd_logits_topk": 8, "teacher_model_server": server.url}
    result, _ = _train(tmp, "served", rlhf, drop=("teacher_model", "teacher_model_type"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"kdcompose: teacher: server {server.url}" in result.stdout
    assert _losses(step_logs(tmp / "served")) == pytest.approx(_losses(live), abs=TOL, rel=0)


@pytest.mark.swift
def test_two_named_teachers_in_one_run_log_their_own_terms(tmp, live, cache_dir, server):
    rlhf = {
        "llm_kd_weight": 0,
        "teachers": {"cached": {"cache": str(cache_dir)}, "served": {"server": server.url}},
        "loss_terms": {
            "lm_jsd_cached": {"type": "lm_jsd", "teacher": "cached", "topk": 8, "weight": 0.5},
            "lm_jsd_served": {"type": "lm_jsd", "teacher": "served", "topk": 8, "weight": 0.25},
        },
    }
    result, _ = _train(tmp, "named", rlhf, drop=("teacher_model", "teacher_model_type"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Loss = 0.5*lm_jsd_cached(" in result.stdout and "0.25*lm_jsd_served(" in result.stdout
    assert (
        f"teacher cached: cache {cache_dir}" in result.stdout
        and f"teacher served: server {server.url}" in result.stdout
    )
    rows = step_logs(tmp / "named")
    # Both teachers are the same tiny model, so at step 1 (same student) each term is its weight
    # times the live run's top-8 JSD; later steps differ because this run trains differently.
    first, reference = rows[0], live[0]["llm_kd_loss"]
    assert first["lm_jsd_cached_loss"] == pytest.approx(0.5 * reference, abs=TOL)
    assert first["lm_jsd_served_loss"] == pytest.approx(0.25 * reference, abs=TOL)
    for row in rows:
        assert row["loss"] == pytest.approx(row["lm_jsd_cached_loss"] + row["lm_jsd_served_loss"], rel=1e-4)
        assert 0 < row["lm_jsd_served_loss_topk_mass"] <= 1


@pytest.mark.swift
def test_a_dead_server_url_fails_naming_it_within_the_bounded_wait(tmp):
    url = f"http://127.0.0.1:{free_port()}"
    env = {**subprocess_env(tmp), "KDCOMPOSE_TEACHER_SERVER_WAIT_S": "3"}
    start = time.monotonic()
    result, _ = _train(
        tmp, "dead", {"gkd_logits_topk": 8, "teacher_model_server": url}, drop=("teacher_model",), env=env
    )
    assert result.returncode != 0
    assert url in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - start < 300


def plugin_dead_url(line: str) -> bool:
    """The message names the URL rank 1 was talking to (the plugin's dead port, not the server)."""
    return "127.0.0.1:" in line and "Connection refused" in line


@pytest.mark.swift
def test_a_named_server_failing_on_one_rank_stops_every_rank_together(tmp, server):
    """2 ranks (gloo); rank 1's server connection dies at its second fetch
    (tests/dead_server_on_rank1_plugin.py). Both ranks log the same message naming rank 1 and
    the dead URL, and both exit with an error: without the ranks comparing notes, rank 0 would
    go on to its next collective and be killed by the launcher (or, with ranks on other nodes,
    wait there until the process-group timeout)."""
    rlhf = {
        "llm_kd_weight": 0,
        "teachers": {"served": {"server": server.url}},
        "loss_terms": {"lm_jsd_served": {"type": "lm_jsd", "teacher": "served", "topk": 8}},
    }
    data = sections(
        tmp / "one_rank",
        rlhf=rlhf,
        drop=("teacher_model", "teacher_model_type"),
        max_steps=STEPS,
        dataset_size=8,
        use_cpu=True,
        ddp_backend="gloo",
    )
    plugin = str(Path(__file__).parents[1] / "support" / "dead_server_on_rank1_plugin.py")
    config = write_config(tmp / "one_rank.yaml", {"plugins": [plugin], **data})
    retries = {"KDCOMPOSE_TEACHER_SERVER_RETRIES": "2", "KDCOMPOSE_TEACHER_SERVER_BACKOFF_S": "0.1"}
    start = time.monotonic()
    result = train_as_user(config, tmp, nproc=2, extra_env=retries, timeout=600)
    assert result.returncode != 0
    for rank in (0, 1):  # each rank said it before any exited (the launcher then ends the other)
        said = [
            line
            for line in result.stderr.splitlines()
            if f"kdcompose [rank {rank}/2]: the teacher server" in line
        ]
        assert said and "every rank stopped" in said[0] and "on rank 1" in said[0], result.stderr[-4000:]
        assert plugin_dead_url(said[0]), said[0]
    assert time.monotonic() - start < 300


@pytest.mark.swift
def test_a_server_failure_on_the_main_process_reaches_every_rank_through_the_broadcast():
    """The main process turns the failure into a value that ms-swift's broadcast hands to every
    rank, and each rank raises the same error naming the URL -- instead of the main process
    raising alone while the others wait in the broadcast."""
    from swift_support import shared_trainer

    from kdcompose.teachers.server_client import TeacherServerError, TeacherServerUnavailable
    from kdcompose.teachers.server_teacher import FetchFailure as TeacherFetchFailure

    class DeadClient:
        def infer(self, *args, **kwargs):
            raise TeacherServerUnavailable("no answer after 4 tries", "http://127.0.0.1:9")

    trainer = shared_trainer()
    handle = {"all_requests": [{"messages": []}], "all_counts": [1], "n_local": 1}
    failure = trainer._infer_teacher_requests(handle, 8, teacher_client=DeadClient())
    assert isinstance(failure, TeacherFetchFailure) and failure.url == "http://127.0.0.1:9"
    with pytest.raises(TeacherServerError) as info:
        trainer._scatter_teacher_parsed(handle, failure)
    message = str(info.value)
    assert "http://127.0.0.1:9" in message and "every rank stopped" in message
    assert "no answer after 4 tries" in message
    assert trainer._scatter_teacher_parsed(handle, [("lp", "ids")]) == [("lp", "ids")]
