"""A lock around the few store operations that must not run twice at once.

Creating a store's schema (MLflow's and Optuna's migrations) or an experiment is not safe to
race, and SQLite ignores ``SELECT ... FOR UPDATE``, so a grid's claims on SQLite are not
atomic without help. Processes of one machine sharing a SQLite file take turns through an OS
file lock beside it; processes on many machines sharing a PostgreSQL server take turns through
a PostgreSQL advisory lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
import zlib
from contextlib import contextmanager
from typing import Callable, Optional, TypeVar

from ablate.environ import positive_number
from ablate.errors import AblateError
from ablate.urls import database_url, display_url, mask_text

T = TypeVar("T")


def sqlite_path(url: str) -> Optional[str]:
    """The file behind a SQLite URL of any driver (``sqlite:///path``, ``sqlite+pysqlite:///path``),
    or None for other databases (and for ``sqlite://``, which names no file)."""
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
        import sqlalchemy  # lazy: 0.2 s to import, for a PostgreSQL store only; status imports this module
        key = zlib.crc32(name.encode())  # advisory locks are keyed by a number
        engine = sqlalchemy.create_engine(url.replace("postgres://", "postgresql://", 1), poolclass=sqlalchemy.pool.NullPool,
                                          connect_args={"connect_timeout": 10})

        def locked():
            conn = engine.connect()
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = retry_busy(locked, what=f"the database {display_url(url)}")  # a server that blinks is waited for
            try:
                yield
            finally:
                try:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                except Exception as e:
                    if not is_lost(e):
                        raise  # a lost connection took its session's lock with it
                finally:
                    conn.close()
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
        try:
            f = open(path, "a")
        except OSError as e:
            if unwritable(e) is None:
                raise
            raise unwritable_error(e, "the lock file beside the store", path,
                                   "the lock that makes its writers take turns") from None
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


def _texts(e: BaseException) -> str:
    """The messages of an exception and of the exceptions it wraps (Optuna and MLflow wrap SQLAlchemy's)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return " ".join(parts).lower()


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_busy(e: BaseException) -> bool:
    """A concurrent writer's transient refusal: SQLite's "database is locked", PostgreSQL's "could not serialize"."""
    text = _texts(e)
    return "locked" in text or "could not serialize" in text


# What a database driver, SQLAlchemy or an HTTP client says when the server went away or cannot be
# reached (restarted, failed over, network cut); a later attempt may succeed.
_LOST_TEXTS = ("server closed the connection", "connection refused", "could not connect", "connection to server",
               "connection is closed", "connection already closed", "connection was closed", "the connection is lost",
               "terminating connection", "connection reset", "connection aborted", "broken pipe",
               "consuming input failed", "no connection to the server", "ssl syscall error", "eof detected",
               "the database system is starting up", "the database system is shutting down",
               "the database system is in recovery mode", "server has gone away", "lost connection",
               "max retries exceeded", "remote end closed connection", "timeout expired", "timed out")
# ... and what looks alike but a retry cannot mend (a login refused, a database that is not there)
_NOT_LOST_TEXTS = ("authentication failed", "password", "does not exist", "permission denied", "no such table",
                   "no pg_hba.conf entry")
# the exception types that carry a lost connection: SQLAlchemy's and the DB-API drivers' (psycopg,
# psycopg2, pymysql, sqlite3) OperationalError/InterfaceError, urllib3/requests' connection errors
_LOST_TYPES = ("OperationalError", "InterfaceError", "DisconnectionError", "ConnectionError",
               "NewConnectionError", "MaxRetryError", "ConnectionRefusedError", "ConnectionResetError",
               "BrokenPipeError", "TimeoutError", "ConnectTimeout", "ReadTimeout")


def is_lost(e: BaseException) -> bool:
    """The store's connection was lost or cannot be made (the server is down, restarting or cut
    off), as SQLAlchemy, psycopg or MLflow report it, possibly wrapped by Optuna or MLflow."""
    if isinstance(e, StoreLost):
        return False  # already waited for: never waited for again
    chain = _chain(e)
    if any(getattr(c, "connection_invalidated", False) for c in chain):  # SQLAlchemy saw the disconnect itself
        return True
    text = _texts(e)
    if any(s in text for s in _NOT_LOST_TEXTS):
        return False
    typed = any(type(c).__name__ in _LOST_TYPES for c in chain)
    # MLflow's REST client reports a server that does not answer as an MlflowException of text only
    return any(s in text for s in _LOST_TEXTS) and (typed or "api request" in text)


def is_transient(e: BaseException) -> bool:
    """Busy, or the database connection was lost: a later attempt may succeed."""
    return is_busy(e) or is_lost(e)


DEFAULT_STORE_RETRY = 120.0  # seconds a lost store is waited for; ABLATE_STORE_RETRY_SECONDS overrides
STORE_RETRY_ENV = "ABLATE_STORE_RETRY_SECONDS"


def store_retry_seconds() -> float:
    """How long a store whose connection was lost is retried before the command gives up."""
    seconds = positive_number(STORE_RETRY_ENV, f"a number of seconds above 0, e.g. {DEFAULT_STORE_RETRY:g}, the default: "
                              "how long a store that stopped answering is waited for")
    return DEFAULT_STORE_RETRY if seconds is None else seconds


class StoreLost(AblateError):
    """A store stayed unreachable for the whole retry budget: the command ends (one line, exit 2)."""


def _store_lost(what: str, e: BaseException, waited: float) -> StoreLost:
    root = _chain(e)[-1]  # the driver's own error names the problem (the wrappers repeat it at length)
    first = (str(root).strip() or type(root).__name__).splitlines()[0].strip()
    first = mask_text(first)
    global _gave_up
    _gave_up = StoreLost(f"{what} stopped answering: no connection for {waited:.0f} s ({first}); finished cells are kept "
                 f"and the others resume (allowed: run the same command again once it answers; "
                 f"{STORE_RETRY_ENV} sets how long a lost store is waited for)")
    return _gave_up


# ---- a store that cannot be written: a full disk, a read-only file system, a quota ------------------

#: errno values of a write that a retry cannot mend, and how each is said
_UNWRITABLE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                      errno.EPERM: "permission denied", errno.EFBIG: "file too large"}
#: ... and what SQLite, PostgreSQL and MySQL say of it (wrapped by SQLAlchemy, Optuna or MLflow)
_UNWRITABLE_TEXTS = (("database or disk is full", "no space left on device"),
                     ("no space left on device", "no space left on device"),
                     ("could not extend file", "no space left on device"),
                     ("disk quota exceeded", "disk quota exceeded"),
                     ("the table is full", "no space left on device"),
                     ("attempt to write a readonly database", "read-only"),
                     ("read-only file system", "read-only file system"),
                     ("read-only transaction", "read-only"),
                     ("disk i/o error", "disk I/O error (a full or failing disk)"))


def unwritable(e: BaseException) -> Optional[str]:
    """How to say why a write failed for good (no space left, read-only, over quota), or None when
    ``e`` (or an error it wraps) is something else."""
    for c in _chain(e):
        if isinstance(c, OSError) and c.errno in _UNWRITABLE_ERRNOS:
            return _UNWRITABLE_ERRNOS[c.errno]
    text = _texts(e)
    return next((said for found, said in _UNWRITABLE_TEXTS if found in text), None)


class StoreUnwritable(AblateError):
    """A store (or a folder of results) refused a write for good: a full disk, a read-only file
    system, a quota. One line that names the path and what was being written; exit 2.
    ``what`` names the store (``"the MLflow store"``, ``"the ledger"``, ...); ``said`` is set once
    a worker has printed it, so that it is not printed twice."""

    def __init__(self, message: str, what: str, path: str):
        super().__init__(message)
        self.what, self.path, self.said = what, path, False


RUN_AGAIN = "run the same command again: finished cells are kept and the others resume"


def unwritable_error(e: BaseException, what: str, path: Optional[str], writing: Optional[str] = None, *,
                     then: str = RUN_AGAIN, exact: bool = True) -> StoreUnwritable:
    """The :class:`StoreUnwritable` for ``e`` (which :func:`unwritable` recognises): ``what`` store, at
    ``path`` (a URL is shown as its file, or without its password), while writing ``writing``.
    ``exact``: the file the error names, where it names one, rather than ``path``."""
    reason = unwritable(e) or "cannot be written"
    filename = next((c.filename for c in _chain(e) if isinstance(c, OSError) and c.filename), None) if exact else None
    shown = str(filename) if filename else _shown_path(path) if path else what
    remedy = ("free some space" if reason.startswith(("no space", "disk quota", "file too large", "disk I/O"))
              else "make it writable")
    doing = f"{what}: {writing}" if writing else what
    if reason.startswith("no space"):
        message = f"{reason} writing {shown} ({doing}) ({remedy}, then {then})"
    else:
        message = f"cannot write {shown}: {reason} ({doing}) ({remedy}, then {then})"
    return StoreUnwritable(message, what, shown)


def _shown_path(path: str) -> str:
    """A store's URL as its file where it is a SQLite one, else without its password."""
    if "://" not in path:
        return path
    file = sqlite_path(path)
    if file:
        return file
    if path.startswith("file://"):
        return path[len("file://"):]
    return display_url(path)


#: the store given up on: the command is ending, so a later lost connection (the parent run's
#: close, on the way out) is not waited for again, and the first cause is what is said
_gave_up: Optional[StoreLost] = None


def retry_busy(fn: Callable[..., T], *args, attempts: int = 20, what: str = "a store", where: Optional[str] = None,
               writing: Optional[str] = None, **kwargs) -> T:
    """Call a store operation, retrying what a later attempt may mend.

    A concurrent writer's refusal (:func:`is_busy`) is retried ``attempts`` times, quickly. A lost
    connection (:func:`is_lost`: the server restarted, a network blink) is retried with backoff
    for :func:`store_retry_seconds`; then :class:`StoreLost` (an ``AblateError``: one line, exit
    2) names ``what`` stopped answering. A write refused for good (:func:`unwritable`: a full
    disk, a read-only store) is not retried: :class:`StoreUnwritable` names the file (``where``: the
    store's URL or folder) and what was being written (``writing``, else the operation's name).
    Anything else is raised at once.
    """
    busy, deadline, pause = 0, None, 0.25
    while True:
        try:
            return fn(*args, **kwargs)
        except StoreUnwritable:
            raise  # said already, by a store call inside this one
        except Exception as e:
            if unwritable(e) is not None:
                doing = writing or getattr(fn, "__name__", "").replace("_", " ").strip() or None
                raise unwritable_error(e, what, where, doing) from None
            if is_lost(e):
                now = time.monotonic()
                if _gave_up is not None:
                    raise _gave_up from None
                if deadline is None:
                    started, deadline = now, now + store_retry_seconds()
                if now >= deadline:
                    raise _store_lost(what, e, now - started) from None
                time.sleep(min(pause, max(0.0, deadline - now)))
                pause = min(pause * 2, 5.0)
                continue
            if not is_busy(e) or busy == attempts - 1:
                raise
            busy += 1
            time.sleep(0.05 * busy)
