"""Turn pydantic errors into `ConfigIssue`s with dotted YAML paths and plain advice."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from kdcompose.errors import ConfigIssue


def path_segment(key: object) -> str:
    """One segment of a dotted path; keys that would make the path ambiguous are quoted."""
    text = str(key)
    if text and all(c.isalnum() or c in "_-" for c in text):
        return text
    return json.dumps(text)


def join_path(*parts: object) -> str:
    """`rlhf.loss_terms.ce.weight`; the first part may already be a joined path."""
    if not parts:
        return ""
    head, *rest = parts
    segments = [str(head)] if head != "" else []
    segments += [path_segment(p) for p in rest]
    return ".".join(segments)


def _message(error: dict[str, Any], model: type[BaseModel] | None) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(model.model_fields)) if model is not None else ""
        return (
            "unknown key" + (f"; allowed keys here: {allowed}" if allowed else "") + " (check the spelling)"
        )
    msg = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if "input" in error and kind not in ("missing",):
        return f"{msg} (got {error['input']!r})" if "got" not in msg else msg
    return msg


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last element of `loc` (for listing allowed keys)."""
    model: Any = root
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def validate_model(model: type[BaseModel], raw: Any, path: str, issues: list[ConfigIssue]) -> Any:
    """Validate `raw` against `model`; on failure append one issue per error and return None."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error.get("loc", ()))
            issues.append(ConfigIssue(join_path(path, *loc), _message(error, _model_at(model, loc))))
        return None


def validate_value(adapter: TypeAdapter, raw: Any, path: str, issues: list[ConfigIssue]) -> Any:
    """Validate a single value (e.g. `rlhf.llm_kd_weight`); None on failure."""
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        for error in exc.errors():
            issues.append(ConfigIssue(path, _message(error, None)))
        return None
