"""Peak-memory measurement for the benchmarks: extra bytes a block of code needs at its peak.

CPU method (Linux): the process's resident set. Before the block we collect garbage, hand
freed heap pages back to the OS (``malloc_trim``) and take the current RSS as the baseline,
then reset the kernel's high-water mark (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``)
and read ``VmHWM`` after the block. Why RSS and not an allocator counter: PyTorch's CPU
allocator keeps no statistics, and RSS is what the OOM killer sees (it includes allocator
fragmentation, which is part of a method's real cost). Run each case in a fresh process so
that one method's freed-but-retained heap cannot hide another's allocations. Where
``clear_refs`` is not writable we fall back to ``ru_maxrss``, which is only correct when the
block is the first large allocation of the process (the benchmark keeps it that way).

CUDA method: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
``memory_allocated`` before the block (the caching allocator's own accounting).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_PROC_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_PROC_STATUS) as handle:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Current resident set size (falls back to the peak where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def release_free_memory() -> None:
    """Drop garbage and return freed heap pages to the OS so the RSS baseline is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.extra_bytes`` = peak minus baseline."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.baseline = 0
        self.extra_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            self.baseline = rss_bytes()
            self.method = "VmHWM (clear_refs)" if _reset_rss_peak() else "ru_maxrss (fresh process)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _peak_rss_bytes()
        self.extra_bytes = max(0, peak - self.baseline)


def sync(device: str) -> None:
    """Wait for queued device work (a no-op on the CPU), so a timer reads what ran."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class StepMeasurement:
    extra_bytes: int
    memory_method: str
    cold_s: float
    times: list[float]

    @property
    def time_s(self) -> float:
        return min([self.cold_s, *self.times])


def measure_step(
    step: Callable[[], object], grads: list[torch.Tensor], device: str, reps: int
) -> StepMeasurement:
    """The extra peak memory of the first (cold) call of `step`, then `reps` timed calls with the
    gradients of `grads` cleared before each (shared by the loss benchmarks)."""
    sync(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        step()
        sync(device)
        cold = time.perf_counter() - start
    times = []
    for _ in range(reps):
        for g in grads:
            g.grad = None
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return StepMeasurement(memory.extra_bytes, memory.method, cold, times)
