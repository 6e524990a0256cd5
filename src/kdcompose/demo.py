"""`kdcompose demo`: a complete distillation run on this machine, in about a minute on CPU.

Why it exists: the first thing a new user should see is the whole loop working — a config,
the printed formula, a progress bar, one metric per loss term, TensorBoard events, a
checkpoint — before pointing kdcompose at real models. Everything is local: a tiny random
Qwen2-VL teacher and a smaller student built from transformers' config classes with a local
tokenizer and processor (`kdcompose.testing`, cached under `$KDCOMPOSE_CACHE`, default
`~/.cache/kdcompose`), and a synthetic image-caption dataset written into the output folder.

The run is a real one: the demo writes an ordinary kdcompose YAML config into the output
folder and trains it through the same launcher as `kdcompose train` (validation, ms-swift's
GKD pipeline, the kdcompose trainer), so `kdcompose train <out>/demo.yaml` repeats it and the
file is a starting point for one's own config.

The loss is `lm_jsd + ce + visual_kd`. The tiny teacher's language model is 96 wide and the
student's 64, and the aligner (the vision-to-language merger) outputs the language model's
width, so the `aligner` target carries `projector: linear` — a trainable 64->96 map saved
with the student's checkpoint. The vision towers have the same width (32), so the `vit`
target compares them directly. Vision tower and aligner are unfrozen (ms-swift freezes both
by default in full fine-tuning), so feature KD actually moves them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

DEFAULT_OUTPUT_DIR = "kdcompose-demo"
DEFAULT_STEPS = 40
FAMILY = "qwen2_vl"
DATASET_SIZE = 64
CONFIG_NAME = "demo.yaml"
RUNS_DIR = "runs"
TB_ENV = "TENSORBOARD_LOGGING_DIR"
TERM_METRICS: tuple[str, ...] = (
    "llm_kd_loss",
    "sft_loss",
    "vision_kd_loss",
    "vision_kd_loss_vit",
    "vision_kd_loss_aligner",
)
"""The per-term metrics the demo's loss logs (each weighted; the parts add up to `loss`)."""


def _q(value: Any) -> str:
    """A YAML scalar for `value` (JSON is valid YAML and quotes paths safely)."""
    return json.dumps(value)


