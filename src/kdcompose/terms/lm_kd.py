"""`lm_kd`: any divergence between the student's and the teacher's LM-head distributions.

`divergence: NAME` or `divergence: {kind: NAME, <params>}` picks one of the registered
divergences (`jsd`, `fkl`, `rkl`, `skew_fkl`, `skew_rkl`, `tvd`, `akl`, `ab`, or a plugin's;
docs/divergences.md). Every mode of the chunk engine is available, as on `lm_jsd` (which is this
term with `jsd`): logits, `fused: true` (hidden states + LM-head weights, no logits), `topk: K`
with `missing_mass`, a named `teacher`, and `tokens` (distil only a fraction of the labelled
tokens, ranked by entropy or by the divergence). `temperature` defaults to 1 here: `lm_kd` reads
no ms-swift knob (`rlhf.temperature` / `rlhf.beta` keep feeding `lm_jsd` only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from kdcompose.errors import ConfigIssue
from kdcompose.functional import Divergence, TokenSelection, teacher_topk, topk_mass
from kdcompose.functional.compiled import compile_issue
from kdcompose.functional.kd import KdResult, fused_result, fused_topk_result, logits_result, topk_result
from kdcompose.functional.vocab import align_labelled_rows
from kdcompose.registry import UnknownDivergenceError, get_divergence_class, register_term
from kdcompose.schema.types import Bool, PositiveFloat, PositiveInt, Probability
from kdcompose.sharding import call_through_head
from kdcompose.terms.base import (
    CrossTokenizerRequest,
    LossContext,
    LossTerm,
    TermNeeds,
    TermSpec,
    TermValue,
    TopkRequest,
)
from kdcompose.terms.cross_tokenizer import CrossTokenizerSpec, cross_tokenizer_value, spec_issues

# --------------------------------------------------------------------------------------------
# `divergence:` -- a name or {kind: NAME, <params>}, validated with the divergence's own Params
# --------------------------------------------------------------------------------------------


def _error(loc: tuple[str, ...], kind: str, message: str, value: Any) -> ValidationError:
    detail = InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)
    return ValidationError.from_exception_data("divergence", [detail])


def parse_divergence(value: Any) -> Divergence:
    """A Divergence from the YAML value; errors carry the sub-key (`divergence.alpha`)."""
    if isinstance(value, Divergence):
        return value
    if isinstance(value, str):
        kind, params, kind_loc = value, {}, ()
    elif isinstance(value, Mapping):
        raw = dict(value)
        kind = raw.pop("kind", None)
        params, kind_loc = raw, ("kind",)
        if not isinstance(kind, str):
            raise _error(
                ("kind",),
                "divergence_kind",
                "needs `kind: NAME` (e.g. `{kind: skew_rkl, alpha: 0.1}`) or write just the name",
                kind,
            )
    else:
        raise ValueError(
            "must be a divergence name (e.g. `fkl`) or a mapping `{kind: NAME, <parameters>}`, "
            f"got {type(value).__name__}"
        )
    try:
        cls = get_divergence_class(kind)
    except UnknownDivergenceError as exc:
        raise _error(kind_loc, "unknown_divergence", str(exc), kind) from None
    allowed = sorted(cls.Params.model_fields)
    details = [
        InitErrorDetails(
            type=PydanticCustomError(
                "unknown_parameter",
                "unknown parameter of {kind}; {allowed}",
                {"kind": kind, "allowed": f"allowed: {', '.join(allowed)}" if allowed else "it has none"},
            ),
            loc=(str(k),),
            input=v,
        )
        for k, v in params.items()
        if k not in allowed
    ]
    try:
        validated = cls.Params.model_validate({k: v for k, v in params.items() if k in allowed})
    except ValidationError as exc:  # every problem at once, unknown keys included
        for error in exc.errors():
            custom = PydanticCustomError(error["type"], "{msg}", {"msg": error["msg"]})
            details.append(InitErrorDetails(type=custom, loc=tuple(error["loc"]), input=error.get("input")))
    if details:
        raise ValidationError.from_exception_data("divergence", details)
    return cls(validated)


def dump_divergence(divergence: Divergence) -> str | dict[str, Any]:
    """The YAML form: the name alone when every parameter is at its default."""
    params = divergence.params.model_dump(mode="json")
    if params == type(divergence.params)().model_dump(mode="json"):
        return divergence.name
    return {"kind": divergence.name, **params}


DivergenceField = Annotated[
    Divergence,
    BeforeValidator(parse_divergence),
    PlainSerializer(dump_divergence),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]},
            ],
            "description": "a registered divergence (jsd, fkl, rkl, skew_fkl, skew_rkl, tvd, akl, ab, or a "
            "plugin's) by name, or {kind: NAME, <its parameters>}",
        }
    ),
]


class TokensSpec(BaseModel):
    """`tokens:` -- distil only a fraction of each micro-batch's labelled tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    by: Literal["teacher_entropy", "student_entropy", "divergence"]
    """What ranks the tokens: the teacher's or the student's entropy, or the divergence itself."""
    keep: Probability
    """Fraction of the labelled tokens kept, in (0, 1] (ceil(keep * n), at least one)."""
    order: Literal["high", "low"] = "high"
    """`high`: keep the largest scores (most uncertain / most wrong tokens); `low`: the smallest."""

    @model_validator(mode="after")
    def _keep_positive(self) -> TokensSpec:
        if self.keep <= 0.0:
            raise ValueError(
                "keep must be > 0 (a fraction in (0, 1]); to turn the term off set its weight to 0"
            )
        return self

    def selection(self) -> TokenSelection:
        return TokenSelection(by=self.by, keep=self.keep, order=self.order)


