"""Every upstream workaround in `kdcompose.compat`: still needed, and still working.

Each test fails when the upstream behaviour it works around has changed -- then the workaround
can go (or must be redone), and the failure message says which. The "still works" half of each
is shown end to end elsewhere (named in each test); the checks here are the cheap, direct ones.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from kdcompose.compat import swift_argv, swift_gkd_step, swift_teacher_client, transformers_checkpoint_keys
from kdcompose.compat.trl_repeat_sampler import EpochReplaySampler, make_epoch_replayable
from kdcompose.testing import build_tiny_model

pytestmark = [pytest.mark.swift, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_transformers_still_drops_hub_layout_keys_and_the_mapping_restores_them(tmp_path):
    """transformers writes checkpoints in the hub key layout and its Trainer loads them with
    `strict=False`, restoring nothing (end to end: tests/test_exact_resume.py)."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(build_tiny_model("qwen2_vl", "student"))
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    result = model.load_state_dict(saved, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(result.missing_keys) & trainable, (
        "transformers now saves checkpoints in the loaded model's own key layout (or loads them back "
        "through its weight conversion): compat.transformers_checkpoint_keys may no longer be needed"
    )
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert transformers_checkpoint_keys.load_full_weights(model, tmp_path) == len(saved)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], msg=key)


def test_trl_repeat_sampler_still_has_no_set_epoch_and_the_mixin_adds_it():
    """TRL's sampler draws epochs from a generator seeded once (end to end: tests/test_exact_resume.py)."""
    from trl.trainer.utils import RepeatSampler

    assert not hasattr(RepeatSampler, "set_epoch"), (
        "TRL's RepeatSampler has set_epoch now: compat.trl_repeat_sampler may no longer be needed"
    )
    sampler = make_epoch_replayable(RepeatSampler(list(range(8)), mini_repeat_count=1, batch_size=2, seed=3))
    assert isinstance(sampler, EpochReplaySampler)
    first, second = list(sampler), list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == second != first


def test_accelerate_skip_wrapper_still_does_not_forward_set_epoch():
    """A resumed epoch's sampler must start in that epoch (end to end, 2 ranks:
    the DDP scenario of tests/swift/test_preemption.py)."""
    from accelerate.data_loader import SkipBatchSampler

    assert not hasattr(SkipBatchSampler, "set_epoch"), (
        "accelerate's SkipBatchSampler forwards set_epoch now: the start-epoch part of "
        "compat.trl_repeat_sampler may no longer be needed"
    )


def test_gkd_still_reads_its_micro_batch_counter():
    """ms-swift picks the generation batch's slice by `_step`, which a resumed run starts at 0."""
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer

    source = inspect.getsource(GKDTrainer._prepare_inputs)
    assert "self._step" in source, "GKDTrainer no longer indexes its buffer by _step: compat.swift_gkd_step"

    from types import SimpleNamespace

    fake = SimpleNamespace(
        _step=0, _buffered_inputs=["stale"], args=SimpleNamespace(gradient_accumulation_steps=3)
    )
    swift_gkd_step.restore_micro_batch_counter(fake, global_step=4)
    assert fake._step == 12 and fake._buffered_inputs is None


def test_hf_argument_parser_still_holds_the_locals_the_plugin_reads():
    """The plugin takes its flags out of the parse in progress (end to end: tests/test_swift_launcher.py)."""
    from transformers import HfArgumentParser

    code = HfArgumentParser.parse_args_into_dataclasses.__code__
    assert {"args", "remaining_args"} <= set(code.co_varnames), (
        "HfArgumentParser.parse_args_into_dataclasses changed its locals: compat.swift_argv must be redone"
    )
    assert swift_argv.find_parse_in_progress() is None, "no parse is in progress in a test"


def test_swift_teacher_client_still_needs_vllm_and_ours_is_installed_in_its_place():
    """ms-swift's client refuses to start without vLLM (end to end: tests/test_teacher_server.py)."""
    from swift.rlhf_trainers import rollout_mixin
    from swift.rlhf_trainers.vllm_client import VLLMInferClient

    if swift_teacher_client.vllm_available():
        pytest.skip("vLLM is installed here: ms-swift's own client works and is left alone")
    with pytest.raises(ImportError, match="vLLM"):
        VLLMInferClient(base_urls=["http://127.0.0.1:9"])
    previous = rollout_mixin.VLLMInferClient
    try:
        assert swift_teacher_client.install_vllm_free_teacher_client() is True
        assert rollout_mixin.VLLMInferClient is not VLLMInferClient
    finally:
        rollout_mixin.VLLMInferClient = previous


def test_deepspeed_still_has_the_overflow_path_the_skip_uses():
    """`on_nonfinite: skip_step` under ZeRO skips through DeepSpeed's overflow path (end to end:
    tests/test_engines_deepspeed.py)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert callable(getattr(DeepSpeedZeroOptimizer, "check_overflow", None))
    assert callable(getattr(DeepSpeedZeroOptimizer_Stage3, "_overflow_check_and_loss_scale_update", None))


def test_swift_still_announces_self_distillation_and_the_filter_drops_only_that(tmp_path):
    """A cache as the teacher sets no teacher_model: ms-swift would announce self-distillation."""
    import logging

    from swift.arguments.rlhf_args import RLHFArguments
    from swift.utils import get_logger

    from kdcompose.compat.swift_self_distillation_notice import NOTICE, without_self_distillation_notice

    source = inspect.getsource(RLHFArguments._check_teacher)
    assert NOTICE in source, "ms-swift no longer logs the self-distillation notice: the filter can go"
    logger, seen = get_logger(), []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    catch = Catch()
    logger.addHandler(catch)
    try:
        with without_self_distillation_notice():
            logger.info(NOTICE + " (teacher = student).")
            logger.info("another line")
    finally:
        logger.removeHandler(catch)
    assert seen == ["another line"]


def test_the_replaying_sampler_gives_each_epoch_the_uninterrupted_order():
    from trl.trainer.utils import RepeatSampler

    from kdcompose.compat import trl_repeat_sampler

    data = list(range(10))
    whole = RepeatSampler(data, mini_repeat_count=1, batch_size=2, repeat_count=1, shuffle=True, seed=7)
    trl_repeat_sampler.make_epoch_replayable(whole)
    epochs = []
    for epoch in range(3):
        whole.set_epoch(epoch)
        epochs.append(list(whole))
    stock = RepeatSampler(data, mini_repeat_count=1, batch_size=2, repeat_count=1, shuffle=True, seed=7)
    assert epochs == [list(stock) for _ in range(3)], "same order as stock in an uninterrupted run"
    resumed = trl_repeat_sampler.make_epoch_replayable(
        RepeatSampler(data, mini_repeat_count=1, batch_size=2, repeat_count=1, shuffle=True, seed=7)
    )
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
    assert epochs[0] != epochs[2]
