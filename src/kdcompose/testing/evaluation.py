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

Why `ZeroRowHead`: the tiny models' LM head has 151,936 rows, of which only the 579 that text
can produce are non-zero (the teacher trains with the others at zero and the students inherit
its frozen head), so nearly all of an evaluation's time went into multiplying by zeros. A zero
row's logit is exactly 0 whatever the hidden state, so the head computes the non-zero rows and
writes 0 for the rest: the same logits over the same vocabulary, at a fraction of the cost. A
model whose rows are all non-zero keeps its own head.
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


def _zero_row_head_class():  # torch is imported only when a model is evaluated
    import torch

    class ZeroRowHead(torch.nn.Module):
        """An LM head (no bias) that multiplies only by its non-zero rows; see the module docstring."""

        def __init__(self, weight: torch.Tensor, rows: torch.Tensor) -> None:
            """`rows`: the ids of the non-zero rows, ascending (at least one row is zero)."""
            super().__init__()
            self.vocab = weight.shape[0]
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("live", weight.detach()[rows].clone(), persistent=False)
            # For `argmax`: the live rows and the first zero row (its logit stands for all of
            # them: every zero row's logit is 0, and argmax picks the first of equal values), in
            # id order, so the first maximum is the one the full head would give.
            zero = torch.ones(self.vocab, dtype=torch.bool)
            zero[rows] = False
            first_zero = zero.nonzero()[:1, 0]
            self.register_buffer("ids", torch.cat([rows, first_zero]).sort().values, persistent=False)
            self.register_buffer("is_zero", self.ids == first_zero, persistent=False)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            out = hidden.new_zeros(*hidden.shape[:-1], self.vocab)
            out[..., self.rows] = hidden @ self.live.T
            return out

        def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
            """The full head's argmax token id for each hidden state, without the full logits."""
            logits = hidden.new_zeros(*hidden.shape[:-1], len(self.ids))
            logits[..., ~self.is_zero] = hidden @ self.live.T
            return self.ids[logits.argmax(dim=-1)]

    return ZeroRowHead


def with_zero_row_head(model: Any) -> Any:
    """`model` with its LM head replaced by a `ZeroRowHead` when most of its rows are zero."""
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        return model
    rows = head.weight.detach().abs().sum(dim=1).nonzero()[:, 0]
    if len(rows) * 2 > head.weight.shape[0]:
        return model
    model.lm_head = _zero_row_head_class()(head.weight, rows)
    return model


def argmax_ids(head: Any, hidden: Any) -> Any:
    """The head's most likely token id for each hidden state (the full logits only when the
    head has no cheaper way)."""
    return head.argmax(hidden) if hasattr(head, "argmax") else head(hidden).argmax(dim=-1)


def load_model(model_dir: str | os.PathLike[str]) -> Any:
    """A checkpoint (a tiny model folder or ms-swift's `checkpoint-N`) for evaluation."""
    import torch
    from transformers import AutoModelForImageTextToText

    from kdcompose.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    return with_zero_row_head(model.eval())


def evaluate(
    model: Any,
    encoder: TaskEncoder,
    samples: Sequence[ShapeSample],
    *,
    batch_size: int = 50,
    progress: Any = None,
) -> tuple[Score, list[str]]:
    """The model's score on `samples` and its greedy captions. `progress`: a tqdm bar to
    advance by one per sample, or None. Runs on one torch thread: the tiny models' operations
    are too small to split, and two threads on two busy cores made scoring five times slower."""
    import torch
    from transformers import GenerationConfig

    from kdcompose.testing.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID

    greedy = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        eos_token_id=[EOS_TOKEN_ID, PAD_TOKEN_ID],
        pad_token_id=PAD_TOKEN_ID,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _evaluate(model, encoder, samples, greedy, batch_size, progress)
    finally:
        torch.set_num_threads(threads)


def _evaluate(
    model: Any,
    encoder: TaskEncoder,
    samples: Sequence[ShapeSample],
    greedy: Any,
    batch_size: int,
    progress: Any,
) -> tuple[Score, list[str]]:
    import torch

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
            predicted = argmax_ids(model.lm_head, states[scored])
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
