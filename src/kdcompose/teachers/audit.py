"""The alignment audit: a teacher that is not the local model must have scored the student's tokens.

A cache or a server hands back, with its top-K, the token ids it scored. For a teacher with the
student's tokenizer they must equal the student's ids at every compared position, or its
distributions belong to another text (another template, system prompt, tokenizer or truncation)
and the loss would train the student toward them without any error -- what ms-swift users hit
with a teacher server (ms-swift #9671, #10073). So any difference stops the run with an error
naming the sample, the first differing position and both tokens, decoded.

Pure functions on id lists; the tokenizer (any object with ``decode``) only renders tokens.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

__all__ = [
    "TeacherAlignmentError",
    "check_same_tokens",
    "check_served_tokens",
    "first_difference",
    "token_text",
]


class TeacherAlignmentError(RuntimeError):
    """A teacher scored other tokens than the student's; the attributes locate the first difference."""

    def __init__(
        self, message: str, *, sample: str, position: int, student: int | None, teacher: int | None
    ) -> None:
        super().__init__(message)
        self.sample = sample
        self.position = position
        self.student = student
        self.teacher = teacher


def first_difference(student: Sequence[int], teacher: Sequence[int]) -> int | None:
    """Index of the first position where the sequences differ (a length difference counts at
    the shorter one's end); None when they are equal."""
    for i, (a, b) in enumerate(zip(student, teacher, strict=False)):
        if int(a) != int(b):
            return i
    return None if len(student) == len(teacher) else min(len(student), len(teacher))


def token_text(tokenizer: Any, token: int | None) -> str:
    """``'text' (id N)`` for a token, or ``(end of sequence)`` past the end; the id alone when the
    tokenizer cannot decode it."""
    if token is None:
        return "(end of sequence)"
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is not None:
        try:
            return f"{tokenizer.decode([int(token)])!r} (id {int(token)})"
        except Exception:  # rendering is a courtesy: the id still names the token
            pass
    return f"id {int(token)}"


def check_same_tokens(
    student: Sequence[int],
    teacher: Sequence[int],
    *,
    source: str,
    sample: str,
    fix: str,
    tokenizer: Any = None,
    positions: Sequence[int] | None = None,
    what: str = "position",
) -> None:
    """Raise :class:`TeacherAlignmentError` unless ``teacher`` equals ``student``.

    ``positions`` (same length as both): the sample position each entry stands for, used in the
    message (default: the entry's index); ``what`` names it (e.g. ``"position"``)."""
    at = first_difference(student, teacher)
    if at is None:
        return
    s = int(student[at]) if at < len(student) else None
    t = int(teacher[at]) if at < len(teacher) else None
    where = int(positions[at]) if positions is not None and at < len(positions) else at
    lengths = (
        ""
        if len(student) == len(teacher)
        else f" (the student has {len(student)}, the teacher {len(teacher)})"
    )
    message = (
        f"{source} scored other tokens than the student's for {sample}: first difference at {what} {where}"
        f"{lengths}: student {token_text(tokenizer, s)} vs teacher {token_text(tokenizer, t)}; {fix}"
    )
    raise TeacherAlignmentError(message, sample=sample, position=where, student=s, teacher=t)


def check_served_tokens(
    served: Sequence[Sequence[int] | None],
    model_inputs: Mapping[str, Any],
    *,
    source: str,
    fix: str,
    tokenizer: Any = None,
) -> None:
    """The audit of a server's answers to one micro-batch: the ``prompt_token_ids`` it scored for
    each request must equal that sample's unpadded ``input_ids`` (every position: each one's
    distribution is conditioned on all before it). A packed batch (one row, several requests) is
    compared as the concatenation of the requests. Raises :class:`TeacherAlignmentError`, naming
    the sample's index in the micro-batch; an answer without token ids counts as a difference."""
    from kdcompose.teachers.cache_keys import unpadded_positions

    input_ids = model_inputs["input_ids"]
    rows = [input_ids[b, real].tolist() for b, real in enumerate(unpadded_positions(model_inputs))]
    for index, ids in enumerate(served):
        if ids is None:
            raise TeacherAlignmentError(
                f"{source} answered sample {index} of the micro-batch without the token ids it scored "
                "(prompt_token_ids), so its alignment with the student's tokens cannot be checked; "
                "use a server that returns them (kdcompose serve-teacher, or vLLM / swift deploy of "
                "ms-swift >= 4.6 asked with return_details)",
                sample=f"sample {index}",
                position=0,
                student=None,
                teacher=None,
            )
    answers = [list(ids or []) for ids in served]
    if len(rows) == 1 and len(answers) > 1:  # padding-free: the requests packed into one row
        teacher = [t for ids in answers for t in ids]
        at = first_difference(rows[0], teacher)
        if at is None:
            return
        ends = list(accumulate(len(ids) for ids in answers))
        index = min(bisect_right(ends, at), len(answers) - 1)
        begin = ends[index] - len(answers[index])
        check_same_tokens(
            rows[0][begin:],
            teacher[begin:],
            source=source,
            sample=f"sample {index} of the micro-batch (packed)",
            fix=fix,
            tokenizer=tokenizer,
        )
        return
    if len(served) != len(rows):
        raise TeacherAlignmentError(
            f"{source} answered {len(served)} samples for a micro-batch of {len(rows)}; {fix}",
            sample="the micro-batch",
            position=0,
            student=None,
            teacher=None,
        )
    for index, (student, teacher) in enumerate(zip(rows, answers, strict=True)):
        check_same_tokens(
            student,
            teacher,
            source=source,
            sample=f"sample {index} of the micro-batch",
            fix=fix,
            tokenizer=tokenizer,
        )
