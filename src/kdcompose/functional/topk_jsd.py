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

Engineering as :mod:`kdcompose.functional.jsd` (the chunk engine with the ``jsd`` divergence over
buckets, :mod:`kdcompose.functional.engine`): fp32 math whatever the input precision, the
closed-form student gradient computed during forward, chunk by chunk over the valid tokens, and
handed to autograd on the first backward. For ``renorm`` the stored
gradient is ``[tokens, K]`` (scattered into the logits' shape in backward); ``tail``/``zero``
touch the whole vocabulary and store ``[tokens, V]`` like the full JSD.

Gradient (z = raw student logits, s = softmax(z / T), p_b / q_b bucket probabilities, D the
divergence, g_b = dD/dp_b): ``a_b = p_b (g_b - <p, g>)`` is the gradient w.r.t. the log-odds
of bucket b; then dD/dz_j = a_{b(j)} * s_j / p_{b(j)} / T (for ``renorm`` and the id buckets
s_j = p_b, so dD/dz_{id_b} = a_b / T; the tail bucket spreads a_tail in proportion to s_j).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcompose.functional._checks import (
    IGNORE_INDEX,
    MISSING_MASS_MODES,
    check_beta,
    check_chunk_size,
    check_floating,
    check_k,
    check_labels,
    check_missing_mass,
    check_temperature,
    check_topk,
    compute_dtype,
    empty_zero,
    no_autocast,
)
from kdcompose.functional.divergences import Divergence, GeneralizedJSD
from kdcompose.functional.engine import AUTO_CHUNK_BYTES_ACCELERATOR, AUTO_CHUNK_BYTES_CPU
from kdcompose.functional.kd import fused_topk_result, select_topk_rows, topk_result

__all__ = [
    "MISSING_MASS_MODES",
    "fused_linear_topk_generalized_jsd",
    "teacher_topk",
    "topk_generalized_jsd",
    "topk_generalized_jsd_reference",
    "topk_generalized_jsd_sum",
    "topk_mass",
]

_NEG_INF = float("-inf")


def _check_mode(missing_mass: str, beta: float) -> str:
    check_missing_mass(missing_mass)
    if missing_mass == "zero" and beta != 0.0:
        raise ValueError(
            f"missing_mass='zero' compares a truncated teacher with the student's full distribution, "
            f"which is only meaningful as KL(teacher||student): beta must be 0, got beta={beta}. "
            "Set beta=0, or use missing_mass='renorm' or 'tail' for another beta."
        )
    return missing_mass


def _jsd_mode_check(divergence: Divergence, missing_mass: str) -> None:
    assert isinstance(divergence, GeneralizedJSD)
    _check_mode(missing_mass, divergence.beta)


def _topk_jsd(student_logits, lp, ids, labels, beta, temperature, missing_mass, chunk_size, normalize, name):
    check_floating("student_logits", student_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    check_topk(lp, ids, student_logits.shape[:-1], "student_logits'")
    check_labels(labels, student_logits.shape[:-1], "logits'")
    divergence = GeneralizedJSD(beta=check_beta(beta))
    return topk_result(
        student_logits,
        lp,
        ids,
        labels,
        divergence=divergence,
        temperature=temperature,
        missing_mass=missing_mass,
        chunk_size=chunk_size,
        normalize=normalize,
        name=name,
        mode_check=_jsd_mode_check,
    )


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
    return _topk_jsd(
        student_logits, teacher_topk_logprobs, teacher_topk_ids, labels,
        beta, temperature, missing_mass, chunk_size, True, "topk_generalized_jsd",
    ).value  # fmt: skip


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
    result = _topk_jsd(
        student_logits, teacher_topk_logprobs, teacher_topk_ids, labels,
        beta, temperature, missing_mass, chunk_size, False, "topk_generalized_jsd_sum",
    )  # fmt: skip
    return result.value, torch.tensor(result.count, dtype=torch.int64, device=student_logits.device)


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
    check_floating("student_logits", student_logits)
    leading = student_logits.shape[:-1]
    check_topk(teacher_topk_logprobs, teacher_topk_ids, leading, "student_logits'")
    check_labels(labels, leading, "logits'")
    beta = check_beta(beta)
    temperature = check_temperature(temperature)
    check_chunk_size(chunk_size)
    mode = _check_mode(missing_mass, beta)
    vocab = student_logits.shape[-1]
    index, n_valid, rows = select_topk_rows(
        teacher_topk_logprobs, teacher_topk_ids, labels, vocab, student_logits.device, torch.float64
    )
    lp, ids, present = rows.lp, rows.ids, rows.present
    z = student_logits.to(torch.float64).reshape(-1, vocab)
    if n_valid == 0:
        return empty_zero(student_logits, torch.float64)
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
    check_floating("teacher_logits", teacher_logits)
    if teacher_logits.dim() < 1:
        raise ValueError("teacher_logits must have at least one dimension (the vocabulary)")
    vocab = teacher_logits.shape[-1]
    k = check_k(k, vocab)
    temperature = check_temperature(temperature)
    dtype = compute_dtype(teacher_logits)
    flat = teacher_logits.detach().reshape(-1, vocab)
    n = flat.shape[0]
    values = torch.empty((n, k), dtype=dtype, device=flat.device)
    ids = torch.empty((n, k), dtype=torch.int64, device=flat.device)
    chunk = check_chunk_size(chunk_size) or _auto_rows(vocab, dtype, flat.device)
    with torch.no_grad(), no_autocast(flat.device):
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
    check_floating("teacher_topk_logprobs", teacher_topk_logprobs)
    if teacher_topk_logprobs.dim() < 1:
        raise ValueError("teacher_topk_logprobs must be [..., K]")
    check_labels(labels, teacher_topk_logprobs.shape[:-1], "teacher_topk_logprobs'")
    with torch.no_grad():
        mass = teacher_topk_logprobs.detach().float().exp().sum(-1)
        if labels is not None:
            mass = mass[labels.to(mass.device) != IGNORE_INDEX]
        if mass.numel() == 0:
            return mass.new_zeros(())
        return mass.mean()


def _auto_rows(vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk of :func:`teacher_topk`: two vocabulary rows each within the JSD's budget."""
    budget = AUTO_CHUNK_BYTES_CPU if device.type == "cpu" else AUTO_CHUNK_BYTES_ACCELERATOR
    return max(1, budget // (max(1, vocab) * torch.empty((), dtype=dtype).element_size() * 2))


# --------------------------------------------------------------------------------------------
# Fused: from hidden states and LM-head weights
# --------------------------------------------------------------------------------------------


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
    divergence = GeneralizedJSD(beta=check_beta(beta))
    result = fused_topk_result(
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
        name="fused_linear_topk_generalized_jsd",
        mode_check=_jsd_mode_check,
    )
    if not return_topk_mass:
        return result.value
    mass = result.stats.get("topk_mass")
    if mass is None:
        assert teacher_topk_logprobs is not None
        mass = topk_mass(teacher_topk_logprobs, labels)
    return result.value, mass.detach().float()
