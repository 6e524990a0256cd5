"""Preemption with real signals and real processes: checkpoints complete or absent, a save on
SIGTERM, and `kdcompose train CONFIG --resume` as the one command to continue.

One uninterrupted reference run, then one scenario per process layout, each a sequence of
`kdcompose train` processes on the same `output_dir`, as a preempted job would be restarted:

* one process: killed during its first save by two SIGTERMs (exit 143, nothing complete); `--resume`
  starts fresh and is SIGKILLed at a random step, during a save or in the middle of a step; the
  incomplete checkpoint left behind is refused by path, naming the newest complete one; `--resume`
  continues from that one and gets one SIGTERM in the middle of a step (exit 75, a complete
  checkpoint of the reached step); `--resume` trains to the end; `--resume` once more has nothing
  to do. `KDCOMPOSE_PREEMPTION_SOAK=N` adds N more random SIGKILL rounds.
* two processes, DDP (gloo): SIGTERM to rank 1 only (a node of a multi-node job reclaimed), in the
  middle of step 5, the first of the second epoch: both ranks agree to stop after that step;
  `--resume` continues inside that epoch (the sampler must give step 6 the second epoch's order,
  not replay the first's: the bug this caught gave step 4 of such a run epoch 1's batches).
* two processes, DeepSpeed ZeRO-2: SIGTERM to every process of the job at once (what SLURM does:
  `kdcompose train`, torchrun and both workers) while a scheduled checkpoint is being written;
  `--resume`.

Every row any of these processes logged must equal the reference run's row of that step: exactly in
one process, within 1e-5 on two (the reference is one process with 2 micro-batches per step, which
two ranks with one each match: measured equal to the logged digits, gradient norm to ~1e-7).

A test plugin (`tests/support/hold_plugin.py`) holds the process at the chosen point (inside the save of
step K, or at the last micro-batch of step K + 1) until the test releases it, so every signal lands
where the test says on a machine under any load; nothing waits a fixed time to assume progress. The random
choices come from `KDCOMPOSE_PREEMPTION_SEED` (printed; random when unset).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import psutil
import pytest
from forked_cli import start_cli
from swift_support import (
    LAUNCHER_ENV,
    sections,
    subprocess_env,
    train_as_user,
    write_config,
)

from kdcompose.training import checkpoints
from kdcompose.training.checkpoints import COMPLETE_MARKER
from kdcompose.training.preemption import EXIT_PREEMPTED, EXIT_SIGTERM, REPEAT_AFTER_S

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]
pytest.importorskip("deepspeed")

STEPS = 6
TERMS = {
    "lm_jsd": {},
    "ce": {"weight": 0.3, "schedule": {"kind": "linear", "start": 1.0, "end": 0.1, "total_steps": STEPS}},
    "visual_kd": {"weight": 0.5, "aligner": {"distance": "mse", "projector": "linear"}},
}
LORA = {"tuner_type": "lora", "lora_rank": 4, "target_modules": ["all-linear"]}
COMPARED = ("loss", "llm_kd_loss", "sft_loss", "sft_loss_weight", "vision_kd_loss", "learning_rate")
STEP_KEY = "global_step/max_steps"
HOLD_PLUGIN = Path(__file__).resolve().parents[1] / "support" / "hold_plugin.py"
TIMEOUT_S = 900
"""Generous on purpose: the machine may be loaded; polling ends as soon as the condition holds."""
SEED = int(os.environ.get("KDCOMPOSE_PREEMPTION_SEED") or random.SystemRandom().randrange(10**6))
SOAK_ROUNDS = int(os.environ.get("KDCOMPOSE_PREEMPTION_SOAK") or 0)


def _config(
    tmp: Path,
    name: str,
    *,
    nproc: int | None = None,
    file: str | None = None,
    hold: bool = True,
    **extra: Any,
) -> Path:
    """The tiny LoRA run: 8 samples, 2 per optimizer step (2 micro-batches of 1 in one process, or
    1 per rank), so epochs have 4 steps and a resume crosses an epoch; a checkpoint every step,
    `save_total_limit: 1` (a kill during a save must still leave the previous checkpoint).
    `hold`: load the test plugin (not for the configs this test process loads itself)."""
    settings: dict[str, Any] = {
        "dataset_size": 8,
        "max_steps": STEPS,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1 if nproc else 2,
        "save_strategy": "steps",
        "save_steps": 1,
        "save_total_limit": 1,
        "save_only_model": False,
        "freeze_aligner": False,
        **LORA,
        **extra,
    }
    data = sections(tmp / name, rlhf={"loss_terms": TERMS}, **settings)
    if hold:
        data["plugins"] = [str(HOLD_PLUGIN)]
    return write_config(tmp / f"{file or name}.yaml", data)


# ---------------------------------------------------------------------- processes


class Train:
    """One `kdcompose train` process, started as a user's shell would, in a session of its own
    (forked from a process that imported ms-swift already: `tests/support/forked_cli.py`)."""

    def __init__(
        self,
        config: Path,
        tmp: Path,
        *,
        resume: bool = True,
        nproc: int | None = None,
        hold: str | None = None,
    ) -> None:
        Train.count = getattr(Train, "count", 0) + 1
        self.name = f"{config.stem}-{Train.count}"
        self.gate = tmp / f"gate-{self.name}"
        self.gate.mkdir()
        env = {k: v for k, v in subprocess_env(tmp).items() if k not in LAUNCHER_ENV}
        env.update(KDCOMPOSE_TEST_HOLD_DIR=str(self.gate), KDCOMPOSE_TEST_HOLD=hold or "")
        if nproc:
            env["NPROC_PER_NODE"] = str(nproc)
        self.stdout, self.stderr = tmp / f"{self.name}.out", tmp / f"{self.name}.err"
        argv = ["train", str(config), *(["--resume"] if resume else [])]
        self.process = start_cli(argv, env, stdout=self.stdout, stderr=self.stderr, new_session=True)
        self.tree: list[psutil.Process] = []

    @property
    def text(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def wait_until(self, condition: Any, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            assert self.process.poll() is None, (
                f"{self.name} ended ({self.process.returncode}) before {what}:\n" + (self.text[-4000:])
            )
            assert time.monotonic() < deadline, (
                f"{self.name}: no {what} within {TIMEOUT_S}s\n" + self.text[-4000:]
            )
            time.sleep(0.05)

    def wait_held(self, ranks: int = 1) -> None:
        self.wait_until(lambda: all((self.gate / f"held-{r}").exists() for r in range(ranks)), "hold point")
        self.tree = [
            psutil.Process(self.process.pid),
            *psutil.Process(self.process.pid).children(recursive=True),
        ]

    def signal_rank(self, rank: int, sig: int) -> None:
        """Send `sig` to the worker process of `rank` alone."""
        os.kill(int((self.gate / f"held-{rank}").read_text()), sig)

    def release(self) -> None:
        (self.gate / "release").write_text("go")

    def signal(self, sig: int, *, every_process: bool = False) -> None:
        targets = self.tree if every_process else [psutil.Process(self.process.pid)]
        for proc in targets:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)

    def finish(self) -> int:
        """The exit status, once this process and everything it started have ended."""
        code = self.process.wait(timeout=TIMEOUT_S)
        psutil.wait_procs([p for p in self.tree if p.pid != self.process.pid], timeout=TIMEOUT_S)
        return code


def _run_folder(output_dir: Path, before: set[Path]) -> Path:
    """The version folder a process created (ms-swift: `v<N>-<time>`)."""
    (new,) = set(checkpoints.run_dirs(output_dir)[1:]) - before
    return new


def _rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The per-step rows of a run's logging.jsonl (a killed run's last line may be cut short)."""
    path = run_dir / "logging.jsonl"
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row and STEP_KEY in row:
            rows[int(str(row[STEP_KEY]).split("/")[0])] = row
    return rows


