"""An OS file lock for the processes of one machine that share a SQLite file (ledger, MLflow store)."""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from typing import Optional


def sqlite_path(url: str) -> Optional[str]:
    """The file behind a ``sqlite:///path`` URL, or None for other databases."""
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else None


@contextmanager
def sqlite_lock(url: str):
    """Hold an exclusive lock on ``<db>.lock`` while the body runs; no-op for server databases.

    SQLite ignores ``SELECT ... FOR UPDATE`` and MLflow's schema migration is not safe to run
    twice at once, so processes sharing one SQLite file take turns through this lock.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
