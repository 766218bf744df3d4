"""The ledger on a real Optuna RDB storage: atomic claims, duplicate enqueues, dead workers."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ablate.errors import AblateError
from ablate.ledger import RETRY_HISTORY, Heartbeat, Ledger
from ablate.liveness import process_space
from ablate.names import CELL_KEY as KEY, DUPLICATE, WORKER, WORKER_SPACE


@dataclass
class FakeCell:
    key: str
    values: dict


def _cells(n):
    return [FakeCell(key=f"k{i:03d}", values={"i": i}) for i in range(n)]


def _claim_all(url, out):
    ledger = Ledger(url, "claims")
    got = []
    while (trial := ledger.claim()) is not None:
        got.append(trial.user_attrs[KEY])
        ledger.tell(trial, TrialState.COMPLETE, [1.0])
    out.put(got)


def test_enqueue_skips_finished_and_waiting(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    assert ledger.enqueue_cells(_cells(3)) == (3, 0)
    assert ledger.enqueue_cells(_cells(3)) == (0, 0)  # still waiting: not enqueued twice
    trial = ledger.claim()
    ledger.tell(trial, TrialState.COMPLETE, [50.0])
    ledger2 = Ledger(url, "s")
    assert ledger2.enqueue_cells(_cells(4)) == (1, 1)
    assert ledger2.counts({c.key for c in _cells(4)}) == {"COMPLETE": 1, "RUNNING": 0, "WAITING": 3, "FAIL": 0}


def test_failed_cell_is_enqueued_again(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(1))
    ledger.tell(ledger.claim(), TrialState.FAIL, reason="boom")
    assert ledger.enqueue_cells(_cells(1)) == (1, 0)
    assert ledger.claim().user_attrs[KEY] == "k000"


def test_three_processes_claim_each_trial_once(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    Ledger(url, "claims").enqueue_cells(_cells(40))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, out)) for _ in range(3)]
    for p in procs:
        p.start()
    claimed = [k for _ in procs for k in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(claimed) == sorted(c.key for c in _cells(40))


def test_duplicate_enqueue_is_trained_once(workdir):
    """Two runners that enqueue the same cell at once: only the first-numbered trial runs."""
    url = f"sqlite:///{workdir / 'l.db'}"
    a, b = Ledger(url, "s"), Ledger(url, "s")
    a.study.enqueue_trial({}, user_attrs={KEY: "same", "ablate.values": "{}"})
    b.study.enqueue_trial({}, user_attrs={KEY: "same", "ablate.values": "{}"})
    first = b.claim()
    assert first is not None and first.number == 0
    assert a.claim() is None  # the second copy is marked a duplicate, not handed out
    dup = [t for t in a.trials() if DUPLICATE in t.user_attrs]
    assert len(dup) == 1 and dup[0].state == TrialState.FAIL and dup[0].user_attrs[DUPLICATE] == 0


def test_dead_local_worker_is_recovered(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(1))
    trial = ledger.claim()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ledger.storage.get_trial(trial._trial_id).user_attrs[WORKER].rpartition(":")[0]
    ledger.storage.set_trial_user_attr(trial._trial_id, WORKER, f"{host}:{dead.pid}")
    assert ledger.recover_dead() == [trial.number]
    again = ledger.claim()
    assert again.user_attrs[KEY] == "k000" and again.number != trial.number
    # a live worker (this process) is left alone
    assert ledger.recover_dead() == []


def test_stale_heartbeat_is_recovered(workdir, monkeypatch):
    monkeypatch.setenv("ABLATE_HEARTBEAT", "1,3")
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(1))
    trial = ledger.claim()
    # pretend the worker lives on another machine: only its heartbeat can tell it died
    ledger.storage.set_trial_user_attr(trial._trial_id, WORKER, f"elsewhere:{os.getpid()}")
    import time
    time.sleep(4.5)
    assert ledger.recover_dead() == [trial.number]
    assert ledger.claim().user_attrs[KEY] == "k000"


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_a_worker_claims_only_the_cells_of_its_own_spec(workdir):
    """Two specs that share a name share a study: each leaves the other's cells waiting."""
    url = f"sqlite:///{workdir / 'l.db'}"
    mine, theirs = _cells(3), [FakeCell(key=f"other{i}", values={"j": i}) for i in range(3)]
    Ledger(url, "shared").enqueue_cells(theirs)
    ledger = Ledger(url, "shared")
    ledger.enqueue_cells(mine)
    keys = {c.key for c in mine}
    claimed = []
    while (trial := ledger.claim(keys)) is not None:
        claimed.append(trial.user_attrs[KEY])
        ledger.tell(trial, TrialState.COMPLETE, [1.0])
    assert sorted(claimed) == sorted(keys)
    waiting = [t.user_attrs[KEY] for t in ledger.trials(states=(TrialState.WAITING,))]
    assert sorted(waiting) == sorted(c.key for c in theirs)  # untouched, for their owner
    assert ledger.counts({c.key for c in theirs}) == {"COMPLETE": 0, "RUNNING": 0, "WAITING": 3, "FAIL": 0}


