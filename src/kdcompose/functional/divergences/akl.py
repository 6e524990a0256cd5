"""Adaptive Kullback-Leibler divergence (AKL) of Wu et al., COLING 2025 (arXiv 2404.02657).

Per position, the teacher's tokens sorted by probability are split into a *head* (the most likely
tokens while their cumulative probability stays <= ``mu``, always at least the top one) and a
*tail*. ``g_head`` / ``g_tail`` are the L1 gaps ``sum |p_t - p_s|`` over each part, and::

    AKL = g_head / (g_head + g_tail) * KL(p_t || p_s) + g_tail / (g_head + g_tail) * KL(p_s || p_t)

Forward KL fits the head, reverse KL the tail, each weighted by where the student is off. The
weights are constants for the gradient (the reference code detaches the student in them), exactly
as the authors' ``get_ratio`` / ``AKL`` (github.com/wutaiqiang/LLM_KD_AKL, ``mu = 0.5``). When the
two distributions agree both gaps are 0 and so is the value (the reference would divide 0 by 0).

The head is found without sorting the vocabulary: a top-k of the teacher's log-probabilities,
with k growing until the cumulative mass crosses ``mu``. Under vocabulary parallelism each rank's
top-k candidates are gathered, so every rank finds the same head threshold (there, tokens tied
with the last head token at the boundary all join the head; a full sort would split them in an
arbitrary order, as it also does in the reference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcompose.functional.divergences._params import Probability
from kdcompose.functional.divergences.base import ChunkOps, Divergence, DivergenceParams
from kdcompose.registry import register_divergence

_FIRST_K = 64


class AklParams(DivergenceParams):
    mu: Probability = 0.5
    """Cumulative teacher probability that bounds the head, in [0, 1]; the paper's default 0.5."""


def head_candidates(lt: Tensor, mu: float, ops: ChunkOps) -> tuple[Tensor, Tensor]:
    """``(ids [c, k], in_head [c, k])``: this rank's top-k ids of ``lt`` and which of them are in the head.

    The head of a row is its ``n`` most likely tokens, ``n = max(1, #{r : cumsum_r <= mu})`` over the
    probabilities sorted in decreasing order (the reference's ``mask = cumsum > mu; mask[0] = False``).
    The first k of the union of every rank's top-k are the global top-k; k grows (x4) until the
    cumulative mass crosses ``mu`` inside them or every token is a candidate. Every rank takes the
    same decisions (they depend only on gathered values), so the collectives stay in lockstep.
    """
    width = lt.shape[-1]
    widest = ops.state.get("akl_widest") or _widest_slice(width, ops)
    ops.state["akl_widest"] = widest
    k = min(ops.state.get("akl_k", _FIRST_K), widest)  # start where the previous chunk ended
    while True:
        values, ids = torch.topk(lt.detach(), min(k, width), dim=-1)
        union = values
        if ops.group is not None:
            padded = torch.full((values.shape[0], k), -math.inf, dtype=values.dtype, device=values.device)
            padded[:, : values.shape[-1]] = values
            gathered = [torch.empty_like(padded) for _ in range(torch.distributed.get_world_size(ops.group))]
            torch.distributed.all_gather(gathered, padded, group=ops.group)
            union = torch.cat(gathered, dim=-1).sort(dim=-1, descending=True).values
        complete = k >= widest  # every rank contributed its whole slice
        candidates = union if complete else union[:, :k]
        n_head = (candidates.exp().cumsum(-1) <= mu).sum(-1).clamp_min(1)
        if complete or bool((n_head < candidates.shape[-1]).all()):
            break
        k = min(4 * k, widest)
    # the next chunk starts at this width, or a quarter of it when the heads were much smaller
    shrink = k > _FIRST_K and int(n_head.max()) * 8 < k
    ops.state["akl_k"] = k // 4 if shrink else k
    if ops.group is None:  # the first n_head of the sorted top-k, as the reference's sort
        return ids, torch.arange(values.shape[-1], device=values.device) < n_head.unsqueeze(-1)
    threshold = candidates.gather(-1, (n_head - 1).unsqueeze(-1))
    return ids, values >= threshold


def _widest_slice(width: int, ops: ChunkOps) -> int:
    if ops.group is None:
        return width
    top = torch.tensor([width], dtype=torch.int64)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=ops.group)
    return int(top.item())


def head_weights(s: Tensor, t: Tensor, ids: Tensor, in_head: Tensor, scratch: Tensor, ops: ChunkOps):
    """``(h, l)``: the head's and the tail's share of the L1 gap ``sum |p_t - p_s|`` (0, 0 if none)."""
    total = ops.rowsum(torch.sub(s, t, out=scratch).abs_())
    head = ops.rowsum((s.gather(-1, ids) - t.gather(-1, ids)).abs_().mul_(in_head))
    tiny = torch.finfo(total.dtype).tiny
    h = torch.where(total > 0, head / total.clamp_min(tiny), torch.zeros_like(total)).clamp_(0.0, 1.0)
    return h, torch.where(total > 0, 1.0 - h, torch.zeros_like(h))


@register_divergence("akl")
class AdaptiveKL(Divergence):
    """g_head/(g_head+g_tail) KL(p_t||p_s) + g_tail/(g_head+g_tail) KL(p_s||p_t), weights detached."""

    Params = AklParams
    params: AklParams
    scratch_buffers = 2
    compilable = False  # the head search grows its top-k in a data-dependent loop
    zero_mass_reason = (
        "its reverse-KL part KL(p_s || p_t) is infinite where the truncated teacher has no mass"
    )

    def value(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        with torch.no_grad():
            ids, in_head = head_candidates(lt, self.params.mu, ops)
            s, t = ls.detach().exp(), lt.exp()
            h, l_tail = head_weights(s, t, ids, in_head, torch.empty_like(s), ops)
        fkl = ops.rowsum(lt.exp() * (lt - ls))
        rkl = ops.rowsum(ls.exp() * (ls - lt))
        return h * fkl + l_tail * rkl

    def value_and_grad(self, ls: Tensor, lt: Tensor, ops: ChunkOps) -> Tensor:
        """Gradient ``coef * (h (s - t) - l s (log t - log s + RKL))``, weights h, l constant."""
        ids, in_head = head_candidates(lt, self.params.mu, ops)
        c, d = ops.scratch[0], ops.scratch[1]
        diff = torch.sub(lt, ls, out=c)  # log t - log s
        s = ls.exp_()
        t = lt.exp_()
        h, l_tail = head_weights(s, t, ids, in_head, d, ops)
        fkl = ops.rowdot(t, diff, out=d)
        rkl = ops.rowdot(s, diff, out=d).neg_()
        if ops.grad_out is not None:
            g = torch.addcmul((h - l_tail * rkl).unsqueeze(-1), diff, l_tail.neg().unsqueeze(-1), out=d)
            g.mul_(s)
            torch.addcmul(g, t, h.neg().unsqueeze(-1), out=g)
            ops.write_grad(g)
        return h * fkl + l_tail * rkl


__all__ = ["AdaptiveKL", "AklParams", "head_candidates", "head_weights"]
