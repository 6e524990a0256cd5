"""A student learns from a teacher with another tokenizer inside ms-swift 4.6 (local teacher).

Real components: the tiny Qwen2 student and Llama teacher of ``kdcompose.testing.tokenizer_pair`` (two
different locally trained BPEs, ms-swift templates ``qwen2_5`` / ``llama3``); the teacher briefly
trained on the caption data (``build_trained_text_model``: a random teacher is near uniform and has
nothing to teach). One prepared trainer (the pipeline of ``kdcompose train``) trains once, on- and
off-policy, and serves every check of the run; the refusals run ``kdcompose validate`` in-process
and the trainer's own check; the identity case builds a second trainer whose teacher has the
student's tokenizer.
"""

from __future__ import annotations

import copy
import io
import random
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from swift_support import fresh, prepared_inputs
from text_pair_config import text_pair_sections

from kdcompose import parse_config
from kdcompose.errors import ConfigError
from kdcompose.testing import build_caption_dataset
from kdcompose.testing.tokenizer_pair import build_tiny_text_model, build_trained_text_model

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

STEPS = 16
LMBDA = 0.25
SEED = 42
CROSS = {"lm_jsd": {"temperature": 1.0, "cross_tokenizer": {"unmatched": "uld"}}}


def config(
    out: Path,
    teacher: Path,
    loss_terms: dict,
    *,
    lmbda: float = 0.0,
    teacher_role: str = "teacher",
    **rlhf: Any,
) -> dict:
    """The pair's config with `teacher` (a model folder of the pair's `teacher_role`) as the local
    teacher, 16 steps at 5e-3."""
    return text_pair_sections(
        out,
        {"lmbda": lmbda, "loss_terms": loss_terms, **rlhf},
        teacher=teacher,
        teacher_role=teacher_role,
        steps=STEPS,
        learning_rate=5e-3,
        seed=SEED,
    )


@pytest.fixture(scope="module")
def teacher_dir() -> Path:
    return build_trained_text_model("teacher", build_caption_dataset(n=16, seed=0, image=False))


def probe(trainer: Any) -> float:
    """The composed loss on the first dataset batch (the same batch every time), without training."""
    trainer.model.eval()
    with torch.no_grad():
        value = float(trainer.compute_loss(trainer.model, fresh(prepared_inputs(trainer))))
    trainer.kd_reset_metrics()
    trainer.model.train()
    return value


@pytest.fixture(scope="module")
def local_run(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    out = tmp_path_factory.mktemp("xtok-local")
    trainer = build_trainer(
        parse_config(config(out, teacher_dir, CROSS, lmbda=LMBDA, teacher_template="llama3"))
    )
    seen: list[dict[str, Any]] = []
    encode = trainer.kd_cross.encode

    def recording(trainer_: Any, chunks: list, samples: list) -> list:  # the real encode, watched
        chunks = encode(trainer_, chunks, samples)
        seen.extend({"chunk": c, "generated": bool(samples[0].response_token_ids)} for c in chunks)
        return chunks

    trainer.kd_cross.encode = recording
    batch = prepared_inputs(trainer)
    before = probe(trainer)
    trainer.train()
    after = probe(trainer)
    logs = [row for row in trainer.state.log_history if "llm_kd_loss" in row]
    return {"trainer": trainer, "before": before, "after": after, "logs": logs, "seen": seen, "batch": batch}


def test_the_student_learns_from_a_teacher_with_another_tokenizer(local_run) -> None:
    before, after = local_run["before"], local_run["after"]
    assert 0.3 < before < 1.5
    assert after < 0.8 * before, (before, after)  # measured: 0.708 -> 0.463 in 16 steps
    logs = local_run["logs"]
    assert len(logs) == STEPS
    fracs = [row["llm_kd_loss_matched_frac"] for row in logs]
    assert all(0.0 < f <= 1.0 for f in fracs) and 0.3 < sum(fracs) / len(fracs) < 0.95
    assert all(row["loss"] == pytest.approx(row["llm_kd_loss"]) for row in logs)


def test_the_teacher_sees_its_own_encoding_on_and_off_policy(local_run) -> None:
    trainer, seen = local_run["trainer"], local_run["seen"]
    expected_generated = sum(random.Random(SEED + step).random() <= LMBDA for step in range(STEPS))
    generated = [s for s in seen if s["generated"]]
    assert len(generated) == expected_generated > 0 and len(seen) - len(generated) > 0
    teacher_tok = trainer.kd_cross.local.tokenizer
    student_tok = trainer.template.tokenizer
    for item in seen:
        chunk = item["chunk"]
        teacher_ids = chunk["teacher_model_inputs"]["input_ids"]
        assert teacher_ids is not chunk["model_inputs"]["input_ids"]
        text = teacher_tok.decode(teacher_ids[0])
        assert "<|start_header_id|>assistant<|end_header_id|>" in text and "<|im_start|>" not in text
        kept = chunk["kdcompose_cross_kept"][""]
        labels = chunk["model_inputs"]["labels"]
        for row, count in zip(labels, kept, strict=True):
            completion = row[row != -100]
            assert 0 < count <= completion.numel()
            if not item["generated"]:
                assert count == completion.numel()  # a dataset answer is always spelled whole
    # the dataset batch: each side's completion is the same answer in its own family's format
    batch = local_run["batch"]
    s_labels, t_labels = batch["model_inputs"]["labels"][0], batch["teacher_model_inputs"]["labels"][0]
    s_text = student_tok.decode(s_labels[s_labels != -100])
    t_text = teacher_tok.decode(t_labels[t_labels != -100])
    assert s_text.endswith("<|im_end|>\n") and t_text.endswith("<|eot_id|>")
    assert s_text.removesuffix("<|im_end|>\n") == t_text.removesuffix("<|eot_id|>")
    assert "vocabularies differ" in trainer.kd_cross.describe()[0]


def validate(path: Path) -> tuple[int, str]:
    from kdcompose.cli import main

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["validate", str(path)])
    return code, err.getvalue()


