"""One rank of the vocabulary-parallel check (tests/swift/test_vocab_parallel.py).

Usage: python vocab_parallel_worker.py RANK WORLD STORE_FILE OUT_FILE

Every rank builds the same full problem from one seed, runs the chunk engine on the whole
vocabulary (the reference) and on its own contiguous slice with ``VocabParallel`` (logits and
fused), and saves both; the test compares them. A gloo group over a FileStore: no port to race for.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from kdcompose.functional import (
    Divergence,
    TokenSelection,
    VocabParallel,
    divergence_loss,
    fused_linear_divergence_loss,
)
from kdcompose.functional.divergences import AutogradOnly, get_divergence

CASES = {
    "jsd": {"kind": "jsd", "beta": 0.4},
    "jsd0": {"kind": "jsd", "beta": 0.0},
    "fkl": "fkl",
    "rkl": "rkl",
    "skew_fkl": {"kind": "skew_fkl", "alpha": 0.1},
    "skew_rkl": {"kind": "skew_rkl", "alpha": 0.1},
    "tvd": "tvd",
    "akl": {"kind": "akl", "mu": 0.5},
    "ab": {"kind": "ab", "alpha": 0.2, "beta": 0.7},
}


class Renyi2(Divergence):
    """A value-only divergence (log-sum-exp over the sharded vocabulary): the autograd fallback."""

    def value(self, ls, lt, ops):
        x = 2.0 * lt - ls
        top = ops.rowmax(x)
        return top + torch.log(ops.rowsum(torch.exp(x - top.unsqueeze(-1))))


def _grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [x.grad for x in leaves]


def main(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = run(rank, world)
    finally:
        dist.destroy_process_group()
    torch.save(results, out)


def run(rank: int, world: int) -> dict:
    parallel = VocabParallel(group=dist.group.WORLD)
    results: dict = {}
    for vocab, teacher_scale in ((23, 2.0), (300, 0.1)):  # uneven slices; a flat teacher (AKL's head > 64)
        problem = Problem(vocab, teacher_scale, rank, world)
        cases = {name: get_divergence(spec) for name, spec in CASES.items()}
        cases["renyi_fallback"] = Renyi2()
        cases["jsd_autograd"] = AutogradOnly(get_divergence({"kind": "jsd", "beta": 0.4}))
        for name, div in cases.items():
            for selection in (None, TokenSelection("divergence", 0.5)):
                key = f"{name}/V{vocab}/{'tokens' if selection else 'all'}"
                results[key] = problem.compare(
                    {"divergence": div, "temperature": 1.3, "chunk_size": 2, "tokens": selection}, parallel
                )
    return results


class Problem:
    """The same random problem on every rank; ``lo:hi`` is this rank's slice of the vocabulary."""

    def __init__(self, vocab: int, teacher_scale: float, rank: int, world: int):
        gen = torch.Generator().manual_seed(vocab)
        tokens, hidden = 7, 5
        bounds = torch.linspace(0, vocab, world + 1).round().long().tolist()
        self.lo, self.hi = bounds[rank], bounds[rank + 1]
        self.student = torch.randn(tokens, vocab, generator=gen) * 3
        self.teacher = torch.randn(tokens, vocab, generator=gen) * teacher_scale
        self.labels = torch.tensor([1, -100, 2, 3, -100, 4, 5])
        self.h_s, self.h_t = (
            torch.randn(tokens, hidden, generator=gen),
            torch.randn(tokens, hidden, generator=gen),
        )
        self.w_s, self.w_t = (
            torch.randn(vocab, hidden, generator=gen),
            torch.randn(vocab, hidden, generator=gen),
        )
        self.b_s = torch.randn(vocab, generator=gen)

    def logits(self, student: torch.Tensor, kw: dict, parallel: VocabParallel | None) -> torch.Tensor:
        teacher = self.teacher if parallel is None else self.teacher[:, self.lo : self.hi]
        return divergence_loss(student, teacher, self.labels, vocab_parallel=parallel, **kw)

    def fused(self, h, w, b, kw: dict, parallel: VocabParallel | None) -> torch.Tensor:
        w_t = self.w_t if parallel is None else self.w_t[self.lo : self.hi]
        return fused_linear_divergence_loss(
            h, w, self.h_t, w_t, self.labels, student_bias=b, vocab_parallel=parallel, **kw
        )

    def compare(self, kw: dict, parallel: VocabParallel) -> dict:
        sl = slice(self.lo, self.hi)
        ref, (g_ref,) = _grads(lambda s: self.logits(s, kw, None), self.student)
        par, (g_par,) = _grads(lambda s: self.logits(s, kw, parallel), self.student[:, sl])
        f_ref, fg_ref = _grads(lambda h, w, b: self.fused(h, w, b, kw, None), self.h_s, self.w_s, self.b_s)
        f_par, fg_par = _grads(
            lambda h, w, b: self.fused(h, w, b, kw, parallel), self.h_s, self.w_s[sl], self.b_s[sl]
        )
        return {
            "ref": ref, "par": par, "grad_ref": g_ref[:, sl], "grad_par": g_par,
            "fused_ref": f_ref, "fused_par": f_par,
            "fused_grads_ref": [fg_ref[0], fg_ref[1][sl], fg_ref[2][sl]], "fused_grads_par": fg_par,
        }  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
