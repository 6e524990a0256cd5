"""The package's layering, read from its source: what may import what, and where upstream
patches may live. A change that breaks a rule fails here, naming the module and the import."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "kdcompose"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _imports(path: Path) -> frozenset[str]:
    """Every module a file imports, at the top or inside a function (lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def _files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def _is(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_training_core_imports_neither_ms_swift_nor_transformers_trainer():
    offending = [
        (_module_name(path), name)
        for path in _files("training")
        for name in _imports(path)
        if _is(name, "swift")
        or _is(name, "kdcompose.integrations")
        or name in {"transformers.Trainer"}
        or _is(name, "transformers.trainer")
    ]
    assert offending == []


def test_every_module_of_the_ms_swift_adapter_uses_ms_swift():
    """`integrations/swift/` is ms-swift glue only: each module imports ms-swift itself or through
    a sibling that does (package faces excepted)."""
    files = {_module_name(p): p for p in _files("integrations/swift")}

    @cache
    def uses_swift(module: str) -> bool:
        names = _imports(files[module])
        if any(_is(name, "swift") for name in names):
            return True
        siblings = {name for name in names if name in files and name != module}
        return any(uses_swift(sibling) for sibling in siblings)

    faces = {m for m, p in files.items() if p.name == "__init__.py"}
    assert [m for m in files if m not in faces and not uses_swift(m)] == []


def test_upstream_patches_live_in_compat():
    """Frame walking and class swapping are upstream workarounds: only `kdcompose/compat/`."""
    offending = []
    for path in PACKAGE.rglob("*.py"):
        if _is(_module_name(path), "kdcompose.compat"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "_getframe":
                offending.append((_module_name(path), node.lineno, "sys._getframe"))
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "__class__" for t in node.targets
            ):
                offending.append((_module_name(path), node.lineno, "__class__ assignment"))
    assert offending == []


def test_the_math_imports_no_trainer_and_the_terms_no_framework():
    for folder in ("functional", "terms"):
        offending = [
            (_module_name(path), name)
            for path in _files(folder)
            for name in _imports(path)
            if _is(name, "kdcompose.training") or _is(name, "kdcompose.integrations") or _is(name, "swift")
        ]
        assert offending == [], folder


def test_the_ms_swift_trainer_stays_a_thin_adapter():
    lines = (PACKAGE / "integrations" / "swift" / "trainer.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 300


def test_the_core_tests_need_no_ms_swift():
    """`pytest tests/core` runs without ms-swift: no test there imports it or the swift test support."""
    offending = [
        (path.name, name)
        for path in sorted(Path(__file__).parent.glob("*.py"))
        for name in _imports(path)
        if _is(name, "swift") or _is(name, "swift_support")
    ]
    assert offending == []