@dataclass
class Segment:
    """One process of a scenario: what it was told, how it ended, what it logged and left."""

    name: str
    code: int
    run_dir: Path
    rows: dict[int, dict[str, Any]]
    text: str
    notes: dict[str, Any] = field(default_factory=dict)


def _segment(name: str, train: Train, output_dir: Path, before: set[Path], **notes: Any) -> Segment:
    code = train.finish()
    run_dir = _run_folder(output_dir, before)
    return Segment(name, code, run_dir, _rows(run_dir), train.text, notes)


def _versions(output_dir: Path) -> set[Path]:
    return set(checkpoints.run_dirs(output_dir)[1:])


# ---------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    print(f"\nKDCOMPOSE_PREEMPTION_SEED={SEED}")
    return tmp_path_factory.mktemp("preemption")


@pytest.fixture(scope="module")
def reference(tmp) -> dict[int, dict[str, Any]]:
    """The uninterrupted run: one process, no checkpoints."""
    config = _config(tmp, "reference", save_strategy="no")
    result = train_as_user(config, tmp)
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = checkpoints.run_dirs(tmp / "reference")[1:]
    rows = _rows(run)
    assert sorted(rows) == list(range(1, STEPS + 1))
    return rows


DDP_STOP = 5
"""The step the DDP scenario stops after: the first of the second epoch (4 steps an epoch)."""
KILL_ROOM = STEPS - 4
"""The newest complete checkpoint must stay at or below this step for the SIGTERM round after the kills
(it stops at most 3 steps later, before the last step)."""


