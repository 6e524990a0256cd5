"""Sharded engines: make DeepSpeed start the way a GPU launch would, on any machine, and give
fused losses a gathered ZeRO-3 LM head.

Why this module exists (measured with ms-swift 4.6, transformers 5.19, accelerate 1.15,
DeepSpeed 0.19.8, docs/engines.md):

- One process, `deepspeed: zero2|zero3`, no launcher: nothing sets `RANK` / `WORLD_SIZE` /
  `MASTER_ADDR`, so `deepspeed.initialize` -> `deepspeed.comm.init_distributed` falls back to MPI
  discovery and dies with `No module named 'mpi4py'` (on GPU machines as on CPU ones). A
  launcher would have exported a world of one; `prepare_engine` does the same (free port).
- Several processes on a machine without GPUs: in its DeepSpeed branch transformers builds
  accelerate's `PartialState` without a backend; accelerate finds no GPU, picks no backend and
  sizes the world as 1, so DeepSpeed's batch check fails (`train_batch_size 2 != 2 * 1 * 2`).
  `use_cpu: true` does not help: transformers' CPU branch comes first and never enables DeepSpeed
  (accelerate silently trains without it). `prepare_engine` therefore builds the process-wide
  `PartialState` itself -- gloo, DeepSpeed's comm initialised with it, flagged as DeepSpeed --
  and asks transformers to use that configured state (`accelerator_config.use_configured_state`),
  which it validates (it must be a DeepSpeed state) and keeps. That is what `accelerate launch`
  does before a script builds its `TrainingArguments`.
- `deepspeed` with `use_cpu: true` truly cannot work (see above): `engine_issues` refuses it up
  front, naming the key; without `use_cpu` kdcompose runs DeepSpeed on the CPU with gloo.

On machines with GPUs `prepare_engine` only exports the one-process world (torchrun's ranks
already have theirs); transformers and accelerate pick NCCL as usual.

`gathered_lm_head` is the ZeRO-3 half: a fused loss reads the LM head's weight directly (not
through the module's forward, where ZeRO-3 gathers it), so the weight must be gathered for as
long as the loss runs.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from kdcompose.compat.deepspeed_skip import SUPPORTED_STAGES
from kdcompose.errors import ConfigIssue
from kdcompose.nonfinite import SKIP_STEP
from kdcompose.sharding import call_through_head, gathered_lm_head, is_sharded, zero3_partitioned

__all__ = [
    "call_through_head",
    "engine_issues",
    "gathered_lm_head",
    "is_sharded",
    "prepare_engine",
    "process_issues",
    "skip_step_issues",
    "zero3_partitioned",
    "zero_stage_of",
]

SINGLE_PROCESS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What a launcher exports for each process; `prepare_engine` sets the missing ones for a world of one."""
DEFAULT_DDP_TIMEOUT_S = 1800


def deepspeed_requested(swift_args: Mapping[str, Any]) -> bool:
    """True when the config asks ms-swift for DeepSpeed (`deepspeed: zero2`, a JSON path or dict)."""
    value = swift_args.get("deepspeed")
    return value not in (None, "", False)


