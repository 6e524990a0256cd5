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

Why a custom autograd function: the textbook formula materialises ``log_softmax`` of both
models, the mixture, the stacked ``logsumexp`` input and the KL terms for every token, and
autograd keeps most of them for backward -- 12 fp32 logits-sized tensors beyond the inputs,
measured at Qwen's 151,936-token vocabulary (``docs/performance.md``). :class:`_GeneralizedJSD`
instead walks over the valid tokens in chunks, computes the value *and* the closed-form
gradient of each chunk in forward (in reused fp32 work buffers) and keeps only the gradient,
so the extra memory is one logits-sized tensor plus a few chunk-sized buffers.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100

# Auto chunk rule: the per-chunk work buffers (``_WORK_BUFFERS`` rows of the vocabulary in the
# compute dtype) must fit in this many bytes. Small chunks stay cache-resident on a CPU; on an
# accelerator bigger chunks amortise kernel launches.
AUTO_CHUNK_BYTES_CPU = 32 * 2**20
AUTO_CHUNK_BYTES_ACCELERATOR = 512 * 2**20
_WORK_BUFFERS = 4


# --------------------------------------------------------------------------------------------
# Argument checking (shared with fused_jsd.py)
# --------------------------------------------------------------------------------------------


def _check_beta(beta: float) -> float:
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"beta must be in [0, 1] (0 = KL(teacher||student), 1 = KL(student||teacher)), got {beta!r}"
        )
    return value


def _check_temperature(temperature: float) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature must be a positive finite number (e.g. 1.0), got {temperature!r}")
    return value


def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(
            f"chunk_size must be >= 1 (tokens per chunk), or None for the automatic size; got {chunk_size}"
        )
    return int(chunk_size)


def _check_floating(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def _check_labels(labels: Tensor | None, leading_shape: torch.Size, what: str) -> None:
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the {what} leading shape {tuple(leading_shape)}, got {tuple(labels.shape)}; "
            "pass labels already aligned with the logits (shift them before calling, -100 = ignored)"
        )


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for the softmax math (fp64 if an input is fp64), whatever the inputs' precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _valid_index(labels: Tensor | None, n_positions: int, device: torch.device) -> tuple[Tensor | None, int]:
    """Flat indices (on ``device``) of the non-ignored positions, or ``None`` when all count."""
    if labels is None:
        return None, n_positions
    valid = labels.reshape(-1) != IGNORE_INDEX
    index = valid.nonzero().squeeze(1).to(device)
    n_valid = int(index.numel())
    if n_valid == n_positions:
        return None, n_positions
    return index, n_valid


