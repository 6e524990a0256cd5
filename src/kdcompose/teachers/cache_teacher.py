"""The `cache` teacher: a top-K cache `kdcompose teacher-cache` wrote (`rlhf.teacher_cache: DIR`,
or `rlhf.teachers.NAME: {cache: DIR}`). No teacher model is loaded; each micro-batch's top-K is
read from the cache by the content of its samples (kdcompose.teachers.cache)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdcompose.errors import ConfigIssue
from kdcompose.registry import register_teacher_source
from kdcompose.teachers.provider import DEFAULT, TeacherProvider, TeacherSource


@register_teacher_source("cache")
class CacheTeacher(TeacherProvider):
    location_help = "the directory `kdcompose teacher-cache` wrote"

    def __init__(self, source: TeacherSource) -> None:
        super().__init__(source)
        self.cache: Any = None

    @classmethod
    def check_location(
        cls, location: str, path: str, base_dir: Path | None, issues: list[ConfigIssue]
    ) -> str | None:
        """A relative directory is read from the config's folder, like `plugins:`."""
        from kdcompose.teachers.sources import resolve_config_path

        return resolve_config_path(location, base_dir)

    @classmethod
    def config_issues(
        cls, source: TeacherSource, composer: Any, swift_args: Mapping[str, Any], paths: Mapping[str, str]
    ) -> list[ConfigIssue]:
        """A cache made before training cannot hold completions the student generates."""
        lmbda = swift_args.get("lmbda")
        if (
            source.name != DEFAULT
            or not isinstance(lmbda, (int, float))
            or isinstance(lmbda, bool)
            or lmbda <= 0
        ):
            return []
        return [
            ConfigIssue(
                paths.get("lmbda", "rlhf.lmbda"),
                f"lmbda {lmbda:g} makes the student generate completions during training, which a cache "
                f"made before training cannot hold: set `lmbda: 0` to train from {source.origin}, or use a "
                "teacher model or server for on-policy distillation",
            )
        ]

    @classmethod
    def preflight_issues(cls, source: TeacherSource, composer: Any) -> list[ConfigIssue]:
        from kdcompose.teachers.sources import cache_manifest_issues

        return cache_manifest_issues(source, composer)

    def describe(self) -> str:
        """`cache DIR (top-K, N samples)`, read from its manifest (no shard is opened)."""
        from kdcompose.teachers.cache import TeacherCacheError, read_manifest

        try:
            manifest = read_manifest(self.source.location)
        except (TeacherCacheError, OSError):
            return f"cache {self.source.location} (no manifest yet)"
        samples = manifest.get("num_samples")
        count = f", {samples} samples" if isinstance(samples, int) else ""
        return f"cache {self.source.location} (top-{manifest.get('topk')}{count})"

    def open(self, composer: Any, tokenizer: Any, template: Any, k: int | None) -> list[ConfigIssue]:
        """Open the cache and check it against the run's tokenizer, template and top-K."""
        from kdcompose.teachers.cache import TeacherCache, TeacherCacheError

        try:
            self.cache = TeacherCache.open(self.source.location)
        except TeacherCacheError as error:
            return [ConfigIssue(self.source.origin, str(error))]
        requests = (
            r for t in composer.active_terms for r in t.needs.teacher_topk if r.teacher == self.source.name
        )
        topk_path = next((r.origin for r in requests if r.origin), self.source.origin)
        problems = self.cache.check(
            tokenizer=tokenizer, template=template, topk=k, topk_path=topk_path, cache_path=self.source.origin
        )
        return [ConfigIssue(path, message) for path, message in problems]

    def topk(
        self, batch: Mapping[str, Any], model_inputs: Mapping[str, Any], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = model_inputs["input_ids"].device
        return self.cache.batch_topk(model_inputs, topk=k, device=device)


__all__ = ["CacheTeacher"]
