"""Many workers on one grid through a real PostgreSQL server: the ledger and the MLflow store.

Needs the server on 127.0.0.1:5432 (trust authentication) that the test machines run; CI's
`.ci/run` checks it is reachable. Elsewhere the test skips and says why.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest

from conftest import ablate_cmd, write_spec

ADMIN_URL = os.environ.get("ABLATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin():
    import psycopg
    try:
        conn = psycopg.connect(ADMIN_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        if os.environ.get("CI"):  # CI promises a server: a missing one is a failure, not a skip
            pytest.fail(f"no PostgreSQL at {ADMIN_URL}: {e}")
        pytest.skip(f"no PostgreSQL at {ADMIN_URL} ({str(e).strip().splitlines()[0]}); "
                    "set ABLATE_TEST_POSTGRES to a server URL to run this test")
    return conn


@pytest.fixture
def pg_databases():
    """Two fresh databases (ledger, MLflow), dropped afterwards."""
    conn = _admin()
    names = [f"ablate_test_{uuid.uuid4().hex[:10]}_{kind}" for kind in ("ledger", "mlflow")]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    yield [f"{base}/{name}" for name in names]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.mark.slow
def test_three_workers_one_killed_every_cell_once(workdir, pg_databases):
    import mlflow
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from ablate.ledger import Ledger
    from ablate.spec import load_spec

    ledger_url, mlflow_url = pg_databases
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "ABLATE_STORAGE": ledger_url,
           "ABLATE_HEARTBEAT": "1,4", "PYTHONUNBUFFERED": "1"}
    spec = write_spec(workdir / "pg.yaml", name="pg-grid", epochs=4,
                      extra="grid:\n  model.shift: [none, four, eight, up, down, left]\n")
    ckpts = workdir / "checkpoints" / "pg-grid"
    # started together: the stores' schemas are created under a PostgreSQL advisory lock
    procs = [subprocess.Popen(ablate_cmd("run", str(spec)), cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    # wait for a cell with a checkpoint (an epoch done, more to go), then kill its worker
    victim, deadline = None, time.time() + 300
    while victim is None and time.time() < deadline:
        time.sleep(0.05)
        started = {p.parent.name for p in ckpts.glob("*/last.pt")}
        if not started:
            continue
        for t in Ledger(ledger_url, "pg-grid").trials(states=(TrialState.RUNNING,)):
            if t.user_attrs.get("ablate.cell_key") in started:
                pid = int(t.user_attrs["ablate.worker"].rpartition(":")[2])
                victim = next((p for p in procs if p.pid == pid), None)
                killed_key = t.user_attrs["ablate.cell_key"]
                break
    assert victim is not None, "no worker was seen mid-cell"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivors = [p for p in procs if p is not victim]
    outputs = [p.communicate(timeout=600)[0] for p in survivors]
    assert [p.returncode for p in survivors] == [0, 0], outputs

    keys = {c.key for c in load_spec(spec).cells()}
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_url
    try:
        exp = MlflowClient().get_experiment_by_name("pg-grid")
        runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'",
                                  output_format="list")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    finished = [r.data.tags["ablate.cell_key"] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(keys)  # exactly one finished run per cell
    ledger = Ledger(ledger_url, "pg-grid")
    assert ledger.counts(keys)["COMPLETE"] == len(keys)
    complete = [t.user_attrs["ablate.cell_key"] for t in ledger.trials(states=(TrialState.COMPLETE,))]
    assert sorted(complete) == sorted(keys)
    # a live worker took the killed worker's cell over and resumed it from its checkpoint
    assert any(f"cell {killed_key}" in out and "resuming from" in out for out in outputs), outputs
