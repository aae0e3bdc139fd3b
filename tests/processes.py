"""Processes a test started, read from /proc: which there are, whether they still run, and
killing them all (a scan killed mid-way, a server stopped)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # "pid (name) state ppid ...": the name may hold spaces
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def running(pid: int) -> bool:
    """Whether any thread of process ``pid`` still runs. A killed process's first thread can
    be a zombie while its other threads still exit, and they share its open files (and
    locks): the process has let go of them only once every thread is a zombie or gone."""
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for thread in threads:
        try:
            state = (thread / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state not in ("Z", "X"):
            return True
    return False


def wait_gone(pids: list[int], timeout: float) -> bool:
    """Wait until none of ``pids`` runs; whether that happened within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def kill_tree(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL ``process`` and every process it started, and wait until all are gone, so
    that no lock or file they held outlives them."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)
    process.wait()
    assert wait_gone(pids[1:], timeout), "a killed process still runs"
