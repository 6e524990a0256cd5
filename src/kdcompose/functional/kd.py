"""Any divergence between student and teacher LM-head distributions, in every mode of the engine.

The public entry points of :mod:`kdcompose.functional.engine` (the ``*_generalized_jsd`` functions are
these with ``divergence=GeneralizedJSD(beta)``):

* :func:`divergence_loss` / :func:`divergence_loss_sum` -- from both models' logits ``[..., V]``;
* :func:`fused_linear_divergence_loss` -- from hidden states and LM-head weights (no logits);
* :func:`topk_divergence_loss` -- against a teacher given by its top-K log-probabilities;
* :func:`fused_linear_topk_divergence_loss` -- both of the last two at once.

Shared semantics: ``labels`` has the leading shape, ``-100`` = ignored, already aligned (no shift);
both sides are divided by ``temperature`` (no ``T^2`` factor); the value is the per-position
divergence averaged over the positions that count (a graph-connected 0 when none does);
softmax math in fp32 (fp64 for fp64 inputs); only the student gets gradients, computed during
forward and handed to autograd on the first backward (backpropagating twice raises).
``divergence`` is a :class:`~kdcompose.functional.divergences.Divergence`, a registered name or a
``{"kind": NAME, ...}`` mapping. ``tokens`` (:class:`~kdcompose.functional.engine.TokenSelection`)
keeps only a fraction of the positions and averages over those. ``vocab_parallel``
(:class:`~kdcompose.functional.engine.VocabParallel`) runs on a vocabulary slice per rank.
Logits must be finite at the positions that count (anything at ignored positions is harmless).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdcompose.functional._checks import (
    IGNORE_INDEX,
    check_chunk_size,
    check_floating,
    check_k,
    check_labels,
    check_linear,
    check_logits_pair,
    check_missing_mass,
    check_temperature,
    check_topk,
    compute_dtype,
    empty_zero,
)
from kdcompose.functional.compiled import compile_issue, compiled_body
from kdcompose.functional.divergences import Divergence, get_divergence
from kdcompose.functional.engine import RENORM_ROWS, WORK_ROWS, Job, auto_chunk, execute, work_rows
from kdcompose.functional.grads import LinearGrad, LogitsGrad
from kdcompose.functional.sources import (
    FullTeacher,
    LinearStudent,
    LocalTopk,
    LogitsStudent,
    TopkRows,
    valid_rows,
)
from kdcompose.functional.tokens import TokenSelection, select_rows
from kdcompose.functional.vocab_parallel import VocabParallel

DivergenceSpec = Divergence | str | Mapping[str, Any]


@dataclass
class KdResult:
    """What one call computed: the value, the count it is a mean over, and diagnostics."""

    value: Tensor
    count: int
    """Positions the value averages over (the kept ones with ``tokens``)."""
    n_valid: int
    """Positions that count before token selection."""
    stats: dict[str, Tensor] = field(default_factory=dict)


def _divergence(divergence: DivergenceSpec) -> Divergence:
    return get_divergence(divergence)


def _check_tokens(tokens: TokenSelection | None) -> TokenSelection | None:
    if tokens is not None and not isinstance(tokens, TokenSelection):
        raise ValueError(f"tokens must be a TokenSelection or None, got {type(tokens).__name__}")
    return tokens


def _check_parallel(parallel: VocabParallel | None) -> VocabParallel | None:
    if parallel is None:
        return None
    if not isinstance(parallel, VocabParallel):
        raise ValueError(f"vocab_parallel must be a VocabParallel or None, got {type(parallel).__name__}")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError("vocab_parallel needs an initialized torch.distributed process group")
    return parallel


def _compiled(
    compile: bool, div: Divergence, temperature: float, dtype: torch.dtype, parallel: VocabParallel | None
):
    if not compile:
        return None
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if parallel is not None:
        raise ValueError("compile=True does not support vocab_parallel (collectives inside a compiled body)")
    issue = compile_issue(div)
    if issue is not None:
        raise ValueError(issue)
    return compiled_body(div, temperature, dtype)


def _narrow(index: Tensor | None, kept: Tensor) -> Tensor:
    return kept if index is None else index[kept]


# --------------------------------------------------------------------------------------------
# From logits
# --------------------------------------------------------------------------------------------


def logits_result(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    *,
    divergence: DivergenceSpec,
    temperature: float,
    chunk_size: int | None,
    normalize: bool = True,
    tokens: TokenSelection | None = None,
    vocab_parallel: VocabParallel | None = None,
    name: str = "divergence_loss",
    compile: bool = False,
) -> KdResult:
    check_logits_pair(student_logits, teacher_logits, labels)
    div = _divergence(divergence)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    tokens, parallel = _check_tokens(tokens), _check_parallel(vocab_parallel)
    dtype = compute_dtype(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    n_positions = student_logits.numel() // max(1, vocab)
    index, n_valid = valid_rows(labels, n_positions, student_logits.device)
    if n_valid == 0 or vocab == 0:
        return KdResult(empty_zero(student_logits, dtype), 0, n_valid)
    chunk = chunk_size or auto_chunk(vocab, dtype, student_logits.device, work_rows(div))
    teacher_logits = teacher_logits.detach()
    body = _compiled(compile, div, temperature, dtype, parallel)

    def job(n: int) -> Job:
        scale = 1.0 / n if normalize else 1.0
        return Job(div, temperature, "full", n, scale, chunk, dtype, parallel, name, compiled=body)

    n = n_valid
    if tokens is not None:
        kept = select_rows(
            job(n),
            LogitsStudent(student_logits.detach(), index),
            FullTeacher(LogitsStudent(teacher_logits, index)),
            tokens,
        )
        index, n = _narrow(index, kept), int(kept.numel())
    want = torch.is_grad_enabled() and student_logits.requires_grad
    student = LogitsStudent(student_logits, index)
    teacher = FullTeacher(LogitsStudent(teacher_logits, index))
    sink = LogitsGrad(student, index, n, dtype, None) if want else None
    value = execute(job(n), student, teacher, sink, (student_logits,), student_logits.device)
    return KdResult(value, n, n_valid, {"kept_frac": torch.tensor(n / n_valid)} if tokens else {})


def divergence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: DivergenceSpec,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    tokens: TokenSelection | None = None,
    vocab_parallel: VocabParallel | None = None,
    compile: bool = False,
) -> Tensor:
    """``divergence`` between the student's and the teacher's token distributions, averaged over the
    positions that count (see the module docstring).

    ``chunk_size``: tokens per chunk; ``None`` picks ``max(1, budget // (4 * V * 4 bytes))`` (32 MiB
    on a CPU, 512 MiB on an accelerator). The result does not depend on it beyond float rounding.
    ``compile``: run the chunk body through ``torch.compile`` (:mod:`kdcompose.functional.compiled`).
    """
    return logits_result(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        temperature=temperature,
        chunk_size=chunk_size,
        tokens=tokens,
        vocab_parallel=vocab_parallel,
        compile=compile,
    ).value


def divergence_loss_sum(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: DivergenceSpec,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    tokens: TokenSelection | None = None,
    vocab_parallel: VocabParallel | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(sum over the positions that count, their number)`` (int64 0-d), to normalise by a global
    count: ``sum / all_reduce(count).clamp_min(1)``. Same arguments as :func:`divergence_loss`."""
    result = logits_result(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        temperature=temperature,
        chunk_size=chunk_size,
        normalize=False,
        tokens=tokens,
        vocab_parallel=vocab_parallel,
        name="divergence_loss_sum",
        compile=compile,
    )
    return result.value, torch.tensor(result.count, dtype=torch.int64, device=student_logits.device)


