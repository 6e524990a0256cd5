"""`lm_jsd`: generalized JSD between student and teacher LM-head distributions.

It is `lm_kd` (kdcompose.terms.lm_kd) with the `jsd` divergence, under the contract's keys, metric
(`llm_kd_loss`) and formula: `beta` / `temperature` left unset inherit ms-swift's `rlhf.beta` /
`rlhf.temperature`, so a stock GKD config keeps training exactly as ms-swift does.

With `topk: K` the teacher is represented by its K most likely tokens -- what a teacher cache
or a served teacher can hand over, and what ms-swift's `gkd_logits_topk` does with a local
teacher. `missing_mass` names what happens to the probability outside those K tokens
(kdcompose.functional.topk_jsd): `renorm` (ms-swift), `tail` (TRL), `zero` (DistillKit).
"""

from __future__ import annotations

from kdcompose.defaults import SWIFT_GKD_BETA, SWIFT_GKD_TEMPERATURE
from kdcompose.functional import Divergence, GeneralizedJSD
from kdcompose.registry import register_term
from kdcompose.schema.types import PositiveFloat, Probability
from kdcompose.terms.lm_kd import LmHeadKdSpec, LmKdTerm, linear_head

__all__ = ["LmJsdSpec", "LmJsdTerm", "linear_head"]


class LmJsdSpec(LmHeadKdSpec):
    """`lm_jsd` knobs. `beta`/`temperature` left unset inherit `rlhf.beta`/`rlhf.temperature`
    (ms-swift's GKD defaults 0.5 / 0.9 when those are absent too)."""

    beta: Probability | None = None
    temperature: PositiveFloat | None = None


@register_term("lm_jsd")
class LmJsdTerm(LmKdTerm):
    """Generalized JSD (beta 0: KL(teacher||student), 1: KL(student||teacher)) per token,
    averaged over the tokens that carry a label, exactly as ms-swift's GKD loss."""

    spec_class = LmJsdSpec
    default_metric = "llm_kd_loss"
    spec: LmJsdSpec

    @property
    def beta(self) -> float:
        return SWIFT_GKD_BETA if self.spec.beta is None else self.spec.beta

    @property
    def temperature(self) -> float:
        return SWIFT_GKD_TEMPERATURE if self.spec.temperature is None else self.spec.temperature

    @property
    def divergence(self) -> Divergence:
        return GeneralizedJSD(beta=self.beta)

    def _missing_mass_path(self) -> str:
        return f"{self.origin}.beta"  # the knob to change is beta (missing_mass: zero needs beta 0)

    def describe(self) -> str:
        params = [f"beta={self.beta:g}"]
        if self.temperature != 1.0:
            params.append(f"T={self.temperature:g}")
        return f"{self.name}({', '.join(params + self._mode_words())})"
