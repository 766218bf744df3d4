"""Store problems and bad worker options: one line, exit status 2, nothing written.

An attack corpus: each test is a way a user (or an unlucky disk) once got a traceback, a long
silence or a half-written store from `ablate run`/`ablate search`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ablate.cli import cli
from ablate.errors import AblateError
from ablate.devices import usable_cpus
from ablate.stores import check_database, existing_tracking_store
from conftest import run_ablate, write_spec


SEARCH = "search:\n  objectives: [val_top1]\n  trials: 2\n  space:\n    model.shift: {choice: [none, four]}\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(result, *expected: str) -> str:
    """The one error line of a refused command (exit status 2, no traceback)."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def spec(workdir):
    return write_spec(workdir / "s.yaml", epochs=1)


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


# ---- the ledger ----------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_ledger_is_refused(spec, workdir, url):
    # SQLAlchemy opens these as a private in-memory database: each worker would see its own
    # empty queue, train nothing and report "1 not finished"
    _refused(_run("run", str(spec), "--storage", url), "ledger storage", "in-memory")
    assert _files(workdir) == ["s.yaml"]


def test_a_truncated_ledger_is_refused_before_mlflow_is_written(spec, workdir):
    from ablate.ledger import Ledger
    path = workdir / "ablate-ledger.db"
    Ledger(f"sqlite:///{path}", "other").enqueue_cells([])
    os.truncate(path, path.stat().st_size // 2)
    _refused(_run("run", str(spec)), "ledger storage sqlite:///ablate-ledger.db", "is truncated (")
    assert "mlflow.db" not in _files(workdir)


def test_a_file_that_is_not_sqlite_is_refused(spec, workdir):
    (workdir / "ablate-ledger.db").write_text("these are my notes, not a database\n" * 10)
    _refused(_run("run", str(spec)), "not a SQLite database")
    assert "mlflow.db" not in _files(workdir)


def test_an_unreachable_database_server_is_named_without_its_password(spec, workdir):
    url = f"postgresql://alice:TopSecret77@127.0.0.1:{_free_port()}/ledger"
    line = _refused(_run("run", str(spec), "--storage", url), "cannot connect", "alice:***@127.0.0.1")
    assert "TopSecret77" not in line
    assert _files(workdir) == ["s.yaml"]


def test_a_url_that_is_no_database_is_refused(spec, workdir):
    _refused(_run("run", str(spec), "--storage", "not-a-url"), "ledger storage", "not a database URL")
    _refused(_run("run", str(spec), "--storage", "nosuchdb://u:pw@h/x"), "cannot open", "u:***@h")
    assert _files(workdir) == ["s.yaml"]


# ---- MLflow's store ------------------------------------------------------------------------------

def test_a_truncated_mlflow_db_is_refused_before_the_ledger_is_written(spec, workdir):
    from mlflow.tracking import MlflowClient
    path = workdir / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").create_experiment("earlier")
    os.truncate(path, path.stat().st_size // 2)
    _refused(_run("run", str(spec)), "MLflow store sqlite:///mlflow.db", "is truncated (")
    assert "ablate-ledger.db" not in _files(workdir)


def test_an_unknown_tracking_uri_is_refused_before_the_ledger_is_written(spec, workdir):
    _refused(_run("run", str(spec), env={"MLFLOW_TRACKING_URI": "bogus://x"}), "MLflow store bogus://x")
    assert _files(workdir) == ["s.yaml"]


def test_an_unreachable_mlflow_server_is_awaited_briefly_then_named(spec, workdir):
    uri = f"http://bob:Hunter2Hunter@127.0.0.1:{_free_port()}"
    result = _run("run", str(spec), env={"MLFLOW_TRACKING_URI": uri, "ABLATE_STORE_WAIT": "1"})
    line = _refused(result, "MLflow server http://bob:***@127.0.0.1", "no answer after 1 s")
    assert "waiting up to 1 s for the MLflow server" in result.stderr
    assert "Hunter2Hunter" not in result.output and "Hunter2Hunter" not in line
    assert _files(workdir) == ["s.yaml"]


@pytest.mark.parametrize("command", ["run", "status", "report"])
@pytest.mark.parametrize("password", ["Hunt?er2Hunter", "Hunt/er2Hunter", "Hunt#er2Hunter"])
def test_an_mlflow_server_password_that_requests_would_cut_is_refused_masked(spec, workdir, command, password):
    """requests cuts a URL's user information at an unencoded ?, / or #: MLflow failed with its own
    traceback quoting the URL, and the probe of the server read a piece of the password as the port."""
    uri = f"http://bob:{password}@127.0.0.1:{_free_port()}"
    result = _run(command, str(spec), env={"MLFLOW_TRACKING_URI": uri, "ABLATE_STORE_WAIT": "1"})
    _refused(result, "MLflow store http://bob:***@127.0.0.1", "percent-encode")
    assert "Hunt" not in result.output and "er2Hunter" not in result.output
    assert _files(workdir) == ["s.yaml"]


def test_status_on_an_unreachable_mlflow_server_says_so_in_one_line(spec, workdir):
    """It used to wait through MLflow's own retries, minutes without a word."""
    uri = f"http://127.0.0.1:{_free_port()}"
    _refused(_run("status", str(spec), env={"MLFLOW_TRACKING_URI": uri, "ABLATE_STORE_WAIT": "1"}),
             "no answer after 1 s")


def test_a_search_checks_its_stores_too(workdir):
    write_spec(workdir / "s.yaml", extra=SEARCH)
    _refused(_run("search", "s.yaml", env={"MLFLOW_TRACKING_URI": "bogus://x"}), "MLflow store")
    _refused(_run("search", "s.yaml", "--storage", "sqlite:///"), "in-memory")
    assert _files(workdir) == ["s.yaml"]


def test_existing_tracking_store_creates_nothing(workdir):
    """For commands that only read (report, status): no store here is an error, not a new store."""
    with pytest.raises(AblateError, match="no MLflow store at sqlite:///.*mlflow.db: nothing has been recorded"):
        existing_tracking_store()
    assert _files(workdir) == []
    with pytest.raises(AblateError, match="no MLflow store"):
        existing_tracking_store(str(workdir / "mlruns"))
    from mlflow.tracking import MlflowClient
    MlflowClient().create_experiment("there")
    assert existing_tracking_store() == os.environ["MLFLOW_TRACKING_URI"]


def test_a_report_before_any_run_says_which_command_to_run(spec, workdir):
    """No store here, or a store without this spec's experiment (another --set): the one line
    names the command that records it, with the same options; nothing is created."""
    line = _refused(_run("report", "s.yaml"), "nothing has been recorded here; run it first: ablate run s.yaml (")
    assert line.endswith("--storage set to the stores they used)") and _files(workdir) == ["s.yaml"]
    _refused(_run("report", "s.yaml", "--set", "train.epochs=2", "--name", "my try"),
             "run it first: ablate run s.yaml --set train.epochs=2 --name 'my try' (allowed:")
    write_spec(workdir / "search.yaml", name="searched", extra=SEARCH)
    _refused(_run("report", "search.yaml"), "run it first: ablate search search.yaml (allowed:")
    from mlflow.tracking import MlflowClient
    MlflowClient().create_experiment("tiny")
    line = _refused(_run("report", "s.yaml", "--set", "train.epochs=2"), "no MLflow experiment named 'tiny+")
    assert line.endswith("tiny); run it first: ablate run s.yaml --set train.epochs=2"), line
    # an experiment name, or a spec with a problem, is not followed by a command to run
    assert "run it first" not in _refused(_run("report", "no-such-experiment"), "no MLflow experiment named")
    (workdir / "bad.yaml").write_text("name: bad\nmodel: {widht: 64}\n")
    assert "run it first" not in _refused(_run("report", "bad.yaml"), "model.widht: unknown setting")


def test_a_new_store_is_created_without_mlflow_info_lines(workdir):
    """MLflow announces its schema migration at INFO on every first run: nothing to act on."""
    code = ("from ablate.stores import check_stores; from ablate import tracking; "
            "check_stores('sqlite:///ledger.db'); tracking.ensure_experiment('quiet')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "INFO" not in out.stderr and "Creating initial MLflow database tables" not in out.stderr, out.stderr
    assert (workdir / "mlflow.db").stat().st_size > 0


def test_check_database_accepts_a_new_file_in_an_existing_folder(tmp_path):
    check_database(f"sqlite:///{tmp_path}/new.db", "ledger storage")
    assert not (tmp_path / "new.db").exists()
    with pytest.raises(AblateError, match="folder .* does not exist"):
        check_database(f"sqlite:///{tmp_path}/missing/new.db", "ledger storage")
    with pytest.raises(AblateError, match="is a folder"):
        check_database(f"sqlite:///{tmp_path}", "ledger storage")


# ---- worker options ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--devices", ",,,"], "--devices: ',,,'"),
    (["--devices", "0,,1"], "--devices: '0,,1'"),
    (["--devices", ""], "--devices: ''"),
])
def test_bad_worker_options_are_refused(spec, workdir, args, expected):
    _refused(_run("run", str(spec), *args), expected)
    assert _files(workdir) == ["s.yaml"]


def test_more_workers_than_cpu_cores_are_refused(spec, workdir):
    # --workers 100000 once started that many training processes; one more than the cores is
    # enough to show the cap, and harmless should the cap ever be lost
    too_many = usable_cpus() + 1
    _refused(_run("run", str(spec), "--workers", str(too_many)),
             f"--workers: {too_many} workers, more than the {usable_cpus()} CPU cores")
    write_spec(workdir / "q.yaml", extra=SEARCH)
    _refused(_run("search", "q.yaml", "--workers", str(too_many)), "--workers")
    assert _files(workdir) == ["q.yaml", "s.yaml"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine with a GPU")
def test_devices_on_a_machine_without_gpus_names_the_devices_option(spec, workdir):
    line = _refused(_run("run", str(spec), "--devices", "0"), "--devices: 0: CUDA is not available")
    assert "--device:" not in line
    assert _files(workdir) == ["s.yaml"]


# ---- credentials in what ablate run prints --------------------------------------------------------

@pytest.mark.slow
def test_run_on_password_protected_stores_prints_no_password(workdir, pg_secret_stores):
    ledger_url, mlflow_url, password = pg_secret_stores
    write_spec(workdir / "s.yaml", epochs=1)
    result = run_ablate("run", "s.yaml", "--storage", ledger_url, cwd=workdir,
                        env={"MLFLOW_TRACKING_URI": mlflow_url})
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert password not in output
    assert "ledger postgresql://" in output and ":***@" in output
    assert "Creating initial MLflow database tables" not in output and " INFO " not in output, output
    # and the error lines of a second, refused run (another spec's study kind) mask it as well
    write_spec(workdir / "s2.yaml", epochs=1, extra="search:\n  objectives: [val_top1]\n  trials: 1\n  space:\n    model.shift: {choice: [none]}\n")
    refused = run_ablate("search", "s2.yaml", "--storage", ledger_url, cwd=workdir,
                         env={"MLFLOW_TRACKING_URI": mlflow_url})
    assert refused.returncode == 2 and "is a grid's" in refused.stderr, refused.stderr
    assert password not in refused.stdout + refused.stderr
