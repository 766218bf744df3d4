"""Checks that a command's stores can be used, made before anything is written to either.

A study lives in two stores: the ledger (an Optuna RDB storage: a SQLite file or a database
server) and MLflow's tracking store (the same kinds, or an MLflow server over HTTP). A
truncated file, an in-memory SQLite URL, an unknown scheme or a server that does not answer
must stop ``ablate run``/``ablate search`` with one line before the ledger or MLflow holds
anything of the invocation; commands that only read (``ablate report``, ``ablate status``)
must not create a store where there is none. Nothing here creates a file, a table or a run.
"""
from __future__ import annotations

import logging
import os
import re
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import quote, urlsplit, urlunsplit

from ablate.errors import AblateError
from ablate.locks import retry_busy, sqlite_path
from ablate.urls import display_url, mask_text, split_credentials

DEFAULT_SERVER_WAIT = 15.0  # seconds to wait for an MLflow server that does not answer; ABLATE_STORE_WAIT overrides
CONNECT_TIMEOUT = 10  # seconds for a database server to accept a connection
SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle")
SQL_ALLOWED = "sqlite:///FILE, postgresql://USER@HOST/DB, mysql://USER@HOST/DB"
SQLITE_MAGIC = b"SQLite format 3\x00"
NOTHING_HERE = ("allowed: the folder where `ablate run` or `ablate search` ran, or MLFLOW_TRACKING_URI and "
                "--storage set to the stores they used")


class NothingRecorded(AblateError):
    """A command that reads found no store where runs are recorded: nothing has been run here
    yet (or not with this store), which a command given a spec can follow with the one to run."""


def quiet_store_logs() -> None:
    """Keep MLflow's schema-creation INFO lines ("Creating initial MLflow database tables...")
    out of every first run: they say nothing a user can act on. Its warnings still show."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_stores(ledger_url: str, tracking_uri: Optional[str] = None, *,
                 log: Callable[[str], None] = _stderr) -> None:
    """Refuse (one-line :class:`AblateError`) a ledger or MLflow store that cannot be used.

    Both are checked before either is written, so a bad ``MLFLOW_TRACKING_URI`` leaves no
    ledger study behind, and a bad ledger URL no MLflow run.
    """
    quiet_store_logs()
    tracking_uri = tracking_uri or _tracking_uri()
    _check_not_one_file(ledger_url, tracking_uri)
    check_database(ledger_url, "ledger storage")
    check_tracking_store(tracking_uri, log=log)


def _check_not_one_file(ledger_url: str, tracking_uri: str) -> None:
    """The ledger in MLflow's own SQLite file would put Optuna's tables (and its alembic version)
    beside MLflow's, and every later MLflow command would fail on the schema."""
    ledger, tracking = sqlite_path(ledger_url), sqlite_path(tracking_uri)
    if ledger and tracking and ledger != ":memory:" and os.path.realpath(ledger) == os.path.realpath(tracking):
        raise AblateError(f"--storage {display_url(ledger_url)}: the ledger would share MLflow's store "
                          f"{display_url(tracking_uri)} (allowed: a file of its own, e.g. --storage "
                          "sqlite:///ablate-ledger.db)")


def existing_tracking_store(uri: Optional[str] = None) -> str:
    """The tracking URI, when a usable MLflow store is there; else a one-line :class:`AblateError`.

    For commands that only read: where no store exists (no ``mlflow.db`` in this folder) it
    says so instead of letting MLflow create an empty one.
    """
    quiet_store_logs()
    uri = uri or _tracking_uri()
    check_tracking_store(uri, create=False)
    return uri


def _tracking_uri() -> str:
    import mlflow  # lazy: 1.1 s to import; ablate status and ablate plan import this module
    return mlflow.get_tracking_uri()


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].strip()


# ---- databases (the ledger; MLflow's SQL stores) ------------------------------------------------

