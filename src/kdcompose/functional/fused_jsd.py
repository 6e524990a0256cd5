"""Generalized JSD straight from hidden states and LM-head weights ("fused linear" JSD).

``generalized_jsd`` already avoids autograd's dozen logits-sized intermediates, but the caller
still materialises both models' full ``[tokens, V]`` logits, and the student's gradient w.r.t.
them. :func:`fused_linear_generalized_jsd` takes the hidden states and the ``nn.Linear`` weights
instead and builds the logits one chunk of valid tokens at a time, so neither model's full
logits nor their gradient ever exist. This is the idea behind Liger-Kernel's fused linear
distillation loss, written in plain PyTorch so it runs on a CPU or any accelerator.

Per chunk, in forward (the chunk engine, :mod:`kdcompose.functional.engine`, with the ``jsd``
divergence): logits = hidden @ W.T (+ b) for both models, the JSD value and the closed-form
``dJSD/dlogits``, then ``dL/dhidden = dz @ W`` for the chunk's rows, ``dL/dW += dz.T @ hidden`` and
``dL/db += sum(dz)``. Backward only rescales those by ``grad_output``. The teacher side never
gets gradients. Any other divergence: :func:`kdcompose.functional.fused_linear_divergence_loss`.

Memory: the weight gradient (``[V, H_s]``, in the weight's dtype) is the one large buffer, and
it is the same tensor autograd would produce for the LM head anyway. Everything else is a few
fp32 ``[chunk, V]`` work buffers plus ``[tokens, H_s]`` for the hidden-state gradient.
"""

from __future__ import annotations

from torch import Tensor

from kdcompose.functional._checks import check_beta
from kdcompose.functional.divergences import GeneralizedJSD
from kdcompose.functional.engine import AUTO_FUSED_CHUNK_BYTES_ACCELERATOR, AUTO_FUSED_CHUNK_BYTES_CPU
from kdcompose.functional.kd import fused_result

__all__ = [
    "AUTO_FUSED_CHUNK_BYTES_ACCELERATOR",
    "AUTO_FUSED_CHUNK_BYTES_CPU",
    "fused_linear_generalized_jsd",
]


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
    divergence = GeneralizedJSD(beta=check_beta(beta))
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
        name="fused_linear_generalized_jsd",
    ).value
