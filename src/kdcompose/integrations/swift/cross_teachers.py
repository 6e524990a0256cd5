"""Teachers with another tokenizer inside ms-swift's GKD trainer.

ms-swift 4.6 gives the teacher the student's token ids (its `teacher_model_inputs` is a copy of
the student's encoding) and pads the narrower vocabulary: with a Llama teacher for a Qwen student
it trains without a word on unrelated ids. This module is what kdcompose does instead, around the
framework-neutral plan and alignment (`kdcompose.training.cross_tokenizer`):

* before training (`CrossTeachers.for_run`, from `use_composer`): the local teacher's tokenizer
  is loaded from its model folder and compared with the student's; a term that reads a teacher
  with another tokenizer without `cross_tokenizer` is refused naming the term, the teacher and
  the fix. For a teacher taught across tokenizers, the teacher's own ms-swift template is built:
  `rlhf.teacher_template`, else ms-swift's default for the teacher's model type (as ms-swift picks
  a `reward_template`), else the student's template when both share a model type.
* per generation batch (`encode`, from `_prepare_batch_inputs`): every micro-batch's samples are
  encoded with that template -- a dataset sample as its conversation, a completion the student
  generated as the text its tokens spell (`kdcompose.teachers.retokenize`: bytes that are not UTF-8
  as the teacher's own byte tokens, compared up to a special token or padding id mid-text) -- and
  the encoding replaces `teacher_model_inputs`, so ms-swift's own teacher forward runs on it.
* per micro-batch (`aligned`, from `compute_loss`): the two completions are aligned and the
  teacher's logits rows handed to the terms as `LossContext.aligned_teachers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from swift.rlhf_trainers.utils import encode_sample
from swift.utils import to_device

from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.teachers.provider import DEFAULT, TeacherSource
from kdcompose.teachers.retokenize import teacher_response
from kdcompose.terms.base import AlignedTeacher
from kdcompose.training.context import ForwardCapture
from kdcompose.training.cross_tokenizer import (
    CrossTokenizerPlan,
    TeacherTokenizer,
    aligned_from_logits,
    plan_cross_tokenizer,
    teachers_read,
)

SOURCE = "kdcompose cross-tokenizer teachers"
KEPT = "kdcompose_cross_kept"
"""Key of a micro-batch dict: per teacher name, how many of each sample's completion tokens its
encoding covers (None: all)."""
TEMPLATE_PATH = "rlhf.teacher_template"


class CrossTeachers:
    """The teachers of one ms-swift run that are taught across tokenizers (see the module doc)."""

    def __init__(self, plan: CrossTokenizerPlan, student_tokenizer: Any, local: LocalTeacher | None) -> None:
        self.plan = plan
        self.student_tokenizer = student_tokenizer
        self.local = local if local is not None and DEFAULT in plan else None

    @classmethod
    def for_run(
        cls,
        trainer: Any,
        composer: Any,
        sources: Mapping[str, TeacherSource],
        teacher_template: str | None = None,
    ) -> CrossTeachers | None:
        """Compare every teacher the active terms read with the student's tokenizer; None when no
        teacher needs the cross-tokenizer path. Raises ConfigError naming what rules the run out."""
        terms = composer.active_terms
        remote = frozenset(sources)
        student_tokenizer = trainer.template.tokenizer
        local = None
        teachers = []
        if DEFAULT not in remote and any(DEFAULT in teachers_read(t.needs, remote) for t in terms):
            local = LocalTeacher(trainer, teacher_template)
            teachers.append(local.describe())
        plan, issues = plan_cross_tokenizer(terms, student_tokenizer, teachers, remote)
        if not issues and plan and getattr(trainer.template, "padding_free", False):
            issues.append(
                ConfigIssue(
                    "template.padding_free",
                    "a teacher with another tokenizer encodes each sample itself, which packed "
                    "(padding-free) batches do not allow yet: set `padding_free: false` (and "
                    "`packing: false`)",
                )
            )
        if not issues and local is not None and DEFAULT in plan:
            issues += local.prepare_template(plan.teachers[DEFAULT].identical)
        if issues:
            raise ConfigError(issues, source=SOURCE)
        return cls(plan, student_tokenizer, local) if plan else None

    @property
    def local_default(self) -> bool:
        """The local teacher model is taught across tokenizers (it runs on its own encoding)."""
        return self.local is not None

    def describe(self) -> list[str]:
        return self.plan.describe()

    # ------------------------------------------------------------------ per generation batch

    def encode(self, trainer: Any, chunks: list[dict[str, Any]], samples: list[Any]) -> list[dict[str, Any]]:
        """Each micro-batch's teacher encoding, in place of ms-swift's copy of the student's."""
        if self.local is None:
            return chunks
        for chunk, chunk_samples in zip(chunks, trainer.split_by_mini_batches(samples), strict=True):
            labels = chunk["model_inputs"]["labels"]
            device = labels.device
            encoded, kept = self.local.encode_samples(self.student_tokenizer, chunk_samples, labels)
            chunk["teacher_model_inputs"] = to_device(encoded, device)
            chunk.setdefault(KEPT, {})[DEFAULT] = kept
        return chunks

    # ------------------------------------------------------------------ per micro-batch

    def aligned(
        self,
        inputs: Mapping[str, Any],
        student_labels: torch.Tensor,
        teacher_labels: torch.Tensor | None,
        teacher_inputs: Mapping[str, Any],
        teacher: ForwardCapture | None,
    ) -> dict[str, AlignedTeacher]:
        """The aligned view of each cross-tokenizer teacher of this micro-batch. The local
        teacher's logits move from the capture into it (no term reads them position by position)."""
        out: dict[str, AlignedTeacher] = {}
        if self.local is not None and teacher is not None and teacher.logits is not None:
            assert teacher_labels is not None
            out[DEFAULT] = aligned_from_logits(
                self.plan.teachers[DEFAULT],
                student_labels,
                teacher_labels,
                teacher.logits,
                trimmed_teacher_labels=teacher_inputs["labels"],
                kept=inputs.get(KEPT, {}).get(DEFAULT),
            )
            teacher.logits = None
        return out


