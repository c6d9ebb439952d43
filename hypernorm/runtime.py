"""CPU runtime settings for a training process: the C allocator's thresholds, the OpenMP wait policy and
torch's thread count (docs/performance.md says what each is worth, measured).

Every ``hypernorm`` command applies :func:`configure_cpu` before it loads torch. A script of one's own calls
it once, first thing; importing hypernorm changes nothing::

    import hypernorm.runtime
    hypernorm.runtime.configure_cpu()    # before `import torch` for the wait policy to reach this process
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["ALLOCATOR_THRESHOLD", "configure_cpu", "choose_threads", "set_allocator_thresholds"]

# glibc keeps freed blocks up to this size in its heap (no unmapping, no trimming): feature maps then reuse
# pages instead of faulting them in again every step.
ALLOCATOR_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def set_allocator_thresholds(nbytes: int = ALLOCATOR_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds to ``nbytes`` in this process (mallopt) and in the processes
    it starts (MALLOC_*_ environment variables, unless already set). False where the C library is not glibc."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"allocator threshold: expected a non-negative number of bytes, got {nbytes!r}")
    for name in _ALLOCATOR_ENV:
        os.environ.setdefault(name, str(nbytes))
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = min(nbytes, 2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_threads(passive_wait: bool = False) -> int:
    """torch threads for one training process.

    Threads of one parallel region wait for each other at its end. With OpenMP's default policy the
    waiting threads spin: where another process holds a core, the region waits on a descheduled thread
    while its partner burns the other core (a step took 12x its time alone in the run issue 14 reports,
    2.7x in benchmarks/contention.py). Sleeping waiters (``passive_wait``, OMP_WAIT_POLICY=PASSIVE read
    when torch loaded) do not collapse: then every usable core. Otherwise 1 thread on machines of two
    cores or fewer, and elsewhere the cores the one-minute load average leaves idle."""
    cores = usable_cores()
    if passive_wait:
        return cores
    if cores <= 2:
        return 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, cores - busy)


def configure_cpu(threads: int | str | None = "auto", allocator: bool = True,
                  wait_policy: str | None = "PASSIVE") -> dict:
    """Apply the CPU settings hypernorm's commands use; returns what was set.

    threads: "auto" (:func:`choose_threads`, unless OMP_NUM_THREADS is set: every usable core where the
        PASSIVE wait policy is in effect, else 1 on small machines), a positive int, or None to
        leave torch's choice. Before torch loads it goes to OMP_NUM_THREADS, so processes started later
        (data loader workers, grid workers) inherit it; after, to ``torch.set_num_threads``.
    allocator: raise glibc's mmap/trim thresholds (:func:`set_allocator_thresholds`).
    wait_policy: OMP_WAIT_POLICY for OpenMP runtimes not yet started (this process before torch loads,
        and the processes it starts): PASSIVE threads sleep at the end of a parallel region instead of
        spinning on a core another process needs. None leaves the environment as it is.
    """
    if threads != "auto" and threads is not None and (
            not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads: expected a positive int, 'auto' or None, got {threads!r}")
    if wait_policy is not None and (
            not isinstance(wait_policy, str) or wait_policy.upper() not in ("PASSIVE", "ACTIVE")):
        raise ValueError(f"wait_policy: expected 'PASSIVE', 'ACTIVE' or None, got {wait_policy!r}")
    applied: dict = {}
    # the policy the OpenMP runtime reads when torch loads: this call's only if torch has not loaded yet
    passive_wait = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" or (
        wait_policy is not None and wait_policy.upper() == "PASSIVE" and "torch" not in sys.modules)
    if wait_policy is not None:
        os.environ.setdefault("OMP_WAIT_POLICY", wait_policy.upper())
        applied["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    if allocator:
        applied["allocator_thresholds"] = set_allocator_thresholds()
    if threads is not None:
        if not (threads == "auto" and os.environ.get("OMP_NUM_THREADS")):  # else the user's own choice stands
            applied["threads"] = count = choose_threads(passive_wait) if threads == "auto" else threads
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(count)
            else:  # read by torch (and by OpenMP) when it loads, here and in the processes this one starts
                os.environ["OMP_NUM_THREADS"] = str(count)
    return applied
