"""Distil a tiny vision-language student in a plain PyTorch loop with `kdcompose.Distiller`.

No trainer framework: the models are loaded with transformers, batches are encoded with the
model's own processor, and the loop is five lines. The objective is the same YAML composition
`kdcompose train` would train -- here LM-head JSD, cross-entropy, feature KD of a decoder layer
through a trainable projector (the student is 64 wide, the teacher 96), and a user's own term
loaded from a file (`relation_kd_term.py`, relational KD between decoder layers):

    python examples/plain_pytorch_loop.py            # 30 steps on CPU, under a minute

The tiny teacher/student pair and the synthetic image-caption data are built locally and cached
(`kdcompose.testing`), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from kdcompose import Distiller, parse_config
from kdcompose.compat import ensure_torchvision_importable
from kdcompose.testing import build_caption_dataset, build_tiny_pair, load_rows, tiny_run_env

KD_CONFIG = {
    "plugins": [str(Path(__file__).with_name("relation_kd_term.py"))],  # a user's term, tapping layers
    "rlhf": {
        "loss_terms": {
            "lm_jsd": {"weight": 1.0, "beta": 0.5, "temperature": 1.0},
            "ce": {"weight": 0.5},
            "hidden_kd": {
                "weight": 0.2,
                "pairs": [
                    {
                        "student": "model.language_model.layers.1",
                        "teacher": "model.language_model.layers.2",
                        "projector": "linear",
                    }
                ],
            },
            "relation_kd": {
                "weight": 0.2,
                "student_layer": "model.language_model.layers.1",
                "teacher_layer": "model.language_model.layers.2",
            },
        }
    },
}
PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
ANSWER = "<|im_start|>assistant\n{caption}<|im_end|>"


def load_models() -> tuple[Any, Any, Any, Any]:
    """The tiny Qwen2-VL student and teacher (random weights, built once and cached), the
    processor that encodes their inputs and the teacher's own tokenizer."""
    ensure_torchvision_importable()
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    teacher_dir, student_dir = build_tiny_pair("qwen2_vl")
    student = Qwen2VLForConditionalGeneration.from_pretrained(student_dir, dtype=torch.float32)
    teacher = Qwen2VLForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(student_dir)
    teacher_tokenizer = AutoProcessor.from_pretrained(teacher_dir).tokenizer
    return student, teacher.eval().requires_grad_(False), processor, teacher_tokenizer


def encode(processor: Any, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One batch: the prompt and its image, then the caption; labels only on the caption (HF
    style: unshifted, -100 elsewhere)."""
    from PIL import Image

    captions = [row["messages"][1]["content"] for row in rows]
    texts = [PROMPT + ANSWER.format(caption=c) for c in captions]
    images = [Image.open(row["images"][0]).convert("RGB") for row in rows]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    assistant = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, ids in enumerate(batch["input_ids"].tolist()):
        start = next(i for i in range(len(ids)) if ids[i : i + len(assistant)] == assistant) + len(assistant)
        labels[row, :start] = -100
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def main(steps: int = 30, batch_size: int = 2, seed: int = 0) -> list[dict[str, float]]:
    """Train `steps` optimizer steps; returns each step's logged metrics."""
    os.environ.update(tiny_run_env())
    torch.manual_seed(seed)
    student, teacher, processor, teacher_tokenizer = load_models()
    rows = load_rows(build_caption_dataset(n=16, seed=seed, image=True))
    history: list[dict[str, float]] = []
    # the tokenizers: the Distiller checks that the two models share one (the LM-head term compares
    # their distributions id by id) and takes the vocabulary size from the student's
    tokenizers = {"tokenizer": processor.tokenizer, "teacher_tokenizer": teacher_tokenizer}
    with Distiller(parse_config(KD_CONFIG), student, teacher, **tokenizers) as kd:
        print(kd.formula())
        optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()], lr=1e-3)
        student.train()
        for step in range(steps):
            start = (step * batch_size) % len(rows)
            out = kd.loss(encode(processor, rows[start : start + batch_size]))
            out.total.backward()
            optimizer.step()
            optimizer.zero_grad()
            history.append({key: float(value) for key, value in out.metrics().items()})
            history[-1]["loss"] = float(out.total.detach())
            if step % 10 == 0 or step == steps - 1:
                shown = "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items())
                print(f"step {step + 1:3d}  {shown}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