# --------------------------------------------------------------------------------------------
# From hidden states and LM-head weights
# --------------------------------------------------------------------------------------------


def _linear_zero(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    zero = empty_zero(hidden, dtype) + empty_zero(weight, dtype)
    return zero if bias is None else zero + empty_zero(bias, dtype)


def _wants(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    on = torch.is_grad_enabled()
    return (
        on and hidden.requires_grad,
        on and weight.requires_grad,
        on and bias is not None and bias.requires_grad,
    )


def fused_result(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None,
    *,
    divergence: DivergenceSpec,
    temperature: float,
    chunk_size: int | None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    tokens: TokenSelection | None = None,
    vocab_parallel: VocabParallel | None = None,
    name: str = "fused_linear_divergence_loss",
    compile: bool = False,
) -> KdResult:
    check_linear("student", student_hidden, student_weight, student_bias)
    check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student_weight has {student_weight.shape[0]} vocabulary rows and teacher_weight "
            f"{teacher_weight.shape[0]}; align the vocabularies (slice or pad the extra rows) before calling"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must have the same leading (token) shape"
        )
    check_labels(labels, student_hidden.shape[:-1], "hidden states'")
    div = _divergence(divergence)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    tokens, parallel = _check_tokens(tokens), _check_parallel(vocab_parallel)
    dtype = compute_dtype(student_weight, teacher_weight)
    vocab = student_weight.shape[0]
    n_positions = student_hidden.numel() // max(1, student_hidden.shape[-1])
    index, n_valid = valid_rows(labels, n_positions, student_hidden.device)
    if n_valid == 0 or vocab == 0:
        return KdResult(_linear_zero(student_hidden, student_weight, student_bias, dtype), 0, n_valid)
    chunk = chunk_size or auto_chunk(vocab, dtype, student_hidden.device, work_rows(div), fused=True)
    t_hidden, t_weight = teacher_hidden.detach(), teacher_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    body = _compiled(compile, div, temperature, dtype, parallel)

    def job(n: int) -> Job:
        return Job(div, temperature, "full", n, 1.0 / n, chunk, dtype, parallel, name, compiled=body)

    def teacher(idx: Tensor | None) -> FullTeacher:
        return FullTeacher(LinearStudent(t_hidden, t_weight, t_bias, idx))

    n = n_valid
    if tokens is not None:
        s_bias = None if student_bias is None else student_bias.detach()
        probe = LinearStudent(student_hidden.detach(), student_weight.detach(), s_bias, index)
        kept = select_rows(job(n), probe, teacher(index), tokens)
        index, n = _narrow(index, kept), int(kept.numel())
    student = LinearStudent(student_hidden, student_weight, student_bias, index)
    sink = LinearGrad(student, index, dtype, _wants(student_hidden, student_weight, student_bias))
    value = execute(
        job(n),
        student,
        teacher(index),
        sink,
        (student_hidden, student_weight, student_bias),
        student_hidden.device,
    )
    return KdResult(value, n, n_valid, {"kept_frac": torch.tensor(n / n_valid)} if tokens else {})


def fused_linear_divergence_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: DivergenceSpec,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    tokens: TokenSelection | None = None,
    vocab_parallel: VocabParallel | None = None,
    compile: bool = False,
) -> Tensor:
    """:func:`divergence_loss` of ``hidden @ weight.T + bias`` for both models, without materialising
    the logits: they are built one chunk of positions at a time, the gradients w.r.t. the student's
    hidden states, weight and bias accumulated in forward. Weights are ``[V, H]`` (``nn.Linear``
    layout) with the same ``V``; the teacher side never gets gradients. ``chunk_size`` ``None``:
    ``max(1, budget // (4 * V * 4 bytes))`` with 192 MiB on a CPU, 1 GiB on an accelerator.
    With ``vocab_parallel`` each rank passes its own rows of both heads (and of the biases).
    """
    return fused_result(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        divergence=divergence,
        temperature=temperature,
        chunk_size=chunk_size,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        tokens=tokens,
        vocab_parallel=vocab_parallel,
        compile=compile,
    ).value


