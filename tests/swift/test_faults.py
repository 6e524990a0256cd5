"""Faults during real tiny training runs: a term going NaN/inf, and Ctrl-C.

The faulty term is the test-only `nan_probe` (tests/nan_probe.py): NaN or inf at chosen
steps, connected to the student's graph like a real numerical blow-up, or a
KeyboardInterrupt raised in the middle of the loss (Ctrl-C arriving mid-step). Every run has
visual_kd on the vision tower too, so feature hooks are installed and must come off.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from forked_cli import start_cli
from loop_support import log_rows, step_of, train_rows
from nan_probe import TYPE as NAN_PROBE
from nan_probe import registered
from swift_support import sections, subprocess_env, write_config
from transformers import TrainerCallback

from kdcompose import build_composer, parse_config
from kdcompose.nonfinite import NonFiniteLossError

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

VISUAL = {"weight": 0.5, "vit": {"enabled": True, "weight": 1.0, "distance": "mse"}}


@pytest.fixture(scope="module", autouse=True)
def probe_term():
    with registered():
        yield


def _sections(out: Path, probe: dict | None = None, **overrides) -> dict:
    terms = {"lm_jsd": {}, "ce": {"weight": 0.3}}
    if probe is not None:
        terms["nan"] = {"type": NAN_PROBE, **probe}
    overrides.setdefault("max_steps", 4)
    return sections(out, rlhf={"loss_terms": terms}, custom={"visual_kd": VISUAL}, **overrides)


def _hooks(*models) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


def _feature_hooks(trainer) -> int:
    """Hooks on the modules kdcompose's feature recorders hook."""
    modules = [
        model.get_submodule(hooked.name)
        for recorder in trainer.kd_attachments.module_taps()
        for hooked in recorder.hooked
        for model in (trainer.model, trainer.teacher_model)
        if _has(model, hooked.name)
    ]
    assert modules, "the run should hook the vision tower"
    return sum(len(m._forward_hooks) for m in modules)


def _has(model, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


class _LastWeights(TrainerCallback):
    """The student's LM-head weight at the end of the last completed optimizer step."""

    def __init__(self, trainer) -> None:
        self.trainer, self.step, self.weight = trainer, -1, None

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.weight = self.trainer.model.get_output_embeddings().weight.detach().clone()


def test_a_nan_term_stops_the_run_before_the_step_is_applied(tmp_path):
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    trainer = build_trainer(parse_config(_sections(tmp_path / "out", {"at_steps": [2]})))
    last = _LastWeights(trainer)
    trainer.add_callback(last)
    hooks = _hooks(trainer.model, trainer.teacher_model)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "term 'nan' (nan_loss): NaN" in message
    assert "optimizer step 3 (global_step 2" in message and "not applied" in message
    assert info.value.terms == ("nan",) and info.value.step == 3
    assert last.step == 2  # steps 1 and 2 completed, step 3 never did ...
    assert torch.equal(
        trainer.model.get_output_embeddings().weight, last.weight
    )  # ... nor touched the weights
    assert [step_of(r) for r in train_rows(log_rows(tmp_path / "out"))] == [1, 2]
    assert _hooks(trainer.model, trainer.teacher_model) <= hooks  # nothing left behind ...
    assert _feature_hooks(trainer) == 0  # ... and the vision-tower hooks removed on the way out


def test_kdcompose_train_reports_the_term_and_step_with_exit_code_1(tmp_path):
    from kdcompose.integrations.swift.launch.command import EXIT_FAILED, train

    config = write_config(
        tmp_path / "cfg.yaml", _sections(tmp_path / "out", {"at_steps": [1], "kind": "inf"})
    )
    out, err = io.StringIO(), io.StringIO()
    assert train(str(config), stdout=out, stderr=err) == EXIT_FAILED
    assert "kdcompose train: non-finite loss at optimizer step 2" in err.getvalue()
    assert "term 'nan' (nan_loss): inf" in err.getvalue()


def test_ctrl_c_mid_loss_leaves_no_hooks_records_or_threads(tmp_path):
    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    trainer = build_trainer(parse_config(_sections(tmp_path / "out", {"at_steps": [2], "kind": "interrupt"})))
    hooks = _hooks(trainer.model, trainer.teacher_model)
    threads = {t.ident for t in threading.enumerate() if not t.daemon}
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.state.global_step == 2
    assert _hooks(trainer.model, trainer.teacher_model) <= hooks and _feature_hooks(trainer) == 0
    assert all(not any(r.recorded().values()) for r in trainer.kd_attachments.module_taps())
    assert {t.ident for t in threading.enumerate() if not t.daemon} <= threads


def test_sigint_to_kdcompose_train_exits_cleanly_with_a_message(tmp_path):
    """A real `kdcompose train` process gets SIGINT (what Ctrl-C sends) while it trains."""
    config = write_config(tmp_path / "cfg.yaml", _sections(tmp_path / "out", max_steps=500))
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # forked (tests/support/forked_cli.py): SIGINT handled as Python does in a terminal, however
    # pytest was started (a shell's background job would start it with SIGINT ignored)
    process = start_cli(["train", str(config)], subprocess_env(tmp_path), stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not _logged_steps(tmp_path / "out") >= 2:
            assert process.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not start training in time"
            time.sleep(0.5)
        os.kill(process.pid, signal.SIGINT)
        sent = time.monotonic()
        code = process.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    text = stderr.read_text()
    assert code == 130, text[-3000:]
    assert "kdcompose train: interrupted (Ctrl-C)" in text
    assert "Traceback" not in text
    assert "training interrupted (Ctrl-C) at global_step" in text + stdout.read_text()
    assert took < 60, f"took {took:.1f}s to stop after SIGINT"
    print(f"\nSIGINT: exited {took:.1f}s after the signal")


def _logged_steps(out: Path) -> int:
    files = list(out.glob("**/logging.jsonl"))
    return len(files[0].read_text().splitlines()) if files else 0


def test_a_nonfinite_term_in_evaluation(tmp_path):
    """`error` raises when the evaluation is logged; `skip_step` counts those batches 0."""
    from loop_support import image_rows, write_rows

    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    val = write_rows(tmp_path / "val.jsonl", image_rows()[:3])
    data = _sections(tmp_path / "out", {"at_steps": [0]}, val_dataset=[str(val)], eval_strategy="steps")
    trainer = build_trainer(parse_config(data))
    for callback in list(trainer.callback_handler.callbacks):
        if "Progress" in type(callback).__name__:  # ms-swift's progress bar expects a running train()
            trainer.remove_callback(callback)
    with pytest.raises(
        NonFiniteLossError, match=r"during evaluation at global_step 0: term 'nan' \(nan_loss\)"
    ):
        trainer.evaluate()
    probe = {"type": NAN_PROBE, "at_steps": [0], "on_nonfinite": "skip_step"}
    terms = {"lm_jsd": {}, "ce": {"weight": 0.3}, "nan": probe}
    trainer.use_composer(build_composer(parse_config({"rlhf": {"loss_terms": terms}}).composition))
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == 0.0 and metrics["eval_nan_loss"] == 0.0
    assert metrics["eval_llm_kd_loss"] == 0.0  # every batch was NaN: each counts 0, like the loss
