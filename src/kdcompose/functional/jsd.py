"""Generalized Jensen-Shannon divergence (JSD) between student and teacher LM-head logits.

Three public functions share one set of semantics (the ``kdcompose`` contract):

* :func:`generalized_jsd` -- mean over non-ignored positions; what a loss term uses.
* :func:`generalized_jsd_sum` -- ``(sum over valid positions, number of valid positions)``, so
  callers can normalise by a *global* token count across micro-batches or ranks.
* :func:`generalized_jsd_reference` -- the plain textbook autograd formula. It is the oracle in
  the tests and the "textbook" baseline in ``benchmarks/bench_loss.py``; do not use it to train
  with large vocabularies (its autograd graph keeps about a dozen logits-sized tensors alive).

``beta`` follows TRL's ``generalized_jsd_loss`` and ms-swift 4.6's ``gkd_loss.jsd_loss``
exactly, including their discontinuity at the endpoints::

    beta == 0      KL(T || S)                          (forward KL, "mode covering")
    beta == 1      KL(S || T)                          (reverse KL, "mode seeking")
    0 < beta < 1   beta * KL(T || M) + (1 - beta) * KL(S || M),   M = (1 - beta) * S + beta * T

Inside the open interval the divergence goes to 0 as ``beta`` approaches 0 or 1 (``M`` tends to
``S`` or ``T``), while the endpoints themselves are full KL divergences: ``beta=1e-6`` and
``beta=0`` are very different losses. This jump is inherited on purpose so that configs keep
their meaning when moved from TRL / ms-swift to kdcompose.

Why not plain autograd: the textbook formula materialises ``log_softmax`` of both models, the
mixture, the stacked ``logsumexp`` input and the KL terms for every token, and autograd keeps
most of them for backward -- 12 fp32 logits-sized tensors beyond the inputs, measured at Qwen's
151,936-token vocabulary (``docs/performance.md``). These functions are the chunk engine
(:mod:`kdcompose.functional.engine`) with the ``jsd`` divergence: it walks over the valid tokens
in chunks, computes the value *and* the closed-form gradient of each chunk in forward (in reused
fp32 work buffers) and keeps only the gradient, so the extra memory is one logits-sized tensor
plus a few chunk-sized buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcompose.functional._checks import (
    IGNORE_INDEX,
    check_beta,
    check_chunk_size,
    check_logits_pair,
    check_temperature,
    compute_dtype,
    empty_zero,
)
from kdcompose.functional.divergences import GeneralizedJSD
from kdcompose.functional.engine import AUTO_CHUNK_BYTES_ACCELERATOR, AUTO_CHUNK_BYTES_CPU
from kdcompose.functional.kd import logits_result

__all__ = [
    "AUTO_CHUNK_BYTES_ACCELERATOR",
    "AUTO_CHUNK_BYTES_CPU",
    "IGNORE_INDEX",
    "generalized_jsd",
    "generalized_jsd_reference",
    "generalized_jsd_sum",
]


def _jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    beta: float,
    temperature: float,
    chunk_size: int | None,
    normalize: bool,
    name: str,
):
    check_logits_pair(student_logits, teacher_logits, labels)
    divergence = GeneralizedJSD(beta=check_beta(beta))
    return logits_result(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        temperature=temperature,
        chunk_size=chunk_size,
        normalize=normalize,
        name=name,
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Generalized JSD, summed over the vocabulary and averaged over non-ignored positions.

    Args:
        student_logits: ``[..., V]``; the only input that receives a gradient.
        teacher_logits: ``[..., V]``, same shape (align vocabularies before calling). Never
            receives a gradient, whether or not it requires one.
        labels: leading shape of the logits, already aligned with them (no shifting here);
            positions equal to ``-100`` are ignored. ``None``: every position counts.
        beta: interpolation in ``[0, 1]``; ``0`` is KL(teacher||student), ``1`` is
            KL(student||teacher), anything in between the generalized JSD with mixture
            ``M = (1-beta) S + beta T``. Note the jump at the endpoints (see module docstring):
            ``beta -> 0+`` tends to 0, ``beta == 0`` is the full forward KL.
        temperature: both logits are divided by it (ms-swift 4.6 semantics).
        chunk_size: tokens per chunk; ``None`` picks ``max(1, budget // (4 * V * 4 bytes))`` --
            four fp32 vocabulary rows per token within ``AUTO_CHUNK_BYTES_CPU`` (32 MiB) on a CPU
            or ``AUTO_CHUNK_BYTES_ACCELERATOR`` (512 MiB) on an accelerator (13 and 220 tokens at
            V = 151,936). The result does not depend on it beyond float rounding.

    Returns:
        A 0-d fp32 tensor (fp64 if an input is fp64). With no valid position, a 0 that is still
        connected to the student's graph (backward gives zero gradients; DDP does not hang).

    Softmax math runs in fp32 whatever the input precision (a bf16 teacher with an fp32 student
    cannot give a negative JSD). The student's gradient is computed during forward and stored
    (one ``[valid_tokens, V]`` tensor in the student's dtype); it is handed to autograd on the
    first backward, so backpropagating twice through one call raises ``RuntimeError``. When all
    positions are valid it becomes the logits' gradient as is; otherwise backward scatters it
    into a zero-filled tensor of the logits' shape (by then the logits themselves are usually
    freed by the caller, which is why forward does not allocate the full shape up front).
    """
    return _jsd(
        student_logits, teacher_logits, labels, beta, temperature, chunk_size, True, "generalized_jsd"
    ).value


def generalized_jsd_sum(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(sum of per-token JSD over valid positions, number of valid positions)``.

    Same arguments and semantics as :func:`generalized_jsd`; use it to normalise by a global
    token count (gradient accumulation, several ranks): ``sum / all_reduce(count).clamp_min(1)``.
    The count is an int64 0-d tensor on the logits' device.
    """
    result = _jsd(
        student_logits, teacher_logits, labels, beta, temperature, chunk_size, False, "generalized_jsd_sum"
    )
    return result.value, torch.tensor(result.count, dtype=torch.int64, device=student_logits.device)


def generalized_jsd_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """The textbook formula with plain autograd (TRL's ``generalized_jsd_loss`` layout + upcast).

    Same signature and semantics as :func:`generalized_jsd`; ``chunk_size`` is validated and
    ignored. Memory-hungry by design: it is the oracle for tests and the baseline for benchmarks.
    """
    check_logits_pair(student_logits, teacher_logits, labels)
    beta, temperature = check_beta(beta), check_temperature(temperature)
    check_chunk_size(chunk_size)
    dtype = compute_dtype(student_logits, teacher_logits)
    student_log = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if beta == 0.0:
        per_token = F.kl_div(student_log, teacher_log, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        per_token = F.kl_div(teacher_log, student_log, reduction="none", log_target=True).sum(-1)
    else:
        mixture_log = torch.logsumexp(
            torch.stack([student_log + math.log1p(-beta), teacher_log + math.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log, teacher_log, reduction="none", log_target=True).sum(-1)
        kl_student = F.kl_div(mixture_log, student_log, reduction="none", log_target=True).sum(-1)
        per_token = beta * kl_teacher + (1.0 - beta) * kl_student
    if labels is not None:
        per_token = per_token[labels != IGNORE_INDEX]
    if per_token.numel() == 0:
        return empty_zero(student_logits, dtype)
    return per_token.sum() / per_token.numel()
