"""Run only a VLM's vision encoder, when the only thing a term reads from the teacher is there.

Visual feature KD reads the teacher's vision tower / aligner / deepstack outputs; running the
teacher's language model for it would cost a full forward for nothing. Hugging Face VLMs
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL and most others) expose the encoder alone as
`get_image_features` / `get_video_features`, which run exactly the modules a full forward runs
for the same pixels, so the taps record the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def encode_vision_only(model: nn.Module, forward_inputs: Mapping[str, Any]) -> bool:
    """Run `model`'s vision encoder on the batch's images or videos; False when that cannot
    reproduce what a full forward records (the caller then runs the full forward). A text-only
    batch has nothing to encode: True, nothing runs. `model` is the bare (unwrapped) model."""
    images = forward_inputs.get("pixel_values")
    videos = forward_inputs.get("pixel_values_videos")
    if images is not None and videos is not None:
        return False  # a full forward may encode both in one vision call; keep its call pattern
    if images is not None:
        encode = getattr(model, "get_image_features", None)
        if encode is None:
            return False
        encode(pixel_values=images, image_grid_thw=forward_inputs.get("image_grid_thw"))
    elif videos is not None:
        encode = getattr(model, "get_video_features", None)
        if encode is None:
            return False
        encode(pixel_values_videos=videos, video_grid_thw=forward_inputs.get("video_grid_thw"))
    return True


__all__ = ["encode_vision_only"]
