"""Teachers with another tokenizer, framework-neutral: which teachers need it, and the aligned view.

A run's teachers are compared with the student's tokenizer once, before training
(`plan_cross_tokenizer`), with `kdcompose.teachers.alignment.tokenizer_difference` -- decided
from the tokenizers, never assumed from model names. A teacher whose tokenizer differs (or that a
term forces, `cross_tokenizer: {force: true}`) is *taught across tokenizers*: every active term
that reads it must declare it (`TermNeeds.cross_tokenizer`), otherwise the run is refused naming
the term, the teacher and the fix. For such a teacher the trainer encodes each sample with the
teacher's own template and runs (or asks) the teacher on that encoding; per micro-batch this
module aligns the two completions byte by byte and builds the `AlignedTeacher` the terms read
(`aligned_from_logits` for a local teacher's logits, `aligned_from_topk` for a cache's or a
server's top-K).

Conventions as in `kdcompose.training.context`: labels are unshifted, `-100` outside the
completion; a row of logits predicts the next token. A sample's *completion* is its labelled
tokens in order (what both templates label: the answer plus each family's end-of-turn token).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdcompose.defaults import IGNORE_INDEX
from kdcompose.errors import ConfigIssue
from kdcompose.functional.cross_tokenizer import AlignedBatch, TeacherLogits, TeacherTopK
from kdcompose.teachers.alignment import (
    AlignedGroup,
    AlignmentError,
    TokenAlignment,
    TokenTable,
    VocabMapping,
    align_token_ids,
    token_table,
    tokenizer_difference,
    vocab_mapping,
)
from kdcompose.terms.base import AlignedTeacher, TermNeeds
from kdcompose.training.context import shift_labels

DEFAULT = ""
"""The default teacher's name (as in `kdcompose.teachers.provider`)."""


@dataclass(frozen=True)
class TeacherTokenizer:
    """What a run knows about one teacher's tokenizer, for the plan.

    `tokenizer`: the teacher's (fast) tokenizer, or None when the run cannot know it (a server
    declared without `tokenizer:`). `label` names the teacher in messages (`the default teacher
    (local model /m/llama)`, `teacher 'llama' (server http://...)`); `origin` is the YAML path where
    its tokenizer comes from and `missing_fix` what to write there when it is unknown.
    `temperature`: the temperature of the log-probabilities it hands over (1.0 for a cache or a
    server), None when it hands over full logits (a local model: any temperature)."""

    name: str
    tokenizer: Any
    label: str
    origin: str
    missing_fix: str = ""
    temperature: float | None = None


@dataclass(frozen=True)
class CrossTeacher:
    """A teacher taught across tokenizers in one run: both token tables and the vocabulary map,
    built once. `difference` is what differs between the tokenizers (None: the same tokenizer,
    forced onto this path)."""

    name: str
    label: str
    student: TokenTable
    teacher: TokenTable
    vocab: VocabMapping
    difference: str | None = None

    @property
    def identical(self) -> bool:
        return self.difference is None


@dataclass(frozen=True)
class TeacherCompletion:
    """One sample of a cache's or a server's answer: the teacher's own completion token ids and,
    per completion token, the teacher's top-K (ids, log-probabilities at temperature 1, `-inf`
    for absent entries) and the log-probability of that actual token."""

    ids: Sequence[int]
    topk_ids: Tensor
    topk_logprobs: Tensor
    token_logprobs: Tensor


@dataclass
class CrossTokenizerPlan:
    """The run's cross-tokenizer teachers by name (empty: every teacher shares the student's tokenizer)."""

    teachers: dict[str, CrossTeacher] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.teachers

    def __bool__(self) -> bool:
        return bool(self.teachers)

    def describe(self) -> list[str]:
        """One start-up line per cross-tokenizer teacher."""
        out = []
        for name in sorted(self.teachers):
            t = self.teachers[name]
            why = f"tokenizer differs: {t.difference}" if t.difference else "same tokenizer, forced"
            out.append(f"{t.label}: taught across tokenizers ({why}; {len(t.vocab)} tokens map one to one)")
        return out


def teachers_read(needs: TermNeeds, remote: frozenset[str]) -> frozenset[str]:
    """The teachers a term with `needs` reads (`""`: the default teacher, local or remote)."""
    read = set(needs.topk_teachers) | set(needs.cross_tokenizer_teachers)
    if needs.served(remote).teacher:
        read.add(DEFAULT)
    return frozenset(read)


