"""The registries of loss-term types and of divergences.

One small registry, as in torchdistill: `@register_term` works bare (the class's
`type_name` or its class name is the key) or with an explicit key. Installed packages add
terms through the `kdcompose.terms` entry-point group, loaded once on first lookup; the
entry point may name a module (registering on import) or a LossTerm subclass (registered
under the entry point's name). Nothing is ever loaded from a YAML tag. Divergences
(`kdcompose.functional.divergences`) have a registry of the same shape: `@register_divergence`,
entry-point group `kdcompose.divergences`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, TypeVar, overload

from kdcompose.errors import UnknownTermError

if TYPE_CHECKING:
    from kdcompose.terms.base import LossTerm

ENTRY_POINT_GROUP = "kdcompose.terms"

TermClass = TypeVar("TermClass", bound="type[LossTerm]")

_REGISTRY: dict[str, type[LossTerm]] = {}
_entry_points_loaded = False
_lock = threading.Lock()


def _add(key: str, cls: type[LossTerm]) -> type[LossTerm]:
    # Imported here: the built-in terms import this module to register themselves.
    from kdcompose.terms.base import LossTerm, TermSpec

    if not isinstance(cls, type) or not issubclass(cls, LossTerm):
        raise TypeError(f"register_term expects a LossTerm subclass, got {cls!r}")
    if not key or not key.isidentifier():
        raise ValueError(f"term key must be a Python identifier (used in YAML and metric names), got {key!r}")
    existing = _REGISTRY.get(key)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"term type {key!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            "choose another key"
        )
    if not (isinstance(cls.spec_class, type) and issubclass(cls.spec_class, TermSpec)):
        raise TypeError(f"{cls.__qualname__}.spec_class must be a TermSpec subclass")
    cls.type_name = key
    _REGISTRY[key] = cls
    return cls


@overload
def register_term(target: TermClass) -> TermClass: ...
@overload
def register_term(target: str) -> Callable[[TermClass], TermClass]: ...
def register_term(target):
    """Register a LossTerm subclass: `@register_term` or `@register_term("my_term")`."""
    if isinstance(target, str):
        key = target

        def decorator(cls):
            return _add(key, cls)

        return decorator
    key = getattr(target, "type_name", "") or target.__name__
    return _add(key, target)


def unregister_term(key: str) -> None:
    """Remove a registration (for tests and interactive sessions)."""
    _REGISTRY.pop(key, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken plugin must say which one it is
                raise ImportError(
                    f"kdcompose term plugin {ep.name!r} ({ep.value}) from entry-point group "
                    f"{ENTRY_POINT_GROUP!r} failed to import: {exc}"
                ) from exc
            from kdcompose.terms.base import LossTerm

            if isinstance(loaded, type) and issubclass(loaded, LossTerm) and ep.name not in _REGISTRY:
                _add(ep.name, loaded)


def registered_terms() -> dict[str, type[LossTerm]]:
    """All registered term types, built-ins and plugins, by key. (The built-ins register when
    the `kdcompose` package is imported: this module imports no term.)"""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_term_class(key: str) -> type[LossTerm]:
    """Look up a term type; the error lists every registered type."""
    if key not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[key]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownTermError(
            f"unknown loss term type {key!r}; registered types: {known}. Register your own with "
            f"@kdcompose.register_term or the {ENTRY_POINT_GROUP!r} entry-point group"
        ) from None


# ---------------------------------------------------------------------------------------------
# Divergences (kdcompose.functional.divergences): the same pattern, a registry of their own
# ---------------------------------------------------------------------------------------------

DIVERGENCE_ENTRY_POINT_GROUP = "kdcompose.divergences"

if TYPE_CHECKING:
    from kdcompose.functional.divergences.base import Divergence

DivergenceClass = TypeVar("DivergenceClass", bound="type[Divergence]")

_DIVERGENCES: dict[str, type[Divergence]] = {}
_divergence_entry_points_loaded = False
_divergence_lock = threading.Lock()


class UnknownDivergenceError(KeyError):
    """A divergence name that no registered divergence (built-in, decorated or entry point) has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _add_divergence(key: str, cls: type[Divergence]) -> type[Divergence]:
    from kdcompose.functional.divergences.base import Divergence, DivergenceParams

    if not isinstance(cls, type) or not issubclass(cls, Divergence):
        raise TypeError(f"register_divergence expects a Divergence subclass, got {cls!r}")
    if not key or not key.isidentifier():
        raise ValueError(f"divergence key must be a Python identifier (used in YAML), got {key!r}")
    existing = _DIVERGENCES.get(key)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"divergence {key!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            "choose another key"
        )
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, DivergenceParams)):
        raise TypeError(f"{cls.__qualname__}.Params must be a DivergenceParams subclass")
    if "kind" in cls.Params.model_fields:
        raise TypeError(
            f"{cls.__qualname__}.Params may not have a field named `kind` (it names the divergence)"
        )
    cls.name = key
    _DIVERGENCES[key] = cls
    return cls


