"""How the processes of ``ablate run`` / ``ablate search`` stop (whether one is gone: :mod:`ablate.liveness`).

Slurm, systemd, Kubernetes and ``kill`` stop a job with SIGTERM, a terminal with SIGINT (Ctrl-C);
both are turned into the same :class:`KeyboardInterrupt`, so that either stops the workers,
marks the parent MLflow run KILLED and leaves every unfinished cell to resume. A worker
process also dies with its parent, even when the parent is killed with SIGKILL and can do
nothing. Nothing here imports torch, MLflow or Optuna.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager


class Stopped(KeyboardInterrupt):
    """A stop signal other than SIGINT (SIGTERM), taken like Ctrl-C; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(e: KeyboardInterrupt) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + getattr(e, "signum", signal.SIGINT)


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


@contextmanager
def sigterm_as_interrupt():
    """While the body runs, SIGTERM raises :class:`Stopped` (a KeyboardInterrupt) in the main thread.

    Only the main thread may set signal handlers; elsewhere the body runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def die_with_parent(parent_pid: int, poll: float = 1.0) -> None:
    """Make this (worker) process end when ``parent_pid`` does, however the parent ends.

    On Linux the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``); elsewhere a
    daemon thread watches the parent's pid. A parent already gone before either is in place
    ends this process at once.
    """
    if _set_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            os._exit(128 + signal.SIGKILL)
        return

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="ablate-parent-watch", daemon=True).start()


def _set_pdeathsig(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
