"""The cached list of ms-swift argument names that `validate` checks a config against.

The fingerprint is pure (folders of files); the cache runs against the installed ms-swift,
with the cache root in a temporary folder.
"""

from __future__ import annotations

import json
import os

import pytest

from kdcompose.integrations.swift.launch import arg_names
from kdcompose.testing._cache import CACHE_ENV


def _package(tmp_path, files: dict[str, str]):
    root = tmp_path / "swift"
    for name, text in files.items():
        path = root / "arguments" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_fingerprint_follows_version_and_every_argument_file(tmp_path):
    package = _package(tmp_path, {"rlhf_args.py": "a = 1\n", "base/train_args.py": "b = 2\n"})
    (package / "trainers.py").write_text("x = 1\n")
    first = arg_names.fingerprint("4.6.0", [package])
    assert arg_names.fingerprint("4.6.0", [package]) == first
    assert arg_names.fingerprint("4.6.1", [package]) != first

    (package / "trainers.py").write_text("x = 22\n")  # outside `arguments`: not part of it
    assert arg_names.fingerprint("4.6.0", [package]) == first

    nested = package / "arguments" / "base" / "train_args.py"
    nested.write_text("b = 3\n")  # same size, new mtime
    os.utime(nested, ns=(1, 1))
    assert arg_names.fingerprint("4.6.0", [package]) != first


@pytest.mark.swift
def test_names_are_read_from_swift_once_then_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    arg_names.swift_arguments.cache_clear()  # one read per process: start this test's own
    arguments = arg_names.swift_arguments()
    assert arguments == arg_names.read_from_swift()
    assert {"learning_rate", "teacher_model", "gkd_logits_topk"} <= arguments.names
    assert {"dataset", "target_modules"} <= arguments.lists and "learning_rate" not in arguments.lists

    (cached,) = (tmp_path / arg_names.FOLDER).glob("*.json")
    assert cached.stem == arg_names.swift_fingerprint()
    assert json.loads(cached.read_text()) == {
        "names": sorted(arguments.names),
        "lists": sorted(arguments.lists),
    }

    planted = {"names": [*sorted(arguments.names), "planted_name"], "lists": sorted(arguments.lists)}
    cached.write_text(json.dumps(planted))  # a new process reads the file
    arg_names.swift_arguments.cache_clear()
    assert "planted_name" in arg_names.swift_argument_names()

    for damaged in ("{not json", json.dumps(sorted(arguments.names)), json.dumps({"names": [], "lists": []})):
        cached.write_text(damaged)  # unreadable, the 0.2 layout, empty: rebuilt from ms-swift
        arg_names.swift_arguments.cache_clear()
        assert arg_names.swift_arguments() == arguments
        assert json.loads(cached.read_text())["names"] == sorted(arguments.names)
    arg_names.swift_arguments.cache_clear()  # later tests read the real cache again


def test_a_yaml_scalar_for_a_list_argument_becomes_a_list():
    from kdcompose.integrations.swift.launch.args import coerce_to_lists

    values = {"dataset": "a.jsonl", "target_modules": ["q", "k"], "learning_rate": 1e-4, "columns": None}
    assert coerce_to_lists(values, {"dataset", "target_modules", "columns"}) == {
        "dataset": ["a.jsonl"],
        "target_modules": ["q", "k"],
        "learning_rate": 1e-4,
        "columns": None,
    }
