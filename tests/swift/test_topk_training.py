"""Top-k `lm_jsd` inside ms-swift 4.6: ms-swift's own `gkd_logits_topk` keeps working under
kdcompose, checked against ms-swift's stock `GKDTrainer` (its `compute_loss` on real batches, and
a whole `swift rlhf` run against `kdcompose train` of the same config)."""

from __future__ import annotations

import pytest
import torch
import yaml
from swift_support import (
    composed,
    fresh,
    kdcompose_command,
    metric_values,
    prepared_inputs,
    run_command,
    sections,
    shared_trainer,
    step_logs,
    swift_args,
    swift_command,
    write_config,
)

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

TOL = 1e-5


@pytest.fixture(scope="module")
def trainer():
    return shared_trainer()


def _losses(trainer, inputs, k: int) -> tuple[float, float]:
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer

    saved = trainer.gkd_logits_topk
    trainer.gkd_logits_topk = k
    try:
        with torch.no_grad():
            stock = GKDTrainer.compute_loss(trainer, trainer.model, fresh(inputs))
            ours = trainer.compute_loss(trainer.model, fresh(inputs))
    finally:
        trainer.gkd_logits_topk = saved
    return stock.item(), ours.item()


@pytest.mark.parametrize("generated", [False, True], ids=["dataset", "student-generated"])
def test_gkd_logits_topk_matches_the_stock_trainer_with_sft_alpha(trainer, generated):
    inputs = prepared_inputs(trainer, student_generated=generated)
    with composed(trainer, {"rlhf": {"gkd_logits_topk": 8}}, sft_alpha=0.3) as composer:
        assert composer.formula() == "Loss = 1*lm_jsd(beta=0.5, T=0.9, top8) + 0.3*ce"
        stock, ours = _losses(trainer, inputs, 8)
        logged = metric_values(trainer)
    assert stock > 0 and abs(ours - stock) < TOL
    mass = logged["llm_kd_loss_topk_mass"]
    assert 0.0 < mass <= 1.0 + 1e-6, "the teacher probability its top-8 covers"
    assert ("sft_loss" in logged) is (not generated), "ce skips student-generated batches, as ms-swift"


@pytest.mark.parametrize("mode", ["tail", "zero"])
def test_other_missing_mass_modes_train_and_differ_from_renorm(trainer, mode):
    inputs = prepared_inputs(trainer)
    beta = {"beta": 0.0} if mode == "zero" else {}
    terms = {"lm_jsd": {"topk": 8, "missing_mass": mode, **beta}}
    with composed(trainer, {"rlhf": {"loss_terms": terms}}):
        stock, ours = _losses(trainer, inputs, 8)
    assert ours > 0 and abs(ours - stock) > 1e-4, "a different objective than ms-swift's renorm"


def test_swift_rlhf_and_kdcompose_train_log_the_same_losses_with_gkd_logits_topk(tmp_path):
    """A stock ms-swift config with `gkd_logits_topk: 8` (no kdcompose field): ms-swift's own
    trainer (`swift rlhf`) and `kdcompose train` log the same loss at every step."""
    ours_dir, stock_dir = tmp_path / "ours", tmp_path / "stock"
    config = write_config(
        tmp_path / "cfg.yaml", sections(ours_dir, rlhf={"gkd_logits_topk": 8, "sft_alpha": 0.2})
    )
    result = run_command(kdcompose_command("train", str(config)), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Loss = 1*lm_jsd(beta=0.5, T=0.9, top8) + 0.2*ce" in result.stdout
    flat = swift_args(stock_dir, gkd_logits_topk=8, sft_alpha=0.2)
    (tmp_path / "stock.yaml").write_text(yaml.safe_dump(flat, sort_keys=False))
    stock = run_command(swift_command(str(tmp_path / "stock.yaml")), tmp_path)
    assert stock.returncode == 0, stock.stderr[-4000:]
    ours, theirs = step_logs(ours_dir), step_logs(stock_dir)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL)
        assert a["loss"] == pytest.approx(a["llm_kd_loss"] + a["sft_loss"], rel=1e-4)
