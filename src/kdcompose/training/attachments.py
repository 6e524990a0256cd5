"""What kdcompose attaches to the student and the teacher for one composition.

A composition's active terms declare what they read (`TermNeeds`); `ModelAttachments` turns
that into exactly this on the two models, and nothing else:

* module taps (`ModuleTaps`), one recorder per side, hooking only the declared modules;
* trainable projectors for feature pairs that ask for one, planned from the models' widths
  (registered on the student by default, so every optimizer, DDP and DeepSpeed include them);
* LM-head taps for terms that read final hidden states (fused terms), which also keep the head
  from computing logits no term reads.

Everything that can be checked from the models' structure is checked here, before any step,
naming the YAML path of the term that asked: an LM head fused terms cannot read, heads of
different rows for a term reading both, vocabularies that differ beyond padding, a feature
width mismatch without a projector. Trainers (ms-swift's, `Distiller`) hold one instance and
wrap each forward in `capturing(side, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, NoReturn

from torch import nn

from kdcompose.composer import LossComposer
from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.functional.vocab import check_vocab_compatible
from kdcompose.terms.base import Side, Tap, TermNeeds
from kdcompose.training import projectors as _projectors
from kdcompose.training.context import ForwardCapture
from kdcompose.training.lm_head import LmHeadUnsupported, lm_head_of, lm_head_width, tap_lm_head
from kdcompose.training.taps import ModuleTaps, capture

SOURCE = "kdcompose model checks"


class ModelAttachments:
    """Taps, projectors and LM-head taps of one composer on one student/teacher pair.

    `student` / `teacher` are the models as the training loop calls them (possibly wrapped by
    DDP or DeepSpeed); `teacher=None` means the student is its own teacher (a LoRA student
    whose base model teaches, with adapters disabled). `unwrap` returns the bare model of a
    wrapped one. `attach` builds the planned projectors (default: registered on the student as
    `kdcompose_projectors`). Raises `ConfigError` for anything the models' structure rules out.
    """

    def __init__(
        self,
        composer: LossComposer,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        unwrap: Callable[[nn.Module], nn.Module] = lambda model: model,
        vocab_size: int | None = None,
        log: Callable[[str], None] | None = None,
        attach: Callable[[list[_projectors.ProjectorPlan]], dict[str, nn.Module]] | None = None,
        aligned_teachers: frozenset[str] = frozenset(),
    ) -> None:
        self.composer = composer
        self.needs: TermNeeds = composer.needs
        self.student, self.teacher = student, teacher if teacher is not None else student
        self._unwrap = unwrap
        self.vocab_size = vocab_size
        self.aligned_teachers = aligned_teachers  # taught across tokenizers: no row-by-row vocabulary
        self._check_hidden_readable()
        self._check_vocab()
        plans = self._plan_projectors(log)
        self.recorders: dict[Side, ModuleTaps | None] = self._build_recorders()
        if attach is None:  # registered on the student: every optimizer, DDP and DeepSpeed include them
            self.projectors: dict[str, nn.Module] = _projectors.attach_projectors(unwrap(student), plans)
        else:
            self.projectors = attach(plans)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Hook the declared modules for a run (recording happens only inside `capturing`)."""
        for recorder in self.module_taps():
            recorder.open()

    def close(self) -> None:
        """Remove every hook (idempotent); a later `capturing` block hooks just for itself."""
        for recorder in self.module_taps():
            recorder.close()

    def module_taps(self) -> list[ModuleTaps]:
        """The recorders in use (one object when the student is its own teacher)."""
        return list({id(r): r for r in self.recorders.values() if r is not None}.values())

    def projector(self, key: str) -> nn.Module | None:
        """The projector of feature pair `key` as attached now (looked up when a hook runs)."""
        return self.projectors.get(key)

    # ------------------------------------------------------------------ one forward

    def lm_model(self, side: Side) -> nn.Module:
        """The bare model whose LM head is `side`'s."""
        return self._unwrap(self.student if side == "student" else self.teacher)

    @contextmanager
    def capturing(self, side: Side, needs: TermNeeds | None = None) -> Iterator[ForwardCapture]:
        """Wrap `side`'s loss forward: record its taps (and, for the student, its projected
        features), tap its LM head when a term needs hidden states. Set `capture.logits` to the
        forward's logits inside the block; on exit the capture is complete (logits reset to None
        where the head was told not to compute them). `needs`: the needs of the terms that run
        at this step (default: every active term's)."""
        needs = needs or self.needs
        hidden, logits = getattr(needs, f"{side}_hidden"), getattr(needs, f"{side}_logits")
        result = ForwardCapture()
        with ExitStack() as stack:
            projected = result.projected if side == "student" else None
            taps = stack.enter_context(capture(self.recorders.get(side), projected))
            head = stack.enter_context(
                tap_lm_head(self.lm_model(side), hidden=hidden, logits=logits, freeze=side == "teacher")
            )
            yield result
        result.taps = taps
        result.hidden, result.head = head.hidden, head.head
        if not head.keep_logits:
            result.logits = None

    # ------------------------------------------------------------------ checks and planning

    def _terms_needing(self, predicate: Callable[[TermNeeds], bool]) -> list[Any]:
        return [t for t in self.composer.active_terms if predicate(t.needs)]

    def _fail(self, terms: list[Any], message: str) -> NoReturn:
        raise ConfigError([ConfigIssue(t.origin, message) for t in terms], source=SOURCE)

    def _check_hidden_readable(self) -> None:
        """Fused terms read hidden states at the LM heads' input (`lm_head.tap_lm_head`): every
        head they need must be a plain linear layer, and terms reading both heads get heads with
        the same rows."""
        terms = self._terms_needing(lambda n: n.student_hidden or n.teacher_hidden)
        rows: dict[str, int] = {}
        for side in ("student", "teacher"):
            if not getattr(self.needs, f"{side}_hidden"):
                continue
            try:
                rows[side] = lm_head_of(self.lm_model(side)).out_features
            except LmHeadUnsupported as error:
                self._fail(
                    terms, f"needs the {side}'s final hidden states: {error} (for lm_jsd: `fused: false`)"
                )
        if len(set(rows.values())) > 1 and any(
            t.needs.student_hidden and t.needs.teacher_hidden for t in terms
        ):
            self._fail(
                terms,
                f"reads both LM heads and compares them row by row, but the student's has {rows['student']} "
                f"rows and the teacher's {rows['teacher']}; vocabularies that differ by padding are aligned "
                "only on logits (for lm_jsd: `fused: false`)",
            )

    def _check_vocab(self) -> None:
        if not self.needs.teacher_logits or "" in self.aligned_teachers:
            return
        student, teacher = lm_head_width(self.lm_model("student")), lm_head_width(self.lm_model("teacher"))
        if student and teacher:
            check_vocab_compatible(student, teacher, vocab_size=self.vocab_size)

    def _plan_projectors(self, log: Callable[[str], None] | None) -> list[_projectors.ProjectorPlan]:
        """Projectors the declared feature pairs ask for; a width mismatch without one fails
        here, before training, whenever the models' structure tells the widths."""
        if not self.needs.pairs:
            return []
        plans = _projectors.plan_projectors(
            self.needs.pairs, self._unwrap(self.student), self._unwrap(self.teacher)
        )
        for plan in plans if log is not None else ():
            log(f"kdcompose: {plan.origin}: {plan.kind} projector {plan.in_width}->{plan.out_width}")
        return plans

    def _build_recorders(self) -> dict[Side, ModuleTaps | None]:
        """One recorder per side, hooking exactly the active terms' taps. With the student as its
        own teacher both hook the same modules; each records only during its own forward."""
        needs = self.needs
        student_taps, teacher_taps = needs.side_taps("student"), needs.side_taps("teacher")
        projections: dict[Tap, list[str]] = {}
        for pair in needs.pairs:
            if pair.projector is not None:
                projections.setdefault(pair.student, []).append(pair.key)
        student = (
            ModuleTaps(self.student, student_taps, projections=projections, projector=self.projector)
            if student_taps
            else None
        )
        teacher = ModuleTaps(self.teacher, teacher_taps, detach=True) if teacher_taps else None
        return {"student": student, "teacher": teacher}


__all__ = ["ModelAttachments"]
