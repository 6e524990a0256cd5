"""Generalized JSD straight from hidden states and LM-head weights ("fused linear" JSD).

``generalized_jsd`` already avoids autograd's dozen logits-sized intermediates, but the caller
still materialises both models' full ``[tokens, V]`` logits, and the student's gradient w.r.t.
them. :func:`fused_linear_generalized_jsd` takes the hidden states and the ``nn.Linear`` weights
instead and builds the logits one chunk of valid tokens at a time, so neither model's full
logits nor their gradient ever exist. This is the idea behind Liger-Kernel's fused linear
distillation loss, written in plain PyTorch so it runs on a CPU or any accelerator.

Per chunk, in forward: logits = hidden @ W.T (+ b) for both models, the JSD value and the
closed-form ``dJSD/dlogits`` (shared with :mod:`kdcompose.functional.jsd`), then
``dL/dhidden = dz @ W`` for the chunk's rows, ``dL/dW += dz.T @ hidden`` and ``dL/db += sum(dz)``.
Backward only rescales those by ``grad_output``. The teacher side never gets gradients.

Memory: the weight gradient (``[V, H_s]``, in the weight's dtype) is the one large buffer, and
it is the same tensor autograd would produce for the LM head anyway. Everything else is a few
fp32 ``[chunk, V]`` work buffers plus ``[tokens, H_s]`` for the hidden-state gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdcompose.functional.jsd import (
    _WORK_BUFFERS,
    _auto_chunk,
    _check_beta,
    _check_chunk_size,
    _check_floating,
    _check_labels,
    _check_temperature,
    _empty_zero,
    _no_autocast,
    _Rows,
    _scale_by,
    _take_grad,
    _valid_index,
    jsd_chunk,
)

# Auto chunk rule for the fused path. Larger than the unfused budget because every chunk reads
# and updates the whole ``[V, H]`` weight gradient: tiny chunks turn that into the bottleneck.
AUTO_FUSED_CHUNK_BYTES_CPU = 192 * 2**20
AUTO_FUSED_CHUNK_BYTES_ACCELERATOR = 1024 * 2**20


def _linear_into(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``hidden @ weight.T + bias``, written into ``out`` when the dtypes allow it."""
    hidden = hidden.to(weight.dtype)
    if weight.dtype == out.dtype and (bias is None or bias.dtype == out.dtype):
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    return torch.nn.functional.linear(hidden, weight, bias)


