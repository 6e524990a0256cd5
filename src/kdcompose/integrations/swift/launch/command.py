"""`kdcompose train CONFIG.yaml`: validate everything, then run ms-swift's RLHF pipeline.

Order matters: the YAML, every ms-swift argument name, the teacher and the unsupported GKD
settings are checked before `RLHFArguments` exists (its construction already reads model
files), so a bad config costs seconds and names its dotted path. Then the composition is
attached to the arguments (see `spec`), ms-swift's trainer mapping for `gkd` is pointed at
`KDComposeGKDTrainer`, the loss formula is printed, and `rlhf_main` runs.

With `NPROC_PER_NODE` / `NNODES` set (ms-swift's convention), the validated command is
re-launched under `torch.distributed.run`, one `kdcompose train` per process
(`training.torchrun_launcher`); each ends its process group once training returns.

`--resume` continues from the newest complete checkpoint of the config's `output_dir`, chosen
before any model loads (`resume_point`); SIGTERM during training saves a complete checkpoint of
the reached step and exits with `EXIT_PREEMPTED` (`training.preemption`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, TextIO

from kdcompose.compat.swift_self_distillation_notice import without_self_distillation_notice
from kdcompose.composer import LossComposer
from kdcompose.config import KDConfig, load_config
from kdcompose.errors import ConfigError
from kdcompose.integrations.swift import TRAINER_PATH
from kdcompose.integrations.swift.launch.arg_names import swift_list_arguments
from kdcompose.integrations.swift.launch.args import coerce_to_lists, is_swift_teacher_server
from kdcompose.integrations.swift.launch.preflight import check_config
from kdcompose.integrations.swift.runtime import SwiftUnavailableError, prepare_swift_import
from kdcompose.resolve import legacy_llm_kd_weight
from kdcompose.training.engines import free_port, prepare_engine
from kdcompose.training.preemption import EXIT_PREEMPTED, EXIT_SIGTERM, TrainingStopped, grace_seconds
from kdcompose.training.records import loss_terms_of

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, the shell convention for a run stopped with Ctrl-C."""
_TORCHRUN_ENV = ("NPROC_PER_NODE", "MASTER_PORT", "NNODES", "NODE_RANK", "MASTER_ADDR")


def swift_kwargs(config: KDConfig) -> dict[str, Any]:
    """`RLHFArguments` keyword arguments for a config; ConfigError (every problem, with its
    dotted path) when ms-swift would reject it or kdcompose cannot honour it."""
    check_config(config)
    kwargs = coerce_to_lists(config.swift_args, swift_list_arguments())
    kwargs["rlhf_type"] = "gkd"
    return teacher_kwargs(config, kwargs)


TEACHER_MODEL_ARGS = ("teacher_model", "teacher_model_type", "teacher_model_revision", "teacher_adapters")
"""ms-swift arguments that make it load a teacher model (dropped when a provider is the default teacher)."""