def plan_cross_tokenizer(
    terms: Iterable[Any],
    student_tokenizer: Any,
    teachers: Iterable[TeacherTokenizer],
    remote: frozenset[str] = frozenset(),
) -> tuple[CrossTokenizerPlan, list[ConfigIssue]]:
    """Which teachers the active `terms` read across tokenizers, and what rules the run out.

    `teachers`: every teacher of the run whose tokenizer the caller could determine or must
    report as unknown; `remote`: the names of the teachers that are caches or servers. Issues:
    a term reading a teacher with another tokenizer without `cross_tokenizer` (named: term,
    teacher, difference, fix); a `cross_tokenizer` term reading a teacher whose tokenizer is
    unknown; a remote teacher whose log-probabilities are at another temperature than the term's.
    """
    terms = list(terms)
    plan = CrossTokenizerPlan()
    issues: list[ConfigIssue] = []
    for teacher in teachers:
        readers = [t for t in terms if teacher.name in teachers_read(t.needs, remote)]
        requests = [(t, r) for t in readers for r in t.needs.cross_tokenizer if r.teacher == teacher.name]
        if not readers:
            continue
        if teacher.tokenizer is None:
            for _, request in requests:
                issues.append(
                    ConfigIssue(
                        teacher.origin,
                        f"{request.origin} reads {teacher.label} across tokenizers, but the run cannot "
                        f"know its tokenizer: {teacher.missing_fix}",
                    )
                )
            continue
        difference = tokenizer_difference(student_tokenizer, teacher.tokenizer)
        forced = [r for _, r in requests if r.force]
        if difference is None and not forced:
            continue
        declared = {id(t) for t, _ in requests}
        for term in readers:
            if id(term) in declared:
                continue
            if difference is not None:
                message = (
                    f"reads {teacher.label}, whose tokenizer differs from the student's ({difference}): "
                    "position-by-position distillation would compare unrelated token ids. Add "
                    "`cross_tokenizer: {unmatched: uld}` to this term (lm_jsd / lm_kd: compares over "
                    "aligned completion text, docs/cross_tokenizer.md), or use a teacher with the "
                    "student's tokenizer"
                )
            else:
                message = (
                    f"reads {teacher.label}, which {forced[0].origin}.force puts on the cross-tokenizer "
                    "path: every term reading it needs a `cross_tokenizer` block too (or remove `force`)"
                )
            issues.append(ConfigIssue(term.origin, message))
        if teacher.temperature is not None:
            for _, request in requests:
                if request.temperature != teacher.temperature:
                    issues.append(
                        ConfigIssue(
                            request.origin,
                            f"{teacher.label} hands over log-probabilities at temperature "
                            f"{teacher.temperature:g}, and across tokenizers the chain rule over a group "
                            f"needs them at the term's temperature ({request.temperature:g}): set the "
                            f"term's `temperature: {teacher.temperature:g}`",
                        )
                    )
        plan.teachers[teacher.name] = CrossTeacher(
            name=teacher.name,
            label=teacher.label,
            student=token_table(student_tokenizer),
            teacher=token_table(teacher.tokenizer),
            vocab=vocab_mapping(student_tokenizer, teacher.tokenizer),
            difference=difference,
        )
    return plan, issues


# ------------------------------------------------------------------------------ per micro-batch


def completion_ids(labels: Tensor) -> list[list[int]]:
    """Each row's labelled tokens, in order (unshifted labels `[B, S]`)."""
    return [row[row != IGNORE_INDEX].tolist() for row in labels.detach().cpu()]


def prediction_rows(labels: Tensor) -> Tensor:
    """Flat indices, into `[B * S]` positions of the logits, of the rows that predict each labelled
    token, row-major (unshifted labels `[B, S]`, trimmed like the logits)."""
    return torch.nonzero(shift_labels(labels).reshape(-1) != IGNORE_INDEX, as_tuple=False).flatten()


def _kept_rows(completions: Sequence[Sequence[int]], kept: Sequence[int] | None) -> Tensor | None:
    """Indices into the concatenated completions of the first `kept[b]` tokens of each sample."""
    if kept is None or all(k == len(c) for k, c in zip(kept, completions, strict=True)):
        return None
    rows, offset = [], 0
    for k, completion in zip(kept, completions, strict=True):
        rows.extend(range(offset, offset + k))
        offset += len(completion)
    return torch.tensor(rows, dtype=torch.int64)


def align_completions(
    teacher: CrossTeacher,
    student: Sequence[Sequence[int]],
    teacher_ids: Sequence[Sequence[int]],
    device: torch.device | str | None = None,
) -> AlignedBatch:
    """Align each sample's completions; an `AlignmentError` names the sample and the teacher."""
    if len(student) != len(teacher_ids):
        raise AlignmentError(
            f"{teacher.label}: {len(teacher_ids)} teacher completions for {len(student)} student samples"
        )
    alignments = []
    for index, (s_ids, t_ids) in enumerate(zip(student, teacher_ids, strict=True)):
        if teacher.identical and list(s_ids) == list(t_ids):
            alignments.append(_identity(teacher.student, s_ids))
            continue
        try:
            alignments.append(align_token_ids(teacher.student, s_ids, teacher.teacher, t_ids))
        except AlignmentError as error:
            raise AlignmentError(
                f"sample {index} of the micro-batch: the student's completion and {teacher.label}'s own "
                f"encoding of it do not spell the same text: {error}"
            ) from None
    return AlignedBatch.from_alignments(alignments, teacher.vocab, device=device)


