"""`kdcompose demo`: distillation working, measured, on this machine's CPU in about a minute.

What a new user should see first is not the machinery but the point: a student that learns
from a teacher does measurably better than the same student without it. So the demo:

1. **Trains a teacher that knows something** (once; cached by its recipe under
   `$KDCOMPOSE_CACHE`, default `~/.cache/kdcompose/teachers`): the tiny Qwen2-VL teacher learns
   to caption many synthetic pictures — "a large red square in the top left on a white
   background." — whose five attributes are all visible (`kdcompose.testing.pretraining`).
2. **Trains a student on a few labelled pictures, twice, through `kdcompose train`**: once with
   `lm_jsd + ce + visual_kd` (distilled) and once with `ce` alone (the control) — the same
   student, pictures, steps and seed. Both are ordinary kdcompose configs written into the
   output folder (`demo.yaml`, `demo_ce_only.yaml`), run by ms-swift's GKD pipeline with the
   kdcompose trainer, so `kdcompose train <out>/demo.yaml` repeats a run.
3. **Scores all three on held-out pictures** (`kdcompose.testing.evaluation`): the share of
   attribute words right in a greedy caption, and the caption's token accuracy. It prints the
   table, writes `summary.json` and draws `plot.png` (as `kdcompose plot` does) from the
   distilled run's log.

Why the distilled student wins: the few labelled captions say *what* each picture shows, but a
student that has to learn to see from them alone underfits. The teacher saw thousands of
pictures: its vision features (`visual_kd` on the vision tower's and the aligner's outputs,
the same widths in both models) show the student's vision tower what to look at, and its
next-token distributions (`lm_jsd`) say how sure to be of each word.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

DEFAULT_OUTPUT_DIR = "kdcompose-demo"
DEFAULT_STEPS = 60
DEFAULT_SEED = 42
FAMILY = "qwen2_vl"
LABELLED = 64
"""Labelled pictures the students train on (the teacher saw thousands)."""
HELD_OUT = 200
"""Held-out pictures all three models are scored on."""
HELD_OUT_QUICK = 50
CONFIG_NAME = "demo.yaml"
CONTROL_CONFIG_NAME = "demo_ce_only.yaml"
RUNS_DIR = "runs"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "plot.png"
TB_ENV = "TENSORBOARD_LOGGING_DIR"
TERM_METRICS: tuple[str, ...] = (
    "llm_kd_loss",
    "sft_loss",
    "vision_kd_loss",
    "vision_kd_loss_vit",
    "vision_kd_loss_aligner",
)
"""The per-term metrics the distilled run logs (each weighted; the parts add up to `loss`)."""
DATA_SEEDS = {"labelled": 1, "held_out": 1000}
"""The labelled pictures are the first of the teacher's own training stream (a small labelled
subset of its large set); the held-out ones come from a stream no model trains on."""

TRAIN_LOG = "train.log"
"""Each student run's `kdcompose train` output, in its output_dir."""
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUN_LABELS = {"student_distilled": "student, distilled", "student_ce_only": "student, ce only"}
ROWS: tuple[tuple[str, str], ...] = (
    ("teacher", "teacher"),
    ("student_ce_only", "student, ce only"),
    ("student_distilled", "student, distilled"),
)

DISTILLED_TERMS = """\
    lm_jsd: {weight: 1.0, beta: 0.5, topk: 20}  # generalized JSD over the teacher's 20 likeliest tokens
    ce: {weight: 1.0}                   # cross-entropy on the labelled captions (as in the control)
    visual_kd:                          # feature KD on the vision side
      weight: 1.0
      vit: {distance: cosine}           # the vision towers' outputs (32 wide in both)
      aligner: {distance: mse}          # the aligners' outputs (96 wide in both: no projector needed)
"""
CONTROL_TERMS = """\
    ce: {weight: 1.0}                   # the control: the same student, data and steps, no teacher
    lm_jsd: {weight: 0}                 # off (rlhf.llm_kd_weight would add it): the teacher never runs
"""


@dataclass(frozen=True)
class Run:
    """One student run: its name in summary.json, its config, its ms-swift output_dir."""

    key: str
    config: Path
    output_dir: Path


