"""Content keys for teacher-cache rows: one key per sample of a collated ms-swift batch.

Why a content hash: the training dataloader shuffles, a resumed run skips batches, and with
several ranks every process sees a different slice of the data, so neither a dataset index nor
a batch index finds a sample's cached teacher rows. What the teacher saw does: the sample's token
ids (without padding) and its image / video content. The cache builder and the training-time
reader both call :func:`sample_keys` on collated batches, so the key of a sample does not depend
on which batch it was in, its padding side, or the batch size.

Images: ms-swift's Qwen-VL templates concatenate the patches of every image of the batch into
one ``pixel_values`` tensor (``[patches, dim]``) with one ``image_grid_thw`` row per image, in the
order of the samples. A sample owns as many images as it needs to fill its image-placeholder
tokens (``image_token_id``); the placeholders of an image number ``prod(grid_thw) / merge``,
where ``merge`` (the spatial merge, 4 for Qwen2-VL) is recovered from the batch totals. Videos
work the same way with ``pixel_values_videos`` / ``video_grid_thw`` / ``video_token_id``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

QWEN_IMAGE_TOKEN_ID = 151655
"""ms-swift's Qwen-VL templates hard-code these placeholder ids (Qwen2-VL, 2.5-VL, 3-VL)."""
QWEN_VIDEO_TOKEN_ID = 151656
KEY_VERSION = b"kdcompose-teacher-cache-key/1"
KEY_BYTES = 16
"""Keys are the first 16 bytes (128 bits) of a SHA-256: collisions are out of reach for any dataset."""

_MODALITIES = (
    ("image", "pixel_values", "image_grid_thw"),
    ("video", "pixel_values_videos", "video_grid_thw"),
)


class SampleKeyError(ValueError):
    """A batch whose image/video content cannot be assigned to its samples."""


def unpadded_positions(model_inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    """For each row of the batch, the indices of its real (non-padding) tokens, in order.

    Uses ``attention_mask`` (left or right padding); without one every position is real.
    Packed / padding-free batches (one row holding several samples) are not supported.
    """
    input_ids = model_inputs["input_ids"]
    if input_ids.dim() != 2:
        raise SampleKeyError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    mask = model_inputs.get("attention_mask")
    if mask is None:
        return [torch.arange(input_ids.shape[1], device=input_ids.device) for _ in range(input_ids.shape[0])]
    if mask.shape != input_ids.shape:
        raise SampleKeyError(
            f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)} "
            "(packed / padding-free batches are not supported by the teacher cache)"
        )
    return [torch.nonzero(row, as_tuple=False).flatten() for row in mask.bool()]


def _media_slices(
    model_inputs: Mapping[str, Any],
    ids: list[torch.Tensor],
    pixels_key: str,
    grid_key: str,
    token_id: int,
    kind: str,
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per sample, the (grid row, pixel slice) pairs of its images (or videos)."""
    pixels = model_inputs.get(pixels_key)
    grid = model_inputs.get(grid_key)
    per_sample: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in ids]
    if pixels is None:
        return per_sample
    if grid is None:
        raise SampleKeyError(f"the batch has {pixels_key} but no {grid_key}: cannot split it by sample")
    grid = grid.reshape(-1, grid.shape[-1]).to("cpu", torch.int64)
    patches = grid.prod(dim=-1)
    if int(patches.sum()) != pixels.shape[0]:
        raise SampleKeyError(
            f"{grid_key} describes {int(patches.sum())} patches but {pixels_key} has {pixels.shape[0]} rows"
        )
    tokens = [int((row == token_id).sum()) for row in ids]
    total_tokens = sum(tokens)
    if total_tokens == 0 or int(patches.sum()) % total_tokens:
        raise SampleKeyError(
            f"the batch has {grid.shape[0]} {kind}(s) but {total_tokens} {kind} placeholder tokens "
            f"(id {token_id}) that do not divide its {int(patches.sum())} patches; pass the template's "
            f"{kind}_token_id to sample_keys"
        )
    merge = int(patches.sum()) // total_tokens
    starts = torch.cumsum(patches, 0) - patches
    item = 0
    for b, need in enumerate(tokens):
        while need > 0:
            if item >= grid.shape[0]:
                raise SampleKeyError(
                    f"sample {b} has more {kind} placeholder tokens than the batch has {kind}s"
                )
            n = int(patches[item]) // merge
            if n == 0 or n > need:
                raise SampleKeyError(f"{kind} {item} does not fit the placeholder tokens of sample {b}")
            start = int(starts[item])
            per_sample[b].append((grid[item], pixels[start : start + int(patches[item])]))
            need -= n
            item += 1
    if item != grid.shape[0]:
        raise SampleKeyError(f"{grid.shape[0] - item} {kind}(s) of the batch belong to no sample")
    return per_sample


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    return t.detach().to("cpu", dtype).contiguous().numpy().tobytes()


def sample_keys(
    model_inputs: Mapping[str, Any],
    *,
    image_token_id: int = QWEN_IMAGE_TOKEN_ID,
    video_token_id: int = QWEN_VIDEO_TOKEN_ID,
) -> list[str]:
    """One hex key per sample of a collated batch: a hash of what the model sees.

    Hashed: the unpadded ``input_ids`` (int64) and, per image / video of the sample, its
    ``*_grid_thw`` row and its slice of ``pixel_values`` / ``pixel_values_videos`` (as float32, the
    processor's dtype). Not hashed: padding, ``labels`` (the cache stores which positions were
    labelled and the reader checks them), position ids (derived from the tokens and grids).
    """
    positions = unpadded_positions(model_inputs)
    input_ids = model_inputs["input_ids"]
    ids = [input_ids[b, pos].to("cpu") for b, pos in enumerate(positions)]
    media = [
        (kind, _media_slices(model_inputs, ids, pixels_key, grid_key, token_id, kind))
        for (kind, pixels_key, grid_key), token_id in zip(
            _MODALITIES, (image_token_id, video_token_id), strict=True
        )
    ]
    keys = []
    for b, tokens in enumerate(ids):
        h = hashlib.sha256(KEY_VERSION)
        h.update(len(tokens).to_bytes(8, "little"))
        h.update(_tensor_bytes(tokens, torch.int64))
        for kind, per_sample in media:
            for grid_row, pixels in per_sample[b]:
                h.update(kind.encode())
                h.update(_tensor_bytes(grid_row, torch.int64))
                h.update(_tensor_bytes(pixels, torch.float32))
        keys.append(h.hexdigest()[: 2 * KEY_BYTES])
    return keys


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Indices ``i`` of one unpadded sequence whose logits are trained: ``labels[i + 1] != -100``.

    ms-swift's GKD loss rolls the padded labels by one (``torch.roll(labels, -1, dims=1)``);
    within one sample that is this shift. The last position never predicts a token of its own
    sample (the roll wraps round onto a padding or prompt label), so it is never cached.
    """
    if labels.numel() < 2:
        return torch.zeros(0, dtype=torch.int64, device=labels.device)
    return torch.nonzero(labels[1:] != -100, as_tuple=False).flatten()
