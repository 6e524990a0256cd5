"""Token selection: keep a ranked fraction of the valid rows before the differentiable pass.

Scores come from one pass of the chunk loop without gradient (an entropy or the divergence of the
distributions the divergence compares); the engine then runs on the kept rows only, so the
others cost no gradient memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from kdcompose.functional.divergences.base import ChunkOps
from kdcompose.functional.engine import Job, Teacher, apply_divergence, run
from kdcompose.functional.sources import LinearStudent, LocalTopk, LogitsStudent
from kdcompose.functional.vocab_parallel import group_of

ScoreBy = Literal["teacher_entropy", "student_entropy", "divergence"]


@dataclass(frozen=True)
class TokenSelection:
    """Distil only a fraction of the valid tokens of a call: ``keep`` in (0, 1] of them, ranked by
    ``by`` (the teacher's or the student's entropy, or the divergence itself), ``order: high`` the
    largest scores first. ``ceil(keep * n_valid)`` tokens are kept (at least one when any is valid).

    The loss is the mean over the kept tokens. Scores come from one extra forward pass without
    gradient over every valid token (entropies and the divergence of the distributions the
    divergence compares: the K / K+1 buckets of a top-K teacher); the differentiable pass then
    runs on the kept tokens only, so the others cost no gradient memory.
    """

    by: ScoreBy = "teacher_entropy"
    keep: float = 0.5
    order: Literal["high", "low"] = "high"

    def __post_init__(self) -> None:
        if self.by not in ("teacher_entropy", "student_entropy", "divergence"):
            raise ValueError(
                f"tokens.by must be teacher_entropy, student_entropy or divergence, got {self.by!r}"
            )
        if (
            isinstance(self.keep, bool)
            or not isinstance(self.keep, (int, float))
            or not 0.0 < self.keep <= 1.0
        ):
            raise ValueError(f"tokens.keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.order not in ("high", "low"):
            raise ValueError(f"tokens.order must be high or low, got {self.order!r}")

    def count(self, n_valid: int) -> int:
        return 0 if n_valid == 0 else min(n_valid, max(1, math.ceil(self.keep * n_valid - 1e-9)))


def _entropy_kernel(side: Literal["student", "teacher"], group: Any) -> Callable[..., Tensor]:
    ops = ChunkOps(group)

    def kernel(ls: Tensor, lt: Tensor, scratch: Sequence[Tensor]) -> Tensor:
        log_p = ls if side == "student" else lt
        return ops.rowdot(torch.exp(log_p, out=scratch[0]), log_p, out=scratch[0]).neg_()

    return kernel


def _divergence_kernel(job: Job) -> Callable[..., Tensor]:
    state: dict = {}

    def kernel(ls: Tensor, lt: Tensor, scratch: Sequence[Tensor]) -> Tensor:
        need = max(1, job.divergence.scratch_buffers)
        extra = list(scratch) + [torch.empty_like(ls) for _ in range(need - len(scratch))]
        return apply_divergence(job.divergence, ls, lt, extra, None, 1.0, None, job.parallel, state)

    return kernel


def select_rows(
    job: Job, student: LogitsStudent | LinearStudent, teacher: Teacher, selection: TokenSelection
) -> Tensor:
    """Positions (into the current selection, ascending) of the rows ``selection`` keeps."""
    if selection.by == "divergence":
        kernel = _divergence_kernel(job)
    else:
        kernel = _entropy_kernel(
            "student" if selection.by == "student_entropy" else "teacher", group_of(job.parallel)
        )
    with torch.no_grad():
        scores = run(job, student, teacher, None, kernel=kernel)
        if isinstance(teacher, LocalTopk):
            teacher.mass = None
        n_keep = selection.count(job.n)
        kept = torch.topk(scores, n_keep, largest=selection.order == "high", sorted=False).indices
        return kept.sort().values
