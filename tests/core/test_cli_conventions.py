"""The `kdcompose` command line's conventions, checked on the real parser and `main` in-process
(no ms-swift: nothing here reaches the preflight)."""

from __future__ import annotations

import argparse
import json

import pytest

import kdcompose
from kdcompose.cli import build_parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_bare_kdcompose_prints_help_and_succeeds(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kdcompose")
    for command in ("validate", "train", "schema", "teacher-cache", "serve-teacher"):
        assert command in out


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdcompose {kdcompose.__version__}"


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_each_command_describes_itself_its_exit_codes_and_environment(name):
    command = subcommands()[name]
    text = command.format_help()
    assert command.description and len(command.description) > 40
    assert "exit codes:\n  0  " in text
    assert "environment variables:\n  " in text
    for action in command._actions:
        assert action.help, f"kdcompose {name} {action.option_strings or action.dest} has no help"


def test_train_and_validate_document_the_variables_they_read():
    train = subcommands()["train"].format_help()
    for variable in (
        "NPROC_PER_NODE",
        "HF_HUB_OFFLINE",
        "KDCOMPOSE_TEACHER_SERVER_API_KEY",
        "KDCOMPOSE_DEBUG",
    ):
        assert variable in train
    assert "HF_HUB_OFFLINE" in subcommands()["validate"].format_help()


def test_set_is_repeatable_on_train_and_validate():
    parser = build_parser()
    args = parser.parse_args(["train", "c.yaml", "--set", "training.max_steps=2", "--set", "a.b=[1, 2]"])
    assert args.overrides == ["training.max_steps=2", "a.b=[1, 2]"]
    assert parser.parse_args(["validate", "c.yaml", "d.yaml"]).overrides == []


def test_validate_json_reports_errors_on_stdout_and_stderr(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "rlhf:\n  llm_kd_weight: -1\n  loss_terms:\n    ce: {weight: 1, on_student_generated: 'yes'}\n"
    )
    assert main(["validate", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["ok"] is False
    assert {e["path"] for e in payload["errors"]} == {
        "rlhf.llm_kd_weight",
        "rlhf.loss_terms.ce.on_student_generated",
    }
    assert all(set(e) == {"path", "message"} for e in payload["errors"])
    assert "rlhf.llm_kd_weight" in captured.err


def test_validate_json_reports_a_bad_override(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("rlhf:\n  llm_kd_weight: 0.5\n")
    assert main(["validate", str(path), "--json", "--set", "rlhf.loss_terms.ce.weight=-2"]) == 2
    (error,) = json.loads(capsys.readouterr().out)["errors"]
    assert error["path"] == "rlhf.loss_terms.ce.weight"
    assert error["message"].endswith("(from --set rlhf.loss_terms.ce.weight=-2)")


def test_overrides_travel_with_a_multi_process_relaunch(monkeypatch):
    """With NPROC_PER_NODE, `kdcompose train` re-launches itself per process: the --set options
    must reach every process, or the ranks would train another config than the one validated."""
    from kdcompose.integrations.swift.launch.command import _torchrun_command

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    command = _torchrun_command("cfg.yaml", ["training.max_steps=2", "rlhf.loss_terms.ce.weight=0"])
    assert command is not None
    tail = command[command.index("kdcompose.cli") :]
    assert tail == [
        "kdcompose.cli",
        "train",
        "cfg.yaml",
        "--set",
        "training.max_steps=2",
        "--set",
        "rlhf.loss_terms.ce.weight=0",
    ]


def test_a_one_node_relaunch_without_master_port_takes_a_free_port_not_29500(monkeypatch):
    """Two `NPROC_PER_NODE=2 kdcompose train` jobs on one machine must not share torchrun's fixed
    default rendezvous port; an explicit MASTER_PORT is passed on as given."""
    import socket

    from kdcompose.integrations.swift.launch.command import _torchrun_command

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("NNODES", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    command = _torchrun_command("cfg.yaml")
    assert command is not None and command.count("--master_port") == 1
    port = int(command[command.index("--master_port") + 1])
    assert port != 29500
    with socket.socket() as sock:  # free when chosen: binding it works
        sock.bind(("127.0.0.1", port))
    monkeypatch.setenv("MASTER_PORT", "31337")
    command = _torchrun_command("cfg.yaml")
    assert command[command.index("--master_port") + 1] == "31337" and command.count("--master_port") == 1