def engine_issues(swift_args: Mapping[str, Any], paths: Mapping[str, str]) -> list[ConfigIssue]:
    """Engine combinations that cannot work, each naming its key (checked before any model loads)."""
    if not deepspeed_requested(swift_args):
        return []
    issues: list[ConfigIssue] = []
    if _truthy(swift_args.get("use_cpu")):
        issues.append(
            ConfigIssue(
                paths.get("use_cpu", "training.use_cpu"),
                "cannot be combined with `deepspeed`: transformers then trains without DeepSpeed (silently). "
                "Remove `use_cpu`; on a machine without GPUs kdcompose runs DeepSpeed on the CPU with gloo",
            )
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        issues.append(
            ConfigIssue(
                paths.get("deepspeed", "training.deepspeed"),
                'needs DeepSpeed, which is not installed: pip install "kdcompose[deepspeed]"',
            )
        )
    return issues


def zero_stage_of(value: Any) -> int | None:
    """The ZeRO stage a `deepspeed` setting asks for: one of ms-swift's named configs (`zero0` ...
    `zero3_offload`), a JSON file or a dict (0 when it names no stage); None when it cannot be read
    here (the trainer checks the stage DeepSpeed actually got)."""
    config: Any = value
    if isinstance(value, str):
        named = re.fullmatch(r"(?:default-)?zero(\d)(?:_offload)?", value.strip())
        if named:
            return int(named.group(1))
        try:
            config = json.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    if not isinstance(config, Mapping):
        return None
    try:
        return int((config.get("zero_optimization") or {}).get("stage", 0))
    except (AttributeError, TypeError, ValueError):
        return None


def skip_step_issues(
    swift_args: Mapping[str, Any], terms: Any, paths: Mapping[str, str]
) -> list[ConfigIssue]:
    """`on_nonfinite: skip_step` under DeepSpeed ZeRO stage 0 (no overflow-skip path to use): one
    issue per active term that asks for it, before any model loads."""
    if not deepspeed_requested(swift_args):
        return []
    stage = zero_stage_of(swift_args.get("deepspeed"))
    if stage is None or stage in SUPPORTED_STAGES:
        return []
    key = paths.get("deepspeed", "training.deepspeed")
    return [
        ConfigIssue(
            f"{term.origin}.on_nonfinite",
            f"skip_step under DeepSpeed needs ZeRO stage 1, 2 or 3 (`{key}` asks for stage {stage}); "
            "use a zero1/zero2/zero3 `deepspeed` config, or on_nonfinite: error",
        )
        for term in terms
        if term.spec.on_nonfinite == SKIP_STEP
    ]


def launched_processes() -> int | None:
    """How many processes the run trains on: `WORLD_SIZE` inside a launched worker, else what
    `kdcompose train` will launch (`NPROC_PER_NODE` x `NNODES`, 1 when neither is set); None when
    a launcher variable is not a number (torchrun's `auto` / `gpu`)."""
    try:
        if os.environ.get("WORLD_SIZE") is not None:
            return int(os.environ["WORLD_SIZE"])
        return int(os.environ.get("NPROC_PER_NODE", "1")) * int(os.environ.get("NNODES", "1"))
    except ValueError:
        return None


def process_issues(swift_args: Mapping[str, Any], paths: Mapping[str, str]) -> list[ConfigIssue]:
    """Several processes on a machine without GPUs and without `use_cpu: true`: transformers sets up
    no data parallelism, so every rank would train its own copy (the trainer refuses it too, after
    loading the models; this says it before). DeepSpeed and FSDP set up their own groups."""
    processes = launched_processes()
    if processes is None or processes <= 1 or _truthy(swift_args.get("use_cpu")):
        return []
    if deepspeed_requested(swift_args) or swift_args.get("fsdp") not in (None, "", False, []):
        return []
    if has_accelerator():
        return []
    return [
        ConfigIssue(
            paths.get("use_cpu", "training.use_cpu"),
            f"{processes} processes on a machine without GPUs: without `use_cpu: true` transformers sets "
            "up no distributed data parallel (`ddp_backend: gloo` alone is not enough), so every rank "
            "would train its own copy of the model and log its own loss. Set `use_cpu: true` (with "
            "`ddp_backend: gloo`), or launch on GPUs",
        )
    ]


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def single_process_env() -> dict[str, str]:
    """The launcher variables missing from this process for a world of one (empty under torchrun)."""
    if os.environ.get("WORLD_SIZE") is not None or os.environ.get("LOCAL_RANK") is not None:
        return {}
    values = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    return {key: value for key, value in values.items() if os.environ.get(key) is None}


def has_accelerator() -> bool:
    """Whether accelerate would find a device to run NCCL-like collectives on (CUDA, XPU, NPU, ...)."""
    from accelerate.state import PartialState

    if torch.cuda.is_available():
        return True
    state = PartialState._shared_state
    if state.get("device") is not None:  # a state already exists: trust the device it chose
        return state["device"].type != "cpu"
    try:
        from accelerate.utils import is_npu_available, is_xpu_available
    except ImportError:  # pragma: no cover - accelerate always has them in the tested range
        return False
    return bool(is_xpu_available() or is_npu_available())


def prepare_engine(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Set up what a launcher would before `RLHFArguments` exists; returns the (possibly updated)
    ms-swift keyword arguments. Does nothing unless `deepspeed` is set.

    - Exports `RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 ...` (free `MASTER_PORT`) when no launcher did.
    - Without GPUs: builds accelerate's `PartialState` on gloo (`ddp_backend`, default gloo) with
      DeepSpeed's comm initialised on it, and sets `accelerator_config.use_configured_state` so
      transformers keeps that state instead of re-creating one without a backend.
    """
    if not deepspeed_requested(kwargs):
        return kwargs
    os.environ.update(single_process_env())
    if has_accelerator():
        return kwargs
    _configure_cpu_state(kwargs.get("ddp_backend") or "gloo", kwargs.get("ddp_timeout"))
    kwargs = dict(kwargs)
    if kwargs.get("fp16") is None:
        # ms-swift turns fp16 AMP on for float32/float16 models; DeepSpeed's CPU accelerator refuses
        # fp16 (`Type fp16 is not supported on your device`), where plain CPU training ignores it.
        kwargs["fp16"] = False
    kwargs["accelerator_config"] = {
        **_accelerator_config(kwargs.get("accelerator_config")),
        "use_configured_state": True,
    }
    return kwargs


def _accelerator_config(value: Any) -> dict[str, Any]:
    """The user's `accelerator_config` as a dict (ms-swift's default `dispatch_batches: false` when unset)."""
    if value in (None, ""):
        return {"dispatch_batches": False}
    if isinstance(value, str):
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as handle:
                return dict(json.load(handle))
        return dict(json.loads(value))
    if isinstance(value, Mapping):
        return dict(value)
    return {k: v for k, v in vars(value).items() if not k.startswith("_")}  # an AcceleratorConfig


def _configure_cpu_state(backend: str, timeout_s: Any) -> None:
    """accelerate's process-wide state for DeepSpeed on CPU processes: `backend` collectives,
    world size from the launcher's variables, `distributed_type == DEEPSPEED`."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = PartialState._shared_state
    if (
        state
        and state.get("distributed_type") == DistributedType.DEEPSPEED
        and state.get("backend") == backend
    ):
        return  # already configured (a second run in this process)
    AcceleratorState._reset_state(reset_partial_state=True)
    timeout = timedelta(seconds=int(timeout_s) if timeout_s not in (None, "") else DEFAULT_DDP_TIMEOUT_S)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # accelerate's own switch, as transformers sets it
    try:
        PartialState(backend=backend, timeout=timeout)
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