def _q(value: Any) -> str:
    """A YAML scalar for `value` (JSON is valid YAML and quotes paths safely)."""
    return json.dumps(value)


def demo_config_text(
    teacher: Path,
    student: Path,
    dataset: Path,
    output_dir: Path,
    steps: int,
    *,
    distilled: bool = True,
    seed: int = DEFAULT_SEED,
    family: str = FAMILY,
) -> str:
    """A student run's kdcompose config, commented so it reads as an example. `distilled`:
    `lm_jsd + ce + visual_kd`; otherwise the `ce`-only control (everything else the same)."""
    from kdcompose.testing import SWIFT_MODEL_TYPE, SWIFT_TEMPLATE

    model_type, template = SWIFT_MODEL_TYPE[family], SWIFT_TEMPLATE[family]
    logging_steps = 2 if steps >= 8 else 1
    what = "distilled from" if distilled else "trained without (control; the teacher is loaded, never run)"
    name = "distilled" if distilled else "ce_only"
    config_name = CONFIG_NAME if distilled else CONTROL_CONFIG_NAME
    return f"""\
# kdcompose demo: a tiny {family} student {what} a trained tiny teacher, on CPU.
# Written by `kdcompose demo`; run it again with:  kdcompose train {output_dir / config_name}
# For your own models, start from the configs/ folder of the kdcompose repository and change
# model / teacher_model / dataset; `kdcompose validate CONFIG` checks a config without loading models.
model:
  # teacher: trained (text 96 wide, 3 layers; vision tower 2 blocks). student: 2 of the teacher's
  # 3 language layers and its aligner, a new random vision tower of 1 block
  model: {_q(str(student))}
  model_type: {model_type}
  teacher_model: {_q(str(teacher))}
  teacher_model_type: {model_type}
  check_model: false          # local folders: do not ask the model hub
  torch_dtype: float32
template:
  template: {template}
  max_length: 128
data:
  dataset: [{_q(str(dataset))}]
  split_dataset_ratio: 0
  dataset_num_proc: 1
tuner:
  tuner_type: full
  freeze_llm: true            # the inherited language model stays; the student learns to see
  freeze_vit: false           # ms-swift freezes the vision tower by default; it is what trains here
  freeze_aligner: false
training:
  output_dir: {_q(str(output_dir / RUNS_DIR / name))}
  max_steps: {steps}
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 1  # ms-swift's default accumulates to 16 samples per step
  learning_rate: 4.0e-3
  lr_scheduler_type: cosine
  warmup_steps: 5
  gradient_checkpointing: false   # tiny models: recomputation costs more than it saves
  logging_steps: {logging_steps}
  save_strategy: steps
  save_steps: {steps}   # one checkpoint, at the end
  save_only_model: true
  eval_strategy: "no"
  report_to: [tensorboard]
  dataloader_num_workers: 0
  seed: {seed}
rlhf:
  rlhf_type: gkd
  lmbda: 0                    # the labelled captions only; 0.5: half the batches sampled by the student
  max_completion_length: 24
  temperature: 1.0
  loss_terms:
{DISTILLED_TERMS if distilled else CONTROL_TERMS}"""


def _newest_run(folder: Path) -> Path | None:
    """ms-swift's newest `v<N>-<time>` run folder under an output_dir."""
    runs = [p for p in folder.glob("v*-*") if p.is_dir()] if folder.is_dir() else []
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _logged_step(output_dir: Path) -> int:
    """The last global step the newest run under `output_dir` has logged (0 before the first)."""
    from kdcompose.plot import LOG_FILE, read_rows, row_step

    run = _newest_run(output_dir)
    if run is None or not (run / LOG_FILE).is_file():
        return 0
    steps = [row_step(r) for r in read_rows(run / LOG_FILE)[0]]
    return max((s for s in steps if s is not None), default=0)


def _newest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    return checkpoints[-1] if checkpoints else None


