"""`release_process_group`: a real one-rank Gloo group is destroyed, and a second call is a no-op."""

from __future__ import annotations

import torch.distributed as dist

from kdcompose.training.process_group import release_process_group


def test_an_initialized_group_is_destroyed_and_a_second_call_does_nothing(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert release_process_group() is True
        assert not dist.is_initialized()
        assert release_process_group() is False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
