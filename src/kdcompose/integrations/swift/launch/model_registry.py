"""ms-swift's model types and templates, without importing ms-swift every time.

Why: the preflight checks a config's `model_type` / `teacher_model_type` and `template`
against ms-swift's registry (with the closest real name when one is misspelt), infers them
the way ms-swift does when they are left out, and checks that a model type fits the
checkpoint's architecture. The registry lives in `swift.model.MODEL_MAPPING` and
`swift.template.TEMPLATE_MAPPING`, and importing them costs 4-15 s (ms-swift registers ~240
model types and ~250 templates, importing transformers and torch on the way) for a command
that otherwise answers in a few seconds. What the checks need is a small table, and it
changes only when ms-swift's `model` or `template` packages change, so it is cached as JSON
under kdcompose's cache folder (`$KDCOMPOSE_CACHE`, else `~/.cache/kdcompose`), keyed by a
fingerprint of the installed ms-swift: its version and the size and modification time of
every file of those two packages -- the same scheme as the argument names (`arg_names.py`).

A cache file that cannot be parsed is rebuilt; a cache folder that cannot be written costs
the import on every call, nothing else. Model types registered by a run's
`external_plugins` are not in this table: the preflight does not reject names it cannot know.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kdcompose.integrations.swift.runtime import installed_swift_version
from kdcompose.testing._cache import cache_root

FOLDER = "swift_model_registry"
FORMAT = 1
PACKAGES = ("model", "template")


@dataclass(frozen=True)
class ModelGroupInfo:
    """A group of hub models of one model type: their names (lower case, without owner) and
    the template the group asks for (None: the model type's)."""

    names: tuple[str, ...]
    template: str | None


@dataclass(frozen=True)
class ModelTypeInfo:
    architectures: tuple[str, ...]
    template: str | None
    candidate_templates: tuple[str, ...]
    multimodal: bool
    groups: tuple[ModelGroupInfo, ...]


@dataclass(frozen=True)
class SwiftRegistry:
    """The part of ms-swift's model and template registries the preflight reads."""

    model_types: Mapping[str, ModelTypeInfo]
    templates: frozenset[str]

    def match_name(self, model_name: str) -> tuple[str, str | None] | None:
        """`(model_type, template)` of the first model group listing `model_name` (ms-swift's
        `get_matched_model_meta`: the name without owner, case-insensitive), or None."""
        name = model_name.lower()
        for model_type, info in self.model_types.items():
            for group in info.groups:
                if name in group.names:
                    return model_type, group.template or info.template
        return None

    def types_for_architecture(self, architecture: str | None) -> list[str]:
        """Model types registered for a config.json architecture (ms-swift's
        `get_matched_model_types`)."""
        return [t for t, info in self.model_types.items() if architecture in info.architectures]


def closest(name: str, choices: Sequence[str], limit: int = 3) -> list[str]:
    """The registered names closest to a misspelt one (`qwen2-vl` -> `qwen2_vl`): exact after
    normalising `-`/`.` to `_` first, then difflib's ratio."""
    normal = _normal(name)
    exact = [c for c in choices if _normal(c) == normal]
    return exact or difflib.get_close_matches(name.lower(), list(choices), n=limit, cutoff=0.6)


def _normal(name: str) -> str:
    return re.sub(r"[-.]", "_", name.lower())


# ---------------------------------------------------------------------- reading ms-swift and caching


def registry_fingerprint() -> str | None:
    version = installed_swift_version()
    spec = importlib.util.find_spec("swift") if version else None
    if version is None or spec is None or not spec.submodule_search_locations:
        return None
    digest = hashlib.sha256(f"{version}:{FORMAT}".encode())
    for location in spec.submodule_search_locations:
        for package in PACKAGES:
            folder = Path(location) / package
            for path in sorted(folder.rglob("*.py")):
                stat = path.stat()
                digest.update(f"{path.relative_to(folder.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def read_from_swift() -> dict[str, Any]:
    """The registry as JSON-able data, read off ms-swift (imports it)."""
    from kdcompose.integrations.swift.runtime import prepare_swift_import

    prepare_swift_import()
    from swift.model import MODEL_MAPPING
    from swift.template import TEMPLATE_MAPPING

    model_types: dict[str, Any] = {}
    for model_type, meta in MODEL_MAPPING.items():
        groups = []
        for group in meta.model_groups:
            names = {
                value.rsplit("/", 1)[-1].lower()
                for model in group.models
                for value in (model.ms_model_id, model.hf_model_id, model.model_path)
                if isinstance(value, str)
            }
            groups.append({"names": sorted(names), "template": group.template})
        model_types[model_type] = {
            "architectures": [a for a in meta.architectures if a != "null"],
            "template": meta.template,
            "candidate_templates": list(meta.candidate_templates),
            "multimodal": bool(meta.is_multimodal),
            "groups": groups,
        }
    return {"format": FORMAT, "model_types": model_types, "templates": sorted(TEMPLATE_MAPPING)}


def _parse(data: Any) -> SwiftRegistry | None:
    try:
        if data.get("format") != FORMAT:
            return None
        types = {
            name: ModelTypeInfo(
                architectures=tuple(info["architectures"]),
                template=info["template"],
                candidate_templates=tuple(info["candidate_templates"]),
                multimodal=bool(info["multimodal"]),
                groups=tuple(ModelGroupInfo(tuple(g["names"]), g["template"]) for g in info["groups"]),
            )
            for name, info in data["model_types"].items()
        }
        templates = frozenset(data["templates"])
    except (AttributeError, KeyError, TypeError):
        return None
    return SwiftRegistry(types, templates) if types and templates else None


@lru_cache(maxsize=1)
def swift_registry() -> SwiftRegistry:
    """ms-swift's registry: from the cache when its fingerprint matches the installed ms-swift,
    else from ms-swift (and then cached)."""
    fingerprint = registry_fingerprint()
    path = cache_root() / FOLDER / f"{fingerprint}.json" if fingerprint else None
    if path is not None:
        with contextlib.suppress(OSError, ValueError):
            cached = _parse(json.loads(path.read_text(encoding="utf-8")))
            if cached is not None:
                return cached
    data = read_from_swift()
    registry = _parse(data)
    if registry is None:
        raise RuntimeError("ms-swift's model registry has an unexpected layout")
    if path is not None:
        _write(path, data)
    return registry


def _write(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic (a temporary file renamed into place); failures are harmless."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(data, out)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


__all__ = ["ModelTypeInfo", "SwiftRegistry", "closest", "registry_fingerprint", "swift_registry"]