def _kill_point(resumed: int, rng: random.Random, progress: bool) -> tuple[str, int]:
    """A random place to SIGKILL a run resumed at step `resumed` (0: fresh): inside the save of a step,
    or in the middle of a step (its last micro-batch). `progress`: leave a newer complete checkpoint
    than `resumed` behind."""
    where = rng.choice(["save", "step"])
    if progress:
        low = resumed + 2 if where == "save" else resumed + 1
        return where, rng.randint(low, KILL_ROOM if where == "step" else KILL_ROOM + 1)
    return where, resumed + 1 if where == "save" else resumed  # nothing new is completed


def _random_kill(config: Path, tmp: Path, out: Path, rng: random.Random, name: str) -> Segment:
    """`--resume`, then SIGKILL at a random step, held inside a save or in the middle of a step."""
    resumed_from = checkpoints.newest_complete_checkpoint(out)
    resumed = checkpoints.checkpoint_global_step(resumed_from) if resumed_from else 0
    where, step = _kill_point(
        resumed, rng, progress=resumed == 0 or (resumed < KILL_ROOM - 1 and rng.random() < 0.5)
    )
    before = _versions(out)
    train = Train(config, tmp, hold=f"{where}:{step}")
    train.wait_held()
    time.sleep(rng.uniform(0, 0.3))  # anywhere in the hold: the process is there whatever the delay
    train.signal(signal.SIGKILL)
    return _segment(name, train, out, before, kill=f"{where}:{step}", resumed_from=resumed_from)


@pytest.fixture(scope="module")
def one_process(tmp, reference) -> dict[str, Any]:
    from kdcompose.integrations.swift.launch.command import train as kdcompose_train

    rng = random.Random(SEED)
    config, out = _config(tmp, "one"), tmp / "one"
    own = _config(tmp, "one", file="one-in-process", hold=False)  # the same run, without the test plugin
    segments: list[Segment] = []

    # 1. two SIGTERMs during the first save: the second ends the process at once, mid-save
    before = _versions(out)
    train = Train(config, tmp, hold="save:1")
    train.wait_held()
    train.signal(signal.SIGTERM)
    train.wait_until(lambda: "SIGTERM received" in train.text, "the first SIGTERM's message")
    sent = time.monotonic()
    while time.monotonic() - sent < REPEAT_AFTER_S + 0.5:
        time.sleep(0.05)  # a repeat sooner than REPEAT_AFTER_S counts as the same signal
    train.signal(signal.SIGTERM)
    segments.append(_segment("double-sigterm-in-first-save", train, out, before))

    # 2. (+ soak rounds) `--resume` with nothing complete starts fresh; SIGKILL at a random moment
    for index in range(1 + SOAK_ROUNDS):
        segments.append(_random_kill(config, tmp, out, rng, f"sigkill-{index}"))
    incomplete = checkpoints.incomplete_checkpoints(out)
    refused_out, refused_err = StringIO(), StringIO()
    refused = kdcompose_train(
        str(own),
        overrides=[f"training.resume_from_checkpoint={json.dumps(incomplete[-1])}"],
        stdout=refused_out,
        stderr=refused_err,
    )
    refusal = {"code": refused, "text": refused_err.getvalue(), "checkpoint": incomplete[-1]}
    refusal["newest"] = checkpoints.newest_complete_checkpoint(out)

    # 3. `--resume` after the kill; one SIGTERM in the middle of a step: a checkpoint of that step
    resumed_from = checkpoints.newest_complete_checkpoint(out)
    step = checkpoints.checkpoint_global_step(resumed_from) + rng.randint(1, 2)
    before = _versions(out)
    train = Train(config, tmp, hold=f"step:{step}")
    train.wait_held()
    train.signal(signal.SIGTERM)
    train.wait_until(lambda: "SIGTERM received" in train.text, "the SIGTERM's message")
    train.release()
    segments.append(
        _segment("sigterm-mid-step", train, out, before, step=step + 1, resumed_from=resumed_from)
    )

    # 4. `--resume` to the end; 5. `--resume` of the finished run
    before = _versions(out)
    segments.append(_segment("resume-to-end", Train(config, tmp), out, before))
    done_out, done_err = StringIO(), StringIO()
    done = kdcompose_train(str(own), resume=True, stdout=done_out, stderr=done_err)
    return {
        "segments": segments,
        "refusal": refusal,
        "finished": {"code": done, "text": done_out.getvalue() + done_err.getvalue()},
        "versions": _versions(out),
        "out": out,
    }


