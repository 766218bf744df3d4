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
    """The file behind a SQLite URL of any driver (``sqlite:///path``, ``sqlite+pysqlite:///path``),
    or None for other databases (and for ``sqlite://``, which names no file)."""
    from ablate.urls import database_url
    parsed = database_url(url)
    if parsed is None or parsed.get_backend_name().lower() != "sqlite":
        return None
    return parsed.database


@contextmanager
def store_lock(url: str, name: str = "ablate"):
    """Hold an exclusive lock named ``name`` on the store at ``url`` while the body runs."""
    path = sqlite_path(url)
    if path is not None:
        with _file_lock(f"{path}.lock"):
            yield
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


@contextmanager
def _file_lock(path: str):
    """An exclusive lock through a file that exists only while the lock is held, so that no
    ``*.db.lock`` stays beside the database after a command.

    The holder deletes the file before it lets go; a process that was waiting on the deleted
    file then holds a lock nobody else can see, so it checks, once it has the lock, that its
    file is still the one at ``path`` (same inode), and otherwise tries again on the new file.
    """
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                fcntl.flock(f, fcntl.LOCK_UN)
                continue
            try:
                yield
            finally:
                try:
                    os.unlink(path)
                except OSError:  # e.g. another user's file in a shared folder: it stays, harmless
                    pass
                fcntl.flock(f, fcntl.LOCK_UN)
            return
        finally:
            f.close()


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


def _texts(e: BaseException) -> str:
    """The messages of an exception and of the exceptions it wraps (Optuna and MLflow wrap SQLAlchemy's)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return " ".join(parts).lower()


def is_busy(e: BaseException) -> bool:
    """A concurrent writer's transient refusal: SQLite's "database is locked", PostgreSQL's "could not serialize"."""
    text = _texts(e)
    return "locked" in text or "could not serialize" in text


def is_transient(e: BaseException) -> bool:
    """Busy, or the database connection was lost: a later attempt may succeed."""
    text = _texts(e)
    return is_busy(e) or any(s in text for s in ("connection", "server closed", "timeout", "timed out"))


def retry_busy(fn: Callable[..., T], *args, attempts: int = 20, **kwargs) -> T:
    """Call a store operation, retrying the transient refusals of concurrent writers (:func:`is_busy`)."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_busy(e) or i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))
    raise AssertionError("unreachable")
