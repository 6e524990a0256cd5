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

from collections.abc import Sequence
from typing import Any

__all__ = ["TeacherAlignmentError", "check_same_tokens", "first_difference", "token_text"]


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