def _two_ranks(tmp: Path, name: str, hold: str, target: str, **extra: Any) -> dict[str, Any]:
    """A 2-rank run held at `hold`, SIGTERM to `target` (`rank1`: that worker alone; `job`: every
    process), released once the signal has arrived, then `--resume` to the end."""
    config, out = _config(tmp, name, nproc=2, **extra), tmp / name
    before = _versions(out)
    train = Train(config, tmp, resume=False, nproc=2, hold=hold)
    train.wait_held(ranks=2 if target == "rank1" else 1)
    if target == "rank1":
        train.signal_rank(1, signal.SIGTERM)
        arrived = "kdcompose [rank 1/2]: SIGTERM received"
    else:
        train.signal(signal.SIGTERM, every_process=True)
        arrived = "kdcompose [rank 0/2]: SIGTERM received"
    train.wait_until(lambda: arrived in train.text, "the SIGTERM's message")
    train.release()
    stopped = _segment("sigterm", train, out, before)
    before = _versions(out)
    resumed = _segment("resume-to-end", Train(config, tmp, nproc=2), out, before)
    return {"segments": [stopped, resumed], "out": out}


@pytest.fixture(scope="module")
def ddp(tmp, reference) -> dict[str, Any]:
    """SIGTERM to rank 1 alone while both ranks are inside step 5 (epoch 2); no scheduled checkpoint
    before it (`save_steps: 100`): the SIGTERM's is the only one. A rank that stopped alone would
    leave the other waiting in a collective: `ddp_timeout` bounds that failure."""
    return _two_ranks(
        tmp,
        "ddp",
        f"step:{DDP_STOP - 1}",
        "rank1",
        use_cpu=True,
        ddp_backend="gloo",
        save_steps=100,
        ddp_timeout=300,
    )


@pytest.fixture(scope="module")
def zero2(tmp, reference) -> dict[str, Any]:
    """SIGTERM to every process of the job at once while checkpoint-2 is being written."""
    return _two_ranks(tmp, "zero2", "save:2", "job", deepspeed="zero2", save_steps=2)


# ---------------------------------------------------------------------- checks


def _assert_rows_match(segments: list[Segment], reference: dict[int, dict], rel: float) -> None:
    for segment in segments:
        for step, row in segment.rows.items():
            for key in COMPARED + (("grad_norm",) if rel == 0 else ()):
                expected = reference[step][key]
                assert row[key] == pytest.approx(expected, rel=rel, abs=0 if rel == 0 else 1e-9), (
                    segment.name,
                    step,
                    key,
                    row[key],
                    expected,
                )


