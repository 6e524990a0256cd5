"""The chunk engine: every LM-head divergence, in every mode, through one loop.

What it owns, so a divergence (:mod:`kdcompose.functional.divergences`) does not:

* **valid rows** -- positions whose label is not -100 (and, with a top-K teacher, whose K values
  are not all ``-inf``), read chunk by chunk without copying the selection
  (:mod:`kdcompose.functional.sources`);
* **the chunk loop** -- the student's and the teacher's logits of a chunk (read from logits, or
  built from hidden states and LM-head weights: "fused", no ``[tokens, V]`` logits ever), their
  log-softmax at the temperature into reused work buffers, the divergence's per-row value and its
  gradient, computed **in forward** and kept;
* **top-K teachers** -- ``missing_mass`` ``renorm`` (both sides over the K ids), ``tail`` (a K+1-th
  bucket) and ``zero`` (truncated teacher vs the full student) turn each row into bucket
  distributions; the divergence runs on those and the engine maps its gradient back to logits;
* **vocabulary parallelism** -- logits (or LM-head rows) sharded over a process group: maxima,
  sums and the hidden-state gradient are reduced across it
  (:mod:`kdcompose.functional.vocab_parallel`);
* **backward** -- one autograd function scales the stored gradient by ``grad_output`` and, for
  logits, scatters it into the logits' shape (the logits' ``.grad`` is the only logits-sized
  tensor it adds; :mod:`kdcompose.functional.grads`).

Token selection (:mod:`kdcompose.functional.tokens`) runs this loop once without gradient to rank
the rows, then the differentiable pass on the kept ones.

The divergence's closed form writes its gradient into the engine's buffers; a divergence with
only a value gets its gradient from autograd, one chunk at a time (the "autograd fallback").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdcompose.functional._checks import no_autocast
from kdcompose.functional.divergences.base import LOG_ZERO, ChunkOps, Divergence
from kdcompose.functional.grads import RELEASED, LinearGrad, LogitsGrad
from kdcompose.functional.sources import FullTeacher, LinearStudent, LocalTopk, LogitsStudent, TopkRows
from kdcompose.functional.vocab_parallel import VocabParallel, group_of, log_softmax_into, row_lse

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
    state: dict | None = None,
) -> Tensor:
    """Per-row value of ``divergence`` and, when ``grad_out`` is given, ``coef * d value / d u`` in it.

    Uses the closed form when the divergence has one, else autograd on ``divergence.value`` for
    this chunk only (``ls``, ``lt`` untouched then; ``scratch[0]`` is used).
    """
    group = group_of(parallel)
    ops = ChunkOps(group, scratch, grad_out, coef, grad_scratch if grad_out is not None else None, state)
    if divergence.has_closed_form:
        return divergence.value_and_grad(ls, lt, ops)
    return _autograd_chunk(divergence, ls, lt, ops, 1 if parallel is None else parallel.world_size)


def _autograd_chunk(divergence: Divergence, ls: Tensor, lt: Tensor, ops: ChunkOps, world: int) -> Tensor:
    want = ops.grad_out is not None
    with torch.enable_grad() if want else torch.no_grad():
        leaf = ls.detach().requires_grad_(want)
        value = divergence.value(leaf, lt, ChunkOps(ops.group, state=ops.state))
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
    divergence: Divergence, ls: Tensor, lt: Tensor, coef: float, want_grad: bool, state: dict
) -> tuple[Tensor, Tensor | None]:
    """A divergence over ``[c, B]`` bucket log-probabilities (absent entries hold ``LOG_ZERO``).

    Returns the per-row value and ``coef * d value / d (bucket log-odds)`` (or None).
    """
    scratch = [torch.empty_like(ls) for _ in range(max(1, divergence.scratch_buffers))]
    grad = torch.empty_like(ls) if want_grad else None
    per_row = apply_divergence(divergence, ls, lt, scratch, grad, coef, grad, None, state)
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
    compiled: Callable[[Tensor, Tensor], tuple[Tensor, Tensor] | None] | None = None
    """The compiled chunk body (kdcompose.functional.compiled), full-vocabulary modes only."""

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
    group = group_of(job.parallel)
    divergence, temperature, coef = job.divergence, job.temperature, job.coef
    state: dict = {}  # what the divergence carries from one chunk to the next

    if job.mode == "full":
        assert isinstance(teacher, FullTeacher)
        work = _work(student, job, 2 if job.compiled else 2 + max(1, divergence.scratch_buffers))
        for start in range(0, job.n, job.chunk):
            end = min(start + job.chunk, job.n)
            rows = end - start
            a, b, *scratch = (w[:rows] for w in work)
            chunk = student.chunk(start, end)
            grad_out = sink.out_for(chunk, a) if want_grad and sink is not None else None
            if job.compiled is not None and kernel is None:
                result = job.compiled(chunk.full(a), teacher.full(start, end, b))
                if result is not None:
                    per_row, g = result
                    total += per_row.sum()
                    if grad_out is not None and sink is not None:
                        torch.mul(g, job.scale, out=grad_out)
                        sink.add_full(chunk, grad_out)
                    continue
                job.compiled = None  # it failed to compile (warned): eager from here on
                work = _work(student, job, 2 + max(1, divergence.scratch_buffers))
                a, b, *scratch = (w[:rows] for w in work)
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
            per_row = apply_divergence(
                divergence, ls, lt, scratch, grad_out, coef, spare, job.parallel, state
            )
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
            per_row, dzk = _bucket_divergence(divergence, ls, lt, coef, want_grad, state)
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
        per_row, a = _bucket_divergence(divergence, ls_b, lt_b, coef, want_grad, state)
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
        if sink is RELEASED:
            raise RuntimeError(
                f"{ctx.what} computes its gradient during forward and hands it to autograd on the first "
                "backward; backpropagating through the same call twice (retain_graph=True) is not "
                "supported. Recompute the loss, or use a *_reference function for such experiments."
            )
        ctx.sink = RELEASED
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
