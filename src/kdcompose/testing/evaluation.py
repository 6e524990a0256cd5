"""Score a captioning model on held-out task pictures, with two numbers a person can read.

- **attributes right**: the model captions each picture greedily (no sampling), and the caption
  is read slot by slot (`caption_task.parse_caption`): the share of size / colour / shape /
  position / background words that are right.
- **token accuracy**: with the true caption as input (teacher forcing), the share of the
  caption's tokens and its `<|im_end|>` that the model ranks first. It counts the template's
  words too, which even a model that ignores the picture learns, so it is higher than the first
  number and moves less.

Both run the checkpoint with transformers directly (what ms-swift trained is an ordinary
Hugging Face checkpoint), on the full vocabulary, in batches of same-length prompts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcompose.testing.caption_task import TaskEncoder, TaskSpec, attributes_right, model_inputs
from kdcompose.testing.datasets import ShapeSample

MAX_NEW_TOKENS = 24
"""Enough for the longest caption (15 tokens) and its end."""


@dataclass(frozen=True)
class Score:
    attributes_right: float
    token_accuracy: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "attributes_right": round(self.attributes_right, 4),
            "token_accuracy": round(self.token_accuracy, 4),
            "samples": self.samples,
        }


def load_model(model_dir: str | os.PathLike[str]) -> Any:
    """A checkpoint (a tiny model folder or ms-swift's `checkpoint-N`) for evaluation."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def evaluate(
    model: Any,
    encoder: TaskEncoder,
    samples: Sequence[ShapeSample],
    *,
    batch_size: int = 50,
    progress: Any = None,
) -> tuple[Score, list[str]]:
    """The model's score on `samples` and its greedy captions. `progress`: a tqdm bar to
    advance by one per sample, or None."""
    import torch
    from transformers import GenerationConfig

    from kdcompose.testing.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID

    greedy = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        eos_token_id=[EOS_TOKEN_ID, PAD_TOKEN_ID],
        pad_token_id=PAD_TOKEN_ID,
    )
    captions: list[str] = []
    right = counted = 0
    n_prompt = len(encoder.prompt_ids)
    with torch.inference_mode():
        for lo in range(0, len(samples), batch_size):
            chunk = samples[lo : lo + batch_size]
            prompts = encoder.prompts(chunk)
            generated = model.generate(**prompts, generation_config=greedy)
            captions += encoder.tokenizer.batch_decode(generated[:, n_prompt:], skip_special_tokens=True)

            batch = encoder.with_captions(chunk, newline=False)
            states = model.model(**model_inputs(batch)).last_hidden_state[:, :-1]
            scored = batch["scored"][:, 1:]
            predicted = model.lm_head(states[scored]).argmax(dim=-1)
            right += int((predicted == batch["input_ids"][:, 1:][scored]).sum())
            counted += int(scored.sum())
            if progress is not None:
                progress.update(len(chunk))
    score = Score(attributes_right(captions, samples), right / counted, len(samples))
    return score, captions


def evaluate_dir(model_dir: str | os.PathLike[str], task: TaskSpec, samples: Sequence[ShapeSample]) -> Score:
    """Convenience: load a checkpoint with its own processor and score it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    return evaluate(load_model(Path(model_dir)), TaskEncoder(processor, task), samples)[0]