def test_a_grid_and_a_search_cannot_share_a_study(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    Ledger(url, "same", kind="grid")
    Ledger(url, "same", kind="grid")  # the same kind opens it again
    with pytest.raises(AblateError, match="study 'same' is a grid's, this spec describes a search"):
        Ledger(url, "same", kind="search")


def test_a_worker_in_another_pid_space_is_recovered_by_heartbeat_only(workdir, monkeypatch):
    """Same host name, dead-looking pid, but another machine (or container): its pid means
    nothing here, so only a stale heartbeat may fail its trial."""
    monkeypatch.setenv("ABLATE_HEARTBEAT", "1,3")
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(1))
    trial = ledger.claim()
    trial.set_user_attr(WORKER, f"{socket.gethostname()}:{_dead_pid()}")
    trial.set_user_attr(WORKER_SPACE, "another-boot/pid:[4026531836]")
    assert ledger.recover_dead() == [] and ledger.stale() == set()
    assert [t.state for t in ledger.trials()] == [TrialState.RUNNING]
    time.sleep(4.5)  # past the grace period: the heartbeat says the worker is gone
    assert ledger.stale() == {trial.number}  # a reader sees it (storage._get_stale_trial_ids) ...
    assert [t.state for t in ledger.trials()] == [TrialState.RUNNING]  # ... and changes nothing
    assert ledger.recover_dead() == [trial.number]
    assert ledger.claim().user_attrs[KEY] == "k000"


def test_a_broken_heartbeat_is_said_once(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(1))
    trial = ledger.claim()
    with sqlite3.connect(workdir / "l.db") as db:  # a store whose schema lost a table: not transient
        db.execute("DROP TABLE trial_heartbeats")
    said = []
    beat = Heartbeat(lambda: ledger._record_heartbeat(trial), trial.number, grace=120, log=said.append)
    for _ in range(3):
        beat()
    assert len(said) == 1 and "trial_heartbeats" in said[0] and f"trial {trial.number}" in said[0], said


def test_a_busy_store_is_said_only_when_it_outlasts_the_grace_period(workdir):
    path = workdir / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")

    def record():  # a real "database is locked" from SQLite
        sqlite3.connect(path, timeout=0).execute("SELECT * FROM t").fetchall()

    said = []
    patient = Heartbeat(record, 7, grace=3600, log=said.append)
    patient()
    patient()
    assert said == []
    impatient = Heartbeat(record, 7, grace=0, log=said.append)
    for _ in range(3):
        impatient()
        time.sleep(0.01)
    assert len(said) == 1 and "locked" in said[0]
    holder.execute("ROLLBACK")


def test_optunas_private_parts_the_ledger_uses_work_in_this_version(workdir):
    """Every private use listed in ablate/ledger.py's docstring, against the installed Optuna."""
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(2))
    [first, second] = ledger.trials(states=(TrialState.WAITING,))
    # FrozenTrial._trial_id names the trial in storage calls
    assert ledger.storage.get_trial(first._trial_id).number == first.number
    # set_trial_state_values(id, RUNNING) succeeds once: the atomic claim
    assert ledger.storage.set_trial_state_values(second._trial_id, TrialState.RUNNING) is True
    assert ledger.storage.set_trial_state_values(second._trial_id, TrialState.RUNNING) is False
    # optuna.Trial(study, id): what claim returns, a usable Trial
    trial = ledger.claim()
    assert isinstance(trial, optuna.Trial) and trial.number == first.number and trial._trial_id == first._trial_id
    assert ledger.storage.get_trial(trial._trial_id).state == TrialState.RUNNING
    # storage.record_heartbeat(id) writes the record that fail_stale_trials reads
    ledger._record_heartbeat(trial)
    with sqlite3.connect(workdir / "l.db") as db:
        rows = db.execute("SELECT trial_id FROM trial_heartbeats").fetchall()
    assert (trial._trial_id,) in rows
    assert trial.user_attrs[WORKER].endswith(f":{os.getpid()}") and trial.user_attrs[WORKER_SPACE] == process_space()
    # the retry callback keeps the trials a retry stands for in the system attribute RETRY_HISTORY
    failed = ledger.study.tell(trial, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(ledger.study, failed)
    retry = ledger.trials(states=(TrialState.WAITING,))[-1]
    assert retry.system_attrs[RETRY_HISTORY] == RetryHeartbeatStaleTrialCallback.retry_history(retry) == [trial.number]
    # the tables' definitions (optuna.storages._rdb.models) that ablate.trial_table reads and writes
    assert ledger.search_counts() == (0, 1, 1)  # the failed trial is stood for by its retry


def test_a_worker_killed_as_it_claims_leaves_a_cell_that_is_taken_back(tmp_path):
    """A kill right after the claim's state change (scancel, preemption and kill -9 come at any
    moment) leaves a running trial that names its dead worker: it is recovered, not stuck."""
    import subprocess
    import sys
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url, "killed-claim")
    ledger.enqueue_cells([type("Cell", (), {"key": "k1", "values": {}})()])
    code = f"""
import os
from ablate.ledger import Ledger
ledger = Ledger({url!r}, "killed-claim")
flip = ledger.storage.set_trial_state_values
def flip_then_die(*args, **kwargs):
    flip(*args, **kwargs)
    os._exit(9)  # killed the moment the trial became RUNNING
ledger.storage.set_trial_state_values = flip_then_die
ledger.claim()
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    [orphan] = ledger.trials()
    assert orphan.state == TrialState.RUNNING and "ablate.worker" in orphan.user_attrs
    assert ledger.recover_dead() == [orphan.number]
    assert ledger.claim().user_attrs["ablate.cell_key"] == "k1"
