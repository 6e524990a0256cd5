"""`hidden_kd`: the term on tensors against an independent computation, its config, and real
ms-swift training of the tiny Qwen2-VL pair (student 64 wide, teacher 96) from YAML alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kdcompose import ConfigError, LossContext, build_composer, parse_config
from kdcompose.training.projectors import LinearProjector

LAYER_S, LAYER_T = "model.language_model.layers.1", "model.language_model.layers.2"


def _composer(**term):
    spec = {"weight": 0.5, "pairs": [{"student": LAYER_S, "teacher": LAYER_T}], **term}
    data = {"rlhf": {"llm_kd_weight": 0, "loss_terms": {"hidden_kd": spec}}}
    composer = build_composer(parse_config(data).composition)
    return composer, composer.term("hidden_kd")


def _reference(s, t, mask, distance):
    s, t = s[mask].double(), t[mask].double()
    if distance == "mse":
        return ((s - t) ** 2).mean()
    if distance == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    diff = (s - t).abs()
    return torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()


@given(
    distance=st.sampled_from(["mse", "cosine", "smooth_l1"]),
    positions=st.sampled_from(["labelled", "all"]),
    pair_weight=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**16),
)
def test_value_and_parts_equal_an_independent_computation(distance, positions, pair_weight, seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = [
        {"student": LAYER_S, "teacher": LAYER_T, "distance": distance, "weight": pair_weight},
        {"student": "model.language_model.layers.0", "teacher": "model.language_model.layers.0"},
    ]
    composer, term = _composer(pairs=pairs, positions=positions)
    labels = torch.randint(0, 9, (2, 6), generator=gen)
    labels[:, :2] = -100
    attention = torch.ones(2, 6, dtype=torch.long)
    attention[1, :1] = 0
    taps, tensors = {}, []
    for i in range(2):
        pair = term.pair(i)
        s = torch.randn(2, 6, 4, generator=gen, requires_grad=True)
        t = torch.randn(2, 6, 4, generator=gen)
        taps[pair.student], taps[pair.teacher] = [s], [t]
        tensors.append((s, t))
    ctx = LossContext(taps=taps, sequence_labels=labels, attention_mask=attention)
    out = composer(ctx)
    mask = labels != -100 if positions == "labelled" else attention.bool()
    first = pair_weight * _reference(*tensors[0], mask, distance)
    second = _reference(*tensors[1], mask, "mse")
    metrics = out.metrics()
    torch.testing.assert_close(metrics["hidden_kd_loss_0"].double(), 0.5 * first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["hidden_kd_loss_1"].double(), 0.5 * second, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        metrics["hidden_kd_loss"].double(), 0.5 * (first + second), rtol=1e-5, atol=1e-6
    )
    out.total.backward()
    assert tensors[0][0].grad is not None


def test_projector_maps_the_student_width_before_the_distance():
    composer, term = _composer(pairs=[{"student": LAYER_S, "teacher": LAYER_T, "projector": "linear"}])
    pair = term.pair(0)
    s, t = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 6)
    projector = LinearProjector(4, 6)
    ctx = LossContext(
        taps={pair.student: [s], pair.teacher: [t]},
        sequence_labels=torch.zeros(1, 3).long(),
        projectors={pair.key: projector},
    )
    out = composer(ctx)
    torch.testing.assert_close(out.total, 0.5 * F.mse_loss(projector(s.reshape(3, 4)), t.reshape(3, 6)))


def test_no_labelled_position_gives_a_connected_zero():
    composer, term = _composer()
    pair = term.pair(0)
    s = torch.randn(1, 3, 4, requires_grad=True)
    ctx = LossContext(
        taps={pair.student: [s], pair.teacher: [torch.randn(1, 3, 4)]},
        sequence_labels=torch.full((1, 3), -100),
    )
    out = composer(ctx)
    assert out.total.item() == 0.0 and out.total.requires_grad


def test_needs_declare_both_taps_with_their_yaml_paths_and_weight_zero_needs_nothing():
    _, term = _composer(pairs=[{"student": LAYER_S, "teacher": LAYER_T, "projector": "linear"}])
    (pair,) = term.needs.pairs
    assert (pair.student.side, pair.student.path) == ("student", LAYER_S)
    assert pair.student.origin == "rlhf.loss_terms.hidden_kd.pairs.0.student"
    assert pair.teacher.origin == "rlhf.loss_terms.hidden_kd.pairs.0.teacher"
    assert term.needs.teacher and term.needs.teacher_language_model
    data = {"rlhf": {"loss_terms": {"hidden_kd": {"weight": 0, "pairs": [{"student": "a", "teacher": "b"}]}}}}
    composer = build_composer(parse_config(data).composition)
    assert not composer.needs.all_taps, "a zero-weight term hooks nothing"


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"pairs": []}, "rlhf.loss_terms.hidden_kd.pairs"),
        (
            {"pairs": [{"student": "a", "teacher": "b", "distance": "l2"}]},
            "rlhf.loss_terms.hidden_kd.pairs.0.distance",
        ),
        ({"pairs": [{"student": "a"}]}, "rlhf.loss_terms.hidden_kd.pairs.0.teacher"),
        (
            {"pairs": [{"student": "a", "teacher": "b"}], "positions": "some"},
            "rlhf.loss_terms.hidden_kd.positions",
        ),
        (
            {"pairs": [{"student": "a", "teacher": "b"}], "normalize": "global_tokens"},
            "rlhf.loss_terms.hidden_kd.normalize",
        ),
    ],
)
def test_bad_settings_name_their_dotted_path(spec, path):
    with pytest.raises(ConfigError) as info:
        parse_config({"rlhf": {"loss_terms": {"hidden_kd": spec}}})
    assert path in info.value.paths


# ---------------------------------------------------------------------- real ms-swift training
