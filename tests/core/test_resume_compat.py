"""The exact-resume workarounds on their own: the epoch-replaying sampler, strict weight loading."""

from __future__ import annotations

import pytest
import torch

from kdcompose.compat import transformers_checkpoint_keys as checkpoint_keys
from kdcompose.compat import trl_repeat_sampler


def test_the_replaying_sampler_gives_each_epoch_the_uninterrupted_order():
    from trl.trainer.utils import RepeatSampler

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


def test_a_missing_trainable_weight_stops_the_resume(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    import safetensors.torch

    safetensors.torch.save_file(
        {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(checkpoint_keys.ResumeError, match=r"1\.weight"):
        checkpoint_keys.load_full_weights(model, tmp_path)
    safetensors.torch.save_file(
        {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}, tmp_path / "model.safetensors"
    )
    assert checkpoint_keys.load_full_weights(model, tmp_path) == 4
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in model.parameters())
