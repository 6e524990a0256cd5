"""`kdcompose validate` on malformed, oversized and fuzzed configs, as a subprocess."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from forked_cli import run_cli

from kdcompose.testing import build_tiny_pair

REPO = Path(__file__).resolve().parents[2]


def validate(path: Path) -> subprocess.CompletedProcess:
    """`kdcompose validate PATH` in a process of its own (`tests/support/forked_cli.py`)."""
    return run_cli(["validate", str(path)], dict(os.environ), timeout=60)


BASES = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").glob("*.yaml"))]


@pytest.mark.swift
def test_config_larger_than_the_limit_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("rlhf:\n  llm_kd_weight: 0.5\n" + "# padding\n" * 200_000)
    result = validate(path)
    assert result.returncode == 2
    assert "larger than" in result.stderr


@pytest.mark.swift
@pytest.mark.parametrize("seed", range(6))
def test_cli_never_prints_a_traceback_on_fuzzed_input(tmp_path, seed, capsys):
    """In-process (`kdcompose.cli.main`): an exception escaping the command fails the test just as
    a traceback on stderr would; the subprocess boundary is tested above."""
    import random

    from kdcompose.cli import main

    rng = random.Random(seed)
    config = copy.deepcopy(rng.choice(BASES))
    section = rng.choice(sorted(config))
    config[section] = rng.choice([[1, 2], "text", 3.5, {"llm_kd_weight": -1}, {"loss_terms": {"x": 1}}])
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2)
    assert "Traceback" not in err
    if code == 2:
        assert section in err


@pytest.mark.swift
def test_plugins_list_imports_terms_and_failures_name_the_entry(tmp_path):
    plugin = tmp_path / "my_terms.py"
    plugin.write_text(
        "import torch\n"
        "from kdcompose import LossTerm, TermNeeds, register_term\n"
        "@register_term('fuzz_plugin_term')\n"
        "class T(LossTerm):\n"
        "    @property\n"
        "    def needs(self):\n"
        "        return TermNeeds(student_logits=True)\n"
        "    def compute(self, ctx):\n"
        "        return ctx.student_logits.float().mean()\n"
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "plugins: [my_terms.py, no_such_module_xyz]\nrlhf:\n  loss_terms:\n    fuzz_plugin_term: {}\n"
    )
    result = validate(cfg)
    assert result.returncode == 2
    assert "plugins.1" in result.stderr and "no_such_module_xyz" in result.stderr
    assert "plugins.0" not in result.stderr
    teacher, _ = build_tiny_pair("qwen2_vl")
    cfg.write_text(
        f"plugins: [my_terms.py]\nrlhf:\n  teacher_model: {teacher}\n  teacher_model_type: qwen2_vl\n"
        "  loss_terms:\n    fuzz_plugin_term: {weight: 0.5}\n"
    )
    result = validate(cfg)
    assert result.returncode == 0, result.stderr
    assert "0.5*fuzz_plugin_term" in result.stdout
