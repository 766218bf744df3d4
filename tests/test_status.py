"""`ablate status` on real stores, without Slurm: every state a cell can be in, and nothing written."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from click.testing import CliRunner
from optuna.trial import TrialState

from ablate import tracking
from ablate.cli import cli
from ablate.ledger import Ledger, storage_url
from ablate.spec import load_spec
from ablate.status import collect
from conftest import write_spec


def _files(root):
    """Every file and folder under ``root``, with each file's time and content."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else None
            for p in root.rglob("*")}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_status_shows_every_state_and_writes_nothing(workdir):
    spec_path = write_spec(workdir / "g.yaml", name="st-grid", epochs=4,
                           extra="grid:\n  model.shift: [none, four, eight, up, down]\n")
    # never launched: said so, and no store is created by asking
    before = collect(str(spec_path))
    assert not before.launched and before.counts["new"] == 5 and before.elapsed is None
    assert "nothing launched yet" in before.to_text()
    assert sorted(p.name for p in workdir.iterdir()) == ["g.yaml"]

    spec = load_spec(spec_path)
    cells = {c.values["model.shift"]: c for c in spec.cells()}
    ledger = Ledger.for_spec(spec, storage_url())
    ledger.enqueue_cells([cells[s] for s in ("none", "four", "eight", "up", "down")])
    experiment = tracking.ensure_experiment(spec.name)
    parent = tracking.start_parent(experiment, "grid", str(spec_path))

    def claim_and_open(shift):
        trial = ledger.claim()
        assert trial.user_attrs[tracking.names.CELL_KEY] == cells[shift].key
        run = tracking.CellRun.open(experiment, parent, cells[shift].config, cells[shift].key, varied=spec.varied,
                                    spec_file=str(spec_path), device="cpu", trial_number=trial.number)
        return trial, run

    trial, run = claim_and_open("none")          # finished
    run.log_metrics({"train_loss": 1.0, "val_top1": 61.5}, step=4)
    run.close("COMPLETE")
    ledger.tell(trial, TrialState.COMPLETE, [61.5])
    trial, run = claim_and_open("four")          # running here, two epochs done
    run.log_metrics({"train_loss": 2.0}, step=1)
    run.log_metrics({"train_loss": 1.5, "images_per_second": 812.0, "mfu": 0.41}, step=2)
    trial, run = claim_and_open("eight")         # its worker died after one epoch
    run.log_metrics({"train_loss": 2.0}, step=1)
    ledger.storage.set_trial_user_attr(trial._trial_id, tracking.names.WORKER,
                                       f"{socket.gethostname()}:{_dead_pid()}")
    trial, run = claim_and_open("up")            # failed
    run.close("FAIL", "non-finite loss (nan) at epoch 1, step 3")
    ledger.tell(trial, TrialState.FAIL, reason="non-finite loss (nan) at epoch 1, step 3")
    # "down" stays waiting

    files = _files(workdir)
    status = collect(str(spec_path))
    assert _files(workdir) == files  # nothing written, no lock file left
    rows = {r.values["model.shift"]: r for r in status.rows}
    assert {s: r.state for s, r in rows.items()} == {"none": "finished", "four": "running", "eight": "interrupted",
                                                     "up": "failed", "down": "waiting"}
    assert rows["none"].top1 == 61.5 and rows["none"].epoch == 4
    assert rows["four"].epoch == 2 and rows["four"].epochs == 4
    assert rows["four"].worker == f"{socket.gethostname()}:{os.getpid()}" and rows["four"].host == socket.gethostname()
    assert rows["eight"].epoch == 1 and "is gone; resumes from its checkpoint" in rows["eight"].reason
    assert rows["up"].reason == "non-finite loss (nan) at epoch 1, step 3"
    assert status.counts == {"finished": 1, "running": 1, "interrupted": 1, "waiting": 1, "new": 0, "failed": 1,
                             "pruned": 0, "orphaned": 0}
    assert not status.done and status.elapsed >= 0 and status.eta is not None and status.eta > 0
    text = status.to_text()
    assert text.startswith("st-grid: grid of 5 cells: 1 finished, 1 running, 1 interrupted, 1 waiting, 1 failed; "
                           "elapsed ")
    assert "running      four   2/4" in text and "finished     none   4/4    61.50" in text
    assert f"worker {rows['four'].worker}; 812 img/s, MFU 41%" in text  # what a running cell achieves

    result = CliRunner().invoke(cli, ["status", str(spec_path), "--json"])
    assert result.exit_code == 0, result.output
    as_json = json.loads(result.stdout)
    assert as_json["counts"]["failed"] == 1 and as_json["done"] is False and as_json["launches"] == []
    assert _files(workdir) == files