def test_damaged_inputs_end_before_training_with_named_errors(local_run, teacher_dir, tmp_path) -> None:
    # kdcompose validate / train's preflight: from the tokenizer files, no model loaded
    plain = config(tmp_path / "o", teacher_dir, {"lm_jsd": {"weight": 1.0}, "ce": {"weight": 0.1}})
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(plain))
    code, err = validate(path)
    assert code == 2
    assert "rlhf.loss_terms.lm_jsd: reads the default teacher" in err and str(teacher_dir) in err
    assert "vocabularies differ" in err and "cross_tokenizer: {unmatched: uld}" in err
    assert "rlhf.loss_terms.ce" not in err  # ce does not read the teacher
    no_template = config(tmp_path / "o", teacher_dir, CROSS)
    path.write_text(yaml.safe_dump(no_template))
    code, err = validate(path)
    assert code == 2 and "rlhf.teacher_template" in err and "llama3" in err
    # the trainer compares the tokenizers it loaded (the Python route, no preflight)
    trainer = local_run["trainer"]
    saved = trainer.kd_composer
    bad = parse_config(plain).composer
    with pytest.raises(ConfigError) as info:
        trainer.use_composer(bad)
    assert [i.path for i in info.value.issues] == ["rlhf.loss_terms.lm_jsd"]
    assert trainer.kd_composer is saved  # nothing was switched


@pytest.fixture(scope="module")
def twin_trainer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A trainer whose teacher has the student's tokenizer (another tiny Qwen2 of the same tokenizer)."""
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    out = tmp_path_factory.mktemp("xtok-twin")
    twin = build_tiny_text_model("student", seed=1)
    loss_terms = {"lm_jsd": {"beta": 0.3, "temperature": 0.8}}
    trainer = build_trainer(parse_config(config(out, twin, loss_terms, teacher_role="student")))
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("generated", [False, True], ids=["dataset", "student-generated"])
def test_the_forced_path_with_the_students_tokenizer_equals_the_same_tokenizer_run(
    twin_trainer, generated
) -> None:
    trainer = twin_trainer
    ordinary = trainer.kd_composer
    forced = parse_config(
        {
            "rlhf": {
                "loss_terms": {
                    "lm_jsd": {"beta": 0.3, "temperature": 0.8, "cross_tokenizer": {"force": True}}
                }
            }
        }
    ).composer
    trainer.use_composer(forced)
    try:
        assert trainer.kd_cross is not None and trainer.kd_cross.plan.teachers[""].identical
        inputs = prepared_inputs(trainer, student_generated=generated)  # through the forced encoding
        with torch.no_grad():
            cross = float(trainer.compute_loss(trainer.model, fresh(inputs)))
        matched = trainer.kd_metric_values()["llm_kd_loss_matched_frac"]
    finally:
        trainer.use_composer(ordinary)
    same = copy.copy(inputs)
    same["teacher_model_inputs"] = dict(inputs["model_inputs"])  # ms-swift's copy of the student's
    with torch.no_grad():
        plain = float(trainer.compute_loss(trainer.model, fresh(same)))
    trainer.kd_reset_metrics()
    assert plain > 0 and cross == pytest.approx(plain, rel=1e-5, abs=1e-7)
    assert matched == 1.0
