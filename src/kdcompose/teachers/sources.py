"""Where each teacher of a run comes from: the config side (no ms-swift, no model).

A run has a *default* teacher (name `""`) and optionally *named* teachers:

* default: the local `teacher_model` (ms-swift loads it), or a top-K cache
  (`rlhf.teacher_cache: DIR`, then no teacher model is loaded at all), or ms-swift's
  `teacher_model_server` (one URL or its JSON list routed by `teacher_tag_key`);
* named: `rlhf.teachers: {NAME: {server: URL} | {cache: DIR}}`, read by top-k terms with
  `teacher: NAME`.

Paths: a cache directory written relative (`teacher_cache: cache/top64`) is read from the
config file's folder, like `plugins:`, so a config means the same files whatever folder
`kdcompose` is started from; it is stored (and shown in every message) as an absolute path.
ms-swift's own path arguments (`model`, `dataset`, `output_dir`, ...) keep ms-swift's rule:
relative to the working directory.

Caches and servers hand over only top-K log-probabilities, so every active term that reads
such a teacher must be a top-k term; anything that needs the teacher's full logits, hidden
states or module outputs needs a local teacher. These checks run when the config is loaded,
naming the key and the fix, before any model exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdcompose.errors import ConfigIssue
from kdcompose.registry import get_teacher_source, registered_teacher_sources
from kdcompose.teachers.provider import DEFAULT, TeacherSource

TEACHER_CACHE_PATH = "rlhf.teacher_cache"
TEACHERS_PATH = "rlhf.teachers"
SERVER_PATH = "rlhf.teacher_model_server"


def resolve_config_path(location: str, base_dir: Path | None) -> str:
    """An absolute path for a path kdcompose owns: a relative one is taken from the config's
    folder (`base_dir`; the working directory for a config that is not a file), `~` expanded."""
    path = Path(location).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return str(path.resolve())


def parse_sources(
    teacher_cache: Any,
    teachers: Any,
    swift_args: Mapping[str, Any],
    paths: Mapping[str, str],
    issues: list[ConfigIssue],
    base_dir: Path | None = None,
) -> dict[str, TeacherSource]:
    """The non-local teachers of a config by name (`""` = the default); problems into `issues`.
    Cache directories are made absolute from `base_dir`, the config's folder."""
    sources: dict[str, TeacherSource] = {}
    server = swift_args.get("teacher_model_server")
    server_path = paths.get("teacher_model_server", SERVER_PATH)
    if teacher_cache is not None:
        if not isinstance(teacher_cache, str) or not teacher_cache:
            issues.append(
                ConfigIssue(TEACHER_CACHE_PATH, "must be the directory `kdcompose teacher-cache` wrote")
            )
        elif server is not None:
            issues.append(
                ConfigIssue(
                    TEACHER_CACHE_PATH,
                    f"the default teacher is either a cache or a server, not both ({server_path} is set "
                    "too); "
                    f"name one of them under {TEACHERS_PATH} instead",
                )
            )
        else:
            location = resolve_config_path(teacher_cache, base_dir)
            sources[DEFAULT] = TeacherSource(DEFAULT, "cache", location, TEACHER_CACHE_PATH)
    elif server is not None:  # ms-swift's own key: one URL, or its JSON list routed by teacher_tag_key
        sources[DEFAULT] = TeacherSource(DEFAULT, "server", str(server), server_path)
    if teachers is None:
        return sources
    kinds = registered_teacher_sources()
    shapes = " or ".join(f"`{{{kind}: ...}}`" for kind in sorted(kinds))
    if not isinstance(teachers, Mapping):
        issues.append(ConfigIssue(TEACHERS_PATH, f"must map teacher names to {shapes}"))
        return sources
    for name, block in teachers.items():
        path = f"{TEACHERS_PATH}.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            issues.append(ConfigIssue(path, "a teacher name must be an identifier (letters, digits, _)"))
            continue
        found = [kind for kind in kinds if isinstance(block, Mapping) and kind in block]
        if len(found) != 1:
            issues.append(
                ConfigIssue(path, f"must be exactly one of {shapes} (kinds: {', '.join(sorted(kinds))})")
            )
            continue
        source = kinds[found[0]].parse(name, block, path, base_dir, issues)
        if source is not None:
            sources[name] = source
    return sources


def source_issues(
    sources: Mapping[str, TeacherSource],
    composer: Any,
    swift_args: Mapping[str, Any],
    paths: Mapping[str, str],
) -> list[ConfigIssue]:
    """What the active terms and ms-swift settings ask of the teachers that they cannot give."""
    issues: list[ConfigIssue] = []
    known = set(sources) | {DEFAULT}
    remote = frozenset(sources)
    for term in composer.active_terms:
        needs = term.needs
        for name in sorted(needs.topk_teachers - known):
            issues.append(
                ConfigIssue(
                    f"{term.origin}.teacher",
                    f"no teacher named {name!r}; declare it under {TEACHERS_PATH}.{name} as "
                    f"{' or '.join(f'`{{{kind}: ...}}`' for kind in sorted(registered_teacher_sources()))} "
                    f"(declared: {', '.join(sorted(set(sources) - {DEFAULT})) or 'none'})",
                )
            )
        if DEFAULT in sources and needs.served(remote).teacher:
            source = sources[DEFAULT]
            issues.append(
                ConfigIssue(
                    term.origin,
                    "needs the teacher model itself (its full logits, hidden states or module outputs), "
                    "but the "
                    f"default teacher is a {source.kind} ({source.origin}), which hands over only top-K "
                    "log-probabilities: give this term weight 0, use `topk: K` on lm_jsd, or train with a "
                    "local "
                    "`teacher_model`",
                )
            )
    for source in sources.values():
        issues += get_teacher_source(source.kind).config_issues(source, composer, swift_args, paths)
    return issues


def cache_issues(sources: Mapping[str, TeacherSource], composer: Any) -> list[ConfigIssue]:
    """What each teacher's own files show before any model loads (the preflight's part, e.g. a
    cache's manifest: a config can be validated before its cache is built)."""
    issues: list[ConfigIssue] = []
    for _, source in sorted(sources.items()):
        issues += get_teacher_source(source.kind).preflight_issues(source, composer)
    return issues


def cache_manifest_issues(source: TeacherSource, composer: Any) -> list[ConfigIssue]:
    """A missing cache, an old format or a missing / damaged / foreign shard (checksums:
    `kdcompose.teachers.cache.integrity_problem`), or top-k terms asking for more tokens than it
    holds (read from its manifest)."""
    from kdcompose.teachers.cache import TeacherCacheError, integrity_problem, read_manifest

    try:
        manifest = read_manifest(source.location)
    except (TeacherCacheError, OSError):
        return [
            ConfigIssue(
                source.origin,
                f"{source.location} is not a teacher cache (no readable manifest.json there); build it with "
                "`kdcompose teacher-cache CONFIG.yaml --out DIR`",
            )
        ]
    cached_k = manifest.get("topk")
    problem = integrity_problem(source.location, manifest)
    issues = [] if problem is None else [ConfigIssue(source.origin, problem)]
    for term in composer.active_terms:
        for request in term.needs.teacher_topk:
            if request.teacher != source.name or not isinstance(cached_k, int) or request.k <= cached_k:
                continue
            issues.append(
                ConfigIssue(
                    request.origin or term.origin,
                    f"asks for the top {request.k} tokens but {source.location} holds {cached_k} per "
                    "position: "
                    f"lower it to <= {cached_k}, or rebuild with `kdcompose teacher-cache CONFIG --out DIR "
                    f"--topk {request.k}`",
                )
            )
    return issues
