"""`process_issues`: several CPU processes without `use_cpu` are refused before any model loads.

Real environment variables, as torchrun or a user's shell sets them; the machine running the suite
has no GPU (where it has one, the check rightly says nothing and the refusal cases are skipped)."""

from __future__ import annotations

import pytest

from kdcompose.training.engines import (
    has_accelerator,
    launched_processes,
    process_issues,
    skip_step_issues,
    zero_stage_of,
)

LAUNCH_VARS = ("WORLD_SIZE", "NPROC_PER_NODE", "NNODES")
PATHS = {"use_cpu": "training.use_cpu"}


@pytest.fixture
def launch(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)

    def set_vars(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_vars


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 1),
        ({"NPROC_PER_NODE": "2"}, 2),
        ({"NPROC_PER_NODE": "2", "NNODES": "3"}, 6),
        ({"WORLD_SIZE": "4", "NPROC_PER_NODE": "2"}, 4),  # inside a worker: the launcher's count
        ({"NPROC_PER_NODE": "gpu"}, None),
    ],
)
def test_launched_processes_reads_the_launcher_variables(launch, env, expected):
    launch(**env)
    assert launched_processes() == expected


@pytest.mark.skipif(has_accelerator(), reason="a GPU machine: several processes get DDP without use_cpu")
def test_two_cpu_processes_without_use_cpu_are_refused_naming_the_key(launch):
    launch(NPROC_PER_NODE="2")
    (issue,) = process_issues({"ddp_backend": "gloo"}, {"use_cpu": "train.use_cpu"})
    assert issue.path == "train.use_cpu"
    assert "2 processes on a machine without GPUs" in issue.message and "use_cpu: true" in issue.message


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({}, {}),  # one process
        ({"NPROC_PER_NODE": "2"}, {"use_cpu": True}),
        ({"NPROC_PER_NODE": "2"}, {"use_cpu": "true"}),
        ({"NPROC_PER_NODE": "2"}, {"deepspeed": "zero2"}),
        ({"NPROC_PER_NODE": "2"}, {"fsdp": "full_shard"}),
        ({"NPROC_PER_NODE": "auto"}, {}),  # unknown count: left to the trainer's own check
    ],
)
def test_what_sets_up_its_own_processes_is_not_refused(launch, env, args):
    launch(**env)
    assert process_issues(args, PATHS) == []


@pytest.mark.parametrize(
    ("value", "stage"),
    [
        ("zero0", 0),
        ("zero2", 2),
        ("zero3_offload", 3),
        ({"zero_optimization": {"stage": 1}}, 1),
        ({"train_batch_size": "auto"}, 0),  # no ZeRO section: stage 0
        ("missing.json", None),  # unreadable here: left to the trainer
    ],
)
def test_zero_stage_of_names_dicts_and_files(value, stage):
    assert zero_stage_of(value) == stage


def test_zero_stage_of_a_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 0}}')
    assert zero_stage_of(str(path)) == 0


def test_skip_step_under_zero0_is_refused_per_term_before_any_model_loads():
    from kdcompose import build_composer, parse_config

    config = parse_config(
        {"rlhf": {"loss_terms": {"ce": {"weight": 1.0, "on_nonfinite": "skip_step"}, "lm_jsd": {}}}}
    )
    terms = build_composer(config.composition).active_terms
    (issue,) = skip_step_issues({"deepspeed": "zero0"}, terms, {"deepspeed": "training.deepspeed"})
    assert issue.path == "rlhf.loss_terms.ce.on_nonfinite"
    assert "ZeRO stage 1, 2 or 3" in issue.message and "stage 0" in issue.message
    assert skip_step_issues({"deepspeed": "zero2"}, terms, {}) == []
    assert skip_step_issues({}, terms, {}) == []
