"""How runs and processes begin and end: SIGTERM and SIGKILL of `ablate run`, parent runs left
behind, a cell run killed before it said what it trains, what a command leaves in the folder,
and the lines (and warnings) a user sees."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from ablate import names, tracking
from ablate.cli import cli
from ablate.ledger import Ledger, storage_url
from ablate.lifecycle import Stopped, exit_status, sigterm_as_interrupt
from ablate.liveness import pid_alive, process_space, process_start
from ablate.locks import store_lock
from ablate.runner import run_grid
from ablate.spec import load_spec
from conftest import ablate_cmd, run_ablate, wait_for, write_spec


def _runs(name: str, role: str):
    exp = MlflowClient().get_experiment_by_name(name)
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`ablate.role` = '{role}'",
                              output_format="list")


def _finished_by_key(name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for run in _runs(name, "cell"):
        if run.info.status == "FINISHED":
            out[run.data.tags[names.CELL_KEY]] = out.get(run.data.tags[names.CELL_KEY], 0) + 1
    return out


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


GRID4 = "grid:\n  model.shift: [none, four, eight, up]\n"


def _start_two_workers(workdir, name: str):
    spec = write_spec(workdir / f"{name}.yaml", name=name, epochs=3, extra=GRID4)
    proc = subprocess.Popen(ablate_cmd("run", str(spec), "--workers", "2"), cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpts = workdir / "checkpoints" / name
    assert wait_for(lambda: any(ckpts.glob("*/last.pt"))), "no checkpoint appeared"
    workers = [p for p in _children(proc.pid) if pid_alive(p)]
    assert len(workers) >= 2, workers  # two workers (and multiprocessing's resource tracker)
    return spec, proc, workers


def _assert_resumes_exactly_once(workdir, spec, name: str) -> str:
    cells = load_spec(spec).cells()
    assert Ledger(storage_url(), name).counts({c.key for c in cells})["COMPLETE"] < len(cells)
    again = run_ablate("run", str(spec), cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _finished_by_key(name) == {c.key: 1 for c in cells}
    return again.stdout


@pytest.mark.slow
def test_sigterm_stops_the_workers_kills_the_parent_run_and_a_rerun_resumes(workdir):
    spec, proc, workers = _start_two_workers(workdir, "termed")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    assert "SIGTERM" in err and "run the same command again to resume" in err and "Aborted" not in err
    assert "Traceback" not in err, err
    assert wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=10), "a worker outlived its parent"
    [parent] = _runs("termed", "parent")
    assert parent.info.status == "KILLED"
    assert parent.data.tags[names.PID] == str(proc.pid)
    rerun = _assert_resumes_exactly_once(workdir, spec, "termed")
    assert "to resume" in rerun, rerun


@pytest.mark.slow
def test_workers_die_with_a_sigkilled_parent_whose_run_the_next_invocation_closes(workdir):
    spec, proc, workers = _start_two_workers(workdir, "killed9")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=10), "a worker outlived its parent"
    [parent] = _runs("killed9", "parent")
    assert parent.info.status == "RUNNING"  # nobody was left to close it
    rerun = _assert_resumes_exactly_once(workdir, spec, "killed9")
    assert "marked 1 parent run(s) KILLED" in rerun
    statuses = {r.info.run_id: r.info.status for r in _runs("killed9", "parent")}
    assert statuses[parent.info.run_id] == "KILLED" and sorted(statuses.values()) == ["FINISHED", "KILLED"]


#: put before the command's own modules (PYTHONPATH), in each of its processes: every ORM object a
#: store read made takes 2 ms to let go of (SQLAlchemy's weakref finalizer), as on a large ledger,
#: so that a stop signal lands in the middle of store reads and of their clean-up
SLOW_READS = """\
import time
from sqlalchemy.orm import state

_cleanup = state.InstanceState._cleanup


def _slow_cleanup(self, ref):
    time.sleep(0.002)
    _cleanup(self, ref)


