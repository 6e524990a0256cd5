"""The exact-resume workarounds on their own: the epoch-replaying sampler, strict weight loading."""

from __future__ import annotations

import pytest
import torch

from kdcompose.compat import transformers_checkpoint_keys as checkpoint_keys


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
