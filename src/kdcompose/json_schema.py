"""JSON Schema of the YAML config, for editors (`kdcompose schema`).

Complete, so an editor using it flags real mistakes and nothing else:

* every section (`model` ... `custom`) lists ms-swift's `RLHFArguments` names with their types
  and help text when ms-swift is installed (unknown keys are then errors); the names are
  defined once under `$defs` and each section refers to them, with `unevaluatedProperties`
  (JSON Schema 2020-12) closing it, which keeps the schema small;
* kdcompose's own keys: top-level `plugins`, `rlhf.loss_terms`, `rlhf.llm_kd_weight`,
  `rlhf.teacher_cache`, `rlhf.teachers`, `rlhf.teacher_template`, `custom.visual_kd`;
* `loss_terms` holds every registered term type -- the built-ins, installed plug-ins (the
  `kdcompose.terms` entry points) and those of `kdcompose schema --plugin FILE` -- with its
  own knobs, strictly; a term named after a type may omit `type`. A term of a type the schema
  does not know (a plug-in from a config's `plugins:` that was not passed with `--plugin`) is
  accepted as it is: kdcompose validates it when it loads the plug-in.

Without ms-swift the sections are open-ended (the preflight checks names when ms-swift is
there).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from kdcompose.config import OWN_KEYS, PLUGINS_KEY, SECTIONS
from kdcompose.registry import registered_terms
from kdcompose.schema.types import PositiveFloat, Probability, Weight

_REF = "#/$defs/{model}"
SWIFT_DEFS = "swift_arguments"
IDENTIFIER = "^[A-Za-z_][A-Za-z0-9_]*$"


def _absorb(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    defs.update(schema.pop("$defs", {}))
    return schema


def _term_schemas(defs: dict[str, Any]) -> list[str]:
    """Put each registered term's spec schema under `$defs/term_<type>`; the type names."""
    keys = []
    for key, cls in sorted(registered_terms().items()):
        spec_schema = _absorb(cls.spec_class.model_json_schema(ref_template=_REF), defs)
        spec_schema["title"] = f"{key} term"
        spec_schema.setdefault("properties", {})["type"] = {
            "const": key,
            "description": f"term type; defaults to the term's name, so a term named {key!r} may omit it",
        }
        defs[f"term_{key}"] = spec_schema
        keys.append(key)
    return keys


def _loss_terms_schema(types: list[str]) -> dict[str, Any]:
    """`loss_terms`: a term named after a type may omit `type`; any other name must state a
    known type, or is a plug-in's term the schema cannot know (then anything goes)."""

    def typed(key: str) -> dict[str, Any]:
        return {"allOf": [{"$ref": f"#/$defs/term_{key}"}], "required": ["type"]}

    plugin_typed = {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"type": "string", "not": {"enum": types}}},
        "description": "a term of a plug-in type kdcompose loads from `plugins:` (validated then)",
    }
    plugin_named = {
        "type": "object",
        "properties": {"type": {"type": "string", "not": {"enum": types}}},
        "description": "a plug-in's term named after its type (validated when the plug-in is loaded)",
    }
    named = {
        key: {
            "anyOf": [
                {"$ref": f"#/$defs/term_{key}"},
                *(typed(other) for other in types if other != key),
                plugin_typed,
                {"type": "null"},
            ]
        }
        for key in types
    }
    return {
        "type": "object",
        "description": "term name -> settings; `type` defaults to the name (rlhf.loss_terms)",
        "propertyNames": {"pattern": IDENTIFIER},
        "properties": named,
        "additionalProperties": {"anyOf": [*(typed(key) for key in types), plugin_named, {"type": "null"}]},
    }


