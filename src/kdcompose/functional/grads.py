"""Where the chunk engine puts each chunk's gradient, and how backward hands it to autograd.

The gradient is computed in forward (the divergence writes ``coef * d value / d logits`` per
chunk); a sink keeps it -- as ``[rows, V]`` logits gradient, ``[rows, K]`` at top-K ids, or chained
through an LM head into hidden-state / weight / bias gradients -- and backward only scales it by
``grad_output`` (and scatters logits rows into the logits' shape).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcompose.functional.sources import LinearStudent, LogitsStudent, StudentChunk
from kdcompose.functional.vocab_parallel import VocabParallel

RELEASED = object()
"""What a spent autograd context holds instead of its sink (a second backward raises)."""


def _scale_by(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place, skipping the pass when it is exactly 1 on the CPU."""
    if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


class LogitsGrad:
    """The gradient w.r.t. the selected rows of the student's logits, computed during forward.

    Every row selected (no ignored label, no token selection): one ``[n, V]`` tensor in the logits'
    dtype, written by the divergence and handed to autograd as the logits' gradient.

    Some rows selected, on a CPU: the logits-shaped gradient is allocated in forward *uninitialised*
    (its pages cost no memory until written), each chunk's rows are copied in from one reused
    ``[chunk, V]`` buffer, and backward only zeroes the other rows: the resident memory grows with
    the selected rows in forward and reaches one logits tensor in backward, never more (a separate
    ``[n, V]`` store next to a zero-filled gradient peaks at ``1 + n / rows`` logits tensors).
    On an accelerator, where an allocation costs its size at once, the rows are stored as
    ``[n, V]`` and scattered into a zero-filled gradient in backward (the logits themselves are
    usually freed by then). ``renorm``: ``[n, K]`` at the teacher's ids, scattered in backward.
    """

    def __init__(
        self, student: LogitsStudent, index: Tensor | None, n: int, dtype: torch.dtype, k: int | None
    ):
        logits = student.logits
        self.shape, self.index, self.logits_dtype = logits.shape, index, logits.dtype
        self.storage: Tensor | None = None  # [n, V] or [n, K]
        self.full: Tensor | None = None  # the logits-shaped gradient, filled row by row (CPU)
        self.buffer: Tensor | None = None
        self.ids: Tensor | None = None
        self.written = 0
        vocab = logits.shape[-1]
        if k is not None:
            self.storage = logits.new_empty((n, k), dtype=dtype)
            self.ids = torch.empty((n, k), dtype=torch.int64, device=logits.device)
        elif index is not None and logits.device.type == "cpu":
            self.full = torch.empty(self.shape, dtype=logits.dtype, device=logits.device)
        else:
            self.storage = logits.new_empty((n, vocab))

    @property
    def stored_rows(self) -> int:
        """Rows of gradient written during forward (the kept rows; none of the dropped ones)."""
        return (
            self.written if self.full is not None else (0 if self.storage is None else self.storage.shape[0])
        )

    def out_for(self, chunk: StudentChunk, work_a: Tensor) -> Tensor:
        if self.full is None:
            assert self.storage is not None
            return self.storage[chunk.start : chunk.end]
        rows = chunk.end - chunk.start
        if self.buffer is None or self.buffer.shape[0] < rows:
            self.buffer = self.full.new_empty((rows, self.shape[-1]))
        return self.buffer[:rows]

    def add_full(self, chunk: StudentChunk, dz: Tensor) -> None:
        if self.full is not None:  # the chunk's rows into their places in the logits' gradient
            assert self.index is not None
            self.full.view(-1, self.shape[-1]).index_copy_(0, self.index[chunk.start : chunk.end], dz)
            self.written += chunk.end - chunk.start

    def add_ids(self, chunk: StudentChunk, ids: Tensor, dzk: Tensor) -> None:
        assert self.ids is not None and self.storage is not None
        self.storage[chunk.start : chunk.end] = dzk
        self.ids[chunk.start : chunk.end] = ids

    def finish_forward(self, parallel: VocabParallel | None) -> None:
        self.buffer = None

    def backward(self, grad_output: Tensor) -> tuple[Tensor]:
        shape, index, vocab = self.shape, self.index, self.shape[-1]
        if self.full is not None:
            assert index is not None
            full, self.full = self.full, None
            flat = full.view(-1, vocab)
            dropped = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
            dropped[index] = False
            flat[dropped] = 0
            return (_scale_by(full, grad_output),)
        assert self.storage is not None
        grad = _scale_by(self.storage, grad_output)
        self.storage = None  # hand it over: autograd adopts it in place
        if self.ids is not None:
            full = torch.zeros(shape, dtype=self.logits_dtype, device=grad.device)
            rows = index if index is not None else torch.arange(grad.shape[0], device=grad.device)
            rows = rows.unsqueeze(-1).expand_as(self.ids)
            full.view(-1, vocab).index_put_((rows, self.ids), grad.to(full.dtype), accumulate=True)
            self.ids = None
            return (full,)
        if index is None:
            return (grad.view(shape),)
        full = grad.new_zeros(shape)
        full.view(-1, vocab).index_copy_(0, index, grad)
        return (full,)


