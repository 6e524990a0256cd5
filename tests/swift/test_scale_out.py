"""Token normalization across micro-batches and ranks, and a real two-process run.

Data: four rows with deliberately uneven label counts (an image caption with 15 labelled
tokens, a text answer with 31, two prompts without an answer: 0 tokens, no image), so that
every way of splitting them weighs tokens differently. The same four rows make one optimizer
step as (batch 4, accumulation 1), (batch 2, accumulation 2) in two orders, (batch 1,
accumulation 4) — emulated exactly as transformers runs them, through `training_step` on a
prepared trainer — and as 2 ranks x batch 2 in a real `kdcompose train` under torchrun (gloo,
CPU), where every epoch is one step of all four rows.

`normalize: global_tokens` (lm_jsd and ce) must give the same step loss and gradients for
every split; the default `micro_batch` (ms-swift's) must show the documented difference: the
mean of per-micro-batch token means.

The two-process run also has visual_kd on the vision tower, scheduled to start at step 1 so
that step 0 compares lm_jsd + ce alone with the single-process reference. With seed 42 the
sampler gives one rank the two answer-less prompts at step 0 (no labelled token, no image)
while the other has both; from step 1 on one rank never has an image (the only image row
goes to one side) while visual_kd is active. Each rank writes what it saw and logged through
a test plugin (`tests/rank_probe_plugin.py`, loaded by the config's `plugins:` list).
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import pytest
import torch
from forked_cli import run_cli
from loop_support import image_rows, log_rows, train_rows, uneven_rows, write_rows
from swift_support import sections, subprocess_env, write_config

from kdcompose import build_composer, parse_config

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

A, B, C, D = range(4)
TOKENS = {A: 15, B: 31, C: 0, D: 0}
CE_WEIGHT = 0.3
VISUAL = {
    "weight": 0.5,
    "vit": {"enabled": True, "weight": 1.0, "distance": "mse"},
    "schedule": {"kind": "constant", "warmup_steps": 1, "start": 0.0, "end": 1.0},
}
OUR_KEYS = ("llm_kd_loss", "sft_loss", "vision_kd_loss")
STEPS = 4


def _loss_terms(normalize: str) -> dict:
    return {
        "lm_jsd": {"normalize": normalize},
        "ce": {"weight": CE_WEIGHT, "normalize": normalize},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("scale_out")
    write_rows(tmp / "train.jsonl", uneven_rows())
    write_rows(tmp / "val.jsonl", image_rows()[8:13])
    return tmp


def _sections(data: Path, out: Path, normalize: str, **overrides) -> dict:
    return sections(
        out,
        dataset=[str(data / "train.jsonl")],
        use_cpu=True,
        seed=42,
        rlhf={"loss_terms": _loss_terms(normalize)},
        custom={"visual_kd": VISUAL},
        **overrides,
    )


# ----------------------------------------------------------------------- one process, any split


@pytest.fixture(scope="module")
def reference(data):
    """A prepared single-process trainer (not trained: every step below starts from the same
    weights) and the composers of both normalizations."""
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    trainer = build_trainer(parse_config(_sections(data, data / "ref", "global_tokens")))
    trainer.model.train()
    trainer.lmbda = 0.0
    composers = {
        n: build_composer(parse_config({"rlhf": {"loss_terms": _loss_terms(n)}}).composition)
        for n in ("global_tokens", "micro_batch")
    }
    return trainer, composers


def _one_step(trainer, order: list[int], micro_batches: int) -> tuple[float, list[torch.Tensor], list[int]]:
    """One optimizer step over `order` split into `micro_batches` as transformers + ms-swift
    run it: the generation batch is encoded once and split, each micro-batch goes through
    `training_step` (which divides its loss by G and backpropagates). Returns the step loss
    as the trainer accumulates it, the gradients, and each micro-batch's labelled tokens."""
    rows = uneven_rows()
    trainer.args.gradient_accumulation_steps = trainer.args.steps_per_generation = micro_batches
    trainer.current_gradient_accumulation_steps = micro_batches
    trainer._step, trainer._buffered_inputs = 0, None
    trainer.model.zero_grad(set_to_none=True)
    loss = 0.0
    for _ in range(micro_batches):
        loss += trainer.training_step(trainer.model, [copy.deepcopy(rows[i]) for i in order]).item()
    grads = [p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None]
    tokens = [int((c["model_inputs"]["labels"] != -100).sum()) for c in trainer._buffered_inputs]
    trainer.model.zero_grad(set_to_none=True)
    trainer.kd_reset_metrics()
    return loss, grads, tokens