class LocalTeacher:
    """The local `teacher_model`: its tokenizer (from its own folder) and, when it is taught across
    tokenizers, its own ms-swift template."""

    def __init__(self, trainer: Any, template_type: str | None) -> None:
        self.trainer = trainer
        self.template_type = template_type
        self.template: Any = None
        self.identical = False
        model = trainer.teacher_model
        if model is None:  # LoRA: the student's base model teaches, with the student's tokenizer
            self.processor, self.model, self.info = trainer.template.processor, None, None
            return
        from swift.model import get_model_processor

        self.model = trainer.accelerator.unwrap_model(model)
        self.info = self.model.model_info
        _, self.processor = get_model_processor(
            self.info.model_dir, model_type=self.info.model_type, load_model=False, download_model=False
        )

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def describe(self) -> TeacherTokenizer:
        where = self.info.model_dir if self.info is not None else "the student's base model"
        return TeacherTokenizer(
            DEFAULT, self.tokenizer, f"the default teacher (local model {where})", "model.teacher_model"
        )

    def prepare_template(self, identical: bool) -> list[ConfigIssue]:
        """Build the teacher's own template (issues: none can be chosen)."""
        from swift.template import get_template

        self.identical = identical
        student = self.trainer.template
        if self.info is None:
            self.template = student
            return []
        options = {
            "max_length": None,  # ms-swift's GKD encodes with max_length unset (_template_context)
            "truncation_strategy": student.truncation_strategy,
            "padding_side": student.padding_side,
            "max_pixels": getattr(student, "max_pixels", None),
        }
        try:
            template = get_template(self.processor, template_type=self.template_type, **options)
        except ValueError as error:
            if (
                self.template_type is None
                and self.info.model_type == self.trainer.model.model_meta.model_type
            ):
                template = get_template(
                    self.processor, template_type=student.template_meta.template_type, **options
                )
            else:
                return [
                    ConfigIssue(
                        TEMPLATE_PATH,
                        f"the teacher ({self.info.model_dir}, model type {self.info.model_type}) has another "
                        "tokenizer, so it encodes every sample with its own template, and ms-swift cannot "
                        f"choose one: {error} Set `{TEMPLATE_PATH}` to the template the teacher was "
                        "trained with",
                    )
                ]
        template.set_mode("train")
        template.model = self.model  # position ids (mrope) come from the teacher's own config
        self.template = template
        return []

    def encode_samples(
        self, student_tokenizer: Any, samples: Sequence[Any], student_labels: torch.Tensor
    ) -> tuple[dict[str, Any], list[int]]:
        """The collated teacher encoding of one micro-batch's samples, and per sample how many of the
        student's completion tokens it covers."""
        template = self.template
        encoded, kept = [], []
        for sample, row in zip(samples, student_labels.detach().cpu(), strict=True):
            completion = row[row != -100].tolist()
            if not sample.response_token_ids or self.identical:
                one = encode_sample(sample, template)  # its conversation as it is (same tokenizer: the ids)
                count = len(completion)
            else:
                one, count = self._generated(sample, student_tokenizer, completion)
            one.pop("_extra_kwargs", None)
            encoded.append(one)
            kept.append(count)
        return template.data_collator(encoded), kept

    def _generated(
        self, sample: Any, student_tokenizer: Any, completion: list[int]
    ) -> tuple[dict[str, Any], int]:
        """A completion the student generated, as text (or the teacher's byte tokens), in the teacher's
        template."""
        if isinstance(sample.response_token_ids[0], list) and len(sample.response_token_ids) > 1:
            raise ConfigError.single(
                "rlhf.lmbda",
                "on-policy distillation from a teacher with another tokenizer supports single-turn rollouts "
                "only (this sample has several generated turns)",
                source=SOURCE,
            )
        response = teacher_response(student_tokenizer, self.tokenizer, completion)
        data = sample.to_template_dict()
        messages = [dict(m) for m in data["messages"]]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        messages[last]["content"] = response.content
        data["messages"] = messages
        data["add_eos"] = response.add_eos
        return self.template.encode(data, return_length=True), response.kept


__all__ = ["KEPT", "CrossTeachers", "LocalTeacher"]
