"""Projector plans, widths, attaching and saving on the real tiny Qwen-VL models."""

from __future__ import annotations

import logging

import pytest
import torch

from kdcompose import build_composer, parse_config
from kdcompose.errors import ConfigError
from kdcompose.terms.base import Tap
from kdcompose.terms.visual_kd import DEFAULT_TARGET_PATHS, EXPAND_CHILDREN
from kdcompose.testing.tiny_models import build_tiny_model
from kdcompose.testing.tokenizer import IMAGE_TOKEN_ID
from kdcompose.training.projectors import (
    PROJECTOR_ATTR,
    PROJECTOR_FILE,
    LinearProjector,
    ProjectorPlan,
    attach_projectors,
    load_projectors,
    plan_projectors,
    projector_key,
    save_projectors,
    tap_width,
)
from kdcompose.training.taps import ModuleTaps

ALIGNER_PROJECTED = {"weight": 1.0, "aligner": {"distance": "mse", "projector": "linear"}}


def _visual_term(spec: dict, where: str = "loss_terms"):
    data = {"rlhf": {"llm_kd_weight": 0}}
    if where == "legacy":
        data["custom"] = {"visual_kd": spec}
    else:
        data["rlhf"]["loss_terms"] = {"visual_kd": spec}
    composer = build_composer(parse_config(data).composition)
    return composer, composer.term("visual_kd")


def _load(family: str, role: str):
    import transformers as tf

    classes = {
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
    }
    return classes[family].from_pretrained(build_tiny_model(family, role)).eval()


def _image_inputs(model) -> dict[str, torch.Tensor]:
    """One image of 4x4 patches (4 merged image tokens)."""
    cfg = model.config.vision_config
    channels = getattr(cfg, "in_channels", getattr(cfg, "in_chans", 3))
    pixels = torch.randn(16, channels * cfg.temporal_patch_size * cfg.patch_size**2)
    ids = torch.tensor([[11, 12, 151652] + [IMAGE_TOKEN_ID] * 4 + [151653, 13]])
    return {
        "input_ids": ids,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).long(),
    }


@pytest.fixture(scope="module")
def qwen2_vl_pair():
    return _load("qwen2_vl", "student"), _load("qwen2_vl", "teacher")


@pytest.mark.swift
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_widths_read_from_the_config_are_the_widths_recorded(family):
    targets = ["vit", "aligner"] + (["deepstack"] if family == "qwen3_vl" else [])
    for role in ("student", "teacher"):
        model = _load(family, role)
        taps = {target: _target_tap(target) for target in targets}
        recorder = ModuleTaps(model, taps.values())
        try:
            with torch.no_grad(), recorder.recording():
                model(**_image_inputs(model))
                recorded = recorder.recorded()
        finally:
            recorder.close()
        for target, tap in taps.items():
            assert recorded[tap], (family, role, target)
            widths = {t.shape[-1] for t in recorded[tap]}
            assert widths == {tap_width(model, tap)}, (family, role, target)


def _target_tap(target: str, module: str | None = None) -> Tap:
    """The student tap a `visual_kd` target reads (its default module, or a `module:` override)."""
    path = module or DEFAULT_TARGET_PATHS[target]
    return Tap("student", path, children=module is None and target in EXPAND_CHILDREN)


@pytest.mark.swift
def test_widths_of_a_module_override():
    model = _load("qwen2_vl", "student")
    assert tap_width(model, _target_tap("aligner", "model.visual.merger.mlp.2")) == 64  # a Linear
    assert tap_width(model, _target_tap("aligner", "model.visual.blocks.0")) == 32  # ends in a 32-wide Linear
    assert tap_width(model, _target_tap("aligner", "model.visual.merger.mlp.1")) is None  # an activation
    assert tap_width(model, _target_tap("aligner", "model.no.such.module")) is None


@pytest.mark.swift
def test_decoder_layer_widths_read_from_structure_are_the_widths_recorded(qwen2_vl_pair):
    from kdcompose.terms.base import Tap
    from kdcompose.training.projectors import tap_width
    from kdcompose.training.taps import ModuleTaps

    for model, width in zip(qwen2_vl_pair, (64, 96), strict=True):
        taps = [Tap("student", "model.language_model.layers.1"), Tap("student", "lm_head", io="input")]
        recorder = ModuleTaps(model, taps, detach=True)
        with torch.no_grad(), recorder.recording():
            model(**_image_inputs(model))
            recorded = recorder.recorded()
        recorder.close()
        for tap in taps:
            assert [t.shape[-1] for t in recorded[tap]] == [width]
            assert tap_width(model, tap) == width


@pytest.mark.swift
def test_plan_rejects_a_width_mismatch_without_projector_before_any_forward(qwen2_vl_pair):
    student, teacher = qwen2_vl_pair
    _, term = _visual_term({"weight": 1.0, "vit": {}, "aligner": {"distance": "mse"}})
    with pytest.raises(ConfigError) as info:
        plan_projectors(term.needs.pairs, student, teacher)
    assert info.value.paths == ("rlhf.loss_terms.visual_kd.aligner",)  # vit: 32 and 32, fine
    message = str(info.value)
    assert "64" in message and "96" in message and "projector" in message


