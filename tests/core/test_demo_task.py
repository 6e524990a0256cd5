"""The demo's task, metric, table and configs, without training anything.

The caption parser and the attribute score decide the demo's headline number, so they are
checked on hand-written captions; the printed table keeps the shape the docs show; the two
student configs differ only in their loss terms. (That the demo's own encoder equals ms-swift's
template encoding is checked in tests/swift/test_demo.py, which has ms-swift loaded.)
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from kdcompose import parse_config
from kdcompose.demo import DEFAULT_SEED, demo_config_text, format_table
from kdcompose.testing.caption_task import (
    ATTRIBUTES,
    TaskSpec,
    attributes_of,
    attributes_right,
    parse_caption,
    task_samples,
)
from kdcompose.testing.datasets import ShapeSample


def _sample(**changes) -> ShapeSample:
    base = ShapeSample(84, 84, "red", "square", "large", "top left", "white")
    return dataclasses.replace(base, **changes)


def test_a_template_caption_is_read_slot_by_slot():
    said = parse_caption("a large red square in the top left on a white background.")
    assert said == {
        "size": "large",
        "color": "red",
        "shape": "square",
        "position": "top left",
        "background": "white",
    }
    assert parse_caption("A small blue circle in the center on a gray background")["position"] == "center"


@pytest.mark.parametrize(
    ("caption", "right"),
    [
        ("a large red square in the top left on a white background.", 5),
        ("a small red square in the top left on a white background.", 4),
        ("a large red circle in the bottom right on a black background.", 2),
        ("a large red background.", 0),  # off the template: no slot can be trusted
        ("a large pink diamond in the top left on a white background.", 3),
        ("a huge red square in the top left on a white background.", 4),  # not a size word: wrong
    ],
)
def test_attributes_right_counts_each_slot(caption, right):
    assert attributes_right([caption], [_sample()]) == pytest.approx(right / len(ATTRIBUTES))


def test_attributes_right_averages_over_samples_and_refuses_a_length_mismatch():
    samples = [_sample(), _sample(color="blue")]
    captions = ["a large red square in the top left on a white background."] * 2
    assert attributes_right(captions, samples) == pytest.approx(9 / 10)
    with pytest.raises(ValueError, match="one caption per sample"):
        attributes_right(captions[:1], samples)


def test_task_samples_are_deterministic_distinct_pictures_with_true_captions():
    spec = TaskSpec()
    a, b = task_samples(spec, 50, 3), task_samples(spec, 50, 3)
    assert a == b
    assert all(s.width == s.height == spec.image_side for s in a)
    assert len({(s.offset, s.scale, s.tint, s.caption) for s in a}) == 50, "jitter makes pictures unique"
    for s in a:
        assert parse_caption(s.caption) == attributes_of(s)
    assert task_samples(spec, 50, 4) != a


def test_the_table_has_the_documented_shape():
    scores = {
        "teacher": {"attributes_right": 0.971, "token_accuracy": 0.99},
        "student_ce_only": {"attributes_right": 0.41, "token_accuracy": 0.72},
        "student_distilled": {"attributes_right": 0.78, "token_accuracy": 0.904},
    }
    assert format_table(scores).splitlines() == [
        "                      attributes right   token accuracy",
        "teacher                     0.97             0.99",
        "student, ce only            0.41             0.72",
        "student, distilled          0.78             0.90",
    ]
    quick = format_table({**scores, "student_ce_only": None}).splitlines()
    assert quick[2] == "student, ce only            (not run: --quick)"


def test_the_two_student_configs_differ_only_in_their_loss_terms(tmp_path):
    args = (tmp_path / "t", tmp_path / "s", tmp_path / "d.jsonl", tmp_path / "o", 40)
    distilled = yaml.safe_load(demo_config_text(*args, distilled=True))
    control = yaml.safe_load(demo_config_text(*args, distilled=False))
    terms = (distilled["rlhf"].pop("loss_terms"), control["rlhf"].pop("loss_terms"))
    assert distilled["training"].pop("output_dir") != control["training"].pop("output_dir")
    assert distilled == control
    assert distilled["training"]["seed"] == DEFAULT_SEED
    assert distilled["training"]["eval_strategy"] == "no"  # quoted: a bare `no` would be YAML false
    assert set(terms[0]) == {"lm_jsd", "ce", "visual_kd"}
    parsed = parse_config(yaml.safe_load(demo_config_text(*args, distilled=False)))
    assert [t.name for t in parsed.composition.terms if t.weight > 0] == ["ce"]
    parsed = parse_config(yaml.safe_load(demo_config_text(*args, distilled=True)))
    assert {t.name for t in parsed.composition.terms if t.weight > 0} == {"lm_jsd", "ce", "visual_kd"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_zero_row_head_gives_the_full_heads_logits_and_argmax(seed):
    """The evaluation's LM head skips the zero rows; its logits and greedy token must be the
    full head's, including the ties a zero row wins (every live logit negative, or all zero)."""
    import torch

    from kdcompose.testing.evaluation import argmax_ids, with_zero_row_head

    generator = torch.Generator().manual_seed(seed)
    vocab, width = 300, 8
    weight = torch.zeros(vocab, width, dtype=torch.float64)
    live = torch.randperm(vocab, generator=generator)[:40]
    weight[live] = torch.randn(40, width, generator=generator, dtype=torch.float64)
    weight[live, 0] = weight[live, 0].abs() + 0.1  # so that hidden (-1, 0, ...) makes every live logit < 0
    full = torch.nn.Linear(width, vocab, bias=False, dtype=torch.float64)
    full.weight.data = weight.clone()
    model = torch.nn.Module()
    model.lm_head = full
    head = with_zero_row_head(model).lm_head
    assert head is not full
    hidden = torch.randn(64, width, generator=generator, dtype=torch.float64)
    hidden[:4] = 0.0  # every logit 0: the smallest id wins
    hidden[8] = 0.0
    hidden[8, 0] = -1.0  # every live logit negative: the first zero row wins
    expected = hidden @ weight.T
    assert torch.allclose(head(hidden), expected, atol=1e-12)
    assert torch.equal(argmax_ids(head, hidden), expected.argmax(dim=-1))
    assert int(argmax_ids(head, hidden[8:9])) not in set(live.tolist())


def test_a_head_without_zero_rows_is_kept():
    import torch

    from kdcompose.testing.evaluation import with_zero_row_head

    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(4, 10, bias=False)
    assert with_zero_row_head(model).lm_head is model.lm_head
