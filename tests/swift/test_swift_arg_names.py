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
    names = arg_names.swift_argument_names()
    assert names == arg_names.read_from_swift()
    assert {"learning_rate", "teacher_model", "gkd_logits_topk"} <= names

    (cached,) = (tmp_path / arg_names.FOLDER).glob("*.json")
    assert cached.stem == arg_names.swift_fingerprint()
    assert json.loads(cached.read_text()) == sorted(names)

    cached.write_text(json.dumps([*sorted(names), "planted_name"]))  # the next call reads the file
    assert "planted_name" in arg_names.swift_argument_names()

    cached.write_text("{not json")  # a damaged file is rebuilt from ms-swift
    assert arg_names.swift_argument_names() == names
    assert json.loads(cached.read_text()) == sorted(names)
