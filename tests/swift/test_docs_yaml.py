"""Every YAML example in the docs and the README is a config that works as shown.

A ```yaml block is a kdcompose config (sections `model` ... `custom`) and must validate:
its composition resolves and every ms-swift argument in it is a real `RLHFArguments` field.
An HTML comment right before the block changes what is checked (keywords separated by `;`):

* `<!-- invalid: PATH[, PATH...] -->` -- an intentional error example: it must be rejected,
  naming exactly these dotted paths;
* `<!-- swift-flat -->` -- ms-swift's own flat YAML (`swift rlhf cfg.yaml`, optionally with the
  plugin's top-level `loss_terms` / `llm_kd_weight` / `visual_kd`): every other key must be an
  ms-swift argument and the composition must resolve;
* `<!-- same-loss-as-previous -->` -- resolves to the same formula as the block before it
  (before/after pairs of a migration);
* `<!-- register: FILE.py -->` -- the block uses a term defined in FILE.py (relative to the
  repository): the file is imported first, and its registrations are removed afterwards.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdcompose import build_composer, parse_config, parse_config_text
from kdcompose.errors import ConfigError
from kdcompose.registry import registered_terms, unregister_term

REPO = Path(__file__).resolve().parents[2]
DOCS = [*sorted((REPO / "docs").rglob("*.md")), REPO / "README.md"]
FLAT_OWN_KEYS = {"loss_terms": "rlhf", "llm_kd_weight": "rlhf", "visual_kd": "custom"}

_BLOCK = re.compile(
    r"(?:<!--(?P<marker>[^>]*?)-->\s*\n)?[ \t]*```ya?ml[ \t]*\n(?P<body>.*?)\n[ \t]*```", re.S
)


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    body: str
    markers: dict[str, str]

    @property
    def id(self) -> str:
        doc = self.doc.relative_to(REPO) if self.doc.is_relative_to(REPO) else self.doc
        return f"{doc}:{self.line}"


def _markers(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (text or "").split(";"):
        key, _, value = item.strip().partition(":")
        if key:
            out[key.strip()] = value.strip()
    return out


def yaml_blocks(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    return [
        Block(doc, text.count("\n", 0, m.start("body")) + 1, m.group("body"), _markers(m.group("marker")))
        for m in _BLOCK.finditer(text)
    ]


BLOCKS = [block for doc in DOCS for block in yaml_blocks(doc)]


@functools.lru_cache(maxsize=1)
def swift_fields() -> frozenset[str]:
    from kdcompose.integrations.swift.launch.arg_names import swift_argument_names

    return swift_argument_names()


def _swift_argument_problems(args: dict[str, Any], paths: dict[str, str]) -> list[str]:
    from kdcompose.integrations.swift.launch.args import unknown_argument_issues

    return [str(issue) for issue in unknown_argument_issues(args, swift_fields(), paths)]


@contextmanager
def _registered_from(block: Block) -> Iterator[None]:
    """Import the file a `register:` marker names; unregister what it added on exit."""
    path = block.markers.get("register")
    if not path:
        yield
        return
    before = set(registered_terms())
    name = f"_docs_terms_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    assert spec is not None and spec.loader is not None, f"{block.id}: cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the spec's annotations through it
    try:
        spec.loader.exec_module(module)
        yield
    finally:
        sys.modules.pop(name, None)
        for key in set(registered_terms()) - before:
            unregister_term(key)


def _formula(block: Block) -> str:
    """Validate a block as its markers say; the resolved formula."""
    with _registered_from(block):
        return _validated_formula(block)


def _validated_formula(block: Block) -> str:
    if "swift-flat" in block.markers:
        data = yaml.safe_load(block.body)
        assert isinstance(data, dict), "an ms-swift YAML config is a flat mapping"
        sections: dict[str, dict[str, Any]] = {"rlhf": {}, "custom": {}}
        for key, value in data.items():
            sections[FLAT_OWN_KEYS.get(key, "rlhf")][key] = value
        config = parse_config(sections, source=block.id)
    else:
        config = parse_config_text(block.body, source=block.id)
    problems = _swift_argument_problems(dict(config.swift_args), dict(config.arg_paths))
    assert not problems, f"{block.id}: " + "; ".join(problems)
    return build_composer(config.composition).formula()


def test_the_docs_have_yaml_examples_to_check():
    docs_with_yaml = {block.doc.name for block in BLOCKS}
    for name in ("schedules.md", "migration.md", "lm_jsd.md", "ce.md", "visual_kd.md", "README.md"):
        assert name in docs_with_yaml, f"{name} has no YAML example"
    assert any("invalid" in block.markers for block in BLOCKS)
    assert any("swift-flat" in block.markers for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b.id for b in BLOCKS])
def test_yaml_example_is_what_the_doc_says(index):
    block = BLOCKS[index]
    unknown = set(block.markers) - {"invalid", "swift-flat", "same-loss-as-previous", "register"}
    assert not unknown, f"{block.id}: unknown marker(s) {sorted(unknown)}"
    if "invalid" in block.markers:
        claimed = tuple(p.strip() for p in block.markers["invalid"].split(",") if p.strip())
        assert claimed, f"{block.id}: say which dotted path the example gets wrong: <!-- invalid: PATH -->"
        with _registered_from(block), pytest.raises(ConfigError) as caught:
            parse_config_text(block.body, source=block.id)
        assert caught.value.paths == claimed, caught.value.render()
        return
    formula = _formula(block)
    if "same-loss-as-previous" in block.markers:
        assert index > 0 and BLOCKS[index - 1].doc == block.doc, f"{block.id}: no previous block in this doc"
        assert formula == _formula(BLOCKS[index - 1]), f"{block.id}: resolves to {formula}"


def test_a_wrong_example_would_be_caught(tmp_path):
    """The checker itself: an unmarked bad block fails, an invalid block must name its path."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```yaml\nrlhf:\n  llm_kd_weight: -1\n```\n\n"
        "<!-- invalid: rlhf.loss_terms.ce.weight -->\n```yaml\nrlhf:\n  llm_kd_weight: -1\n```\n\n"
        "<!-- swift-flat -->\n```yaml\nrlhf_type: gkd\nlora_rnk: 8\n```\n"
    )
    bad, wrong_path, flat = yaml_blocks(doc)
    assert bad.markers == {} and wrong_path.markers == {"invalid": "rlhf.loss_terms.ce.weight"}
    with pytest.raises(ConfigError):
        _formula(bad)
    with pytest.raises(ConfigError) as caught:
        parse_config_text(wrong_path.body)
    assert caught.value.paths != ("rlhf.loss_terms.ce.weight",)
    with pytest.raises(AssertionError, match="lora_rnk"):
        _formula(flat)
