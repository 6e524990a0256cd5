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
batch; `trim_like_logits` applies ms-swift's `logits_to_keep` to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.teachers.sources import DEFAULT, TeacherSource

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

        wanted = self.servers_read(live)
        if not wanted:
            return
        for chunk, samples in zip(chunks, chunk_samples, strict=True):
            requests = build_teacher_requests(samples, template)
            target = chunk["teacher_model_inputs"]
            for name in wanted:
                k = self.k[name]
                parsed = self.servers[name].topk_logprobs(requests, k)
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


def trim_like_logits(tensor: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    """`tensor` ([B, S, ...], full sequence) trimmed the way ms-swift's `prepare_logits_to_keep`
    trimmed the logits: the last N positions, or the positions of a boolean mask (batch of 1)."""
    if logits_to_keep is None:
        return tensor
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
        return tensor[:, logits_to_keep.to(tensor.device)]
    n = int(logits_to_keep)
    return tensor[:, -n:] if n > 0 else tensor


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
