"""Feature projectors (`projector: linear` on a visual_kd target) without ms-swift.

The math and the config are checked on plain tensors; widths, attaching and saving on the
tiny Qwen-VL models built locally (random weights, `from_pretrained`, no training loop).
The training-loop side (optimizer, checkpoints, resume) is in test_visual_kd_training.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcompose import LossContext, build_composer, parse_config
from kdcompose.compat import ensure_torchvision_importable
from kdcompose.errors import ConfigError
from kdcompose.training.projectors import (
    FeatureWidthError,
    LinearProjector,
    projector_key,
)

ensure_torchvision_importable()

ALIGNER_PROJECTED = {"weight": 1.0, "aligner": {"distance": "mse", "projector": "linear"}}


def _visual_term(spec: dict, where: str = "loss_terms"):
    data = {"rlhf": {"llm_kd_weight": 0}}
    if where == "legacy":
        data["custom"] = {"visual_kd": spec}
    else:
        data["rlhf"]["loss_terms"] = {"visual_kd": spec}
    composer = build_composer(parse_config(data).composition)
    return composer, composer.term("visual_kd")


def _recorded(term, **targets):
    """`LossContext.taps` holding, for each target, its student and teacher tensors."""
    taps = {}
    for name, (student, teacher) in targets.items():
        pair = term.pair(name)
        taps[pair.student], taps[pair.teacher] = [student], [teacher]
    return taps


# ----------------------------------------------------------------------- the projector itself


def test_linear_projector_starts_as_the_identity_and_draws_no_random_numbers():
    state = torch.random.get_rng_state()
    wide = LinearProjector(3, 5)
    square = LinearProjector(4, 4)
    assert torch.equal(torch.random.get_rng_state(), state), "a projector must not shift the RNG stream"
    x = torch.arange(12.0).reshape(4, 3)
    torch.testing.assert_close(wide(x), torch.cat([x, torch.zeros(4, 2)], dim=1))
    y = torch.randn(2, 4)
    torch.testing.assert_close(square(y), y)


def test_projector_computes_in_its_own_dtype():
    projector = LinearProjector(4, 6)
    out = projector(torch.randn(3, 4).to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (3, 6)


# ----------------------------------------------------------------------- the term


def test_visual_kd_compares_the_projected_student_and_trains_the_projector():
    composer, term = _visual_term(ALIGNER_PROJECTED)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=gen, requires_grad=True)
    teacher = torch.randn(5, 6, generator=gen)
    projector = LinearProjector(4, 6)
    with torch.no_grad():
        projector.weight.add_(0.1 * torch.randn(6, 4, generator=gen))
    ctx = LossContext(
        taps=_recorded(term, aligner=(student, teacher)),
        has_images=True,
        projectors={projector_key("visual_kd", "aligner"): projector},
    )
    out = composer(ctx)
    expected = F.mse_loss(projector(student), teacher)
    torch.testing.assert_close(out.total, expected)
    assert set(out.metrics()) == {"vision_kd_loss", "vision_kd_loss_aligner"}
    out.total.backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("where", "option"),
    [
        ("loss_terms", "rlhf.loss_terms.visual_kd.aligner.projector"),
        ("legacy", "custom.visual_kd.aligner.projector"),
    ],
)
def test_width_mismatch_without_projector_names_the_module_both_widths_and_the_option_as_written(
    where, option
):
    _, term = _visual_term({"weight": 1.0, "aligner": {"distance": "mse"}}, where)
    ctx = LossContext(taps=_recorded(term, aligner=(torch.zeros(5, 64), torch.zeros(5, 96))), has_images=True)
    with pytest.raises(FeatureWidthError) as info:
        term.compute(ctx)
    message = str(info.value)
    for needle in ("model.visual.merger", "64", "96", option):
        assert needle in message


def test_a_configured_projector_missing_from_the_context_is_an_error():
    _, term = _visual_term(ALIGNER_PROJECTED)
    ctx = LossContext(taps=_recorded(term, aligner=(torch.zeros(5, 4), torch.zeros(5, 6))), has_images=True)
    with pytest.raises(ValueError, match=r"projector: linear.*kdcompose\.Distiller"):
        term.compute(ctx)


# ----------------------------------------------------------------------- the config


@pytest.mark.parametrize("where", ["loss_terms", "legacy"])
def test_projector_option_is_accepted_shown_in_the_formula_and_round_trips(where):
    if where == "legacy":
        data = {"rlhf": {"llm_kd_weight": 0}, "custom": {"visual_kd": ALIGNER_PROJECTED}}
    else:
        data = {"rlhf": {"llm_kd_weight": 0, "loss_terms": {"visual_kd": ALIGNER_PROJECTED}}}
    composition = parse_config(data).composition
    assert composition.term("visual_kd").spec.aligner.projector == "linear"
    formula = build_composer(composition).formula()
    assert formula == "Loss = 1*visual_kd(aligner:mse+linear_projector)"
    again = parse_config({"rlhf": {"loss_terms": composition.to_loss_terms()}}).composition
    assert again.term("visual_kd").spec == composition.term("visual_kd").spec


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (
            {"rlhf": {"loss_terms": {"visual_kd": {"aligner": {"projector": "mlp"}}}}},
            "rlhf.loss_terms.visual_kd.aligner.projector",
        ),
        ({"custom": {"visual_kd": {"vit": {"projector": True}}}}, "custom.visual_kd.vit.projector"),
    ],
)
def test_an_unknown_projector_is_rejected_with_its_path(data, path):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert path in info.value.paths


# ----------------------------------------------------------------------- widths from the tiny models


# ----------------------------------------------------------------------- attaching and saving


# ----------------------------------------------------------------------- recorder lifecycle
