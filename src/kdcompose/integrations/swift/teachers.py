"""The run's teachers that are not a local model, opened for training (trainer side).

`kdcompose.teachers.sources` says where each teacher is (config side); this module opens them
once the trainer exists and hands each micro-batch's top-K to the loss:

* a **cache** (`rlhf.teacher_cache` or `rlhf.teachers.NAME.cache`): checked against the run's
  tokenizer, template and the K its terms ask for before training, then read by content key;
* ms-swift's **default server** (`teacher_model_server`): ms-swift itself fetches and assembles
  the top-K into `gkd_batch` (with kdcompose's vLLM-free client where vLLM is missing);
* a **named server** (`rlhf.teachers.NAME.server`): asked for each generation batch with
  ms-swift's own request builder and assembler, by each rank for its own samples, and only
  when a term that reads it runs at that step.

All return full-sequence `[B, S, K]` top-K aligned with the logits positions of the untrimmed
batch (`kdcompose.training.context.build_context` trims them like the logits).

A server failure stops every rank together, naming the URL and the checkpoint to resume from:
a named server's outcome is compared across ranks (one small all-gather per generation batch),
the default server's failure travels through ms-swift's own broadcast (`infer_or_failure`,
`scatter_or_stop`), so no rank waits in a collective until the process-group timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from swift.utils import get_logger

from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.teachers.sources import DEFAULT, TeacherSource
from kdcompose.training.checkpoints import last_checkpoint
from kdcompose.training.metrics import is_distributed

NAMED_TOPK_KEY = "kdcompose_teacher_topk"
"""Key of a micro-batch's dict holding the named servers' top-K, filled when it is prepared."""


def requested_k(terms: Iterable[Any]) -> dict[str, int]:
    """The largest K any active term reads from each teacher."""
    out: dict[str, int] = {}
    for term in terms:
        for request in term.needs.teacher_topk:
            out[request.teacher] = max(out.get(request.teacher, 0), request.k)
    return out


class RunTeachers:
    """Open caches and clients of one run, by teacher name (`""`: the default teacher)."""

    def __init__(self, sources: Mapping[str, TeacherSource], composer: Any, template: Any) -> None:
        from kdcompose.teachers.cache import TeacherCache, TeacherCacheError

        self.sources = dict(sources)
        self.k = requested_k(composer.active_terms)
        self.caches: dict[str, Any] = {}
        self.servers: dict[str, Any] = {}
        issues: list[ConfigIssue] = []
        for name, source in self.sources.items():
            if source.kind == "cache":
                try:
                    cache = TeacherCache.open(source.location)
                except TeacherCacheError as error:
                    issues.append(ConfigIssue(source.origin, str(error)))
                    continue
                tokenizer = getattr(template, "tokenizer", None)
                origin = next(
                    (r.origin for t in composer.active_terms for r in t.needs.teacher_topk), source.origin
                )
                problems = cache.check(
                    tokenizer=tokenizer,
                    template=template,
                    topk=self.k.get(name),
                    topk_path=origin,
                    cache_path=source.origin,
                )
                issues += [ConfigIssue(path, message) for path, message in problems]
                self.caches[name] = cache
            elif name != DEFAULT:  # the default server is ms-swift's own machinery
                from kdcompose.teachers.server_client import TeacherServerClient

                self.servers[name] = TeacherServerClient(source.location)
        if issues:
            raise ConfigError(issues, source="kdcompose teachers")

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.sources)

    def servers_read(self, live: frozenset[str]) -> list[str]:
        """The named servers a term reads at this step (the same on every rank)."""
        return [name for name in sorted(self.servers) if name in live]

    def server_urls(self, live: frozenset[str]) -> list[str]:
        return [self.sources[name].location for name in self.servers_read(live)]

    def prepare_named(
        self,
        chunks: list[dict[str, Any]],
        chunk_samples: list[list[Any]],
        template: Any,
        live: frozenset[str],
    ) -> None:
        """Ask each named server that a term reads at this step for the top-K of each micro-batch
        of a generation batch (ms-swift's request builder and assembler, so positions line up)."""
        from swift.rlhf_trainers.gkd_helpers import assemble_teacher_output, build_teacher_requests

        from kdcompose.teachers.server_client import audit_answers  # the alignment audit

        wanted = self.servers_read(live)
        if not wanted:
            return
        for chunk, samples in zip(chunks, chunk_samples, strict=True):
            requests = build_teacher_requests(samples, template)
            target = chunk["teacher_model_inputs"]
            for name in wanted:
                k = self.k[name]
                parsed = self.servers[name].topk_logprobs(requests, k)
                audit_answers(parsed, target, name=name, url=self.sources[name].location, template=template)
                _check_lengths(name, self.sources[name].location, parsed, target)
                out = assemble_teacher_output(
                    parsed,
                    teacher_model_inputs=target,
                    topk=k,
                    template_padding_free=template.padding_free,
                    device=target["input_ids"].device,
                )
                chunk.setdefault(NAMED_TOPK_KEY, {})[name] = (out.topk_logprobs, out.topk_indices)

    def batch_topk(
        self, inputs: Mapping[str, Any], model_inputs: Mapping[str, Any], live: frozenset[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Full-sequence top-K of this micro-batch for each teacher a live term reads."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        device = model_inputs["input_ids"].device
        for name in sorted(live & self.names):
            if name in self.caches:
                out[name] = self.caches[name].batch_topk(model_inputs, topk=self.k.get(name), device=device)
            elif name in self.servers:
                named = inputs.get(NAMED_TOPK_KEY, {})
                if name not in named:
                    raise RuntimeError(f"teacher {name!r}: no top-K was fetched for this micro-batch")
                out[name] = named[name]
            else:
                batch = inputs["gkd_batch"]
                if batch.teacher_topk_logprobs is None:
                    raise RuntimeError("the default teacher server handed over no top-K for this micro-batch")
                out[name] = (batch.teacher_topk_logprobs.float(), batch.teacher_topk_indices.long())
        return out


def _check_lengths(name: str, url: str, parsed: list[Any], target: Mapping[str, Any]) -> None:
    """A server answer must cover every token of its sample: ms-swift's assembler would quietly
    use the shorter of the two, training on a misaligned teacher."""
    mask = target.get("attention_mask")
    lengths = mask.sum(dim=-1).tolist() if mask is not None else [target["input_ids"].shape[-1]] * len(parsed)
    for index, ((logprobs, _), length) in enumerate(zip(parsed, lengths, strict=False)):
        if len(logprobs) < int(length) - 1:  # position 0 has no prediction
            raise TeacherResponseShort(
                f"teacher {name!r} ({url}) answered {len(logprobs)} positions for sample {index} of the "
                f"micro-batch, which has {int(length)} tokens ({int(length) - 1} predicted positions): the "
                "server encodes prompts differently "
                "(another template or model?); check `kdcompose serve-teacher --template` against the run's"
            )
    if len(parsed) != len(lengths):
        raise TeacherResponseShort(
            f"teacher {name!r} ({url}) answered {len(parsed)} samples for a micro-batch of {len(lengths)}"
        )


class TeacherResponseShort(RuntimeError):
    """A named teacher server answered fewer positions or samples than the micro-batch has."""


@dataclass(frozen=True)
class TeacherFetchFailure:
    """What a rank reports instead of the teacher's answer when its server failed."""

    message: str
    url: str


def stop_message(trainer: Any, url: str, detail: str) -> str:
    last = last_checkpoint(trainer.args.output_dir)
    where = f"resume with resume_from_checkpoint: {last}" if last else "no checkpoint was saved yet"
    return (
        f"the teacher server {url} failed at global step {trainer.state.global_step} {detail}; every rank "
        f"stopped; {where}"
    )


def fetch_named(trainer: Any, chunks: list[dict[str, Any]], samples: list[Any]) -> list[dict[str, Any]]:
    """The trainer's `_prepare_batch_inputs` after ms-swift's encoding: the top-K of the named
    servers that a term reads at this step. Each rank asks for its own samples; then the ranks
    compare notes, so a failure on any rank stops every rank together."""
    teachers: RunTeachers | None = trainer.kd_teachers
    if teachers is None or not teachers.servers:
        return chunks
    live = trainer.kd_composer.needs_at(int(trainer.state.global_step)).topk_teachers
    if not teachers.servers_read(live):
        return chunks
    failure = None
    try:
        teachers.prepare_named(chunks, trainer.split_by_mini_batches(samples), trainer.template, live)
    except Exception as error:
        if not is_distributed():
            raise
        url = getattr(error, "url", None) or ", ".join(teachers.server_urls(live))
        failure = TeacherFetchFailure(f"{type(error).__name__}: {error}", url)
    if is_distributed():
        _stop_if_any_rank_failed(trainer, failure)
    return chunks


def _stop_if_any_rank_failed(trainer: Any, failure: TeacherFetchFailure | None) -> None:
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
    message = stop_message(trainer, first.url, f"on rank {rank}: {detail}")
    get_logger().error(f"kdcompose [rank {dist.get_rank()}/{dist.get_world_size()}]: {message}")
    dist.barrier()  # every rank has said it before any exits (the launcher then kills the rest)
    raise TeacherServerError(message, first.url)


def infer_or_failure(trainer: Any, infer: Callable[[], Any]) -> Any:
    """ms-swift's teacher-server call (main process only), with a failure returned instead of
    raised: raised on the main process alone, the other ranks would wait in ms-swift's broadcast
    until the process group times out; `scatter_or_stop` reports it on every rank."""
    try:
        return infer()
    except Exception as error:
        url = getattr(error, "url", None) or str(getattr(trainer, "teacher_model_server", ""))
        return TeacherFetchFailure(f"{type(error).__name__}: {error}", url)


def scatter_or_stop(trainer: Any, handle: dict[str, Any], parsed_global: Any) -> Any:
    """ms-swift's broadcast of the teacher's answer and this rank's slice of it (as
    `RolloutTrainerMixin._scatter_teacher_parsed`); when the main process failed, every rank stops
    together with one message naming the URL and the checkpoint to resume from."""
    from accelerate.utils import broadcast_object_list

    from kdcompose.teachers.server_client import TeacherServerError

    container = [parsed_global]
    broadcast_object_list(container, from_process=0)
    received = container[0]
    if isinstance(received, TeacherFetchFailure):
        message = stop_message(trainer, received.url, f"(main process): {received.message}")
        raise TeacherServerError(message, received.url)
    offset = sum(handle["all_counts"][: trainer.accelerator.process_index])
    return received[offset : offset + handle["n_local"]]
