"""Generalized JSD against a teacher given only by its top-K log-probabilities (ids + values).

A teacher cache, a teacher server or a memory-saving local teacher hands over, per position, the
K most likely token ids and their log-probabilities instead of the full ``[V]`` distribution.
What to do with the probability outside those K tokens changes the objective, so it is a
named choice (``missing_mass``); the three peers each picked one:

``renorm`` (default, ms-swift 4.6 ``gkd_logits_topk``)
    Both sides are restricted to the K ids and renormalized there: the student's logits are
    gathered at the ids, both sides divided by ``temperature`` and log-softmaxed over the K
    entries, then the generalized JSD of those two K-point distributions. The teacher values
    may be raw logits or log-probabilities at temperature 1 (a per-row constant cancels in the
    renormalization); they are divided by ``temperature`` like ms-swift does. The student's
    gradient lives on the K ids only.
``tail`` (TRL's top-k GKD)
    A (K+1)-th bucket holds the mass outside the top K on both sides. Student: the full-
    vocabulary ``softmax(logits / T)`` at the ids, its tail ``1 - sum p_k`` computed as the
    log-sum-exp over the *other* ids (exact, no cancellation). Teacher: the given values are its
    full-vocabulary log-probabilities **at the training temperature** (they are not rescaled
    here; a local teacher computes ``teacher_topk(logits, K, temperature=T)``; values cached or
    served at T = 1 are valid only with ``temperature == 1``), tail ``1 - sum exp(lp)``.
``zero`` (DistillKit / axolotl)
    The teacher is truncated to its top K and renormalized (``q = softmax_K(lp)``); the student
    keeps its full-vocabulary distribution ``p = softmax(logits / T)``; the loss is
    ``sum_k q_k (log q_k - log p_{id_k})`` = KL(q || p) over the K ids. Only a forward KL is
    meaningful against a distribution with holes, so ``beta`` must be 0. Values are taken at the
    training temperature, as for ``tail``.

Padding and coverage: an entry whose teacher log-probability is ``-inf`` is absent (its id is
ignored on both sides, so padded or duplicated padding ids are harmless); the ids of the finite
entries of one position must be distinct (a teacher client must drop vLLM's extra "actual token"
entry when it repeats a top-K id). A position whose K values are all infinite is "uncovered" and
is dropped from the sum *and* the count, exactly like ms-swift's ``extract_active``.

Engineering as :mod:`kdcompose.functional.jsd`: fp32 math whatever the input precision, a custom
autograd function that computes the closed-form student gradient during forward, chunk by chunk
over the valid tokens, and hands it to autograd on the first backward. For ``renorm`` the stored
gradient is ``[tokens, K]`` (scattered into the logits' shape in backward); ``tail``/``zero``
touch the whole vocabulary and store ``[tokens, V]`` like the full JSD.

Gradient (z = raw student logits, s = softmax(z / T), p_b / q_b bucket probabilities, D the
divergence, g_b = dD/dp_b): ``a_b = p_b (g_b - <p, g>)`` is the gradient w.r.t. the log-odds
of bucket b; then dD/dz_j = a_{b(j)} * s_j / p_{b(j)} / T (for ``renorm`` and the id buckets
s_j = p_b, so dD/dz_{id_b} = a_b / T; the tail bucket spreads a_tail in proportion to s_j).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdcompose.functional.fused_jsd import (
    AUTO_FUSED_CHUNK_BYTES_ACCELERATOR,
    AUTO_FUSED_CHUNK_BYTES_CPU,
    _add_linear_grads,
    _check_linear,
    _linear_into,
)
from kdcompose.functional.jsd import (
    AUTO_CHUNK_BYTES_ACCELERATOR,
    AUTO_CHUNK_BYTES_CPU,
    IGNORE_INDEX,
    _auto_chunk,
    _check_beta,
    _check_chunk_size,
    _check_floating,
    _check_labels,
    _check_temperature,
    _compute_dtype,
    _empty_zero,
    _no_autocast,
    _Rows,
    _scale_by,
    _take_grad,
)

MISSING_MASS_MODES = ("renorm", "tail", "zero")
_NEG_INF = float("-inf")
# Work rows (of K entries) per token for the renorm path's auto chunk rule.
_RENORM_ROWS = 16


# --------------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------------


def _check_mode(missing_mass: str, beta: float) -> str:
    if missing_mass not in MISSING_MASS_MODES:
        raise ValueError(
            f"missing_mass must be one of {', '.join(MISSING_MASS_MODES)} (renorm: renormalize both sides "
            f"over the teacher's top-K, as ms-swift; tail: a bucket for the rest, as TRL; zero: truncated "
            f"teacher vs full student, as DistillKit), got {missing_mass!r}"
        )
    if missing_mass == "zero" and beta != 0.0:
        raise ValueError(
            f"missing_mass='zero' compares a truncated teacher with the student's full distribution, "
            f"which is only meaningful as KL(teacher||student): beta must be 0, got beta={beta}. "
            "Set beta=0, or use missing_mass='renorm' or 'tail' for another beta."
        )
    return missing_mass


def _check_k(k: int, vocab: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"{name} must be a positive int (teacher tokens kept per position), got {k!r}")
    if not 1 <= k <= vocab:
        raise ValueError(f"{name} must be in [1, vocabulary size {vocab}], got {k}")
    return int(k)


def _check_topk(lp: Tensor, ids: Tensor, leading: torch.Size, what: str) -> None:
    _check_floating("teacher_topk_logprobs", lp)
    if not isinstance(ids, Tensor):
        raise ValueError(f"teacher_topk_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"teacher_topk_ids must be an integer tensor (int64 token ids), got dtype {ids.dtype}"
        )
    if lp.shape != ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(lp.shape)} and teacher_topk_ids {tuple(ids.shape)} must have "
            "the same shape [..., K]"
        )
    if lp.dim() < 1 or lp.shape[-1] < 1:
        raise ValueError(f"teacher_topk_logprobs must be [..., K] with K >= 1, got {tuple(lp.shape)}")
    if lp.shape[:-1] != leading:
        raise ValueError(
            f"teacher_topk_logprobs' leading shape {tuple(lp.shape[:-1])} must equal the {what} leading "
            f"shape {tuple(leading)} (one top-K row per position, aligned, no shifting)"
        )


# --------------------------------------------------------------------------------------------
# Valid rows and the per-row teacher tensors
# --------------------------------------------------------------------------------------------


def _select_rows(
    lp: Tensor, ids: Tensor, labels: Tensor | None, vocab: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor | None, int, Tensor, Tensor, Tensor]:
    """``(index or None, n_valid, lp [n, K], safe ids [n, K], present [n, K])`` of the valid rows.

    A row is valid when its label is not -100 and not all its K values are infinite (ms-swift's
    "uncovered"). Absent entries (value -inf) get the id of the row's first present entry, so
    every id can be gathered and scattered to; their contributions are exactly 0.
    """
    k = lp.shape[-1]
    lp_flat = lp.detach().reshape(-1, k).to(device)
    ids_flat = ids.reshape(-1, k).to(device)
    valid = ~torch.isinf(lp_flat).all(-1)
    if labels is not None:
        valid &= labels.reshape(-1).to(device) != IGNORE_INDEX
    n_positions = lp_flat.shape[0]
    index = valid.nonzero().squeeze(1)
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
    return index, n_valid, lp_rows, safe, present


def _row_lse(x: Tensor, scratch: Tensor) -> Tensor:
    """Per-row log-sum-exp through a work buffer (``scratch`` may be ``x``); all -inf -> -inf."""
    m = x.amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.sub(x, m.unsqueeze(-1), out=scratch).exp_().sum(-1).log_().add_(m)


def _teacher_log_tail(lt_k: Tensor) -> Tensor:
    """``log(1 - sum_k exp(lt_k))`` per row, the teacher's mass outside its top-K, in float64
    (``[c, K]``: negligible next to the ``[c, V]`` work) where the device has it.

    Why: when the top-K holds nearly all the mass, float32 loses the tail to cancellation
    (``logsumexp`` of the top-K is a difference of O(1) terms near 0): with a 0.998 top-K mass
    the float32 tail was 2.5e-5 off relatively, which put 8e-6 on a 0.19 gradient; in float64
    the kernel matches the float64 oracle within 5e-7 on the same inputs.
    """
    wide = lt_k.float() if lt_k.device.type == "mps" else lt_k.double()
    return _log_one_minus(torch.logsumexp(wide, dim=-1)).to(lt_k.dtype)


def _log_one_minus(log_mass: Tensor) -> Tensor:
    """``log(1 - exp(log_mass))`` clamped to the smallest normal float (never -inf or NaN)."""
    tiny = torch.finfo(log_mass.dtype).tiny
    return torch.log(torch.clamp(-torch.expm1(log_mass), min=tiny))


# --------------------------------------------------------------------------------------------
# Per-chunk divergence over buckets
# --------------------------------------------------------------------------------------------


def _bucket_jsd(
    ls: Tensor, lt: Tensor, present: Tensor, beta: float, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Generalized JSD per row over ``B`` buckets, and ``a_b = p_b (dD/dp_b - <p, dD/dp>)``.

    ``ls``/``lt``: student/teacher bucket log-probabilities ``[c, B]`` (-inf at absent entries).
    Absent entries contribute exactly 0 to the value and get ``a = 0``.
    """
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    ls0 = torch.where(present, ls, zero)
    lt0 = torch.where(present, lt, zero)
    p = torch.where(present, ls.exp(), zero)
    q = torch.where(present, lt.exp(), zero)
    if beta == 0.0:
        per_row = torch.where(present, q * (lt0 - ls0), zero).sum(-1)
        a = p * q.sum(-1, keepdim=True) - q if want_grad else None
        return per_row, a
    if beta == 1.0:
        g = torch.where(present, ls0 - lt0, zero)
        per_row = (p * g).sum(-1)
        a = p * (g - per_row.unsqueeze(-1)) if want_grad else None
        return per_row, a
    tiny = torch.finfo(ls.dtype).tiny
    lm = torch.log(torch.clamp((1.0 - beta) * p + beta * q, min=tiny))
    kl_t = torch.where(present, q * (lt0 - lm), zero).sum(-1)
    g = torch.where(present, ls0 - lm, zero)
    kl_s = (p * g).sum(-1)
    per_row = beta * kl_t + (1.0 - beta) * kl_s
    a = (1.0 - beta) * p * (g - kl_s.unsqueeze(-1)) if want_grad else None
    return per_row, a


