"""``ablate ui``: the MLflow UI (and optionally optuna-dashboard) on the stores the runs use.

The servers run as child processes, each in its own process group so that Ctrl-C or SIGTERM
reaching ``ablate ui`` stops them and every worker they started, and nothing else. Store URLs
may hold a database password and every user of the machine can read a process's command line
(``ps``), so the URLs reach the servers through the environment (MLflow) or a configuration
file only we can read (optuna-dashboard), never as arguments.
"""
from __future__ import annotations

import fcntl
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
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
from mlflow.server.security_utils import get_default_allowed_hosts

from ablate import names
from ablate.errors import AblateError
from ablate.ledger import storage_url
from ablate.locks import sqlite_path
from ablate.urls import absolute_sqlite, mask_url

INSTALL_DASHBOARD = "pip install optuna-dashboard (in a clone of ablate: pip install -e '.[dashboard]')"
REMOTE_SCHEMES = ("http://", "https://", "databricks")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# MLflow 3's server refuses a request whose Host header it does not allow ("Invalid Host header",
# against DNS rebinding) and a state-changing API call from an origin it does not allow (CORS):
# `mlflow server --allowed-hosts` / `--cors-allowed-origins` (MLFLOW_SERVER_ALLOWED_HOSTS,
# MLFLOW_SERVER_CORS_ALLOWED_ORIGINS). Its default allows localhost and private addresses only.
ALLOWED_HOSTS_ENV = "MLFLOW_SERVER_ALLOWED_HOSTS"
ALLOWED_ORIGINS_ENV = "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"
_HOST_PATTERN = re.compile(r"^(?:\*|[A-Za-z0-9*_.-]+|\[[0-9A-Fa-f:.*]+\])(?::(?:\d{1,5}|\*))?$")
SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


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


def mlflow_command(host: str, port: int, access: Optional["Access"] = None) -> list[str]:
    # One worker: a UI for one person needs no more, and each worker is a full Python process.
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    if access is not None:
        command += ["--allowed-hosts", ",".join(access.hosts), "--cors-allowed-origins", ",".join(access.origins)]
    return command


# ---- who may reach the UI over the network ---------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def machine_addresses() -> list[str]:
    """The names and addresses other machines may reach this one by: its host name and canonical
    name, what they resolve to, and the addresses of its network interfaces (Linux); no loopback
    and no link-local address (a browser cannot use those in a URL without a zone)."""
    found: list[str] = []
    name = socket.gethostname()
    found.append(name)
    try:
        infos = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)
    except OSError:
        infos = []
    found += [i[3] for i in infos if i[3]] + [i[4][0] for i in infos]
    try:
        interfaces = [n for _, n in socket.if_nameindex()]
    except OSError:
        interfaces = []
    for interface in interfaces:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", interface[:15].encode()))
            except OSError:  # no IPv4 address, or not Linux
                continue
            found.append(socket.inet_ntoa(packed[20:24]))
    try:  # IPv6: address, index, prefix length, scope (00: global), flags, interface
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        lines = []
    found += [str(ipaddress.ip_address(int(f[0], 16))) for f in (line.split() for line in lines)
              if len(f) >= 6 and f[3] == "00"]
    kept = []
    for address in found:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
            if ip.is_loopback or ip.is_link_local:
                continue
        except ValueError:
            if address.lower() == "localhost":
                continue
        if address not in kept:
            kept.append(address)
    return kept


@dataclass
class Access:
    """What MLflow's server is told to answer: Host headers (``--allowed-hosts``) and origins of
    the UI's own API calls (``--cors-allowed-origins``), and how to say it."""
    hosts: list[str]
    origins: list[str]
    names: list[str]      # this machine's names and addresses it answers (with the port)
    extra: list[str]      # --allowed-hosts

    def line(self, port: int) -> str:
        if "*" in self.extra:
            return ("MLflow UI answers any Host header and API calls from any web page (--allowed-hosts '*'): "
                    "any page a browser on this network opens may read and change the runs")
        links = [f"http://{n}:{port}/" for n in self.names[:6]]
        more = f" and {len(self.names) - 6} more address(es)" if len(self.names) > 6 else ""
        where = f"MLflow UI from the network: {', '.join(links)}{more} (" if links else "MLflow UI ("
        extra = f"{', '.join(self.extra)}, " if self.extra else ""
        return (f"{where}also answers {extra}localhost and private addresses; any other Host header is refused: "
                "--allowed-hosts NAME adds one)")


