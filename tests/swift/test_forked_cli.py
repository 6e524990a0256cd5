"""The tests' forked `kdcompose` commands (`tests/support/forked_cli.py`) behave as a fresh
`python -m kdcompose.cli` does: exit status, both output streams, the environment and working
directory they are given (not the server's), a process group (or session) of their own, several at
once, and a bounded wait that leaves no process of the command behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import forked_cli
import psutil
import pytest
from forked_cli import run_cli, start_cli

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

    started = start_cli(["validate", "nope.yaml"], env, stdout=tmp_path / "out", stderr=tmp_path / "err")
    deadline = time.monotonic() + 60
    while started.poll() is None:  # `poll` alone sees it end, as `Popen.poll` does
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert started.returncode == 2 and "nope.yaml" in (tmp_path / "err").read_text()


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


def _blocking_config(tmp_path, gate):
    """A config whose plug-in waits until the file `gate` exists (`validate` imports it first)."""
    plugin = tmp_path / "wait_for_gate.py"
    plugin.write_text(
        f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
        "    time.sleep(0.02)\nprint('GATE OPEN')\n"
    )
    rlhf = "rlhf: {llm_kd_weight: 0, loss_terms: {ce: {}}}"  # valid without a teacher
    (tmp_path / "cfg.yaml").write_text(f"plugins: [{plugin}]\n{rlhf}\n")
    return tmp_path / "cfg.yaml"


def test_commands_run_at_once_each_in_a_group_or_session_of_its_own(tmp_path):
    gate = tmp_path / "gate"
    config = _blocking_config(tmp_path, gate)
    env = dict(os.environ)
    waiting = start_cli(["validate", str(config)], env, stdout=tmp_path / "a.out", stderr=tmp_path / "a.err")
    own_session = start_cli(
        ["validate", str(config)], env, stdout=tmp_path / "b.out", stderr=tmp_path / "b.err", new_session=True
    )
    try:
        assert all((tmp_path / name).exists() for name in ("a.out", "a.err", "b.out", "b.err"))
        assert os.getpgid(waiting.pid) == waiting.pid and os.getsid(waiting.pid) != waiting.pid
        assert os.getsid(own_session.pid) == own_session.pid
        assert run_cli(["--version"], env).returncode == 0  # served while the other two wait
        assert waiting.poll() is None and own_session.poll() is None
    finally:
        gate.write_text("open")
    assert waiting.wait(60) == 0 and own_session.wait(60) == 0
    for name in ("a.out", "b.out"):
        assert "GATE OPEN" in (tmp_path / name).read_text()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_command_past_its_timeout_is_killed_with_what_it_started(tmp_path):
    """A command that started a process of its own and waits: the timeout ends both (as a
    `kdcompose demo` ends with its two training runs)."""
    pid_file = tmp_path / "child.pid"
    plugin = tmp_path / "spawn_and_wait.py"
    plugin.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    (tmp_path / "cfg.yaml").write_text(f"plugins: [{plugin}]\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli(["validate", str(tmp_path / "cfg.yaml")], dict(os.environ), timeout=8)
    assert pid_file.exists(), "the command had not started its child within the timeout"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 60
    while _alive(child):
        assert time.monotonic() < deadline, "the command's child outlived the timeout"
        time.sleep(0.05)
    assert run_cli(["--version"], dict(os.environ)).returncode == 0  # the server serves on


PROBE = """
import json, os, signal, subprocess, sys, time
record = {"pid": os.getpid(), "ppid": os.getppid(), "executable": sys.executable}
with open(os.environ["PROBE_OUT"] + ".part", "w") as sink:
    json.dump(record, sink)
os.rename(os.environ["PROBE_OUT"] + ".part", os.environ["PROBE_OUT"])
mode = os.environ["PROBE_MODE"]
if mode == "exit 3":
    os._exit(3)
if mode == "killed by SIGTERM":
    os.kill(os.getpid(), signal.SIGTERM)
if mode == "SIGTERM ends with 7":
    signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
if mode == "start the probe":
    os.environ.update(PROBE_MODE="exit 3", PROBE_OUT=os.environ["PROBE_OUT"] + ".inner")
    code = subprocess.run([sys.executable, "-m", "kdcompose.cli", "validate", sys.argv[-1]]).returncode
    os._exit(10 + code)
