"""The tests' forked `kdcompose` commands (`tests/support/forked_cli.py`) behave as a fresh
`python -m kdcompose.cli` does: exit status, both output streams, the environment and working
directory they are given (not the server's), and a bounded wait."""

from __future__ import annotations

import os
import subprocess

import pytest
from forked_cli import run_cli

import kdcompose

pytestmark = pytest.mark.swift


def test_exit_status_output_and_working_directory_are_the_commands(tmp_path):
    env = dict(os.environ)
    version = run_cli(["--version"], env)
    assert (version.returncode, version.stdout.strip()) == (0, f"kdcompose {kdcompose.__version__}")

    (tmp_path / "bad.yaml").write_text("rlhf:\n  loss_terms:\n    ce: {weight: -1}\n")
    bad = run_cli(["validate", "bad.yaml"], env, cwd=tmp_path)  # relative: found in `cwd`
    assert bad.returncode == 2 and "rlhf.loss_terms.ce.weight" in bad.stderr, bad.stderr
    assert bad.stdout == ""


def test_each_command_sees_the_environment_it_is_given_and_nothing_else(tmp_path):
    """A plug-in file prints a variable when the command imports it: each command sees its own
    value, a command given none sees none (not the previous command's, not the server's)."""
    (tmp_path / "probe.py").write_text("import os\nprint('SEEN', os.environ.get('KD_FORK_PROBE'))\n")
    (tmp_path / "cfg.yaml").write_text(f"plugins: [{tmp_path / 'probe.py'}]\n")
    seen = []
    for value in ("first", "second", None):
        env = {k: v for k, v in os.environ.items() if k != "KD_FORK_PROBE"}
        if value is not None:
            env["KD_FORK_PROBE"] = value
        result = run_cli(["validate", str(tmp_path / "cfg.yaml")], env)  # imports the plug-in first
        seen += [line for line in result.stdout.splitlines() if line.startswith("SEEN")]
    assert seen == ["SEEN first", "SEEN second", "SEEN None"]


def test_a_command_past_its_timeout_is_killed():
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli(["demo", "--output-dir", os.devnull + "-never"], dict(os.environ), timeout=0.5)
    assert run_cli(["--version"], dict(os.environ)).returncode == 0  # the server serves on
