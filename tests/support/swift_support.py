"""Shared set-up for the ms-swift integration tests: tiny configs, one prepared trainer, runs.

Everything is real: ms-swift 4.6's own pipeline, tiny locally built Qwen2-VL models
(`kdcompose.testing`), real batches from ms-swift's dataloader and `_prepare_inputs`.
Expensive objects are built once per test session (`functools.cache`), so the modules
that use them share one ms-swift start-up; tests that change the trainer restore it.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from forked_cli import run_cli

from kdcompose import build_composer, parse_config
from kdcompose.integrations.swift.runtime import prepare_swift_import
from kdcompose.testing import tiny_gkd_args, tiny_run_env
from kdcompose.training.engines import SINGLE_PROCESS_ENV

FAMILY = "qwen2_vl"
SECTION_OF: dict[str, str] = {
    "model": "model",
    "model_type": "model",
    "teacher_model": "model",
    "teacher_model_type": "model",
    "check_model": "model",
    "torch_dtype": "model",
    "template": "template",
    "max_length": "template",
    "dataset": "data",
    "split_dataset_ratio": "data",
    "dataset_num_proc": "data",
    "load_from_cache_file": "data",
    "tuner_type": "tuner",
    "rlhf_type": "rlhf",
    "lmbda": "rlhf",
    "beta": "rlhf",
    "temperature": "rlhf",
    "sft_alpha": "rlhf",
    "max_completion_length": "rlhf",
}
AGGREGATE_KEYS = ("train_runtime", "train_loss")

os.environ.update(tiny_run_env())
prepare_swift_import()  # torchvision shim + version check, before anything imports ms-swift
SESSION_DIR = Path(tempfile.mkdtemp(prefix="kdcompose-swift-tests-"))
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)


def swift_args(output_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """Flat ms-swift arguments of a tiny CPU GKD run (`kdcompose.testing.tiny_gkd_args`)."""
    return tiny_gkd_args(FAMILY, str(output_dir), **overrides)


def sections(
    output_dir: str | Path,
    *,
    rlhf: Mapping[str, Any] | None = None,
    custom: Mapping[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    **overrides: Any,
) -> dict[str, dict[str, Any]]:
    """A sectioned kdcompose config for the tiny run; `rlhf`/`custom` add kdcompose keys."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in swift_args(output_dir, **overrides).items():
        if key not in drop:
            out.setdefault(SECTION_OF.get(key, "training"), {})[key] = value
    out.setdefault("rlhf", {}).update(rlhf or {})
    if custom:
        out["custom"] = dict(custom)
    return out


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


_shared: list[Any] = []


def shared_trainer() -> Any:
    """One prepared `KDComposeGKDTrainer` (stock composition), shared by the test modules.

    Rebuilt when its accelerator state is gone: constructing any new `TrainingArguments` in
    this process (another run, an argument-parsing test) resets accelerate's process-wide
    `AcceleratorState`, which a trainer built earlier cannot work without.
    """
    from accelerate.state import AcceleratorState

    from kdcompose.integrations.swift.launch.pipeline import build_trainer

    if not _shared or not AcceleratorState._shared_state:
        _shared[:] = [build_trainer(parse_config(sections(SESSION_DIR / "shared")))]
        _shared[0].model.train()
    return _shared[0]


_batches: dict[int, Any] = {}


def prepared_inputs(trainer: Any, *, student_generated: bool = False) -> dict[str, Any]:
    """A micro-batch exactly as ms-swift hands it to `compute_loss` (on-policy when asked)."""
    if id(trainer) not in _batches:
        _batches[id(trainer)] = next(iter(trainer.get_train_dataloader()))
    batch = _batches[id(trainer)]
    saved = trainer.lmbda, trainer._buffered_inputs, trainer._step
    trainer.lmbda = 1.0 if student_generated else 0.0
    trainer._buffered_inputs = None
    try:
        return trainer._prepare_inputs(copy.deepcopy(batch))
    finally:
        trainer.lmbda, trainer._buffered_inputs, trainer._step = saved


