"""Whether the process behind a worker or a parent run is still there: one judgement for all.

A worker (``host:pid``, recorded on its ledger trial) and an ``ablate`` command (recorded on its
parent run) are checked the same way. A process id means one process only within one
*process space* (one boot of one kernel, one pid namespace) and, because pids are reused, only
together with the process's start time. Host names are no guide (containers and cluster nodes
repeat them), so a process of another space is never judged here: its heartbeat (the ledger)
or its scheduler (Slurm) tells instead.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional


def process_space() -> str:
    """Where a process id names one process: the boot id and pid namespace of this process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host name is the best there is
        return f"host:{socket.gethostname()}"
    return f"{boot}/{namespace}"


def process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, from ``/proc/<pid>/stat``), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) may hold spaces and parentheses: count from the last ')'
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its parent) no longer runs anything
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def worker_id() -> str:
    """This process as a worker: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def this_process() -> dict[str, str]:
    """What names this process for :func:`gone`: its pid, start time and process space."""
    pid = os.getpid()
    return {"pid": str(pid), "start": process_start(pid) or "", "space": process_space()}


def gone(pid: str, *, space: str = "", host: str = "", start: str = "") -> bool:
    """Whether the process ``pid``, recorded with its process ``space`` and/or ``host`` (each that
    was recorded must be this process's) and its ``start``, has ended. False where it cannot be
    told from here: another space or host, neither recorded, or no pid."""
    if not pid.isdigit() or not (space or host):
        return False
    if (space and space != process_space()) or (host and host != socket.gethostname()):
        return False
    if not pid_alive(int(pid)):
        return True
    return bool(start) and process_start(int(pid)) not in (None, start)  # the pid names another process now


def worker_gone(worker: str, space: str = "") -> bool:
    """Whether the worker ``host:pid`` (with its recorded process space, if any) has ended."""
    host, _, pid = worker.rpartition(":")
    return gone(pid, space=space, host=host)
