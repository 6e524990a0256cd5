"""What the chunk engine reads, one chunk of selected rows at a time.

Students are logits ``[..., V]`` or hidden states with an LM head (``weight [V, H]``, ``bias``);
teachers are the same, or a top-K given per row, or taken per chunk from a local teacher's logits.
:class:`Rows` reads the valid rows of a tensor without copying the whole selection. No loss math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdcompose.functional._checks import IGNORE_INDEX


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
