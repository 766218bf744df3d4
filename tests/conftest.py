"""Shared fixtures: every test gets its own working directory with its own MLflow and ledger stores."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The suite's two test processes share two cores, and many tests start training processes of
# their own: torch's default of a thread per core then oversubscribes the CPU, and these tiny
# models train several times slower with their threads waiting on each other. One thread per
# process, set before torch is imported and inherited by every process a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean cwd whose stores (mlflow.db, ablate-ledger.db, checkpoints/) are all inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ABLATE_STORAGE", f"sqlite:///{tmp_path / 'ablate-ledger.db'}")
    monkeypatch.setenv("ABLATE_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("ABLATE_HEARTBEAT", raising=False)
    return tmp_path


TINY = """\
name: {name}
data: {{name: digits}}
model: {{image_size: 8, patch_size: 2, width: 16, depth: 1, mlp_ratio: 2, shift: four}}
train: {{epochs: {epochs}, batch_size: 64, lr: 3.0e-3, warmup_epochs: 0, hflip: 0, crop_scale: 0.8}}
"""


def write_spec(path: Path, name: str = "tiny", epochs: int = 2, extra: str = "") -> Path:
    """A tiny digits spec that trains in about a second per epoch on a CPU."""
    path.write_text(TINY.format(name=name, epochs=epochs) + textwrap.dedent(extra))
    return path


def wait_for(predicate, timeout: float = 180.0, every: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def ablate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ablate", *args]


def run_ablate(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(ablate_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real file system of ``size`` (tmpfs) mounted at ``path``, unmounted afterwards; skips
    the test where mounting is not allowed (it needs root)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and a mount permission")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def pg_role_stores(password: str, written: str | None = None):
    """A PostgreSQL role with ``password`` and two databases it owns (ledger, MLflow), dropped
    afterwards. Yields their URLs, the password written in them as ``written`` (default: as is).
    Skips where no server runs (CI promises one: there it fails instead)."""
    import uuid
    from test_postgres import ADMIN_URL, _admin
    conn = _admin()
    tag = uuid.uuid4().hex[:10]
    role = f"ablate_pw_{tag}"
    dbs = [f"ablate_test_{tag}_{kind}" for kind in ("ledger", "mlflow")]
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        for db in dbs:
            cur.execute(f'CREATE DATABASE "{db}" OWNER {role}')
    host = ADMIN_URL.split("@", 1)[1].rsplit("/", 1)[0]
    try:
        yield [f"postgresql://{role}:{written or password}@{host}/{db}" for db in dbs]
    finally:
        with conn.cursor() as cur:
            for db in dbs:
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        conn.close()


@pytest.fixture
def pg_secret_stores():
    """A PostgreSQL role with a password and two databases it owns (ledger, MLflow), dropped afterwards.

    Yields (ledger_url, mlflow_url, password); the URLs carry the password, as a user's would.
    """
    import uuid
    password = f"Pw{uuid.uuid4().hex[:10]}Secret"
    with pg_role_stores(password) as urls:
        yield urls + [password]
