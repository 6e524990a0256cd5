"""`KDComposeGKDTrainer`: ms-swift's GKD trainer whose loss is a kdcompose `LossComposer`.

Only `compute_loss` is replaced, so everything else stays ms-swift's: on-policy rollouts
(`lmbda`), the DeepSpeed / FSDP-prepared teacher, `offload_teacher_model`,
`logits_to_keep`, gradient accumulation, evaluation, logging. The override is glue with no
loss math: run the student, run the teacher only when an active term needs it (and only
its vision tower when no active term needs its language model), build the `LossContext`
with logits and labels aligned exactly as ms-swift aligns them, call the composer, and
record each active term's weighted value under its metric key. What happens around each
micro-batch, optimizer step and log row (telemetry, `global_tokens` normalization, NaN/inf,
resume records, Ctrl-C) lives in `loop.KDLoop`, held as `kd_loop`.

With the stock composition (`lm_jsd` weight 1 plus `ce` weight `sft_alpha`) the loss equals
ms-swift's `GKDTrainer.compute_loss`: JSD averaged over the tokens that carry a label (per
micro-batch, as ms-swift does; `num_items_in_batch` is accepted and, as there, not used;
`normalize: global_tokens` on a term divides by the tokens of the whole optimizer step
instead), plus the CE on dataset batches only.

Importing this module imports ms-swift (after readying torchvision and checking the
version), so import it only when a run starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from kdcompose.integrations.swift.runtime import prepare_swift_import

prepare_swift_import()

from swift.rlhf_trainers.gkd_loss import DataSource  # noqa: E402
from swift.rlhf_trainers.gkd_trainer import GKDTrainer  # noqa: E402
from swift.trainers import disable_gradient_checkpointing  # noqa: E402
from swift.utils import get_logger  # noqa: E402

from kdcompose.composer import CompositionOutput, LossComposer, build_composer  # noqa: E402
from kdcompose.errors import ConfigError, ConfigIssue  # noqa: E402
from kdcompose.functional.vocab import align_vocab, check_vocab_compatible  # noqa: E402
from kdcompose.integrations.swift import resume as _exact_resume  # noqa: E402
from kdcompose.integrations.swift.launch.args import unsupported_setting_issues  # noqa: E402
from kdcompose.integrations.swift.launch.spec import (  # noqa: E402
    LLM_KD_WEIGHT_ATTR,
    TEACHERS_ATTR,
    composition_for,
)
from kdcompose.integrations.swift.teachers import RunTeachers, trim_like_logits  # noqa: E402
from kdcompose.resolve import legacy_llm_kd_weight  # noqa: E402
from kdcompose.teachers.sources import DEFAULT, TeacherSource  # noqa: E402
from kdcompose.terms.base import LossContext, Tap  # noqa: E402
from kdcompose.training import projectors as _projectors  # noqa: E402
from kdcompose.training.lm_head import LmHeadTap, LmHeadUnsupported, lm_head_of, tap_lm_head  # noqa: E402
from kdcompose.training.loop import KDLoop, is_distributed, last_checkpoint  # noqa: E402
from kdcompose.training.taps import ModuleTaps, capture  # noqa: E402

logger = get_logger()

IGNORE_INDEX = -100
OPSD_COLUMNS = ("teacher_prompt", "teacher_images")
"""Dataset columns that make ms-swift run on-policy self-distillation (OPSD)."""


class KDComposeGKDTrainer(GKDTrainer):
    """ms-swift GKD with a composed loss. `kd_composer` (Python use) overrides the composition
    the launcher or plugin handed over; without either, the stock GKD loss is composed."""

    def __init__(self, model: Any = None, *args: Any, kd_composer: LossComposer | None = None, **kwargs: Any):
        _reject_unsupported(kwargs)
        if kwargs.get("teacher_model_server") is not None:
            from kdcompose.teachers.server_client import install_vllm_free_teacher_client

            install_vllm_free_teacher_client()  # ms-swift's own client needs vLLM; same protocol without it
        self._kd_teachers: RunTeachers | None = None
        super().__init__(model, *args, **kwargs)
        self._vocab_size = _tokenizer_size(self.template)
        self._student_recorder = self._teacher_recorder = None
        self._feature_projectors: dict[str, torch.nn.Module] = {}
        if kd_composer is None:
            composition, origin = composition_for(self.args, self.gkd_logits_topk)
            kd_composer = build_composer(composition)
        else:
            origin = "the kd_composer argument"
        self.use_composer(kd_composer)
        self.kd_loop = KDLoop(self)
        if self.accelerator.is_main_process:
            logger.info(f"kdcompose: {kd_composer.formula()} (composition from {origin})")

    def use_composer(self, composer: LossComposer) -> None:
        """Train with `composer` from now on: checks it against this trainer (teacher, vocab,
        feature modules) and re-hooks the feature targets it needs."""
        previous = getattr(self, "kd_composer", None), getattr(self, "_kd_needs", None), self._kd_teachers
        sources = self._kd_teacher_sources()
        composer.remote_teachers = frozenset(sources)
        self.kd_composer, self._kd_needs = composer, composer.needs
        try:
            self._kd_teachers = RunTeachers(sources, composer, self.template) if sources else None
            self._check_needs_supported()
            self._check_teacher()
            self._check_no_opsd_columns()
            self._check_vocab()
            projector_plans = self._plan_projectors()
            recorders = self._build_recorders()
        except Exception:
            self.kd_composer, self._kd_needs, self._kd_teachers = previous
            raise
        self._close_recorders()
        self._student_recorder, self._teacher_recorder = recorders
        self._feature_projectors = _projectors.attach_projectors(
            self.accelerator.unwrap_model(self.model), projector_plans
        )
        self._kd_split: tuple[LossComposer, LossComposer] | None = None
        setattr(self.args, LLM_KD_WEIGHT_ATTR, legacy_llm_kd_weight(composer.active_terms))

    def _kd_teacher_sources(self) -> dict[str, TeacherSource]:
        """The run's cache / server teachers: as `kdcompose train` attached them, plus ms-swift's
        own `teacher_model_server` as the default teacher (the plugin route)."""
        attached = getattr(self.args, TEACHERS_ATTR, None) or {}
        sources = {name: TeacherSource.from_dict(data) for name, data in attached.items()}
        server = getattr(self, "teacher_model_server", None)
        if getattr(self, "use_teacher_api", False) and DEFAULT not in sources and server is not None:
            sources[DEFAULT] = TeacherSource(DEFAULT, "server", str(server), "teacher_model_server")
        return sources

    def _prepare_batch_inputs(self, samples: list[Any]) -> list[dict[str, Any]]:
        """ms-swift's encoding of a generation batch, plus the top-K of the named servers that a
        term reads at this step. Each rank asks for its own samples; then the ranks compare notes
        (one small all-gather per generation batch), so a failure on any rank stops every rank
        together, naming the rank and the URL, instead of the others waiting in their next
        collective (until the process-group timeout when ranks sit on other nodes)."""
        chunks = super()._prepare_batch_inputs(samples)
        teachers = self._kd_teachers
        if teachers is None or not teachers.servers:
            return chunks
        live = self._needs_at(int(self.state.global_step)).topk_teachers
        if not teachers.servers_read(live):
            return chunks
        failure = None
        try:
            teachers.prepare_named(chunks, self.split_by_mini_batches(samples), self.template, live)
        except Exception as error:
            if not is_distributed():
                raise
            url = getattr(error, "url", None) or ", ".join(teachers.server_urls(live))
            failure = TeacherFetchFailure(f"{type(error).__name__}: {error}", url)
        if is_distributed():
            self._kd_stop_if_any_rank_failed(failure)
        return chunks

    def _kd_stop_if_any_rank_failed(self, failure: TeacherFetchFailure | None) -> None:
        """All-gather each rank's fetch outcome; if any failed, every rank logs the same message,
        waits for the others to have logged it, and raises it."""
        import torch.distributed as dist
        from accelerate.utils import gather_object

        from kdcompose.teachers.server_client import TeacherServerError

        outcomes = gather_object([failure])
        failed = [(rank, f) for rank, f in enumerate(outcomes) if f is not None]
        if not failed:
            return
        rank, first = failed[0]
        detail = "; ".join(f"rank {r}: {f.message}" for r, f in failed)
        message = self._kd_teacher_stop_message(first.url, f"on rank {rank}: {detail}")
        get_logger().error(f"kdcompose [rank {dist.get_rank()}/{dist.get_world_size()}]: {message}")
        dist.barrier()  # every rank has said it before any exits (the launcher then kills the rest)
        raise TeacherServerError(message, first.url)

    def _kd_teacher_stop_message(self, url: str, detail: str) -> str:
        last = last_checkpoint(self.args.output_dir)
        where = f"resume with resume_from_checkpoint: {last}" if last else "no checkpoint was saved yet"
        return (
            f"the teacher server {url} failed at global step {self.state.global_step} {detail}; every rank "
            f"stopped; {where}"
        )

    def _infer_teacher_requests(self, handle: dict[str, Any], topk: int, teacher_client: Any = None) -> Any:
        """ms-swift's teacher-server call (main process only). A failure is handed to every rank
        through ms-swift's own broadcast instead of raised here: raised on the main process alone,
        the other ranks would wait in that broadcast until the process group times out."""
        try:
            return super()._infer_teacher_requests(handle, topk, teacher_client)
        except Exception as error:  # reported on every rank by _scatter_teacher_parsed
            url = getattr(error, "url", None) or str(getattr(self, "teacher_model_server", ""))
            return TeacherFetchFailure(f"{type(error).__name__}: {error}", url)

    def _scatter_teacher_parsed(self, handle: dict[str, Any], parsed_global: Any) -> Any:
        """ms-swift's broadcast of the teacher's answer and this rank's slice of it (as
        `RolloutTrainerMixin._scatter_teacher_parsed`); when the main process failed, every rank
        stops together with one message naming the URL and the checkpoint to resume from."""
        from accelerate.utils import broadcast_object_list

        from kdcompose.teachers.server_client import TeacherServerError

        container = [parsed_global]
        broadcast_object_list(container, from_process=0)
        received = container[0]
        if isinstance(received, TeacherFetchFailure):
            message = self._kd_teacher_stop_message(received.url, f"(main process): {received.message}")
            raise TeacherServerError(message, received.url)
        offset = sum(handle["all_counts"][: self.accelerator.process_index])
        return received[offset : offset + handle["n_local"]]

    def _close_recorders(self) -> None:
        for recorder in self._recorders():
            recorder.close()
        self._student_recorder = self._teacher_recorder = None

    def _recorders(self) -> list[Any]:
        return list({id(r): r for r in (self._student_recorder, self._teacher_recorder) if r}.values())

    # ------------------------------------------------------------------ lifecycle: hooks, projectors

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Feature hooks are on the models only while training runs: removed when it ends and when
        it fails (a loss computed afterwards hooks just for its own forward)."""
        _exact_resume.begin_train(self, args, kwargs)  # kdcompose exact resume: refuse / warn / counters
        self.kd_loop.run_started(args, kwargs)
        for recorder in self._recorders():
            recorder.open()
        try:
            return super().train(*args, **kwargs)
        except KeyboardInterrupt:
            self.kd_loop.interrupted()
            raise
        finally:
            for recorder in self._recorders():
                recorder.close()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """ms-swift's log row plus kdcompose's per-term values (`KDLoop.add_to_log`)."""
        self.kd_loop.add_to_log(logs)
        return super().log(logs, *args, **kwargs)

    def kd_metric_values(self, mode: str = "train") -> dict[str, float]:
        """What the next log row of `mode` would get from kdcompose (reduced over ranks; a
        collective), and restart that window: for notebooks and tests that call `compute_loss`
        themselves."""
        return self.kd_loop.metric_values(mode)

    def kd_reset_metrics(self) -> None:
        """Drop what the metric windows and the non-finite flags hold (e.g. after probing)."""
        self.kd_loop.reset_metrics()

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """ms-swift's save, plus the feature projectors next to the student (kdcompose.training.projectors)."""
        super()._save(output_dir, state_dict)
        _projectors.save_projectors(self._feature_projectors, output_dir or self.args.output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not _exact_resume.load_checkpoint_weights(self, resume_from_checkpoint, model):  # exact resume
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        _projectors.load_projectors(self._feature_projectors, resume_from_checkpoint)

    # ------------------------------------------------------------------ construction checks

    def _check_needs_supported(self) -> None:
        """Hidden states are read at the LM heads' inputs (`lm_head.tap_lm_head`): check, before
        training, that every model whose hidden states an active term needs has a head that can be
        read that way, and that terms reading both heads get heads with the same rows."""
        needs = self._kd_needs
        if not (needs.student_hidden or needs.teacher_hidden):
            return
        terms = [t for t in self.kd_composer.active_terms if t.needs.student_hidden or t.needs.teacher_hidden]

        def fail(message: str) -> NoReturn:
            issues = [ConfigIssue(t.origin, message) for t in terms]
            raise ConfigError(issues, source="kdcompose ms-swift trainer")

        if self.is_fsdp_enabled:  # ZeRO-3 is handled (kdcompose.sharding.call_through_head); FSDP1 is not
            fail(
                "needs hidden states and reads the LM-head weights directly, which accelerate's FSDP shards "
                "into flat parameters of the enclosing unit; use DeepSpeed ZeRO-0/1/2/3 or DDP (for lm_jsd: "
                "`fused: false`)"
            )
        rows = {}
        for side, wanted in (("student", needs.student_hidden), ("teacher", needs.teacher_hidden)):
            if not wanted:
                continue
            try:
                head = lm_head_of(self.accelerator.unwrap_model(self._lm_module(self.model, side)))
            except LmHeadUnsupported as error:
                fail(f"needs the {side}'s final hidden states: {error} (for lm_jsd: `fused: false`)")
            rows[side] = head.out_features
        both = any(t.needs.student_hidden and t.needs.teacher_hidden for t in terms)
        if len(set(rows.values())) > 1 and both:
            fail(
                f"reads both LM heads and compares them row by row, but the student's has {rows['student']} "
                f"rows and the teacher's {rows['teacher']}; vocabularies that differ by padding are aligned "
                "only on logits (for lm_jsd: `fused: false`)"
            )

    def _check_teacher(self) -> None:
        if not self._kd_needs.teacher:
            return
        if self.teacher_model is None and not self._teacher_use_disable_adapter:
            names = ", ".join(t.name for t in self.kd_composer.active_terms if t.needs.teacher)
            raise ConfigError.single(
                "teacher_model",
                f"the active term(s) {names} need a teacher, but none is loaded (ms-swift would fall back to "
                "self-distillation with the student as its own teacher, which kdcompose does not support). "
                "Set `teacher_model` (the same path as `model` with LoRA uses the base model as a fixed "
                "teacher)",
                source="ms-swift arguments",
            )

    def _check_no_opsd_columns(self) -> None:
        if not self._kd_needs.teacher:
            return  # the teacher-side encoding is never used
        for name in ("train_dataset", "eval_dataset"):
            columns = _column_names(getattr(self, name, None))
            found = [c for c in OPSD_COLUMNS if c in columns]
            if found:
                raise ConfigError.single(
                    "dataset",
                    f"the {name.replace('_', ' ')} has column(s) {found}, which make ms-swift run on-policy "
                    "self-distillation (OPSD) with a different teacher prompt; kdcompose compares "
                    "student and teacher position by position and does not support OPSD. Remove the "
                    "column(s) or use ms-swift's stock GKD trainer",
                    source="ms-swift dataset",
                )

    def _check_vocab(self) -> None:
        if not self._kd_needs.teacher_logits:
            return
        student = _lm_head_width(self.accelerator.unwrap_model(self.model))
        teacher_model = self.teacher_model if self.teacher_model is not None else self.model
        teacher = _lm_head_width(self.accelerator.unwrap_model(teacher_model))
        if student and teacher:
            check_vocab_compatible(student, teacher, vocab_size=self._vocab_size)

    def _plan_projectors(self) -> list[_projectors.ProjectorPlan]:
        """Projectors the declared feature pairs ask for; a width mismatch without one fails here,
        before training, whenever the models' structure tells the widths."""
        if not self._kd_needs.pairs:
            return []
        student = self.accelerator.unwrap_model(self.model)
        teacher = student if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        plans = _projectors.plan_projectors(self._kd_needs.pairs, student, teacher)
        for plan in plans if self.accelerator.is_main_process else ():
            logger.info(f"kdcompose: {plan.origin}: {plan.kind} projector {plan.in_width}->{plan.out_width}")
        return plans

    def _feature_projector(self, key: str) -> torch.nn.Module | None:
        """The projector of feature pair `key` as attached now (looked up when a hook runs)."""
        return self._feature_projectors.get(key)

    def _build_recorders(self) -> tuple[ModuleTaps | None, ModuleTaps | None]:
        """One recorder per side, hooking exactly the active terms' taps. With the LoRA base model
        as teacher both hook the same modules; each records only during its own forward."""
        student_taps, teacher_taps = self._kd_needs.side_taps("student"), self._kd_needs.side_taps("teacher")
        projections: dict[Tap, list[str]] = {}
        for pair in self._kd_needs.pairs:
            if pair.projector is not None:
                projections.setdefault(pair.student, []).append(pair.key)
        student = (
            ModuleTaps(self.model, student_taps, projections=projections, projector=self._feature_projector)
            if student_taps
            else None
        )
        if not teacher_taps:
            return student, None
        teacher_model = self.model if self.teacher_model is None else self.teacher_model
        return student, ModuleTaps(teacher_model, teacher_taps, detach=True)

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = inputs["model_inputs"]
        teacher_inputs = inputs["teacher_model_inputs"]
        student_generated = inputs["gkd_batch"].data_source == DataSource.STUDENT
        step = int(self.state.global_step)
        needs = self._needs_at(step)
        if needs.teacher:
            _reject_opsd_batch(model_inputs, teacher_inputs)

        mode = "train" if self.model.training else "eval"
        self.kd_loop.prepare_step_tokens(mode, model_inputs)  # before trimming; global_tokens terms only
        # Module taps see the whole sequence even where logits_to_keep trims the logits below.
        sequence = (torch.roll(model_inputs["labels"], shifts=-1, dims=1), model_inputs.get("attention_mask"))
        teacher_topk = {}
        if self._kd_teachers is not None and needs.topk_teachers:
            teacher_topk = self._kd_teachers.batch_topk(inputs, model_inputs, needs.topk_teachers)

        # As ms-swift: trim each forward to its completion region; each side keeps its own labels.
        if self.get_use_logits_to_keep(self.template.sequence_parallel_size == 1):
            self.prepare_logits_to_keep(model_inputs)
            if needs.teacher_language_model:
                self.prepare_logits_to_keep(teacher_inputs)
            keep = model_inputs.get("logits_to_keep")
            teacher_topk = {
                n: (trim_like_logits(lp, keep), trim_like_logits(ix, keep))
                for n, (lp, ix) in teacher_topk.items()
            }

        forward_inputs = {k: v for k, v in model_inputs.items() if k != "labels"}
        projected: dict[str, list[torch.Tensor]] = {}
        with (
            capture(self._student_recorder, projected) as student_taps,
            self._tap_lm_head(model, "student", needs) as student_head,
        ):
            outputs_student = model(**forward_inputs)

        teacher_logits, teacher_taps, teacher_head = None, {}, LmHeadTap()
        if needs.teacher:
            with self._tap_lm_head(model, "teacher", needs) as teacher_head:
                teacher_logits, teacher_taps = self._teacher_forward(
                    model, teacher_inputs, language_model=needs.teacher_language_model
                )

        output = self._compose(
            model_inputs,
            teacher_inputs,
            student_head.logits(outputs_student.logits),
            teacher_head.logits(teacher_logits),
            {**student_taps, **teacher_taps},
            student_generated,
            step,
            heads=(student_head, teacher_head),
            sequence=sequence,
            teacher_topk=teacher_topk,
            projected=projected,
        )
        loss = self.kd_loop.record(output, mode)  # metrics + NaN/inf flags; a non-finite loss becomes 0
        return (loss, outputs_student) if return_outputs else loss

    def _needs_at(self, step: int) -> Any:
        """What the terms that run at `step` need: a term scheduled to weight 0 at this step
        does not make the teacher run (the schedule is a function of the step, so every rank
        decides alike)."""
        needs_at = getattr(self.kd_composer, "needs_at", None)
        return needs_at(step) if callable(needs_at) else self._kd_needs

    def _lm_module(self, model, side: str) -> Any:
        """The model whose LM head is `side`'s (LoRA base model as teacher: the student's own)."""
        return model if side == "student" or self.teacher_model is None else self.teacher_model

    def _tap_lm_head(self, model, side: str, needs: Any) -> Any:
        """Fused mode: read `side`'s final hidden states at its LM head's input during its forward,
        and let the head compute no logits unless a term needs them too (lm_head.tap_lm_head).
        A no-op when no term needs `side`'s hidden states."""
        hidden, logits = getattr(needs, f"{side}_hidden"), getattr(needs, f"{side}_logits")
        target = self.accelerator.unwrap_model(self._lm_module(model, side))
        return tap_lm_head(target, hidden=hidden, logits=logits, freeze=side == "teacher")

    def _teacher_forward(
        self, model, teacher_inputs: Mapping[str, Any], *, language_model: bool
    ) -> tuple[torch.Tensor | None, dict]:
        """The teacher's logits (None when no active term needs its language model) and taps."""
        forward_inputs = {k: v for k, v in teacher_inputs.items() if k != "labels"}
        gc_kwargs = self.args.gradient_checkpointing_kwargs
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.teacher_model is None:  # LoRA with teacher_model == model: the base model is the teacher
                target = model
                stack.enter_context(self.accelerator.unwrap_model(model).disable_adapter())
            else:
                target = self.teacher_model
                stack.enter_context(self.load_teacher_model_context())
            stack.enter_context(disable_gradient_checkpointing(target, gc_kwargs))
            logits = None
            with capture(self._teacher_recorder) as recorded:
                if language_model or not self._run_vision_only(target, forward_inputs):
                    logits = target(**forward_inputs).logits
        return logits, recorded

    def _run_vision_only(self, target, forward_inputs: Mapping[str, Any]) -> bool:
        """Run only the teacher's vision tower (features without the language model); False when
        that cannot reproduce what a full forward records, so the caller runs the full forward."""
        if self.is_fsdp_enabled or _zero3_enabled():
            return False  # sharded parameters: keep every rank's collectives identical
        images = forward_inputs.get("pixel_values")
        videos = forward_inputs.get("pixel_values_videos")
        if images is not None and videos is not None:
            return False  # a full forward may encode both in one vision call; keep its call pattern
        unwrapped = self.accelerator.unwrap_model(target)
        if images is not None:
            fn = getattr(unwrapped, "get_image_features", None)
            if fn is None:
                return False
            fn(pixel_values=images, image_grid_thw=forward_inputs.get("image_grid_thw"))
        elif videos is not None:
            fn = getattr(unwrapped, "get_video_features", None)
            if fn is None:
                return False
            fn(pixel_values_videos=videos, video_grid_thw=forward_inputs.get("video_grid_thw"))
        return True  # a text-only batch has no teacher features to record

    def _compose(
        self,
        model_inputs: Mapping[str, Any],
        teacher_inputs: Mapping[str, Any],
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        taps: Mapping[Tap, list[torch.Tensor]],
        student_generated: bool,
        step: int,
        heads: tuple[LmHeadTap, LmHeadTap] = (LmHeadTap(), LmHeadTap()),
        sequence: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
        teacher_topk: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        projected: Mapping[str, list[torch.Tensor]] | None = None,
    ) -> CompositionOutput:
        # ms-swift's alignment (GKDTrainer._compute_jsd_loss): logits at i predict labels[i + 1].
        labels = torch.roll(model_inputs["labels"], shifts=-1, dims=1)
        has_images = any(model_inputs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        ctx = LossContext(
            labels=labels,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            student_hidden=heads[0].hidden,
            teacher_hidden=heads[1].hidden,
            student_lm_head=heads[0].head,
            teacher_lm_head=heads[1].head,
            taps=taps,
            sequence_labels=sequence[0],
            attention_mask=sequence[1],
            teacher_topk=teacher_topk or {},
            projected=projected or {},
            student_generated=student_generated,
            has_images=has_images,
            step=step,
            projectors=self._feature_projectors,
            step_token_denominator=self.kd_loop.step_denominator(),
        )
        if teacher_logits is None or teacher_logits.shape[-1] == student_logits.shape[-1]:
            return self.kd_composer(ctx)

        # Vocabularies that differ by padding: as ms-swift, the KD terms compare the labelled
        # positions with both sides widened; the other terms keep the student's own logits.
        mask = labels != IGNORE_INDEX
        teacher_mask = torch.roll(teacher_inputs["labels"], shifts=-1, dims=1) != IGNORE_INDEX
        student_active, teacher_active = align_vocab(
            student_logits[mask], teacher_logits[teacher_mask], vocab_size=self._vocab_size
        )
        kd_ctx = LossContext(
            labels=labels[mask],
            student_logits=student_active,
            teacher_logits=teacher_active,
            taps=taps,
            sequence_labels=sequence[0],
            attention_mask=sequence[1],
            projected=projected or {},
            student_generated=student_generated,
            has_images=has_images,
            step=ctx.step,
            projectors=self._feature_projectors,
            step_token_denominator=self.kd_loop.step_denominator(),
        )
        kd_composer, own_composer = self._split_composers()
        outputs = [c(x) for c, x in ((kd_composer, kd_ctx), (own_composer, ctx)) if c.active_terms]
        return CompositionOutput(
            total=torch.stack([o.total for o in outputs]).sum(),
            terms=tuple(t for o in outputs for t in o.terms),
        )

    def _split_composers(self) -> tuple[LossComposer, LossComposer]:
        """Terms that compare teacher and student logits, and the rest (built once)."""
        if self._kd_split is None:
            terms = self.kd_composer.active_terms
            self._kd_split = (
                LossComposer(t for t in terms if t.needs.teacher_logits),
                LossComposer(t for t in terms if not t.needs.teacher_logits),
            )
        return self._kd_split


# ---------------------------------------------------------------------- helpers (no loss math)


@dataclass(frozen=True)
class TeacherFetchFailure:
    """What the main process broadcasts instead of the teacher's answer when the server failed."""

    message: str
    url: str


def _reject_unsupported(kwargs: Mapping[str, Any]) -> None:
    training_args = kwargs.get("args")
    values = {
        "teacher_model_server": kwargs.get("teacher_model_server"),
        "gkd_logits_topk": kwargs.get("gkd_logits_topk"),
        "use_liger_kernel": getattr(training_args, "use_liger_kernel", False),
    }
    issues = unsupported_setting_issues(values)
    if issues:
        raise ConfigError(issues, source="ms-swift arguments")


def _reject_opsd_batch(model_inputs: Mapping[str, Any], teacher_inputs: Mapping[str, Any]) -> None:
    # Without OPSD ms-swift hands the teacher the student's encoding (a copy of the same dict).
    if teacher_inputs.get("input_ids") is not model_inputs.get("input_ids"):
        raise ConfigError.single(
            "dataset",
            "this batch carries a separate teacher encoding (OPSD: a `teacher_prompt` / `teacher_images` "
            "column); kdcompose compares student and teacher position by position and does not support OPSD",
            source="ms-swift batch",
        )


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers always has it in the tested range
        return False
    return bool(is_deepspeed_zero3_enabled())


def _tokenizer_size(template: Any) -> int | None:
    tokenizer = getattr(template, "tokenizer", None)
    try:
        return len(tokenizer) if tokenizer is not None else None
    except TypeError:
        return None


def _lm_head_width(model: Any) -> int | None:
    """Rows of the LM head (works under ZeRO-3, where the weight itself is partitioned)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        width = getattr(head, "out_features", None)
        if width:
            return int(width)
        weight = getattr(head, "weight", None)
        shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", None)
        if shape is not None and len(shape) and shape[0]:
            return int(shape[0])
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "vocab_size", None)


def _column_names(dataset: Any) -> list[str]:
    for candidate in (dataset, getattr(dataset, "dataset", None)):
        names = getattr(candidate, "column_names", None)
        if isinstance(names, (list, tuple)):
            return list(names)
    return []


__all__ = ["KDComposeGKDTrainer"]
