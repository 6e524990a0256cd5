"""`kdcompose.functional.vocab`: aligning logits whose vocabularies differ only by padding."""

from __future__ import annotations

import pytest
import torch

from kdcompose.functional import generalized_jsd
from kdcompose.functional.vocab import (
    DEFAULT_MAX_PADDING,
    VocabMismatchError,
    align_vocab,
    check_vocab_compatible,
)


def _logits(*shape: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).requires_grad_(requires_grad)


def test_equal_widths_are_returned_untouched():
    s, t = _logits(2, 3, 10), _logits(2, 3, 10, seed=1)
    a, b = align_vocab(s, t)
    assert a is s and b is t


def test_narrow_student_is_widened_with_the_teachers_columns():
    s, t = _logits(4, 10, requires_grad=True), _logits(4, 13, seed=1)
    a, b = align_vocab(s, t)
    assert b is t and a.shape == (4, 13)
    assert torch.equal(a[:, :10], s.detach()) and torch.equal(a[:, 10:], t[:, 10:])
    a.sum().backward()
    assert torch.equal(s.grad, torch.ones_like(s))  # the student's own columns keep their graph


def test_narrow_teacher_is_widened_with_the_students_columns_detached():
    s, t = _logits(2, 5, 13, requires_grad=True), _logits(2, 5, 10, seed=1)
    a, b = align_vocab(s, t)
    assert a is s and b.shape == (2, 5, 13)
    assert torch.equal(b[..., :10], t) and torch.equal(b[..., 10:], s.detach()[..., 10:])
    assert not b.requires_grad  # the teacher side never carries gradient


def test_matches_ms_swift_align_vocab_and_its_jsd():
    """Same widened tensors as ms-swift 4.6's `_align_vocab`, hence the same JSD."""
    gkd_loss = pytest.importorskip("swift.rlhf_trainers.gkd_loss")
    s, t = _logits(6, 50), _logits(6, 57, seed=1)
    ours = align_vocab(s, t)
    theirs = gkd_loss._align_vocab(s.clone(), t.clone())
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    jsd = generalized_jsd(*ours, beta=0.5, temperature=0.9)
    total = gkd_loss.jsd_loss(theirs[0] / 0.9, theirs[1] / 0.9, beta=0.5)
    assert jsd.item() == pytest.approx(total.item() / 6, rel=1e-5)


def test_padding_is_judged_by_the_tokenizer_when_its_size_is_known():
    check_vocab_compatible(151936, 152064, vocab_size=151665)  # Qwen2.5-VL 3B vs 7B
    with pytest.raises(VocabMismatchError) as info:
        check_vocab_compatible(32000, 151936, vocab_size=151665)
    message = str(info.value)
    assert "32000" in message and "151936" in message and "151665" in message
    assert "rlhf.llm_kd_weight: 0" in message  # the way out is named


def test_without_a_tokenizer_size_a_bounded_difference_counts_as_padding():
    check_vocab_compatible(1000, 1000 + DEFAULT_MAX_PADDING)
    with pytest.raises(VocabMismatchError, match="vocab_size=len"):
        check_vocab_compatible(1000, 1001 + DEFAULT_MAX_PADDING)
    check_vocab_compatible(10, 5000, max_padding=5000)


def test_real_mismatch_is_an_error_not_a_truncation():
    with pytest.raises(VocabMismatchError):
        align_vocab(_logits(3, 10), _logits(3, 40), vocab_size=20)


def test_leading_shapes_must_agree():
    with pytest.raises(ValueError, match="same leading shape"):
        align_vocab(_logits(3, 10), _logits(4, 10))