def check_database(url: str, what: str, *, create: bool = True) -> Optional[set[str]]:
    """A SQLAlchemy URL that can hold a store: a SQLite file that is whole (or may be created
    when ``create``), or a database server that accepts a connection. Returns the server's
    table names (None for SQLite): a reader must not open a store whose tables are not there yet,
    since MLflow creates its schema on first contact."""
    import sqlalchemy  # lazy: 0.2 s to import; ablate status imports this module and may check no database
    shown = display_url(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception as e:  # ArgumentError, ValueError: not a URL SQLAlchemy can read
        raise AblateError(f"{what} {shown}: not a database URL ({mask_text(_first_line(e), url)}) "
                          f"(allowed: {SQL_ALLOWED})") from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite(parsed.database, parsed.query, what, shown, create=create)
        return None
    connect_args = {"connect_timeout": CONNECT_TIMEOUT} if parsed.get_backend_name() in (
        "postgresql", "mysql", "mariadb") else {}
    try:
        engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    except Exception as e:  # an unknown dialect or a missing driver
        raise AblateError(f"{what} {shown}: cannot open ({mask_text(_first_line(e), url)}) "
                          f"(allowed: {SQL_ALLOWED})") from None
    try:
        with engine.connect() as conn:
            return set(sqlalchemy.inspect(conn).get_table_names())
    except Exception as e:  # refused, timed out, unknown host, bad credentials, no such database
        raise AblateError(f"{what} {shown}: cannot connect ({mask_text(_first_line(_root(e)), url)})") from None
    finally:
        engine.dispose()


def _root(e: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's wrapper (its message names the problem)."""
    return getattr(e, "orig", None) or e


def _check_sqlite(database: Optional[str], query, what: str, shown: str, *, create: bool) -> None:
    if not database or database == ":memory:" or query.get("mode") == "memory":
        raise AblateError(f"{what} {shown}: an in-memory database is neither shared between worker "
                          "processes nor kept for a re-run (allowed: sqlite:///FILE, postgresql://...)")
    path = Path(database)
    if path.is_dir():
        raise AblateError(f"{what} {shown}: {path} is a folder (allowed: sqlite:///FILE)")
    if not path.exists():
        if not create:
            raise NothingRecorded(f"no {what} at {shown}: nothing has been recorded here ({NOTHING_HERE})")
        folder = path.parent
        if not folder.is_dir():
            raise AblateError(f"{what} {shown}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise AblateError(f"{what} {shown}: folder {folder} is not writable")
        return
    if create:  # a command that writes: a store it could only read fails at its first write, in a cell
        _check_sqlite_writable(path, what, shown)
    _check_sqlite_file(path, what, shown)


def _check_sqlite_writable(path: Path, what: str, shown: str) -> None:
    """SQLite writes the file and a journal beside it: both must be possible (a read-only file, a
    read-only folder or file system are refused before anything is written anywhere)."""
    folder = path.resolve().parent
    for target, why in ((path, "is read-only"), (folder, "is read-only, and SQLite writes its journal there")):
        if not os.access(target, os.W_OK | (os.X_OK if target is folder else 0)):
            raise AblateError(f"{what} {shown}: {target} {why} (allowed: make it writable, or point to a store "
                              "you may write to)")


def _check_sqlite_file(path: Path, what: str, shown: str) -> None:
    """A whole SQLite database: its header, the size the header promises, a readable schema."""
    size = path.stat().st_size
    if size == 0:
        return  # SQLite treats an empty file as an empty database: the store creates its tables
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise AblateError(f"{what} {shown}: {path} is not a SQLite database "
                          "(allowed: move it away to start a new store, or point to the right file)")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The page count in the header is trustworthy when its "version valid for" matches the
    # change counter (always, for files written by SQLite 3.7 or later).
    if pages and header[24:28] == header[92:96] and size < pages * page_size:
        raise AblateError(f"{what} {shown}: {path} is truncated ({size} of {pages * page_size} bytes) "
                          "(allowed: restore it from a backup, or move it away to start a new store)")
    mode = "rw" if os.access(path, os.W_OK) else "ro"  # rw: a crashed writer's journal can be rolled back
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode={mode}", uri=True, timeout=60)
        try:
            retry_busy(lambda: conn.execute("SELECT count(*) FROM sqlite_master").fetchone())
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise AblateError(f"{what} {shown}: {path} is damaged ({_first_line(e)}) "
                          "(allowed: restore it from a backup, or move it away to start a new store)") from None


# ---- MLflow's tracking store ----------------------------------------------------------------------

def check_tracking_store(uri: str, *, log: Callable[[str], None] = _stderr, create: bool = True,
                         wait: Optional[float] = None) -> None:
    """MLflow's store at ``uri`` can be used: a database as :func:`check_database`, a server
    that answers within ``wait`` seconds (saying so while it waits), any other URI one that
    MLflow knows how to open."""
    scheme = _scheme(uri)
    if scheme in SQL_SCHEMES:
        tables = check_database(uri, "MLflow store", create=create)
        if not create and tables is not None and "experiments" not in tables:  # MLflow would create them
            raise NothingRecorded(f"no MLflow store at {display_url(uri)}: nothing has been recorded there ({NOTHING_HERE})")
    elif scheme in ("http", "https"):
        _wait_for_server(uri, log, _server_wait() if wait is None else wait)
    else:
        _check_other_store(uri, create=create)


def _server_wait() -> float:
    raw = os.environ.get("ABLATE_STORE_WAIT")
    try:
        return float(raw) if raw else DEFAULT_SERVER_WAIT
    except ValueError:
        raise AblateError(f"ABLATE_STORE_WAIT: {raw!r} (allowed: seconds, e.g. 15)") from None


def _probe_address(uri: str) -> str:
    """``uri``'s health endpoint, without user:password (MLflow sends those as a header, not in the URL)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))


def _check_server_credentials(uri: str, shown: str) -> None:
    """MLflow sends a server URL's user information through ``requests``, which cuts it at an
    unencoded ``/``, ``?`` or ``#`` and would send the rest of the password as a path or a query."""
    parts = split_credentials(uri)
    if parts is not None and parts.userinfo and (not parts.sure or re.search(r"[/?#\s]", parts.userinfo)):
        raise AblateError(f"MLflow store {shown}: its user name or password holds /, ?, # or a space, which a URL "
                          "must percent-encode (allowed: encode it, e.g. ? as %3F, or leave it out of the URL and "
                          "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)")


def _wait_for_server(uri: str, log: Callable[[str], None], wait: float) -> None:
    shown = display_url(uri)
    _check_server_credentials(uri, shown)
    try:
        address = _probe_address(uri)
    except ValueError as e:  # a bad port
        raise AblateError(f"MLflow store {shown}: not a server address ({mask_text(_first_line(e), uri)})") from None
    deadline, said = time.monotonic() + wait, False
    while True:
        try:
            with urllib.request.urlopen(address, timeout=max(1.0, min(5.0, deadline - time.monotonic()))):
                return
        except urllib.error.HTTPError:
            return  # it answered: authentication and routing are the server's business
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = _first_line(getattr(e, "reason", None) or e)
        if time.monotonic() >= deadline:
            raise AblateError(f"MLflow server {shown}: no answer after {wait:.0f} s ({mask_text(reason, uri)}) "
                              "(allowed: start it, or set MLFLOW_TRACKING_URI to a store that answers)")
        if not said:
            log(f"waiting up to {wait:.0f} s for the MLflow server at {shown} ({mask_text(reason, uri)})")
            said = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _check_other_store(uri: str, *, create: bool) -> None:
    """A file store (a folder), ``databricks`` or a plugin's scheme: let MLflow resolve it."""
    shown = display_url(uri)
    if not create and _scheme(uri) in ("", "file"):
        path = Path(urlsplit(uri).path if uri.startswith("file:") else uri)
        if not path.exists():
            raise NothingRecorded(f"no MLflow store at {shown}: nothing has been recorded here ({NOTHING_HERE})")
    from mlflow.tracking import MlflowClient  # lazy: as mlflow in _tracking_uri
    try:
        MlflowClient(uri)  # resolves the store: an unknown scheme or a refused file store raises here
    except Exception as e:
        raise AblateError(f"MLflow store {shown}: cannot be used ({mask_text(_first_line(e), uri)}) "
                          f"(allowed: {SQL_ALLOWED}, http://HOST:PORT of an MLflow server)") from None
