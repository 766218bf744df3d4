"""How the processes of ``ablate run`` / ``ablate search`` stop (whether one is gone: :mod:`ablate.liveness`).

Slurm, systemd, Kubernetes and ``kill`` stop a job with SIGTERM, a terminal with SIGINT (Ctrl-C);
both are turned into the same :class:`KeyboardInterrupt`, so that either stops the workers,
marks the parent MLflow run KILLED and leaves every unfinished cell to resume. A worker
process also dies with its parent, even when the parent is killed with SIGKILL and can do
nothing. Nothing here imports torch, MLflow or Optuna.

A stop signal is taken between database statements, never inside one, nor while a worker process
is being started (:func:`when_interruptible`):
an exit exception raised in the middle of SQLAlchemy's execution of a query makes it close the
database connection under the open cursor (then log ``Error closing cursor`` ... ``Cannot
operate on a closed database`` with their tracebacks), and one raised in MLflow's schema
migration leaves the store half-migrated. A stop raised in a finalizer (a weakref callback such
as SQLAlchemy's, a ``__del__``), which Python prints as "Exception ignored" and then forgets, so
that the process goes on as if never stopped, is taken back and raised again right after it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Optional


class Stopped(KeyboardInterrupt):
    """A stop signal other than SIGINT (SIGTERM), taken like Ctrl-C; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(e: KeyboardInterrupt) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + getattr(e, "signum", signal.SIGINT)


#: where a stop must not land: a database library inside a statement or a transaction (SQLAlchemy,
#: its drivers, Optuna's and MLflow's stores, alembic's migrations), and logging (a record half
#: written); a frame of any of these anywhere on the stack defers the stop
_NOT_HALFWAY = tuple(f"{os.sep}{part}{os.sep}" for part in (
    "sqlalchemy", "sqlite3", "psycopg", "psycopg2", "pymysql", "alembic", os.path.join("optuna", "storages"),
    os.path.join("mlflow", "store"), "logging"))
#: ... and starting a spawned worker: the parent writes the child's preparation data into a pipe,
#: and a stop halfway leaves a child that fails unpickling it ("EOFError: Ran out of input")
_NOT_HALFWAY_FILES = (os.path.join("multiprocessing", "popen_spawn_posix.py"),)
RECHECK_SECONDS = 0.02  # how soon a deferred stop looks again whether the process has left that code

_pending: Optional[int] = None  # the stop signal deferred, delivered when the process can take it
_raised: Optional[tuple[int, BaseException]] = None  # the last stop raised, and its signal


def interruptible(frame) -> bool:
    """Whether an exception raised at ``frame`` (where a signal interrupted the main thread) leaves no
    database library halfway through a statement: none of them anywhere on its stack."""
    while frame is not None:
        name = frame.f_code.co_filename
        if any(part in name for part in _NOT_HALFWAY) or name.endswith(_NOT_HALFWAY_FILES):
            return False
        frame = frame.f_back
    return True


def _defer(signum: int) -> None:
    global _pending
    _pending = signum
    signal.setitimer(signal.ITIMER_REAL, RECHECK_SECONDS)


def when_interruptible(stop: Callable[[int], BaseException]) -> Callable:
    """A handler for stop signals (and for SIGALRM, its re-check) that raises ``stop(signum)``
    where the main thread is :func:`interruptible`, else as soon as it is: it looks again every
    :data:`RECHECK_SECONDS` (a real-time timer), so a long query ends first and then the process stops."""
    def handler(signum, frame) -> None:
        global _pending, _raised
        if signum == signal.SIGALRM:
            if _pending is None:
                return  # a re-check left over from a stop already taken
            signum = _pending
        if not interruptible(frame):
            _defer(signum)
            return
        _pending = None
        e = stop(signum)
        _raised = (signum, e)
        raise e
    return handler


def _unraisable_hook(previous: Callable) -> Callable:
    """``sys.unraisablehook`` that takes back a stop raised inside a finalizer (a weakref callback
    such as SQLAlchemy's ``InstanceState._cleanup``, a ``__del__``, a generator closed by the
    garbage collector): Python would print it as "Exception ignored in ..." and go on as if never
    stopped; here it is raised again, silently, once the finalizer is over."""
    def hook(unraisable) -> None:
        if _raised is not None and unraisable.exc_value is _raised[1]:
            _defer(_raised[0])
            return
        previous(unraisable)
    return hook


def _stop(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


@contextmanager
def stop_signals(stop: Callable[[int], BaseException], signums=(signal.SIGTERM,)):
    """While the body runs, each of ``signums`` raises ``stop(signum)`` in the main thread, once the
    main thread is :func:`interruptible`. Only the main thread may set signal handlers; elsewhere
    the body runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _pending
    before, hook = install_stop_handler(stop, signums), sys.unraisablehook
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        pending, _pending = _pending, None
        for s, previous in before.items():
            signal.signal(s, previous)
        sys.unraisablehook = hook
        if pending is not None:  # it came during the body's last statement: taken now, on the way out
            raise stop(pending)


def install_stop_handler(stop: Callable[[int], BaseException], signums=(signal.SIGTERM,)) -> dict:
    """Make each of ``signums`` raise ``stop(signum)`` once the main thread is :func:`interruptible`
    and never lose it in a finalizer, for the rest of the process (a spawned worker) or until the
    handlers returned are put back (:func:`stop_signals`). SIGINT that is ignored (a background
    job of a shell) or handled otherwise than by Python's default stays so."""
    handler = when_interruptible(stop)
    before = {}
    for s in (*signums, signal.SIGALRM):
        if s == signal.SIGINT and signal.getsignal(s) is not signal.default_int_handler:
            continue
        before[s] = signal.signal(s, handler)
    sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    return before


@contextmanager
def sigterm_as_interrupt():
    """While the body runs, SIGTERM raises :class:`Stopped` (a KeyboardInterrupt) and SIGINT a
    KeyboardInterrupt in the main thread, each between two database statements, never inside one.

    Only the main thread may set signal handlers; elsewhere the body runs unchanged.
    """
    with stop_signals(_stop, (signal.SIGTERM, signal.SIGINT)):
        yield


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