def demo_config_text(
    teacher: Path, student: Path, dataset: Path, output_dir: Path, steps: int, *, family: str = FAMILY
) -> str:
    """The demo's kdcompose config, commented so it reads as an example."""
    from kdcompose.testing import SWIFT_MODEL_TYPE, SWIFT_TEMPLATE

    model_type, template = SWIFT_MODEL_TYPE[family], SWIFT_TEMPLATE[family]
    logging_steps = max(1, min(5, steps // 8))
    return f"""\
# kdcompose demo config: a tiny random {family} teacher distilled into a smaller student on CPU.
# Written by `kdcompose demo`; run it again with:  kdcompose train {output_dir / CONFIG_NAME}
# For your own models, start from the configs/ folder of the kdcompose repository and change
# model / teacher_model / dataset; `kdcompose validate CONFIG` checks a config without loading models.
model:
  # student: text hidden 64, 2 layers; teacher: text hidden 96, 3 layers; both vision towers 32 wide
  model: {_q(str(student))}
  model_type: {model_type}
  teacher_model: {_q(str(teacher))}
  teacher_model_type: {model_type}
  check_model: false          # local folders: do not ask the model hub
  torch_dtype: float32
template:
  template: {template}
  max_length: 256
data:
  dataset: [{_q(str(dataset))}]
  split_dataset_ratio: 0
  dataset_num_proc: 1
tuner:
  tuner_type: full
  freeze_vit: false           # ms-swift freezes the vision tower by default; visual KD must move it
  freeze_aligner: false
training:
  output_dir: {_q(str(output_dir / RUNS_DIR))}
  max_steps: {steps}
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 1  # ms-swift's default accumulates to 16 samples per step
  learning_rate: 5.0e-4
  gradient_checkpointing: false   # tiny models: recomputation costs more than it saves
  logging_steps: {logging_steps}
  save_strategy: steps
  save_steps: {steps}   # one checkpoint, at the end
  save_only_model: true
  eval_strategy: "no"
  report_to: [tensorboard]
  dataloader_num_workers: 0
  seed: 42
rlhf:
  rlhf_type: gkd
  lmbda: 0                    # dataset completions only; 0.5: half the batches sampled by the student
  max_completion_length: 16
  temperature: 0.9
  loss_terms:
    lm_jsd: {{weight: 1.0, beta: 0.5}}    # generalized JSD between student and teacher LM logits
    ce: {{weight: 0.5}}                   # cross-entropy on the dataset's captions
    visual_kd:                          # feature KD on the vision side
      weight: 1.0
      vit: {{distance: cosine}}           # vision tower output: 32 wide in both models
      aligner:                          # merger output = the LM width: 64 (student) vs 96 (teacher)
        distance: mse
        projector: linear               # a trainable 64->96 map, saved with the student's checkpoint
"""


def prepare_demo(output_dir: Path, steps: int, stdout: TextIO) -> Path:
    """Build (or reuse) the models and data, write the config; return the config's path."""
    from kdcompose.testing import build_caption_dataset, build_tiny_pair, cache_root

    start = time.perf_counter()
    print(f"kdcompose demo: tiny {FAMILY} teacher and student, cache {cache_root()}", file=stdout, flush=True)
    teacher, student = build_tiny_pair(FAMILY)
    dataset = build_caption_dataset(output_dir / "data", n=DATASET_SIZE, seed=0, image=True)
    config_path = output_dir / CONFIG_NAME
    config_path.write_text(demo_config_text(teacher, student, dataset, output_dir, steps), encoding="utf-8")
    print(
        f"kdcompose demo: {DATASET_SIZE} synthetic image-caption samples in {dataset.parent}\n"
        f"kdcompose demo: config written to {config_path} ({time.perf_counter() - start:.1f} s)\n"
        "kdcompose demo: the aligner target uses `projector: linear` because the student's aligner is "
        "64 wide and the teacher's 96; the vision towers are both 32 wide, so `vit` needs none.",
        file=stdout,
        flush=True,
    )
    return config_path


def _runs(folder: Path) -> set[Path]:
    return {p for p in folder.glob("v*-*") if p.is_dir()} if folder.is_dir() else set()


def _last_step_row(log: Path) -> Mapping[str, Any]:
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "train_loss" not in r]
    return steps[-1] if steps else {}


def _terms_line(row: Mapping[str, Any]) -> str:
    """`llm_kd_loss 0.0097 + sft_loss 5.77 + vision_kd_loss 0.17 (vit 0.17 + aligner 0.00074)`."""
    prefix = "vision_kd_loss_"
    found = {k[len(prefix) :]: float(v) for k, v in row.items() if k.startswith(prefix)}
    order = [t for t in ("vit", "aligner", "deepstack") if t in found] + sorted(
        set(found) - {"vit", "aligner", "deepstack"}
    )
    parts = {name: found[name] for name in order}
    terms = []
    for key in ("llm_kd_loss", "sft_loss", "vision_kd_loss"):
        if key in row:
            text = f"{key} {float(row[key]):.4g}"
            if key == "vision_kd_loss" and parts:
                text += " (" + " + ".join(f"{name} {value:.2g}" for name, value in parts.items()) + ")"
            terms.append(text)
    return " + ".join(terms)


def summary(run_dir: Path, config_path: Path, seconds: float, tb_dir: str | None = None) -> str:
    """Where the run's outputs are and what to do next."""
    log = run_dir / "logging.jsonl"
    args_file = run_dir / "args.json"
    args = json.loads(args_file.read_text(encoding="utf-8")) if args_file.is_file() else {}
    tb_dir = tb_dir or args.get("logging_dir") or str(run_dir / "runs")
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    checkpoint = str(checkpoints[-1]) if checkpoints else "(none saved)"
    last = _last_step_row(log) if log.is_file() else {}
    terms = _terms_line(last)
    lines = [
        "",
        f"kdcompose demo: done in {seconds:.0f} s.",
        f"  run folder    {run_dir}",
        f"  config        {config_path}   (kdcompose train {config_path} runs it again)",
        f"  metrics       {log}",
        f"  TensorBoard   tensorboard --logdir {tb_dir}",
        f"  checkpoint    {checkpoint}   (student weights + kdcompose_projectors.safetensors)",
        f"  plot          kdcompose plot {run_dir}",
    ]
    if last:
        lines.append(f"  last step     loss {float(last['loss']):.4g} = {terms}")
        lines.append(
            "  (random tiny models: both LM distributions are nearly uniform, so llm_kd_loss stays small; "
            "the demo shows the machinery, not distillation quality)"
        )
    lines += [
        "Next: copy a config from configs/ in the kdcompose repository (configs/full_composition.yaml has "
        "all three terms),",
        "set model / teacher_model / dataset to your own, check it with `kdcompose validate CONFIG`, then "
        "`kdcompose train CONFIG`.",
    ]
    return "\n".join(lines)


def run_demo(
    output_dir: str | os.PathLike[str] = DEFAULT_OUTPUT_DIR,
    steps: int = DEFAULT_STEPS,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The `kdcompose demo` command; returns the exit code (that of `kdcompose train`)."""
    from kdcompose.integrations.swift.launch.command import train
    from kdcompose.testing import tiny_run_env

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if steps < 1:
        print(f"kdcompose demo: --steps must be >= 1, got {steps}", file=stderr)
        return 2
    start = time.perf_counter()
    for key, value in tiny_run_env().items():  # everything is local: never wait on a model hub
        os.environ.setdefault(key, value)
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # ms-swift's start-up log would bury the demo's output
    output = Path(output_dir).expanduser().absolute()
    output.mkdir(parents=True, exist_ok=True)
    config_path = prepare_demo(output, steps, stdout)
    before = _runs(output / RUNS_DIR)
    # ms-swift only sets TENSORBOARD_LOGGING_DIR when it is unset (`setdefault`), so a value left
    # by an earlier run in this process, or inherited, would send the events elsewhere: the demo's
    # go into its own run folder.
    inherited = os.environ.pop(TB_ENV, None)
    try:
        code = train(str(config_path), stdout=stdout, stderr=stderr)
        tb_dir = os.environ.get(TB_ENV)
    finally:
        os.environ.pop(TB_ENV, None)
        if inherited is not None:
            os.environ[TB_ENV] = inherited
    if code != 0:
        return code
    new = _runs(output / RUNS_DIR) - before
    if not new:  # nothing was written (e.g. no rank saved): nothing to summarise
        return code
    run_dir = max(new, key=lambda p: p.stat().st_mtime)
    print(summary(run_dir, config_path, time.perf_counter() - start, tb_dir), file=stdout, flush=True)
    return code