def teacher_kwargs(config: KDConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """ms-swift arguments adjusted to where the default teacher is: with ms-swift's own
    `teacher_model_server` ms-swift asks the server for as many tokens as the top-k terms of the
    default teacher read; with any other provider as the default teacher (`rlhf.teacher_cache`)
    no teacher model is loaded (its files need not exist)."""
    source = config.teachers.get("")
    if source is None:
        return kwargs
    if not is_swift_teacher_server(source):
        return {k: v for k, v in kwargs.items() if k not in TEACHER_MODEL_ARGS}
    ks = [r.k for t in config.composer.active_terms for r in t.needs.teacher_topk if not r.teacher]
    if ks and kwargs.get("gkd_logits_topk") is None:
        kwargs = {**kwargs, "gkd_logits_topk": max(ks)}
    return kwargs


def select_trainer() -> str:
    """Point ms-swift's `gkd` trainer entry at kdcompose's trainer; returns the previous entry."""
    from swift.trainers import TrainerFactory

    previous = TrainerFactory.TRAINER_MAPPING["gkd"]
    TrainerFactory.TRAINER_MAPPING["gkd"] = TRAINER_PATH
    return previous


@contextmanager
def trainer_selected(run: Any = None) -> Iterator[None]:
    """For the block: ms-swift's `gkd` entry points at kdcompose's trainer, and the trainer ms-swift
    builds gets `run` (a `RunComposition`: the composer built once for the run, its teachers)."""
    from swift.trainers import TrainerFactory

    from kdcompose.integrations.swift.trainer import KDComposeGKDTrainer

    previous = select_trainer()
    KDComposeGKDTrainer.expect(run)
    try:
        yield
    finally:
        KDComposeGKDTrainer.expect(None)
        TrainerFactory.TRAINER_MAPPING["gkd"] = previous


def run_composition(config: KDConfig) -> Any:
    """What the trainer of a `kdcompose train` run of `config` gets: its composer and teachers."""
    from kdcompose.integrations.swift.trainer import RunComposition

    return RunComposition(
        config.composer, dict(config.teachers), "kdcompose train", teacher_template=config.teacher_template
    )


LOSS_TERMS_ATTR = "kdcompose_loss_terms"
"""The composition as an explicit `loss_terms` block on the arguments: ms-swift saves it in
`args.json`, a record of the run (the trainer gets the composer itself, `trainer_selected`)."""


def record_composition(target: Any, composer: LossComposer) -> None:
    """Attach the composition and the runtime `llm_kd_weight` to an arguments object, as a record."""
    from kdcompose.integrations.swift.trainer import LLM_KD_WEIGHT_ATTR

    setattr(target, LOSS_TERMS_ATTR, loss_terms_of(composer))
    setattr(target, LLM_KD_WEIGHT_ATTR, legacy_llm_kd_weight(composer.terms))


def build_arguments(config: KDConfig, kwargs: dict[str, Any]) -> Any:
    """`RLHFArguments` with the composition recorded on it and on its `training_args` (ms-swift
    builds those inside `RLHFArguments.__post_init__`)."""
    from swift import RLHFArguments

    default = config.teachers.get("")
    quiet = default is not None and not is_swift_teacher_server(default)
    with without_self_distillation_notice() if quiet else nullcontext():  # a provider is the teacher
        args = RLHFArguments(**prepare_engine(kwargs))  # DeepSpeed: the launcher's set-up (engines.py)
    for target in (args, args.training_args):
        record_composition(target, config.composer)
    return args


def teachers_line(config: KDConfig) -> str | None:
    """Where each teacher the active terms read comes from: `teacher: local PATH`,
    `teacher: cache DIR (top-64, 512 samples)`, `teacher tutor: server URL`, ... (None when no
    active term reads a teacher)."""
    requests = [r for t in config.composer.active_terms for r in t.needs.teacher_topk]
    named = sorted({r.teacher for r in requests if r.teacher})
    reads_default = any(not r.teacher for r in requests) or any(
        t.needs.teacher for t in config.composer.active_terms
    )
    parts = []
    if reads_default:
        source = config.teachers.get("")
        local = config.swift_args.get("teacher_model") or "(the student itself)"
        parts.append(f"teacher: {source.provider().describe() if source else f'local {local}'}")
    parts += [f"teacher {name}: {config.teachers[name].provider().describe()}" for name in named]
    return "; ".join(parts) or None


def run(config: KDConfig, resume_from: str | None = None, kwargs: dict[str, Any] | None = None) -> Any:
    """Train with an already validated config and `kwargs` = `swift_kwargs(config)` (computed here
    when not given; the preflight reads both models' files, so `train` hands on its own), from
    checkpoint `resume_from` when given; returns ms-swift's result."""
    from swift import rlhf_main

    kwargs = dict(kwargs) if kwargs is not None else swift_kwargs(config)
    if resume_from:
        kwargs["resume_from_checkpoint"] = resume_from
    arguments = build_arguments(config, kwargs)
    with trainer_selected(run_composition(config)):
        result = rlhf_main(arguments)
    if os.environ.get("LOCAL_RANK") is not None:  # a torchrun worker: end its group cleanly
        from kdcompose.training.process_group import release_process_group

        release_process_group()
    return result


def _torchrun_command(
    config_path: str, overrides: Sequence[str] = (), resume_from: tuple[str, str] | None = None
) -> list[str] | None:
    """The torchrun command that runs one `kdcompose train` per process (None: this is one of them,
    or no launcher variable is set). `resume_from`: (dotted key, checkpoint) chosen by `--resume`,
    handed to every process as a `--set`, so all ranks resume from the same one."""
    if os.environ.get("LOCAL_RANK") is not None:
        return None  # already one of the launched processes
    if os.environ.get("NPROC_PER_NODE") is None and os.environ.get("NNODES") is None:
        return None
    from kdcompose.training.torchrun_launcher import shutdown_timeout_s

    launcher = [sys.executable, "-m", "torch.distributed.run"]
    for key in _TORCHRUN_ENV:
        if os.environ.get(key) is not None:
            launcher += [f"--{key.lower()}", os.environ[key]]
    if os.environ.get("MASTER_PORT") is None and os.environ.get("NNODES", "1") == "1":
        # One node: a port free now, not torchrun's fixed 29500, so two runs on one machine
        # (two jobs, or a job beside a test) do not take each other's rendezvous.
        launcher += ["--master_port", str(free_port())]
    if os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") is None:  # room for a save on SIGTERM
        launcher += ["--shutdown_timeout", str(shutdown_timeout_s(grace_seconds()))]
    sets = [arg for override in overrides for arg in ("--set", override)]
    if resume_from is not None:
        sets += ["--set", f"{resume_from[0]}={json.dumps(resume_from[1])}"]
    return [*launcher, "-m", "kdcompose.cli", "train", config_path, *sets]


def train(
    config_path: str,
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The `kdcompose train` command; returns the exit code (2: invalid config, 1: failure, 75:
    stopped by SIGTERM after saving a complete checkpoint, 130: Ctrl-C, 143: SIGTERM without one).
    `overrides`: `DOTTED.KEY=VALUE` strings (`--set`), applied before validation. `resume`:
    continue from the newest complete checkpoint of the config's `output_dir` (`--resume`)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        print(exc.render(), file=stderr)
        return EXIT_INVALID
    try:
        prepare_swift_import()
    except SwiftUnavailableError as exc:
        print(f"kdcompose train: {exc}", file=stderr)
        return EXIT_FAILED
    from kdcompose.integrations.swift.launch.resume_point import RESUME_KEY, start_point

    resume_path = config.arg_paths.get(RESUME_KEY, f"training.{RESUME_KEY}")
    try:
        kwargs = swift_kwargs(config)
        start = start_point(config.swift_args, resume=resume, path_of=resume_path, source=config.source)
    except ConfigError as exc:
        print(exc.render(), file=stderr)
        return EXIT_INVALID
    try:
        grace_seconds()  # a bad KDCOMPOSE_SIGTERM_GRACE_S fails now, not at the first SIGTERM
    except ValueError as exc:
        print(f"kdcompose train: {exc}", file=stderr)
        return EXIT_INVALID
    main_process = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"
    if start.message and main_process:
        print(f"kdcompose: {start.message}", file=stdout, flush=True)
    if start.finished:
        return EXIT_OK

    composer = config.composer
    resume_set = (resume_path, start.checkpoint) if resume and start.checkpoint else None
    command = _torchrun_command(config_path, overrides, resume_set)
    if command is not None:
        print(
            f"kdcompose: {composer.formula()}\nkdcompose: launching {' '.join(command)}",
            file=stdout,
            flush=True,
        )
        return _run_launcher(command, stderr)
    if main_process:
        print(f"kdcompose: {composer.formula()}", file=stdout, flush=True)
        teachers = teachers_line(config)
        if teachers:
            print(f"kdcompose: {teachers}", file=stdout, flush=True)
    from kdcompose.integrations.swift.launch.run_summary import run_files
    from kdcompose.integrations.swift.launch.startup_errors import startup_errors_as_config_errors
    from kdcompose.nonfinite import NonFiniteLossError
    from kdcompose.teachers.alignment import AlignmentError
    from kdcompose.teachers.audit import TeacherAlignmentError
    from kdcompose.teachers.cache import TeacherCacheError
    from kdcompose.teachers.server_client import TeacherServerError
    from kdcompose.teachers.server_teacher import TeacherResponseShort

    try:
        with startup_errors_as_config_errors(config.swift_args, config.arg_paths, config.source):
            result = run(config, start.checkpoint if resume else None, kwargs)
    except TrainingStopped as stop:
        if main_process:
            print(
                f"kdcompose train: {stop}. Continue with `kdcompose train CONFIG --resume`.",
                file=stderr,
                flush=True,
            )
        return EXIT_PREEMPTED if stop.checkpoint else EXIT_SIGTERM
    except KeyboardInterrupt:
        print(_INTERRUPTED, file=stderr, flush=True)
        return EXIT_INTERRUPTED
    except (
        NonFiniteLossError,
        TeacherServerError,
        TeacherCacheError,
        TeacherResponseShort,
        TeacherAlignmentError,  # the audit: a teacher scored other tokens / another text
        AlignmentError,
    ) as exc:
        # A teacher that cannot be reached, read or aligned is a fault with a clear cause: say it,
        # no traceback.
        print(f"kdcompose train: {exc}", file=stderr, flush=True)
        return EXIT_FAILED
    except ConfigError as exc:  # found once the models are loaded (trainer checks): still a config problem
        print(exc.render(), file=stderr, flush=True)
        return EXIT_INVALID
    if main_process:
        print("\n".join(run_files(result, config.swift_args).lines()), file=stdout, flush=True)
    return EXIT_OK


_INTERRUPTED = (
    "kdcompose train: interrupted (Ctrl-C). Training stopped and its feature hooks were removed; "
    "complete checkpoints saved so far are kept (continue with `kdcompose train CONFIG --resume`)."
)


def _run_launcher(command: list[str], stderr: TextIO) -> int:
    """Run torchrun, passing SIGTERM / SIGINT / SIGHUP on to it and its workers (`launcher`)."""
    from kdcompose.training.torchrun_launcher import run_torchrun

    return run_torchrun(command, stderr, _INTERRUPTED)
