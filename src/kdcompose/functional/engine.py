"""The chunk engine: every LM-head divergence, in every mode, through one loop.

What it owns, so a divergence (:mod:`kdcompose.functional.divergences`) does not:

* **valid rows** -- positions whose label is not -100 (and, with a top-K teacher, whose K values
  are not all ``-inf``), read chunk by chunk without copying the selection (:class:`Rows`);
* **the chunk loop** -- the student's and the teacher's logits of a chunk (read from logits, or
  built from hidden states and LM-head weights: "fused", no ``[tokens, V]`` logits ever), their
  log-softmax at the temperature into reused work buffers, the divergence's per-row value and its
  gradient, computed **in forward** and kept;
* **top-K teachers** -- ``missing_mass`` ``renorm`` (both sides over the K ids), ``tail`` (a K+1-th
  bucket) and ``zero`` (truncated teacher vs the full student) turn each row into bucket
  distributions; the divergence runs on those and the engine maps its gradient back to logits;
* **vocabulary parallelism** -- logits (or LM-head rows) sharded over a process group: maxima,
  sums and the hidden-state gradient are reduced across it (:class:`VocabParallel`);
* **token selection** -- keep a fraction of the valid rows, ranked by an entropy or by the
  divergence itself, before the differentiable pass, so dropped rows cost no gradient memory;
* **backward** -- one autograd function scales the stored gradient by ``grad_output`` and, for
  logits, scatters it into the logits' shape (the logits' ``.grad`` is the only logits-sized
  tensor it adds).

The divergence's closed form writes its gradient into the engine's buffers; a divergence with
only a value gets its gradient from autograd, one chunk at a time (the "autograd fallback").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdcompose.functional._checks import IGNORE_INDEX, no_autocast
from kdcompose.functional.divergences.base import LOG_ZERO, ChunkOps, Divergence

# Auto chunk rule: ``WORK_ROWS`` rows of the vocabulary per token, in the compute dtype, must fit
# the byte budget. Small chunks stay cache-resident on a CPU; on an accelerator bigger chunks
# amortise kernel launches. The fused path reads and updates the whole ``[V, H]`` weight gradient
# per chunk, so it uses bigger chunks.
AUTO_CHUNK_BYTES_CPU = 32 * 2**20
AUTO_CHUNK_BYTES_ACCELERATOR = 512 * 2**20
AUTO_FUSED_CHUNK_BYTES_CPU = 192 * 2**20
AUTO_FUSED_CHUNK_BYTES_ACCELERATOR = 1024 * 2**20
WORK_ROWS = 4
RENORM_ROWS = 16  # work rows of K entries per token for renorm from logits

Mode = Literal["full", "renorm", "tail", "zero"]
ScoreBy = Literal["teacher_entropy", "student_entropy", "divergence"]


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


class Rows:
    """Reads chunks of the selected rows of a ``[..., D]`` tensor.

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

    def at(self, start: int, end: int, ids: Tensor) -> Tensor:
        """``x[row, ids]`` for rows ``start:end`` of the selection, without reading whole rows."""
        if self.flat is not None:
            r = torch.arange(start, end, device=ids.device) if self.index is None else self.index[start:end]
            return self.flat[r.unsqueeze(-1), ids]
        assert self.unravelled is not None
        return self.x[(*(u[start:end].unsqueeze(-1) for u in self.unravelled), ids)]


def valid_rows(labels: Tensor | None, n_positions: int, device: torch.device) -> tuple[Tensor | None, int]:
    """Flat indices (on ``device``) of the non-ignored positions, or ``None`` when all count."""
    if labels is None:
        return None, n_positions
    valid = labels.reshape(-1).to(device) != IGNORE_INDEX
    index = valid.nonzero().squeeze(1)
    n_valid = int(index.numel())
    if n_valid == n_positions:
        return None, n_positions
    return index, n_valid


def work_rows(divergence: Divergence) -> int:
    """Work rows per token the full-vocabulary loop allocates for ``divergence``: ``WORK_ROWS`` (the
    JSD's four), more for a closed form that needs more, so the auto chunk keeps the work buffers
    within the same bytes whatever the divergence."""
    return max(WORK_ROWS, 2 + max(1, divergence.scratch_buffers))


