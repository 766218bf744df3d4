"""Stores that go away, settings that would make them unsafe, and databases that are not a ledger.

The outage tests run a real PostgreSQL (the server on 127.0.0.1:5432, see tests/test_postgres.py)
behind a TCP forwarder of their own (tests/pgproxy.py): cutting the forwarder breaks every
connection of the run and refuses new ones, as a server that stopped would, while the shared
server itself keeps running for everybody else.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import time
import uuid

import pytest

from conftest import ablate_cmd, run_ablate, wait_for, write_spec
from test_hostile_input import refused
from test_postgres import ADMIN_URL, _admin

# ---- settings that are refused before anything is written --------------------------------------


@pytest.mark.parametrize("value", ["abc", "0", "-5", "0,10", "1,2", "10,20", "3,1", "1,3,5", "1.5"])
def test_a_heartbeat_setting_that_is_not_safe_is_refused_in_one_line(workdir, monkeypatch, value):
    spec = write_spec(workdir / "s.yaml", name="hb")
    monkeypatch.setenv("ABLATE_HEARTBEAT", value)
    line = refused("run", str(spec))  # in process: the same command line, one import of torch
    assert line.startswith("ABLATE_HEARTBEAT: ") and "allowed:" in line and "more than twice" in line, line
    assert sorted(p.name for p in workdir.iterdir()) == ["s.yaml"]  # no ledger, no MLflow store, no checkpoints


def test_heartbeat_settings_that_are_accepted():
    from ablate.ledger import heartbeat_settings
    for raw, expected in (("", (30, 120)), ("2", (2, 8)), ("1,3", (1, 3)), (" 5 , 11 ", (5, 11))):
        os.environ["ABLATE_HEARTBEAT"] = raw
        try:
            assert heartbeat_settings() == expected, raw
        finally:
            del os.environ["ABLATE_HEARTBEAT"]


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_a_store_retry_setting_that_is_not_a_duration_is_refused_in_one_line(workdir, monkeypatch, value):
    spec = write_spec(workdir / "s.yaml", name="retry")
    monkeypatch.setenv("ABLATE_STORE_RETRY_SECONDS", value)
    line = refused("run", str(spec))
    assert line.startswith("ABLATE_STORE_RETRY_SECONDS: ") and "allowed:" in line, line
    assert sorted(p.name for p in workdir.iterdir()) == ["s.yaml"]


# ---- which errors are a lost connection ----------------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lost_connection_is_told_from_other_database_errors(tmp_path):
    import optuna
    import sqlalchemy

    from ablate.locks import is_busy, is_lost, is_transient

    def error_of(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the error is what the test looks at
            return e
        raise AssertionError("no error")

    def query(url):
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT * FROM nowhere"))
        finally:
            engine.dispose()

    refused = error_of(lambda: query(f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres"))
    assert is_lost(refused) and is_transient(refused) and not is_busy(refused)
    # as Optuna wraps it
    wrapped = error_of(lambda: optuna.storages.RDBStorage(f"postgresql://postgres@127.0.0.1:{_free_port()}/x"))
    assert is_lost(wrapped)
    missing_table = error_of(lambda: query(f"sqlite:///{tmp_path / 'x.db'}"))
    assert not is_lost(missing_table) and not is_transient(missing_table)
    _admin().close()  # skips without a server
    no_database = error_of(lambda: query(ADMIN_URL.rsplit("/", 1)[0] + "/no_such_database_here"))
    assert not is_lost(no_database)
    holder = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    locked = error_of(lambda: sqlite3.connect(tmp_path / "busy.db", timeout=0).execute("SELECT * FROM t").fetchall())
    assert is_busy(locked) and not is_lost(locked)
    holder.execute("ROLLBACK")


def test_a_full_or_read_only_store_is_told_apart_and_never_retried(tmp_path):
    """Real refusals: SQLite's own "database or disk is full" (a database capped at its size), a
    read-only database, a device that is always full (/dev/full); each is said in one line that names
    the file and what was being written, after one attempt. A busy or missing table is not one."""
    import sqlalchemy

    from ablate.locks import StoreUnwritable, is_transient, retry_busy, unwritable

    db = tmp_path / "capped.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    page_count = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {page_count}")  # SQLite's full disk, for this connection
    calls = []

    def insert():
        calls.append(1)
        conn.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))

    with pytest.raises(StoreUnwritable) as full:
        retry_busy(insert, what="the ledger", where=f"sqlite:///{db}", writing="the result of trial 3")
    assert calls == [1]  # one attempt: a full disk is not a busy one
    assert str(full.value) == (f"no space left on device writing {db} (the ledger: the result of trial 3) (free some "
                               "space, then run the same command again: finished cells are kept and the others resume)")
    assert full.value.what == "the ledger" and "\n" not in str(full.value)

    # wrapped as SQLAlchemy (and MLflow, Optuna) wrap it
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as c:
        c.exec_driver_sql(f"PRAGMA max_page_count = {page_count}")
        try:
            c.exec_driver_sql("INSERT INTO t VALUES (?)", ("x" * 100_000,))
        except sqlalchemy.exc.OperationalError as e:
            wrapped = e
    engine.dispose()
    assert unwritable(wrapped) == "no space left on device" and not is_transient(wrapped)

    read_only = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        read_only.execute("INSERT INTO t VALUES (1)")
    except sqlite3.OperationalError as e:
        assert unwritable(e) == "read-only"
    with pytest.raises(StoreUnwritable) as ro:
        retry_busy(read_only.execute, "INSERT INTO t VALUES (1)", what="the MLflow store", where=f"sqlite:///{db}")
    assert str(ro.value).startswith(f"cannot write {db}: read-only (the MLflow store: execute) (make it writable, "
                                    "then ")

    with pytest.raises(StoreUnwritable) as device:  # a failed write names no file of its own: "where" is said
        retry_busy(lambda: open("/dev/full", "wb", buffering=0).write(b"x"), what="MLflow's artifact folder",
                   where="/elsewhere", writing="config.yaml")
    assert str(device.value).startswith("no space left on device writing /elsewhere (MLflow's artifact folder: "
                                        "config.yaml) (free some space")

    missing = sqlite3.connect(tmp_path / "other.db")
    with pytest.raises(sqlite3.OperationalError):  # anything else goes on as it was
        retry_busy(missing.execute, "INSERT INTO nowhere VALUES (1)")
    holder = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        sqlite3.connect(tmp_path / "busy.db", timeout=0).execute("INSERT INTO t VALUES (1)")
    except sqlite3.OperationalError as e:
        assert unwritable(e) is None and is_transient(e)
    holder.execute("ROLLBACK")


def test_a_lost_store_is_retried_within_the_budget_then_said_in_one_line(monkeypatch):
    from ablate import locks
    from ablate.errors import AblateError

    monkeypatch.setattr(locks, "_gave_up", None)
    monkeypatch.setenv("ABLATE_STORE_RETRY_SECONDS", "2")
    calls = []

    class OperationalError(Exception):
        pass

    def blinks():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OperationalError("server closed the connection unexpectedly")
        return "answer"

    assert locks.retry_busy(blinks, what="the ledger") == "answer"

    def gone():
        raise OperationalError('connection to server at "127.0.0.1", port 1 failed: Connection refused')

    start = time.monotonic()
    with pytest.raises(AblateError) as lost:
        locks.retry_busy(gone, what="the ledger")
    assert 2 <= time.monotonic() - start < 4
    assert str(lost.value).startswith("the ledger stopped answering: no connection for 2 s (connection to server")
    assert "\n" not in str(lost.value) and "ABLATE_STORE_RETRY_SECONDS" in str(lost.value)
    start = time.monotonic()  # the command is ending: no second wait, and the first cause is what is said
    with pytest.raises(AblateError) as again:
        locks.retry_busy(gone, what="the MLflow store")
    assert time.monotonic() - start < 1 and str(again.value) == str(lost.value)


# ---- a real PostgreSQL behind a forwarder that the test cuts ---------------------------------------

@pytest.fixture
def proxied_databases():
    """Two fresh databases (ledger, MLflow) reached through a :class:`pgproxy.Proxy`; yields
    (proxy, ledger_url, mlflow_url). The databases are dropped and the proxy closed afterwards."""
    from pgproxy import Proxy
    conn = _admin()
    names = [f"ablate_test_{uuid.uuid4().hex[:10]}_{kind}" for kind in ("ledger", "mlflow")]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f'CREATE DATABASE "{name}"')
    host, port = ADMIN_URL.split("@", 1)[1].split("/", 1)[0].split(":")
    proxy = Proxy(host, int(port))
    try:
        yield proxy, proxy.url(names[0]), proxy.url(names[1])
    finally:
        proxy.close()
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def _cell_runs(mlflow_url: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_url)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'")


@pytest.mark.slow
def test_stores_that_blink_for_20_seconds_mid_cell_are_waited_for(workdir, proxied_databases):
    """Both stores go away for 20 s while two workers train: each worker waits at its next write,
    the run ends with exit 0 and every cell once, and nothing is printed about it but warnings."""
    from ablate.ledger import Ledger
    from ablate.spec import load_spec

    proxy, ledger_url, mlflow_url = proxied_databases
    spec = write_spec(workdir / "blink.yaml", name="blink", epochs=10, extra="grid:\n  model.shift: [none, four]\n")
    env = {**os.environ, "ABLATE_STORAGE": ledger_url, "MLFLOW_TRACKING_URI": mlflow_url, "PYTHONUNBUFFERED": "1"}
    env.pop("ABLATE_STORE_RETRY_SECONDS", None)  # the default budget
    started = time.monotonic()
    proc = subprocess.Popen(ablate_cmd("run", str(spec), "--workers", "2"), cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: any((workdir / "checkpoints" / "blink").glob("*/last.pt")), timeout=300)
        proxy.down()
        time.sleep(20)
        proxy.up()
        out = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "FAILED" not in out, out
    keys = {c.key for c in load_spec(spec).cells()}
    runs = _cell_runs(mlflow_url, "blink")
    assert sorted(r.data.tags["ablate.cell_key"] for r in runs) == sorted(keys)
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:  # every epoch logged once, the blink's included
        from mlflow.tracking import MlflowClient
        steps = sorted(m.step for m in MlflowClient(mlflow_url).get_metric_history(run.info.run_id, "val_top1"))
        assert steps == list(range(1, 11)), steps
    assert Ledger(ledger_url, "blink", create=False).counts(keys)["COMPLETE"] == 2
    print(f"blink run took {time.monotonic() - started:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_store_gone_for_good_ends_the_run_in_one_line_and_a_rerun_recovers(workdir, proxied_databases, workers):
    """The stores stop answering mid-cell and never come back: the run notices at the cell's
    next epoch (long before it would finish), waits ABLATE_STORE_RETRY_SECONDS, and ends with
    one error line and exit 2, whether the worker is the command itself or one of its spawned
    workers (which says why, and the command says it stopped them). Once the server answers
    again, the same command finishes the cell."""
    proxy, ledger_url, mlflow_url = proxied_databases
    epochs = 6
    spec = write_spec(workdir / "gone.yaml", name="gone", epochs=epochs)
    env = {**os.environ, "ABLATE_STORAGE": ledger_url, "MLFLOW_TRACKING_URI": mlflow_url, "PYTHONUNBUFFERED": "1",
           "ABLATE_STORE_RETRY_SECONDS": "5"}
    proc = subprocess.Popen(ablate_cmd("run", str(spec), "--workers", workers), cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: any((workdir / "checkpoints" / "gone").glob("*/last.pt")), timeout=300)
        proxy.down()
        cut = time.monotonic()
        out, err = proc.communicate(timeout=300)
        took = time.monotonic() - cut
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out + err
    said = lines[0] if workers == "1" else out
    assert "stopped answering" in said and "Connection refused" in said and "run the same command again" in lines[0]
    assert "done, top-1" not in out  # noticed at the next epoch's write, not after the whole cell
    print(f"gone for good ({workers} worker(s)): exit 2 after {took:.0f} s")

    proxy.up()
    again = run_ablate("run", str(spec), cwd=workdir, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from" in again.stdout
    [run] = _cell_runs(mlflow_url, "gone")
    assert run.info.status == "FINISHED"


# ---- a database that is not a ledger ----------------------------------------------------------------

def test_the_ledger_refuses_an_mlflow_database(workdir):
    """Another project's MLflow store given as --storage (this run's MLflow store is elsewhere)."""
    from mlflow.tracking import MlflowClient
    (workdir / "other").mkdir()
    MlflowClient(f"sqlite:///{workdir / 'other' / 'mlflow.db'}").create_experiment("someone-elses")
    before = _sqlite_tables(workdir / "other" / "mlflow.db")
    spec = write_spec(workdir / "s.yaml", name="foreign")
    for storage in ("sqlite:///other/mlflow.db", f"sqlite:///{workdir / 'other' / 'mlflow.db'}"):
        res = run_ablate("run", str(spec), "--storage", storage, cwd=workdir)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ledger storage sqlite:///other/mlflow.db: holds "
                                                       "another application's tables (an MLflow store: "), lines
    assert _sqlite_tables(workdir / "other" / "mlflow.db") == before  # no Optuna table added
    assert not (workdir / "mlflow.db").exists() and not (workdir / "checkpoints").exists()  # nothing written
    # this run's own MLflow store as the ledger: refused too, in one line
    MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").create_experiment("mine")
    res = run_ablate("run", str(spec), "--storage", "sqlite:///mlflow.db", cwd=workdir)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stdout + res.stderr
    assert "studies" not in _sqlite_tables(workdir / "mlflow.db")


def _sqlite_tables(path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_the_ledger_refuses_a_postgresql_database_of_another_application(workdir):
    conn = _admin()
    name = f"ablate_test_{uuid.uuid4().hex[:10]}_app"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        import psycopg
        with psycopg.connect(url, autocommit=True) as app:
            app.execute("CREATE TABLE customers (id integer PRIMARY KEY, name text)")
        spec = write_spec(workdir / "s.yaml", name="foreign-pg")
        res = run_ablate("run", str(spec), "--storage", url, cwd=workdir)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "holds another application's tables (customers)" in lines[0], lines
        with psycopg.connect(url) as app:
            tables = {r[0] for r in app.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()}
        assert tables == {"customers"}  # nothing of Optuna's
        assert not (workdir / "mlflow.db").exists() or "foreign-pg" not in _sqlite_tables(workdir / "mlflow.db")
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
