"""The demo's task: say what a synthetic picture shows (size, colour, shape, position, background).

Why a task of its own: `kdcompose demo` must show distillation *working*, so the teacher has to
know something the student can learn from it, and a person must be able to read the score.
Every caption names five attributes that are all visible in the picture
("a large red square in the top left on a white background."), so a model's greedy caption of
a held-out picture is scored word by word: the share of attributes it got right.

Pictures have one fixed size (`TaskSpec.image_side`, a multiple of 28), so every sample has the
same number of vision tokens; that lets the teacher's training loop and the evaluation batch
samples without padding the pixels, and encode them here in a few milliseconds instead of
through the image processor one picture at a time. The encoding is exactly what ms-swift's
Qwen2-VL template produces for the same row (a test compares them): the chat prompt with the
image's pad tokens, then the caption and `<|im_end|>`.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdcompose.testing.datasets import ShapeSample, sample_shapes
from kdcompose.testing.tokenizer import (
    COLORS,
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    POSITIONS,
    SHAPES,
    SIZES,
)

ATTRIBUTES: tuple[str, ...] = ("size", "color", "shape", "position", "background")
"""What a caption names, in caption order."""
PROMPT = "Describe the image."
IGNORE = -100
BLANK_GREY = 100
"""The grey level of a blank picture (no task background has it: white, black, grey 128)."""
_MERGE = 2  # Qwen-VL merges 2x2 patches into one vision token
_CAPTION = re.compile(
    r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+)"
    r" in the (?P<position>[\w ]+?) on a (?P<background>\w+) background"
)


@dataclass(frozen=True)
class TaskSpec:
    """What the pictures look like (part of every cache key that depends on them)."""

    image_side: int = 84
    """Pixels per side; a multiple of 28 within the tiny processors' pixel limits (56-112)."""
    patch_size: int = 14
    jitter: bool = True
    max_offset: int = 4
    """Pixels a shape moves from its slot: towards the inside from a corner, half as far either
    way from the centre (so a large shape near a corner still reads as being in the corner)."""
    max_tint: int = 15

    def __post_init__(self) -> None:
        factor = self.patch_size * _MERGE
        if self.image_side % factor or not 2 * factor <= self.image_side <= 4 * factor:
            raise ValueError(f"image_side must be a multiple of {factor} in [{2 * factor}, {4 * factor}]")

    @property
    def vision_tokens(self) -> int:
        """Merged vision tokens per picture."""
        return (self.image_side // (self.patch_size * _MERGE)) ** 2


def task_samples(spec: TaskSpec, n: int, seed: int) -> list[ShapeSample]:
    """`n` deterministic pictures of the task's size: the attribute draw of `sample_shapes`,
    each picture moved, scaled and tinted a little (`TaskSpec.jitter`), so that two pictures
    with the same caption still differ and a held-out picture is one no model has seen."""
    side = spec.image_side
    rng = random.Random(seed + 7919)
    out = []
    for sample in sample_shapes(n, seed):
        jitter: dict[str, Any] = {}
        if spec.jitter:
            low, high = (
                (-spec.max_offset // 2, spec.max_offset // 2)
                if sample.position == "center"
                else (0, spec.max_offset)
            )
            jitter = {
                "offset": (rng.randint(low, high), rng.randint(low, high)),
                "scale": rng.uniform(0.9, 1.1),
                "tint": tuple(rng.randint(-spec.max_tint, spec.max_tint) for _ in range(3)),
            }
        out.append(dataclasses.replace(sample, width=side, height=side, **jitter))
    return out


def attributes_of(sample: ShapeSample) -> dict[str, str]:
    return {
        "size": sample.size,
        "color": sample.color,
        "shape": sample.shape,
        "position": sample.position,
        "background": sample.background,
    }


_VOCAB: dict[str, tuple[str, ...]] = {
    "size": SIZES,
    "color": COLORS,
    "shape": SHAPES,
    "position": POSITIONS,
    "background": COLORS,
}


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names; None for each one it does not name in its slot.

    A caption that follows the template is read slot by slot; one that does not (a student early
    in training) gets credit only for the slots it fills with a word of the right kind."""
    text = text.strip().lower()
    match = _CAPTION.match(text)
    if match:
        found = match.groupdict()
        return {k: (v if v in _VOCAB[k] else None) for k, v in found.items()}
    return dict.fromkeys(ATTRIBUTES)


def attributes_right(captions: Sequence[str], samples: Sequence[ShapeSample]) -> float:
    """Share of (sample, attribute) pairs whose word in the generated caption is right."""
    if len(captions) != len(samples) or not samples:
        raise ValueError(f"need one caption per sample, got {len(captions)} for {len(samples)}")
    right = 0
    for text, sample in zip(captions, samples, strict=True):
        said = parse_caption(text)
        right += sum(said[k] == v for k, v in attributes_of(sample).items())
    return right / (len(samples) * len(ATTRIBUTES))


class TaskEncoder:
    """Turns task samples into model inputs, identical to ms-swift's `qwen2_vl` template."""

    def __init__(self, processor: Any, spec: TaskSpec) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.spec = spec
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        image_pad = "<|image_pad|>"
        prompt = prompt.replace(image_pad, image_pad * spec.vision_tokens)
        self.prompt_ids: list[int] = self.tokenizer(prompt)["input_ids"]
        self.newline_ids: list[int] = self.tokenizer("\n")["input_ids"]

    def pixels(self, samples: Sequence[ShapeSample], *, blank: bool = False) -> dict[str, Any]:
        """`pixel_values` and `image_grid_thw` as the image processor makes them (its own
        rescale/normalize/patchify steps; no resize, the side already fits). `blank`: a plain
        grey picture for every sample instead of its own."""
        import numpy as np
        import torch

        from kdcompose.testing.datasets import render_shape

        ip = self.processor.image_processor
        if blank:
            side = self.spec.image_side
            array = np.full((len(samples), side, side, 3), BLANK_GREY, dtype=np.uint8)
        else:
            array = np.stack([np.asarray(render_shape(s), dtype=np.uint8) for s in samples])
        images = torch.from_numpy(array).permute(0, 3, 1, 2)
        images = ip.rescale_and_normalize(images, True, ip.rescale_factor, True, ip.image_mean, ip.image_std)
        patches, grid_h, grid_w = ip.patchify(images, ip.patch_size, ip.merge_size, ip.temporal_patch_size)
        return {
            "pixel_values": patches.reshape(-1, patches.shape[-1]),
            "image_grid_thw": torch.tensor([[1, grid_h, grid_w]] * len(samples)),
        }

    def completion_ids(self, sample: ShapeSample) -> list[int]:
        """The caption and the end of the turn: what is scored (ms-swift also trains on the
        newline after `<|im_end|>`; that is template formatting, not part of the answer)."""
        return [*self.tokenizer(sample.caption)["input_ids"], EOS_TOKEN_ID]

    def prompts(self, samples: Sequence[ShapeSample]) -> dict[str, Any]:
        """The prompt only (for generation): every prompt has the same length, so no padding."""
        import torch

        ids = torch.tensor([self.prompt_ids] * len(samples))
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).long(),
            **self.pixels(samples),
        }

    def with_captions(
        self, samples: Sequence[ShapeSample], *, newline: bool = True, blank: bool = False
    ) -> dict[str, Any]:
        """Prompt + caption + `<|im_end|>` (+ the template's newline), right-padded; `labels`
        mark the completion, `scored` the positions that count for token accuracy. `blank`:
        see `pixels`."""
        import torch

        n_prompt = len(self.prompt_ids)
        tails = [self.completion_ids(s) + (self.newline_ids if newline else []) for s in samples]
        length = n_prompt + max(map(len, tails))
        ids = torch.full((len(samples), length), PAD_TOKEN_ID)
        labels = torch.full((len(samples), length), IGNORE)
        scored = torch.zeros((len(samples), length), dtype=torch.bool)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, (sample, tail) in enumerate(zip(samples, tails, strict=True)):
            end = n_prompt + len(tail)
            ids[i, :end] = torch.tensor(self.prompt_ids + tail)
            labels[i, n_prompt:end] = torch.tensor(tail)
            scored[i, n_prompt : n_prompt + len(self.completion_ids(sample))] = True
            mask[i, :end] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).long(),
            "labels": labels,
            "scored": scored,
            **self.pixels(samples, blank=blank),
        }


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What the model's forward takes from an encoded batch."""
    return {k: v for k, v in batch.items() if k not in ("labels", "scored")}
