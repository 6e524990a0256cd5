"""The ms-swift config of the cross-tokenizer tests: the tiny text student of
`kdcompose.testing.tokenizer_pair`, the text caption data, a teacher that is local or none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcompose.testing import build_caption_dataset
from kdcompose.testing.tokenizer_pair import build_tiny_text_model, swift_model_args


def text_pair_sections(
    out: Path,
    rlhf: dict[str, Any],
    *,
    teacher: Path | None = None,
    teacher_role: str = "teacher",
    samples: int = 16,
    steps: int,
    learning_rate: float,
    seed: int = 42,
) -> dict[str, Any]:
    """A sectioned kdcompose config: the student, `samples` caption rows, `steps` steps at a constant
    `learning_rate`, `rlhf` over an off-policy GKD section; `teacher` (a model folder of the pair's
    `teacher_role`) as the local `teacher_model` when given (a cache or a server needs none)."""
    student = swift_model_args("student", build_tiny_text_model("student"))
    model: dict[str, Any] = {
        "model": student["model"],
        "model_type": student["model_type"],
        "check_model": False,
        "torch_dtype": "float32",
    }
    if teacher is not None:
        model["teacher_model"] = str(teacher)
        model["teacher_model_type"] = swift_model_args(teacher_role, teacher)["model_type"]
    return {
        "model": model,
        "template": {"template": student["template"], "max_length": 256},
        "data": {
            "dataset": [str(build_caption_dataset(n=samples, seed=0, image=False))],
            "split_dataset_ratio": 0.0,
            "dataset_num_proc": 1,
            "load_from_cache_file": False,
        },
        "tuner": {"tuner_type": "full"},
        "training": {
            "output_dir": str(out),
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": False,
            "max_steps": steps,
            "learning_rate": learning_rate,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_strategy": "no",
            "eval_strategy": "no",
            "report_to": ["none"],
            "dataloader_num_workers": 0,
            "seed": seed,
        },
        "rlhf": {"rlhf_type": "gkd", "lmbda": 0.0, "max_completion_length": 12, **rlhf},
    }
