"""``ablate ui``: the MLflow UI (and optionally optuna-dashboard) on the stores the runs use.

The servers run as child processes, each in its own process group so that Ctrl-C or SIGTERM
reaching ``ablate ui`` stops them and every worker they started, and nothing else. Store URLs
may hold a database password and every user of the machine can read a process's command line
(``ps``), so the URLs reach the servers through the environment (MLflow) or a configuration
file only we can read (optuna-dashboard), never as arguments.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlencode

import mlflow

from ablate import names
from ablate.errors import AblateError
from ablate.ledger import storage_url
from ablate.locks import sqlite_path
from ablate.urls import absolute_sqlite, mask_url

INSTALL_DASHBOARD = "pip install optuna-dashboard (in a clone of ablate: pip install -e '.[dashboard]')"
REMOTE_SCHEMES = ("http://", "https://", "databricks")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def absolute_store_uri(uri: str, cwd: Optional[Path] = None) -> str:
    """The same store with relative paths made absolute (against ``cwd``, default the
    working directory), so a server started elsewhere still opens the file the runs use.

    ``sqlite:///mlflow.db`` (three slashes: relative) becomes ``sqlite:////abs/mlflow.db``;
    a plain path is resolved too; every other URL is kept as it is.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if sqlite_path(uri) is not None:
        return absolute_sqlite(uri, base.resolve())
    if "://" not in uri and not uri.startswith("databricks"):
        return str((base / uri).resolve())
    return uri


def tracking_store_uri() -> str:
    """The store MLflow logs to here: ``MLFLOW_TRACKING_URI`` or MLflow's default."""
    return absolute_store_uri(mlflow.get_tracking_uri())


def ledger_store_url(storage: Optional[str] = None) -> str:
    """``--storage``, else ``ABLATE_STORAGE``, else the ledger's default file, made absolute."""
    return absolute_store_uri(storage_url(storage))


def mlflow_env(backend_store_uri: str) -> dict[str, str]:
    """The server's environment: the store (``mlflow server`` reads ``--backend-store-uri``
    from MLFLOW_BACKEND_STORE_URI), and MLflow's background job runner (GenAI scoring, trace
    archival) off unless asked for; browsing runs does not need its worker processes."""
    env = dict(os.environ)
    env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def mlflow_command(host: str, port: int) -> list[str]:
    # One worker: a UI for one person needs no more, and each worker is a full Python process.
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]


def dashboard_executable() -> Optional[str]:
    """optuna-dashboard's console script, preferably the one installed beside this Python."""
    beside = Path(sys.executable).parent / "optuna-dashboard"
    return str(beside) if beside.is_file() else shutil.which("optuna-dashboard")


def dashboard_installed() -> bool:
    return importlib.util.find_spec("optuna_dashboard") is not None and dashboard_executable() is not None


def write_dashboard_config(storage: str, folder: Path) -> Path:
    """optuna-dashboard's ``--from-config`` file naming the storage, readable by this user only."""
    path = Path(folder) / "optuna-dashboard.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        # a JSON string without ASCII escaping is a valid TOML basic string
        f.write(f"[optuna_dashboard]\nstorage = {json.dumps(storage, ensure_ascii=False)}\n")
    return path


def dashboard_command(config: Path, host: str, port: int) -> list[str]:
    return [dashboard_executable() or "optuna-dashboard", "--from-config", str(config),
            "--host", host, "--port", str(port)]


