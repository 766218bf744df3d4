"""Cells no longer in the spec (orphans): a value dropped from the grid while its cell was interrupted.

Real stores, real tiny training: `ablate status` names the cell orphaned, `ablate report` neither
counts it as unfinished nor takes a baseline from it, `ablate run` says how to close it (or asks,
on a terminal) and `--close-orphans` closes it: its MLflow run KILLED, its ledger trial failed,
its checkpoint gone; the cells the spec has are each trained once.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ablate import names, tracking
from ablate.cli import cli
from ablate.config import flat_params
from ablate.ledger import Ledger, storage_url
from ablate.progress import CLOSED_REASON, CellState, survey
from ablate.report import write_report
from ablate.runner import run_grid
from ablate.spec import load_spec
from ablate.status import collect
from conftest import ablate_cmd, wait_for, write_spec

GRID = "grid:\n  model.shift: [{}]\n"


def _runs(name: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'")


def _ablate(*args: str, cwd) -> subprocess.CompletedProcess:
    """`ablate ARGS` without a terminal (stdin from /dev/null: it must never wait for an answer)."""
    return subprocess.run(ablate_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_a_cell_dropped_from_the_spec_while_interrupted_is_orphaned_then_closed(workdir):
    spec = write_spec(workdir / "g.yaml", name="orphans", epochs=4, extra=GRID.format("none, four, eight"))
    keys = {c.values["model.shift"]: c.key for c in load_spec(spec).cells()}
    ckpts = workdir / "checkpoints" / "orphans"
    proc = subprocess.Popen(ablate_cmd("run", str(spec)), cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # one worker, cells in the spec's order (equal cost): "none" has finished once "four" checkpoints
    assert wait_for(lambda: (ckpts / keys["four"] / "last.pt").exists(), every=0.1), "no checkpoint of four"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [four] = [r for r in _runs("orphans") if r.data.tags[names.CELL_KEY] == keys["four"]]
    assert four.info.status == "RUNNING"

    write_spec(spec, name="orphans", epochs=4, extra=GRID.format("none, eight"))  # four dropped

    status = _ablate("status", str(spec), cwd=workdir)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("orphans: grid of 2 cells: 1 finished, 0 running, 1 waiting; "
                               "1 orphaned (no longer in the spec); elapsed "), lines[0]
    section = lines.index(f"no longer in the spec: 1 orphaned (left unfinished, no worker of this spec trains it; "
                          f"`ablate run {spec} --close-orphans` closes it)")
    assert "four" not in "\n".join(lines[:section])  # never a row of the grid
    [row] = [line for line in lines if line.strip().startswith("orphaned ")]
    assert row.split()[:2] == ["orphaned", "four"] and "left interrupted: worker" in row and "is gone" in row
    as_json = json.loads(_ablate("status", str(spec), "--json", cwd=workdir).stdout)
    assert as_json["counts"]["orphaned"] == 1 and as_json["counts"]["interrupted"] == 0
    assert [o["values"] for o in as_json["orphans"]] == [{"model.shift": "four"}]

    report = _ablate("report", str(spec), cwd=workdir)
    assert report.returncode == 0, report.stdout + report.stderr
    md = (workdir / "reports" / "orphans" / "report.md").read_text()
    assert "- runs: 1 complete in 1 configuration\n" in md and "unfinished (not in the tables)" not in md
    assert "- no longer in the spec: 1 cell (1 unfinished: model.shift=four); listed apart below" in md
    assert "- baseline: the first configuration, model.shift=none" in md
    assert "Left unfinished (orphaned), not shown: model.shift=four." in md

    # without a terminal: one line says how, nothing waits, and the orphan is not trained
    run = _ablate("run", str(spec), cwd=workdir)
    assert run.returncode == 0, run.stdout + run.stderr
    [said] = [line for line in run.stdout.splitlines() if "no longer in the spec" in line and "--close-orphans" in line
              and line.startswith("1 cell")]
    assert said.startswith("1 cell no longer in the spec was left unfinished (orphaned: model.shift=four: "
                           "interrupted, queued again in the ledger") and said.endswith(
        "; no worker of this spec trains it; to close it (its MLflow run marked KILLED, its ledger trial failed, "
        f"its checkpoint removed): ablate run {spec} --close-orphans")
    assert f"cell {keys['four']}" not in run.stdout and run.stdout.count("training on") == 1
    assert "2/2 cells finished, 0 failed; 1 orphaned (no longer in the spec, left unfinished: " in run.stdout
    assert (ckpts / keys["four"] / "last.pt").exists()

    closing = _ablate("run", str(spec), "--close-orphans", cwd=workdir)
    assert closing.returncode == 0, closing.stdout + closing.stderr
    assert ("closed 1 cell no longer in the spec (model.shift=four): its MLflow run marked KILLED, its ledger "
            "trial failed, its checkpoint removed") in closing.stdout
    assert "2 already finished, 0 queued" in closing.stdout and "training on" not in closing.stdout
    [four] = [r for r in _runs("orphans") if r.data.tags[names.CELL_KEY] == keys["four"]]
    assert four.info.status == "KILLED" and four.data.tags[names.FAILURE] == CLOSED_REASON
    assert not (ckpts / keys["four"]).exists() and not ckpts.exists()  # and the spec's folder, now empty
    ledger = Ledger(storage_url(), "orphans")
    mine = [t for t in ledger.trials() if t.user_attrs.get(names.CELL_KEY) == keys["four"]]
    assert mine and all(t.state == TrialState.FAIL for t in mine)
    assert mine[-1].user_attrs[names.FAILURE] == CLOSED_REASON
    # what the spec has: each cell finished exactly once; the orphan never trained again
    finished = [r.data.tags[names.CELL_KEY] for r in _runs("orphans") if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted([keys["none"], keys["eight"]])
    again = _ablate("run", str(spec), cwd=workdir)
    assert again.returncode == 0 and "no longer in the spec" not in again.stdout and "training on" not in again.stdout
    after = collect(str(spec))
    assert after.counts["orphaned"] == 0 and after.done
    assert "no longer in the spec: 1 closed; their runs stay in MLflow" in after.to_text()


def _orphan_of(workdir, name: str, *, checkpoint: bool = True) -> tuple:
    """A grid of two cells whose second cell was left interrupted at epoch 1 by a worker that died,
    then dropped from the spec: built on the stores as a worker leaves them, without training."""
    spec = write_spec(workdir / "o.yaml", name=name, epochs=1, extra=GRID.format("none, four"))
    loaded = load_spec(spec)
    cells = {c.values["model.shift"]: c for c in loaded.cells()}
    ledger = Ledger.for_spec(loaded, storage_url())
    ledger.enqueue_cells([cells["four"]])
    experiment = tracking.ensure_experiment(loaded.name)
    parent = tracking.start_parent(experiment, "grid", str(spec))
    trial = ledger.claim()
    run = tracking.CellRun.open(experiment, parent, cells["four"].config, cells["four"].key, varied=loaded.varied,
                                spec_file=str(spec), device="cpu", trial_number=trial.number)
    run.log_metrics({"train_loss": 2.0}, step=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ledger.storage.set_trial_user_attr(trial._trial_id, names.WORKER, f"{socket.gethostname()}:{dead.pid}")
    folder = workdir / "checkpoints" / loaded.slug / cells["four"].key
    if checkpoint:
        folder.mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"weights")
    write_spec(spec, name=name, epochs=1, extra=GRID.format("none"))
    return spec, cells, run.run_id, folder


def test_a_terminal_is_asked_and_no_closes_nothing_yes_closes(workdir, capsys):
    spec, cells, run_id, folder = _orphan_of(workdir, "asked")
    asked = []
    outcome = run_grid(str(spec), device="cpu", progress=False, ask=lambda q: asked.append(q) or False)
    out = capsys.readouterr().out
    assert asked == ["close it now (its MLflow run marked KILLED, its ledger trial failed, its checkpoint removed)?"]
    assert "1 cell no longer in the spec was left unfinished (orphaned: model.shift=four: " in out
    assert f"to close it (its MLflow run marked KILLED, its ledger trial failed, its checkpoint removed): " \
           f"ablate run {spec} --close-orphans" in out
    assert outcome.ok and [c.key for c in outcome.progress.orphaned] == [cells["four"].key]
    assert MlflowClient().get_run(run_id).info.status == "RUNNING" and (folder / "last.pt").exists()

    outcome = run_grid(str(spec), device="cpu", progress=False, ask=lambda q: True)
    assert "closed 1 cell no longer in the spec (model.shift=four)" in capsys.readouterr().out
    assert MlflowClient().get_run(run_id).info.status == "KILLED" and not folder.exists()
    assert outcome.progress.orphaned == [] and outcome.progress.counts[CellState.ORPHANED] == 0
    [closed] = outcome.progress.orphans
    assert closed.closed and closed.state == CellState.FAILED and outcome.ok


def test_a_cell_another_spec_file_still_has_is_not_an_orphan(workdir):
    """Two spec files may share an experiment (the ledger's docs): a cell the other file still produces
    is that spec's, whichever file is asked about; once that file no longer has it, it is an orphan."""
    spec, cells, _, _ = _orphan_of(workdir, "shared-orphans", checkpoint=False)
    other = write_spec(workdir / "other.yaml", name="shared-orphans", epochs=1, extra=GRID.format("four"))
    experiment = tracking.ensure_experiment("shared-orphans")
    tracking.finish_run(tracking.start_parent(experiment, "grid", str(other)), "FINISHED")
    where = survey(load_spec(spec), Ledger(storage_url(), "shared-orphans", create=False))
    assert where.orphans == [] and "orphaned" not in collect(str(spec)).summary()
    write_spec(other, name="shared-orphans", epochs=1, extra=GRID.format("eight"))
    assert [c.key for c in collect(str(spec)).orphans] == [cells["four"].key]


# ---------------------------------------------------------------- the report, on runs as workers record them


def _finished(c: MlflowClient, exp: str, cell, top1: float, parent: str) -> None:
    run = c.create_run(exp, tags={names.ROLE: "cell", names.STATE: "COMPLETE", names.CELL_KEY: cell.key,
                                  names.PARENT_ID: parent, names.VARIED: json.dumps(["model.shift"])})
    params = {k: tracking.param_text(v) for k, v in flat_params(cell.config).items()}
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                metrics=[Metric("val_top1", top1, 0, 1), Metric("val_top5", 99.0, 0, 1), Metric("macs", 1e6, 0, 1)])
    c.set_terminated(run.info.run_id, "FINISHED")