def auto_chunk(width: int, dtype: torch.dtype, device: torch.device, rows: int, fused: bool = False) -> int:
    """Tokens per chunk so that ``rows`` work rows of ``width`` entries fit the byte budget."""
    if fused:
        budget = AUTO_FUSED_CHUNK_BYTES_CPU if device.type == "cpu" else AUTO_FUSED_CHUNK_BYTES_ACCELERATOR
    else:
        budget = AUTO_CHUNK_BYTES_CPU if device.type == "cpu" else AUTO_CHUNK_BYTES_ACCELERATOR
    row_bytes = max(1, width) * torch.empty((), dtype=dtype).element_size() * rows
    return max(1, budget // row_bytes)


# --------------------------------------------------------------------------------------------
# Vocabulary parallelism
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabParallel:
    """The vocabulary is sharded over ``group``: each rank passes its own contiguous slice of the
    logits' last dimension (or of the LM heads' rows), rows and labels are the same on every rank.

    Row maxima and sums over the vocabulary are all-reduced, so each rank computes the same value
    and the gradient of its own slice; with hidden states (fused) the hidden-state gradient is
    all-reduced too (every rank's head rows contribute to it). Every rank must call with the same
    rows, labels and settings (the collectives run in lockstep). Top-K teachers are not supported.
    """

    group: Any

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size(self.group)


def _group_of(parallel: VocabParallel | None) -> Any:
    return None if parallel is None else parallel.group


def log_softmax_into(
    x: Tensor, out: Tensor, scratch: Tensor, temperature: float, group: Any = None
) -> Tensor:
    """``out = log_softmax(x / temperature)`` over the whole vocabulary, computed in ``out.dtype``.

    Never writes to ``x`` unless ``x`` *is* ``scratch``; upcasts before dividing so bf16 inputs lose
    nothing more. With a ``group`` the max and the sum of exponentials are all-reduced.
    """
    if temperature != 1.0 or (group is not None and x.dtype != out.dtype):
        if x.data_ptr() != scratch.data_ptr() or x.dtype != scratch.dtype:
            scratch.copy_(x)
            x = scratch
        if temperature != 1.0:
            x.div_(temperature)
    if group is None:
        return torch.log_softmax(x, dim=-1, dtype=out.dtype, out=out)
    top = x.amax(-1)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    torch.sub(x, top.unsqueeze(-1), out=out)
    sums = torch.exp(out, out=scratch).sum(-1)
    torch.distributed.all_reduce(sums, group=group)
    return out.sub_(sums.log_().unsqueeze(-1))


def row_lse(x: Tensor, scratch: Tensor) -> Tensor:
    """Per-row log-sum-exp through a work buffer (``scratch`` may be ``x``); all -inf -> -inf."""
    m = x.amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.sub(x, m.unsqueeze(-1), out=scratch).exp_().sum(-1).log_().add_(m)


# --------------------------------------------------------------------------------------------
# Students: raw logits of a chunk (full, or at given ids)
# --------------------------------------------------------------------------------------------


def linear_into(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``hidden @ weight.T + bias``, written into ``out`` when the dtypes allow it."""
    hidden = hidden.to(weight.dtype)
    if weight.dtype == out.dtype and (bias is None or bias.dtype == out.dtype):
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    return torch.nn.functional.linear(hidden, weight, bias)


class LogitsStudent:
    """A student given by its logits ``[..., V]`` (the only tensor that gets a gradient)."""

    def __init__(self, logits: Tensor, index: Tensor | None):
        self.logits = logits
        self.rows = Rows(logits, index)
        self.width = logits.shape[-1]

    def chunk(self, start: int, end: int) -> StudentChunk:
        return StudentChunk(self, start, end)


class LinearStudent:
    """A student given by hidden states ``[..., H]`` and an LM head ``weight [V, H]`` (+ ``bias``)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor | None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.rows = Rows(hidden, index)
        self.width = weight.shape[0]

    def chunk(self, start: int, end: int) -> StudentChunk:
        return StudentChunk(self, start, end)


class StudentChunk:
    """Rows ``start:end`` of a student: its raw logits there, and what the gradient chain needs."""

    def __init__(self, student: LogitsStudent | LinearStudent, start: int, end: int):
        self.student, self.start, self.end = student, start, end
        self.h: Tensor | None = None
        self.w_rows: Tensor | None = None
        if isinstance(student, LinearStudent):
            self.h = student.rows.get(start, end)

    def full(self, buf: Tensor) -> Tensor:
        if isinstance(self.student, LogitsStudent):
            return self.student.rows.get(self.start, self.end, buf)
        assert self.h is not None
        return linear_into(self.h, self.student.weight, self.student.bias, buf)

    def at_ids(self, ids: Tensor) -> Tensor:
        """Raw logits at ``ids [c, K]`` only (gathered weight rows for a linear student)."""
        if isinstance(self.student, LogitsStudent):
            return self.student.rows.at(self.start, self.end, ids)
        assert self.h is not None
        weight, bias = self.student.weight, self.student.bias
        c, k = ids.shape
        flat = ids.reshape(-1)
        self.w_rows = weight.index_select(0, flat).view(c, k, weight.shape[1])
        zk = torch.bmm(self.w_rows, self.h.to(weight.dtype).unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            zk = zk + bias.index_select(0, flat).view(c, k).to(zk.dtype)
        return zk


# --------------------------------------------------------------------------------------------
# Teachers: raw logits of a chunk, or its top-K
# --------------------------------------------------------------------------------------------


class FullTeacher:
    """Teacher logits rows (``LogitsStudent``-like) or hidden states + LM head; never differentiated."""

    def __init__(self, source: LogitsStudent | LinearStudent):
        self.source = source
        self.width = source.width

    def full(self, start: int, end: int, buf: Tensor) -> Tensor:
        return self.source.chunk(start, end).full(buf)


@dataclass
class TopkRows:
    """A top-K teacher for the selected rows: ``lp [n, K]`` (compute dtype), safe ``ids`` and ``present``."""

    lp: Tensor
    ids: Tensor
    present: Tensor

    def select(self, keep: Tensor) -> TopkRows:
        return TopkRows(self.lp[keep], self.ids[keep], self.present[keep])

    def topk(self, start: int, end: int, buf: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return self.lp[start:end], self.ids[start:end], self.present[start:end]


class LocalTopk:
    """The top-K of a local teacher, taken chunk by chunk from its logits (never whole).

    ``temperature``: the teacher's log-probabilities are taken at it (1 for ``renorm``, which divides
    by the training temperature after the top-K, as ms-swift's local teacher does; T otherwise).
    Accumulates the covered probability mass for ``<metric>_topk_mass``.
    """

    def __init__(self, teacher: FullTeacher, k: int, temperature: float, dtype: torch.dtype):
        self.teacher, self.k, self.temperature, self.dtype = teacher, k, temperature, dtype
        self.mass: Tensor | None = None

    def topk(self, start: int, end: int, buf: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        assert buf is not None
        logits = self.teacher.full(start, end, buf).to(self.dtype)
        if self.temperature != 1.0:
            logits = (
                logits.div_(self.temperature)
                if logits.data_ptr() == buf.data_ptr()
                else logits / self.temperature
            )
        lp, ids = torch.topk(torch.log_softmax(logits, dim=-1), self.k, dim=-1)
        del logits
        present = ~torch.isneginf(lp)
        first = present.to(torch.int8).argmax(-1, keepdim=True)
        ids = torch.where(present, ids, torch.gather(ids, 1, first))
        mass = torch.where(present, lp.exp(), torch.zeros_like(lp)).sum()
        self.mass = mass if self.mass is None else self.mass + mass
        return lp, ids, present


# --------------------------------------------------------------------------------------------
# Gradient sinks: where the per-chunk dL/dlogits goes
# --------------------------------------------------------------------------------------------

_RELEASED = object()


def _scale_by(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place, skipping the pass when it is exactly 1 on the CPU."""
    if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


class LogitsGrad:
    """The gradient w.r.t. the selected rows of the student's logits, stored during forward.

    Full rows: one ``[n, V]`` tensor in the logits' dtype (written by the divergence directly).
    ``renorm``: ``[n, K]`` at the teacher's ids, scattered into the logits' shape in backward.
    """

    def __init__(
        self, student: LogitsStudent, index: Tensor | None, n: int, dtype: torch.dtype, k: int | None
    ):
        logits = student.logits
        self.shape, self.index, self.logits_dtype = logits.shape, index, logits.dtype
        self.k = k
        if k is None:
            self.storage = logits.new_empty((n, logits.shape[-1]))
            self.ids = None
        else:
            self.storage = logits.new_empty((n, k), dtype=dtype)
            self.ids = torch.empty((n, k), dtype=torch.int64, device=logits.device)

    def out_for(self, chunk: StudentChunk, work_a: Tensor) -> Tensor:
        return self.storage[chunk.start : chunk.end]

    def add_full(self, chunk: StudentChunk, dz: Tensor) -> None:
        pass  # written in place by the divergence

    def add_ids(self, chunk: StudentChunk, ids: Tensor, dzk: Tensor) -> None:
        assert self.ids is not None
        self.storage[chunk.start : chunk.end] = dzk
        self.ids[chunk.start : chunk.end] = ids

    def finish_forward(self, parallel: VocabParallel | None) -> None:
        pass

    def backward(self, grad_output: Tensor) -> tuple[Tensor]:
        grad = _scale_by(self.storage, grad_output)
        self.storage = None  # type: ignore[assignment]  # hand it over: autograd adopts it in place
        shape, index, vocab = self.shape, self.index, self.shape[-1]
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


# --------------------------------------------------------------------------------------------
# One chunk of a divergence
# --------------------------------------------------------------------------------------------


def apply_divergence(
    divergence: Divergence,
    ls: Tensor,
    lt: Tensor,
    scratch: Sequence[Tensor],
    grad_out: Tensor | None,
    coef: float,
    grad_scratch: Tensor | None = None,
    parallel: VocabParallel | None = None,
) -> Tensor:
    """Per-row value of ``divergence`` and, when ``grad_out`` is given, ``coef * d value / d u`` in it.

    Uses the closed form when the divergence has one, else autograd on ``divergence.value`` for
    this chunk only (``ls``, ``lt`` untouched then; ``scratch[0]`` is used).
    """
    group = _group_of(parallel)
    ops = ChunkOps(group, scratch, grad_out, coef, grad_scratch if grad_out is not None else None)
    if divergence.has_closed_form:
        return divergence.value_and_grad(ls, lt, ops)
    return _autograd_chunk(divergence, ls, lt, ops, 1 if parallel is None else parallel.world_size)


def _autograd_chunk(divergence: Divergence, ls: Tensor, lt: Tensor, ops: ChunkOps, world: int) -> Tensor:
    want = ops.grad_out is not None
    with torch.enable_grad() if want else torch.no_grad():
        leaf = ls.detach().requires_grad_(want)
        value = divergence.value(leaf, lt, ChunkOps(ops.group))
        if not isinstance(value, Tensor) or value.shape != ls.shape[:-1]:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"divergence {divergence.describe()!r}: value(ls, lt, ops) must return one value per row, "
                f"shape {tuple(ls.shape[:-1])}, got {got}; reduce over the vocabulary with ops.rowsum"
            )
        if not want:
            return value.detach()
        # Every rank holds the same (replicated) value: backpropagate 1/world of it through the
        # all-reducing row sums, so each rank gets the gradient of its own slice exactly once.
        grads = torch.autograd.grad(value.sum() / world, leaf, allow_unused=True)
    value = value.detach()
    g = grads[0] if grads[0] is not None else torch.zeros_like(ls)
    s = torch.exp(ls, out=ops.scratch[0])
    total = ops.rowsum(g)
    torch.addcmul(g, s, total.neg_().unsqueeze(-1), out=g)  # through the softmax: g - s * sum(g)
    ops.write_grad(g)
    return value


def _bucket_divergence(
    divergence: Divergence, ls: Tensor, lt: Tensor, coef: float, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """A divergence over ``[c, B]`` bucket log-probabilities (absent entries hold ``LOG_ZERO``).

    Returns the per-row value and ``coef * d value / d (bucket log-odds)`` (or None).
    """
    scratch = [torch.empty_like(ls) for _ in range(max(1, divergence.scratch_buffers))]
    grad = torch.empty_like(ls) if want_grad else None
    per_row = apply_divergence(divergence, ls, lt, scratch, grad, coef, grad)
    return per_row, grad


def _teacher_log_tail(lt_k: Tensor) -> Tensor:
    """``log(1 - sum_k exp(lt_k))`` per row, the teacher's mass outside its top-K, in float64
    (``[c, K]``: negligible next to the ``[c, V]`` work) where the device has it.

    Why: when the top-K holds nearly all the mass, float32 loses the tail to cancellation
    (``logsumexp`` of the top-K is a difference of O(1) terms near 0): with a 0.998 top-K mass
    the float32 tail was 2.5e-5 off relatively, which put 8e-6 on a 0.19 gradient; in float64
    the kernel matches the float64 oracle within 5e-7 on the same inputs.
    """
    wide = lt_k.float() if lt_k.device.type == "mps" else lt_k.double()
    tiny = torch.finfo(wide.dtype).tiny
    log_mass = torch.logsumexp(wide, dim=-1)
    return torch.log(torch.clamp(-torch.expm1(log_mass), min=tiny)).to(lt_k.dtype)


# --------------------------------------------------------------------------------------------
# The job: one divergence over the selected rows
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything one engine run needs besides its inputs."""

    divergence: Divergence
    temperature: float
    mode: Mode
    n: int
    scale: float
    chunk: int
    dtype: torch.dtype
    parallel: VocabParallel | None = None
    name: str = "the divergence"
    stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def coef(self) -> float:
        """``scale`` times the 1/T of the chain rule through ``u = z / T``."""
        return self.scale / self.temperature


Teacher = FullTeacher | TopkRows | LocalTopk
Sink = LogitsGrad | LinearGrad


def _work(student: LogitsStudent | LinearStudent, job: Job, count: int) -> list[Tensor]:
    like = student.logits if isinstance(student, LogitsStudent) else student.hidden
    rows = min(job.chunk, max(1, job.n))
    return [like.new_empty((rows, student.width), dtype=job.dtype) for _ in range(count)]


def run(
    job: Job,
    student: LogitsStudent | LinearStudent,
    teacher: Teacher,
    sink: Sink | None,
    kernel: Callable[..., Tensor] | None = None,
) -> Tensor:
    """The chunk loop. Returns the sum of the per-row values (times ``job.scale``) as a 0-d tensor,
    or, with ``kernel`` (a no-gradient scoring pass), the per-row scores ``[n]``.

    ``kernel(ls, lt, scratch) -> [c]`` replaces the divergence (``ls``/``lt`` are full or bucket
    log-probabilities; it may overwrite them).
    """
    like = student.logits if isinstance(student, LogitsStudent) else student.hidden
    want_grad = sink is not None and (not isinstance(sink, LinearGrad) or sink.wanted)
    scores = like.new_empty((job.n,), dtype=job.dtype) if kernel is not None else None
    total = like.new_zeros((), dtype=job.dtype)
    group = _group_of(job.parallel)
    divergence, temperature, coef = job.divergence, job.temperature, job.coef

    if job.mode == "full":
        assert isinstance(teacher, FullTeacher)
        work = _work(student, job, 2 + max(1, divergence.scratch_buffers))
        for start in range(0, job.n, job.chunk):
            end = min(start + job.chunk, job.n)
            rows = end - start
            a, b, *scratch = (w[:rows] for w in work)
            chunk = student.chunk(start, end)
            grad_out = sink.out_for(chunk, a) if want_grad and sink is not None else None
            ls = log_softmax_into(chunk.full(scratch[0]), a, scratch[0], temperature, group)
            lt = log_softmax_into(teacher.full(start, end, scratch[0]), b, scratch[0], temperature, group)
            if kernel is not None:
                assert scores is not None
                scores[start:end] = kernel(ls, lt, scratch)
                continue
            spare = (
                grad_out
                if grad_out is not None and grad_out.dtype == job.dtype and grad_out is not a
                else None
            )
            per_row = apply_divergence(divergence, ls, lt, scratch, grad_out, coef, spare, job.parallel)
            total += per_row.sum()
            if grad_out is not None and sink is not None:
                sink.add_full(chunk, grad_out)
        del work
        return scores if scores is not None else total.mul_(job.scale)

    if job.parallel is not None:
        raise ValueError("vocabulary-parallel top-K distillation is not supported; use full logits")
    assert isinstance(teacher, TopkRows | LocalTopk)
    dense = job.mode != "renorm"
    local = isinstance(teacher, LocalTopk)
    n_work = 2 if dense else (1 if local else 0)
    work = _work(student, job, n_work) if n_work else []
    tiny_log = math.log(torch.finfo(job.dtype).tiny)
    for start in range(0, job.n, job.chunk):
        end = min(start + job.chunk, job.n)
        rows = end - start
        chunk_work = [w[:rows] for w in work]
        lp, ids, present = teacher.topk(start, end, chunk_work[-1] if local else None)
        chunk = student.chunk(start, end)
        neg_inf = torch.full((), -math.inf, dtype=job.dtype, device=lp.device)

        if not dense:  # renorm: both sides over the K ids, student logits only there
            zk = chunk.at_ids(ids).to(job.dtype)
            ls = torch.log_softmax(torch.where(present, zk / temperature, neg_inf), dim=-1)
            lt = torch.log_softmax(torch.where(present, lp / temperature, neg_inf), dim=-1)
            ls, lt = ls.clamp_min(LOG_ZERO), lt.clamp_min(LOG_ZERO)
            if kernel is not None:
                assert scores is not None
                scores[start:end] = kernel(ls, lt, [torch.empty_like(ls)])
                continue
            per_row, dzk = _bucket_divergence(divergence, ls, lt, coef, want_grad)
            total += per_row.sum()
            if dzk is not None and sink is not None:
                sink.add_ids(chunk, ids, torch.where(present, dzk, torch.zeros_like(dzk)))
            continue

        w0, w1 = chunk_work[0], chunk_work[1]
        z = chunk.full(w0)
        if z.data_ptr() != w0.data_ptr() or z.dtype != w0.dtype:
            w0.copy_(z)
        if temperature != 1.0:
            w0.div_(temperature)
        lse = row_lse(w0, w1)
        ls_k = torch.where(present, torch.gather(w0, 1, ids) - lse.unsqueeze(-1), neg_inf)
        w1.copy_(w0).scatter_(1, ids, -math.inf)
        lse_tail = row_lse(w1, w1)  # log sum_{j not in ids} exp(z_j / T)
        ls_tail = (lse_tail - lse).clamp_min_(tiny_log)
        if job.mode == "zero":  # the teacher renormalized over its K ids, nothing elsewhere
            lt_k = torch.log_softmax(torch.where(present, lp, neg_inf), dim=-1)
            lt_tail = torch.full_like(ls_tail, LOG_ZERO)
        else:
            lt_k = torch.where(present, lp, neg_inf)
            lt_tail = _teacher_log_tail(lt_k)
        ls_b = torch.cat([ls_k, ls_tail.unsqueeze(-1)], -1).clamp_min_(LOG_ZERO)
        lt_b = torch.cat([lt_k, lt_tail.unsqueeze(-1)], -1).clamp_min_(LOG_ZERO)
        if kernel is not None:
            assert scores is not None
            scores[start:end] = kernel(ls_b, lt_b, [torch.empty_like(ls_b)])
            continue
        per_row, a = _bucket_divergence(divergence, ls_b, lt_b, coef, want_grad)
        total += per_row.sum()
        if a is None or sink is None:
            continue
        grad_out = sink.out_for(chunk, w1)
        target = grad_out if grad_out.dtype == w0.dtype else w1
        # Non-id tokens share a_tail in proportion s_j / p_tail = exp(z_j/T - lse_tail) <= 1.
        shift = torch.where(torch.isfinite(lse_tail), lse_tail, torch.full_like(lse_tail, math.inf))
        torch.sub(w0, shift.unsqueeze(-1), out=target).exp_().mul_(a[:, -1:])
        a_k = torch.where(present, a[:, :-1], torch.zeros_like(a[:, :-1]))
        target.scatter_(1, ids, 0.0).scatter_add_(1, ids, a_k)
        if target is not grad_out:
            grad_out.copy_(target)
        sink.add_full(chunk, grad_out)
    del work
    if isinstance(teacher, LocalTopk) and teacher.mass is not None:
        job.stats["topk_mass_sum"] = teacher.mass
    return scores if scores is not None else total.mul_(job.scale)


# --------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSelection:
    """Distil only a fraction of the valid tokens of a call: ``keep`` in (0, 1] of them, ranked by
    ``by`` (the teacher's or the student's entropy, or the divergence itself), ``order: high`` the
    largest scores first. ``ceil(keep * n_valid)`` tokens are kept (at least one when any is valid).

    The loss is the mean over the kept tokens. Scores come from one extra forward pass without
    gradient over every valid token (entropies and the divergence of the distributions the
    divergence compares: the K / K+1 buckets of a top-K teacher); the differentiable pass then
    runs on the kept tokens only, so the others cost no gradient memory.
    """

    by: ScoreBy = "teacher_entropy"
    keep: float = 0.5
    order: Literal["high", "low"] = "high"

    def __post_init__(self) -> None:
        if self.by not in ("teacher_entropy", "student_entropy", "divergence"):
            raise ValueError(
                f"tokens.by must be teacher_entropy, student_entropy or divergence, got {self.by!r}"
            )
        if (
            isinstance(self.keep, bool)
            or not isinstance(self.keep, (int, float))
            or not 0.0 < self.keep <= 1.0
        ):
            raise ValueError(f"tokens.keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.order not in ("high", "low"):
            raise ValueError(f"tokens.order must be high or low, got {self.order!r}")

    def count(self, n_valid: int) -> int:
        return 0 if n_valid == 0 else min(n_valid, max(1, math.ceil(self.keep * n_valid - 1e-9)))


def _entropy_kernel(side: Literal["student", "teacher"], group: Any) -> Callable[..., Tensor]:
    ops = ChunkOps(group)

    def kernel(ls: Tensor, lt: Tensor, scratch: Sequence[Tensor]) -> Tensor:
        log_p = ls if side == "student" else lt
        return ops.rowdot(torch.exp(log_p, out=scratch[0]), log_p, out=scratch[0]).neg_()

    return kernel


def _divergence_kernel(job: Job) -> Callable[..., Tensor]:
    def kernel(ls: Tensor, lt: Tensor, scratch: Sequence[Tensor]) -> Tensor:
        need = max(1, job.divergence.scratch_buffers)
        extra = list(scratch) + [torch.empty_like(ls) for _ in range(need - len(scratch))]
        return apply_divergence(job.divergence, ls, lt, extra, None, 1.0, None, job.parallel)

    return kernel


def select_rows(
    job: Job, student: LogitsStudent | LinearStudent, teacher: Teacher, selection: TokenSelection
) -> Tensor:
    """Positions (into the current selection, ascending) of the rows ``selection`` keeps."""
    if selection.by == "divergence":
        kernel = _divergence_kernel(job)
    else:
        kernel = _entropy_kernel(
            "student" if selection.by == "student_entropy" else "teacher", _group_of(job.parallel)
        )
    with torch.no_grad():
        scores = run(job, student, teacher, None, kernel=kernel)
        if isinstance(teacher, LocalTopk):
            teacher.mass = None
        n_keep = selection.count(job.n)
        kept = torch.topk(scores, n_keep, largest=selection.order == "high", sorted=False).indices
        return kept.sort().values


# --------------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------------


class EngineFunction(torch.autograd.Function):
    """``scale * sum of per-row values``; the students' gradients are computed in forward and handed
    to autograd on the first backward. Inputs after the first four are the differentiable tensors
    (logits, or hidden + weight + bias)."""

    @staticmethod
    def forward(ctx, job: Job, student, teacher, sink, *inputs: Tensor | None) -> Tensor:
        total = run(job, student, teacher, sink)
        if sink is not None:
            sink.finish_forward(job.parallel)
        ctx.sink = sink
        ctx.what = job.name
        ctx.n_inputs = len(inputs)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        sink = ctx.sink
        if sink is _RELEASED:
            raise RuntimeError(
                f"{ctx.what} computes its gradient during forward and hands it to autograd on the first "
                "backward; backpropagating through the same call twice (retain_graph=True) is not "
                "supported. Recompute the loss, or use a *_reference function for such experiments."
            )
        ctx.sink = _RELEASED
        none4 = (None, None, None, None)
        if sink is None:
            return (*none4, *((None,) * ctx.n_inputs))
        return (*none4, *sink.backward(grad_output))


def execute(
    job: Job, student, teacher, sink, inputs: Sequence[Tensor | None], device: torch.device
) -> Tensor:
    """Run ``job`` through :class:`EngineFunction` with autocast off (our dtypes are deliberate)."""
    with no_autocast(device):
        return EngineFunction.apply(job, student, teacher, sink, *inputs)
