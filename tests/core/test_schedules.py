"""Weight schedules: a multiplier of the configured weight, a pure function of the step.

The reference multiplier below is written independently of kdcompose.schedules (numpy's
`interp` for the ramp), so these tests pin the documented formula, not the code's own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from helpers import config_error
from hypothesis import given
from hypothesis import strategies as st

from kdcompose import LossComposer, LossContext, LossTerm, TermNeeds, TermSpec, build_composer, parse_config
from kdcompose.functional import masked_cross_entropy
from kdcompose.schedules import ScheduleSpec, multiplier
from kdcompose.terms import CeSpec, CeTerm

# --------------------------------------------------------------------------------------------
# Reference formula (docs/schedules.md) and strategies
# --------------------------------------------------------------------------------------------


def reference_multiplier(s: dict[str, Any], step: int) -> float:
    start, end, warmup = float(s["start"]), float(s["end"]), s.get("warmup_steps", 0)
    if s["kind"] == "constant":
        return start if step < warmup else end
    x = float(np.interp(step, [warmup, warmup + s["total_steps"]], [0.0, 1.0]))
    if x in (0.0, 1.0):  # the ends are held exactly: `end: 0` must really switch the term off
        return start if x == 0.0 else end
    if s["kind"] == "cosine":
        x = 0.5 - 0.5 * math.cos(math.pi * x)
    return start + (end - start) * x


multipliers = st.one_of(
    st.just(0.0),
    st.just(1.0),
    st.floats(min_value=0.0, max_value=10.0, allow_subnormal=False),
    st.integers(min_value=0, max_value=5),
)
steps = st.integers(min_value=0, max_value=400)


@st.composite
def schedule_dicts(draw, kinds=("constant", "linear", "cosine")) -> dict[str, Any]:
    kind = draw(st.sampled_from(kinds))
    out: dict[str, Any] = {"kind": kind, "start": draw(multipliers), "end": draw(multipliers)}
    warmup = draw(st.integers(min_value=0, max_value=60))
    if warmup or draw(st.booleans()):
        out["warmup_steps"] = warmup
    if kind == "constant" and warmup == 0:
        out["end"] = out["start"]  # otherwise `start` is never used: rejected (tested below)
    if out["start"] == 0 and out["end"] == 0:  # 0 at every step: rejected (tested below)
        out["end"] = 1.0
        if kind == "constant" and warmup == 0:
            out["start"] = 1.0
    if kind != "constant":
        out["total_steps"] = draw(st.integers(min_value=1, max_value=200))
    return out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --------------------------------------------------------------------------------------------
# The multiplier itself
# --------------------------------------------------------------------------------------------


@given(s=schedule_dicts(), step=steps)
def test_multiplier_follows_the_documented_formula(s, step):
    assert close(multiplier(ScheduleSpec.model_validate(s), step), reference_multiplier(s, step))


@given(s=schedule_dicts(), step=steps)
def test_multiplier_is_bounded_by_start_and_end(s, step):
    value = multiplier(ScheduleSpec.model_validate(s), step)
    assert min(s["start"], s["end"]) <= value <= max(s["start"], s["end"])


@given(s=schedule_dicts(), a=steps, b=steps)
def test_multiplier_is_monotone_from_start_towards_end(s, a, b):
    spec = ScheduleSpec.model_validate(s)
    lo, hi = sorted((a, b))
    m_lo, m_hi = multiplier(spec, lo), multiplier(spec, hi)
    if s["end"] >= s["start"]:
        assert m_lo <= m_hi
    else:
        assert m_lo >= m_hi


@given(s=schedule_dicts(), extra=st.integers(min_value=0, max_value=10_000))
def test_multiplier_holds_start_before_and_end_after_the_ramp(s, extra):
    spec = ScheduleSpec.model_validate(s)
    warmup = s.get("warmup_steps", 0)
    ramp_end = warmup + s.get("total_steps", 0)
    assert multiplier(spec, ramp_end + extra) == s["end"]  # exactly, so end 0 really switches off
    for step in range(max(0, warmup - 3), warmup):
        assert multiplier(spec, step) == s["start"]
    if s["kind"] != "constant":
        assert multiplier(spec, warmup) == s["start"]


def test_linear_and_cosine_midpoints_and_cosine_shape():
    lin = ScheduleSpec(kind="linear", start=1.0, end=0.0, total_steps=100, warmup_steps=10)
    cos = ScheduleSpec(kind="cosine", start=1.0, end=0.0, total_steps=100, warmup_steps=10)
    assert multiplier(lin, 60) == pytest.approx(0.5)
    assert multiplier(cos, 60) == pytest.approx(0.5)
    # a cosine ramp leaves `start` more slowly than a linear one
    assert multiplier(cos, 20) == pytest.approx((1 + math.cos(math.pi * 0.1)) / 2)
    assert multiplier(cos, 20) > multiplier(lin, 20)
    switch = ScheduleSpec(kind="constant", start=0.0, end=2.0, warmup_steps=5)
    assert [multiplier(switch, k) for k in range(4, 7)] == [0.0, 2.0, 2.0]


# --------------------------------------------------------------------------------------------
# In the composer
# --------------------------------------------------------------------------------------------


class ExplodingTerm(LossTerm):
    """Raises when computed: proves a term was skipped. Needs the teacher."""

    @property
    def needs(self) -> TermNeeds:
        return TermNeeds(teacher_logits=True)

    def compute(self, ctx):
        raise AssertionError(f"{self.name} was computed at step {ctx.step}")


def _context(seed: int, step: int) -> LossContext:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (2, 4), generator=gen)
    labels[:, 0] = -100
    return LossContext(
        labels=labels,
        student_logits=torch.randn(2, 4, 7, generator=gen, requires_grad=True),
        teacher_logits=torch.randn(2, 4, 7, generator=gen),
        step=step,
    )


def _ce_composer(weight: float, schedule: dict[str, Any] | None, log_raw: bool = False) -> LossComposer:
    ce = {"weight": weight, "schedule": schedule, "log_raw": log_raw}
    # a second, unscheduled term (cheap: another ce instance) shows the schedule scales only its own term
    anchor = {"type": "ce", "weight": 1.0}
    config = parse_config({"rlhf": {"llm_kd_weight": 0, "loss_terms": {"ce": ce, "anchor": anchor}}})
    return build_composer(config.composition)


base_weights = st.one_of(st.floats(min_value=1e-3, max_value=100.0), st.integers(min_value=1, max_value=10))


@given(weight=base_weights, s=schedule_dicts(), step=steps, seed=st.integers(0, 1000))
def test_effective_weight_is_base_weight_times_multiplier(weight, s, step, seed):
    ctx = _context(seed, step)
    out = _ce_composer(weight, s)(ctx)
    metrics = out.metrics()
    expected_weight = weight * reference_multiplier(s, step)
    if expected_weight == 0:
        assert "sft_loss" not in metrics and "sft_loss_weight" not in metrics
        assert [r.name for r in out.terms] == ["anchor"]
        return
    raw = masked_cross_entropy(ctx.student_logits, ctx.labels).detach()
    assert close(next(r.weight for r in out.terms if r.name == "ce"), expected_weight)
    assert metrics["sft_loss_weight"].item() == pytest.approx(expected_weight, rel=1e-6)  # logged in fp32
    torch.testing.assert_close(metrics["sft_loss"], expected_weight * raw, rtol=1e-6, atol=1e-7)
    # the weighted metrics still add up to the total; `_weight` is not a loss
    torch.testing.assert_close(metrics["anchor_loss"], raw)
    summed = metrics["anchor_loss"] + metrics["sft_loss"]
    torch.testing.assert_close(summed, out.total.detach())
    # no schedule on anchor: no `_weight` for it
    assert "anchor_loss_weight" not in metrics


@given(weight=base_weights, s=schedule_dicts(), n=st.integers(min_value=1, max_value=25), data=st.data())
def test_resume_fresh_composer_at_step_k_equals_uninterrupted_run(weight, s, n, data):
    uninterrupted = _ce_composer(weight, s)
    history = []
    for step in range(n):
        for _micro_batch in range(2):  # gradient accumulation: several calls share a step
            history.append((step, uninterrupted(_context(step, step)).metrics()))
    k = data.draw(st.integers(min_value=0, max_value=n - 1))
    resumed = _ce_composer(weight, s)(_context(k, k)).metrics()
    for step, metrics in history:
        if step == k:
            assert metrics.keys() == resumed.keys()
            for key in metrics:
                torch.testing.assert_close(metrics[key], resumed[key])


@given(s=schedule_dicts(), step=steps)
def test_term_at_effective_weight_zero_is_not_computed_and_logs_nothing(s, step):
    composer = LossComposer(
        [CeTerm("ce", CeSpec(weight=1.0)), ExplodingTerm("boom", TermSpec(weight=2.0, schedule=s))]
    )
    assert composer.needs.teacher_logits  # may run at some step: the teacher stays needed
    ctx = _context(0, step)
    if reference_multiplier(s, step) == 0:
        out = composer(ctx)
        assert not any(key.startswith("boom") for key in out.metrics())
        assert composer.needs_at(step).teacher_logits is False
        assert composer.weights_at(step)["boom"] == 0
    else:
        with pytest.raises(AssertionError, match="boom was computed"):
            composer(ctx)
        assert composer.needs_at(step).teacher_logits is True


def test_switched_off_until_warmup_then_on():
    s = {"kind": "constant", "start": 0, "end": 1, "warmup_steps": 3}
    boom = ExplodingTerm("boom", TermSpec(weight=0.5, schedule=s))
    composer = LossComposer([CeTerm("ce", CeSpec(weight=1.0)), boom])
    for step in range(3):
        assert set(composer(_context(step, step)).metrics()) == {"sft_loss"}
    with pytest.raises(AssertionError, match="step 3"):
        composer(_context(3, 3))


@given(s=schedule_dicts())
def test_base_weight_zero_stays_inactive_whatever_the_schedule(s):
    boom = ExplodingTerm("boom", TermSpec(weight=0.0, schedule=s))
    composer = LossComposer([CeTerm("ce", CeSpec(weight=1.0)), boom])
    assert [t.name for t in composer.active_terms] == ["ce"]
    assert composer.needs.teacher is False
    for step in (0, 10, 1000):
        assert set(composer(_context(step, step)).metrics()) == {"sft_loss"}


def test_all_terms_scheduled_to_zero_gives_a_connected_zero():
    s = {"kind": "linear", "start": 0, "end": 1, "total_steps": 10}
    composer = LossComposer([CeTerm("ce", CeSpec(weight=1.0, schedule=s))])
    ctx = _context(0, 0)
    out = composer(ctx)
    assert out.metrics() == {} and out.total.item() == 0.0
    out.total.backward()  # DDP must still see a graph
    assert ctx.student_logits.grad is not None


@given(seed=st.integers(0, 1000), step=steps)
def test_log_raw_adds_the_unweighted_value(seed, step):
    s = {"kind": "cosine", "start": 2.0, "end": 0.5, "total_steps": 100}
    ctx = _context(seed, step)
    metrics = _ce_composer(0.3, s, log_raw=True)(ctx).metrics()
    raw = masked_cross_entropy(ctx.student_logits, ctx.labels).detach()
    torch.testing.assert_close(metrics["sft_loss_raw"], raw)
    expected = raw * 0.3 * reference_multiplier(s, step)
    torch.testing.assert_close(metrics["sft_loss"], expected, rtol=1e-6, atol=1e-7)
    assert "anchor_loss_raw" not in metrics


def test_parts_named_like_the_derived_metrics_are_rejected():
    from kdcompose import TermValue

    class Parted(ExplodingTerm):
        def compute(self, ctx):
            v = ctx.student_logits.sum()
            return TermValue(v, {"weight": v})

    with pytest.raises(ValueError, match="reserved"):
        LossComposer([Parted("p", TermSpec())])(_context(0, 0))


def test_visual_kd_weight_and_parts_follow_the_schedule():
    config = parse_config(
        {
            "rlhf": {
                "llm_kd_weight": 0,
                "loss_terms": {
                    "visual_kd": {
                        "weight": 0.5,
                        "aligner": {"weight": 2.0},
                        "schedule": {"kind": "linear", "start": 0.0, "end": 1.0, "total_steps": 4},
                    }
                },
            }
        }
    )
    composer = build_composer(config.composition)
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    dist = torch.mean((s - t) ** 2)
    for step, mult in ((0, 0.0), (1, 0.25), (4, 1.0)):
        pair = composer.term("visual_kd").pair("aligner")
        ctx = LossContext(taps={pair.student: [s], pair.teacher: [t]}, step=step)
        metrics = composer(ctx).metrics()
        if mult == 0:
            assert metrics == {}
            continue
        torch.testing.assert_close(metrics["vision_kd_loss"], 0.5 * mult * 2.0 * dist)
        torch.testing.assert_close(metrics["vision_kd_loss_aligner"], 0.5 * mult * 2.0 * dist)
        assert metrics["vision_kd_loss_weight"].item() == pytest.approx(0.5 * mult)


# --------------------------------------------------------------------------------------------
# Config: shape, errors with dotted paths, formula, round trip
# --------------------------------------------------------------------------------------------

CE = "rlhf.loss_terms.ce.schedule"
LINEAR = {"kind": "linear", "start": 1.0, "end": 0.0, "total_steps": 100}

bad_numbers = st.one_of(
    st.floats(max_value=-1e-9, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, True, False, "0.5", None, [1]]),
)
bad_step_counts = st.one_of(
    st.integers(max_value=-1), st.sampled_from([1.5, 2.0, "10", True, math.nan, None])
)


def _ce_config(schedule: Any, where: str = "ce") -> dict[str, Any]:
    if where == "custom":
        return {"rlhf": {"llm_kd_weight": 1}, "custom": {"visual_kd": {"aligner": {}, "schedule": schedule}}}
    return {"rlhf": {"loss_terms": {where: {"type": "ce", "weight": 0.5, "schedule": schedule}}}}


@given(field=st.sampled_from(["start", "end"]), value=bad_numbers)
def test_invalid_multiplier_is_rejected_at_its_path(field, value):
    error = config_error(_ce_config({**LINEAR, field: value}))
    assert error.paths == (f"{CE}.{field}",), str(error)


@given(field=st.sampled_from(["warmup_steps", "total_steps"]), value=bad_step_counts)
def test_invalid_step_count_is_rejected_at_its_path(field, value):
    if field == "warmup_steps" and value is None:
        value = -1
    error = config_error(_ce_config({**LINEAR, field: value}))
    assert error.paths == (f"{CE}.{field}",), str(error)


@pytest.mark.parametrize(
    ("schedule", "path", "message"),
    [
        ({**LINEAR, "kind": "exponential"}, f"{CE}.kind", "constant"),
        ({"kind": "cosine", "start": 1, "end": 0}, f"{CE}.total_steps", "required for kind cosine"),
        ({**LINEAR, "total_steps": 0}, f"{CE}.total_steps", ">= 1"),
        (
            {"kind": "constant", "start": 0, "end": 1, "warmup_steps": 5, "total_steps": 3},
            f"{CE}.total_steps",
            "not used by kind constant",
        ),
        ({"kind": "constant", "start": 0, "end": 1}, f"{CE}.end", "start` (0) is never used"),
        ({**LINEAR, "start": 0, "end": 0.0}, f"{CE}.end", "0 at every step"),
        ({"kind": "linear", "end": 0, "total_steps": 3}, f"{CE}.start", "required"),
        ({"start": 1, "end": 0, "total_steps": 3}, f"{CE}.kind", "required"),
        ({**LINEAR, "steps": 10}, f"{CE}.steps", "allowed keys here"),
        ("linear", CE, "dictionary"),
    ],
)
def test_invalid_schedule_shapes_name_the_offending_key(schedule, path, message):
    error = config_error(_ce_config(schedule))
    assert error.paths == (path,), str(error)
    assert message in str(error)


@pytest.mark.parametrize(
    ("where", "path"),
    [("aux", "rlhf.loss_terms.aux.schedule.end"), ("custom", "custom.visual_kd.schedule.end")],
)
def test_schedule_errors_carry_the_path_of_any_term(where, path):
    error = config_error(_ce_config({**LINEAR, "end": -1}, where=where))
    assert error.paths == (path,)


def test_log_raw_must_be_a_boolean():
    error = config_error({"rlhf": {"loss_terms": {"ce": {"log_raw": "yes"}}}})
    assert error.paths == ("rlhf.loss_terms.ce.log_raw",)


@given(s=schedule_dicts())
def test_schedule_round_trips_through_the_explicit_loss_terms_block(s):
    config = parse_config(_ce_config(s))
    again = parse_config({"rlhf": {"loss_terms": config.composition.to_loss_terms()}})
    assert again.composition == config.composition
    spec = again.composition.term("ce").spec.schedule
    for step in (0, 7, 99, 500):
        assert multiplier(spec, step) == multiplier(ScheduleSpec.model_validate(s), step)


def test_formula_shows_the_schedule():
    schedules = {
        "ce": {"weight": 0.5, "schedule": {"kind": "linear", "start": 1, "end": 0, "total_steps": 1000}},
        "lm_jsd": {
            "weight": 1,
            "beta": 0.5,
            "temperature": 1.0,
            "schedule": {"kind": "cosine", "start": 0, "end": 1, "total_steps": 50, "warmup_steps": 10},
        },
        "late": {
            "type": "ce",
            "weight": 0.1,
            "schedule": {"kind": "constant", "start": 0, "end": 1, "warmup_steps": 200},
        },
    }
    composer = build_composer(parse_config({"rlhf": {"loss_terms": schedules}}).composition)
    assert composer.formula() == (
        "Loss = 1*lm_jsd(beta=0.5)[cosine 0->1 over 50 after 10] + 0.5*ce[linear 1->0 over 1000]"
        " + 0.1*late[constant 0->1 after 200]"
    )