SPLITS = {
    "4x1": ([A, B, C, D], 1),
    "2x2 uneven": ([A, C, B, D], 2),
    "2x2 one empty": ([A, B, C, D], 2),
    "1x4": ([A, B, C, D], 4),
}


@pytest.fixture(scope="module")
def steps(reference):
    trainer, composers = reference
    out = {}
    for normalize, composer in composers.items():
        trainer.use_composer(composer)
        out[normalize] = {name: _one_step(trainer, *split) for name, split in SPLITS.items()}
    return out


def _assert_same_gradients(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def _norm(grads: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()


def test_splits_see_the_uneven_token_counts(steps):
    tokens = {name: result[2] for name, result in steps["micro_batch"].items()}
    assert tokens == {"4x1": [46], "2x2 uneven": [15, 31], "2x2 one empty": [46, 0], "1x4": [15, 31, 0, 0]}


def test_global_tokens_gives_the_same_step_for_every_split(steps):
    results = steps["global_tokens"]
    loss, grads, _ = results["4x1"]
    for name in ("2x2 uneven", "2x2 one empty", "1x4"):
        assert results[name][0] == pytest.approx(loss, rel=1e-5), name
        _assert_same_gradients(results[name][1], grads)


def test_micro_batch_default_is_the_mean_of_micro_batch_means(steps):
    micro, exact = steps["micro_batch"], steps["global_tokens"]
    # one micro-batch: both normalizations are the same token mean
    assert micro["4x1"][0] == pytest.approx(exact["4x1"][0], rel=1e-6)
    _assert_same_gradients(micro["4x1"][1], exact["4x1"][1])
    # an empty micro-batch counts 0 in the mean: half the loss and half the gradient
    assert micro["2x2 one empty"][0] == pytest.approx(exact["4x1"][0] / 2, rel=1e-5)
    _assert_same_gradients(micro["2x2 one empty"][1], [g / 2 for g in exact["4x1"][1]])
    assert micro["1x4"][0] == pytest.approx(micro["2x2 uneven"][0] / 2, rel=1e-5)
    # uneven micro-batches: mean of the two means, while global_tokens weighs them 15 : 31
    assert micro["2x2 uneven"][0] != pytest.approx(exact["2x2 uneven"][0], rel=1e-4)
    assert abs(_norm(micro["2x2 uneven"][1]) / _norm(micro["4x1"][1]) - 1) > 0.01  # a visible difference


def test_micro_batch_formula_from_each_micro_batch_alone(reference, steps):
    """The two normalizations from the two micro-batches' own token means m1, m2 (15, 31 tokens)."""
    trainer, composers = reference
    trainer.use_composer(composers["micro_batch"])
    m1, _, t1 = _one_step(trainer, [A, C], 1)
    m2, _, t2 = _one_step(trainer, [B, D], 1)
    assert (t1, t2) == ([15], [31])
    assert steps["micro_batch"]["2x2 uneven"][0] == pytest.approx((m1 + m2) / 2, rel=1e-5)
    assert steps["global_tokens"]["2x2 uneven"][0] == pytest.approx((15 * m1 + 31 * m2) / 46, rel=1e-5)


# ----------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def two_ranks(data):
    """`kdcompose train` with NPROC_PER_NODE=2 (torchrun, gloo, CPU DDP)."""
    out = data / "ddp_out"
    config = _sections(
        data,
        out,
        "global_tokens",
        per_device_train_batch_size=2,
        max_steps=STEPS,
        ddp_backend="gloo",
        val_dataset=[str(data / "val.jsonl")],
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=2,
        metric_for_best_model="eval_llm_kd_loss",
        greater_is_better=False,
    )
    config["plugins"] = [str(Path(__file__).parents[1] / "support" / "rank_probe_plugin.py")]
    path = write_config(data / "ddp.yaml", config)
    probe = data / "probe"
    probe.mkdir()
    env = {
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(random.Random(os.getpid()).randrange(20000, 40000)),
        "KDCOMPOSE_PROBE_DIR": str(probe),
    }
    result = run_cli(["train", str(path)], {**subprocess_env(data), **env})
    assert result.returncode == 0, result.stderr[-4000:]
    events = {
        rank: [json.loads(line) for line in (probe / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    return out, events


def _logs(events, rank):
    return [e["logs"] for e in events[rank] if e["event"] == "log"]


def _micro(events, rank, mode="train"):
    return [e for e in events[rank] if e["event"] == "micro" and e["mode"] == mode]


def test_every_rank_logs_the_same_values(two_ranks):
    _, events = two_ranks
    rows = [_logs(events, rank) for rank in (0, 1)]
    assert len(rows[0]) == len(rows[1]) >= STEPS
    keys = [*OUR_KEYS, *(f"eval_{k}" for k in OUR_KEYS), "loss", "eval_loss", "grad_norm"]
    for a, b in zip(*rows, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    ends = [e["best_metric"] for rank in (0, 1) for e in events[rank] if e["event"] == "end"]
    assert len(ends) == 2 and ends[0] == ends[1] is not None  # best-model decisions agree


def test_logged_terms_add_up_to_the_loss_on_every_rank(two_ranks):
    out, events = two_ranks
    for rank in (0, 1):
        for row in _logs(events, rank):
            if "loss" in row and "train_loss" not in row:
                assert sum(row.get(k, 0.0) for k in OUR_KEYS) == pytest.approx(row["loss"], rel=2e-5)
            if "eval_loss" in row:
                parts = sum(row.get(f"eval_{k}", 0.0) for k in OUR_KEYS)
                assert parts == pytest.approx(row["eval_loss"], rel=2e-5)
    written = train_rows([json.loads(x) for x in next(out.glob("**/logging.jsonl")).read_text().splitlines()])
    assert len(written) == STEPS  # rank 0 wrote logging.jsonl; its rows are the reduced values above


def test_ranks_without_tokens_or_images_neither_hang_nor_skew_the_others(two_ranks):
    _, events = two_ranks
    micro = {rank: _micro(events, rank) for rank in (0, 1)}
    step0 = sorted(
        (m["tokens"], m["images"]) for rank in (0, 1) for m in micro[rank] if m["global_step"] == 0
    )
    assert step0 == [(0, False), (46, True)]  # one rank: no labelled token and no image
    later = [
        sorted(m["images"] for rank in (0, 1) for m in micro[rank] if m["global_step"] == step)
        for step in range(1, STEPS)
    ]
    assert all(images == [False, True] for images in later)  # one rank never has the image
    for step in range(1, STEPS):
        seen = [m for rank in (0, 1) for m in micro[rank] if m["global_step"] == step]
        logged = _train_row(events, 0, computed_at=step)
        # visual_kd: the image rank's value, averaged with 0 from the rank without an image
        expected = sum(m["terms"].get("vision_kd_loss", 0.0) for m in seen) / 2
        assert logged["vision_kd_loss"] == pytest.approx(expected, rel=1e-5)


def _train_row(events, rank: int, computed_at: int) -> dict:
    """The training row of the step computed at `computed_at` (logged after the increment)."""
    return next(
        e["logs"]
        for e in events[rank]
        if e["event"] == "log" and e["global_step"] == computed_at + 1 and "loss" in e["logs"]
    )


def test_two_ranks_match_one_process_with_global_tokens(two_ranks, steps):
    """Step 1 (computed at global_step 0, visual_kd still scheduled off) from identical weights."""
    _, events = two_ranks
    loss, grads, _ = steps["global_tokens"]["4x1"]
    first = _train_row(events, 0, computed_at=0)
    assert first["loss"] == pytest.approx(loss, rel=1e-5)
    assert first["grad_norm"] == pytest.approx(_norm(grads), rel=1e-4)
    assert "vision_kd_loss" not in first
    # the default would have averaged the ranks' token means: rank 0 had none, so half
    assert steps["micro_batch"]["2x2 one empty"][0] == pytest.approx(loss / 2, rel=1e-5)


def test_two_processes_without_ddp_are_refused(data, tmp_path):
    """On CPU, `ddp_backend: gloo` without `use_cpu: true` gives two unsynchronised models: refused
    by the launcher's preflight, before torchrun starts any rank (exit 2, naming the key)."""
    config = _sections(data, tmp_path / "out", "micro_batch", max_steps=1, ddp_backend="gloo")
    config["training"].pop("use_cpu")
    path = write_config(tmp_path / "no_ddp.yaml", config)
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(random.Random(os.getpid() + 1).randrange(20000, 40000))}
    result = run_cli(["train", str(path)], {**subprocess_env(tmp_path), **env})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "training.use_cpu" in result.stderr and "sets up no distributed data parallel" in result.stderr
    assert "2 processes on a machine without GPUs" in result.stderr
    assert "launching" not in result.stdout and "Traceback" not in result.stderr  # no rank started
    logs = list((tmp_path / "out").glob("**/logging.jsonl"))
    assert not (logs and train_rows(log_rows(tmp_path / "out")))  # refused before any training step
