"""The top-k `lm_jsd` term on hand-made contexts: a handed-over top-K (cache / server) gives the
same value fused and unfused, equals the local teacher's top-K, and a named teacher that handed
over nothing is an error naming the term."""

from __future__ import annotations

import pytest
import torch

from kdcompose import LossContext, build_composer, parse_config
from kdcompose.functional import teacher_topk

V, H, N, K = 40, 6, 5, 8


def _term(**spec):
    data = {"rlhf": {"loss_terms": {"lm_jsd": {"topk": K, "temperature": 1.0, **spec}}}}
    return build_composer(parse_config(data).composition).term("lm_jsd")


def _case():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(1, N, H, generator=gen)
    teacher_logits = torch.randn(1, N, V, generator=gen)
    labels = torch.tensor([[-100, 3, 4, -100, 7]])
    return head, hidden, teacher_logits, labels


def test_a_given_topk_gives_the_same_value_fused_and_unfused_and_as_the_local_teacher():
    head, hidden, teacher_logits, labels = _case()
    given = {"": teacher_topk(teacher_logits, K)}
    unfused = _term().compute(LossContext(student_logits=head(hidden), labels=labels, teacher_topk=given))
    fused = _term(fused=True).compute(
        LossContext(student_hidden=hidden, student_lm_head=head, labels=labels, teacher_topk=given)
    )
    local = _term().compute(
        LossContext(student_logits=head(hidden), teacher_logits=teacher_logits, labels=labels)
    )
    torch.testing.assert_close(fused.value, unfused.value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local.value, unfused.value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.stats["topk_mass"], unfused.stats["topk_mass"])
    assert 0 < unfused.stats["topk_mass"].item() < 1


def test_a_named_teacher_that_handed_over_nothing_is_an_error():
    data = {
        "rlhf": {
            "teachers": {"math": {"cache": "/data/math"}},
            "loss_terms": {"lm_math": {"type": "lm_jsd", "teacher": "math", "topk": K}},
        }
    }
    term = build_composer(parse_config(data).composition).term("lm_math")
    head, hidden, _, labels = _case()
    with pytest.raises(ValueError, match=r"rlhf\.loss_terms\.lm_math: teacher 'math' handed over no top-K"):
        term.compute(LossContext(student_logits=head(hidden), labels=labels))
