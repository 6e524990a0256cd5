"""The `server` teacher: a process answering top-K log-probabilities over HTTP
(`kdcompose serve-teacher`, ms-swift's deploy; `rlhf.teachers.NAME: {server: URL}`, or ms-swift's
own `teacher_model_server` for the default teacher).

A server is asked once per generation batch, by each rank for its own samples
(`prefetches`); its answer must cover every token of every sample (a shorter answer would be
assembled silently onto the wrong positions). Because each rank asks on its own, a failure on
one rank must stop every rank together: `stop_if_any_rank_failed` compares outcomes across the
ranks (one small all-gather per generation batch) and raises the same message everywhere,
instead of leaving the others waiting in their next collective until the process-group
timeout (when ranks sit on other nodes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from kdcompose.errors import ConfigIssue
from kdcompose.log import logger
from kdcompose.registry import register_teacher_source
from kdcompose.teachers.provider import TeacherProvider, TeacherSource


class TeacherResponseShort(RuntimeError):
    """A teacher server answered fewer positions or samples than the micro-batch has."""


@dataclass(frozen=True)
class FetchFailure:
    """What a rank reports instead of the teacher's answer when its server failed."""

    message: str
    url: str


@register_teacher_source("server")
class ServerTeacher(TeacherProvider):
    location_help = "an http(s) URL of a teacher server (kdcompose serve-teacher, swift deploy)"
    prefetches = True

    def __init__(self, source: TeacherSource) -> None:
        super().__init__(source)
        self.client: Any = None

    @classmethod
    def check_location(
        cls, location: str, path: str, base_dir: Path | None, issues: list[ConfigIssue]
    ) -> str | None:
        if not location.startswith(("http://", "https://")):
            issues.append(ConfigIssue(path, f"must be an http(s) URL, got {location!r}"))
            return None
        return location

    def open(self, composer: Any, tokenizer: Any, template: Any, k: int | None) -> list[ConfigIssue]:
        from kdcompose.teachers.server_client import TeacherServerClient

        self.client = TeacherServerClient(self.source.location)
        return []

    def fetch(
        self, requests: Sequence[Any], model_inputs: Mapping[str, Any], k: int, template: Any
    ) -> list[Any]:
        """The server's top-`k` answer for one micro-batch, checked to score exactly the tokens the
        trainer encoded (the alignment audit) and to cover every sample's positions: ms-swift's
        assembler would quietly use the shorter of the two, training on a misaligned teacher."""
        from kdcompose.teachers.server_client import audit_answers

        parsed = self.client.topk_logprobs(list(requests), k)
        name, url = self.source.name, self.source.location
        audit_answers(parsed, model_inputs, name=name, url=url, template=template)
        mask = model_inputs.get("attention_mask")
        lengths = (
            mask.sum(dim=-1).tolist()
            if mask is not None
            else [model_inputs["input_ids"].shape[-1]] * len(parsed)
        )
        if len(parsed) != len(lengths):
            raise TeacherResponseShort(
                f"teacher {name!r} ({url}) answered {len(parsed)} samples for a micro-batch of {len(lengths)}"
            )
        for index, ((logprobs, _), length) in enumerate(zip(parsed, lengths, strict=True)):
            if len(logprobs) < int(length) - 1:  # position 0 has no prediction
                raise TeacherResponseShort(
                    f"teacher {name!r} ({url}) answered {len(logprobs)} positions for sample {index} "
                    f"of the micro-batch, which has {int(length)} tokens ({int(length) - 1} predicted "
                    "positions): the server encodes prompts differently (another template or model?); "
                    "check `kdcompose serve-teacher --template` against the run's"
                )
        return parsed


def stop_if_any_rank_failed(failure: FetchFailure | None, message: Callable[[str, str], str]) -> None:
    """Compare one generation batch's fetch outcome across the ranks; if any failed, every rank
    logs the same `message(url, detail)`, waits until all have, and raises it. A no-op in one
    process (the failure is raised where it happened)."""
    from kdcompose.teachers.server_client import TeacherServerError

    outcomes: list[FetchFailure | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, failure)
    failed = [(rank, f) for rank, f in enumerate(outcomes) if f is not None]
    if not failed:
        return
    rank, first = failed[0]
    detail = "; ".join(f"rank {r}: {f.message}" for r, f in failed)
    text = message(first.url, f"on rank {rank}: {detail}")
    logger.error(f"kdcompose [rank {dist.get_rank()}/{dist.get_world_size()}]: {text}")
    dist.barrier()  # every rank has said it before any exits (the launcher then kills the rest)
    raise TeacherServerError(text, first.url)


__all__ = ["FetchFailure", "ServerTeacher", "TeacherResponseShort", "stop_if_any_rank_failed"]
