"""`cross_tokenizer:` on the LM-head KD terms (`lm_kd`, `lm_jsd`): a teacher with another tokenizer.

A Llama teacher for a Qwen student splits the same completion into other tokens, so the two
distributions cannot be compared position by position. With this block the term reads such a
teacher over **aligned text** instead (kdcompose.functional.cross_tokenizer): groups of tokens
that spell the same bytes on both sides, one-to-one groups compared with the term's own
divergence, the rest with Universal Logit Distillation (`unmatched: uld`) or not at all (`skip`).
The trainer decides, from the two tokenizers, whether a teacher needs this (never assumed): it
then encodes each sample with the teacher's own template, runs or asks the teacher on it, aligns
the completions and hands the term `LossContext.aligned_teachers[name]`. With the student's own
tokenizer the term runs its ordinary path, unless `force: true` (which must give the same value:
the identity check).

Here: the block's schema, the term-side checks, and the computation from an `AlignedTeacher`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from kdcompose.defaults import IGNORE_INDEX
from kdcompose.errors import ConfigIssue
from kdcompose.functional import ChunkOps, Divergence, TeacherLogits, TeacherTopK, cross_tokenizer_loss
from kdcompose.schema.types import Bool, PositiveInt, Weight
from kdcompose.terms.base import AlignedTeacher, LossContext, TermValue

MATCHED_FRAC = "matched_frac"
"""The stat `<metric>_matched_frac`: the share of the student's completion tokens compared one to one."""


class CrossTokenizerSpec(BaseModel):
    """`cross_tokenizer: {unmatched: uld | skip, uld_weight: W, force: false}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unmatched: Literal["uld", "skip"] = "uld"
    """Groups that are not one token on each side with the same bytes: `uld` compares their merged
    distributions with Universal Logit Distillation (sorted-probability L1), `skip` leaves them out."""
    uld_weight: Weight = 1.0
    """Weight of the ULD part against the one-to-one part (inside the term; the term's `weight`
    scales both)."""
    force: Bool = False
    """Take the cross-tokenizer path even when the teacher's tokenizer is the student's (with
    identical tokenizers it must equal the ordinary path: a check of the wiring, not a mode to train
    with)."""


def spec_issues(
    spec: CrossTokenizerSpec | None,
    origin: str,
    *,
    fused: bool,
    tokens: bool,
    missing_mass: str,
    normalize: str,
    compile: bool = False,
) -> list[ConfigIssue]:
    """Settings of an LM-head KD term that the cross-tokenizer path cannot honour."""
    if spec is None:
        return []
    block = f"{origin}.cross_tokenizer"
    issues = []
    if fused:
        issues.append(
            ConfigIssue(
                f"{origin}.fused",
                f"the cross-tokenizer path ({block}) compares merged distributions per aligned group and "
                "needs the student's logits: set `fused: false`",
            )
        )
    if compile:
        issues.append(
            ConfigIssue(
                f"{origin}.compile",
                f"the cross-tokenizer path ({block}) computes per aligned group, not on the chunk engine "
                "`compile` speeds up: remove `compile`",
            )
        )
    if tokens:
        issues.append(
            ConfigIssue(
                f"{origin}.tokens",
                f"token selection does not apply to aligned groups ({block}): remove `tokens`",
            )
        )
    if missing_mass != "renorm":
        issues.append(
            ConfigIssue(
                f"{origin}.missing_mass",
                f"across tokenizers a top-K teacher is compared over its top-K renormalized on both sides "
                f"(`renorm`) ({block}): remove `missing_mass`",
            )
        )
    if normalize == "global_tokens":
        issues.append(
            ConfigIssue(
                f"{origin}.normalize",
                f"across tokenizers the value is a mean over compared groups, not labelled tokens ({block}): "
                "remove `normalize`",
            )
        )
    return issues


def divergence_callable(divergence: Divergence) -> Callable[[Tensor, Tensor], Tensor]:
    """The term's divergence object as the loss's `divergence(student_logprobs, teacher_logprobs)
    -> sum over rows` (its per-row `value`, differentiated by autograd)."""

    def call(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return divergence.value(student_logprobs, teacher_logprobs, ChunkOps()).sum()

    return call


def student_rows(ctx: LossContext, aligned: AlignedTeacher, name: str) -> Tensor:
    """The student's logits rows of the aligned completion tokens, checked against the alignment."""
    if ctx.student_logits is None or ctx.labels is None:
        raise ValueError(f"term {name!r} (cross_tokenizer) needs the student's logits and labels")
    labelled = ctx.labels != IGNORE_INDEX
    logits = ctx.student_logits[labelled]
    ids = ctx.labels[labelled]
    if aligned.student_rows is not None:
        rows = aligned.student_rows.to(logits.device)
        logits, ids = logits[rows], ids[rows]
    expected = aligned.batch.student_ids.to(ids.device)
    if ids.shape != expected.shape or not torch.equal(ids, expected):
        raise ValueError(
            f"term {name!r} (cross_tokenizer): the aligned completion tokens ({expected.numel()}) are not "
            f"this micro-batch's labelled tokens ({ids.numel()}); the alignment was built for another batch"
        )
    return logits


def topk_from_logits(logits: Tensor, actual_ids: Tensor, k: int, temperature: float) -> TeacherTopK:
    """A local teacher's full logits as a top-`k` teacher at `temperature` (for `topk: K` terms)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    token = logprobs.gather(-1, actual_ids.to(logprobs.device).unsqueeze(-1)).squeeze(-1)
    return TeacherTopK(top_ids, top_lp, token, temperature)


def cross_tokenizer_value(
    ctx: LossContext,
    aligned: AlignedTeacher,
    spec: CrossTokenizerSpec,
    *,
    divergence: Divergence,
    temperature: float,
    topk: PositiveInt | None,
    name: str,
) -> TermValue:
    """The term's value over aligned text, with `matched_frac` as a stat (unweighted)."""
    logits = student_rows(ctx, aligned, name)
    teacher = aligned.teacher
    if topk is not None and isinstance(teacher, TeacherLogits):
        teacher = topk_from_logits(teacher.logits, aligned.batch.teacher_ids, topk, temperature)
    elif topk is not None and isinstance(teacher, TeacherTopK) and teacher.topk_ids.shape[-1] > topk:
        teacher = TeacherTopK(
            teacher.topk_ids[:, :topk],
            teacher.topk_logprobs[:, :topk],
            teacher.token_logprobs,
            teacher.temperature,
        )
    out = cross_tokenizer_loss(
        logits,
        teacher,
        aligned.batch,
        unmatched=spec.unmatched,
        uld_weight=spec.uld_weight,
        divergence=divergence_callable(divergence),
        temperature=temperature,
    )
    frac = torch.tensor(out.matched_frac, dtype=torch.float32, device=out.loss.device)
    return TermValue(out.loss, stats={MATCHED_FRAC: frac})


__all__ = [
    "MATCHED_FRAC",
    "CrossTokenizerSpec",
    "cross_tokenizer_value",
    "divergence_callable",
    "spec_issues",
    "student_rows",
    "topk_from_logits",
]