def _identity(table: TokenTable, ids: Sequence[int]) -> TokenAlignment:
    """The alignment of a completion with itself under one tokenizer: a group per token (what
    `align_token_ids` finds; also for ids of the LM head's padding rows, which spell nothing)."""
    ids = tuple(int(i) for i in ids)
    groups = tuple(
        AlignedGroup((p,), (p,), table.pieces[i] if i < table.size else b"", i in table.special)
        for p, i in enumerate(ids)
    )
    return TokenAlignment(ids, ids, groups)


def aligned_from_logits(
    teacher: CrossTeacher,
    student_labels: Tensor,
    teacher_labels: Tensor,
    teacher_logits: Tensor,
    *,
    trimmed_teacher_labels: Tensor | None = None,
    kept: Sequence[int] | None = None,
) -> AlignedTeacher:
    """The aligned view of a local teacher's forward on its own encoding.

    `student_labels` / `teacher_labels`: each side's whole unshifted labels; `teacher_logits` the
    teacher's logits, trimmed by `logits_to_keep` as `trimmed_teacher_labels` are (default: not
    trimmed); `kept`: per sample, how many of the student's completion tokens the teacher's
    encoding covers (default: all)."""
    s_all = completion_ids(student_labels)
    s_ids = [c[:k] for c, k in zip(s_all, kept, strict=True)] if kept is not None else s_all
    t_ids = completion_ids(teacher_labels)
    batch = align_completions(teacher, s_ids, t_ids, device=teacher_logits.device)
    trimmed = teacher_labels if trimmed_teacher_labels is None else trimmed_teacher_labels
    rows = prediction_rows(trimmed).to(teacher_logits.device)
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if rows.numel() != batch.teacher_ids.numel():
        raise ValueError(
            f"{teacher.label}: {rows.numel()} labelled logits rows for {batch.teacher_ids.numel()} "
            "completion tokens (the teacher's logits were trimmed unlike its labels)"
        )
    return AlignedTeacher(batch, TeacherLogits(flat[rows]), _kept_rows(s_all, kept))


def aligned_from_topk(
    teacher: CrossTeacher,
    student_labels: Tensor,
    completions: Sequence[TeacherCompletion],
    *,
    kept: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> AlignedTeacher:
    """The aligned view of a cache's or a server's answer (one `TeacherCompletion` per sample)."""
    s_all = completion_ids(student_labels)
    s_ids = [c[:k] for c, k in zip(s_all, kept, strict=True)] if kept is not None else s_all
    device = device if device is not None else student_labels.device
    batch = align_completions(teacher, s_ids, [c.ids for c in completions], device=device)
    for index, c in enumerate(completions):
        if not (len(c.ids) == c.topk_ids.shape[0] == c.topk_logprobs.shape[0] == c.token_logprobs.shape[0]):
            raise ValueError(
                f"{teacher.label}: sample {index}: {len(c.ids)} completion tokens but "
                f"{c.topk_ids.shape[0]} top-K rows and {c.token_logprobs.shape[0]} token log-probabilities"
            )
    width = max((c.topk_ids.shape[-1] for c in completions), default=1)

    def cat(tensors: list[Tensor], fill: float | int, dtype: torch.dtype) -> Tensor:
        padded = [
            torch.nn.functional.pad(t.to(dtype), (0, width - t.shape[-1]), value=fill) if t.dim() == 2 else t
            for t in tensors
        ]
        return (
            torch.cat(padded).to(device=device, dtype=dtype) if padded else torch.zeros(0, width, dtype=dtype)
        )

    teacher_topk = TeacherTopK(
        topk_ids=cat([c.topk_ids for c in completions], 0, torch.int64),
        topk_logprobs=cat([c.topk_logprobs for c in completions], float("-inf"), torch.float32),
        token_logprobs=torch.cat([c.token_logprobs.float() for c in completions]).to(device)
        if completions
        else torch.zeros(0),
        temperature=1.0,
    )
    return AlignedTeacher(batch, teacher_topk, _kept_rows(s_all, kept))


__all__ = [
    "CrossTeacher",
    "CrossTokenizerPlan",
    "TeacherCompletion",
    "TeacherTokenizer",
    "align_completions",
    "aligned_from_logits",
    "aligned_from_topk",
    "completion_ids",
    "plan_cross_tokenizer",
    "prediction_rows",
    "teachers_read",
]