def _add_linear_grads(
    dz: Tensor,
    h_s: Tensor,
    s_weight: Tensor,
    index: Tensor | None,
    start: int,
    end: int,
    grad_h_flat: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """Chain a chunk's ``dL/dlogits`` (``dz [c, V]``) through ``logits = h @ W.T + b``.

    ``dL/dh`` rows ``start:end`` of the selection (scattered by ``index``), ``dL/dW += dz.T @ h``
    and ``dL/db += sum(dz)``; shared by every fused divergence (the per-chunk divergence only
    has to produce ``dz``).
    """
    dz_w = dz.to(s_weight.dtype)  # no copy for fp32 weights
    if grad_h_flat is not None:
        g = torch.mm(dz_w, s_weight).to(grad_h_flat.dtype)
        if index is None:
            grad_h_flat[start:end] = g
        else:
            grad_h_flat.index_copy_(0, index[start:end], g)
    if grad_w is not None:
        grad_w.addmm_(dz_w.t(), h_s.to(s_weight.dtype))
    if grad_b is not None:
        grad_b.add_(dz.sum(0))


class _FusedLinearJSD(torch.autograd.Function):
    """``scale * sum_valid JSD(hs @ Ws.T + bs, ht @ Wt.T + bt)``; student grads made in forward."""

    @staticmethod
    def forward(
        ctx,
        s_hidden: Tensor,
        s_weight: Tensor,
        s_bias: Tensor | None,
        t_hidden: Tensor,
        t_weight: Tensor,
        t_bias: Tensor | None,
        index: Tensor | None,
        n_valid: int,
        beta: float,
        temperature: float,
        chunk_size: int | None,
        scale: float,
        wants: tuple[bool, bool, bool],
    ) -> Tensor:
        vocab = s_weight.shape[0]
        dtype = torch.float64 if torch.float64 in (s_weight.dtype, t_weight.dtype) else torch.float32
        chunk = chunk_size or _auto_chunk(
            vocab,
            dtype,
            s_hidden.device,
            _WORK_BUFFERS,
            AUTO_FUSED_CHUNK_BYTES_CPU,
            AUTO_FUSED_CHUNK_BYTES_ACCELERATOR,
        )
        chunk = min(chunk, n_valid)
        want_h, want_w, want_b = wants
        s_rows, t_rows = _Rows(s_hidden, index), _Rows(t_hidden, index)

        grad_h = s_hidden.new_zeros(s_hidden.shape) if want_h else None
        grad_h_flat = None if grad_h is None else grad_h.view(-1, s_hidden.shape[-1])
        # The weight gradient accumulates in the weight's own dtype (each chunk's GEMM still sums
        # in fp32 inside addmm): an fp32 accumulator for bf16 weights would cost 3x the bf16
        # gradient at its peak, which is what the fused path exists to avoid (Liger does the same).
        grad_w = torch.zeros_like(s_weight, memory_format=torch.contiguous_format) if want_w else None
        grad_b = s_bias.new_zeros(s_bias.shape, dtype=dtype) if want_b and s_bias is not None else None
        need_dz = want_h or want_w or grad_b is not None

        work = [s_hidden.new_empty((chunk, vocab), dtype=dtype) for _ in range(_WORK_BUFFERS)]
        total = s_hidden.new_zeros((), dtype=dtype)
        for start in range(0, n_valid, chunk):
            end = min(start + chunk, n_valid)
            rows = end - start
            chunk_work = [w[:rows] for w in work]
            h_s = s_rows.get(start, end)
            h_t = t_rows.get(start, end)
            dz = chunk_work[0] if need_dz else None  # jsd_chunk may write its gradient over work[0]
            per_token = jsd_chunk(
                lambda out, h=h_s: _linear_into(h, s_weight, s_bias, out),
                lambda out, h=h_t: _linear_into(h, t_weight, t_bias, out),
                chunk_work,
                beta,
                temperature,
                scale / temperature,
                dz,
            )
            total += per_token.sum()
            if dz is not None:
                _add_linear_grads(dz, h_s, s_weight, index, start, end, grad_h_flat, grad_w, grad_b)
        del work
        if grad_b is not None and grad_b.dtype != s_bias.dtype:
            grad_b = grad_b.to(s_bias.dtype)
        ctx.saved_grad = (grad_h, grad_w, grad_b)
        return total.mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grads = _take_grad(ctx, "fused_linear_generalized_jsd")
        grad_h, grad_w, grad_b = (None if g is None else _scale_by(g, grad_output) for g in grads)
        return (grad_h, grad_w, grad_b) + (None,) * 10


def _check_linear(side: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    _check_floating(f"{side}_hidden", hidden)
    _check_floating(f"{side}_weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{side}_weight must be [V, H] (nn.Linear layout), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_hidden's last dimension must equal {side}_weight.shape[1] = {weight.shape[1]} "
            f"(weight is [V, H]; pass lm_head.weight, not its transpose), got hidden {tuple(hidden.shape)}"
        )
    if bias is not None:
        _check_floating(f"{side}_bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{side}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def fused_linear_generalized_jsd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> Tensor:
    """Generalized JSD of the LM heads' logits, computed without materialising them.

    Equals ``generalized_jsd(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, labels, beta=..., temperature=...)`` up to
    float rounding; see :func:`kdcompose.functional.generalized_jsd` for ``labels``, ``beta``
    (including the jump at 0 and 1) and ``temperature``.

    Args:
        student_hidden: ``[..., H_s]`` final hidden states (after the final norm) of the student.
        student_weight: ``[V, H_s]`` LM-head weight (``nn.Linear`` layout). ``student_bias``: ``[V]``.
        teacher_hidden: ``[..., H_t]`` with the same leading shape; ``teacher_weight``: ``[V, H_t]``
            with the same ``V`` (align vocabularies before calling). The teacher side never
            receives gradients.
        chunk_size: valid tokens per chunk. ``None``: ``max(1, budget // (4 * V * 4 bytes))`` with
            ``AUTO_FUSED_CHUNK_BYTES_CPU`` (192 MiB, 82 tokens at V = 151,936) on a CPU or
            ``AUTO_FUSED_CHUNK_BYTES_ACCELERATOR`` (1 GiB) on an accelerator.

    Gradients w.r.t. ``student_hidden``, ``student_weight`` and ``student_bias`` are computed
    during forward (logits in the weights' dtype, softmax math in fp32; the weight gradient is
    accumulated chunk by chunk in the weight's dtype, so with bf16 weights it is rounded once per
    chunk rather than once; the bias gradient accumulates in fp32) and handed to autograd on the
    first backward; backpropagating twice through one call raises ``RuntimeError``.
    """
    _check_linear("student", student_hidden, student_weight, student_bias)
    _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
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
    _check_labels(labels, student_hidden.shape[:-1], "hidden states'")
    beta = _check_beta(beta)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)

    dtype = torch.float64 if torch.float64 in (student_weight.dtype, teacher_weight.dtype) else torch.float32
    n_positions = student_hidden.numel() // max(1, student_hidden.shape[-1])
    index, n_valid = _valid_index(labels, n_positions, student_hidden.device)
    if n_valid == 0 or student_weight.shape[0] == 0:
        zero = _empty_zero(student_hidden, dtype) + _empty_zero(student_weight, dtype)
        return zero if student_bias is None else zero + _empty_zero(student_bias, dtype)

    grad_on = torch.is_grad_enabled()
    wants = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    teacher = (
        teacher_hidden.detach(),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
    )
    with _no_autocast(student_hidden.device):
        return _FusedLinearJSD.apply(
            student_hidden, student_weight, student_bias, *teacher,
            index, n_valid, beta, temperature, chunk_size, 1.0 / n_valid, wants,
        )  # fmt: skip