def test_status_imports_neither_torch_nor_timm(workdir):
    """`ablate status` runs on login nodes and laptops: its imports stay light."""
    spec = write_spec(workdir / "s.yaml", name="st-light")
    code = f"""
import sys
from ablate.status import collect
from ablate.launch import cancel, jobs, placement, settings
print(collect({str(spec)!r}).summary())
print(sorted({{n.split(".")[0] for n in sys.modules}} & {{"torch", "timm", "torchvision", "submitit"}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["st-light: grid of 1 cells: 0 finished, 0 running, 1 new; ETA unknown", "[]"]


def test_a_worker_elsewhere_whose_heartbeat_stopped_reads_interrupted(workdir, monkeypatch):
    """Its pid means nothing here (another machine): the stale heartbeat alone tells, as it tells
    the ledger's recovery, and status says so without failing or requeueing anything."""
    monkeypatch.setenv("ABLATE_HEARTBEAT", "1,3")
    spec_path = write_spec(workdir / "h.yaml", name="st-stale")
    spec = load_spec(spec_path)
    ledger = Ledger.for_spec(spec, storage_url())
    ledger.enqueue_cells(spec.cells())
    trial = ledger.claim()
    trial.set_user_attr(tracking.names.WORKER, f"elsewhere:{_dead_pid()}")
    trial.set_user_attr(tracking.names.WORKER_SPACE, "another-boot/pid:[4026531836]")
    assert [r.state for r in collect(str(spec_path)).rows] == ["running"]
    time.sleep(4.5)  # past the 3 s grace
    [row] = collect(str(spec_path)).rows
    assert row.state == "interrupted" and row.reason.startswith("no heartbeat for over 3 s"), row
    assert [t.state for t in ledger.trials()] == [TrialState.RUNNING]


def _following(monkeypatch, answers, ending=60.0, **options):
    """`follow` against a scripted sequence of task states: each call of `collect` answers the next."""
    from ablate import status as status_mod
    from ablate.progress import CellState
    from ablate.launch.jobs import Launch, TaskState
    launch = Launch("7", "grid", 1, "/logs", "parent", 0.0)
    made = iter(answers)

    def collect(*_args, **_kwargs):
        done, states = next(made)
        counts = dict.fromkeys(map(str, CellState), 0) | {"finished" if done else "running": 1}
        return status_mod.Status("s.yaml", "s", "grid", 1, [], counts, None, None, "", "", True, [launch],
                                 [TaskState(f"7_{i}", s, "", "vm", "0:01") for i, s in enumerate(states)])
    monkeypatch.setattr(status_mod, "collect", collect)
    monkeypatch.setattr(status_mod, "ENDING_SECONDS", ending)
    said = []
    final = status_mod.follow("s.yaml", launch, echo=said.append, interval=0.0, **options)
    return final, said


def test_follow_waits_for_the_tasks_to_end_once_every_cell_is_done(monkeypatch):
    answers = [(False, ["RUNNING", "RUNNING"]), (True, ["COMPLETED", "RUNNING"]), (True, ["COMPLETED", "COMPLETING"]),
               (True, ["COMPLETED", "COMPLETED"])]
    final, said = _following(monkeypatch, answers)
    assert [t.state for t in final.tasks] == ["COMPLETED", "COMPLETED"]
    assert said[-1].endswith("tasks: 7_0 COMPLETED, 7_1 COMPLETED")


