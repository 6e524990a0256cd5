"""Ending a training process's process group before the interpreter ends.

Why: a Gloo process group that is still alive when Python finalizes is torn down in arbitrary
order with the objects its worker threads hold, and the process aborts now and then ("terminate
called without an active exception", SIGABRT; pytorch#179291) although training finished. Under
torchrun one aborted rank makes the whole job fail. The trainer, the wrapped model and the
optimizer point at each other (hooks, closures), so they outlive the call that trained until a
garbage collection; collecting first, then destroying the group, removes the cause.
"""

from __future__ import annotations

import gc

import torch.distributed as dist


def release_process_group() -> bool:
    """Collect reference cycles and destroy the default process group, if one is initialized;
    True when there was one. Call it once training has returned, before the process exits."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    gc.collect()
    dist.destroy_process_group()
    return True
