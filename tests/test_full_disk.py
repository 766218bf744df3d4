"""A full disk or a read-only file system under each store: the MLflow store and its artifact folder,
the ledger, the checkpoint folder, a report's folder, and all of them at once (the default layout,
everything in the working directory).

Each store lives on a real small file system (a tmpfs this test mounts; skipped where mounting is not
allowed) that the test fills while a real grid trains: the command ends in one line that names the
file and what was being written, with exit status 2 and no traceback; no cell is recorded as
finished that did not finish, and nothing is recorded as failed; once there is room again the same
command finishes every cell exactly once, with each metric logged once per step.
"""
from __future__ import annotations

import collections
import errno
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ablate.cli import cli
from ablate.ledger import Ledger
from ablate.runner import run_grid
from ablate.spec import load_spec
from conftest import ablate_cmd, run_ablate, tmpfs, write_spec

GRID = "grid:\n  model.shift: [none, four]\n"
EPOCHS = 3


class SmallDisk:
    """A tmpfs of a few MB that the test fills up (and frees again) when it chooses."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Write zeros until the file system refuses: not a byte is left for anyone."""
        with open(self.filler, "ab", buffering=0) as f:
            for block in (1 << 16, 1 << 12, 1 << 9, 1):
                try:
                    while f.write(b"\0" * block):
                        pass
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e

    def free(self) -> None:
        self.filler.unlink()

    def read_only(self, on: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.path)], check=True)


