"""From one micro-batch's forwards to the `LossContext` the terms read: the one place where
labels are shifted, trimmed positions are matched and recordings are handed over.

Every trainer (ms-swift's, a plain PyTorch loop through `Distiller`) runs its models its own
way, then describes what came out as one `ForwardCapture` per side and calls `build_context`.
So the label roll, `logits_to_keep` trimming of a teacher's top-K and what a term may read are
written once, and a term sees the same context whichever loop ran it.

Conventions (ms-swift's, kept so the composition is ms-swift's GKD loss exactly):

* labels come as Hugging Face causal LMs take them: the shape of `input_ids`, `-100` where no
  loss is taken, *unshifted*. `shift_labels` aligns them with the logits: position `i` predicts
  token `i + 1`, and the last position predicts nothing.
* a forward may keep only the last positions' logits (ms-swift's `logits_to_keep`, an integer
  count or a boolean mask of a single-row batch); the labels passed are then the trimmed ones
  (as ms-swift trims them), while `sequence_labels` are the whole sequence's, for terms reading
  module taps, which always see every position.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdcompose.defaults import IGNORE_INDEX
from kdcompose.terms.base import AlignedTeacher, LossContext, Tap

IMAGE_INPUTS: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
"""Batch keys that carry images or videos (Qwen-VL and most HF VLMs)."""


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align causal-LM labels with the logits: `out[..., i] = labels[..., i + 1]`, the last
    position `-100`. ms-swift rolls the labels (`torch.roll(labels, -1)`), which wraps the first
    label around to the last position; its first label is always a prompt token (-100), so
    both give the same result there, and this one is also right for fully labelled rows."""
    shifted = torch.roll(labels, shifts=-1, dims=-1)
    shifted[..., -1] = IGNORE_INDEX
    return shifted


def trim_like_logits(tensor: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    """`tensor` (`[B, S, ...]`, whole sequence) trimmed the way ms-swift's `prepare_logits_to_keep`
    trims the logits: the last N positions, or the positions of a boolean mask (batch of 1)."""
    if logits_to_keep is None:
        return tensor
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
        return tensor[:, logits_to_keep.to(tensor.device)]
    n = int(logits_to_keep)
    return tensor[:, -n:] if n > 0 else tensor


def has_images(batch: Mapping[str, Any]) -> bool:
    """Whether the batch carries images or videos (feature terms skip text-only batches)."""
    return any(batch.get(key) is not None for key in IMAGE_INPUTS)


@dataclass
class ForwardCapture:
    """What one model's loss forward produced for the terms (filled while it runs).

    `logits` is None where no term needs them (the LM-head tap then kept the head from computing
    them); `hidden` / `head` are the LM head's input and the head, for fused terms; `taps` the
    module recordings; `projected` the student's tensors of projected feature pairs, already
    through their projector (by `FeaturePair.key`)."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: nn.Module | None = None
    taps: dict[Tap, list[torch.Tensor]] = field(default_factory=dict)
    projected: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def build_context(
    labels: torch.Tensor,
    student: ForwardCapture,
    teacher: ForwardCapture | None = None,
    *,
    sequence_labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: Any = None,
    teacher_topk: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    images: bool | None = None,
    student_generated: bool = False,
    step: int = 0,
    projectors: Mapping[str, nn.Module] | None = None,
    step_token_denominator: torch.Tensor | None = None,
    vocab_size: int | None = None,
    aligned_teachers: Mapping[str, AlignedTeacher] | None = None,
) -> LossContext:
    """The `LossContext` of one micro-batch.

    `labels` are unshifted and trimmed like the logits; `sequence_labels` the unshifted labels
    of the whole sequence (default: `labels`, when nothing was trimmed). `teacher_topk` holds,
    per teacher name, a whole-sequence `(logprobs, ids)` top-K aligned with the logits'
    positions (as caches and servers hand it over); it is trimmed like the logits here.
    `vocab_size` is the tokenizer's size, with which LM terms align vocabularies that differ
    only by padding (`kdcompose.functional.vocab`). `aligned_teachers` are the teachers taught
    across tokenizers, already aligned (`kdcompose.training.cross_tokenizer`).
    """
    teacher = teacher or ForwardCapture()
    whole = labels if sequence_labels is None else sequence_labels
    topk = {
        name: (trim_like_logits(logprobs, logits_to_keep), trim_like_logits(ids, logits_to_keep))
        for name, (logprobs, ids) in (teacher_topk or {}).items()
    }
    return LossContext(
        labels=shift_labels(labels),
        student_logits=student.logits,
        teacher_logits=teacher.logits,
        student_hidden=student.hidden,
        teacher_hidden=teacher.hidden,
        student_lm_head=student.head,
        teacher_lm_head=teacher.head,
        taps={**student.taps, **teacher.taps},
        sequence_labels=shift_labels(whole),
        attention_mask=attention_mask,
        teacher_topk=topk,
        projected=student.projected,
        student_generated=student_generated,
        has_images=images,
        step=step,
        projectors=projectors or {},
        step_token_denominator=step_token_denominator,
        vocab_size=vocab_size,
        aligned_teachers=dict(aligned_teachers or {}),
    )


__all__ = [
    "IMAGE_INPUTS",
    "ForwardCapture",
    "build_context",
    "has_images",
    "shift_labels",
    "trim_like_logits",
]