# --------------------------------------------------------------------------------------------
# The spec and the term
# --------------------------------------------------------------------------------------------


class LmHeadKdSpec(TermSpec):
    """Knobs every LM-head KD term shares (`lm_kd`, `lm_jsd`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    chunk_size: PositiveInt | None = None
    fused: Bool = False
    """Compute the divergence from both models' final hidden states and LM-head weights, one chunk of
    labelled tokens at a time, so neither model's full `[tokens, vocab]` logits (nor the student's
    logits gradient) ever exist (`kdcompose.functional.fused_linear_divergence_loss`). Same value and
    gradients as `false` up to float rounding; saves memory, not time (docs/performance.md). The LM
    heads must be plain linear layers with the same number of rows."""
    topk: PositiveInt | None = None
    """Distil only the teacher's K most likely tokens per position (`missing_mass` says what happens
    to the rest). Required for a cached or served teacher. Each step also logs `<metric>_topk_mass`."""
    missing_mass: Literal["renorm", "tail", "zero"] = "renorm"
    """`renorm`: both sides renormalized over the teacher's top-K (ms-swift's gkd_logits_topk);
    `tail`: a K+1-th bucket holds the rest on both sides (TRL); `zero`: truncated teacher vs the
    student's full distribution (DistillKit / axolotl; only divergences finite there)."""
    teacher: StrictStr | None = None
    """A named teacher from `rlhf.teachers` (a cache or a server); unset: the default teacher."""
    compile: Bool = False
    """Run each chunk (both log-softmaxes, the divergence and its gradient) through `torch.compile`
    (`kdcompose.functional.compiled`): faster for the alpha-beta divergence and value-only plugin
    divergences, no faster for the JSD, a compilation per process, a C++ compiler needed; full
    vocabulary only (not with `topk`; docs/performance.md)."""
    tokens: TokensSpec | None = None
    """`{by: teacher_entropy | student_entropy | divergence, keep: FRACTION, order: high | low}`:
    distil only that fraction of the labelled tokens of each micro-batch; the value is the mean over
    the kept tokens, and `<metric>_kept_frac` is logged (docs/terms/lm_kd.md#token-selection)."""
    cross_tokenizer: CrossTokenizerSpec | None = None
    """`{unmatched: uld | skip, uld_weight: W}`: the term may read a teacher whose tokenizer differs
    from the student's, comparing over aligned completion text (docs/cross_tokenizer.md); each step
    also logs `<metric>_matched_frac`. Without it such a teacher is refused before training."""


