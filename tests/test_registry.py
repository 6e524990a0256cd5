"""The term registry: decorators, lookups, and plugins through the entry-point group."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kdcompose import LossContext, LossTerm, TermNeeds, UnknownTermError, get_term_class, register_term
from kdcompose.registry import registered_terms, unregister_term

REPO = Path(__file__).resolve().parents[1]


class _Term(LossTerm):
    @property
    def needs(self) -> TermNeeds:
        return TermNeeds()

    def compute(self, ctx: LossContext) -> torch.Tensor:
        return torch.zeros(())


def test_bare_decorator_uses_the_class_name_and_keyed_uses_the_key():
    class bare_term_for_test(_Term):
        pass

    try:
        register_term(bare_term_for_test)
        assert get_term_class("bare_term_for_test") is bare_term_for_test
        register_term("keyed_term_for_test")(_Term)
        assert get_term_class("keyed_term_for_test") is _Term
        assert _Term.type_name == "keyed_term_for_test"
    finally:
        unregister_term("bare_term_for_test")
        unregister_term("keyed_term_for_test")


def test_a_key_cannot_be_taken_twice_by_different_classes():
    class Other(_Term):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_term("lm_jsd")(Other)


def test_only_loss_terms_and_identifier_keys_register():
    with pytest.raises(TypeError):
        register_term("not_a_term")(dict)
    with pytest.raises(ValueError, match="identifier"):
        register_term("bad-key")(_Term)


def test_unknown_lookup_lists_what_is_registered():
    with pytest.raises(UnknownTermError) as info:
        get_term_class("nope")
    message = str(info.value)
    assert all(name in message for name in ("ce", "lm_jsd", "visual_kd"))


def test_builtins_are_registered():
    assert {"lm_jsd", "ce", "visual_kd"} <= registered_terms().keys()


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