def _renorm_chunk(
    zk: Tensor, lp: Tensor, present: Tensor, beta: float, temperature: float, coef: float, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """renorm: student logits at the ids ``zk [c, K]`` -> (per-row JSD, ``coef * a`` or None)."""
    neg_inf = torch.full((), _NEG_INF, dtype=lp.dtype, device=lp.device)
    ls = torch.log_softmax(torch.where(present, zk.to(lp.dtype) / temperature, neg_inf), dim=-1)
    lt = torch.log_softmax(torch.where(present, lp / temperature, neg_inf), dim=-1)
    per_row, a = _bucket_jsd(ls, lt, present, beta, want_grad)
    return per_row, None if a is None else a.mul_(coef)


def _dense_chunk(
    mode: str,
    z: Tensor,
    work: list[Tensor],
    lp: Tensor,
    ids: Tensor,
    present: Tensor,
    beta: float,
    temperature: float,
    coef: float,
    grad_out: Tensor | None,
) -> Tensor:
    """tail / zero: raw student logits ``z [c, V]`` -> per-row value; gradient into ``grad_out``.

    ``work``: two ``[c, V]`` buffers in the compute dtype (``z`` may be ``work[0]``); ``grad_out``
    may be ``work[1]``. Nothing else logits-sized is allocated.
    """
    w0, w1 = work[0], work[1]
    if z.data_ptr() != w0.data_ptr() or z.dtype != w0.dtype:
        w0.copy_(z)
    if temperature != 1.0:
        w0.div_(temperature)
    lse = _row_lse(w0, w1)
    neg_inf = torch.full((), _NEG_INF, dtype=w0.dtype, device=w0.device)
    ls_k = torch.where(present, torch.gather(w0, 1, ids) - lse.unsqueeze(-1), neg_inf)
    lt_k = torch.where(present, lp, neg_inf)
    want_grad = grad_out is not None
    target = None
    if want_grad:
        target = grad_out if grad_out.dtype == w0.dtype else w1

    if mode == "zero":
        lt_k = torch.log_softmax(lt_k, dim=-1)
        per_row, _ = _bucket_jsd(ls_k, lt_k, present, 0.0, False)
        if target is not None:
            q = torch.where(present, lt_k.exp(), torch.zeros_like(lt_k))
            torch.sub(w0, lse.unsqueeze(-1), out=target).exp_().mul_(q.sum(-1, keepdim=True) * coef)
            target.scatter_add_(1, ids, q.mul_(-coef))
    else:  # tail
        w1.copy_(w0).scatter_(1, ids, _NEG_INF)
        lse_tail = _row_lse(w1, w1)  # log sum_{j not in ids} exp(z_j / T)
        tiny_log = math.log(torch.finfo(w0.dtype).tiny)
        ls_tail = (lse_tail - lse).clamp_min_(tiny_log)
        lt_tail = _teacher_log_tail(lt_k)
        ones = torch.ones_like(present[:, :1])
        per_row, a = _bucket_jsd(
            torch.cat([ls_k, ls_tail.unsqueeze(-1)], -1),
            torch.cat([lt_k, lt_tail.unsqueeze(-1)], -1),
            torch.cat([present, ones], -1),
            beta,
            want_grad,
        )
        if target is not None:
            assert a is not None
            # Non-id tokens share a_tail in proportion s_j / p_tail = exp(z_j/T - lse_tail) <= 1.
            shift = torch.where(torch.isfinite(lse_tail), lse_tail, torch.full_like(lse_tail, math.inf))
            torch.sub(w0, shift.unsqueeze(-1), out=target).exp_().mul_(a[:, -1:] * coef)
            target.scatter_(1, ids, 0.0).scatter_add_(1, ids, a[:, :-1].mul_(coef))
    if target is not None and target is not grad_out:
        grad_out.copy_(target)
    return per_row


def _divergence_scale(temperature: float, scale: float) -> float:
    """``coef`` passed to the chunk kernels: ``scale`` times the 1/T of the chain rule."""
    return scale / temperature


# --------------------------------------------------------------------------------------------
# Unfused autograd function (from logits)
# --------------------------------------------------------------------------------------------


def _gather_at(rows: _Rows, start: int, end: int, ids: Tensor) -> Tensor:
    """``x[valid_row, ids]`` for rows ``start:end`` of the selection, without reading whole rows."""
    if rows.flat is not None:
        r = torch.arange(start, end, device=ids.device) if rows.index is None else rows.index[start:end]
        return rows.flat[r.unsqueeze(-1), ids]
    assert rows.unravelled is not None
    return rows.x[(*(u[start:end].unsqueeze(-1) for u in rows.unravelled), ids)]


class _TopKJSD(torch.autograd.Function):
    """``scale * sum_valid topk-JSD(student_logits, teacher top-K)``; student grad made in forward."""

    @staticmethod
    def forward(
        ctx,
        student: Tensor,
        lp: Tensor,
        ids: Tensor,
        present: Tensor,
        index: Tensor | None,
        n_valid: int,
        mode: str,
        beta: float,
        temperature: float,
        chunk_size: int | None,
        scale: float,
        want_grad: bool,
    ) -> Tensor:
        vocab, k = student.shape[-1], lp.shape[-1]
        dtype = lp.dtype
        rows = _Rows(student, index)
        coef = _divergence_scale(temperature, scale)
        total = student.new_zeros((), dtype=dtype)
        ctx.index, ctx.shape, ctx.mode, ctx.student_dtype = index, student.shape, mode, student.dtype
        if mode == "renorm":
            chunk = chunk_size or _auto_chunk(
                k, dtype, student.device, _RENORM_ROWS, AUTO_CHUNK_BYTES_CPU, AUTO_CHUNK_BYTES_ACCELERATOR
            )
            grad = student.new_empty((n_valid, k), dtype=dtype) if want_grad else None
            for start in range(0, n_valid, chunk):
                end = min(start + chunk, n_valid)
                zk = _gather_at(rows, start, end, ids[start:end])
                per_row, dz = _renorm_chunk(
                    zk, lp[start:end], present[start:end], beta, temperature, coef, want_grad
                )
                total += per_row.sum()
                if grad is not None:
                    grad[start:end] = dz
            ctx.saved_grad = grad
            ctx.ids = ids
            return total.mul_(scale)

        chunk = chunk_size or _auto_chunk(
            vocab, dtype, student.device, 4, AUTO_CHUNK_BYTES_CPU, AUTO_CHUNK_BYTES_ACCELERATOR
        )
        chunk = min(chunk, n_valid)
        grad = student.new_empty((n_valid, vocab)) if want_grad else None
        work = [student.new_empty((chunk, vocab), dtype=dtype) for _ in range(2)]
        for start in range(0, n_valid, chunk):
            end = min(start + chunk, n_valid)
            c = end - start
            chunk_work = [w[:c] for w in work]
            z = rows.get(start, end, chunk_work[0])
            per_row = _dense_chunk(
                mode,
                z,
                chunk_work,
                lp[start:end],
                ids[start:end],
                present[start:end],
                beta,
                temperature,
                coef,
                None if grad is None else grad[start:end],
            )
            total += per_row.sum()
        del work
        ctx.saved_grad = grad
        return total.mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        none = (None,) * 11
        grad = _take_grad(ctx, "topk_generalized_jsd")
        if grad is None:
            return (None, *none)
        grad = _scale_by(grad, grad_output)
        shape, index, vocab = ctx.shape, ctx.index, ctx.shape[-1]
        if ctx.mode == "renorm":
            full = torch.zeros(shape, dtype=ctx.student_dtype, device=grad.device)
            flat = full.view(-1, vocab)
            rows = index if index is not None else torch.arange(grad.shape[0], device=grad.device)
            rows = rows.unsqueeze(-1).expand_as(ctx.ids)
            flat.index_put_((rows, ctx.ids), grad.to(full.dtype), accumulate=True)
            ctx.ids = None
            return (full, *none)
        if index is None:
            return (grad.view(shape), *none)
        full = grad.new_zeros(shape)
        full.view(-1, vocab).index_copy_(0, index, grad)
        del grad
        return (full, *none)


# --------------------------------------------------------------------------------------------
# Public API: from logits
# --------------------------------------------------------------------------------------------


def _topk_total(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    labels: Tensor | None,
    beta: float,
    temperature: float,
    missing_mass: str,
    chunk_size: int | None,
    normalize: bool,
) -> tuple[Tensor, int]:
    _check_floating("student_logits", student_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    leading = student_logits.shape[:-1]
    _check_topk(teacher_topk_logprobs, teacher_topk_ids, leading, "student_logits'")
    _check_labels(labels, leading, "logits'")
    beta = _check_beta(beta)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    mode = _check_mode(missing_mass, beta)
    dtype = _compute_dtype(student_logits, teacher_topk_logprobs)
    vocab = student_logits.shape[-1]
    index, n_valid, lp, ids, present = _select_rows(
        teacher_topk_logprobs, teacher_topk_ids, labels, vocab, student_logits.device, dtype
    )
    if n_valid == 0 or vocab == 0:
        return _empty_zero(student_logits, dtype), n_valid
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    scale = 1.0 / n_valid if normalize else 1.0
    with _no_autocast(student_logits.device):
        total = _TopKJSD.apply(
            student_logits, lp, ids, present, index, n_valid,
            mode, beta, temperature, chunk_size, scale, want_grad,
        )  # fmt: skip
    return total, n_valid


def topk_generalized_jsd(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    missing_mass: str = "renorm",
    chunk_size: int | None = None,
) -> Tensor:
    """Generalized JSD against a top-K teacher, averaged over valid positions.

    Args:
        student_logits: ``[..., V]``; the only input that receives a gradient.
        teacher_topk_logprobs: ``[..., K]`` teacher log-probabilities at the K ids (``-inf`` =
            absent entry). ``renorm``: any per-row shift of the teacher's logits (raw logits or
            log-probs at temperature 1); they are divided by ``temperature``. ``tail``/``zero``:
            the teacher's full-vocabulary log-probs *at the training temperature* (not rescaled;
            ``teacher_topk(logits, K, temperature=T)``). Never receives a gradient.
        teacher_topk_ids: ``[..., K]`` integer token ids in ``[0, V)`` (distinct among the finite
            entries of one position; absent entries may hold any id).
        labels: leading shape, aligned (no shifting), ``-100`` = ignored. Positions whose K
            values are all infinite are also ignored (dropped from the mean's count, as ms-swift).
        beta: as :func:`kdcompose.functional.generalized_jsd` (0 = KL(T||S), 1 = KL(S||T), jump
            at the endpoints). ``missing_mass='zero'`` requires ``beta == 0``.
        temperature: see ``teacher_topk_logprobs``; the student's logits are always divided by it.
        missing_mass: ``renorm`` | ``tail`` | ``zero`` (see the module docstring).
        chunk_size: valid tokens per chunk; ``None`` picks it from the vocabulary (``tail``/``zero``,
            same rule as the full JSD) or from K (``renorm``).

    Returns:
        0-d fp32 (fp64 if an input is fp64); a graph-connected 0 when no position is valid. The
        gradient is computed in forward; backpropagating twice through one call raises.
    """
    total, _ = _topk_total(
        student_logits,
        teacher_topk_logprobs,
        teacher_topk_ids,
        labels,
        beta,
        temperature,
        missing_mass,
        chunk_size,
        True,
    )
    return total


def topk_generalized_jsd_sum(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    missing_mass: str = "renorm",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(sum of per-token divergence over valid positions, number of valid positions)``.

    Same arguments as :func:`topk_generalized_jsd`; the count (int64 0-d, on the logits' device)
    excludes ignored and uncovered positions, so ``sum / all_reduce(count).clamp_min(1)`` is
    the global mean.
    """
    total, n_valid = _topk_total(
        student_logits,
        teacher_topk_logprobs,
        teacher_topk_ids,
        labels,
        beta,
        temperature,
        missing_mass,
        chunk_size,
        False,
    )
    return total, torch.tensor(n_valid, dtype=torch.int64, device=student_logits.device)


def _textbook_bucket_jsd(ls: Tensor, lt: Tensor, present: Tensor, beta: float) -> Tensor:
    """Per-row generalized JSD with plain autograd (stacked logsumexp mixture, as TRL)."""
    ls = torch.where(present, ls, torch.zeros_like(ls))
    lt = torch.where(present, lt, torch.zeros_like(lt))
    p = torch.where(present, ls.exp(), torch.zeros_like(ls))
    q = torch.where(present, lt.exp(), torch.zeros_like(lt))
    if beta == 0.0:
        return (q * (lt - ls)).sum(-1)
    if beta == 1.0:
        return (p * (ls - lt)).sum(-1)
    lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), dim=0)
    return beta * (q * (lt - lm)).sum(-1) + (1.0 - beta) * (p * (ls - lm)).sum(-1)


def topk_generalized_jsd_reference(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    missing_mass: str = "renorm",
    chunk_size: int | None = None,
) -> Tensor:
    """Float64 textbook formula with plain autograd: the oracle of the tests.

    Same signature and semantics as :func:`topk_generalized_jsd` (``chunk_size`` validated and
    ignored); returns a float64 0-d tensor. Tails are computed as ``1 - sum`` (clamped).
    """
    _check_floating("student_logits", student_logits)
    leading = student_logits.shape[:-1]
    _check_topk(teacher_topk_logprobs, teacher_topk_ids, leading, "student_logits'")
    _check_labels(labels, leading, "logits'")
    beta = _check_beta(beta)
    temperature = _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    mode = _check_mode(missing_mass, beta)
    vocab = student_logits.shape[-1]
    index, n_valid, lp, ids, present = _select_rows(
        teacher_topk_logprobs, teacher_topk_ids, labels, vocab, student_logits.device, torch.float64
    )
    z = student_logits.to(torch.float64).reshape(-1, vocab)
    if n_valid == 0:
        return _empty_zero(student_logits, torch.float64)
    if index is not None:
        z = z[index]
    lp = lp.detach()
    neg_inf = torch.tensor(_NEG_INF, dtype=torch.float64, device=z.device)
    tiny = torch.finfo(torch.float64).tiny
    if mode == "renorm":
        ls = F.log_softmax(torch.where(present, torch.gather(z, 1, ids) / temperature, neg_inf), dim=-1)
        lt = F.log_softmax(torch.where(present, lp / temperature, neg_inf), dim=-1)
        per_row = _textbook_bucket_jsd(ls, lt, present, beta)
    else:
        log_s = F.log_softmax(z / temperature, dim=-1)
        ls = torch.where(present, torch.gather(log_s, 1, ids), neg_inf)
        lt = torch.where(present, lp, neg_inf)
        if mode == "zero":
            per_row = _textbook_bucket_jsd(ls, F.log_softmax(lt, dim=-1), present, 0.0)
        else:
            p_k = torch.where(present, ls.exp(), torch.zeros_like(ls)).sum(-1, keepdim=True)
            q_k = torch.where(present, lt.exp(), torch.zeros_like(lt)).sum(-1, keepdim=True)
            ls_tail = torch.log(torch.clamp(1.0 - p_k, min=tiny))
            lt_tail = torch.log(torch.clamp(1.0 - q_k, min=tiny))
            present_b = torch.cat([present, torch.ones_like(present[:, :1])], -1)
            per_row = _textbook_bucket_jsd(
                torch.cat([ls, ls_tail], -1), torch.cat([lt, lt_tail], -1), present_b, beta
            )
    return per_row.sum() / n_valid


# --------------------------------------------------------------------------------------------
# Teacher helpers
# --------------------------------------------------------------------------------------------


def teacher_topk(
    teacher_logits: Tensor, k: int, *, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """``topk(log_softmax(teacher_logits / T), k)`` -> ``(logprobs [..., K] fp32, ids [..., K] int64)``.

    What a local teacher feeds to ``tail``/``zero`` at the training temperature, and what a
    cache stores (``temperature=1``). fp64 logits give fp64 log-probs. Rows are processed in
    chunks (``chunk_size`` rows, ``None``: two fp32 vocabulary rows per row within the same
    budget as the JSD), so the fp32 copy of the logits never exists whole. No gradient.
    """
    _check_floating("teacher_logits", teacher_logits)
    if teacher_logits.dim() < 1:
        raise ValueError("teacher_logits must have at least one dimension (the vocabulary)")
    vocab = teacher_logits.shape[-1]
    k = _check_k(k, vocab)
    temperature = _check_temperature(temperature)
    dtype = _compute_dtype(teacher_logits)
    flat = teacher_logits.detach().reshape(-1, vocab)
    n = flat.shape[0]
    values = torch.empty((n, k), dtype=dtype, device=flat.device)
    ids = torch.empty((n, k), dtype=torch.int64, device=flat.device)
    chunk = _check_chunk_size(chunk_size) or _auto_chunk(
        vocab, dtype, flat.device, 2, AUTO_CHUNK_BYTES_CPU, AUTO_CHUNK_BYTES_ACCELERATOR
    )
    with torch.no_grad(), _no_autocast(flat.device):
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            rows = flat[start:end].to(dtype)
            if temperature != 1.0:
                rows = rows / temperature
            torch.topk(torch.log_softmax(rows, dim=-1), k, dim=-1, out=(values[start:end], ids[start:end]))
    shape = (*teacher_logits.shape[:-1], k)
    return values.view(shape), ids.view(shape)


def topk_mass(teacher_topk_logprobs: Tensor, labels: Tensor | None = None) -> Tensor:
    """Mean over non-ignored positions of ``sum_k exp(lp_k)``: teacher probability the top-K covers.

    0-d fp32, no gradient; 0 when no position counts. Uncovered positions (all -inf) count with
    mass 0 (they are ignored by the loss, but they are missing teacher coverage). A value near 1
    means ``renorm``/``tail``/``zero`` barely differ; low mass means the choice matters.
    """
    _check_floating("teacher_topk_logprobs", teacher_topk_logprobs)
    if teacher_topk_logprobs.dim() < 1:
        raise ValueError("teacher_topk_logprobs must be [..., K]")
    _check_labels(labels, teacher_topk_logprobs.shape[:-1], "teacher_topk_logprobs'")
    with torch.no_grad():
        mass = teacher_topk_logprobs.detach().float().exp().sum(-1)
        if labels is not None:
            mass = mass[labels.to(mass.device) != IGNORE_INDEX]
        if mass.numel() == 0:
            return mass.new_zeros(())
        return mass.mean()


# --------------------------------------------------------------------------------------------
# Fused: from hidden states and LM-head weights
# --------------------------------------------------------------------------------------------


class _FusedTopKJSD(torch.autograd.Function):
    """Fused top-K JSD; returns ``(scale * sum_valid value, mass sum)``; student grads in forward."""

    @staticmethod
    def forward(
        ctx,
        s_hidden: Tensor,
        s_weight: Tensor,
        s_bias: Tensor | None,
        t_hidden: Tensor | None,
        t_weight: Tensor | None,
        t_bias: Tensor | None,
        lp_all: Tensor | None,
        ids_all: Tensor | None,
        present_all: Tensor | None,
        index: Tensor | None,
        n_valid: int,
        mode: str,
        beta: float,
        temperature: float,
        k: int,
        chunk_size: int | None,
        scale: float,
        wants: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor]:
        vocab, width = s_weight.shape
        dtype = _compute_dtype(s_weight, *(x for x in (t_weight, lp_all) if x is not None))
        local_teacher = t_hidden is not None
        dense = mode != "renorm"
        # Rows per token: four [V] work rows on the dense paths; three [K, H] gathered-weight
        # slabs when renorm with a given top-K never builds a [chunk, V] tensor.
        row, rows_per_token = (vocab, 4) if dense or local_teacher else (k * width, 3)
        chunk = chunk_size or _auto_chunk(
            row, dtype, s_hidden.device, rows_per_token,
            AUTO_FUSED_CHUNK_BYTES_CPU, AUTO_FUSED_CHUNK_BYTES_ACCELERATOR,
        )  # fmt: skip
        chunk = min(chunk, n_valid)
        want_h, want_w, want_b = wants
        s_rows = _Rows(s_hidden, index)
        t_rows = _Rows(t_hidden, index) if local_teacher else None
        grad_h = s_hidden.new_zeros(s_hidden.shape) if want_h else None
        grad_h_flat = None if grad_h is None else grad_h.view(-1, width)
        grad_w = torch.zeros_like(s_weight, memory_format=torch.contiguous_format) if want_w else None
        grad_b = s_bias.new_zeros(s_bias.shape, dtype=dtype) if want_b and s_bias is not None else None
        need_dz = want_h or want_w or grad_b is not None
        n_work = 2 if dense else (1 if local_teacher else 0)
        work = [s_hidden.new_empty((chunk, vocab), dtype=dtype) for _ in range(n_work)]
        coef = _divergence_scale(temperature, scale)
        teacher_temperature = 1.0 if mode == "renorm" else temperature
        total = s_hidden.new_zeros((), dtype=dtype)
        mass = s_hidden.new_zeros((), dtype=dtype)
        for start in range(0, n_valid, chunk):
            end = min(start + chunk, n_valid)
            c = end - start
            chunk_work = [w[:c] for w in work]
            h_s = s_rows.get(start, end)
            if local_teacher:
                assert t_rows is not None and t_weight is not None
                t_logits = _linear_into(t_rows.get(start, end), t_weight, t_bias, chunk_work[-1])
                t_logits = t_logits.to(dtype)
                if teacher_temperature != 1.0:
                    t_logits = t_logits.div_(teacher_temperature)
                lp, ids = torch.topk(torch.log_softmax(t_logits, dim=-1), k, dim=-1)
                del t_logits
                present = ~torch.isneginf(lp)
                first = present.to(torch.int8).argmax(-1, keepdim=True)
                ids = torch.where(present, ids, torch.gather(ids, 1, first))
                mass += torch.where(present, lp.exp(), torch.zeros_like(lp)).sum()
            else:
                assert lp_all is not None and ids_all is not None and present_all is not None
                lp, ids, present = lp_all[start:end], ids_all[start:end], present_all[start:end]

            if not dense:
                flat_ids = ids.reshape(-1)
                w_rows = s_weight.index_select(0, flat_ids).view(c, k, width)
                h_w = h_s.to(s_weight.dtype)
                zk = torch.bmm(w_rows, h_w.unsqueeze(-1)).squeeze(-1)
                if s_bias is not None:
                    zk = zk + s_bias.index_select(0, flat_ids).view(c, k).to(zk.dtype)
                per_row, dzk = _renorm_chunk(zk, lp, present, beta, temperature, coef, need_dz)
                total += per_row.sum()
                if dzk is None:
                    continue
                dzk_w = dzk.to(s_weight.dtype)
                if grad_h_flat is not None:
                    g = torch.bmm(dzk_w.unsqueeze(1), w_rows).squeeze(1).to(grad_h_flat.dtype)
                    if index is None:
                        grad_h_flat[start:end] = g
                    else:
                        grad_h_flat.index_copy_(0, index[start:end], g)
                if grad_w is not None:
                    outer = dzk_w.unsqueeze(-1) * h_w.unsqueeze(1)  # [c, K, H]
                    grad_w.index_add_(0, flat_ids, outer.view(c * k, width))
                if grad_b is not None:
                    grad_b.index_add_(0, flat_ids, dzk.reshape(-1))
                continue

            z = _linear_into(h_s, s_weight, s_bias, chunk_work[0])
            dz = chunk_work[1] if need_dz else None
            per_row = _dense_chunk(mode, z, chunk_work, lp, ids, present, beta, temperature, coef, dz)
            total += per_row.sum()
            if dz is not None:
                _add_linear_grads(dz, h_s, s_weight, index, start, end, grad_h_flat, grad_w, grad_b)
        del work
        if grad_b is not None and s_bias is not None and grad_b.dtype != s_bias.dtype:
            grad_b = grad_b.to(s_bias.dtype)
        ctx.saved_grad = (grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(mass)
        return total.mul_(scale), mass

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor, _grad_mass: Tensor | None):
        grads = _take_grad(ctx, "fused_linear_topk_generalized_jsd")
        grad_h, grad_w, grad_b = (None if g is None else _scale_by(g, grad_output) for g in grads)
        return (grad_h, grad_w, grad_b) + (None,) * 15


def fused_linear_topk_generalized_jsd(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor | None = None,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    k: int | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    missing_mass: str = "renorm",
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    return_topk_mass: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Top-K generalized JSD from the student's hidden states and LM-head weight, chunk by chunk.

    The teacher is either a local model (``teacher_hidden`` + ``teacher_weight`` [+ bias] and
    ``k``: its top-K is taken per chunk from its logits, so neither model's ``[tokens, V]``
    logits exist) or given top-K (``teacher_topk_logprobs`` + ``teacher_topk_ids`` from a cache
    or a server). Equals, up to float rounding::

        topk_generalized_jsd(student_hidden @ student_weight.T + student_bias, LP, IDS, labels, ...)

    with ``LP, IDS = teacher_topk(teacher_hidden @ teacher_weight.T + teacher_bias, k,
    temperature=1 if missing_mass == "renorm" else temperature)`` for a local teacher (renorm
    divides by T after the top-K, like ms-swift's local teacher; tail/zero need the teacher at T).

    With ``missing_mass='renorm'`` the student's logits are only computed at the K ids (gathered
    weight rows), so with a given top-K there is no ``[chunk, V]`` work at all. Gradients w.r.t.
    ``student_hidden``, ``student_weight`` and ``student_bias`` are made in forward, like
    :func:`kdcompose.functional.fused_linear_generalized_jsd` (weight gradient accumulated in
    the weight's dtype). ``return_topk_mass=True`` also returns the mean over valid positions of
    the teacher probability covered by its top-K (as :func:`topk_mass`, at the temperature the
    teacher values are taken: 1 for renorm, T otherwise), without materialising logits.
    """
    _check_linear("student", student_hidden, student_weight, student_bias)
    leading = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    local_teacher = teacher_hidden is not None or teacher_weight is not None
    given = teacher_topk_logprobs is not None or teacher_topk_ids is not None
    if local_teacher == given:
        raise ValueError(
            "pass either teacher_hidden + teacher_weight (+ k) for a local teacher, or "
            "teacher_topk_logprobs + teacher_topk_ids for a given top-K (cache or server), not "
            f"{'both' if given else 'neither'}"
        )
    if local_teacher:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a local teacher needs both teacher_hidden and teacher_weight")
        _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
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
        k = _check_k(k, vocab)
    else:
        if teacher_topk_logprobs is None or teacher_topk_ids is None:
            raise ValueError("a given top-K teacher needs both teacher_topk_logprobs and teacher_topk_ids")
        _check_topk(teacher_topk_logprobs, teacher_topk_ids, leading, "student_hidden's")
        if k is not None and k != teacher_topk_logprobs.shape[-1]:
            raise ValueError(
                f"k={k} does not match teacher_topk_logprobs' last dimension "
                f"{teacher_topk_logprobs.shape[-1]}; leave k unset with a given top-K"
            )
        k = teacher_topk_logprobs.shape[-1]
    _check_labels(labels, leading, "hidden states'")
    beta = _check_beta(beta)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    mode = _check_mode(missing_mass, beta)

    device = student_hidden.device
    dtypes = [student_weight] + ([teacher_weight] if teacher_weight is not None else [])
    if teacher_topk_logprobs is not None:
        dtypes.append(teacher_topk_logprobs)
    dtype = _compute_dtype(*dtypes)
    lp = ids = present = None
    if local_teacher:
        if labels is None:
            index, n_valid = None, student_hidden.numel() // max(1, student_hidden.shape[-1])
        else:
            valid = labels.reshape(-1).to(device) != IGNORE_INDEX
            index = valid.nonzero().squeeze(1)
            n_valid = int(index.numel())
            if n_valid == valid.numel():
                index = None
    else:
        index, n_valid, lp, ids, present = _select_rows(
            teacher_topk_logprobs, teacher_topk_ids, labels, vocab, device, dtype
        )

    def finish(value: Tensor, mass: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
        if not return_topk_mass:
            return value
        if mass is None:
            mass = topk_mass(teacher_topk_logprobs, labels)
        return value, mass.detach().float()

    if n_valid == 0 or vocab == 0:
        zero = _empty_zero(student_hidden, dtype) + _empty_zero(student_weight, dtype)
        if student_bias is not None:
            zero = zero + _empty_zero(student_bias, dtype)
        return finish(zero, None if given else torch.zeros((), device=device))

    grad_on = torch.is_grad_enabled()
    wants = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )

    def detach(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.detach()

    with _no_autocast(device):
        value, mass_sum = _FusedTopKJSD.apply(
            student_hidden, student_weight, student_bias,
            detach(teacher_hidden), detach(teacher_weight), detach(teacher_bias),
            lp, ids, present, index, n_valid, mode, beta, temperature, k, chunk_size, 1.0 / n_valid, wants,
        )  # fmt: skip
    return finish(value, mass_sum / n_valid if local_teacher else None)
