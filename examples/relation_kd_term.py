"""A user term that taps modules: similarity-preserving relational KD (Tung & Mori, 2019).

No kdcompose edit is needed to read any module of either model. This term compares, for each
sample, the token-by-token cosine-similarity matrix of a student module's output with that of a
teacher module's output. The matrices are [tokens, tokens] whatever the widths, so a 64-wide
student layer can be compared with a 96-wide teacher layer without a projector. It reads two
modules per side: a decoder layer's output and the LM head's *input* (the final hidden state),
to show both kinds of tap.

Use it from YAML (the `plugins:` list imports this file before the config is validated):

    plugins: [examples/relation_kd_term.py]
    rlhf:
      loss_terms:
        relation_kd:
          weight: 0.5
          student_layer: model.language_model.layers.1
          teacher_layer: model.language_model.layers.2

The framework hooks exactly the declared `Tap`s, only while this term is active, records them
during the loss forward only, checks before training that every path names a module (naming
`rlhf.loss_terms.relation_kd.student_layer` and the closest module names when not), and hands
the recordings over in `LossContext.taps`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import StrictStr

from kdcompose import LossContext, LossTerm, Tap, TermNeeds, TermSpec, register_term


class RelationKdSpec(TermSpec):
    """YAML: `relation_kd: {weight, student_layer, teacher_layer, head_input}`."""

    student_layer: StrictStr = "model.language_model.layers.1"
    teacher_layer: StrictStr = "model.language_model.layers.1"
    head: StrictStr = "lm_head"
    """Module whose *input* is the final hidden state (tapped on both models)."""


@register_term("relation_kd")
class RelationKdTerm(LossTerm):
    """Mean over samples and tapped module pairs of ||G_s - G_t||^2 / tokens^2, where G is the
    row-normalised token-similarity matrix over the sample's non-padding tokens."""

    spec_class = RelationKdSpec
    spec: RelationKdSpec

    def taps(self) -> list[tuple[Tap, Tap]]:
        s, o = self.spec, self.origin
        return [
            (
                Tap("student", s.student_layer, origin=f"{o}.student_layer"),
                Tap("teacher", s.teacher_layer, origin=f"{o}.teacher_layer"),
            ),
            (
                Tap("student", s.head, io="input", origin=f"{o}.head"),
                Tap("teacher", s.head, io="input", origin=f"{o}.head"),
            ),
        ]

    @property
    def needs(self) -> TermNeeds:
        return TermNeeds(taps=frozenset(t for pair in self.taps() for t in pair))

    def compute(self, ctx: LossContext) -> torch.Tensor:
        losses = []
        for student_tap, teacher_tap in self.taps():
            student, teacher = ctx.tapped(student_tap)[-1], ctx.tapped(teacher_tap)[-1]
            mask = ctx.attention_mask.bool() if ctx.attention_mask is not None else None
            for row in range(student.shape[0]):
                keep = slice(None)
                if mask is not None:
                    # The LM head's input is trimmed to the completion when ms-swift keeps only the
                    # last logits (`logits_to_keep`): match the mask's suffix to it.
                    keep = mask[row][-student.shape[1] :]
                losses.append(_relation_distance(student[row][keep], teacher[row][keep]))
        return torch.stack(losses).mean() if losses else ctx.zero()

    def describe(self) -> str:
        return f"{self.name}({self.spec.student_layer}~{self.spec.teacher_layer}, {self.spec.head} input)"


def _relation_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||G_s - G_t||_F^2 / n^2 with G = normalize(X) normalize(X)^T for n tokens."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    n = max(student.shape[0], 1)
    return ((s @ s.T - t @ t.T) ** 2).sum() / (n * n)


def main() -> None:
    """Compose it on random tensors, as a custom training loop would."""
    from kdcompose import build_composer, parse_config_text

    config = parse_config_text("rlhf:\n  llm_kd_weight: 0\n  loss_terms:\n    relation_kd: {weight: 0.5}\n")
    composer = build_composer(config.composition)
    print(composer.formula())
    term = composer.term("relation_kd")
    torch.manual_seed(0)
    taps = {}
    for student_tap, teacher_tap in term.taps():
        taps[student_tap] = [torch.randn(2, 5, 8, requires_grad=True)]
        taps[teacher_tap] = [torch.randn(2, 5, 12)]
    out = composer(LossContext(taps=taps, attention_mask=torch.ones(2, 5)))
    out.total.backward()
    print({key: round(value.item(), 6) for key, value in out.metrics().items()})


if __name__ == "__main__":
    main()