def fresh(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A copy `compute_loss` may trim (`prepare_logits_to_keep` replaces dict entries)."""
    return {
        "model_inputs": dict(inputs["model_inputs"]),
        "gkd_batch": inputs["gkd_batch"],
        "teacher_model_inputs": dict(inputs["teacher_model_inputs"]),
    }


@contextmanager
def composed(
    trainer: Any, composition_sections: Mapping[str, Any] | None = None, **gkd: Any
) -> Iterator[Any]:
    """Train `trainer` with the composition of a config's `rlhf`/`custom` sections (and
    ms-swift's `sft_alpha`/`beta`/... on its args) inside the block; restores both after."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (composition_sections or {}).items()}
    data.setdefault("rlhf", {}).update(gkd)
    composer = build_composer(parse_config(data).composition)
    saved_args = {k: getattr(trainer.args, k) for k in gkd}
    saved_composer = trainer.kd_composer
    for key, value in gkd.items():
        setattr(trainer.args, key, value)
    trainer.use_composer(composer)
    trainer.kd_reset_metrics()  # what earlier tests computed outside a block is not this block's
    try:
        yield composer
    finally:
        for key, value in saved_args.items():
            setattr(trainer.args, key, value)
        trainer.use_composer(saved_composer)
        for mode in ("train", "eval"):
            trainer.custom_metrics[mode].clear()
        trainer.kd_reset_metrics()


def metric_values(trainer: Any, mode: str = "train") -> dict[str, float]:
    """What ms-swift would log for the metrics recorded since the last call (and reset them)."""
    prefix = "eval_" if mode == "eval" else ""
    values = trainer.compute_custom_metrics(trainer.custom_metrics[mode], prefix)
    values.update(trainer.kd_metric_values(mode))
    return values


class ForwardCounter:
    """Counts forward calls of a module (a real forward hook, removed on exit)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.calls = 0

    def __enter__(self) -> ForwardCounter:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def __exit__(self, *_: Any) -> None:
        self.handle.remove()


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for child processes: offline hub, and the torchvision start-up fix even
    where the `.pth` hook is not installed (a `sitecustomize` on PYTHONPATH does the same)."""
    from kdcompose.compat.torchvision_ops import PTH_LINE, startup_hook_installed

    env = {**os.environ, **tiny_run_env()}
    if not startup_hook_installed():
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(PTH_LINE, encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return env


def run_command(args: list[str], tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`args` in a process of its own; a `kdcompose` command (`kdcompose_command(...)`) is forked
    from a process that has imported ms-swift already (`forked_cli`: 10 s less each)."""
    env = subprocess_env(tmp_path)
    prefix = kdcompose_command()
    if args[: len(prefix)] == prefix:
        return run_cli(args[len(prefix) :], env, timeout=timeout)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


LAUNCHER_ENV = (*SINGLE_PROCESS_ENV, "NPROC_PER_NODE")
"""What torchrun (or an in-process one-rank world of an earlier test) leaves in the environment."""


def train_as_user(
    config: Path,
    tmp_path: Path,
    nproc: int | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """`kdcompose train CONFIG` started as a user's shell would: no launcher variables (this
    process may hold a one-process world from an in-process test), `NPROC_PER_NODE` only where
    asked, plus `extra_env`."""
    env = {k: v for k, v in subprocess_env(tmp_path).items() if k not in LAUNCHER_ENV}
    if nproc is not None:
        env["NPROC_PER_NODE"] = str(nproc)
    env.update(extra_env or {})
    return run_cli(["train", str(config)], env, timeout=timeout)


def kdcompose_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcompose.cli", *args]


def swift_command(*args: str) -> list[str]:
    """`swift rlhf ...` exactly as a user types it (the console script of this interpreter)."""
    swift = Path(sys.executable).with_name("swift")
    return [str(swift) if swift.exists() else "swift", "rlhf", *args]


def step_logs(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of the run's `logging.jsonl` (ms-swift writes it under v<N>-<time>/)."""
    files = sorted(output_dir.glob("**/logging.jsonl"))
    assert files, f"no logging.jsonl under {output_dir}"
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and not any(k in r for k in AGGREGATE_KEYS)]


def args_json(output_dir: Path) -> dict[str, Any]:
    files = sorted(output_dir.glob("**/args.json"))
    assert files, f"no args.json under {output_dir}"
    return json.loads(files[-1].read_text())
