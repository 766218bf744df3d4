"""Fencing: a worker that was paused past the heartbeat's grace period has lost its trial, and
must write nothing more for it (no epoch in the MLflow run, no checkpoint, no final record).

The end-to-end test pauses a real worker process with SIGSTOP while a second worker takes its
cell over, then lets it go on with SIGCONT. Its stores are PostgreSQL databases of their own
(tests/test_postgres.py's fixture): a process paused inside a SQLite transaction would lock the
whole file, which no worker on a shared database server meets.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from optuna.trial import TrialState

from conftest import ablate_cmd, wait_for, write_spec
from test_postgres import pg_databases  # noqa: F401 - a fixture


def _cell(url: str, name: str = "s"):
    from dataclasses import dataclass

    from ablate.ledger import Ledger

    @dataclass
    class Cell:
        key: str
        values: dict

    ledger = Ledger(url, name)
    ledger.enqueue_cells([Cell("k1", {"i": 1})])
    return ledger


def test_check_owner_passes_for_the_owner_and_refuses_once_the_trial_went_stale(workdir, monkeypatch):
    from ablate.ledger import Ledger, TakenOver
    monkeypatch.setenv("ABLATE_HEARTBEAT", "1,3")
    ledger = _cell(f"sqlite:///{workdir / 'l.db'}")
    trial = ledger.claim()
    ledger.check_owner(trial)  # claimed just now: ours
    # another worker's recovery fails the trial as stale and queues the cell again
    ledger.storage.set_trial_user_attr(trial._trial_id, "ablate.worker", "elsewhere:1")
    time.sleep(4.5)
    other = Ledger(f"sqlite:///{workdir / 'l.db'}", "s")
    assert other.recover_dead() == [trial.number]
    with pytest.raises(TakenOver, match=rf"trial {trial.number} is no longer this worker.s: its heartbeat got older"):
        ledger.check_owner(trial)
    retry = other.claim()
    assert retry is not None and retry.number != trial.number
    other.check_owner(retry)  # the retry is its claimer's


def test_the_heartbeat_notices_a_lost_trial_and_stops_beating(workdir, monkeypatch):
    from ablate.ledger import TakenOver
    monkeypatch.setenv("ABLATE_HEARTBEAT", "1,3")
    ledger = _cell(f"sqlite:///{workdir / 'l.db'}")
    trial = ledger.claim()
    with ledger.heartbeat(trial):
        ledger.study.tell(trial.number, state=TrialState.FAIL)  # what a stale-trial recovery does
        assert wait_for(lambda: trial.number in ledger._taken, timeout=10)
        with pytest.raises(TakenOver):
            ledger.check_owner(trial)


@pytest.mark.slow
def test_a_worker_paused_past_the_grace_leaves_its_cell_to_the_worker_that_took_it_over(workdir, pg_databases,
                                                                                          monkeypatch):
    """kill -STOP a worker mid-cell until a second worker has taken the cell over and trained an
    epoch of it, then kill -CONT: the paused worker stops at its next write with one line, and
    the cell ends with one FINISHED MLflow run that holds each epoch once."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from ablate.ledger import Ledger
    from ablate.spec import load_spec

    ledger_url, mlflow_url = pg_databases
    monkeypatch.setenv("ABLATE_STORAGE", ledger_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    epochs = 8
    spec = write_spec(workdir / "fence.yaml", name="fence", epochs=epochs)
    [cell] = load_spec(spec).cells()
    env = {**os.environ, "ABLATE_HEARTBEAT": "1,3", "PYTHONUNBUFFERED": "1"}
    ckpt = workdir / "checkpoints" / "fence" / cell.key / "last.pt"

    def start():
        return subprocess.Popen(ablate_cmd("run", str(spec)), cwd=workdir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    paused = start()
    other = None
    try:
        # paused right after a checkpoint: mid-way through the next epoch's training
        assert wait_for(ckpt.exists, timeout=240, every=0.02), "the first worker wrote no checkpoint"
        paused.send_signal(signal.SIGSTOP)
        other = start()  # its start finds the paused worker's heartbeat stale and takes the cell over

        def taken_over_and_trained():
            trials = Ledger(ledger_url, "fence", create=False).trials()
            mine = [t for t in trials if t.state == TrialState.RUNNING
                    and t.user_attrs.get("ablate.worker", "").endswith(f":{other.pid}")]
            return bool(mine) and os.path.getmtime(ckpt) > taken_at
        taken_at = os.path.getmtime(ckpt)
        assert wait_for(taken_over_and_trained, timeout=240, every=0.2), "the second worker did not take over"
    finally:
        paused.send_signal(signal.SIGCONT)
    out_paused = paused.communicate(timeout=300)[0]
    out_other = other.communicate(timeout=300)[0]
    assert (paused.returncode, other.returncode) == (0, 0), f"{out_paused}\n----\n{out_other}"

    said = [line for line in out_paused.splitlines() if "left to another worker" in line]
    assert len(said) == 1 and f"cell {cell.key}: left to another worker" in said[0], out_paused
    assert "FAIL" not in out_paused.replace("0 failed", "") and "Traceback" not in out_paused, out_paused
    assert "resuming from" in out_other, out_other

    exp = MlflowClient().get_experiment_by_name("fence")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'", output_format="list")
    assert [(r.data.tags["ablate.cell_key"], r.info.status) for r in runs] == [(cell.key, "FINISHED")]
    for metric in ("val_top1", "train_loss", "lr"):
        steps = sorted(m.step for m in MlflowClient().get_metric_history(runs[0].info.run_id, metric))
        assert steps == list(range(1, epochs + 1)), (metric, steps)
    ledger = Ledger(ledger_url, "fence", create=False)
    assert [t.user_attrs["ablate.cell_key"] for t in ledger.trials(states=(TrialState.COMPLETE,))] == [cell.key]
    assert not ckpt.exists()