def test_the_report_takes_its_rows_and_baseline_from_the_spec_as_it_is(workdir):
    """A finished value dropped from the grid was the first configuration run, so the report's
    baseline: now it is shown apart, and the baseline is the spec's first configuration."""
    spec = write_spec(workdir / "r.yaml", name="dropped", epochs=1, extra=GRID.format("four, none, up"))
    cells = {c.values["model.shift"]: c for c in load_spec(spec).cells()}
    c = MlflowClient()
    exp = c.create_experiment("dropped")
    parent = c.create_run(exp, tags={names.ROLE: "parent", names.KIND: "grid"}).info.run_id
    for shift, top1 in (("four", 90.0), ("none", 60.0), ("up", 70.0)):
        _finished(c, exp, cells[shift], top1, parent)
    write_spec(spec, name="dropped", epochs=1, extra=GRID.format("none, up"))  # four dropped
    report = write_report(str(spec), out=workdir / "out", log_artifacts=False)
    assert [r.values["model.shift"] for r in report.rows] == ["none", "up"]
    assert report.rows[0].is_baseline and report.rows[1].delta.mean == pytest.approx(10.0)
    assert [r.values for r in report.apart.rows] == [{"model.shift": "four"}]
    md = (workdir / "out" / "report.md").read_text()
    assert "- runs: 2 complete in 2 configurations\n" in md
    assert "- baseline: the first configuration, model.shift=none" in md
    assert "- no longer in the spec: 1 cell (1 finished); listed apart below" in md
    table = md.split("## No longer in the spec")[0]
    assert "| four |" not in table and "| up | 1 | 70.00 | +10.00 |" in table
    assert "| four | 1 | 90.00 | 99.00 | 0.001 |" in md.split("## No longer in the spec")[1]
    assert "four" not in (workdir / "out" / "report.csv").read_text()
    # by its experiment name there is no spec to hold the runs against: every run is a row
    assert [r.values["model.shift"] for r in write_report("dropped", out=workdir / "all",
                                                          log_artifacts=False).rows] == ["four", "none", "up"]


def test_close_orphans_is_refused_with_the_slurm_launcher(workdir):
    spec = write_spec(workdir / "s.yaml")
    result = CliRunner().invoke(cli, ["run", str(spec), "--close-orphans", "--launcher", "slurm"])
    assert result.exit_code == 2 and "--close-orphans: closes cells no longer in the spec before a local run" \
        in result.output
