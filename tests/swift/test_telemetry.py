"""Logged per-term values add up to the logged `loss`, in training and evaluation.

Two real tiny runs (module scope, in-process `kdcompose train`): lm_jsd (weight 0.5, with
`log_raw`) + ce (0.3), on-policy `lmbda: 0.5` so that ce is skipped on the optimizer steps
whose completions the student sampled, `logging_steps: 2` so that windows mix steps with
and without ce, once without gradient accumulation and once with 4 micro-batches per step;
evaluation every 3 steps on 5 samples in batches of 2 (an uneven last batch). With seed 42
ms-swift draws the data source of steps 0-5 as dataset, student, student, student,
dataset, student (`Random(seed + global_step)`), and evaluates the student's completions at
step 3 and dataset completions at step 6.

The oracle for the sum is transformers/ms-swift's own `loss` and `eval_loss`; each term
is also recomputed from the micro-batches the trainer saw (`loop_support.window_mean`).
"""

from __future__ import annotations

import pytest
from loop_support import (
    eval_rows,
    image_rows,
    log_rows,
    probe_micro_batches,
    step_of,
    train_rows,
    window_mean,
    write_rows,
)
from swift_support import sections

from kdcompose import parse_config

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

TERMS = ("llm_kd_loss", "sft_loss")
REL = 2e-5


def _run(tmp_path_factory, accumulation: int, batch_size: int):
    from kdcompose.integrations.swift.launch.command import run

    tmp = tmp_path_factory.mktemp(f"telemetry_ga{accumulation}")
    val = write_rows(tmp / "val.jsonl", image_rows()[8:13])
    data = sections(
        tmp / "out",
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=batch_size,
        logging_steps=2,
        max_steps=6,
        lmbda=0.5,
        seed=42,
        max_completion_length=8,
        val_dataset=[str(val)],
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=2,
        rlhf={"loss_terms": {"lm_jsd": {"weight": 0.5, "log_raw": True}, "ce": {"weight": 0.3}}},
    )
    with probe_micro_batches() as records:
        run(parse_config(data))
    return log_rows(tmp / "out"), records


@pytest.fixture(scope="module", params=[(1, 2), (4, 1)], ids=["accum1", "accum4"])
def run_logs(request, tmp_path_factory):
    accumulation, batch_size = request.param
    rows, records = _run(tmp_path_factory, accumulation, batch_size)
    return accumulation, rows, records


def _train_windows(rows, records):
    """(row, the training micro-batches it covers): row N covers global_step (previous N)..N-1."""
    previous = 0
    for row in train_rows(rows):
        step = step_of(row)
        yield row, [r for r in records if r["mode"] == "train" and previous <= r["global_step"] < step]
        previous = step


def test_logged_terms_add_up_to_the_logged_loss(run_logs):
    _, rows, _ = run_logs
    train = train_rows(rows)
    assert [step_of(r) for r in train] == [1, 2, 4, 6]
    for row in train:
        parts = sum(row.get(key, 0.0) for key in TERMS)
        assert parts == pytest.approx(row["loss"], rel=REL), row
    evals = eval_rows(rows)
    assert [step_of(r) for r in evals] == [3, 6]
    for row in evals:
        parts = sum(row.get(f"eval_{key}", 0.0) for key in TERMS)
        assert parts == pytest.approx(row["eval_loss"], rel=REL), row


def test_a_term_skipped_on_some_micro_batches_counts_zero_there(run_logs):
    accumulation, rows, records = run_logs
    windows = list(_train_windows(rows, records))
    assert [len(micro) for _, micro in windows] == [
        accumulation,
        accumulation,
        2 * accumulation,
        2 * accumulation,
    ]
    mixed = windows[3]  # steps 4 (dataset: ce runs) and 5 (student: ce skipped)
    row, micro = mixed
    ran = [r for r in micro if "sft_loss" in r["terms"]]
    assert 0 < len(ran) < len(micro)
    for key in TERMS:
        assert row[key] == pytest.approx(window_mean(micro, key), rel=REL), key
    # with every micro-batch counted, sft_loss is half of its mean over the step it ran on
    assert row["sft_loss"] == pytest.approx(window_mean(ran, "sft_loss") / 2, rel=REL)
    # a window where ce never ran has no sft_loss at all (not a 0)
    row, micro = windows[2]  # steps 2 and 3: both student-generated
    assert "sft_loss" not in row and all("sft_loss" not in r["terms"] for r in micro)


def test_every_logged_term_is_the_window_mean_of_the_micro_batches(run_logs):
    _, rows, records = run_logs
    for row, micro in _train_windows(rows, records):
        for key in TERMS:
            expected = window_mean(micro, key)
            assert row.get(key) == (None if expected is None else pytest.approx(expected, rel=REL)), key
    for row in eval_rows(rows):
        micro = [r for r in records if r["mode"] == "eval" and r["global_step"] == step_of(row)]
        assert sorted(r["weight"] for r in micro) == [1.0, 2.0, 2.0]  # 5 samples in batches of 2
        for key in TERMS:
            expected = window_mean(micro, key)
            got = row.get(f"eval_{key}")
            assert got == (None if expected is None else pytest.approx(expected, rel=REL)), key


def test_raw_values_are_aggregated_like_their_weighted_metric(run_logs):
    _, rows, records = run_logs
    for row, micro in _train_windows(rows, records):
        assert row["llm_kd_loss_raw"] == pytest.approx(
            window_mean(micro, "llm_kd_loss", field="raw"), rel=REL
        )
        assert row["llm_kd_loss"] == pytest.approx(0.5 * row["llm_kd_loss_raw"], rel=REL)
    for row in eval_rows(rows):
        assert row["eval_llm_kd_loss"] == pytest.approx(0.5 * row["eval_llm_kd_loss_raw"], rel=REL)


def test_each_micro_batch_weighs_one_over_the_accumulation_steps(run_logs):
    """As `training_step` scales each micro-batch loss by 1 / G before it reaches `loss`."""
    accumulation, _, records = run_logs
    train = [r for r in records if r["mode"] == "train"]
    assert len(train) == 6 * accumulation
    assert {r["weight"] for r in train} == {1.0 / accumulation}
