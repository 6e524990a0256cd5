"""Distillation loss between a student and a teacher whose tokenizers differ (pure tensor math).

The two completions are aligned into *groups* beforehand (:mod:`kdcompose.teachers.alignment`): a
group is a span of text that a run of student tokens and a run of teacher tokens both spell
exactly. Per group, each side's prediction of the span is merged by the chain rule over the span's
*actual* tokens, as in TRL's GOLD (``ULDLoss._merge_probabilities_with_alignment_groups``)::

    log p_merged(y) = log p(y | prefix) + sum_{j > first} log p(actual token j | its prefix)

a distribution over the first token ``y`` of the span, scaled by the (scalar) probability of the
rest of the span; for the actual first token it is exactly the log-probability of the whole span.
It is unnormalized (total mass = probability of the span's tail) and, like GOLD's, ignores that the
tail's probability would differ for another first token.

Groups are then compared in one of two ways:

*one to one* (``matched``): one student token and one teacher token spelling the same bytes, and
    the vocabulary map pairs them (:func:`kdcompose.teachers.alignment.vocab_mapping`). Both
    distributions are restricted to the token pairs the map knows (the student's column ``s`` faces
    the teacher's column ``t`` when ``s`` and ``t`` spell the same bytes) and renormalized there,
    then any divergence is applied (default: the generalized JSD with ``beta``, exactly
    :func:`kdcompose.functional.generalized_jsd_sum`). With identical tokenizers every column pairs
    with itself and this *is* the same-tokenizer JSD.
*the rest* (``unmatched``): ``"uld"`` -- Universal Logit Distillation (Boizard et al. 2024): the
    L1 distance between the two merged distributions sorted in decreasing order (the shorter one
    padded with zeros), GOLD's formula; ``"skip"`` -- not compared.

The value is ``(sum of divergences over matched groups + uld_weight * sum of ULD over unmatched
groups) / number of compared groups`` (compared = matched, plus unmatched under ``"uld"``); the sums
and counts come back too, for a global normalization across micro-batches and ranks.
``matched_frac`` is the share of the student's completion tokens compared one to one.

Teacher inputs (one row per teacher completion token, rows of all samples concatenated):

:class:`TeacherLogits` -- a local teacher: full logits; everything above is exact.
:class:`TeacherTopK` -- a cache or a server: per position the top-K ids and log-probabilities plus the
    log-probability of the actual token. Exact: the chain-rule tail of every group (it uses actual
    tokens only). Approximated: one-to-one groups compare over the teacher's top-K (plus its actual
    token) that the map pairs, renormalized on both sides (ms-swift's ``renorm``); ULD compares the
    K largest merged values exactly and replaces the rest of the sorted L1 by ``|student's remaining
    mass - teacher's remaining mass|``, a lower bound of the true remainder (triangle inequality).
    With K covering the teacher's vocabulary both equal the full-logits values.

Rows are predictions: row ``i`` of ``student_logits`` is the distribution that scored student
completion token ``i`` (the logits already shifted, like ``generalized_jsd``'s ``labels``); the same
for the teacher. Math in fp32 (fp64 if an input is fp64); only the student gets a gradient. Not
chunked: it keeps one ``[groups, V]`` row per group on each side (a later engine can chunk it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcompose.functional.jsd import generalized_jsd_sum

__all__ = [
    "UNMATCHED_MODES",
    "AlignedBatch",
    "CrossTokenizerLoss",
    "Divergence",
    "TeacherLogits",
    "TeacherTopK",
    "cross_tokenizer_loss",
    "jsd_divergence",
    "merged_group_logprobs",
    "uld_distance",
]

UNMATCHED_MODES: tuple[str, ...] = ("uld", "skip")

#: Stand-in for log(0) in supports with absent entries: exp() of it is exactly 0 in fp32 and fp64,
#: and, unlike -inf, it gives 0 (not NaN) in ``p * (log p - log q)`` when both sides are absent.
_ABSENT = -1.0e4

#: ``Divergence(student_logprobs [N, C], teacher_logprobs [N, C]) -> sum over the N rows`` (0-d).
#: Both are log-probabilities of distributions over the same C entries (absent entries are large
#: negative finite numbers); differentiable in the student's; the teacher's carry no gradient.
Divergence = Callable[[Tensor, Tensor], Tensor]


def jsd_divergence(beta: float = 0.5) -> Divergence:
    """The generalized JSD with ``beta`` (semantics of :func:`kdcompose.functional.generalized_jsd`)."""

    def divergence(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        total, _ = generalized_jsd_sum(student_logprobs, teacher_logprobs, beta=beta)
        return total

    return divergence


# ------------------------------------------------------------------------------------ input formats


@dataclass(frozen=True)
class TeacherLogits:
    """A teacher given by its full logits ``[Nt, Vt]`` (row ``i`` scored teacher completion token ``i``)."""

    logits: Tensor


@dataclass(frozen=True)
class TeacherTopK:
    """A teacher given as a cache or a server hands it over, per teacher completion position ``i``.

    Attributes:
        topk_ids: ``[Nt, K]`` int64, the K most likely next-token ids under the teacher.
        topk_logprobs: ``[Nt, K]`` their log-probabilities (log-softmax over the teacher's full
            vocabulary at ``temperature``); ``-inf`` marks an absent entry (fewer than K known).
        token_logprobs: ``[Nt]`` the log-probability of the token the teacher actually scored at
            ``i`` (the teacher's own completion token, whether or not it is in the top K).
        temperature: the temperature the log-probabilities were computed at (a cache: 1.0); the
            loss must run at the same temperature (the chain-rule tail needs normalized values).

    The teacher's completion token ids themselves come with the alignment (a cache/server returns
    them with the log-probabilities; the alignment audit checks they spell the student's text).
    """

    topk_ids: Tensor
    topk_logprobs: Tensor
    token_logprobs: Tensor
    temperature: float = 1.0


class _VocabPairs(Protocol):
    """What the loss reads of :class:`kdcompose.teachers.alignment.VocabMapping`."""

    teacher_size: int

    def pairs(self, student_width: int, teacher_width: int) -> tuple[list[int], list[int]]: ...


class _Alignment(Protocol):
    """What the loss reads of :class:`kdcompose.teachers.alignment.TokenAlignment`."""

    student_ids: Sequence[int]
    teacher_ids: Sequence[int]
    num_groups: int

    def student_group_index(self) -> list[int]: ...
    def teacher_group_index(self) -> list[int]: ...
    def one_to_one(self, vocab: Any) -> list[bool]: ...


@dataclass(frozen=True)
class AlignedBatch:
    """The alignments of a batch of completions, flattened into tensors.

    Student rows are the concatenation of every sample's completion tokens, in sample order (the
    same order as ``student_logits``' rows); likewise the teacher's. ``*_group`` gives each token's
    group (global over the batch, non-decreasing); ``matched`` flags the groups compared one to
    one; ``vocab`` is the vocabulary map (``None``: no one-to-one comparison at all, every group
    goes to ULD or is skipped -- GOLD's plain extended-ULD mode).
    """

    student_ids: Tensor
    teacher_ids: Tensor
    student_group: Tensor
    teacher_group: Tensor
    matched: Tensor
    vocab: _VocabPairs | None

    @property
    def num_groups(self) -> int:
        return int(self.matched.numel())

    @classmethod
    def from_alignments(
        cls,
        alignments: _Alignment | Sequence[_Alignment],
        vocab: _VocabPairs | None,
        device: torch.device | str | None = None,
    ) -> AlignedBatch:
        """Flatten per-sample alignments (:class:`~kdcompose.teachers.alignment.TokenAlignment`)."""
        if not isinstance(alignments, Sequence):
            alignments = [alignments]
        s_ids: list[int] = []
        t_ids: list[int] = []
        s_group: list[int] = []
        t_group: list[int] = []
        matched: list[bool] = []
        offset = 0
        for a in alignments:
            s_ids.extend(int(i) for i in a.student_ids)
            t_ids.extend(int(i) for i in a.teacher_ids)
            s_group.extend(offset + g for g in a.student_group_index())
            t_group.extend(offset + g for g in a.teacher_group_index())
            matched.extend(a.one_to_one(vocab))
            offset += a.num_groups

        def long(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        batch = cls(
            student_ids=long(s_ids),
            teacher_ids=long(t_ids),
            student_group=long(s_group),
            teacher_group=long(t_group),
            matched=torch.tensor(matched, dtype=torch.bool, device=device),
            vocab=vocab,
        )
        batch.check()
        return batch

    def check(self) -> None:
        """Raise ``ValueError`` unless every group has tokens on both sides, in order, and every
        group compared one to one has exactly one token on each side."""
        n = self.num_groups
        for side, group in (("student", self.student_group), ("teacher", self.teacher_group)):
            if group.numel() and (group.min() < 0 or group.max() >= n or (group.diff() < 0).any()):
                raise ValueError(f"{side}_group must be non-decreasing group indices in [0, {n})")
            counts = torch.bincount(group, minlength=n)
            if counts.eq(0).any():
                raise ValueError(f"every group needs at least one {side} token")
            if counts[self.matched].ne(1).any():
                raise ValueError(f"a group compared one to one must have exactly one {side} token")


@dataclass(frozen=True)
class CrossTokenizerLoss:
    """Result of :func:`cross_tokenizer_loss`.

    ``loss`` = ``total / max(num_compared, 1)`` (a graph-connected 0 when nothing is compared);
    ``total`` = ``matched_sum + uld_weight * uld_sum``; ``matched_frac`` =
    ``num_matched / num_student_tokens`` (0.0 without tokens), a plain float for logging.
    """

    loss: Tensor
    total: Tensor
    matched_sum: Tensor
    uld_sum: Tensor
    num_compared: int
    num_matched: int
    num_uld: int
    num_student_tokens: int

    @property
    def matched_frac(self) -> float:
        return self.num_matched / self.num_student_tokens if self.num_student_tokens else 0.0


# ------------------------------------------------------------------------------------ pieces


def _first_positions(group: Tensor, n_groups: int) -> Tensor:
    """Index of the first token of every group (groups are contiguous and non-decreasing)."""
    pos = torch.arange(group.numel(), device=group.device)
    first = torch.full((n_groups,), group.numel(), dtype=torch.int64, device=group.device)
    return first.scatter_reduce(0, group, pos, reduce="amin")


def _tail_logprob(token_logprobs: Tensor, group: Tensor, first: Tensor, n_groups: int) -> Tensor:
    """Per group, ``sum of log p(actual token)`` over the group's tokens after the first."""
    pos = torch.arange(group.numel(), device=group.device)
    rest = torch.where(pos != first[group], token_logprobs, torch.zeros_like(token_logprobs))
    return torch.zeros(n_groups, dtype=token_logprobs.dtype, device=token_logprobs.device).index_add(
        0, group, rest
    )


def merged_group_logprobs(logprobs: Tensor, token_ids: Tensor, group: Tensor) -> Tensor:
    """GOLD's merged distribution per group, in log space: ``[G, V]``.

    ``logprobs [N, V]`` (row ``i`` predicts token ``token_ids[i]``), ``group [N]`` non-decreasing
    group indices. Row ``g``: the log-distribution at the group's first position plus the summed
    log-probabilities of the group's later actual tokens (see the module docstring).
    """
    n_groups = int(group.max()) + 1 if group.numel() else 0
    first = _first_positions(group, n_groups)
    tok = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return logprobs[first] + _tail_logprob(tok, group, first, n_groups).unsqueeze(-1)


def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per row, the L1 distance between both rows sorted in decreasing order (the narrower side
    padded with zeros): Universal Logit Distillation. ``[G, Vs]``, ``[G, Vt]`` -> ``[G]``."""
    s = student_probs.sort(dim=-1, descending=True).values
    t = teacher_probs.sort(dim=-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = F.pad(s, (0, width - s.shape[-1]))
    t = F.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


def _uld_topk(student_probs: Tensor, teacher_topk_probs: Tensor, teacher_total: Tensor) -> Tensor:
    """ULD against a teacher known on its K largest values (0 = absent) and its total mass.

    The K known teacher values face the student's K largest; the rest of the sorted L1 is replaced
    by ``|student's remaining mass - teacher's remaining mass|`` (a lower bound of it).
    """
    t = teacher_topk_probs.sort(dim=-1, descending=True).values
    known = teacher_topk_probs.gt(0).sum(-1, keepdim=True)  # absent entries sort last
    k = t.shape[-1]
    s_top = student_probs.topk(min(k, student_probs.shape[-1]), dim=-1).values  # sorted, descending
    s = F.pad(s_top, (0, k - s_top.shape[-1]))
    valid = torch.arange(k, device=t.device).unsqueeze(0) < known
    head = ((s - t).abs() * valid).sum(-1)
    s_rest = student_probs.sum(-1) - (s * valid).sum(-1)
    t_rest = (teacher_total - (t * valid).sum(-1)).clamp_min(0)
    return head + (s_rest - t_rest).abs()


def _renormalized(logprobs: Tensor, present: Tensor) -> Tensor:
    """Log-probabilities renormalized over ``present`` entries; absent entries set to ``_ABSENT``."""
    masked = logprobs.masked_fill(~present, -math.inf)
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    return (logprobs - lse).masked_fill(~present, _ABSENT)


# ------------------------------------------------------------------------------------ the loss


def _check_args(unmatched: str, uld_weight: float, temperature: float) -> None:
    if unmatched not in UNMATCHED_MODES:
        raise ValueError(f"unmatched must be one of {UNMATCHED_MODES}, got {unmatched!r}")
    if not (isinstance(uld_weight, (int, float)) and math.isfinite(uld_weight) and uld_weight >= 0):
        raise ValueError(f"uld_weight must be a finite number >= 0, got {uld_weight!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_rows(name: str, tensor: Tensor, rows: int, dims: int) -> None:
    if tensor.dim() != dims or tensor.shape[0] != rows:
        want = "[tokens, V]" if dims == 2 else "[tokens]"
        raise ValueError(
            f"{name} must be {want} with one row per completion token of the alignment ({rows}); "
            f"got shape {tuple(tensor.shape)}"
        )


def _matched_full(s_first: Tensor, t_first: Tensor, vocab: _VocabPairs, divergence: Divergence) -> Tensor:
    """Sum of the divergence over one-to-one groups, full teacher logits."""
    vs, vt = s_first.shape[-1], t_first.shape[-1]
    s_cols, t_cols = vocab.pairs(vs, vt)
    if not s_cols:
        raise ValueError("the vocabulary map pairs no column of these logits; cannot compare one to one")
    s_idx = torch.tensor(s_cols, dtype=torch.int64, device=s_first.device)
    t_idx = torch.tensor(t_cols, dtype=torch.int64, device=t_first.device)
    whole = len(s_cols) == vs == vt and bool((s_idx == torch.arange(vs, device=s_idx.device)).all())
    s_sup = s_first if whole else s_first.index_select(-1, s_idx)
    t_sup = t_first if whole and bool((t_idx == s_idx).all()) else t_first.index_select(-1, t_idx)
    if not whole:  # whole: every column of both sides kept, the rows are normalized already
        s_sup = s_sup - torch.logsumexp(s_sup, dim=-1, keepdim=True)
        t_sup = t_sup - torch.logsumexp(t_sup, dim=-1, keepdim=True)
    return divergence(s_sup, t_sup)


def _matched_topk(
    s_first: Tensor,
    ids: Tensor,
    lps: Tensor,
    actual_ids: Tensor,
    actual_lps: Tensor,
    vocab: _VocabPairs,
    divergence: Divergence,
) -> Tensor:
    """Sum of the divergence over one-to-one groups, teacher top-K (+ its actual token)."""
    vs = s_first.shape[-1]
    width = max(int(vocab.teacher_size), int(ids.max()) + 1 if ids.numel() else 0, int(actual_ids.max()) + 1)
    s_cols, t_cols = vocab.pairs(vs, width)
    lookup = torch.full((width,), -1, dtype=torch.int64, device=s_first.device)
    lookup[torch.tensor(t_cols, dtype=torch.int64, device=s_first.device)] = torch.tensor(
        s_cols, dtype=torch.int64, device=s_first.device
    )
    already = ((ids == actual_ids.unsqueeze(-1)) & torch.isfinite(lps)).any(-1, keepdim=True)
    all_ids = torch.cat([ids, actual_ids.unsqueeze(-1)], dim=-1)
    all_lps = torch.cat([lps, actual_lps.unsqueeze(-1).masked_fill(already, -math.inf)], dim=-1)
    valid = (all_ids >= 0) & (all_ids < width)
    cols = torch.where(valid, lookup[all_ids.clamp(0, width - 1)], -1)
    present = (cols >= 0) & torch.isfinite(all_lps)
    s_vals = s_first.gather(-1, cols.clamp_min(0))
    return divergence(_renormalized(s_vals, present), _renormalized(all_lps, present))


def cross_tokenizer_loss(
    student_logits: Tensor,
    teacher: TeacherLogits | TeacherTopK,
    batch: AlignedBatch,
    *,
    unmatched: str = "uld",
    uld_weight: float = 1.0,
    divergence: Divergence | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> CrossTokenizerLoss:
    """Cross-tokenizer distillation loss over aligned groups (see the module docstring).

    Args:
        student_logits: ``[Ns, Vs]``, row ``i`` scored student completion token ``i`` of ``batch``.
        teacher: :class:`TeacherLogits` ``[Nt, Vt]`` or :class:`TeacherTopK`, rows likewise.
        batch: :class:`AlignedBatch` (``AlignedBatch.from_alignments(alignments, vocab_map)``).
        unmatched: ``"uld"`` (sorted-probability L1 on groups not compared one to one) or ``"skip"``.
        uld_weight: weight of the ULD sum (>= 0).
        divergence: for one-to-one groups (see :data:`Divergence`); default
            ``jsd_divergence(beta)``.
        beta: the default divergence's beta (ignored when ``divergence`` is given).
        temperature: both sides' logits are divided by it (a :class:`TeacherTopK` must have been
            computed at the same temperature).
    """
    _check_args(unmatched, uld_weight, temperature)
    if divergence is None:
        divergence = jsd_divergence(beta)
    n_s, n_t, n_groups = batch.student_ids.numel(), batch.teacher_ids.numel(), batch.num_groups
    _check_rows("student_logits", student_logits, n_s, 2)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    device = student_logits.device
    batch = dataclasses.replace(
        batch,
        student_ids=batch.student_ids.to(device),
        teacher_ids=batch.teacher_ids.to(device),
        student_group=batch.student_group.to(device),
        teacher_group=batch.teacher_group.to(device),
        matched=batch.matched.to(device),
    )

    z = student_logits.to(dtype) / temperature
    s_lse = torch.logsumexp(z, dim=-1)
    s_tok = z.gather(-1, batch.student_ids.unsqueeze(-1)).squeeze(-1) - s_lse
    s_first_pos = _first_positions(batch.student_group, n_groups)
    s_first = z[s_first_pos] - s_lse[s_first_pos].unsqueeze(-1)
    s_tail = _tail_logprob(s_tok, batch.student_group, s_first_pos, n_groups)

    t_first_pos = _first_positions(batch.teacher_group, n_groups)
    with torch.no_grad():
        if isinstance(teacher, TeacherLogits):
            _check_rows("teacher.logits", teacher.logits, n_t, 2)
            zt = teacher.logits.detach().to(device=device, dtype=dtype) / temperature
            t_lse = torch.logsumexp(zt, dim=-1)
            t_tok = zt.gather(-1, batch.teacher_ids.unsqueeze(-1)).squeeze(-1) - t_lse
            t_first = zt[t_first_pos] - t_lse[t_first_pos].unsqueeze(-1)
        elif isinstance(teacher, TeacherTopK):
            _check_rows("teacher.topk_ids", teacher.topk_ids, n_t, 2)
            _check_rows("teacher.topk_logprobs", teacher.topk_logprobs, n_t, 2)
            _check_rows("teacher.token_logprobs", teacher.token_logprobs, n_t, 1)
            if teacher.topk_ids.shape != teacher.topk_logprobs.shape:
                raise ValueError(
                    "teacher.topk_ids and teacher.topk_logprobs must have the same shape [tokens, K]"
                )
            if teacher.temperature != temperature:
                raise ValueError(
                    f"the teacher's top-K log-probabilities were computed at temperature "
                    f"{teacher.temperature} but the loss runs at {temperature}; the chain rule over a "
                    "group needs the teacher's "
                    "normalized probabilities at the loss temperature (cache the teacher at that temperature)"
                )
            teacher = TeacherTopK(
                teacher.topk_ids.to(device),
                teacher.topk_logprobs.detach().to(device=device, dtype=dtype),
                teacher.token_logprobs.detach().to(device=device, dtype=dtype),
                teacher.temperature,
            )
            t_tok = teacher.token_logprobs
            t_first = None
        else:
            raise TypeError(f"teacher must be TeacherLogits or TeacherTopK, got {type(teacher).__name__}")
        t_tail = _tail_logprob(t_tok, batch.teacher_group, t_first_pos, n_groups)

    matched = batch.matched
    if batch.vocab is None and bool(matched.any()):
        raise ValueError("batch.matched flags one-to-one groups but the batch has no vocabulary map")
    zero = student_logits.sum() * 0.0
    matched_sum = zero.to(dtype)
    n_matched = int(matched.sum())
    if n_matched:
        assert batch.vocab is not None
        if t_first is not None:
            matched_sum = matched_sum + _matched_full(
                s_first[matched], t_first[matched], batch.vocab, divergence
            )
        else:
            assert isinstance(teacher, TeacherTopK)
            rows = t_first_pos[matched]
            matched_sum = matched_sum + _matched_topk(
                s_first[matched],
                teacher.topk_ids[rows].to(device),
                teacher.topk_logprobs[rows].detach().to(dtype),
                batch.teacher_ids[rows],
                t_tok[rows],
                batch.vocab,
                divergence,
            )

    uld_sum = zero.to(dtype)
    rest = ~matched
    n_uld = int(rest.sum()) if unmatched == "uld" else 0
    if n_uld:
        s_merged = (s_first[rest] + s_tail[rest].unsqueeze(-1)).exp()
        if t_first is not None:
            t_merged = (t_first[rest] + t_tail[rest].unsqueeze(-1)).exp()
            uld_sum = uld_sum + uld_distance(s_merged, t_merged).sum()
        else:
            assert isinstance(teacher, TeacherTopK)
            rows = t_first_pos[rest]
            t_vals = (teacher.topk_logprobs[rows].detach().to(dtype) + t_tail[rest].unsqueeze(-1)).exp()
            uld_sum = uld_sum + _uld_topk(s_merged, t_vals, t_tail[rest].exp()).sum()

    total = matched_sum + uld_weight * uld_sum
    n_compared = n_matched + n_uld
    loss = total / max(n_compared, 1)
    return CrossTokenizerLoss(
        loss=loss,
        total=total,
        matched_sum=matched_sum,
        uld_sum=uld_sum,
        num_compared=n_compared,
        num_matched=n_matched,
        num_uld=n_uld,
        num_student_tokens=n_s,
    )
