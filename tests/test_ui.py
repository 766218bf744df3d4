"""``ablate ui``: the MLflow UI on the runs' store, on loopback, stopped cleanly by SIGTERM."""
from __future__ import annotations

import http.client
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
from ablate.ui import _servers, absolute_store_uri, check_port_free, dashboard_installed, network_access, url

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


def _end(proc, children: set) -> None:
    """End, by pid, what a test started: the server process and the children it had."""
    if proc.poll() is None:
        children |= _descendants(proc.pid)
        proc.kill()
        proc.wait()
    for pid in children:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


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


def test_optuna_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import ablate.ui
    monkeypatch.setattr(ablate.ui, "dashboard_installed", lambda: False)  # as where the extra is not installed
    result = CliRunner().invoke(cli, ["ui", "--optuna", "--port", str(_free_port())])
    assert result.exit_code == 2
    assert "pip install optuna-dashboard" in result.output and "pip install -e '.[dashboard]'" in result.output


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
        _end(proc, children)
        log.close()


def _time_wait_ports() -> set[int]:
    """Local ports of IPv4 connections in TIME-WAIT (state 06 in /proc/net/tcp)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "06":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_port_only_in_time_wait_is_free(tmp_path):
    """A UI stopped a moment ago leaves its port in TIME-WAIT: starting it again must work."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gunicorn listen
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the side that closes first keeps the connection in TIME-WAIT
        client.recv(1)
        client.close()
    assert port in _time_wait_ports()
    check_port_free("127.0.0.1", port)  # the servers bind with SO_REUSEADDR: so may we


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return out


@pytest.mark.skipif(not dashboard_installed(), reason="optuna-dashboard is not installed")
def test_store_urls_reach_the_servers_outside_their_command_lines(tmp_path, monkeypatch):
    password = "Sw0rdfish-in-url"
    tracking = f"postgresql://ui:{password}@127.0.0.1:5432/mlflow"
    ledger = f"postgresql://ui:{password}@127.0.0.1:5432/ledger?sslmode=disable"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    said = []
    mlflow_ui, dashboard = _servers("127.0.0.1", _free_port(), True, ledger, _free_port(), tmp_path, said.append)
    for server in (mlflow_ui, dashboard):
        assert not any(password in arg for arg in server.command), server.command
    assert mlflow_ui.env["MLFLOW_BACKEND_STORE_URI"] == tracking
    [config] = [Path(a) for a in dashboard.command if a.endswith(".toml")]
    assert config.parent == tmp_path and (config.stat().st_mode & 0o777) == 0o600
    import tomllib
    assert tomllib.loads(config.read_text())["optuna_dashboard"]["storage"] == ledger
    assert not any(password in line for line in said)


