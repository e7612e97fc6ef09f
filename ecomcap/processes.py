"""Processes a job starts (generate workers, training ranks, the search page): how many cores
each may use, that none outlives a killed parent, and a server process that is used only once it
answers. One place, used by inference, the training launcher and serving."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving_process(cmd: list[str], ready_url: str, log_path: str | Path, timeout_s: float = 300.0,
                    what: str = "the server", **popen) -> Iterator[subprocess.Popen]:
    """Start `cmd` in its own process group (output to `log_path`), yield it once `ready_url`
    answers 200, and kill the whole group on exit, whatever happens. EcomcapError with the log's
    tail when it exits early or does not answer within `timeout_s`. The search page, its load
    benchmark and the MLflow UI tests start their servers through this."""
    from ecomcap.errors import EcomcapError

    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **popen)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise EcomcapError(f"{what} exited (rc={proc.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=3) as r:
                    if r.status == 200:
                        break
            except OSError:  # URLError and HTTPError (a 503 while not ready) included
                pass
            if time.monotonic() > deadline:
                raise EcomcapError(f"{what} did not answer {ready_url} within {timeout_s:.0f}s (log: {log_path})")
            time.sleep(0.5)
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