def test_one_process_every_logged_step_equals_the_uninterrupted_run(one_process, reference):
    segments = one_process["segments"]
    _assert_rows_match(segments, reference, rel=0)
    assert sorted(set().union(*(s.rows for s in segments))) == list(range(1, STEPS + 1))
    print("\n" + "\n".join(f"{s.name}: exit {s.code}, steps {sorted(s.rows)} {s.notes}" for s in segments))


def test_a_second_sigterm_during_the_first_save_leaves_nothing_to_resume(one_process):
    first = one_process["segments"][0]
    assert first.code == EXIT_SIGTERM, first.text[-3000:]
    assert "second SIGTERM: exiting at once" in first.text
    folder = first.run_dir / "checkpoint-1"
    assert folder.is_dir() and not (folder / COMPLETE_MARKER).exists()
    assert "optimizer.pt" not in {p.name for p in folder.iterdir()}, "killed inside the save, as intended"


def test_resume_with_no_complete_checkpoint_starts_fresh_and_says_so(one_process):
    killed_in_first_save, fresh = one_process["segments"][:2]
    assert "no complete checkpoint under" in fresh.text and "starting fresh" in fresh.text
    assert str(killed_in_first_save.run_dir / "checkpoint-1") in fresh.text  # named as not used
    assert min(fresh.rows) == 1


def test_a_sigkill_leaves_the_previous_checkpoint_complete_and_resume_continues_from_it(one_process):
    segments = one_process["segments"]
    for killed, following in itertools.pairwise(segments[1:-1]):  # each kill, and the run after it
        assert killed.code == -signal.SIGKILL
        newest = following.notes["resumed_from"]
        assert newest is not None and checkpoints.is_complete(newest)
        assert f"continuing from {newest}" in following.text
        if following.rows:  # (a soak round may kill before the resumed run's first step)
            assert min(following.rows) == checkpoints.checkpoint_global_step(newest) + 1
        where, step = killed.notes["kill"].split(":")
        expected = int(step) - 1 if where == "save" else int(step)  # inside save K / inside step K + 1
        assert checkpoints.checkpoint_global_step(newest) == expected, killed.notes
        assert "Traceback" not in following.text


def test_an_incomplete_checkpoint_is_refused_by_path_naming_the_newest_complete_one(one_process):
    refusal = one_process["refusal"]
    assert refusal["code"] == 2
    text = refusal["text"]
    assert "training.resume_from_checkpoint" in text and refusal["checkpoint"] in text
    assert refusal["newest"] and refusal["newest"] in text
    assert "Traceback" not in text


def test_one_sigterm_saves_the_reached_step_and_exits_75(one_process):
    stopped, to_end = one_process["segments"][-2:]
    assert stopped.code == EXIT_PREEMPTED, stopped.text[-3000:]
    step = stopped.notes["step"]
    checkpoint = stopped.run_dir / f"checkpoint-{step}"
    assert max(stopped.rows) == step
    assert checkpoints.is_complete(checkpoint)
    assert f"saved a complete checkpoint of step {step}" in stopped.text and "--resume" in stopped.text
    assert "Traceback" not in stopped.text
    assert to_end.code == 0 and f"continuing from {checkpoint}" in to_end.text
    assert sorted(to_end.rows) == list(range(step + 1, STEPS + 1))


def test_resume_after_a_finished_run_has_nothing_to_train(one_process):
    finished = one_process["finished"]
    assert finished["code"] == 0
    assert "the run is finished, nothing to train" in finished["text"]
    assert _versions(one_process["out"]) == one_process["versions"], "no model was loaded, no run folder"


def _assert_two_rank_stop(scenario: dict[str, Any], reference: dict, step: int) -> None:
    stopped, resumed = scenario["segments"]
    assert stopped.code == EXIT_PREEMPTED, stopped.text[-4000:]
    assert max(stopped.rows) == step
    checkpoint = stopped.run_dir / f"checkpoint-{step}"
    assert checkpoints.is_complete(checkpoint), checkpoints.incomplete_reason(checkpoint)
    files = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
    assert {
        "rng_state_0.pth",
        "rng_state_1.pth",
        "kdcompose_projectors.safetensors",
        "kdcompose_state.json",
        "trainer_state.json",
    } <= set(files)
    assert f"after step {step}; complete checkpoint: {checkpoint}" in stopped.text
    assert resumed.code == 0, resumed.text[-4000:]
    assert f"continuing from {checkpoint}" in resumed.text
    assert sorted(resumed.rows) == list(range(step + 1, STEPS + 1))
    _assert_rows_match([stopped, resumed], reference, rel=1e-5)