time.sleep(600)
"""


def _probe_config(tmp_path: Path) -> Path:
    """A config whose plug-in is `PROBE` (`validate` imports it first)."""
    config = tmp_path / "probe.yaml"
    if not config.exists():
        (tmp_path / "probe.py").write_text(PROBE)
        config.write_text(f"plugins: [{tmp_path / 'probe.py'}]\n")
    return config


def _probe(tmp_path, python, env, mode, **extra):
    """`PYTHON -m kdcompose.cli validate` of a config whose plug-in records its pid and parent and
    then does `mode`; the started process and the record."""
    config = _probe_config(tmp_path)
    out = tmp_path / f"{mode}.json"
    process = subprocess.Popen(
        [python, "-m", "kdcompose.cli", "validate", str(config)],
        env={**env, "PROBE_MODE": mode, "PROBE_OUT": str(out), **extra},
    )
    deadline = time.monotonic() + 120
    while not out.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"{mode}: no record"
        time.sleep(0.05)
    return process, json.loads(out.read_text())


def test_the_stand_in_python_forks_the_command_and_ends_as_it_ends(tmp_path):
    """`forked_cli.python()`: the command runs in a process forked from the server (not in the
    stand-in, not in a fresh interpreter), with the stand-in as its `sys.executable`; the stand-in
    passes signals on, ends with the command's status or signal, and takes the command with it."""
    python, env = forked_cli.python(dict(os.environ))
    server = None
    for mode, expected in (("exit 3", 3), ("killed by SIGTERM", -signal.SIGTERM)):
        process, record = _probe(tmp_path, python, env, mode)
        assert process.wait(120) == expected, mode
        assert process.pid not in (record["pid"], record["ppid"]), "run in the stand-in, not forked"
        assert "forked_cli.py" in " ".join(psutil.Process(record["ppid"]).cmdline())
        assert record["executable"] == python
        assert server in (None, record["ppid"])
        server = record["ppid"]

    process, record = _probe(tmp_path, python, env, "SIGTERM ends with 7")
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 7

    process, record = _probe(tmp_path, python, env, "sleep")
    process.kill()
    deadline = time.monotonic() + 60
    while _alive(record["pid"]):
        assert time.monotonic() < deadline, "the command outlived its killed stand-in"
        time.sleep(0.05)


def test_a_changed_import_time_variable_gets_a_fresh_interpreter(tmp_path):
    python, env = forked_cli.python(dict(os.environ))
    process, record = _probe(tmp_path, python, env, "exit 3", HF_HOME=str(tmp_path / "hf"))
    assert process.wait(120) == 3
    assert record["pid"] == process.pid, "forked, though the hub reads HF_HOME once, at import"


def test_what_a_forked_command_starts_with_sys_executable_is_forked_too(tmp_path):
    config = _probe_config(tmp_path)
    out = tmp_path / "outer.json"
    env = {**os.environ, "PROBE_MODE": "start the probe", "PROBE_OUT": str(out)}
    outer = start_cli(["validate", str(config)], env, stdout=tmp_path / "out", stderr=tmp_path / "err")
    assert outer.wait(120) == 13, (tmp_path / "err").read_text()  # 10 + the inner command's 3
    inner = json.loads(Path(f"{out}.inner").read_text())
    assert inner["ppid"] == json.loads(out.read_text())["ppid"], "the inner command was not forked"


def test_the_stand_in_runs_code_and_scripts_as_python_does(tmp_path):
    """`-c CODE` and `SCRIPT` forked with `sys.argv` and `sys.path[0]` as Python sets them; an
    interpreter flag it does not copy (`-I`) runs the real interpreter."""
    python, env = forked_cli.python(dict(os.environ))
    show = "import json, os, sys; print(json.dumps([os.getpid(), os.getppid(), sys.argv, sys.path[0]]))"
    (tmp_path / "show.py").write_text(show)

    def ran(*args: str) -> list:
        process = subprocess.run([python, *args], env=env, capture_output=True, text=True, timeout=120)
        assert process.returncode == 0, process.stderr
        return json.loads(process.stdout)

    _, code_parent, code_argv, code_path = ran("-c", show, "x")
    _, script_parent, script_argv, script_path = ran(str(tmp_path / "show.py"), "a", "b")
    assert "forked_cli.py" in " ".join(psutil.Process(code_parent).cmdline())
    assert script_parent == code_parent
    assert (code_argv, code_path) == (["-c", "x"], "")
    assert (script_argv, script_path) == ([str(tmp_path / "show.py"), "a", "b"], str(tmp_path))
    _, fresh_parent, fresh_argv, _ = ran("-I", "-c", show, "y")
    assert fresh_parent == os.getpid() and fresh_argv == ["-c", "y"]