def _auto_chunk(
    vocab: int, dtype: torch.dtype, device: torch.device, buffers: int, cpu_bytes: int, accelerator_bytes: int
) -> int:
    """Tokens per chunk so that ``buffers`` work rows of the vocabulary fit the byte budget."""
    budget = cpu_bytes if device.type == "cpu" else accelerator_bytes
    row_bytes = max(1, vocab) * torch.empty((), dtype=dtype).element_size() * buffers
    return max(1, budget // row_bytes)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Our dtypes are deliberate (fp32 softmax math, matmuls into fp32 buffers): keep autocast out."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _empty_zero(student: Tensor, dtype: torch.dtype) -> Tensor:
    """A 0 that is connected to the student's graph without touching its values.

    ``student.sum() * 0`` would be NaN if a logit is +-inf; summing an empty slice is exactly 0,
    still gives the student a (zero) gradient, and keeps DDP's reducer from waiting forever.
    """
    return student[..., :0].to(dtype).sum()


# --------------------------------------------------------------------------------------------
# Row access and the per-chunk kernel (shared with fused_jsd.py)
# --------------------------------------------------------------------------------------------


class _Rows:
    """Reads chunks of the valid rows of a ``[..., D]`` tensor.

    Never materialises the whole selection (``x[mask]`` would copy every valid row at once):
    contiguous runs are returned as views, selected rows are gathered one chunk at a time.
    """

    def __init__(self, x: Tensor, index: Tensor | None):
        self.x = x
        self.index = index
        dim = x.shape[-1]
        try:
            self.flat: Tensor | None = x.view(-1, dim)
        except RuntimeError:  # e.g. logits[:, :-1] of a [B, S, V] tensor: not mergeable as a view
            self.flat = None
        self.unravelled: tuple[Tensor, ...] | None = None
        if self.flat is None:
            rows = index if index is not None else torch.arange(x.numel() // max(1, dim), device=x.device)
            self.unravelled = torch.unravel_index(rows, x.shape[:-1])

    def get(self, start: int, end: int, out: Tensor | None = None) -> Tensor:
        """Rows ``start:end`` of the selection; gathered into ``out`` when it fits (same dtype)."""
        if self.flat is not None:
            if self.index is None:
                return self.flat[start:end]
            idx = self.index[start:end]
            if out is not None and out.dtype == self.flat.dtype:
                return torch.index_select(self.flat, 0, idx, out=out)
            return torch.index_select(self.flat, 0, idx)
        assert self.unravelled is not None
        return self.x[tuple(u[start:end] for u in self.unravelled)]


def _log_softmax_into(x: Tensor, out: Tensor, scratch: Tensor, temperature: float) -> Tensor:
    """``out = log_softmax(x / temperature)`` computed in ``out.dtype``; never writes to ``x``
    unless ``x`` *is* ``scratch``. Upcasts before dividing so bf16 inputs lose nothing more."""
    if temperature != 1.0:
        if x.data_ptr() != scratch.data_ptr() or x.dtype != scratch.dtype:
            scratch.copy_(x)
            x = scratch
        x.div_(temperature)
    return torch.log_softmax(x, dim=-1, dtype=out.dtype, out=out)


def _rowdot(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """Per-row dot product through a free work buffer (``out`` may be ``a`` or ``b``).

    ``torch.bmm`` of ``[c, 1, V] @ [c, V, 1]`` avoids the buffer but is several times slower on a
    CPU; ``(a * b).sum(-1)`` would allocate a fresh ``[c, V]`` temporary every chunk.
    """
    return torch.mul(a, b, out=out).sum(-1)


def jsd_chunk(
    load_student: Callable[[Tensor], Tensor],
    load_teacher: Callable[[Tensor], Tensor],
    work: list[Tensor],
    beta: float,
    temperature: float,
    grad_coef: float,
    grad_out: Tensor | None,
) -> Tensor:
    """Per-token JSD of one chunk and, optionally, ``grad_coef * dJSD/dz`` (z = raw student logits).

    ``load_*(scratch)`` return the chunk's raw ``[c, V]`` logits (possibly written into ``scratch``).
    ``work`` holds ``_WORK_BUFFERS`` ``[c, V]`` buffers in the compute dtype; they are reused in
    place, so the chunk allocates nothing logits-sized. Gradient (with s = softmax(z/tau),
    t = softmax(teacher/tau), m = (1-beta) s + beta t, and g = dJSD/ds)::

        beta = 0:      dJSD/dz = (s - t) / tau
        beta = 1:      g = log s - log t (+1, cancels)
        0 < beta < 1:  g = (1 - beta) * (log s - log m)
        otherwise:     dJSD/dz = s * (g - <s, g>) / tau      (chain rule through softmax)
    """
    w0, w1, w2 = work[0], work[1], work[2]
    log_s = _log_softmax_into(load_student(w2), w0, w2, temperature)
    log_t = _log_softmax_into(load_teacher(w2), w1, w2, temperature)

    if beta == 0.0:  # KL(T || S)
        diff = torch.sub(log_t, log_s, out=w2)
        t = log_t.exp_()
        per_token = _rowdot(t, diff, out=diff)
        if grad_out is not None:
            s = log_s.exp_()
            torch.mul(s.sub_(t), grad_coef, out=grad_out)
        return per_token

    if beta == 1.0:  # KL(S || T)
        diff = torch.sub(log_s, log_t, out=w1)
        s = log_s.exp_()
        per_token = _rowdot(s, diff, out=w2)
        if grad_out is not None:
            diff.sub_(per_token.unsqueeze(-1)).mul_(s)
            torch.mul(diff, grad_coef, out=grad_out)
        return per_token

    # Mixture in probability space: cheaper than a stacked logsumexp. Where both probabilities
    # underflow, clamping keeps log m finite so 0 * (log t - log m) stays 0 instead of NaN.
    w3 = work[3]
    log_m = torch.exp(log_s, out=w2).mul_(1.0 - beta)
    t = torch.exp(log_t, out=w3)
    log_m.add_(t, alpha=beta).clamp_min_(torch.finfo(log_m.dtype).tiny).log_()
    kl_t = _rowdot(t, torch.sub(log_t, log_m, out=w1), out=w1)
    diff_s = torch.sub(log_s, log_m, out=w2)
    s = log_s.exp_()
    kl_s = _rowdot(s, diff_s, out=w1)
    if grad_out is not None:
        diff_s.sub_(kl_s.unsqueeze(-1)).mul_(s)
        torch.mul(diff_s, grad_coef * (1.0 - beta), out=grad_out)
    return kl_t.mul_(beta).add_(kl_s, alpha=1.0 - beta)


# --------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------

_RELEASED = object()


def _take_grad(ctx, what: str) -> object:
    """Hand the precomputed gradient over to autograd exactly once.

    Returning a tensor we still reference would make AccumulateGrad copy it (one more
    logits-sized tensor); dropping our reference lets autograd adopt it in place.
    """
    grad = ctx.saved_grad
    if grad is _RELEASED:
        raise RuntimeError(
            f"{what} computes its gradient during forward and hands it to autograd on the first "
            "backward; backpropagating through the same call twice (retain_graph=True) is not "
            "supported. Recompute the loss, or use generalized_jsd_reference for such experiments."
        )
    ctx.saved_grad = _RELEASED
    return grad


def _scale_by(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place, skipping the pass when it is exactly 1 on the CPU."""
    if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


class _GeneralizedJSD(torch.autograd.Function):
    """``scale * sum_valid JSD``; the student's gradient is computed in forward, chunk by chunk."""

    @staticmethod
    def forward(
        ctx,
        student: Tensor,
        teacher: Tensor,
        index: Tensor | None,
        n_valid: int,
        beta: float,
        temperature: float,
        chunk_size: int | None,
        scale: float,
        want_grad: bool,
    ) -> Tensor:
        vocab = student.shape[-1]
        dtype = _compute_dtype(student, teacher)
        chunk = chunk_size or _auto_chunk(
            vocab, dtype, student.device, _WORK_BUFFERS, AUTO_CHUNK_BYTES_CPU, AUTO_CHUNK_BYTES_ACCELERATOR
        )
        chunk = min(chunk, n_valid)
        students, teachers = _Rows(student, index), _Rows(teacher, index)
        grad = student.new_empty((n_valid, vocab)) if want_grad else None
        n_buffers = _WORK_BUFFERS if 0.0 < beta < 1.0 else 3
        work = [student.new_empty((chunk, vocab), dtype=dtype) for _ in range(n_buffers)]
        total = student.new_zeros((), dtype=dtype)
        for start in range(0, n_valid, chunk):
            end = min(start + chunk, n_valid)
            rows = end - start
            per_token = jsd_chunk(
                lambda out, s=start, e=end: students.get(s, e, out),
                lambda out, s=start, e=end: teachers.get(s, e, out),
                [w[:rows] for w in work],
                beta,
                temperature,
                scale / temperature,
                None if grad is None else grad[start:end],
            )
            total += per_token.sum()
        del work
        ctx.saved_grad = grad
        ctx.index = index
        ctx.shape = student.shape
        return total.mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        none = (None,) * 8
        grad = _take_grad(ctx, "generalized_jsd")
        if grad is None:
            return (None, *none)
        grad = _scale_by(grad, grad_output)
        if ctx.index is None:  # every position valid: the stored gradient already is the answer
            return (grad.view(ctx.shape), *none)
        full = grad.new_zeros(ctx.shape)
        full.view(-1, ctx.shape[-1]).index_copy_(0, ctx.index, grad)
        del grad
        return (full, *none)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _prepare(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    beta: float,
    temperature: float,
    chunk_size: int | None,
) -> tuple[float, float, int | None]:
    _check_floating("student_logits", student_logits)
    _check_floating("teacher_logits", teacher_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape; different vocabulary sizes (e.g. 151936 vs 152064) must be "
            "aligned by the caller (slice or pad the extra columns) before calling"
        )
    _check_labels(labels, student_logits.shape[:-1], "logits'")
    return _check_beta(beta), _check_temperature(temperature), _check_chunk_size(chunk_size)


def _jsd_total(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    beta: float,
    temperature: float,
    chunk_size: int | None,
    normalize: bool,
) -> tuple[Tensor, int]:
    beta, temperature, chunk_size = _prepare(
        student_logits, teacher_logits, labels, beta, temperature, chunk_size
    )
    dtype = _compute_dtype(student_logits, teacher_logits)
    n_positions = student_logits.numel() // max(1, student_logits.shape[-1])
    index, n_valid = _valid_index(labels, n_positions, student_logits.device)
    if n_valid == 0 or student_logits.shape[-1] == 0:
        return _empty_zero(student_logits, dtype), n_valid
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    scale = 1.0 / n_valid if normalize else 1.0
    teacher = teacher_logits.detach()
    with _no_autocast(student_logits.device):
        total = _GeneralizedJSD.apply(
            student_logits, teacher, index, n_valid, beta, temperature, chunk_size, scale, want_grad
        )
    return total, n_valid


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
    total, _ = _jsd_total(student_logits, teacher_logits, labels, beta, temperature, chunk_size, True)
    return total


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
    total, n_valid = _jsd_total(student_logits, teacher_logits, labels, beta, temperature, chunk_size, False)
    return total, torch.tensor(n_valid, dtype=torch.int64, device=student_logits.device)


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
    beta, temperature, _ = _prepare(student_logits, teacher_logits, labels, beta, temperature, chunk_size)
    dtype = _compute_dtype(student_logits, teacher_logits)
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
        return _empty_zero(student_logits, dtype)
    return per_token.sum() / per_token.numel()
