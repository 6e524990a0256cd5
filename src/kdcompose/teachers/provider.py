"""Teacher providers: where a teacher's distributions come from, one class per kind of source.

A run has a default teacher (name `""`) and any number of named teachers (`rlhf.teachers`). Each
is a *source* (`TeacherSource`: its name, kind, location, options and the YAML path it was
declared at), and each kind of source is one `TeacherProvider` subclass, registered with
`@register_teacher_source(kind)`, that owns everything about that kind:

* `parse` -- its YAML block (`{KIND: LOCATION, option: value, ...}`), checked with dotted paths;
* `config_issues` -- what it cannot give the run, from the config alone (a cache cannot hold
  on-policy completions, ...); `preflight_issues` -- what its files show before any model loads
  (a cache's manifest);
* `open` -- for a run, once the tokenizer and template exist: returns the problems it finds;
* `fetch` / `topk` -- hand over what terms declared: a kind that `prefetches` (a server) is asked
  once per generation batch for each of its micro-batches, and the trainer keeps each answer in
  the micro-batch under `PREFETCHED`; `topk` then hands over a micro-batch's `(logprobs, ids)`,
  whole sequence, aligned with the logits' positions.

Trainers loop over the providers of a run (`kdcompose.integrations.swift.teachers.RunTeachers`
for ms-swift); they never branch on a kind. A new kind of teacher is one file with one class.
Built-in kinds: `cache` (`kdcompose.teachers.cache_teacher`), `server`
(`kdcompose.teachers.server_teacher`). The local teacher model needs no provider: the trainer
runs it and the terms read its logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from kdcompose.errors import ConfigIssue

DEFAULT = ""
"""The name of the default teacher in `TermNeeds.teacher_topk` / `LossContext.teacher_topk`."""
PREFETCHED = "kdcompose_teacher_topk"
"""Key of a micro-batch dict holding, per teacher name, the top-K a prefetching teacher answered."""


@dataclass(frozen=True)
class TeacherSource:
    """One teacher that is not the local model: its name (`""`: the default), kind, location
    (a directory, a URL, ...), kind-specific options, and the dotted YAML path it came from."""

    name: str
    kind: str
    location: str
    origin: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def provider(self) -> TeacherProvider:
        """A fresh provider for this source (its kind's registered class)."""
        from kdcompose.registry import get_teacher_source

        return get_teacher_source(self.kind)(self)


class TeacherProvider:
    """Everything about one kind of teacher source (see the module doc); register a subclass with
    `@register_teacher_source(kind)`. Every method has a default."""

    kind: ClassVar[str] = ""
    """Set by `register_teacher_source`."""
    location_help: ClassVar[str] = "a location"
    """What the kind's location is, for messages ("a directory `kdcompose teacher-cache` wrote")."""
    options: ClassVar[tuple[str, ...]] = ()
    """Keys the kind's YAML block accepts besides the kind itself."""

    def __init__(self, source: TeacherSource) -> None:
        self.source = source

    # ---------------------------------------------------------------- config side (no model)

    @classmethod
    def parse(
        cls, name: str, block: Mapping[str, Any], path: str, base_dir: Path | None, issues: list[ConfigIssue]
    ) -> TeacherSource | None:
        """The source a YAML block `{KIND: LOCATION, option: value}` declares (None, with issues,
        when it is malformed). Subclasses check the location with `check_location`."""
        unknown = sorted(set(block) - {cls.kind, *cls.options})
        if unknown:
            allowed = ", ".join(f"`{key}`" for key in cls.options) or "none"
            issues.append(
                ConfigIssue(
                    f"{path}.{unknown[0]}", f"unknown option of a {cls.kind} teacher (options: {allowed})"
                )
            )
            return None
        location = block.get(cls.kind)
        if not isinstance(location, str) or not location:
            issues.append(ConfigIssue(f"{path}.{cls.kind}", f"must be {cls.location_help}"))
            return None
        location = cls.check_location(location, f"{path}.{cls.kind}", base_dir, issues)
        if location is None:
            return None
        options = {key: block[key] for key in cls.options if key in block}
        return TeacherSource(name, cls.kind, location, f"{path}.{cls.kind}", options)

    @classmethod
    def check_location(
        cls, location: str, path: str, base_dir: Path | None, issues: list[ConfigIssue]
    ) -> str | None:
        """The location as the run will use it (e.g. made absolute), or None with an issue."""
        return location

    @classmethod
    def config_issues(
        cls, source: TeacherSource, composer: Any, swift_args: Mapping[str, Any], paths: Mapping[str, str]
    ) -> list[ConfigIssue]:
        """What this source cannot give the run, found without loading any model."""
        return []

    @classmethod
    def preflight_issues(cls, source: TeacherSource, composer: Any) -> list[ConfigIssue]:
        """What reading the source's own files or answers shows before any model loads (in
        `validate` and train's preflight), e.g. a cache's manifest."""
        return []

    def describe(self) -> str:
        """How the start-up line names this teacher: `cache DIR`, `server URL`, ..."""
        return f"{self.kind} {self.source.location}"

    # ---------------------------------------------------------------- run side

    def open(self, composer: Any, tokenizer: Any, template: Any, k: int | None) -> list[ConfigIssue]:
        """Get ready for a run whose terms read up to `k` tokens from this teacher; the problems
        found (checked against the run's tokenizer and template)."""
        return []

    prefetches: ClassVar[bool] = False
    """True when the source is asked once per generation batch (`fetch`), not per micro-batch."""

    def fetch(
        self, requests: Sequence[Any], model_inputs: Mapping[str, Any], k: int, template: Any
    ) -> list[Any]:
        """A prefetching source's answer for one micro-batch: `requests` (one per sample, as the
        framework builds them), `model_inputs` (the teacher's view of the micro-batch, which the
        answer must cover token for token), `template` (the run's, to name the fix)."""
        raise NotImplementedError(f"a {self.kind} teacher is not asked ahead of the micro-batch")

    def topk(
        self, batch: Mapping[str, Any], model_inputs: Mapping[str, Any], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's top-`k` teacher distribution: `(logprobs fp32, ids int64)`, each
        `[B, S, k]`, whole sequence, aligned with the logits' positions. Default: what was
        prefetched into `batch[PREFETCHED]` for this teacher."""
        found = batch.get(PREFETCHED, {}).get(self.source.name)
        if found is None:
            raise RuntimeError(f"teacher {self.source.name!r}: no top-K was fetched for this micro-batch")
        return found


__all__ = ["DEFAULT", "PREFETCHED", "TeacherProvider", "TeacherSource"]
