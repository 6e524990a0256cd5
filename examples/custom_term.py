"""Writing your own loss term: logit MSE (Kim et al., 2021), registered as `logit_mse`.

Run it:  python examples/custom_term.py

A term is a LossTerm subclass with
  * a pydantic `spec_class` (its YAML block; `weight` and `type` are inherited),
  * `needs` -- what it reads, so the trainer runs the teacher only when an active term asks,
  * `compute(ctx)` -- its *unweighted* value; the composer applies the weight, skips it at
    weight 0 and logs `weight * value` as `<name>_loss`.
Make it available to configs by importing the module before loading the config, or from an
installed package through the `kdcompose.terms` entry-point group (docs/custom_terms.md).
"""

from __future__ import annotations

import torch

from kdcompose import (
    LossContext,
    LossTerm,
    TermNeeds,
    TermSpec,
    build_composer,
    parse_config_text,
    register_term,
)
from kdcompose.schema.types import PositiveFloat


class LogitMseSpec(TermSpec):
    """YAML: `logit_mse: {weight: 0.1, temperature: 2.0}`."""

    temperature: PositiveFloat = 1.0


@register_term("logit_mse")
class LogitMseTerm(LossTerm):
    """Mean squared error between temperature-scaled logits over labelled positions."""

    spec_class = LogitMseSpec
    spec: LogitMseSpec

    @property
    def needs(self) -> TermNeeds:
        return TermNeeds(student_logits=True, teacher_logits=True, labels=True)

    def compute(self, ctx: LossContext) -> torch.Tensor:
        valid = ctx.labels != -100
        if not bool(valid.any()):
            return ctx.zero()  # a 0 connected to the graph (finite even if a logit is ±inf)
        t = self.spec.temperature
        student = ctx.student_logits[valid].float() / t
        teacher = ctx.teacher_logits[valid].float().detach() / t
        return ((student - teacher) ** 2).mean()

    def describe(self) -> str:
        return f"{self.name}(T={self.spec.temperature:g})"


CONFIG = """
rlhf:
  llm_kd_weight: 0.5
  loss_terms:
    logit_mse: {weight: 0.1, temperature: 2.0}
"""


def main() -> None:
    config = parse_config_text(CONFIG)
    composer = build_composer(config.composition)
    print(composer.formula())

    torch.manual_seed(0)
    labels = torch.tensor([[-100, 3, 5, 7]])
    ctx = LossContext(
        labels=labels,
        student_logits=torch.randn(1, 4, 16, requires_grad=True),
        teacher_logits=torch.randn(1, 4, 16),
    )
    out = composer(ctx)
    out.total.backward()
    for key, value in out.metrics().items():
        print(f"{key} = {value.item():.6f}")
    print(f"loss = {out.total.item():.6f}")


if __name__ == "__main__":
    main()
