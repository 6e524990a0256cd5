"""The pure pieces behind the trainer loop: token normalization, metric windows, eval
weights, non-finite verdicts, resume records. No model, no ms-swift."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdcompose import build_composer, parse_config
from kdcompose.errors import ConfigError
from kdcompose.nonfinite import SKIP_STEP, TOTAL, error_message, nonfinite_flags, verdict
from kdcompose.normalization import step_token_denominator, token_normalized, valid_token_count
from kdcompose.training.metrics import TermWindow, eval_batch_weight, train_micro_batch_weight
from kdcompose.training.records import (
    composition_changes,
    loss_terms_of,
    read_checkpoint_state,
    read_loss_terms,
    write_checkpoint_state,
    write_composition,
)

# ----------------------------------------------------------------------- token normalization


@given(st.integers(1, 4), st.integers(1, 3), st.data())
def test_global_tokens_makes_the_step_a_token_mean_for_any_split(G, ranks, data):
    """Per-token values split into G micro-batches on each rank: after the trainer's 1/G and
    DDP's 1/R, the step is sum / N with global_tokens and the mean of micro-batch means without."""
    value = st.floats(0, 3, allow_nan=False)
    micro = st.lists(value, min_size=0, max_size=6)
    batches = data.draw(st.lists(st.lists(micro, min_size=G, max_size=G), min_size=ranks, max_size=ranks))
    N = sum(len(values) for rank in batches for values in rank)
    denominator = step_token_denominator(torch.tensor(N), ranks, G)
    step_global = step_micro = 0.0
    for rank in batches:
        for values in rank:
            labels = torch.tensor([1] * len(values) + [-100] * 2)
            mean = torch.tensor(sum(values) / len(values) if values else 0.0)
            step_global += token_normalized(mean, labels, "global_tokens", denominator).item() / G / ranks
            step_micro += token_normalized(mean, labels, "micro_batch", denominator).item() / G / ranks
    total = sum(sum(values) for rank in batches for values in rank)
    assert step_global == pytest.approx(total / max(N, 1), rel=1e-5, abs=1e-6)
    means = [sum(v) / len(v) if v else 0.0 for rank in batches for v in rank]
    assert step_micro == pytest.approx(sum(means) / len(means), rel=1e-5, abs=1e-6)


def test_global_tokens_scales_the_gradient_and_keeps_empty_batches_connected():
    logits = torch.randn(5, requires_grad=True)
    labels = torch.tensor([1, -100, 1, 1, -100])
    mean = logits[labels != -100].mean()
    out = token_normalized(mean, labels, "global_tokens", torch.tensor(6.0))
    out.backward()
    assert out.item() == pytest.approx(mean.item() * 3 / 6)
    assert logits.grad[labels != -100].tolist() == pytest.approx([0.5 / 3] * 3)
    assert valid_token_count(labels).item() == 3
    empty = token_normalized(logits.sum() * 0, torch.full((5,), -100), "global_tokens", torch.tensor(2.0))
    assert empty.item() == 0.0 and empty.requires_grad
    assert step_token_denominator(torch.tensor(0), 2, 2).item() == 0.25  # max(N, 1): never a 0 division
    assert token_normalized(mean, labels, "global_tokens", None) is mean  # no trainer: micro-batch mean
    with pytest.raises(ValueError, match="world_size"):
        step_token_denominator(torch.tensor(3), 0, 1)


def test_normalize_is_validated_and_shown_in_the_formula():
    config = parse_config(
        {
            "rlhf": {
                "loss_terms": {"lm_jsd": {"normalize": "global_tokens"}, "ce": {"normalize": "global_tokens"}}
            }
        }
    )
    assert (
        build_composer(config.composition).formula()
        == "Loss = 1*lm_jsd(beta=0.5, T=0.9, global_tokens) + 1*ce(global_tokens)"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"rlhf": {"loss_terms": {"lm_jsd": {"normalize": "tokens"}, "ce": {"on_nonfinite": "skip"}}}}
        )
    assert set(info.value.paths) == {"rlhf.loss_terms.lm_jsd.normalize", "rlhf.loss_terms.ce.on_nonfinite"}
    default = parse_config({}).composition.term("lm_jsd").spec
    assert (default.normalize, default.on_nonfinite) == ("micro_batch", "error")


