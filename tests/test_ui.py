"""``ablate ui``: the MLflow UI on the runs' store, on loopback, stopped cleanly by SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from ablate.cli import cli
from ablate.ui import absolute_store_uri, dashboard_installed, url

ABLATE = [sys.executable, "-c", "from ablate.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            out[int(entry.name)] = int(ppid)
    return out


def _descendants(pid: int) -> set[int]:
    parents = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    return pid in _children()


def test_store_uris_are_made_absolute(tmp_path):
    assert absolute_store_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_store_uri("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path}/sub/x.db"
    assert absolute_store_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert absolute_store_uri("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"
    assert absolute_store_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    assert absolute_store_uri("mlruns", tmp_path) == str(tmp_path / "mlruns")
    assert url("0.0.0.0", 5000) == "http://127.0.0.1:5000/"
    assert url("::1", 5000) == "http://[::1]:5000/"


@pytest.mark.skipif(dashboard_installed(), reason="optuna-dashboard is installed here")
def test_optuna_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["ui", "--optuna", "--port", str(_free_port())])
    assert result.exit_code == 2
    assert "pip install 'ablate[dashboard]'" in result.output


def test_a_busy_port_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(cli, ["ui", "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "--port" in result.output


@pytest.mark.slow
def test_ui_serves_the_runs_store_on_loopback_and_stops_on_sigterm(tmp_path):
    from mlflow.tracking import MlflowClient
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").create_experiment("visible-in-ui")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow's default store
    port = _free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen(ABLATE + ["ui", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        base = f"http://127.0.0.1:{port}"
        status = None
        for _ in range(240):  # up to about 120 s on a loaded machine
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()
            try:
                with urllib.request.urlopen(base + "/", timeout=2) as r:
                    status = r.status
                    break
            except OSError:
                time.sleep(0.5)
        assert status == 200, (tmp_path / "ui.log").read_text()
        # the same store the runs use: the experiment created above is there
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?"
                                    "experiment_name=visible-in-ui", timeout=10) as r:
            assert json.load(r)["experiment"]["name"] == "visible-in-ui"
        children = _descendants(proc.pid)
        assert children, "the UI runs in child processes"
        # the command prints the URL once its own readiness poll has seen the server answer
        for _ in range(60):
            if f"MLflow UI: {base}/" in (tmp_path / "ui.log").read_text():
                break
            time.sleep(0.5)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)], "server processes left behind"
        output = (tmp_path / "ui.log").read_text()
        assert f"MLflow UI: {base}/" in output and f"sqlite:///{tmp_path}/mlflow.db" in output
    finally:  # on a failure, end what this test started, by pid
        if proc.poll() is None:
            children |= _descendants(proc.pid)
            proc.kill()
            proc.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
