"""The `cache` teacher: a top-K cache `kdcompose teacher-cache` wrote (`rlhf.teacher_cache: DIR`,
or `rlhf.teachers.NAME: {cache: DIR}`). No teacher model is loaded; each micro-batch's top-K is
read from the cache by the content of its samples (kdcompose.teachers.cache).

A cache of a teacher with another tokenizer holds, per sample, the teacher's own completion
(`TeacherCache.completion_rows`); its tokenizer is the copy the cache keeps, or the folder given
as `rlhf.teachers.NAME: {cache: DIR, tokenizer: PATH}` (checked to be the same tokenizer)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdcompose.errors import ConfigIssue
from kdcompose.registry import register_teacher_source
from kdcompose.teachers.provider import (
    DEFAULT,
    TOKENIZER_OPTION,
    TeacherProvider,
    TeacherSource,
    TokenizerSource,
)


@register_teacher_source("cache")
class CacheTeacher(TeacherProvider):
    location_help = "the directory `kdcompose teacher-cache` wrote"
    options = (TOKENIZER_OPTION,)

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

    @classmethod
    def tokenizer_source(cls, source: TeacherSource) -> TokenizerSource:
        """A cross-tokenizer cache's teacher tokenizer: the `tokenizer:` folder, else the copy the
        cache keeps; both must hash to the manifest's fingerprint. Another cache was built with the
        student's tokenizer (the run checks that fingerprint when it opens the cache)."""
        from kdcompose.teachers.cache import TeacherCacheError, read_manifest

        try:
            manifest = read_manifest(source.location)
        except (TeacherCacheError, OSError):
            return TokenizerSource(source.origin, student=True)  # its own preflight names the problem
        recorded = manifest.get("teacher_tokenizer")
        if not isinstance(recorded, dict):
            return TokenizerSource(source.origin, student=True)
        given = source.options.get(TOKENIZER_OPTION)
        if isinstance(given, str):
            origin = f"{source.origin.rsplit('.', 1)[0]}.{TOKENIZER_OPTION}"
            return TokenizerSource(origin, folder=given, fingerprint=recorded.get("fingerprint"))
        from kdcompose.teachers.cache import rebuild_command

        folder = str(Path(source.location) / str(recorded.get("path")))
        fix = (
            f"`{rebuild_command(manifest, source.location)}` writes the cache's copy again (its rows are "
            "kept), or name the teacher's tokenizer folder with `rlhf.teachers.NAME: {cache: DIR, "
            "tokenizer: PATH}`"
        )
        return TokenizerSource(
            source.origin, folder=folder, fingerprint=recorded.get("fingerprint"), files_fix=fix
        )

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

    def completions(self, batch: Mapping[str, Any], model_inputs: Mapping[str, Any], k: int) -> list[Any]:
        """Each sample's cached teacher completion (its ids, top-`k`, actual-token log-probabilities)."""
        from kdcompose.training.cross_tokenizer import TeacherCompletion

        return [
            TeacherCompletion(
                ids=rows.tokens.tolist(),
                topk_ids=rows.ids[:, :k].to(torch.int64),
                topk_logprobs=rows.logprobs[:, :k].float(),
                token_logprobs=rows.token_logprobs.float(),
            )
            for rows in self.cache.completion_rows(model_inputs)
        ]


__all__ = ["CacheTeacher"]