def _host_items(values) -> list[str]:
    items = []
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            if not _HOST_PATTERN.match(item):
                raise AblateError(f"--allowed-hosts: {item!r} (allowed: host names or addresses, each with an "
                                  "optional :PORT and * wildcards, e.g. mlflow.lab.org,*.lab.org,203.0.113.5; "
                                  "no scheme, no path)")
            items.append(item)
    return items


def _with_port(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _has_port(item: str) -> bool:
    return item.rsplit("]", 1)[-1].count(":") == 1 if item.startswith("[") else ":" in item


def network_access(host: str, port: int, allowed_hosts=()) -> Optional[Access]:
    """What the MLflow server bound to ``host``:``port`` must allow so that it answers where it
    listens: None on loopback without ``--allowed-hosts`` (MLflow's default is right there); else
    MLflow's default hosts, this machine's names and addresses (a wildcard bind) or ``host``,
    ``allowed_hosts`` (each also with the port) and what MLFLOW_SERVER_ALLOWED_HOSTS already
    allows; and the matching ``http://NAME:PORT`` origins."""
    extra = _host_items(allowed_hosts)
    if is_loopback(host) and not extra:
        return None
    names = [] if is_loopback(host) else (machine_addresses() if host in WILDCARD_HOSTS else [host])
    if "*" in extra:
        return Access(["*"], ["*"], names, extra)
    hosts = list(get_default_allowed_hosts())
    hosts += [h for h in (os.environ.get(ALLOWED_HOSTS_ENV) or "").split(",") if h.strip()]
    origins = [o for o in (os.environ.get(ALLOWED_ORIGINS_ENV) or "").split(",") if o.strip()]
    for name in names:
        shown = _with_port(name)
        hosts += [shown, f"{shown}:{port}"]
        origins.append(f"http://{shown}:{port}")
    for item in extra:
        hosts.append(item)
        if not _has_port(item):
            hosts.append(f"{item}:{port}" if "*" not in item else f"{item}:*")
            origins += [f"http://{item}:{port}", f"http://{item}", f"https://{item}"]
        else:
            origins.append(f"http://{item}")
    dedup = lambda xs: list(dict.fromkeys(x.strip() for x in xs))  # noqa: E731
    return Access(dedup(hosts), dedup(origins), [f"{_with_port(n)}" for n in names], extra)


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
    note: Optional[str] = None  # a line said when it starts (who it answers)
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
          echo: Callable[[str], None] = print, ready_timeout: float = 180.0, allowed_hosts=()) -> None:
    """Run the MLflow UI on the tracking store (and optuna-dashboard on the ledger with
    ``optuna``) until Ctrl-C or SIGTERM, then stop them. Returns after a clean stop; raises
    :class:`AblateError` for a missing extra, a busy port, a bad ``allowed_hosts`` or a server
    that dies. Bound beyond loopback, the MLflow UI answers this machine's names and addresses
    and ``allowed_hosts`` (:func:`network_access`), and says so."""
    if optuna and not dashboard_installed():
        raise AblateError(f"--optuna needs optuna-dashboard, which is not installed: {INSTALL_DASHBOARD}")
    with tempfile.TemporaryDirectory(prefix="ablate-ui-") as private:  # mode 0700
        servers = _servers(host, port, optuna, storage, optuna_port, Path(private), echo, allowed_hosts)
        if servers:
            _run(servers, echo, ready_timeout)


def _servers(host: str, port: int, optuna: bool, storage: Optional[str], optuna_port: Optional[int],
             private: Path, echo: Callable[[str], None], allowed_hosts=()) -> list[Server]:
    servers: list[Server] = []
    access = network_access(host, port, allowed_hosts)
    store = tracking_store_uri()
    if store.startswith(REMOTE_SCHEMES):
        echo(f"runs are tracked on {mask_url(store)}: open it there (no local MLflow UI to start)")
        if store.startswith(("http://", "https://")):
            for line in experiment_links(store, mask_url(store)):
                echo(line)
    else:
        check_port_free(host, port)
        address = url(host, port)
        servers.append(Server("MLflow UI", mlflow_command(host, port, access), address, store, mlflow_env(store),
                              links=lambda: experiment_links(address), note=access.line(port) if access else None))
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
            if s.note:
                echo(s.note)
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