def format_table(scores: Mapping[str, Mapping[str, float] | None]) -> str:
    """The demo's table; a row whose run was skipped (`--quick`) says so."""
    lines = [f"{'':22}attributes right   token accuracy"]
    for key, label in ROWS:
        score = scores.get(key)
        if score is None:
            lines.append(f"{label:<28}(not run: --quick)")
        else:
            lines.append(f"{label:<28}{score['attributes_right']:.2f}{'':13}{score['token_accuracy']:.2f}")
    return "\n".join(lines)


def metric_description(held_out: int) -> dict[str, Any]:
    return {
        "name": "attributes_right",
        "attributes_right": "share of size / colour / shape / position / background words right in the "
        "model's greedy caption of a held-out picture",
        "token_accuracy": "share of the true caption's tokens (and its end) the model ranks first, "
        "given the caption so far (teacher forcing)",
        "held_out_samples": held_out,
    }


class _Demo:
    """One `kdcompose demo` invocation: paths, printing, and its phases in order."""

    def __init__(self, output: Path, steps: int, seed: int, quick: bool, stdout: TextIO, stderr: TextIO):
        self.output, self.steps, self.seed, self.quick = output, steps, seed, quick
        self.stdout, self.stderr = stdout, stderr
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"kdcompose demo: {text}", file=self.stdout, flush=True)

    def prepare(self) -> tuple[Path, list[Run]]:
        """The trained teacher (cached), the student, the labelled data and the two configs."""
        from kdcompose.testing.caption_task import PROMPT, TaskSpec, task_samples
        from kdcompose.testing.datasets import write_image_dataset
        from kdcompose.testing.pretraining import (
            TEACHER_RECIPE,
            build_student,
            build_trained_teacher,
            is_teacher_cached,
            trained_teacher_dir,
        )

        seen = TEACHER_RECIPE.vision_samples + TEACHER_RECIPE.samples
        if is_teacher_cached():
            self.say(
                f"teacher: tiny {FAMILY} trained on {seen} synthetic pictures, from the cache "
                f"({trained_teacher_dir()})"
            )
        else:
            self.say(
                f"teacher: training a tiny {FAMILY} on {seen} synthetic pictures (once; cached in "
                f"{trained_teacher_dir()})"
            )
        began = time.perf_counter()
        teacher = build_trained_teacher(stream=self.stderr)
        student = build_student(teacher)
        self.say(
            f"teacher ready in {time.perf_counter() - began:.0f} s; student: 2 of its 3 language layers, "
            "a new random one-block vision tower"
        )
        labelled = task_samples(TaskSpec(), LABELLED, DATA_SEEDS["labelled"])
        dataset = write_image_dataset(self.output / "data" / "labelled", labelled, PROMPT)
        runs = [Run("student_distilled", self.output / CONFIG_NAME, self.output / RUNS_DIR / "distilled")]
        if not self.quick:
            runs.append(
                Run("student_ce_only", self.output / CONTROL_CONFIG_NAME, self.output / RUNS_DIR / "ce_only")
            )
        for run in runs:
            text = demo_config_text(
                teacher,
                student,
                dataset,
                self.output,
                self.steps,
                distilled=run.key == "student_distilled",
                seed=self.seed,
            )
            run.config.write_text(text, encoding="utf-8")
        self.say(
            f"students: {LABELLED} labelled pictures ({dataset}), {self.steps} steps, seed {self.seed}; "
            f"configs {', '.join(str(r.config) for r in runs)}"
        )
        return teacher, runs

    def train(
        self, runs: list[Run], on_finished: Callable[[str, Path], None] | None = None
    ) -> dict[str, Path] | int:
        """`kdcompose train` on each run's config, side by side (one process and one core each:
        the runs are independent, so on two cores the pair takes as long as the slower one).
        `on_finished(key, checkpoint)` is called as soon as a run has ended with its checkpoint,
        while the other may still train. Returns each run's folder, or the exit code of the first
        run that failed."""
        from tqdm.auto import tqdm

        from kdcompose.composer import build_composer
        from kdcompose.config import load_config

        env = {**os.environ, **ONE_THREAD_ENV}
        # ms-swift only sets TENSORBOARD_LOGGING_DIR when it is unset: an inherited value would
        # send both runs' events elsewhere; unset, each run's go into its own run folder.
        env.pop(TB_ENV, None)
        started: dict[str, tuple[Run, subprocess.Popen[bytes], Path]] = {}
        try:
            for run in runs:
                run.output_dir.mkdir(parents=True, exist_ok=True)
                log = run.output_dir / TRAIN_LOG
                formula = build_composer(load_config(run.config).composition).formula()
                self.say(
                    f"{RUN_LABELS[run.key]}: {formula}   (kdcompose train {run.config}; output in {log})"
                )
                command = [sys.executable, "-m", "kdcompose.cli", "train", str(run.config)]
                with log.open("wb") as sink:
                    process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
                started[run.key] = (run, process, log)
            bars = {
                key: tqdm(total=self.steps, desc=RUN_LABELS[key], unit="step", position=i, file=self.stderr)
                for i, key in enumerate(started)
            }
            running = True
            announced: set[str] = set()
            while running:
                codes = [process.poll() for _, process, _ in started.values()]  # every one: sets returncode
                running = any(code is None for code in codes)
                for key, (run, process, _) in started.items():
                    done = _logged_step(run.output_dir) - bars[key].n
                    if done > 0:
                        bars[key].update(done)
                    if on_finished is not None and key not in announced and process.returncode == 0:
                        announced.add(key)
                        checkpoint = _newest_checkpoint(_newest_run(run.output_dir) or run.output_dir)
                        if checkpoint is not None:
                            on_finished(key, checkpoint)
                if running:
                    time.sleep(0.5)
            for bar in bars.values():
                bar.close()
        finally:
            for _, process, _ in started.values():  # Ctrl-C or an error here: stop both runs
                if process.poll() is None:
                    process.terminate()
                    process.wait(timeout=60)
        folders: dict[str, Path] = {}
        for key, (run, process, log) in started.items():
            folder = _newest_run(run.output_dir)
            if process.returncode != 0 or folder is None:
                tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
                print(f"kdcompose demo: {RUN_LABELS[key]} failed ({log}):\n{tail}", file=self.stderr)
                return process.returncode or 1
            folders[key] = folder
        return folders

    def finish(self, scores: dict[str, dict[str, Any]], distilled_run: Path) -> None:
        from kdcompose.plot import PlotError, PlotUnavailableError, plot_run

        held_out = HELD_OUT_QUICK if self.quick else HELD_OUT
        summary = {
            "metric": metric_description(held_out),
            "teacher": scores["teacher"],
            "student_ce_only": scores.get("student_ce_only"),
            "student_distilled": scores["student_distilled"],
        }
        (self.output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        try:
            _, plot = plot_run(distilled_run, self.output / PLOT_FILE)
            plot_line = f"  plot          {plot}   (kdcompose plot {distilled_run})"
        except (PlotError, PlotUnavailableError) as exc:
            plot_line = f"  plot          not drawn: {exc}"
        checkpoint = _newest_checkpoint(distilled_run)
        print("\n" + format_table(summary), file=self.stdout)
        config = self.output / CONFIG_NAME
        lines = [
            "",
            f"held-out pictures: {held_out}; the {'student' if self.quick else 'students'} trained on "
            f"{LABELLED} labelled pictures "
            f"for {self.steps} steps (seed {self.seed}).",
            f"kdcompose demo: done in {time.perf_counter() - self.start:.0f} s.",
            f"  summary       {self.output / SUMMARY_FILE}",
            plot_line,
            f"  distilled run {distilled_run}",
            f"  metrics       {distilled_run / 'logging.jsonl'}",
            f"  checkpoint    {checkpoint}",
            f"  config        {config}   (kdcompose train {config} runs it again)",
            "Next: copy a config from configs/ in the kdcompose repository (configs/full_composition.yaml "
            "has all three terms),",
            "set model / teacher_model / dataset to your own, check it with `kdcompose validate CONFIG`, "
            "then `kdcompose train CONFIG`.",
        ]
        print("\n".join(lines), file=self.stdout, flush=True)


class _Scoring:
    """Scores models on the held-out pictures in one background thread, in the order they are
    handed in: the teacher and the student that finishes first are scored while the other student
    still trains, on the core the finished run freed, so only the last student's scoring is left
    when training ends. One torch thread for all scoring (`evaluate`), set before the thread
    starts, so the scores do not depend on when a model was scored."""

    def __init__(self, quick: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        torch.set_num_threads(1)
        self.held_out_count = HELD_OUT_QUICK if quick else HELD_OUT
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcompose-demo-scoring")
        self.futures: dict[str, Any] = {}
        self.progress: Any = None
        """A tqdm bar the scoring thread advances once it exists (shown when training has ended)."""
        self.scored = 0
        self._task: tuple[Any, Any] | None = None

    def submit(self, key: str, model_dir: Path) -> None:
        if key not in self.futures:
            self.futures[key] = self.pool.submit(self._score, model_dir)

    def results(self, keys: list[str], stderr: TextIO) -> dict[str, dict[str, Any]]:
        """Every model's score, waiting for those still being scored (with a progress bar)."""
        from tqdm.auto import tqdm

        total = self.held_out_count * len(keys)
        with tqdm(
            total=total, initial=self.scored, desc="evaluate", unit="picture", file=stderr, dynamic_ncols=True
        ) as bar:
            self.progress = bar
            try:
                return {key: self.futures[key].result() for key in keys}
            finally:
                self.pool.shutdown(wait=True)

    def _score(self, model_dir: Path) -> dict[str, Any]:
        from kdcompose.testing.evaluation import evaluate, load_model

        held_out, encoder = self._held_out()
        score, captions = evaluate(load_model(model_dir), encoder, held_out, progress=self)
        return {**score.to_dict(), "model": str(model_dir), "example": captions[0]}

    def update(self, pictures: int) -> None:
        """`evaluate`'s progress callback (tqdm's `update`)."""
        self.scored += pictures
        if self.progress is not None:
            self.progress.update(pictures)

    def _held_out(self) -> tuple[Any, Any]:
        if self._task is None:
            from kdcompose.testing import build_processor
            from kdcompose.testing.caption_task import TaskEncoder, TaskSpec, task_samples

            held_out = task_samples(TaskSpec(), self.held_out_count, DATA_SEEDS["held_out"])
            self._task = held_out, TaskEncoder(build_processor(FAMILY), TaskSpec())
        return self._task


def run_demo(
    output_dir: str | os.PathLike[str] = DEFAULT_OUTPUT_DIR,
    steps: int = DEFAULT_STEPS,
    *,
    seed: int = DEFAULT_SEED,
    quick: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The `kdcompose demo` command; returns the exit code (that of a failed `kdcompose train`)."""
    from kdcompose.testing import tiny_run_env

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if steps < 1:
        print(f"kdcompose demo: --steps must be >= 1, got {steps}", file=stderr)
        return 2
    for key, value in tiny_run_env().items():  # everything is local: never wait on a model hub
        os.environ.setdefault(key, value)
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # ms-swift's start-up log would bury the demo's output
    output = Path(output_dir).expanduser().absolute()
    output.mkdir(parents=True, exist_ok=True)
    demo = _Demo(output, steps, seed, quick, stdout, stderr)
    teacher, runs = demo.prepare()
    scoring = _Scoring(quick)

    def score_when_done(key: str, checkpoint: Path) -> None:
        scoring.submit("teacher", teacher)  # first: it waited for a free core
        scoring.submit(key, checkpoint)

    run_dirs = demo.train(runs, score_when_done)
    if isinstance(run_dirs, int):
        scoring.pool.shutdown(wait=True, cancel_futures=True)
        return run_dirs
    scoring.submit("teacher", teacher)
    for key, run_dir in run_dirs.items():
        checkpoint = _newest_checkpoint(run_dir)
        if checkpoint is None:
            print(f"kdcompose demo: {run_dir} has no checkpoint to evaluate", file=stderr)
            scoring.pool.shutdown(wait=True, cancel_futures=True)
            return 1
        scoring.submit(key, checkpoint)
    demo.say(f"scoring the teacher and {len(run_dirs)} student(s) on held-out pictures")
    demo.finish(scoring.results(["teacher", *run_dirs], stderr), run_dirs["student_distilled"])
    return 0