@pytest.fixture
def disk(tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as path:
        yield SmallDisk(path)


def _stores(workdir: Path, disk: SmallDisk, where: str) -> tuple[Path, dict[str, str]]:
    """(the folder to run in, the environment) with ``where``'s store on the small disk."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "ABLATE_STORAGE": f"sqlite:///{workdir / 'ablate-ledger.db'}",
           "ABLATE_CHECKPOINTS": str(workdir / "checkpoints")}
    if where == "mlflow":
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{disk.path / 'mlflow.db'}"
    elif where == "ledger":
        env["ABLATE_STORAGE"] = f"sqlite:///{disk.path / 'ablate-ledger.db'}"
    elif where == "checkpoints":
        env["ABLATE_CHECKPOINTS"] = str(disk.path / "checkpoints")
    elif where == "artifacts":  # MLflow keeps a SQLite store's artifacts in ./mlruns
        (workdir / "mlruns").symlink_to(disk.path)
    elif where == "default":  # every store in the working directory, where each is by default
        return disk.path, {}
    return workdir, env


def _environ(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "ABLATE_STORAGE", "ABLATE_CHECKPOINTS")}
    return {**base, "PYTHONUNBUFFERED": "1", **env}


def _run_and_fill(spec: Path, cwd: Path, env: dict[str, str], workers: int, disk: SmallDisk):
    """``ablate run`` whose disk fills up as its first epoch ends; returns (exit status, stdout, stderr)."""
    proc = subprocess.Popen(ablate_cmd("run", str(spec), "--workers", str(workers)), cwd=cwd, env=_environ(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if re.search(rf"epoch 1/{EPOCHS} ", line):
                disk.fill()
                break
        rest, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(out) + rest, err


def _cell_runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'")


def _steps_logged_once(uri: str, run) -> None:
    client = MlflowClient(uri)
    for metric in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        twice = sorted(s for s, n in collections.Counter(steps).items() if n > 1)
        assert not twice, f"{metric} logged twice at step(s) {twice} in {run.info.run_id}"


def _nothing_finished_that_did_not(uri: str, name: str) -> None:
    """Every FINISHED cell run trained every epoch; no cell run or trial recorded as failed."""
    for run in _cell_runs(uri, name):
        assert run.info.status in ("FINISHED", "RUNNING"), run.info.status
        if run.info.status == "FINISHED":
            steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "val_top1")]
            assert sorted(set(steps)) == list(range(1, EPOCHS + 1)) and run.data.tags["ablate.state"] == "COMPLETE"
        assert "ablate.failure" not in run.data.tags


def _finishes_every_cell_once(spec: Path, cwd: Path, env: dict[str, str], disk: SmallDisk) -> None:
    disk.free()
    again = subprocess.run(ablate_cmd("run", str(spec)), cwd=cwd, env=_environ(env), capture_output=True, text=True,
                           timeout=240)  # one worker will do
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    uri = env.get("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
    keys = sorted(c.key for c in load_spec(spec).cells())
    runs = _cell_runs(uri, "full")
    finished = sorted(r.data.tags["ablate.cell_key"] for r in runs if r.info.status == "FINISHED")
    assert finished == keys, ([(r.data.tags["ablate.cell_key"], r.info.status) for r in runs], again.stdout)
    for run in runs:
        _steps_logged_once(uri, run)
    _nothing_finished_that_did_not(uri, "full")
    ledger = Ledger(env.get("ABLATE_STORAGE", f"sqlite:///{cwd / 'ablate-ledger.db'}"), "full", create=False)
    assert ledger.counts(set(keys))["COMPLETE"] == len(keys)
    assert not any(t.state == TrialState.FAIL and t.user_attrs.get("ablate.failure") for t in ledger.trials())


#: (store on the small disk, workers, what the one line names)
CASES = [("mlflow", 1, r"mlflow\.db \(the MLflow store: "),
         ("mlflow", 2, r"mlflow\.db \(the MLflow store: "),
         ("ledger", 1, r"ablate-ledger\.db \(the ledger: "),
         ("ledger", 2, r"ablate-ledger\.db \(the ledger: "),
         ("artifacts", 1, r"/config\.yaml \(MLflow's artifact folder: config\.yaml of cell "),
         ("checkpoints", 1, r"/last\.pt \("),
         ("default", 2, r"(mlflow\.db|ablate-ledger\.db|/last\.pt|/config\.yaml) \(")]


@pytest.mark.parametrize("where,workers,names", CASES, ids=[f"{w}-{n}w" for w, n, _ in CASES])
def test_a_full_disk_ends_the_run_in_one_line_and_a_rerun_finishes_every_cell_once(workdir, disk, where, workers,
                                                                                      names):
    cwd, env = _stores(workdir, disk, where)
    spec = write_spec(cwd / "full.yaml", name="full", epochs=EPOCHS, extra=GRID)
    status, out, err = _run_and_fill(spec, cwd, env, workers, disk)
    said = out + err
    assert status == 2, said
    assert "Traceback" not in said and "Exception" not in said and "exited abnormally" not in said, said
    [error] = err.strip().splitlines()  # stderr: that line only
    assert error.startswith("error: "), err
    # the line that names the file: the error itself (one worker), or its worker's line above it
    full = [line for line in said.splitlines() if "no space left on device writing" in line]
    assert 1 <= len(full) <= 2 * workers, said  # a cell's line and the error, or one line per worker
    # the file, by the path it was given: MLflow's artifacts by their link, the default checkpoint folder relative
    shown = {"artifacts": re.escape(str(workdir / "mlruns")), "default": rf"({re.escape(str(disk.path))}|checkpoints)"
             }.get(where, re.escape(str(disk.path)))
    assert all(re.search(rf"writing {shown}/\S*{names}", line) and "free some space" in line for line in full), full
    if workers > 1:
        # the parent names the worker that stopped; with every store on the full disk, the parent's
        # own record of the end (a store its workers had not written to yet) may be the one refused
        assert re.match(r"error: ablate-worker-\d(, ablate-worker-\d)? (stopped on the error above|could not write a "
                        r"checkpoint)", error) or (where == "default" and error in full), error
    uri = env.get("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
    if where != "mlflow" and where != "default":  # MLflow can be read: nothing in it says finished or failed wrongly
        _nothing_finished_that_did_not(uri, "full")
    _finishes_every_cell_once(spec, cwd, env, disk)


def test_a_read_only_store_is_refused_before_anything_is_written(workdir, disk, monkeypatch):
    from test_hostile_input import refused
    spec = write_spec(workdir / "ro.yaml", name="ro")
    assert run_grid(str(spec), progress=False).ok  # the stores exist: move MLflow's onto the disk, read-only
    shutil.move(workdir / "mlflow.db", disk.path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{disk.path / 'mlflow.db'}")
    disk.read_only()
    spec.write_text(spec.read_text().replace("epochs: 2", "epochs: 3"))
    line = refused("run", str(spec))
    assert line == (f"MLflow store sqlite:///disk/mlflow.db: {disk.path / 'mlflow.db'} is read-only "
                    "(allowed: make it writable, or point to a store you may write to)"), line
    before = Ledger(os.environ["ABLATE_STORAGE"], "ro", create=False).counts()
    assert before == {"COMPLETE": 1}  # the new cell was not even queued
    disk.read_only(False)
    assert run_grid(str(spec), progress=False).ok


def test_a_read_only_artifact_folder_mid_run_ends_in_one_line(workdir, disk):
    (workdir / "mlruns").symlink_to(disk.path)
    spec = write_spec(workdir / "art.yaml", name="art", extra=GRID)
    disk.read_only()  # nothing holds a file there open: it can be made read-only while the stores are fine
    result = run_ablate("run", str(spec), cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    [error] = result.stderr.strip().splitlines()
    assert re.match(rf"error: cannot write {workdir}/mlruns/\S+: read-only file system \(MLflow's artifact folder: "
                    r"config\.yaml of cell \w+, run \w+\) \(make it writable, then run the same command again", error)
    keys = {c.key for c in load_spec(spec).cells()}
    ledger = Ledger(os.environ["ABLATE_STORAGE"], "art", create=False)
    assert ledger.counts(keys)["WAITING"] == 2  # the cell it stopped at was handed back to the queue
    disk.read_only(False)
    assert run_grid(str(spec), progress=False).ok
    assert ledger.counts(keys)["COMPLETE"] == 2


def test_a_report_onto_a_full_or_read_only_folder_says_so_in_one_line(workdir, disk):
    spec = write_spec(workdir / "rep.yaml", name="rep", epochs=1)
    assert run_grid(str(spec), progress=False).ok
    out = disk.path / "report"

    def report() -> str:
        result = CliRunner().invoke(cli, ["report", str(spec), "--out", str(out)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
        [line] = result.stderr.splitlines()
        return line

    disk.fill()
    line = report()
    assert line == (f"error: no space left on device writing {out} (the report: its tables and figures) (free some "
                    f"space, then run `ablate report {spec} --out {out}` again: the previous report, if any, is "
                    "unchanged)"), line
    assert sorted(p.name for p in disk.path.iterdir()) == ["filler"]  # no folder, no temporary file left
    disk.free()
    disk.read_only()
    assert report().startswith(f"error: cannot write {out}: read-only file system (the report: ")
    disk.read_only(False)
    result = CliRunner().invoke(cli, ["report", str(spec), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").exists()


def test_a_ledger_that_fills_under_a_heartbeat_stops_the_cell_at_its_next_write(workdir, disk, monkeypatch, capsys):
    """In a grid the ledger is written when a cell is claimed and told, and by its heartbeat between: a
    heartbeat that finds the ledger full is not said as a warning every beat; the worker's next write
    (an epoch's metrics, a checkpoint) stops it in the one line, rather than the cell's end."""
    from ablate.locks import StoreUnwritable
    monkeypatch.setenv("ABLATE_HEARTBEAT", "1,3")
    url = f"sqlite:///{disk.path / 'ablate-ledger.db'}"
    spec = load_spec(write_spec(workdir / "hb.yaml", name="hb"))
    ledger = Ledger.for_spec(spec, url)
    ledger.enqueue_cells(spec.cells())
    trial = ledger.claim()
    with ledger.heartbeat(trial):
        disk.fill()
        deadline = time.monotonic() + 10
        with pytest.raises(StoreUnwritable) as full:
            while time.monotonic() < deadline:
                ledger.check_owner(trial)
                time.sleep(0.1)
    assert str(full.value).startswith(f"no space left on device writing {disk.path / 'ablate-ledger.db'} (the ledger: "
                                      f"the heartbeat of trial {trial.number}) (free some space")
    assert capsys.readouterr().err == ""  # the heartbeat said nothing itself: the worker says it, once
