"""Processes a job starts (generate workers, training ranks): how many cores each may use, and
that none outlives a killed parent. One place, used by inference and by the training launcher."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    Kubernetes CPU limit), not the machine's core count."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def worker_threads(workers: int) -> int:
    """Threads per CPU worker: the usable cores split between workers, at most an explicit
    OMP_NUM_THREADS (the user's own cap)."""
    n = max(1, available_cpus() // workers)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(n, int(omp)) if omp.isdigit() and int(omp) > 0 else n


def parent_death_signal():
    """A `preexec_fn` for subprocess.Popen: the child gets SIGTERM when this process dies. Only
    `prctl` runs between fork and exec (the library is looked up here, in the parent: a forked
    copy of a multithreaded process must not load libraries or log)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: child processes may outlive a killed parent")
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def die_with_parent(parent: int) -> None:
    """A worker must not outlive its parent (a SIGKILLed `ecomcap generate` or pod process runs no
    cleanup and `daemon=True` does not help): Linux sends it SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable: workers may outlive a killed parent")
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
