"""Align teacher and student LM-head logits whose vocabularies differ only by padding.

Why: model families pad their embedding / LM-head rows to a round number, and not always
the same one — Qwen2.5-VL-3B has 151936 rows, Qwen2.5-VL-7B 152064 — while both use the
same tokenizer (151665 real tokens). The extra rows are ids no tokenizer ever produces, so
the distributions can be compared once both sides have the same width. ms-swift's
`gkd_loss._align_vocab` does this by widening the smaller side and copying the larger
side's logits into the new columns (the two models then agree exactly on those ids);
`align_vocab` does the same, so the JSD keeps the value ms-swift computes.

What counts as "only padding" (anything else is a `VocabMismatchError`, never a silent
truncation): with the tokenizer's size known (`vocab_size`, e.g. `len(tokenizer)`), the
smaller side must cover every real token (`min(Vs, Vt) >= vocab_size`); without it, the two
widths may differ by at most `max_padding` columns (default `DEFAULT_MAX_PADDING` = 1024,
far above the 64-256 rows real checkpoints pad by and far below any real vocabulary
difference). Pure tensor code: no trainer, no ms-swift.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_PADDING = 1024
"""Largest width difference accepted as padding when the tokenizer's size is unknown."""


class VocabMismatchError(ValueError):
    """Teacher and student logits cover different vocabularies, not just different padding."""


def check_vocab_compatible(
    student_vocab: int,
    teacher_vocab: int,
    *,
    vocab_size: int | None = None,
    max_padding: int = DEFAULT_MAX_PADDING,
) -> None:
    """Raise `VocabMismatchError` unless the two widths differ only by padding (see module doc)."""
    if student_vocab == teacher_vocab:
        return
    smaller = min(student_vocab, teacher_vocab)
    advice = (
        "LM-head distillation compares the two distributions id by id, so teacher and student must share "
        "a tokenizer: use a teacher of the same model family, or turn LM-head KD off "
        "(rlhf.llm_kd_weight: 0) and distil features only"
    )
    if vocab_size is not None:
        if smaller < vocab_size:
            raise VocabMismatchError(
                f"student logits have {student_vocab} entries and teacher logits {teacher_vocab}, but the "
                f"tokenizer has {vocab_size} tokens: the smaller side does not cover the tokenizer, so the "
                f"vocabularies differ beyond padding. {advice}"
            )
        return
    if abs(student_vocab - teacher_vocab) > max_padding:
        raise VocabMismatchError(
            f"student logits have {student_vocab} entries and teacher logits {teacher_vocab}: a difference "
            f"of {abs(student_vocab - teacher_vocab)} is more than padding (at most {max_padding} columns "
            f"are accepted when the tokenizer size is unknown; pass vocab_size=len(tokenizer) to decide "
            f"by the tokenizer instead). {advice}"
        )


def align_vocab(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    vocab_size: int | None = None,
    max_padding: int = DEFAULT_MAX_PADDING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(student, teacher)` logits of equal width `[..., max(Vs, Vt)]`.

    Equal widths are returned as they are (no copy). Otherwise the narrower tensor is widened
    and its new columns are the wider tensor's logits for those ids, detached (as in ms-swift
    4.6; there the teacher-side copy could carry gradient into the student's padding columns,
    here the teacher side never carries gradient). Leading shapes must match.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same leading shape (one row per position)"
        )
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    check_vocab_compatible(student_vocab, teacher_vocab, vocab_size=vocab_size, max_padding=max_padding)
    if student_vocab == teacher_vocab:
        return student_logits, teacher_logits
    if student_vocab < teacher_vocab:
        return _widen(student_logits, teacher_logits), teacher_logits
    return student_logits, _widen(teacher_logits, student_logits)


def _widen(narrow: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    width = narrow.shape[-1]
    extra = wide[..., width:].detach().to(narrow.dtype)
    # cat keeps the narrow side's graph (the student's, when it is the narrow one).
    return torch.cat([narrow, extra], dim=-1)


def align_labelled_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(student, teacher, labels)` ready for a per-token divergence. Equal widths: returned as
    they are. Widths that differ by padding: only the labelled rows of both (`labels !=
    ignore_index`), widened to one width by `align_vocab`, with their labels -- as ms-swift
    aligns them, and without widening the rows no loss is taken on."""
    if student_logits.shape[-1] == teacher_logits.shape[-1]:
        return student_logits, teacher_logits, labels
    mask = labels != ignore_index
    student_rows, teacher_rows = align_vocab(
        student_logits[mask], teacher_logits[mask], vocab_size=vocab_size
    )
    return student_rows, teacher_rows, labels[mask]