state.InstanceState._cleanup = _slow_cleanup
"""
STOPPED = ("stopped (SIGTERM): unfinished cells stay in the ledger; run the same command again to resume them "
           "from their last checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_during_store_reads_says_one_line_and_exits_143(workdir, workers):
    """A stop signal that lands inside a store read (or the clean-up after one) is taken once the read is
    over: exit 143 and the one line, never a traceback, an "Exception ignored", a closed-database error
    logged by SQLAlchemy, nor a signal lost so that the run goes on."""
    site = workdir / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_READS)
    # three epochs a cell: the run must still be going when the stop comes 1.2 s after its header
    spec = write_spec(workdir / "reads.yaml", name="reads", epochs=3,
                      extra="grid:\n  model.shift: [none, four, up, down, left, right]\nseeds: [0, 1, 2, 3]\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    for delay in (0.0, 0.4, 1.2):
        proc = subprocess.Popen(ablate_cmd("run", str(spec), "--workers", workers), cwd=workdir, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            header = proc.stdout.readline()  # the ledger has been read, and is read from now on
            assert header.startswith("reads: 24 cells"), header + proc.stderr.read()
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 143, f"after {delay} s: exit {proc.returncode}\n{out}{err}"
        assert err.strip() == STOPPED, f"after {delay} s:\n{err}"


@pytest.mark.parametrize("where", [("site-packages", "sqlalchemy", "engine", "fake.py"),
                                   ("lib", "python3", "multiprocessing", "popen_spawn_posix.py")],
                         ids=["a database statement", "a worker process being started"])
def test_sigterm_inside_a_database_library_is_taken_once_it_returns(where):
    # a function of "sqlalchemy" (by its file name, which is what is looked at) that is signalled
    # midway; or of the code that starts a spawned worker, whose child fails unpickling what a stop
    # halfway leaves it ("EOFError: Ran out of input")
    source = "import os, signal, time\ndef query(done):\n    os.kill(os.getpid(), signal.SIGTERM)\n" \
             "    time.sleep(0.3)\n    done.append('statement finished')\n"
    library = {}
    exec(compile(source, os.path.join(os.sep, *where), "exec"), library)
    done = []
    started = time.monotonic()
    with pytest.raises(Stopped):
        with sigterm_as_interrupt():
            library["query"](done)
            done.append("returned")
            time.sleep(5)  # the stop comes here, within a re-check
    assert done == ["statement finished", "returned"] and time.monotonic() - started < 2


def test_sigterm_inside_a_finalizer_is_not_lost(capsys):
    import weakref

    class Row:
        pass

    def let_go():  # e.g. SQLAlchemy's InstanceState._cleanup, a weakref callback
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)

    row = Row()
    weakref.finalize(row, let_go)
    started = time.monotonic()
    with pytest.raises(Stopped):
        with sigterm_as_interrupt():
            del row  # the callback runs now; Python would print the stop raised in it and forget it
            time.sleep(5)
    assert time.monotonic() - started < 2
    assert "Exception ignored" not in capsys.readouterr().err


def test_sigterm_is_a_keyboard_interrupt_with_its_exit_status():
    with pytest.raises(KeyboardInterrupt) as caught:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode
    assert isinstance(caught.value, Stopped) and exit_status(caught.value) == 143
    assert exit_status(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def _parent(experiment_id: str, tags: dict) -> str:
    run = MlflowClient().create_run(experiment_id, tags={names.ROLE: "parent", **tags})
    return run.info.run_id


def test_only_parent_runs_of_gone_local_processes_are_closed(workdir):
    eid = tracking.ensure_experiment("gone-parents")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = {names.HOST: socket.gethostname(), names.PROCESS_SPACE: process_space()}
    gone = {**here, names.PID: str(dead.pid)}
    me = {**here, names.PID: str(os.getpid()), names.PROCESS_START: process_start(os.getpid())}
    runs = {
        "dead": _parent(eid, {**gone, names.PROCESS_START: "1"}),
        "reused pid": _parent(eid, {**me, names.PROCESS_START: str(int(me[names.PROCESS_START]) + 1)}),
        "alive": _parent(eid, me),
        "slurm": _parent(eid, {**gone, names.LAUNCHER: "slurm"}),
        "other host": _parent(eid, {**gone, names.HOST: "elsewhere"}),
        "other container": _parent(eid, {**gone, names.PROCESS_SPACE: "x/pid:[1]"}),
        "no pid": _parent(eid, here),
    }
    finished = _parent(eid, gone)
    MlflowClient().set_terminated(finished, "FINISHED")
    closed = tracking.close_gone_parents(eid)
    assert sorted(closed) == sorted([runs["dead"], runs["reused pid"]])
    status = {what: MlflowClient().get_run(rid).info.status for what, rid in runs.items()}
    assert status == {"dead": "KILLED", "reused pid": "KILLED", "alive": "RUNNING", "slurm": "RUNNING",
                      "other host": "RUNNING", "other container": "RUNNING", "no pid": "RUNNING"}
    assert MlflowClient().get_run(finished).info.status == "FINISHED"


def test_a_cell_run_killed_before_its_params_are_logged_is_completed_on_resume(workdir, monkeypatch, capsys):
    spec = write_spec(workdir / "p.yaml", name="half-made", epochs=1)
    real = MlflowClient.create_run

    def create_then_die(self, experiment_id, *args, tags=None, **kwargs):
        run = real(self, experiment_id, *args, tags=tags, **kwargs)
        if (tags or {}).get(names.ROLE) == "cell":
            raise KeyboardInterrupt  # killed right after the run exists
        return run

    monkeypatch.setattr(MlflowClient, "create_run", create_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_grid(str(spec), progress=False)
    monkeypatch.setattr(MlflowClient, "create_run", real)
    [cell] = _runs("half-made", "cell")
    assert cell.info.status == "RUNNING" and names.INCOMPLETE in cell.data.tags and not cell.data.params
    [parent] = _runs("half-made", "parent")
    assert parent.info.status == "KILLED"
    # the worker is gone (here it lives on in the test process): hand its trial back, as a new process would
    Ledger(storage_url(), "half-made").release_gone(lambda t: True)

    capsys.readouterr()
    summary = run_grid(str(spec), progress=False)
    assert summary.ok
    assert "1 cells, 0 already finished, 1 to resume, 0 queued" in capsys.readouterr().out  # not "0 queued" alone
    [cell] = _runs("half-made", "cell")
    assert cell.info.status == "FINISHED" and names.INCOMPLETE not in cell.data.tags
    cfg = load_spec(spec).cells()[0].config
    assert cell.data.params["model.shift"] == "four" and cell.data.params["train.epochs"] == "1"
    assert len(cell.data.params) > 20
    config = mlflow.artifacts.load_text(f"runs:/{cell.info.run_id}/config.yaml")
    assert f"width: {cfg.model.width}" in config


def test_a_tiny_grid_leaves_only_its_stores_says_no_warning_and_a_rerun_adds_no_parent(workdir, capsys):
    spec = write_spec(workdir / "q.yaml", name="clean", epochs=1)
    spec.write_text(spec.read_text().replace("warmup_epochs: 0", "warmup_epochs: 1"))  # timm's 1-step cosine case
    env = {k: v for k, v in os.environ.items() if k != "ABLATE_CHECKPOINTS"}  # the default ./checkpoints
    result = subprocess.run([sys.executable, "-W", "default", "-m", "ablate", "run", "q.yaml"], cwd=workdir,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr
    assert "INFO" not in result.stderr and "no effect" not in result.stdout + result.stderr, result.stderr
    # mlruns/ holds the runs' artifacts (config.yaml); no lock file, no empty checkpoints/ folder
    assert sorted(p.name for p in workdir.iterdir()) == ["ablate-ledger.db", "mlflow.db", "mlruns", "q.yaml"]
    assert len(_runs("clean", "parent")) == 1

    capsys.readouterr()
    assert run_grid(str(spec), progress=False).ok
    assert "1 already finished, 0 queued" in capsys.readouterr().out
    assert len(_runs("clean", "parent")) == 1  # trained nothing: no parent run
    assert not list(workdir.glob("*.lock"))


def test_the_store_lock_leaves_no_file_and_still_excludes(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with store_lock(url):
        assert (tmp_path / "x.db.lock").exists()
    assert not (tmp_path / "x.db.lock").exists()
    # two processes in turn, each holding the lock across a read-modify-write of a counter
    counter = tmp_path / "n"
    counter.write_text("0")
    code = ("import sys; from ablate.locks import store_lock\n"
            "for _ in range(40):\n"
            "    with store_lock(sys.argv[1]):\n"
            "        n = int(open(sys.argv[2]).read()); open(sys.argv[2], 'w').write(str(n + 1))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(counter)]) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert counter.read_text() == "120"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n"]


def test_models_set_suggests_a_setting():
    result = CliRunner().invoke(cli, ["models", "--set", "model.widht=64"])
    assert result.exit_code == 2 and "did you mean model.width?" in result.output


def test_report_where_nothing_ran_creates_no_store_and_prints_no_mlflow_lines(workdir):
    result = run_ablate("report", "quickstart", cwd=workdir)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "INFO" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(workdir.iterdir()) == []


def test_finished_grid_parent_run_is_terminated_once(workdir, monkeypatch):
    spec = write_spec(workdir / "f.yaml", name="nan-once", epochs=1, extra="grid:\n  train.lr: [1.0e+30]\n")
    calls = []
    real = tracking.finish_run

    def counting(run_id, status="FINISHED"):
        calls.append((run_id, status))
        real(run_id, status)

    monkeypatch.setattr(tracking, "finish_run", counting)
    summary = run_grid(str(spec), progress=False)
    assert not summary.ok
    [parent] = _runs("nan-once", "parent")
    assert [c for c in calls if c[0] == parent.info.run_id] == [(parent.info.run_id, "FAILED")]
    assert parent.info.status == "FAILED"


@pytest.mark.parametrize("command", ["run", "search"])
def test_ctrl_c_says_a_rerun_resumes_and_exits_130(workdir, monkeypatch, command):
    import ablate.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate.runner, "run_grid" if command == "run" else "run_search", interrupted)
    result = CliRunner().invoke(cli, [command, "any.yaml"])
    assert result.exit_code == 130, result.output
    assert "stopped (SIGINT)" in result.output and "run the same command again to resume" in result.output
    assert "Aborted" not in result.output


def test_a_cell_run_killed_midway_through_its_params_is_completed_on_resume(workdir):
    from mlflow.entities import Param

    from ablate.config import flat_params
    spec = write_spec(workdir / "m.yaml", name="midway")
    [cell] = load_spec(spec).cells()
    eid = tracking.ensure_experiment("midway")
    created = MlflowClient().create_run(eid, tags={names.ROLE: "cell", names.CELL_KEY: cell.key,
                                                   names.INCOMPLETE: "x"})
    first = list(flat_params(cell.config).items())[:5]  # the first of the batches made it, then the kill
    MlflowClient().log_batch(created.info.run_id, params=[Param(k, tracking.param_text(v)) for k, v in first])
    run = tracking.CellRun.open(eid, "parent", cell.config, cell.key, varied=[], spec_file=str(spec), device="cpu")
    assert run.resumed and run.run_id == created.info.run_id
    got = MlflowClient().get_run(run.run_id)
    assert len(got.data.params) == len(flat_params(cell.config)) and names.INCOMPLETE not in got.data.tags
    assert "config.yaml" in [a.path for a in MlflowClient().list_artifacts(run.run_id)]
