"""ModuleTaps on real tiny Qwen-VL models (built locally, random weights), tapping the modules
`visual_kd` reads: what is recorded, when, and through PEFT / DDP wrappers and checkpointing."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from kdcompose.compat import ensure_torchvision_importable
from kdcompose.errors import ConfigError
from kdcompose.terms.base import Tap
from kdcompose.terms.visual_kd import DEFAULT_TARGET_PATHS, EXPAND_CHILDREN
from kdcompose.testing.tiny_models import build_tiny_model
from kdcompose.testing.tokenizer import IMAGE_TOKEN_ID
from kdcompose.training.taps import ModuleTaps

pytestmark = pytest.mark.swift

ensure_torchvision_importable()


def _load(family: str, role: str = "student"):
    import transformers as tf

    classes = {
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
    }
    return classes[family].from_pretrained(build_tiny_model(family, role)).train()


@pytest.fixture(scope="module")
def qwen2_vl():
    return _load("qwen2_vl")


class Recorder:
    """The visual_kd targets of one model as `ModuleTaps`, read back by target name."""

    def __init__(self, model, targets: dict[str, str | None], *, detach: bool = False) -> None:
        self.taps = {
            name: Tap(
                "student",
                module or DEFAULT_TARGET_PATHS[name],
                children=not module and name in EXPAND_CHILDREN,
            )
            for name, module in targets.items()
        }
        self.module_taps = ModuleTaps(model, self.taps.values(), detach=detach)
        self.hooked = self.module_taps.hooked

    def recording(self):
        return self.module_taps.recording()

    def features(self) -> dict[str, list[torch.Tensor]]:
        recorded = self.module_taps.recorded()
        return {name: recorded[tap] for name, tap in self.taps.items()}


@contextmanager
def FeatureRecorder(model, targets: dict[str, str | None], *, detach: bool = False) -> Iterator[Recorder]:
    recorder = Recorder(model, targets, detach=detach)
    try:
        yield recorder
    finally:
        recorder.module_taps.close()


def _inputs(model, grid=(1, 4, 4)):
    """One image of grid t*h*w patches, merged 2x2 -> t*h*w/4 image tokens."""
    cfg = model.config.vision_config
    t, h, w = grid
    patches = t * h * w
    merged = patches // 4
    channels = getattr(cfg, "in_channels", getattr(cfg, "in_chans", 3))
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(patches, channels * cfg.temporal_patch_size * cfg.patch_size**2, generator=gen)
    ids = torch.tensor([[11, 12, 151652] + [IMAGE_TOKEN_ID] * merged + [151653, 13, 14]])
    return {
        "input_ids": ids,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([list(grid)]),
        "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).long(),
    }


def test_records_only_inside_recording_and_clears(qwen2_vl):
    inputs = _inputs(qwen2_vl)
    with FeatureRecorder(qwen2_vl, {"vit": None, "aligner": None}) as recorder:
        qwen2_vl(**inputs)  # outside recording: e.g. on-policy generation
        assert recorder.features() == {"vit": [], "aligner": []}
        with recorder.recording():
            qwen2_vl(**inputs)
            features = recorder.features()
        assert recorder.features() == {"vit": [], "aligner": []}, "records must not outlive the step"
    vit, aligner = features["vit"], features["aligner"]
    assert len(vit) == len(aligner) == 1
    assert vit[0].shape == (16, qwen2_vl.config.vision_config.embed_dim)  # pre-merger patches
    assert aligner[0].shape == (4, qwen2_vl.config.text_config.hidden_size)  # merged tokens the LM sees
    assert vit[0].requires_grad and aligner[0].requires_grad


def test_recorded_aligner_feature_is_the_merger_output(qwen2_vl):
    inputs = _inputs(qwen2_vl)
    with FeatureRecorder(qwen2_vl, {"aligner": None}) as recorder, recorder.recording():
        qwen2_vl(**inputs)
        recorded = recorder.features()["aligner"][0]
    direct = qwen2_vl.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    torch.testing.assert_close(recorded, direct)


def test_teacher_recorder_detaches(qwen2_vl):
    with FeatureRecorder(qwen2_vl, {"aligner": None}, detach=True) as recorder, recorder.recording():
        qwen2_vl(**_inputs(qwen2_vl))
        assert not recorder.features()["aligner"][0].requires_grad


def test_hooks_are_removed_on_close_and_on_exception(qwen2_vl):
    merger = qwen2_vl.model.visual.merger
    before = len(merger._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"), FeatureRecorder(qwen2_vl, {"aligner": None}) as recorder:
        assert len(merger._forward_hooks) == before + 1
        with recorder.recording():
            raise RuntimeError("boom")
    assert len(merger._forward_hooks) == before
    assert recorder.features()["aligner"] == []


def test_missing_module_lists_the_vision_modules_that_exist(qwen2_vl):
    with pytest.raises(ConfigError) as info:
        Recorder(qwen2_vl, {"aligner": "model.visual.mergr"})
    message = str(info.value)
    assert "model.visual.mergr" in message
    assert "model.visual.merger" in message, "the closest module names are suggested"
    assert not qwen2_vl.model.visual.merger._forward_hooks, "a failed construction must leave no hook"


def test_module_override_is_used(qwen2_vl):
    with FeatureRecorder(qwen2_vl, {"vit": "model.visual.blocks.0"}) as recorder, recorder.recording():
        qwen2_vl(**_inputs(qwen2_vl))
        assert [h.name for h in recorder.hooked] == ["model.visual.blocks.0"]
        assert len(recorder.features()["vit"]) == 1


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_recompute_is_not_recorded_and_values_match(reentrant):
    model = _load("qwen2_vl")
    inputs = _inputs(model)
    values = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        hooked = "model.language_model.layers.1"  # checkpointed: reentrant mode runs it again in backward
        with FeatureRecorder(model, {"vit": hooked}) as recorder:
            with recorder.recording():
                out = model(**inputs)
                feature = recorder.features()["vit"]
            calls: list[int] = []
            handle = model.get_submodule(hooked).register_forward_hook(lambda *a, c=calls: c.append(1))
            out.logits.float().pow(2).mean().backward()
            handle.remove()
            assert recorder.features()["vit"] == []
        assert len(feature) == 1, "exactly the loss forward's call is kept"
        values.append(feature[0].detach().clone())
        if checkpointing and reentrant:
            assert calls, "reentrant checkpointing recomputes the layer during backward (hook fires again)"
    torch.testing.assert_close(values[0], values[1])


def test_peft_lora_student_resolves_its_paths(qwen2_vl):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(_load("qwen2_vl"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with FeatureRecorder(lora, {"aligner": None}) as recorder, recorder.recording():
        lora(**_inputs(qwen2_vl))
        # `base_model.model.model.visual.merger`; once ms-swift has loaded a Qwen-VL model in this
        # process it adds a `visual` property to the class (its transformers-5 compat), and PEFT's
        # attribute forwarding then resolves `model.visual.merger` first: the same module.
        assert lora.get_submodule(recorder.hooked[0].name) is lora.base_model.model.model.visual.merger
        assert len(recorder.features()["aligner"]) == 1


def test_ddp_wrapped_model_resolves_its_paths(qwen2_vl):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(_load("qwen2_vl"), find_unused_parameters=True)
        with FeatureRecorder(ddp, {"aligner": None}) as recorder, recorder.recording():
            ddp(**_inputs(qwen2_vl))
            assert recorder.hooked[0].name == "module.model.visual.merger"
            assert len(recorder.features()["aligner"]) == 1
    finally:
        dist.destroy_process_group()


def test_qwen3_vl_deepstack_hooks_every_merger():
    model = _load("qwen3_vl")
    mergers = list(model.model.visual.deepstack_merger_list)
    assert mergers, "the tiny Qwen3-VL must have deepstack mergers"
    with FeatureRecorder(model, {"deepstack": None, "aligner": None}) as recorder, recorder.recording():
        model(**_inputs(model, grid=(1, 4, 4)))
        features = recorder.features()
    assert len(features["deepstack"]) == len(mergers)
    assert len(features["aligner"]) == 1
