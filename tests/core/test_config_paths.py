"""The path rule: every path kdcompose owns (`plugins`, `rlhf.teacher_cache`,
`rlhf.teachers.*.cache`) is read from the config file's folder, whatever the working
directory, and messages show it as an absolute path."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcompose import build_composer, load_config
from kdcompose.errors import ConfigError
from kdcompose.teachers.sources import cache_issues

CONFIG = """\
rlhf:
  teacher_cache: caches/top64
  teachers:
    other: {cache: ../shared/top8}
    remote: {server: http://127.0.0.1:9}
  loss_terms:
    lm_jsd: {topk: 8}
"""


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The config lives in tmp/project/configs; kdcompose runs from tmp/somewhere/else."""
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    cwd = tmp_path / "somewhere" / "else"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    return folder


def test_cache_folders_resolve_from_the_config_folder(elsewhere):
    path = elsewhere / "train.yaml"
    path.write_text(CONFIG)
    config = load_config(Path("../../project/configs/train.yaml"))  # a relative config path, too
    assert config.teachers[""].location == str(elsewhere / "caches" / "top64")
    assert config.teachers["other"].location == str(elsewhere.parent / "shared" / "top8")
    assert config.teachers["remote"].location == "http://127.0.0.1:9"  # URLs are not paths


def test_a_missing_cache_is_named_by_its_absolute_path(elsewhere):
    path = elsewhere / "train.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    issues = cache_issues(config.teachers, build_composer(config.composition))
    messages = {issue.path: issue.message for issue in issues}
    assert messages["rlhf.teacher_cache"].startswith(
        f"{elsewhere / 'caches' / 'top64'} is not a teacher cache"
    )
    assert str(elsewhere.parent / "shared" / "top8") in messages["rlhf.teachers.other.cache"]


def test_plugins_resolve_from_the_config_folder_and_a_missing_one_is_named_absolutely(elsewhere):
    (elsewhere / "terms").mkdir()
    (elsewhere / "terms" / "noop.py").write_text("LOADED = True\n")
    path = elsewhere / "train.yaml"
    path.write_text("plugins: [terms/noop.py, terms/missing.py]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.paths == ("plugins.1",)
    assert str(elsewhere / "terms" / "missing.py") in caught.value.issues[0].message


def test_a_home_relative_cache_is_expanded(elsewhere, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = elsewhere / "train.yaml"
    path.write_text("rlhf:\n  teacher_cache: ~/c\n  loss_terms:\n    lm_jsd: {topk: 8}\n")
    assert load_config(path).teachers[""].location == str(tmp_path / "c")
