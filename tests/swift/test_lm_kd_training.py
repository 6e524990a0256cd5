"""Every divergence trains through `kdcompose train` on the tiny models: one real ms-swift run whose
composition holds one `lm_kd` term per divergence (in several modes), many checks on its logs."""

from __future__ import annotations

import math

import pytest
from swift_support import sections, step_logs, train_as_user, write_config

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

TERMS = {
    "kd_jsd": {"type": "lm_kd", "divergence": {"kind": "jsd", "beta": 0.3}, "weight": 0.1},
    "kd_fkl": {"type": "lm_kd", "divergence": "fkl", "weight": 0.1, "fused": True},
    "kd_rkl": {"type": "lm_kd", "divergence": "rkl", "weight": 0.1, "topk": 8, "missing_mass": "tail"},
    "kd_skew_fkl": {"type": "lm_kd", "divergence": "skew_fkl", "weight": 0.1, "temperature": 2.0},
    "kd_skew_rkl": {"type": "lm_kd", "divergence": {"kind": "skew_rkl", "alpha": 0.2}, "weight": 0.1},
    "kd_tvd": {
        "type": "lm_kd",
        "divergence": "tvd",
        "weight": 0.1,
        "tokens": {"by": "divergence", "keep": 0.5},
    },
    "kd_akl": {"type": "lm_kd", "divergence": "akl", "weight": 0.1, "fused": True, "topk": 8},
    "kd_ab": {"type": "lm_kd", "divergence": {"kind": "ab", "alpha": 0.2, "beta": 0.7}, "weight": 0.1},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lm_kd")
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "cfg.yaml", sections(out, rlhf={"llm_kd_weight": 0, "loss_terms": TERMS}, max_steps=2)
    )
    result = train_as_user(config, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return result, step_logs(out)


def test_the_run_prints_every_divergence_in_its_formula(run):
    result, _ = run
    for words in (
        "0.1*kd_jsd(jsd beta=0.3, T=1)",
        "0.1*kd_fkl(fkl, T=1, fused)",
        "0.1*kd_rkl(rkl, T=1, top8 tail)",
        "0.1*kd_skew_fkl(skew_fkl a=0.1, T=2)",
        "0.1*kd_skew_rkl(skew_rkl a=0.2, T=1)",
        "0.1*kd_tvd(tvd, T=1, tokens high divergence 0.5)",
        "0.1*kd_akl(akl mu=0.5, T=1, fused, top8)",
        "0.1*kd_ab(ab a=0.2 b=0.7, T=1)",
    ):
        assert words in result.stdout


def test_every_divergence_logs_a_finite_nonnegative_metric_that_sums_to_the_loss(run):
    _, logs = run
    assert len(logs) == 2
    for row in logs:
        values = {name: row[f"{name}_loss"] for name in TERMS}
        assert all(math.isfinite(v) and v >= 0 for v in values.values()), values
        assert all(v > 0 for v in values.values()), "random tiny models disagree: every divergence is > 0"
        assert row["loss"] == pytest.approx(sum(values.values()), rel=1e-4)
        assert row["kd_tvd_loss_kept_frac"] == pytest.approx(0.5, abs=0.1)
        assert 0 < row["kd_rkl_loss_topk_mass"] <= 1 + 1e-6 and 0 < row["kd_akl_loss_topk_mass"] <= 1 + 1e-6
        assert "llm_kd_loss" not in row, "lm_jsd has weight 0: it computes and logs nothing"
