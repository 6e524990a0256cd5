"""Distil with `kdcompose.Distiller` in an Accelerate loop (one process, or several with
`torchrun --nproc_per_node 2 examples/accelerate_loop.py`).

The same tiny pair, data and composition as `plain_pytorch_loop.py`. What changes with Accelerate:
build the Distiller on the bare student (it hooks modules by name and reads the LM heads), then
hand it the prepared model, which is the one whose forward Accelerate / DDP must see, and average
the Distiller's projector gradients across processes (they are not part of the student):

    kd = Distiller(config, student, teacher)
    student, optimizer = accelerator.prepare(student, optimizer)
    kd.student = student
    ...
    accelerator.backward(out.total); kd.all_reduce_gradients(); optimizer.step()
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator

from kdcompose import Distiller, parse_config
from kdcompose.testing import build_caption_dataset, load_rows, tiny_run_env
from plain_pytorch_loop import KD_CONFIG, encode, load_models


def main(steps: int = 20, batch_size: int = 2, seed: int = 0) -> list[dict[str, float]]:
    os.environ.update(tiny_run_env())
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    student, teacher, processor, teacher_tokenizer = load_models()
    teacher.to(accelerator.device)
    rows = load_rows(build_caption_dataset(n=16, seed=seed, image=True))
    shard = rows[accelerator.process_index :: accelerator.num_processes]
    history: list[dict[str, float]] = []
    tokenizers = {"tokenizer": processor.tokenizer, "teacher_tokenizer": teacher_tokenizer}
    with Distiller(parse_config(KD_CONFIG), student, teacher, **tokenizers) as kd:
        optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()], lr=1e-3)
        student, optimizer = accelerator.prepare(student, optimizer)
        kd.student = student  # the prepared model runs the forward (DDP syncs its gradients)
        student.train()
        for step in range(steps):
            start = (step * batch_size) % len(shard)
            batch = {
                k: v.to(accelerator.device)
                for k, v in encode(processor, shard[start : start + batch_size]).items()
            }
            out = kd.loss(batch)
            accelerator.backward(out.total)
            kd.all_reduce_gradients()
            optimizer.step()
            optimizer.zero_grad()
            history.append({key: float(value) for key, value in out.metrics().items()})
            if accelerator.is_main_process and (step % 10 == 0 or step == steps - 1):
                print(f"step {step + 1:3d}  " + "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