@pytest.mark.swift
def test_plan_builds_what_the_targets_ask_for(qwen2_vl_pair):
    student, teacher = qwen2_vl_pair
    _, term = _visual_term({"weight": 1.0, "vit": {"projector": "linear"}, **ALIGNER_PROJECTED})
    plans = plan_projectors(term.needs.pairs, student, teacher)
    assert plans == [
        ProjectorPlan("visual_kd__aligner", "rlhf.loss_terms.visual_kd.aligner", "linear", 64, 96),
        ProjectorPlan("visual_kd__vit", "rlhf.loss_terms.visual_kd.vit", "linear", 32, 32),
    ]


@pytest.mark.swift
def test_plan_needs_widths_for_a_projector(qwen2_vl_pair):
    student, teacher = qwen2_vl_pair
    spec = {"aligner": {"module": "model.visual.merger.mlp.1", "projector": "linear"}}
    _, term = _visual_term(spec)
    with pytest.raises(ConfigError) as info:
        plan_projectors(term.needs.pairs, student, teacher)
    assert info.value.paths == ("rlhf.loss_terms.visual_kd.aligner.projector",)


@pytest.mark.swift
def test_attach_registers_the_projectors_on_the_student_and_keeps_them_out_of_its_weights(tmp_path):
    from safetensors import safe_open

    student = _load("qwen2_vl", "student")
    plan = ProjectorPlan("visual_kd__aligner", "rlhf.loss_terms.visual_kd.aligner", "linear", 64, 96)
    projectors = attach_projectors(student, [plan])
    module = projectors[plan.key]
    assert getattr(student, PROJECTOR_ATTR)[plan.key] is module
    assert any(p is module.weight for p in student.parameters()), "the optimizer must see it"
    assert attach_projectors(student, [plan])[plan.key] is module, "re-attaching keeps trained weights"

    student.save_pretrained(tmp_path / "student")
    with safe_open(str(tmp_path / "student" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(PROJECTOR_ATTR in k for k in keys), "the exported student stays plain"

    assert attach_projectors(student, []) == {}
    assert not hasattr(student, PROJECTOR_ATTR)
    assert not any(PROJECTOR_ATTR in k for k in (student._keys_to_ignore_on_save or []))


@pytest.mark.swift
def test_save_and_load_round_trip(tmp_path, caplog):
    plan = ProjectorPlan("visual_kd__aligner", "rlhf.loss_terms.visual_kd.aligner", "linear", 4, 6)
    trained = {plan.key: LinearProjector(4, 6)}
    with torch.no_grad():
        trained[plan.key].weight.normal_()
        trained[plan.key].bias.fill_(0.5)
    assert save_projectors(trained, tmp_path) == tmp_path / PROJECTOR_FILE
    fresh = {plan.key: LinearProjector(4, 6)}
    assert load_projectors(fresh, tmp_path)
    torch.testing.assert_close(fresh[plan.key].state_dict(), trained[plan.key].state_dict())

    with caplog.at_level(logging.WARNING, logger="kdcompose.training.projectors"):
        assert not load_projectors(fresh, tmp_path / "elsewhere")
    assert PROJECTOR_FILE in caplog.text
    with pytest.raises(ValueError, match="does not fit"):
        load_projectors({plan.key: LinearProjector(4, 8)}, tmp_path)


@pytest.mark.swift
def test_save_takes_the_gathered_trainer_state_dict_when_given(tmp_path):
    """Under ZeRO-3 the modules hold shards; the trainer's state dict holds the full weights."""
    key = projector_key("visual_kd", "aligner")
    full = {
        f"base_model.model.{PROJECTOR_ATTR}.{key}.weight": torch.full((6, 4), 2.0),
        f"base_model.model.{PROJECTOR_ATTR}.{key}.bias": torch.ones(6),
        "lm_head.weight": torch.zeros(3, 3),
    }
    save_projectors({key: LinearProjector(4, 6)}, tmp_path, state_dict=full)
    restored = {key: LinearProjector(4, 6)}
    load_projectors(restored, tmp_path)
    assert torch.equal(restored[key].weight, torch.full((6, 4), 2.0))


@pytest.mark.swift
def test_a_closed_recorder_hooks_only_for_a_recording_and_can_reopen(qwen2_vl_pair):
    student, _ = qwen2_vl_pair
    merger = student.model.visual.merger
    before = len(merger._forward_hooks)
    tap = _target_tap("aligner")
    recorder = ModuleTaps(student, [tap])
    recorder.close()
    assert len(merger._forward_hooks) == before
    with torch.no_grad(), recorder.recording():
        assert len(merger._forward_hooks) == before + 1
        student(**_image_inputs(student))
        assert len(recorder.recorded()[tap]) == 1
    assert len(merger._forward_hooks) == before, "a closed recorder leaves no hook after recording"
    recorder.open()
    recorder.open()
    assert len(merger._forward_hooks) == before + 1
    recorder.close()
    assert len(merger._forward_hooks) == before
