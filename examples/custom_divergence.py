"""Writing your own divergence: the Renyi divergence of order a, registered as `renyi`.

Run it:  python examples/custom_divergence.py

A divergence is a `Divergence` subclass with
  * `Params` -- a pydantic model of its parameters (the YAML `divergence: {kind: renyi, order: 2}`
    is validated with it, errors name the dotted path, e.g. `...divergence.order`),
  * `value(ls, lt, ops)` -- the per-position value from the student's and the teacher's
    log-probabilities `[rows, V]` (after temperature). Reduce over the vocabulary with
    `ops.rowsum` (it also sums across ranks when the vocabulary is sharded).
That is all: the chunk engine differentiates `value` with autograd one chunk at a time, so the
divergence trains chunked, fused (`fused: true`, no logits) and against a top-K teacher
(`missing_mass: renorm | tail`) with no gradient written by hand. A closed-form
`value_and_grad` is optional (docs/divergences.md#writing-one).

Make it available to configs by listing this file under `plugins:` in the YAML, by importing it
before loading the config, or from an installed package through the `kdcompose.divergences`
entry-point group (`renyi = "my_package.divergences:Renyi"`).
"""

from __future__ import annotations

import torch
from pydantic import model_validator

from kdcompose import build_composer, parse_config_text
from kdcompose.functional import ChunkOps, Divergence, DivergenceParams, divergence_loss
from kdcompose.functional import fused_linear_divergence_loss as fused_loss
from kdcompose.registry import register_divergence
from kdcompose.schema.types import PositiveFloat
from kdcompose.terms import LossContext


class RenyiParams(DivergenceParams):
    order: PositiveFloat = 2.0
    """a > 0, a != 1 (a -> 1 is forward KL)."""

    @model_validator(mode="after")
    def _not_one(self) -> RenyiParams:
        if self.order == 1.0:
            raise ValueError("order 1 is the forward KL: use `divergence: fkl`")
        return self


@register_divergence("renyi")
class Renyi(Divergence):
    """D_a(p_t || p_s) = log(sum p_t^a p_s^(1-a)) / (a - 1)."""

    Params = RenyiParams
    params: RenyiParams

    def value(self, ls: torch.Tensor, lt: torch.Tensor, ops: ChunkOps) -> torch.Tensor:
        a = self.params.order
        x = a * lt + (1.0 - a) * ls
        top = ops.rowmax(x).unsqueeze(-1)  # a log-sum-exp over the whole (maybe sharded) vocabulary
        return (top.squeeze(-1) + torch.log(ops.rowsum(torch.exp(x - top)))) / (a - 1.0)


CONFIG = """
rlhf:
  llm_kd_weight: 0
  loss_terms:
    kd_renyi: {type: lm_kd, divergence: {kind: renyi, order: 2}, temperature: 1.5}
"""


def main() -> None:
    torch.manual_seed(0)
    hidden, vocab, tokens = 8, 32, 6
    student_head, teacher_head = torch.nn.Linear(hidden, vocab), torch.nn.Linear(hidden, vocab)
    h_student, h_teacher = torch.randn(tokens, hidden), torch.randn(tokens, hidden)
    labels = torch.tensor([-100, 1, 2, 3, 4, 5])

    # chunked, from logits
    logits = student_head(h_student)
    chunked = divergence_loss(
        logits, teacher_head(h_teacher).detach(), labels, divergence="renyi", temperature=1.5, chunk_size=2
    )
    chunked.backward()
    print(f"chunked  renyi = {chunked.item():.6f}")

    # fused: from hidden states and LM-head weights, no [tokens, vocab] logits
    student_head.zero_grad()
    fused = fused_loss(
        h_student,
        student_head.weight,
        h_teacher,
        teacher_head.weight.detach(),
        labels,
        divergence={"kind": "renyi", "order": 2.0},
        temperature=1.5,
        chunk_size=2,
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias.detach(),
    )
    fused.backward()
    print(f"fused    renyi = {fused.item():.6f}")

    # in a composition: the term type `lm_kd` with `divergence: {kind: renyi, ...}`
    composer = build_composer(parse_config_text(CONFIG).composition)
    print(composer.formula())
    out = composer(
        LossContext(
            labels=labels,
            student_logits=student_head(h_student),
            teacher_logits=teacher_head(h_teacher).detach(),
        )
    )
    for key, value in out.metrics().items():
        print(f"{key} = {value.item():.6f}")


if __name__ == "__main__":
    main()