@overload
def register_divergence(target: DivergenceClass) -> DivergenceClass: ...
@overload
def register_divergence(target: str) -> Callable[[DivergenceClass], DivergenceClass]: ...
def register_divergence(target):
    """Register a Divergence subclass: `@register_divergence` or `@register_divergence("name")`.

    Bare, the key is the class's `name` or its class name. YAML then selects it with
    `divergence: NAME` or `divergence: {kind: NAME, <Params fields>}` on `lm_kd`.
    """
    if isinstance(target, str):
        key = target

        def decorator(cls):
            return _add_divergence(key, cls)

        return decorator
    key = getattr(target, "name", "") or target.__name__
    return _add_divergence(key, target)


def unregister_divergence(key: str) -> None:
    """Remove a divergence registration (for tests and interactive sessions)."""
    _DIVERGENCES.pop(key, None)


def _load_divergences() -> None:
    """The built-ins (imported here: they import this module to register) and the entry points."""
    global _divergence_entry_points_loaded
    import kdcompose.functional.divergences  # noqa: F401  (registers the built-ins)

    with _divergence_lock:
        if _divergence_entry_points_loaded:
            return
        _divergence_entry_points_loaded = True
        from kdcompose.functional.divergences.base import Divergence

        for ep in entry_points(group=DIVERGENCE_ENTRY_POINT_GROUP):
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken plugin must say which one it is
                raise ImportError(
                    f"kdcompose divergence plugin {ep.name!r} ({ep.value}) from entry-point group "
                    f"{DIVERGENCE_ENTRY_POINT_GROUP!r} failed to import: {exc}"
                ) from exc
            if isinstance(loaded, type) and issubclass(loaded, Divergence) and ep.name not in _DIVERGENCES:
                _add_divergence(ep.name, loaded)


def registered_divergences() -> dict[str, type[Divergence]]:
    """All registered divergences, built-ins and plugins, by key."""
    _load_divergences()
    return dict(sorted(_DIVERGENCES.items()))


def get_divergence_class(key: str) -> type[Divergence]:
    """Look up a divergence; the error lists every registered one."""
    if key not in _DIVERGENCES:
        _load_divergences()
    try:
        return _DIVERGENCES[key]
    except KeyError:
        known = ", ".join(sorted(_DIVERGENCES)) or "none"
        raise UnknownDivergenceError(
            f"unknown divergence {key!r}; registered divergences: {known}. Register your own with "
            "@kdcompose.registry.register_divergence or the "
            f"{DIVERGENCE_ENTRY_POINT_GROUP!r} entry-point group"
        ) from None


# ---------------------------------------------------------------------------------- teacher sources

_TEACHER_SOURCES: dict[str, type] = {}
_BUILTIN_TEACHER_SOURCES = ("kdcompose.teachers.cache_teacher", "kdcompose.teachers.server_teacher")


def register_teacher_source(kind: str) -> Callable[[type], type]:
    """Register a `kdcompose.teachers.provider.TeacherProvider` subclass for `rlhf.teachers.NAME:
    {KIND: ...}` blocks (and the default teacher). A kind may be registered once."""
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"a teacher source kind must be an identifier, got {kind!r}")

    def decorator(cls: type) -> type:
        from kdcompose.teachers.provider import TeacherProvider

        if not (isinstance(cls, type) and issubclass(cls, TeacherProvider)):
            raise TypeError(
                f"@register_teacher_source({kind!r}) needs a TeacherProvider subclass, got {cls!r}"
            )
        existing = _TEACHER_SOURCES.get(kind)
        if existing is not None and existing is not cls:
            raise ValueError(f"teacher source kind {kind!r} is already registered by {existing.__qualname__}")
        cls.kind = kind
        _TEACHER_SOURCES[kind] = cls
        return cls

    return decorator


def registered_teacher_sources() -> dict[str, type]:
    """Every teacher source kind by name (the built-in ones are loaded on first use)."""
    for module in _BUILTIN_TEACHER_SOURCES:
        import_module(module)
    return dict(_TEACHER_SOURCES)


def get_teacher_source(kind: str) -> type:
    sources = registered_teacher_sources()
    if kind not in sources:
        raise KeyError(f"no teacher source kind {kind!r}; known: {', '.join(sorted(sources))}")
    return sources[kind]
