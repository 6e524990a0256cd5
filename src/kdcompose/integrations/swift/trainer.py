"""`KDComposeGKDTrainer`: ms-swift's GKD trainer whose loss is a kdcompose `LossComposer`.

`compute_loss` reads as forwards -> context -> composer: run the student, run the teacher only
when an active term needs it (only its vision tower when no term needs its language model),
describe both forwards to the framework-neutral core (`kdcompose.training`), which builds the
`LossContext`, and hand that to the composer. What surrounds each micro-batch, optimizer step and
log row (telemetry, `global_tokens`, NaN/inf, resume records) is the core's `KDLoop`
(`trainer.kd_loop`); the taps, LM-head taps and projectors are its `ModelAttachments`
(`trainer.kd_attachments`). Everything else is ms-swift's: on-policy rollouts (`lmbda`), the
DeepSpeed / FSDP-prepared teacher, `offload_teacher_model`, `logits_to_keep`, gradient
accumulation, evaluation, logging.

Besides `compute_loss` it overrides, each in a line or two: `train` (hooks on for the run, exact
resume, Ctrl-C, SIGTERM; complete checkpoints: `integrations.transformers.checkpointing`), `log`
(per-term metrics), `_save` / `_load_from_checkpoint` (projectors, full fine-tuning weights on
resume), and three upstream hooks of the teacher server path
(`_prepare_batch_inputs` for named servers, `_infer_teacher_requests` / `_scatter_teacher_parsed`
so a server failure stops every rank together; `teachers.py`).

With the stock composition (`lm_jsd` weight 1 plus `ce` weight `sft_alpha`) the loss equals
ms-swift's `GKDTrainer.compute_loss`. Importing this module imports ms-swift (after readying
torchvision and checking the version), so import it only when a run starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kdcompose.integrations.swift.runtime import prepare_swift_import

prepare_swift_import()

from swift.rlhf_trainers.gkd_loss import DataSource  # noqa: E402
from swift.rlhf_trainers.gkd_trainer import GKDTrainer  # noqa: E402
from swift.trainers import disable_gradient_checkpointing  # noqa: E402
from swift.utils import get_logger  # noqa: E402

from kdcompose.composer import LossComposer  # noqa: E402
from kdcompose.integrations.swift import checks, teachers  # noqa: E402
from kdcompose.integrations.swift import resume as _resume  # noqa: E402
from kdcompose.integrations.swift.cross_teachers import CrossTeachers  # noqa: E402
from kdcompose.integrations.transformers import KDLoopCallback  # noqa: E402
from kdcompose.integrations.transformers.checkpointing import CheckpointCallback  # noqa: E402
from kdcompose.resolve import legacy_llm_kd_weight, stock_gkd_composition  # noqa: E402
from kdcompose.teachers.sources import DEFAULT, TeacherSource  # noqa: E402
from kdcompose.terms.base import TermNeeds  # noqa: E402
from kdcompose.training import projectors as _projectors  # noqa: E402
from kdcompose.training.attachments import ModelAttachments  # noqa: E402
from kdcompose.training.context import ForwardCapture, build_context, has_images  # noqa: E402
from kdcompose.training.loop import KDLoop  # noqa: E402
from kdcompose.training.vision_only import encode_vision_only  # noqa: E402

logger = get_logger()

LLM_KD_WEIGHT_ATTR = "llm_kd_weight"
"""The runtime `llm_kd_weight` (the `lm_jsd` term's weight), attached to the train arguments."""


@dataclass(frozen=True)
class RunComposition:
    """What a launcher hands the trainer it is about to have ms-swift build: the composer (built
    once for the run) and the teachers that are caches or servers, by name (`""`: default)."""

    composer: LossComposer
    teachers: Mapping[str, TeacherSource] = field(default_factory=dict)
    origin: str = "kdcompose train"
    teacher_template: str | None = None
    """`rlhf.teacher_template`: the local teacher's own template when its tokenizer differs."""


class KDComposeGKDTrainer(GKDTrainer):
    """ms-swift GKD with a composed loss. The composer comes from `kd_composer` (Python use),
    else from the launcher or plugin (`expect`), else ms-swift's own GKD arguments (stock loss)."""

    _expected: ClassVar[RunComposition | None] = None

    @classmethod
    def expect(cls, run: RunComposition | None) -> None:
        """Hand `run` to the next trainer ms-swift builds in this process (None: clear it).
        ms-swift constructs the trainer itself, with fixed arguments: this is the one channel."""
        KDComposeGKDTrainer._expected = run

    def __init__(self, model: Any = None, *args: Any, kd_composer: LossComposer | None = None, **kwargs: Any):
        checks.reject_unsupported(kwargs)
        if kwargs.get("teacher_model_server") is not None:
            from kdcompose.compat.swift_teacher_client import install_vllm_free_teacher_client

            install_vllm_free_teacher_client()  # ms-swift's own client needs vLLM; same protocol without it
        self.kd_teachers: teachers.RunTeachers | None = None
        self.kd_attachments: ModelAttachments | None = None
        self.kd_cross: CrossTeachers | None = None
        super().__init__(model, *args, **kwargs)
        run, KDComposeGKDTrainer._expected = KDComposeGKDTrainer._expected, None
        self.kd_teacher_template = run.teacher_template if run is not None else None
        if kd_composer is not None:
            run = RunComposition(kd_composer, run.teachers if run else {}, "the kd_composer argument")
        elif run is None:
            composition = stock_gkd_composition(
                self.args.beta, self.args.temperature, self.args.sft_alpha, self.gkd_logits_topk
            )
            run = RunComposition(
                LossComposer.from_composition(composition),
                {},
                "ms-swift's GKD arguments (no kdcompose keys given)",
            )
        self.use_composer(run.composer, run.teachers)
        self.kd_loop = KDLoop(self)
        self.add_callback(KDLoopCallback(self.kd_loop))
        self.kd_checkpoints = CheckpointCallback()  # after KDLoopCallback: its marker is the last file
        self.add_callback(self.kd_checkpoints)
        if self.accelerator.is_main_process:
            logger.info(f"kdcompose: {run.composer.formula()} (composition from {run.origin})")

    def use_composer(
        self, composer: LossComposer, sources: Mapping[str, TeacherSource] | None = None
    ) -> None:
        """Train with `composer` from now on: checks it against this trainer (teacher, vocabulary,
        feature modules) and re-attaches the taps and projectors it needs."""
        sources = dict(sources if sources is not None else getattr(self.kd_teachers, "sources", {}))
        server = getattr(self, "teacher_model_server", None)
        if getattr(self, "use_teacher_api", False) and DEFAULT not in sources and server is not None:
            sources[DEFAULT] = TeacherSource(DEFAULT, "server", str(server), "teacher_model_server")
        composer.remote_teachers = frozenset(sources)
        run_teachers = teachers.RunTeachers(sources, composer, self.template) if sources else None
        checks.check_trainer(self, composer.needs, composer.active_terms)
        cross = CrossTeachers.for_run(self, composer, sources, self.kd_teacher_template)  # other tokenizers
        attachments = ModelAttachments(
            composer,
            self.model,
            self.teacher_model,
            unwrap=self.accelerator.unwrap_model,
            vocab_size=_tokenizer_size(self.template),
            log=logger.info if self.accelerator.is_main_process else None,
            aligned_teachers=frozenset(cross.plan.teachers) if cross else frozenset(),
        )
        if self.kd_attachments is not None:
            self.kd_attachments.close()
        self.kd_composer, self.kd_teachers, self.kd_attachments = composer, run_teachers, attachments
        self.kd_cross = cross
        for line in cross.describe() if cross and self.accelerator.is_main_process else ():
            logger.info(f"kdcompose: {line}")
        setattr(self.args, LLM_KD_WEIGHT_ATTR, legacy_llm_kd_weight(composer.active_terms))

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs, teacher_inputs = inputs["model_inputs"], inputs["teacher_model_inputs"]
        step = int(self.state.global_step)
        needs = self.kd_composer.needs_at(step)  # a term scheduled to 0 here does not make the teacher run
        cross = self.kd_cross
        if needs.teacher and not (cross and cross.local_default):  # else the teacher's own encoding
            checks.reject_opsd_batch(model_inputs, teacher_inputs)
        mode = "train" if self.model.training else "eval"
        self.kd_loop.prepare_step_tokens(mode, model_inputs)  # before trimming; global_tokens terms only
        whole_labels, teacher_labels = model_inputs["labels"], teacher_inputs.get("labels")
        topk = {}
        if self.kd_teachers is not None and needs.topk_teachers:
            topk = self.kd_teachers.batch_topk(inputs, model_inputs, needs.topk_teachers)
        if self.get_use_logits_to_keep(self.template.sequence_parallel_size == 1):  # as ms-swift
            self.prepare_logits_to_keep(model_inputs)
            if needs.teacher_language_model:
                self.prepare_logits_to_keep(teacher_inputs)

        with self.kd_attachments.capturing("student", needs) as student:
            outputs = model(**{k: v for k, v in model_inputs.items() if k != "labels"})
            student.logits = outputs.logits
        teacher = self._teacher_forward(model, teacher_inputs, needs) if needs.teacher else None
        aligned = (
            cross.aligned(inputs, whole_labels, teacher_labels, teacher_inputs, teacher) if cross else {}
        )
        context = build_context(
            model_inputs["labels"],
            student,
            teacher,
            sequence_labels=whole_labels,
            attention_mask=model_inputs.get("attention_mask"),
            logits_to_keep=model_inputs.get("logits_to_keep"),
            teacher_topk=topk,
            images=has_images(model_inputs),
            student_generated=inputs["gkd_batch"].data_source == DataSource.STUDENT,
            step=step,
            projectors=self.kd_attachments.projectors,
            step_token_denominator=self.kd_loop.step_denominator(),
            vocab_size=self.kd_attachments.vocab_size,
            aligned_teachers=aligned,
        )
        loss = self.kd_loop.record(self.kd_composer(context), mode)  # a non-finite loss becomes 0
        return (loss, outputs) if return_outputs else loss

    def _teacher_forward(self, model, teacher_inputs: Mapping[str, Any], needs: TermNeeds) -> ForwardCapture:
        """The teacher's forward (its vision tower alone when that is all the terms read)."""
        forward_inputs = {k: v for k, v in teacher_inputs.items() if k != "labels"}
        target = model if self.teacher_model is None else self.teacher_model
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.teacher_model is None:  # LoRA with teacher_model == model: the base model teaches
                stack.enter_context(self.accelerator.unwrap_model(model).disable_adapter())
            else:
                stack.enter_context(self.load_teacher_model_context())
            stack.enter_context(
                disable_gradient_checkpointing(target, self.args.gradient_checkpointing_kwargs)
            )
            with self.kd_attachments.capturing("teacher", needs) as teacher:
                sharded = self.is_fsdp_enabled or checks.zero3_enabled()  # keep every rank's collectives
                bare = self.accelerator.unwrap_model(target)
                if needs.teacher_language_model or sharded or not encode_vision_only(bare, forward_inputs):
                    teacher.logits = target(**forward_inputs).logits
        return teacher

    # ------------------------------------------------------------------ lifecycle

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Feature hooks are on the models only while training runs (removed when it ends or fails)."""
        _resume.begin_train(self, args, kwargs)  # exact resume: refuse / warn / counters
        self.kd_loop.run_started(args, kwargs)
        self.kd_attachments.open()
        try:
            with self.kd_checkpoints.stop_signals():  # SIGTERM: save at the step's end, then stop
                result = super().train(*args, **kwargs)
        except KeyboardInterrupt:
            self.kd_loop.interrupted()
            raise
        finally:
            self.kd_attachments.close()
        return self.kd_checkpoints.finish(result, self.state.max_steps)  # TrainingStopped: exit 75

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """ms-swift's log row plus kdcompose's per-term values (`KDLoop.add_to_log`)."""
        self.kd_loop.add_to_log(logs)
        return super().log(logs, *args, **kwargs)

    def kd_metric_values(self, mode: str = "train") -> dict[str, float]:
        """What the next log row of `mode` would get from kdcompose (reduced over ranks; a
        collective), and restart that window: for notebooks and tests calling `compute_loss`."""
        return self.kd_loop.metric_values(mode)

    def kd_reset_metrics(self) -> None:
        """Drop what the metric windows and the non-finite flags hold (e.g. after probing)."""
        self.kd_loop.reset_metrics()

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """ms-swift's save, plus the feature projectors next to the student."""
        super()._save(output_dir, state_dict)
        projectors = self.kd_attachments.projectors
        _projectors.save_projectors(projectors, output_dir or self.args.output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not _resume.load_checkpoint_weights(self, resume_from_checkpoint, model):  # exact resume
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        _projectors.load_projectors(self.kd_attachments.projectors, resume_from_checkpoint)

    # ------------------------------------------------------------------ teacher servers (teachers.py)

    def _prepare_batch_inputs(self, samples: list[Any]) -> list[dict[str, Any]]:
        chunks = super()._prepare_batch_inputs(samples)
        if self.kd_cross is not None:  # a teacher with another tokenizer sees its own encoding
            chunks = self.kd_cross.encode(self, chunks, samples)
        return teachers.fetch_named(self, chunks, samples)

    def _infer_teacher_requests(self, handle: dict[str, Any], topk: int, teacher_client: Any = None) -> Any:
        stock = super()._infer_teacher_requests
        return teachers.infer_or_failure(self, lambda: stock(handle, topk, teacher_client))

    def _scatter_teacher_parsed(self, handle: dict[str, Any], parsed_global: Any) -> Any:
        return teachers.scatter_or_stop(self, handle, parsed_global)


def _tokenizer_size(template: Any) -> int | None:
    tokenizer = getattr(template, "tokenizer", None)
    try:
        return len(tokenizer) if tokenizer is not None else None
    except TypeError:
        return None


__all__ = ["KDComposeGKDTrainer", "RunComposition"]
