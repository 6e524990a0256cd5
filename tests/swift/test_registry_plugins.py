"""Terms from entry points and the documented example, in child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _fake_distribution(root: Path, entry: str) -> None:
    pkg = root / "kd_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            import torch
            from kdcompose import LossTerm, TermNeeds, TermSpec

            class ZeroSpec(TermSpec):
                scale: float = 1.0

            class PluginTerm(LossTerm):
                spec_class = ZeroSpec

                @property
                def needs(self):
                    return TermNeeds(student_logits=True)

                def compute(self, ctx):
                    return ctx.student_logits.float().pow(2).mean() * self.spec.scale
            """
        )
    )
    dist = root / "kd_plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kd-plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[kdcompose.terms]\n{entry}\n")


@pytest.mark.swift
def test_entry_point_plugin_term_is_usable_from_yaml(tmp_path):
    _fake_distribution(tmp_path, "plugin_sq = kd_plugin_pkg:PluginTerm")
    script = textwrap.dedent(
        """
        from kdcompose import build_composer, parse_config
        c = parse_config({"rlhf": {"loss_terms": {"plugin_sq": {"weight": 0.5, "scale": 2.0}}}})
        print(build_composer(c.composition).formula())
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "0.5*plugin_sq" in result.stdout


@pytest.mark.swift
def test_broken_entry_point_names_the_plugin(tmp_path):
    _fake_distribution(tmp_path, "broken = kd_plugin_pkg:DoesNotExist")
    script = "from kdcompose import get_term_class\nget_term_class('broken')\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode != 0
    assert "broken" in result.stderr and "kdcompose.terms" in result.stderr


@pytest.mark.swift
def test_documented_custom_term_example_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "custom_term.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Loss = 0.5*lm_jsd(beta=0.5, T=0.9) + 0.1*logit_mse(T=2)"
    values = dict(line.split(" = ") for line in lines[1:])
    total = float(values.pop("loss"))
    assert set(values) == {"llm_kd_loss", "logit_mse_loss"}
    assert abs(sum(map(float, values.values())) - total) < 1e-5
