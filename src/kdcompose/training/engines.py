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
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from kdcompose.errors import ConfigIssue
from kdcompose.sharding import call_through_head, gathered_lm_head, is_sharded, zero3_partitioned

__all__ = [
    "call_through_head",
    "engine_issues",
    "gathered_lm_head",
    "is_sharded",
    "prepare_engine",
    "zero3_partitioned",
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
