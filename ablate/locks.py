"""A lock around the few store operations that must not run twice at once.

Creating a store's schema (MLflow's and Optuna's migrations) or an experiment is not safe to
race, and SQLite ignores ``SELECT ... FOR UPDATE``, so a grid's claims on SQLite are not
atomic without help. Processes of one machine sharing a SQLite file take turns through an OS
file lock beside it; processes on many machines sharing a PostgreSQL server take turns through
a PostgreSQL advisory lock.
"""
from __future__ import annotations

import fcntl
import os
import time
import zlib
from contextlib import contextmanager
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def sqlite_path(url: str) -> Optional[str]:
    """The file behind a ``sqlite:///path`` URL, or None for other databases."""
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else None


@contextmanager
def store_lock(url: str, name: str = "ablate"):
    """Hold an exclusive lock named ``name`` on the store at ``url`` while the body runs."""
    path = sqlite_path(url)
    if path is not None:
        with open(f"{path}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif url.startswith(("postgresql", "postgres")):
        import sqlalchemy
        key = zlib.crc32(name.encode())  # advisory locks are keyed by a number
        engine = sqlalchemy.create_engine(url.replace("postgres://", "postgresql://", 1), poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
    else:
        yield


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


def retry_busy(fn: Callable[..., T], *args, attempts: int = 20, **kwargs) -> T:
    """Call a store operation, retrying the transient refusals of concurrent writers.

    SQLite says "database is locked", PostgreSQL "could not serialize"; Optuna and MLflow wrap
    SQLAlchemy's error in their own, so the message (and its cause's) is what is matched.
    """
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            text = f"{e} {getattr(e, '__cause__', '')}".lower()
            if ("locked" not in text and "could not serialize" not in text) or i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))
    raise AssertionError("unreachable")