class LinearGrad:
    """Gradients w.r.t. the student's hidden states, LM-head weight and bias, accumulated chunk by
    chunk in forward (``dL/dh = dz @ W``, ``dL/dW += dz.T @ h``, ``dL/db += sum dz``).

    The weight gradient accumulates in the weight's own dtype (each chunk's GEMM still sums in
    fp32 inside addmm): an fp32 accumulator for bf16 weights would cost 3x the bf16 gradient at its
    peak, which is what the fused path exists to avoid (Liger does the same).
    """

    def __init__(
        self, student: LinearStudent, index: Tensor | None, dtype: torch.dtype, wants: tuple[bool, bool, bool]
    ):
        hidden, weight, bias = student.hidden, student.weight, student.bias
        want_h, want_w, want_b = wants
        self.index, self.weight = index, weight
        self.grad_h = hidden.new_zeros(hidden.shape) if want_h else None
        self.grad_h_flat = None if self.grad_h is None else self.grad_h.view(-1, hidden.shape[-1])
        self.grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format) if want_w else None
        self.bias_dtype = None if bias is None else bias.dtype
        self.grad_b = bias.new_zeros(bias.shape, dtype=dtype) if want_b and bias is not None else None

    def out_for(self, chunk: StudentChunk, work_a: Tensor) -> Tensor:
        return work_a  # shares the student's log-prob buffer: the divergence writes it last

    def add_full(self, chunk: StudentChunk, dz: Tensor) -> None:
        assert chunk.h is not None
        dz_w = dz.to(self.weight.dtype)  # no copy for fp32 weights
        self._add_h(chunk, torch.mm(dz_w, self.weight) if self.grad_h_flat is not None else None)
        if self.grad_w is not None:
            self.grad_w.addmm_(dz_w.t(), chunk.h.to(self.weight.dtype))
        if self.grad_b is not None:
            self.grad_b.add_(dz.sum(0))

    def add_ids(self, chunk: StudentChunk, ids: Tensor, dzk: Tensor) -> None:
        assert chunk.h is not None and chunk.w_rows is not None
        c, k = ids.shape
        flat = ids.reshape(-1)
        dzk_w = dzk.to(self.weight.dtype)
        if self.grad_h_flat is not None:
            self._add_h(chunk, torch.bmm(dzk_w.unsqueeze(1), chunk.w_rows).squeeze(1))
        if self.grad_w is not None:
            outer = dzk_w.unsqueeze(-1) * chunk.h.to(self.weight.dtype).unsqueeze(1)  # [c, K, H]
            self.grad_w.index_add_(0, flat, outer.view(c * k, -1))
        if self.grad_b is not None:
            self.grad_b.index_add_(0, flat, dzk.reshape(-1).to(self.grad_b.dtype))

    def _add_h(self, chunk: StudentChunk, g: Tensor | None) -> None:
        if g is None or self.grad_h_flat is None:
            return
        g = g.to(self.grad_h_flat.dtype)
        if self.index is None:
            self.grad_h_flat[chunk.start : chunk.end] = g
        else:
            self.grad_h_flat.index_copy_(0, self.index[chunk.start : chunk.end], g)

    @property
    def wanted(self) -> bool:
        return self.grad_h is not None or self.grad_w is not None or self.grad_b is not None

    def finish_forward(self, parallel: VocabParallel | None) -> None:
        if self.grad_b is not None and self.bias_dtype is not None and self.grad_b.dtype != self.bias_dtype:
            self.grad_b = self.grad_b.to(self.bias_dtype)
        if parallel is not None and self.grad_h is not None:  # every rank's head rows feed dL/dh
            torch.distributed.all_reduce(self.grad_h, group=parallel.group)

    def backward(self, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        grads = (self.grad_h, self.grad_w, self.grad_b)
        self.grad_h = self.grad_h_flat = self.grad_w = self.grad_b = None
        return tuple(None if g is None else _scale_by(g, grad_output) for g in grads)  # type: ignore[return-value]