def _local_address(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def url(host: str, port: int) -> str:
    h = _local_address(host)
    return f"http://[{h}]:{port}/" if ":" in h else f"http://{h}:{port}/"


def experiment_urls(base: str, experiment_id: str) -> tuple[str, str]:
    """(runs, charts): where MLflow's UI at ``base`` shows an experiment's runs in ablate's saved
    view (see :func:`ablate.tracking.runs_view`), as a table and as charts.

    ``workflowType=machine_learning`` makes MLflow 3's UI show the runs rather than its GenAI
    overview, whatever the browser last chose; ``viewStateShareKey`` opens the saved view;
    ``compareRunsMode=CHART`` the chart view of the same runs.
    """
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": names.VIEW_KEY})
    runs = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
    return runs, runs + "&compareRunsMode=CHART"


def ablate_experiments(server: str, timeout: float = 10.0) -> list[tuple[str, str]]:
    """(name, id) of the experiments that carry ablate's saved view, latest first, as the MLflow
    server at ``server`` lists them (its REST API: no connection of our own to its database,
    none of the MLflow client's retries, which wait minutes for a database that is down)."""
    found, token = [], None
    while True:
        query = {"max_results": 1000, "order_by": ["last_update_time DESC"], **({"page_token": token} if token else {})}
        request = urllib.request.Request(f"{server.rstrip('/')}/api/2.0/mlflow/experiments/search",
                                         data=json.dumps(query).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                page = json.load(r)
        except (urllib.error.URLError, OSError, ValueError):  # an older or unreachable server: no links
            return found
        found += [(e["name"], e["experiment_id"]) for e in page.get("experiments", [])
                  if any(t.get("key") == names.SHARED_VIEW + names.VIEW_KEY for t in e.get("tags", []))]
        token = page.get("next_page_token")
        if not token:
            return found


def experiment_links(server: str, shown: Optional[str] = None, limit: int = 10) -> list[str]:
    """Lines naming where each ablate experiment on the MLflow server at ``server`` opens
    (written with the address ``shown``, e.g. with its password masked)."""
    found = ablate_experiments(server)
    lines = []
    for name, experiment_id in found[:limit]:
        runs, charts = experiment_urls(shown or server, experiment_id)
        lines += [f"  {name}: runs   {runs}", f"  {' ' * len(name)}  charts {charts}"]
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} older experiment(s): pick them in the UI's list")
    return lines


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on. A port whose last connection is only in
    TIME-WAIT is free: the servers bind with SO_REUSEADDR, and so does this check."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise AblateError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                              "(allowed: a free port, e.g. --port 5001)") from None


def answers(address: str, timeout: float = 2.0) -> bool:
    """True when an HTTP GET of ``address`` returns 200."""
    try:
        with urllib.request.urlopen(address, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Server:
    """A server child process (and its process group)."""
    name: str
    command: list[str]
    address: str
    store: str
    env: Optional[dict[str, str]] = None
    links: Optional[Callable[[], list[str]]] = None  # lines said with the address, once it answers
    process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        # Own session = own process group: a terminal's Ctrl-C reaches only us, and stop()
        # can end the server together with the workers it forks.
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True)

    def exited(self) -> Optional[int]:
        return self.process.poll() if self.process else None

    def stop(self, grace: float = 10.0) -> None:
        p = self.process
        if p is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader may exit before its workers: make sure the group is gone too.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM, like KeyboardInterrupt for Ctrl-C."""


def _raise_stop(signum, frame):
    raise _Stop()


def serve(host: str = "127.0.0.1", port: int = 5000, *, optuna: bool = False,
          storage: Optional[str] = None, optuna_port: Optional[int] = None,
          echo: Callable[[str], None] = print, ready_timeout: float = 180.0) -> None:
    """Run the MLflow UI on the tracking store (and optuna-dashboard on the ledger with
    ``optuna``) until Ctrl-C or SIGTERM, then stop them. Returns after a clean stop; raises
    :class:`AblateError` for a missing extra, a busy port or a server that dies."""
    if optuna and not dashboard_installed():
        raise AblateError(f"--optuna needs optuna-dashboard, which is not installed: {INSTALL_DASHBOARD}")
    with tempfile.TemporaryDirectory(prefix="ablate-ui-") as private:  # mode 0700
        servers = _servers(host, port, optuna, storage, optuna_port, Path(private), echo)
        if servers:
            _run(servers, echo, ready_timeout)


def _servers(host: str, port: int, optuna: bool, storage: Optional[str], optuna_port: Optional[int],
             private: Path, echo: Callable[[str], None]) -> list[Server]:
    servers: list[Server] = []
    store = tracking_store_uri()
    if store.startswith(REMOTE_SCHEMES):
        echo(f"runs are tracked on {mask_url(store)}: open it there (no local MLflow UI to start)")
        if store.startswith(("http://", "https://")):
            for line in experiment_links(store, mask_url(store)):
                echo(line)
    else:
        check_port_free(host, port)
        address = url(host, port)
        servers.append(Server("MLflow UI", mlflow_command(host, port), address, store, mlflow_env(store),
                              links=lambda: experiment_links(address)))
    if optuna:
        ledger = ledger_store_url(storage)
        if sqlite_path(ledger) is not None and not Path(sqlite_path(ledger)).is_file():
            raise AblateError(f"no ledger at {mask_url(ledger)} (allowed: the --storage URL of an `ablate run` "
                              "or `ablate search`, or $ABLATE_STORAGE)")
        dport = optuna_port or port + 1
        check_port_free(host, dport)
        config = write_dashboard_config(ledger, private)
        servers.append(Server("optuna-dashboard", dashboard_command(config, host, dport), url(host, dport), ledger))
    return servers


def _run(servers: list[Server], echo: Callable[[str], None], ready_timeout: float) -> None:
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        for s in servers:
            s.start()
            echo(f"starting {s.name} on {mask_url(s.store)}")
        _wait_ready(servers, echo, ready_timeout)
        echo("Ctrl-C stops " + ("it" if len(servers) == 1 else "them"))
        while True:
            for s in servers:
                if s.exited() is not None:
                    raise AblateError(f"{s.name} stopped (exit status {s.exited()}); see its output above")
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        echo("stopping")
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short and leave servers behind.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for s in servers:
            s.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _wait_ready(servers: list[Server], echo: Callable[[str], None], timeout: float) -> None:
    pending = list(servers)
    deadline = time.monotonic() + timeout
    while pending:
        for s in list(pending):
            if s.exited() is not None:
                raise AblateError(f"{s.name} did not start (exit status {s.exited()}); see its output above")
            if answers(s.address):
                echo(f"{s.name}: {s.address}")
                for line in s.links() if s.links else []:
                    echo(line)
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            for s in pending:
                echo(f"{s.name}: {s.address} (not answering yet after {timeout:.0f} s)")
            return
        time.sleep(0.3)
