"""Cross-entropy and feature distances against independent formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kdcompose.functional import feature_distance, masked_cross_entropy


@st.composite
def logits_and_labels(draw):
    batch, seq, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen) * draw(st.floats(0.1, 5))
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.rand(batch, seq, generator=gen) < draw(st.floats(0, 1))
    labels[mask] = -100
    return logits, labels


@given(logits_and_labels())
def test_ce_equals_torch_cross_entropy_with_ignore_index(data):
    logits, labels = data
    if (labels != -100).any():
        expected = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(masked_cross_entropy(logits, labels), expected)
    else:
        value = masked_cross_entropy(logits.requires_grad_(), labels)
        assert value.item() == 0.0
        value.backward()
        assert torch.count_nonzero(logits.grad) == 0


def test_ce_float64_example():
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, -100]])
    row = logits[0, 0].double()
    expected = -(row[0] - torch.logsumexp(row, 0))
    torch.testing.assert_close(masked_cross_entropy(logits, labels).double(), expected, rtol=1e-6, atol=1e-7)


def test_ce_bf16_logits_are_upcast():
    logits = torch.randn(2, 4, 7).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 4))
    value = masked_cross_entropy(logits, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, F.cross_entropy(logits.float().reshape(-1, 7), labels.reshape(-1)))


features = st.builds(
    lambda seed, rows, width: (
        torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)),
        torch.randn(rows, width, generator=torch.Generator().manual_seed(seed + 1)),
    ),
    st.integers(0, 2**16),
    st.integers(1, 6),
    st.integers(1, 8),
)


@given(features)
def test_feature_distances_match_independent_formulas(pair):
    s, t = pair
    s64, t64 = s.double(), t.double()
    mse = ((s64 - t64) ** 2).mean()
    cos = 1 - (s64 * t64).sum(-1) / (s64.norm(dim=-1).clamp_min(1e-8) * t64.norm(dim=-1).clamp_min(1e-8))
    diff = (s64 - t64).abs()
    huber = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    torch.testing.assert_close(feature_distance(s, t, "mse").double(), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feature_distance(s, t, "cosine").double(), cos.mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feature_distance(s, t, "smooth_l1").double(), huber, rtol=1e-5, atol=1e-6)


@given(features, st.sampled_from(["mse", "cosine", "smooth_l1"]))
def test_feature_distance_is_zero_on_identical_features_and_teacher_gets_no_grad(pair, distance):
    s, _ = pair
    student = s.clone().requires_grad_()
    teacher = s.clone().requires_grad_()
    value = feature_distance(student, teacher, distance)
    assert abs(value.item()) < 1e-5
    value.backward()
    assert teacher.grad is None


def test_width_mismatch_error_points_to_the_projector():
    with pytest.raises(ValueError, match="projector"):
        feature_distance(torch.zeros(4, 32), torch.zeros(4, 48))


def test_unknown_distance_is_named():
    with pytest.raises(ValueError, match="unknown feature distance 'l2'"):
        feature_distance(torch.zeros(2, 2), torch.zeros(2, 2), "l2")
