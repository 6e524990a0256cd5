"""The run's teachers that are not the local model, inside ms-swift's GKD trainer.

`kdcompose.teachers` says what each kind of teacher is (a provider per kind); this module runs
them the way ms-swift batches: for each generation batch, the prefetching teachers a term reads
at this step are asked for each micro-batch, with ms-swift's own request builder and assembler
(`build_teacher_requests` / `assemble_teacher_output`, so positions line up with its encoding),
each rank for its own samples; per micro-batch, each teacher a live term reads hands over its
top-K. ms-swift's own `teacher_model_server` stays ms-swift's: it fetches and assembles the
default teacher's top-K into `gkd_batch` itself (`SwiftServerTeacher` reads it from there).

A server failure stops every rank together, naming the URL and the checkpoint to resume from: a
named server's outcome is compared across ranks (`kdcompose.teachers.server_teacher`), the
default server's failure travels through ms-swift's own broadcast (`infer_or_failure`,
`scatter_or_stop`), so no rank waits in a collective until the process-group timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from swift.rlhf_trainers.gkd_helpers import assemble_teacher_output, build_teacher_requests

from kdcompose.errors import ConfigError
from kdcompose.integrations.swift.launch.args import is_swift_teacher_server
from kdcompose.teachers.provider import PREFETCHED, TeacherProvider, TeacherSource
from kdcompose.teachers.server_teacher import FetchFailure, ServerTeacher, stop_if_any_rank_failed
from kdcompose.training.checkpoints import last_complete_checkpoint
from kdcompose.training.metrics import is_distributed


def requested_k(terms: Iterable[Any]) -> dict[str, int]:
    """The largest K any active term reads from each teacher."""
    out: dict[str, int] = {}
    for term in terms:
        for request in term.needs.teacher_topk:
            out[request.teacher] = max(out.get(request.teacher, 0), request.k)
    return out


class SwiftServerTeacher(ServerTeacher):
    """ms-swift's `teacher_model_server` as the default teacher: ms-swift asks the server and
    assembles the answer into the micro-batch's `gkd_batch` itself."""

    prefetches = False

    def open(self, composer: Any, tokenizer: Any, template: Any, k: int | None) -> list[Any]:
        return []  # ms-swift holds the client

    def topk(
        self, batch: Mapping[str, Any], model_inputs: Mapping[str, Any], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gkd_batch = batch["gkd_batch"]
        if gkd_batch.teacher_topk_logprobs is None:
            raise RuntimeError("the default teacher server handed over no top-K for this micro-batch")
        return gkd_batch.teacher_topk_logprobs.float(), gkd_batch.teacher_topk_indices.long()


class RunTeachers:
    """The providers of one run, by teacher name (`""`: the default teacher), opened against the
    run's tokenizer, template and the K its terms read."""

    def __init__(self, sources: Mapping[str, TeacherSource], composer: Any, template: Any) -> None:
        self.sources = dict(sources)
        self.k = requested_k(composer.active_terms)
        self.providers: dict[str, TeacherProvider] = {
            name: SwiftServerTeacher(source) if is_swift_teacher_server(source) else source.provider()
            for name, source in self.sources.items()
        }
        issues = []
        for name, provider in self.providers.items():
            issues += provider.open(
                composer, getattr(template, "tokenizer", None), template, self.k.get(name)
            )
        if issues:
            raise ConfigError(issues, source="kdcompose teachers")

    def describe(self) -> dict[str, str]:
        """Where each teacher comes from, as the start-up line says it."""
        return {name: provider.describe() for name, provider in sorted(self.providers.items())}

    def prefetched(self, live: frozenset[str]) -> list[str]:
        """The prefetching teachers a term reads at this step (the same on every rank)."""
        return [name for name in sorted(self.providers) if name in live and self.providers[name].prefetches]

    def prefetch(
        self,
        chunks: list[dict[str, Any]],
        chunk_samples: list[list[Any]],
        template: Any,
        live: frozenset[str],
    ) -> None:
        """Ask each prefetching teacher a live term reads for each micro-batch of a generation batch."""
        wanted = self.prefetched(live)
        for chunk, samples in zip(chunks, chunk_samples, strict=True):
            requests = build_teacher_requests(samples, template)
            target = chunk["teacher_model_inputs"]
            for name in wanted:
                k = self.k[name]
                answer = self.providers[name].fetch(requests, target, k, template)
                out = assemble_teacher_output(
                    answer,
                    teacher_model_inputs=target,
                    topk=k,
                    template_padding_free=template.padding_free,
                    device=target["input_ids"].device,
                )
                chunk.setdefault(PREFETCHED, {})[name] = (out.topk_logprobs, out.topk_indices)

    def batch_topk(
        self, inputs: Mapping[str, Any], model_inputs: Mapping[str, Any], live: frozenset[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Whole-sequence top-K of this micro-batch for each teacher a live term reads."""
        return {
            name: self.providers[name].topk(inputs, model_inputs, self.k[name])
            for name in sorted(live & set(self.providers))
        }


def stop_message(trainer: Any, url: str, detail: str) -> str:
    last = last_complete_checkpoint(trainer.args.output_dir)
    where = (
        f"`kdcompose train CONFIG --resume` continues from {last}" if last else "no checkpoint was saved yet"
    )
    return (
        f"the teacher server {url} failed at global step {trainer.state.global_step} {detail}; every rank "
        f"stopped; {where}"
    )


def fetch_named(trainer: Any, chunks: list[dict[str, Any]], samples: list[Any]) -> list[dict[str, Any]]:
    """The trainer's `_prepare_batch_inputs` after ms-swift's encoding: what the prefetching
    teachers a term reads at this step answer. Each rank asks for its own samples; then the
    ranks compare notes, so a failure on any rank stops every rank together."""
    teachers: RunTeachers | None = trainer.kd_teachers
    if teachers is None:
        return chunks
    live = trainer.kd_composer.needs_at(int(trainer.state.global_step)).topk_teachers
    wanted = teachers.prefetched(live)
    if not wanted:
        return chunks
    failure = None
    try:
        teachers.prefetch(chunks, trainer.split_by_mini_batches(samples), trainer.template, live)
    except Exception as error:
        if not is_distributed():
            raise
        url = getattr(error, "url", None) or ", ".join(teachers.sources[name].location for name in wanted)
        failure = FetchFailure(f"{type(error).__name__}: {error}", url)
    if is_distributed():
        stop_if_any_rank_failed(failure, lambda url, detail: stop_message(trainer, url, detail))
    return chunks


def infer_or_failure(trainer: Any, infer: Callable[[], Any]) -> Any:
    """ms-swift's teacher-server call (main process only), with a failure returned instead of
    raised: raised on the main process alone, the other ranks would wait in ms-swift's broadcast
    until the process group times out; `scatter_or_stop` reports it on every rank."""
    try:
        return infer()
    except Exception as error:
        url = getattr(error, "url", None) or str(getattr(trainer, "teacher_model_server", ""))
        return FetchFailure(f"{type(error).__name__}: {error}", url)


def scatter_or_stop(trainer: Any, handle: dict[str, Any], parsed_global: Any) -> Any:
    """ms-swift's broadcast of the teacher's answer and this rank's slice of it (as
    `RolloutTrainerMixin._scatter_teacher_parsed`); when the main process failed, every rank stops
    together with one message naming the URL and the checkpoint to resume from."""
    from accelerate.utils import broadcast_object_list

    from kdcompose.teachers.server_client import TeacherServerError

    container = [parsed_global]
    broadcast_object_list(container, from_process=0)
    received = container[0]
    if isinstance(received, FetchFailure):
        message = stop_message(trainer, received.url, f"(main process): {received.message}")
        raise TeacherServerError(message, received.url)
    offset = sum(handle["all_counts"][: trainer.accelerator.process_index])
    return received[offset : offset + handle["n_local"]]


__all__ = ["RunTeachers", "SwiftServerTeacher", "fetch_named", "infer_or_failure", "scatter_or_stop"]