# ----------------------------------------------------------------------- metric windows


def test_window_counts_a_term_that_did_not_run_as_zero_and_omits_one_that_never_ran():
    window = TermWindow()
    window.add({"a": torch.tensor(2.0), "b": torch.tensor(1.0)}, {"b_weight": 0.5}, 0.5)
    window.add({"a": torch.tensor(4.0)}, {}, 0.5)
    window.add({"a": torch.tensor(6.0)}, {"b_weight": 0.25}, 1.0)
    values = window.reduce("eval_")
    assert values == {
        "eval_a": pytest.approx((2 * 0.5 + 4 * 0.5 + 6) / 2),
        "eval_b": pytest.approx(1.0 * 0.5 / 2),
        "eval_b_weight": pytest.approx((0.5 * 0.5 + 0.25) / 1.5),  # over the micro-batches it ran on
    }
    assert window.reduce() == {} and window.weight == 0.0  # reduced: the next window starts empty


def test_window_weights_match_what_transformers_gives_the_loss():
    assert train_micro_batch_weight(4) == 0.25 and train_micro_batch_weight(0) == 1.0
    # 5 samples, batch 2, one process: the last batch keeps 1 of its 2 copies
    assert [eval_batch_weight(2, last=last, remainder=1, rank=0) for last in (False, False, True)] == [
        2,
        2,
        1,
    ]
    # 5 samples, batch 2, two ranks: the last step keeps 1 copy, all from rank 0
    assert [eval_batch_weight(2, last=True, remainder=1, rank=r) for r in (0, 1)] == [1, 0]
    assert [eval_batch_weight(2, last=True, remainder=3, rank=r) for r in (0, 1)] == [2, 1]
    assert eval_batch_weight(2, last=True, remainder=0, rank=1) == 2  # divisible: nothing dropped


# ----------------------------------------------------------------------- non-finite verdicts


def test_nonfinite_flags_and_verdicts():
    flags = nonfinite_flags([torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(-math.inf)])
    assert flags.tolist() == [[False, False], [True, False], [False, True]]
    names = ("a", "b", TOTAL)
    policies = {"a": SKIP_STEP, "b": "error"}
    assert verdict([(False, False)] * 3, names, policies).ok
    only_a = verdict([(True, False), (False, False), (True, False)], names, policies)
    assert only_a.skip and dict(only_a.offending) == {"a": ("NaN",), TOTAL: ("NaN",)}
    assert verdict([(False, False), (False, True), (False, True)], names, policies).error
    overflow = verdict([(False, False), (False, False), (False, True)], names, policies)
    assert overflow.error  # the sum overflowed: skip only if every term may skip
    assert verdict(
        [(False, False), (False, False), (False, True)], names, {"a": SKIP_STEP, "b": SKIP_STEP}
    ).skip


def test_error_message_names_the_term_the_metric_and_the_step():
    message = error_message({"lm_jsd": ("NaN",)}, 6, metric_keys={"lm_jsd": "llm_kd_loss"})
    assert "term 'lm_jsd' (llm_kd_loss): NaN" in message
    assert "optimizer step 7 (global_step 6" in message and "not applied" in message
    assert "during evaluation at global_step 4" in error_message({"x": ("inf",)}, 4, mode="eval")


# ----------------------------------------------------------------------- resume records


def test_composition_record_round_trip_and_changes(tmp_path):
    composer = build_composer(parse_config({"rlhf": {"llm_kd_weight": 0.5, "sft_alpha": 0.1}}).composition)
    write_composition(tmp_path, composer)
    saved = read_loss_terms(tmp_path)
    assert saved == loss_terms_of(composer)
    changed = dict(saved, ce={**saved["ce"], "weight": 0.2})
    assert composition_changes(saved, changed) == ["ce.weight: 0.1 -> 0.2"]
    assert composition_changes(saved, {"lm_jsd": saved["lm_jsd"]}) == ["term 'ce' removed"]
    assert read_loss_terms(tmp_path / "missing") is None
    assert write_checkpoint_state(tmp_path / "missing", {"x": 1}) is None
    write_checkpoint_state(tmp_path, {"nonfinite_skipped_steps": 2})
    assert read_checkpoint_state(tmp_path) == {"nonfinite_skipped_steps": 2}
    assert read_checkpoint_state(None) == {}