# --------------------------------------------------------------------------------------------
# Top-K teachers
# --------------------------------------------------------------------------------------------


def select_topk_rows(
    lp: Tensor, ids: Tensor, labels: Tensor | None, vocab: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor | None, int, TopkRows]:
    """``(index or None, n_valid, rows)`` of the positions that count against a given top-K.

    A position counts when its label is not -100 and not all its K values are infinite (ms-swift's
    "uncovered"). Absent entries (value -inf) get the id of the row's first present entry, so every
    id can be gathered and scattered to; their contributions are exactly 0.
    """
    k = lp.shape[-1]
    lp_flat = lp.detach().reshape(-1, k).to(device)
    ids_flat = ids.reshape(-1, k).to(device)
    valid = ~torch.isinf(lp_flat).all(-1)
    if labels is not None:
        valid &= labels.reshape(-1).to(device) != IGNORE_INDEX
    n_positions = lp_flat.shape[0]
    index: Tensor | None = valid.nonzero().squeeze(1)
    n_valid = int(index.numel())
    if n_valid == n_positions:
        index = None
    else:
        lp_flat, ids_flat = lp_flat[index], ids_flat[index]
    lp_rows = lp_flat.to(dtype)
    present = ~torch.isneginf(lp_rows)
    bad = present & ((ids_flat < 0) | (ids_flat >= vocab))
    if n_valid and bool(bad.any()):
        bad_id = int(ids_flat[bad][0])
        raise ValueError(
            f"teacher_topk_ids must be token ids in [0, {vocab}) wherever the log-prob is finite, "
            f"got {bad_id}; "
            "align the teacher's vocabulary with the student's (or give padded entries a -inf log-prob)"
        )
    first = present.to(torch.int8).argmax(-1, keepdim=True)
    safe = torch.where(present, ids_flat, torch.gather(ids_flat, 1, first)).to(torch.int64)
    return index, n_valid, TopkRows(lp_rows, safe, present)