class LmKdSpec(LmHeadKdSpec):
    """`lm_kd` knobs: the divergence, the temperature and the shared LM-head KD knobs."""

    divergence: DivergenceField
    """`NAME` or `{kind: NAME, <params>}`: jsd (beta), fkl, rkl, skew_fkl / skew_rkl (alpha), tvd,
    akl (mu), ab (alpha, beta), or a registered plugin (docs/divergences.md)."""
    temperature: PositiveFloat = 1.0
    """Both models' logits are divided by it (no T^2 factor)."""


@register_term("lm_kd")
class LmKdTerm(LossTerm):
    """A divergence per labelled token between the student's and the teacher's LM-head
    distributions (after temperature), averaged over those tokens (or the kept ones)."""

    spec_class = LmKdSpec
    default_metric = "lm_kd_loss"
    spec: Any

    @property
    def divergence(self) -> Divergence:
        return self.spec.divergence

    @property
    def temperature(self) -> float:
        return self.spec.temperature

    @property
    def teacher_name(self) -> str:
        """`""` for the default teacher, else the `rlhf.teachers` name."""
        return self.spec.teacher or ""

    @property
    def needs(self) -> TermNeeds:
        topk: frozenset[TopkRequest] = frozenset()
        if self.spec.topk is not None:
            topk = frozenset({TopkRequest(self.teacher_name, self.spec.topk, f"{self.origin}.topk")})
        local = not self.spec.teacher  # a named teacher is never a local model
        cross: frozenset[CrossTokenizerRequest] = frozenset()
        if self.spec.cross_tokenizer is not None:
            request = CrossTokenizerRequest(
                self.teacher_name,
                force=self.spec.cross_tokenizer.force,
                temperature=self.temperature,
                origin=f"{self.origin}.cross_tokenizer",
            )
            cross = frozenset({request})
        if self.spec.fused:
            return TermNeeds(
                student_hidden=True,
                teacher_hidden=local,
                labels=True,
                token_mean=True,
                teacher_topk=topk,
                cross_tokenizer=cross,
            )
        return TermNeeds(
            student_logits=True,
            teacher_logits=local,
            labels=True,
            token_mean=True,
            teacher_topk=topk,
            cross_tokenizer=cross,
        )

    def config_issues(self) -> list[ConfigIssue]:
        issues = super().config_issues()
        spec, origin = self.spec, self.origin
        if spec.topk is None:
            for key, unset in (("missing_mass", "renorm"), ("teacher", None)):
                if getattr(spec, key) != unset:
                    issues.append(
                        ConfigIssue(
                            f"{origin}.{key}", f"`{key}` applies to top-K distillation: set `topk: K` too"
                        )
                    )
        else:
            issue = self.divergence.missing_mass_issue(spec.missing_mass)
            if issue is not None:
                issues.append(ConfigIssue(self._missing_mass_path(), issue))
        if spec.compile:
            issue = compile_issue(self.divergence)
            if spec.topk is not None:
                issue = "compile applies to the full vocabulary; remove `compile` or `topk`"
            if issue is not None:
                issues.append(ConfigIssue(f"{origin}.compile", issue))
        issues += spec_issues(
            spec.cross_tokenizer,
            origin,
            fused=spec.fused,
            tokens=spec.tokens is not None,
            missing_mass=spec.missing_mass,
            normalize=spec.normalize,
            compile=spec.compile,
        )
        return issues

    def _missing_mass_path(self) -> str:
        return f"{self.origin}.missing_mass"

    # ------------------------------------------------------------------ compute

    def compute(self, ctx: LossContext) -> torch.Tensor | TermValue:
        aligned = ctx.aligned_teachers.get(self.teacher_name)
        if aligned is not None:  # the trainer found this teacher's tokenizer differs (or was forced)
            if self.spec.cross_tokenizer is None:
                raise ValueError(
                    f"{self.origin}: teacher {self.teacher_name or '(default)'!r} has another tokenizer; "
                    "add `cross_tokenizer: {unmatched: uld}` to this term"
                )
            return cross_tokenizer_value(
                ctx,
                aligned,
                self.spec.cross_tokenizer,
                divergence=self.divergence,
                temperature=self.temperature,
                topk=self.spec.topk,
                name=self.name,
            )
        if ctx.student_logits is not None and ctx.teacher_logits is not None and ctx.labels is not None:
            # vocabularies that differ only by padding: the labelled rows, widened as ms-swift does
            student, teacher, labels = align_labelled_rows(
                ctx.student_logits, ctx.teacher_logits, ctx.labels, vocab_size=ctx.vocab_size
            )
            ctx = replace(ctx, student_logits=student, teacher_logits=teacher, labels=labels)
        if self.spec.topk is not None:
            result, mass = self._topk(ctx)
            return TermValue(result.value, stats={"topk_mass": mass, **self._kept(result)})
        result = self._fused(ctx) if self.spec.fused else self._logits(ctx)
        kept = self._kept(result)
        return TermValue(result.value, stats=kept) if kept else result.value

    def _kept(self, result: KdResult) -> dict[str, torch.Tensor]:
        if self.spec.tokens is None:
            return {}
        return {"kept_frac": torch.tensor(result.count / result.n_valid if result.n_valid else 0.0)}

    @property
    def _selection(self) -> TokenSelection | None:
        return None if self.spec.tokens is None else self.spec.tokens.selection()

    def _logits(self, ctx: LossContext) -> KdResult:
        if ctx.student_logits is None or ctx.teacher_logits is None:
            raise ValueError(f"term {self.name!r} needs student and teacher logits in the loss context")
        return logits_result(
            ctx.student_logits,
            ctx.teacher_logits,
            ctx.labels,
            divergence=self.divergence,
            temperature=self.temperature,
            chunk_size=self.spec.chunk_size,
            tokens=self._selection,
            name=self.name,
            compile=self.spec.compile,
        )

    def _fused(self, ctx: LossContext) -> KdResult:
        if ctx.student_hidden is None or ctx.teacher_hidden is None:
            raise ValueError(
                f"term {self.name!r} (fused) needs the student's and teacher's final hidden states in the "
                "loss context (student_hidden / teacher_hidden)"
            )
        t_weight, t_bias = linear_head(ctx.teacher_lm_head, "teacher", self.name)

        def fused(head: torch.nn.Module, hidden: torch.Tensor) -> KdResult:
            # Inside the head's own forward: under ZeRO-3 / FSDP2 its weight is whole here.
            s_weight, s_bias = linear_head(head, "student", self.name)
            if s_weight.shape[0] != t_weight.shape[0]:
                raise ValueError(
                    f"term {self.name!r} (fused): the student's LM head has {s_weight.shape[0]} rows and the "
                    f"teacher's {t_weight.shape[0]}; vocabularies that differ by padding are aligned only on "
                    f"logits: set `{self.origin}.fused: false`"
                )
            return fused_result(
                hidden,
                s_weight,
                ctx.teacher_hidden,
                t_weight,
                ctx.labels,
                divergence=self.divergence,
                temperature=self.temperature,
                chunk_size=self.spec.chunk_size,
                student_bias=s_bias,
                teacher_bias=t_bias,
                tokens=self._selection,
                name=self.name,
                compile=self.spec.compile,
            )

        return _through_head(ctx, fused)

    def _topk(self, ctx: LossContext) -> tuple[KdResult, torch.Tensor]:
        k, mode, temperature = self.spec.topk, self.spec.missing_mass, self.temperature
        given = ctx.teacher_topk.get(self.teacher_name)
        if given is None and self.spec.teacher:
            raise ValueError(
                f"{self.origin}: teacher {self.spec.teacher!r} handed over no top-K distribution for this "
                "batch (the trainer fills LossContext.teacher_topk from rlhf.teachers)"
            )
        common = {
            "divergence": self.divergence,
            "temperature": temperature,
            "missing_mass": mode,
            "chunk_size": self.spec.chunk_size,
            "tokens": self._selection,
            "name": self.name,
        }
        if (
            given is None and self.spec.fused
        ):  # the teacher's top-K taken chunk by chunk from its hidden states
            t_weight, t_bias = linear_head(ctx.teacher_lm_head, "teacher", self.name)

            def local_topk(head: torch.nn.Module, hidden: torch.Tensor) -> KdResult:
                s_weight, s_bias = linear_head(head, "student", self.name)
                return fused_topk_result(
                    hidden,
                    s_weight,
                    ctx.labels,
                    teacher_hidden=ctx.teacher_hidden,
                    teacher_weight=t_weight,
                    k=k,
                    student_bias=s_bias,
                    teacher_bias=t_bias,
                    **common,
                )

            result = _through_head(ctx, local_topk)
            return result, result.stats["topk_mass"]
        if given is not None:  # a cache or server: log-probabilities at temperature 1
            logprobs, ids = given[0][..., :k], given[1][..., :k]
        elif ctx.teacher_logits is None:
            raise ValueError(f"term {self.name!r} needs the teacher's logits or top-K in the loss context")
        else:
            # renorm renormalizes over the K ids (temperature applies to both sides there); tail and
            # zero read the teacher's full-vocabulary log-probabilities at the training temperature.
            logprobs, ids = teacher_topk(
                ctx.teacher_logits, k, temperature=1.0 if mode == "renorm" else temperature
            )
        mass = topk_mass(logprobs, ctx.labels)
        if self.spec.fused:  # given top-K, the student fused: only its logits at the K ids are built

            def given_topk(head: torch.nn.Module, hidden: torch.Tensor) -> KdResult:
                s_weight, s_bias = linear_head(head, "student", self.name)
                return fused_topk_result(
                    hidden,
                    s_weight,
                    ctx.labels,
                    teacher_topk_logprobs=logprobs,
                    teacher_topk_ids=ids,
                    student_bias=s_bias,
                    **common,
                )

            return _through_head(ctx, given_topk), mass
        if ctx.student_logits is None:
            raise ValueError(f"term {self.name!r} needs the student's logits in the loss context")
        return topk_result(ctx.student_logits, logprobs, ids, ctx.labels, **common), mass

    # ------------------------------------------------------------------ naming

    def describe(self) -> str:
        params = [self.divergence.describe(), f"T={self.temperature:g}"]
        return f"{self.name}({', '.join(params + self._mode_words())})"

    def _mode_words(self) -> list[str]:
        words = []
        if self.spec.normalize == "global_tokens":
            words.append("global_tokens")
        if self.spec.fused:
            words.append("fused")
        if self.spec.compile:
            words.append("compiled")
        if self.spec.topk is not None:
            words.append(
                f"top{self.spec.topk}"
                + ("" if self.spec.missing_mass == "renorm" else f" {self.spec.missing_mass}")
            )
        if self.spec.teacher:
            words.append(f"teacher={self.spec.teacher}")
        if self.spec.tokens is not None:
            tokens = self.spec.tokens
            words.append(f"tokens {tokens.order} {tokens.by} {tokens.keep:g}")
        cross = self.spec.cross_tokenizer
        if cross is not None:
            uld = (
                f" uld_weight={cross.uld_weight:g}"
                if cross.unmatched == "uld" and cross.uld_weight != 1
                else ""
            )
            words.append(f"cross_tokenizer {cross.unmatched}{uld}{' forced' if cross.force else ''}")
        return words


def _through_head(ctx: LossContext, fn: Any) -> KdResult:
    """Run ``fn(head, hidden)`` inside the student's LM head's forward (ZeRO-3 / FSDP2 gather it
    there) and return its result; ``call_through_head`` hands back a tensor, so the rest of the
    result travels beside it."""
    box: dict[str, KdResult] = {}

    def call(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        box["result"] = fn(head, hidden)
        return box["result"].value

    value = call_through_head(ctx.student_lm_head, call, ctx.student_hidden)
    result = box["result"]
    result.value = value
    return result


def linear_head(
    head: torch.nn.Module | None, side: str, term: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(weight [V, H], bias or None)` of an LM head the fused path can read directly."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"term {term!r} (fused) needs the {side}'s LM head as a linear layer with a [vocab, hidden] "
            f"weight in the loss context ({side}_lm_head), got {type(head).__name__}"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None
