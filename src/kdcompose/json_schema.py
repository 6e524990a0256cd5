"""JSON Schema of the YAML config, for editors (`kdcompose schema`).

Built from the registered term specs, so a plugin's term shows up with its own knobs. When
ms-swift is installed, every section also lists ms-swift's `RLHFArguments` names with their
types and help text (so editors complete them and flag typos: unknown keys are not allowed);
without it the sections are open-ended (the preflight checks names when ms-swift is there).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from kdcompose.config import SECTIONS
from kdcompose.registry import registered_terms
from kdcompose.schema.types import PositiveFloat, Probability, Weight

_REF = "#/$defs/{model}"


def _absorb(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    defs.update(schema.pop("$defs", {}))
    return schema


def config_json_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    variants = []
    for key, cls in registered_terms().items():
        spec_schema = _absorb(cls.spec_class.model_json_schema(ref_template=_REF), defs)
        title = f"{key} term"
        spec_schema["title"] = title
        spec_schema.setdefault("properties", {})["type"] = {
            "const": key,
            "description": f"term type; defaults to the term's name, so a term named {key!r} may omit it",
        }
        defs[f"term_{key}"] = spec_schema
        variants.append({"$ref": f"#/$defs/term_{key}"})

    swift_fields = swift_argument_schemas()

    def section(extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "type": "object",
            "description": "ms-swift arguments (RLHFArguments fields); each may appear in one section only",
            "properties": {**swift_fields, **(extra or {})},
            "additionalProperties": not swift_fields,
        }

    from kdcompose.terms.visual_kd import VisualKdSpec

    rlhf = section(
        {
            "loss_terms": {
                "type": "object",
                "description": "term name -> settings; `type` defaults to the name",
                "additionalProperties": {"anyOf": variants},
            },
            "llm_kd_weight": {
                **TypeAdapter(Weight).json_schema(),
                "description": "weight of LM-head KD (lm_jsd); 0 disables it. Default 1.0",
            },
            "beta": TypeAdapter(Probability).json_schema(),
            "temperature": TypeAdapter(PositiveFloat).json_schema(),
            "sft_alpha": TypeAdapter(Weight).json_schema(),
            "rlhf_type": {"const": "gkd"},
        }
    )
    custom = section({"visual_kd": _absorb(VisualKdSpec.model_json_schema(ref_template=_REF), defs)})
    properties = {name: section() for name in SECTIONS}
    properties["rlhf"] = rlhf
    properties["custom"] = custom
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