@pytest.mark.slow
@pytest.mark.skipif(not dashboard_installed(), reason="optuna-dashboard is not installed")
def test_ui_on_password_protected_stores_shows_the_password_nowhere(tmp_path, pg_secret_stores):
    """`ps` shows every user each process's command line: the database password must not be there."""
    from ablate.ledger import Ledger
    ledger_url, mlflow_url, password = pg_secret_stores
    Ledger(ledger_url, "visible-in-dashboard")
    # the user gives both URLs through the environment (an option would put it on ablate's own command line)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "ABLATE_STORAGE": ledger_url, "PYTHONUNBUFFERED": "1"}
    port, dport = _free_port(), _free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen(ABLATE + ["ui", "--port", str(port), "--optuna", "--optuna-port", str(dport)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        for _ in range(360):  # both servers answer (MLflow first creates its tables: slow on a loaded machine)
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()
            if "Ctrl-C stops them" in (tmp_path / "ui.log").read_text():
                break
            time.sleep(0.5)
        text = (tmp_path / "ui.log").read_text()
        assert f"MLflow UI: http://127.0.0.1:{port}/" in text and f"optuna-dashboard: http://127.0.0.1:{dport}/" in text, text
        with urllib.request.urlopen(f"http://127.0.0.1:{dport}/api/studies", timeout=10) as r:
            assert "visible-in-dashboard" in r.read().decode()  # the dashboard did open the ledger
        children = _descendants(proc.pid)
        assert len(children) >= 2
        leaks = {pid: cmd for pid, cmd in _cmdlines().items() if password in cmd}
        assert not leaks, leaks
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        output = (tmp_path / "ui.log").read_text()
        assert password not in output, output
        assert ":***@" in output
    finally:
        _end(proc, children)
        log.close()


# ---- beyond loopback: MLflow's Host-header check must let the network in ---------------------------


def test_allowed_hosts_for_a_network_bind(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert network_access("127.0.0.1", 5000) is None  # loopback: MLflow's own default is right
    port = _free_port()
    said = []
    [server] = _servers("0.0.0.0", port, False, None, None, tmp_path, said.append, ("mlflow.lab.example,*.lab.org",))
    command = server.command
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    origins = command[command.index("--cors-allowed-origins") + 1].split(",")
    name = socket.gethostname()
    assert {f"{name}:{port}", f"mlflow.lab.example:{port}", "*.lab.org", "localhost:*", "10.*"} <= set(hosts)
    assert {f"http://{name}:{port}", f"http://mlflow.lab.example:{port}"} <= set(origins)
    assert "*" not in hosts and "*" not in origins
    assert server.note and f"http://{name}:{port}/" in server.note and "mlflow.lab.example" in server.note
    bad = CliRunner().invoke(cli, ["ui", "--host", "0.0.0.0", "--port", str(port), "--allowed-hosts", "http://x/y"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1, bad.output
    assert "--allowed-hosts: 'http://x/y'" in bad.output and "allowed:" in bad.output


def _request(port: int, host: str, path: str, method: str = "GET", body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, str]:
    """An HTTP request to 127.0.0.1:``port`` (only there) with the Host header ``host``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.mark.slow
def test_ui_on_all_interfaces_answers_requests_from_the_network(tmp_path):
    """`ablate ui --host 0.0.0.0`: a browser elsewhere sends this machine's name (or an allowed one)
    as Host, and the UI's own API calls carry that origin; MLflow must answer them, and still
    refuse a name nobody allowed."""
    from mlflow.tracking import MlflowClient
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").create_experiment("reached-from-afar")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    port = _free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen(ABLATE + ["ui", "--host", "0.0.0.0", "--port", str(port),
                                      "--allowed-hosts", "mlflow.lab.example"],
                            cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        for _ in range(360):
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()
            if f"MLflow UI: http://127.0.0.1:{port}/" in (tmp_path / "ui.log").read_text():
                break
            time.sleep(0.5)
        output = (tmp_path / "ui.log").read_text()
        assert f"MLflow UI: http://127.0.0.1:{port}/" in output, output
        name = socket.gethostname()
        assert f"MLflow UI from the network: http://{name}:{port}/" in output and "mlflow.lab.example" in output
        get = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=reached-from-afar"
        for host in (f"{name}:{port}", f"10.1.2.3:{port}", f"mlflow.lab.example:{port}", "mlflow.lab.example"):
            status, body = _request(port, host, get)
            assert status == 200 and "reached-from-afar" in body, (host, status, body)
            status, page = _request(port, host, "/")
            assert status == 200, (host, status, page)
        # the UI's own API calls (POST) from the page opened at this machine's name carry that origin
        search = json.dumps({"max_results": 10}).encode()
        status, body = _request(port, f"{name}:{port}", "/ajax-api/2.0/mlflow/experiments/search", "POST", search,
                                {"Origin": f"http://{name}:{port}", "Content-Type": "application/json"})
        assert status == 200 and "reached-from-afar" in body, (status, body)
        # the protection stays on for what nobody allowed
        status, body = _request(port, f"attacker.example:{port}", get)
        assert status == 403 and "Invalid Host header" in body, (status, body)
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        _end(proc, children)
        log.close()