def _teachers_schema() -> dict[str, Any]:
    tokenizer = {
        "type": "string",
        "minLength": 1,
        "description": "the folder of the teacher's tokenizer.json when it differs from the student's "
        "(cross_tokenizer terms); relative to the config's folder",
    }
    source = {
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "server": {"type": "string", "pattern": "^https?://"},
                    "tokenizer": tokenizer,
                },
                "required": ["server"],
                "additionalProperties": False,
                "description": "a teacher server (kdcompose serve-teacher, swift deploy)",
            },
            {
                "type": "object",
                "properties": {
                    "cache": {"type": "string", "minLength": 1},
                    "tokenizer": tokenizer,
                },
                "required": ["cache"],
                "additionalProperties": False,
                "description": "a top-K cache (kdcompose teacher-cache); relative to the config's folder",
            },
        ]
    }
    return {
        "type": "object",
        "description": "named teachers read by top-k terms with `teacher: NAME`",
        "propertyNames": {"pattern": IDENTIFIER},
        "additionalProperties": source,
    }


def config_json_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    types = _term_schemas(defs)
    swift_fields = swift_argument_schemas()
    if swift_fields:
        defs[SWIFT_DEFS] = {"properties": swift_fields}

    def section(own: dict[str, Any] | None = None) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": ["object", "null"],
            "description": "ms-swift arguments (RLHFArguments fields); each may appear in one section only",
            "properties": dict(own or {}),
        }
        if swift_fields:
            schema["$ref"] = f"#/$defs/{SWIFT_DEFS}"
            schema["unevaluatedProperties"] = False
        return schema

    from kdcompose.terms.visual_kd import VisualKdSpec

    rlhf = section(
        {
            "loss_terms": _loss_terms_schema(types),
            "llm_kd_weight": {
                **TypeAdapter(Weight).json_schema(),
                "description": "weight of LM-head KD (lm_jsd); 0 disables it. Default 1.0",
            },
            "teacher_cache": {
                "type": "string",
                "minLength": 1,
                "description": "the default teacher is this top-K cache (kdcompose teacher-cache); "
                "relative to the config's folder",
            },
            "teachers": _teachers_schema(),
            "teacher_template": {
                "type": "string",
                "minLength": 1,
                "description": "the ms-swift template the local teacher encodes samples with when its "
                "tokenizer differs from the student's (default: its model type's own)",
            },
            "beta": TypeAdapter(Probability).json_schema(),
            "temperature": TypeAdapter(PositiveFloat).json_schema(),
            "sft_alpha": TypeAdapter(Weight).json_schema(),
            "rlhf_type": {"const": "gkd"},
        }
    )
    custom = section({"visual_kd": _absorb(VisualKdSpec.model_json_schema(ref_template=_REF), defs)})
    properties: dict[str, Any] = {name: section() for name in SECTIONS}
    properties["rlhf"] = rlhf
    properties["custom"] = custom
    properties[PLUGINS_KEY] = {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "description": "modules or .py files (relative to the config's folder) that register terms",
    }
    assert set(OWN_KEYS) <= set(rlhf["properties"]) | set(custom["properties"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kdcompose config",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "$defs": defs,
    }


def _type_schema(annotation: Any) -> dict[str, Any]:
    """A loose JSON type for a dataclass field annotation (str, int, float, bool, list, or any)."""
    text = str(annotation).replace("typing.", "")
    for token, schema in (
        ("List", {"type": "array"}),
        ("list", {"type": "array"}),
        ("Dict", {"type": ["object", "string"]}),
        ("dict", {"type": ["object", "string"]}),
        ("bool", {"type": ["boolean", "string"]}),
        ("float", {"type": ["number", "string"]}),
        ("int", {"type": ["integer", "string"]}),
        ("str", {"type": "string"}),
    ):
        if token in text:
            nullable = "Optional" in text or "None" in text
            if nullable and isinstance(schema["type"], str):
                return {"type": [schema["type"], "null"]}
            if nullable:
                return {"type": [*schema["type"], "null"]}
            return dict(schema)
    return {}


def swift_argument_schemas() -> dict[str, Any]:
    """ms-swift's argument names -> {type, description} (empty when ms-swift is not installed)."""
    from kdcompose.integrations.swift.launch.preflight import swift_importable

    if not swift_importable():
        return {}
    from kdcompose.integrations.swift.launch.args import swift_argument_fields

    out: dict[str, Any] = {}
    for name, f in sorted(swift_argument_fields().items()):
        schema = _type_schema(f.type)
        help_text = (f.metadata or {}).get("help")
        if help_text:
            schema["description"] = str(help_text)
        out[name] = schema
    return out