def test_follow_gives_up_waiting_for_a_task_that_does_not_end(monkeypatch):
    final, _ = _following(monkeypatch, [(True, ["RUNNING"])] * 3, ending=0.0)
    assert final.done and final.tasks[0].state == "RUNNING"


def test_slurm_states_drop_accounting_s_stale_placeholders_of_listed_arrays(monkeypatch):
    """sacct can still show an array as one PENDING job (``11``) or range (``11_[0-1]``) after
    squeue lists its tasks running; job 12, which squeue no longer lists, keeps sacct's word,
    less the stale reason a completed task waited for once (a requeue's BeginTime)."""
    from ablate.launch import jobs
    answers = {"sacct": "11|PENDING|None|None assigned|00:00:00|0:0\n11_[0-1]|PENDING|None|None assigned|00:00:00|0:0\n"
                        "12_0|COMPLETED|BeginTime|vm|00:00:09|0:0\n12_1|RUNNING|None|vm|00:00:09|0:0\n",
               "squeue": "11_0|RUNNING|None|vm|0:03\n11_1|RUNNING|None|vm|0:03\n"}
    monkeypatch.setattr(jobs, "run_slurm", lambda args, **_: subprocess.CompletedProcess(args, 0, answers[args[0]], ""))
    assert [(t.job, t.state, t.reason) for t in jobs.task_states(["11", "12"])] == [
        ("11_0", "RUNNING", ""), ("11_1", "RUNNING", ""), ("12_0", "COMPLETED", ""), ("12_1", "RUNNING", "")]


def test_follow_stops_when_every_task_ended_with_work_left_and_says_where_to_look(monkeypatch):
    from ablate.spec.builder import SpecArgs
    final, said = _following(monkeypatch, [(False, ["RUNNING"]), (False, ["FAILED"])],
                             storage="postgresql://u:secret@db/l", spec_args=SpecArgs(("train.epochs=1",)))
    assert not final.done
    assert said[-1] == ("every task of Slurm job 7 has ended with work left; see `ablate status s.yaml --storage "
                        "'postgresql://u:***@db/l' --set train.epochs=1` and the logs in /logs")


def test_status_and_report_on_empty_database_stores_say_so_and_create_no_table(workdir, pg_secret_stores):
    """Empty PostgreSQL databases: status said "cannot open" for the ledger and gave MLflow its
    tables; report created them too, then listed the "Default" experiment it had just made."""
    import sqlalchemy
    ledger_url, mlflow_url, password = pg_secret_stores
    spec_path = write_spec(workdir / "g.yaml", name="st-empty", epochs=1)
    env = {"MLFLOW_TRACKING_URI": mlflow_url}
    status = CliRunner().invoke(cli, ["status", str(spec_path), "--storage", ledger_url], env=env)
    assert status.exit_code == 0, status.output
    assert "nothing launched yet: no ledger for this spec" in status.output
    report = CliRunner().invoke(cli, ["report", str(spec_path)], env=env)
    assert report.exit_code == 2 and "error: no MLflow store at" in report.stderr, report.output
    assert password not in status.output + report.output
    for url in (ledger_url, mlflow_url):
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            assert sqlalchemy.inspect(engine).get_table_names() == [], url
        finally:
            engine.dispose()


def test_a_grid_past_fifty_cells_is_told_by_its_counts_and_all_prints_every_cell(workdir):
    spec_path = write_spec(workdir / "g.yaml", name="st-big", epochs=1,
                           extra="grid:\n  train.lr: [" + ", ".join(f"{i + 1}.0e-4" for i in range(60)) + "]\n")
    short = CliRunner().invoke(cli, ["status", str(spec_path)])
    assert short.exit_code == 0 and "grid of 60 cells: 0 finished, 0 running, 60 new" in short.output
    assert "(60 other cells not shown: the counts above; --all prints every one)" in short.output
    assert short.output.count("  new ") == 0
    every = CliRunner().invoke(cli, ["status", str(spec_path), "--all"])
    assert every.exit_code == 0 and every.output.count("  new ") == 60 and "not shown" not in every.output
    assert len(json.loads(CliRunner().invoke(cli, ["status", str(spec_path), "--json"]).output)["rows"]) == 60
