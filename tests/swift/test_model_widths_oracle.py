"""The widths the preflight reads from config.json are the widths of the loaded modules.

Oracle: `kdcompose.training.projectors.tap_width`, which the trainer uses on the real modules after
loading (it reads `Linear` sizes, norm weights and module configs). For each tiny family of
`kdcompose.testing` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the config.json layouts of transformers
5.x), with a teacher whose vision tower is wider than the student's, every module path the
preflight answers for must give the loaded model's width; a path it calls impossible must not
exist in the loaded model. Marked swift: it loads transformers models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcompose.model_files import model_shape, tap_width
from kdcompose.terms.base import Tap
from kdcompose.testing import build_tiny_pair
from kdcompose.training.projectors import tap_width as loaded_width
from kdcompose.training.taps import TapNotFound, resolve_path

pytestmark = pytest.mark.swift

PATHS = [
    ("model.visual", "output", False),
    ("model.visual.merger", "output", False),
    ("model.visual.deepstack_merger_list", "output", True),
    ("model.visual.deepstack_merger_list.0", "output", False),
    ("model.visual.blocks.0", "output", False),
    ("model.visual.blocks.1", "output", False),
    ("model.language_model", "output", False),
    ("model.language_model.layers.0", "output", False),
    ("model.language_model.layers.1", "input", False),
    ("model.language_model.embed_tokens", "output", False),
    ("model.language_model.norm", "output", False),
    ("lm_head", "input", False),
    ("lm_head", "output", False),
]
IMPOSSIBLE = [
    "model.language_model.layers.3",
    "model.language_model.layers.-1",
    "model.visual.blocks.2",
    "model.layers.0",
    "model.visual.deepstack_merger_list.5",
]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def family(request):
    from transformers import AutoModelForImageTextToText

    teacher, student = build_tiny_pair(request.param, teacher={"vision_width": 48})
    loaded = {}
    for role, folder in (("teacher", teacher), ("student", student)):
        shape = model_shape(json.loads((Path(folder) / "config.json").read_text()))
        loaded[role] = (shape, AutoModelForImageTextToText.from_pretrained(folder))
    return request.param, loaded


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_config_widths_equal_the_loaded_modules(family, role):
    name, loaded = family
    shape, model = loaded[role]
    answered = 0
    for path, io, children in PATHS:
        found = tap_width(shape, path, io, children)
        if found.problem is not None:
            with pytest.raises(TapNotFound):
                module = resolve_path(model, path)[1]
                if children and not list(module.children()):
                    raise TapNotFound(path)
            continue
        if found.width is None:
            continue
        answered += 1
        expected = loaded_width(model, Tap("student", path, io=io, children=children))
        assert found.width == expected, (
            f"{name} {role} {path} ({io}): config says {found.width}, module {expected}"
        )
    assert answered >= 9


def test_impossible_modules_are_absent(family):
    name, loaded = family
    shape, model = loaded["student"]
    for path in IMPOSSIBLE:
        assert tap_width(shape, path).problem is not None, f"{name}: {path}"
        with pytest.raises(TapNotFound):
            resolve_path(model, path)