def check_divergence_mode(div: Divergence, missing_mass: str) -> None:
    issue = div.missing_mass_issue(missing_mass)
    if issue is not None:
        raise ValueError(issue)


def topk_result(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    labels: Tensor | None,
    *,
    divergence: DivergenceSpec,
    temperature: float,
    missing_mass: str,
    chunk_size: int | None,
    normalize: bool = True,
    tokens: TokenSelection | None = None,
    name: str = "topk_divergence_loss",
    mode_check: Any = None,
) -> KdResult:
    check_floating("student_logits", student_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    leading = student_logits.shape[:-1]
    check_topk(teacher_topk_logprobs, teacher_topk_ids, leading, "student_logits'")
    check_labels(labels, leading, "logits'")
    div = _divergence(divergence)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    mode = check_missing_mass(missing_mass)
    (mode_check or check_divergence_mode)(div, mode)
    tokens = _check_tokens(tokens)
    dtype = compute_dtype(student_logits, teacher_topk_logprobs)
    vocab, k = student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    index, n_valid, rows = select_topk_rows(
        teacher_topk_logprobs, teacher_topk_ids, labels, vocab, student_logits.device, dtype
    )
    if n_valid == 0 or vocab == 0:
        return KdResult(empty_zero(student_logits, dtype), 0, n_valid)
    if mode == "renorm":
        chunk = chunk_size or auto_chunk(k, dtype, student_logits.device, RENORM_ROWS)
    else:
        chunk = chunk_size or auto_chunk(vocab, dtype, student_logits.device, WORK_ROWS)

    def job(n: int) -> Job:
        return Job(div, temperature, mode, n, 1.0 / n if normalize else 1.0, chunk, dtype, None, name)

    n = n_valid
    if tokens is not None:
        kept = select_rows(job(n), LogitsStudent(student_logits.detach(), index), rows, tokens)
        index, n, rows = _narrow(index, kept), int(kept.numel()), rows.select(kept)
    want = torch.is_grad_enabled() and student_logits.requires_grad
    student = LogitsStudent(student_logits, index)
    sink = LogitsGrad(student, index, n, dtype, k if mode == "renorm" else None) if want else None
    value = execute(job(n), student, rows, sink, (student_logits,), student_logits.device)
    return KdResult(value, n, n_valid, {"kept_frac": torch.tensor(n / n_valid)} if tokens else {})


def topk_divergence_loss(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: DivergenceSpec,
    temperature: float = 1.0,
    missing_mass: str = "renorm",
    chunk_size: int | None = None,
    tokens: TokenSelection | None = None,
) -> Tensor:
    """``divergence`` against a teacher given by its top-K ``(log-probabilities, ids)`` ``[..., K]``.

    ``missing_mass`` as :func:`kdcompose.functional.topk_generalized_jsd`: ``renorm`` (both sides
    over the K ids; teacher values are any per-row shift of its logits, divided by ``temperature``),
    ``tail`` (a K+1-th bucket; values are the teacher's full-vocabulary log-probabilities at the
    training temperature) or ``zero`` (the teacher renormalized over its K ids against the student's
    full distribution; only divergences finite against a teacher with zeros, see
    :meth:`Divergence.missing_mass_issue`). ``-inf`` entries are absent; all-``-inf`` positions
    are ignored (dropped from the mean's count).
    """
    return topk_result(
        student_logits,
        teacher_topk_logprobs,
        teacher_topk_ids,
        labels,
        divergence=divergence,
        temperature=temperature,
        missing_mass=missing_mass,
        chunk_size=chunk_size,
        tokens=tokens,
    ).value


def fused_topk_result(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor | None,
    *,
    divergence: DivergenceSpec,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    k: int | None = None,
    temperature: float = 1.0,
    missing_mass: str = "renorm",
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    tokens: TokenSelection | None = None,
    name: str = "fused_linear_topk_divergence_loss",
    mode_check: Any = None,
) -> KdResult:
    """Engine call behind the fused top-K functions; ``stats["topk_mass"]`` is the mean covered mass."""
    check_linear("student", student_hidden, student_weight, student_bias)
    leading = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    local = teacher_hidden is not None or teacher_weight is not None
    given = teacher_topk_logprobs is not None or teacher_topk_ids is not None
    if local == given:
        raise ValueError(
            "pass either teacher_hidden + teacher_weight (+ k) for a local teacher, or "
            "teacher_topk_logprobs + teacher_topk_ids for a given top-K (cache or server), not "
            f"{'both' if given else 'neither'}"
        )
    if local:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a local teacher needs both teacher_hidden and teacher_weight")
        check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"student_weight has {vocab} vocabulary rows and teacher_weight {teacher_weight.shape[0]}; "
                "align the vocabularies (slice or pad the extra rows) before calling"
            )
        if teacher_hidden.shape[:-1] != leading:
            raise ValueError(
                f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                f"{tuple(teacher_hidden.shape)} must have the same leading (token) shape"
            )
        if k is None:
            raise ValueError("k (teacher tokens kept per position) is required with a local teacher")
        k = check_k(k, vocab)
    else:
        if teacher_topk_logprobs is None or teacher_topk_ids is None:
            raise ValueError("a given top-K teacher needs both teacher_topk_logprobs and teacher_topk_ids")
        check_topk(teacher_topk_logprobs, teacher_topk_ids, leading, "student_hidden's")
        if k is not None and k != teacher_topk_logprobs.shape[-1]:
            raise ValueError(
                f"k={k} does not match teacher_topk_logprobs' last dimension "
                f"{teacher_topk_logprobs.shape[-1]}; leave k unset with a given top-K"
            )
        k = teacher_topk_logprobs.shape[-1]
    check_labels(labels, leading, "hidden states'")
    div = _divergence(divergence)
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    mode = check_missing_mass(missing_mass)
    (mode_check or check_divergence_mode)(div, mode)
    tokens = _check_tokens(tokens)

    device = student_hidden.device
    dtype = compute_dtype(student_weight, teacher_weight, teacher_topk_logprobs)
    rows: TopkRows | None = None
    if local:
        n_positions = student_hidden.numel() // max(1, student_hidden.shape[-1])
        index, n_valid = valid_rows(labels, n_positions, device)
    else:
        assert teacher_topk_logprobs is not None and teacher_topk_ids is not None
        index, n_valid, rows = select_topk_rows(
            teacher_topk_logprobs, teacher_topk_ids, labels, vocab, device, dtype
        )
    if n_valid == 0 or vocab == 0:
        zero = _linear_zero(student_hidden, student_weight, student_bias, dtype)
        return KdResult(zero, 0, n_valid, {"topk_mass": torch.zeros((), device=device)} if local else {})

    dense = mode != "renorm"
    width, rows_per_token = (vocab, WORK_ROWS) if dense or local else (k * student_weight.shape[1], 3)
    chunk = chunk_size or auto_chunk(width, dtype, device, rows_per_token, fused=True)

    def job(n: int) -> Job:
        return Job(div, temperature, mode, n, 1.0 / n, chunk, dtype, None, name)

    def teacher(idx: Tensor | None) -> TopkRows | LocalTopk:
        if rows is not None:
            return rows
        assert teacher_hidden is not None and teacher_weight is not None and k is not None
        t_bias = None if teacher_bias is None else teacher_bias.detach()
        source = FullTeacher(LinearStudent(teacher_hidden.detach(), teacher_weight.detach(), t_bias, idx))
        return LocalTopk(source, k, 1.0 if mode == "renorm" else temperature, dtype)

    n = n_valid
    if tokens is not None:
        s_bias = None if student_bias is None else student_bias.detach()
        probe = LinearStudent(student_hidden.detach(), student_weight.detach(), s_bias, index)
        kept = select_rows(job(n), probe, teacher(index), tokens)
        index, n = _narrow(index, kept), int(kept.numel())
        if rows is not None:
            rows = rows.select(kept)
    student = LinearStudent(student_hidden, student_weight, student_bias, index)
    sink = LinearGrad(student, index, dtype, _wants(student_hidden, student_weight, student_bias))
    the_job, the_teacher = job(n), teacher(index)
    value = execute(
        the_job, student, the_teacher, sink, (student_hidden, student_weight, student_bias), device
    )
    stats: dict[str, Tensor] = {}
    if local:
        mass = the_job.stats.get("topk_mass_sum")
        stats["topk_mass"] = (
            (mass / n if mass is not None else torch.zeros((), device=device)).detach().float()
        )
    if tokens is not None:
        stats["kept_frac"] = torch.tensor(n / n_valid)
    return KdResult(value, n, n_valid, stats)


def fused_linear_topk_divergence_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: DivergenceSpec,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    k: int | None = None,
    temperature: float = 1.0,
    missing_mass: str = "renorm",
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    tokens: TokenSelection | None = None,
) -> Tensor:
    """:func:`topk_divergence_loss` from the student's hidden states and LM-head weight, chunk by chunk;
    the teacher is a local model (``teacher_hidden`` + ``teacher_weight`` and ``k``: its top-K is taken
    per chunk) or given top-K. With ``renorm`` and a given top-K no ``[chunk, V]`` tensor exists at all.
    Same teacher conventions as :func:`kdcompose.functional.fused_linear_topk_generalized_jsd`."""
    return fused_topk_result(
        student_hidden,
        student_weight,
        labels,
        divergence=divergence,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_ids=teacher_topk_ids,
        k=k,
        temperature=temperature,
        missing_mass=missing_mass,
        chunk_size=chunk_size,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        tokens=tokens,
    ).value