def test_ddp_two_ranks_stop_on_sigterm_at_the_same_step_and_resume_exactly(ddp, reference):
    _assert_two_rank_stop(ddp, reference, step=DDP_STOP)


def test_zero2_two_ranks_stop_on_sigterm_at_the_same_step_and_resume_exactly(zero2, reference):
    _assert_two_rank_stop(zero2, reference, step=2)
    checkpoint = zero2["segments"][0].run_dir / "checkpoint-2"
    files = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
    shards = {name for name in files if name.startswith("global_step2/") and "optim_states" in name}
    assert len(shards) == 2, sorted(files)  # both ranks' ZeRO-2 optimizer partitions, before the marker


def test_rotation_waits_for_the_marker(tmp_path):
    """transformers deletes old checkpoints inside the save; kdcompose postpones that until the new
    one is marked complete (compat.transformers_rotation), through the name transformers calls."""
    import transformers.trainer as trainer_module

    from kdcompose.compat import transformers_rotation as rotation

    run = tmp_path / "run"
    for step in (1, 2):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    assert rotation.postpone(run)
    try:
        trainer_module.rotate_checkpoints(output_dir=str(run), save_total_limit=1, use_mtime=False)
        assert (run / "checkpoint-1").is_dir(), "deleted before the new checkpoint was marked complete"
        assert rotation.run_postponed(run)
        assert not (run / "checkpoint-1").exists() and (run / "checkpoint-2").is_dir()
    finally:
        rotation.release(run)


def _parse_with_plugin(argv: list[str]) -> Any:
    """ms-swift's own argument parsing, as `swift rlhf` runs it, with kdcompose's plugin."""
    import sys

    from swift import RLHFArguments
    from swift.utils import parse_args

    from kdcompose.integrations.swift import plugin_path
    from kdcompose.integrations.swift.trainer import KDComposeGKDTrainer

    for name in [m for m in sys.modules if m.startswith("_swift_external_")]:
        del sys.modules[name]  # ms-swift imports a plugin file once per process
    try:
        args, remaining = parse_args(RLHFArguments, [*argv, "--external_plugins", str(plugin_path())])
    finally:
        KDComposeGKDTrainer.expect(None)
    assert remaining == []
    return args


def _hand_made(run: Path, step: int, *, complete: bool) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 10)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": STEPS}))
    if complete:
        checkpoints.write_completion_marker(folder, step)
    return folder


def test_the_plugin_route_resumes_with_kdcompose_resume(tmp_path, monkeypatch):
    """`KDCOMPOSE_RESUME=1 swift rlhf ... --external_plugins PLUGIN` picks the checkpoint while
    ms-swift parses its arguments (before any model loads); an incomplete one given by path is refused."""
    from swift_support import swift_args

    from kdcompose.errors import ConfigError
    from kdcompose.testing import to_cli_args

    out = tmp_path / "out"
    good = _hand_made(out / "v0-20250101-000000", 2, complete=True)
    killed = _hand_made(out / "v0-20250101-000000", 3, complete=False)
    argv = to_cli_args(swift_args(out, max_steps=STEPS))
    monkeypatch.setenv("KDCOMPOSE_RESUME", "1")
    assert _parse_with_plugin(argv).resume_from_checkpoint == str(good)
    monkeypatch.delenv("KDCOMPOSE_RESUME")
    with pytest.raises(ConfigError) as info:
        _parse_with_plugin([*argv, "--resume_from_checkpoint", str(killed)])
    (issue,) = info.value.issues
    assert (
        issue.path == "--resume_from_checkpoint"
        and str(killed) in issue.message
        and str(good) in issue.message
    )
    monkeypatch.setenv("KDCOMPOSE_RESUME", "1")
    _hand_made(out / "v1-20250102-000000", STEPS, complete=True)
    with pytest.raises(SystemExit) as done:  # the run is finished: nothing to train, exit 0
        _parse_with_plugin(argv)
    assert done.value.code == 0
