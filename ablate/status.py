"""``ablate status``: where a grid or a search stands, from any machine that shares its stores.

Every cell's state (waiting / running with host, worker and epoch reached / interrupted /
finished with top-1 / failed with its reason), counts, elapsed time and an ETA, and for Slurm
launches each task's state as Slurm gives it (with Slurm's reason). It reads the ledger, the
MLflow store and Slurm and writes nothing: a store that does not exist is not created, no lock
is taken, no run is started. It imports neither torch nor timm.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from ablate import names
from ablate.launch.jobs import Launch, SlurmUnavailable, TaskState, job_of, launches, task_states
from ablate.locks import pid_alive, sqlite_path
from ablate.urls import database_url, display_url, storage_option

#: the order states are counted and listed in
STATES = ("finished", "running", "interrupted", "waiting", "new", "failed", "pruned")
FOLLOW_SECONDS = 3.0
ENDING_SECONDS = 60.0  # how long `follow` waits, once every cell is done, for the tasks to exit


@dataclass
class Row:
    """One cell of a grid, or one trial of a search."""
    key: str
    state: str                      # one of STATES
    values: dict[str, Any]
    trial: Optional[int] = None     # the ledger trial that stands for it now
    host: str = ""
    worker: str = ""                # "host:pid"
    slurm_task: str = ""            # "45_1"
    epoch: Optional[int] = None     # epochs completed (running, interrupted, waiting to resume)
    epochs: Optional[int] = None
    top1: Optional[float] = None
    reason: str = ""                # failed / pruned: why; interrupted: what happened
    images_per_second: Optional[float] = None  # running: its last epoch's training throughput
    mfu: Optional[float] = None     # ... and model FLOPs utilisation, where the device's peak is known


@dataclass
class Status:
    spec: str
    name: str
    kind: str                        # grid | search
    total: int                       # cells of the grid, or the search's target number of trials
    rows: list[Row]
    counts: dict[str, int]
    elapsed: Optional[float]         # seconds since the first launch or trial
    eta: Optional[float]             # seconds, None when nothing runs or nothing is known yet
    ledger: str
    mlflow: str
    launched: bool                   # whether the ledger holds this spec at all
    launches: list[Launch] = field(default_factory=list)
    tasks: list[TaskState] = field(default_factory=list)
    slurm_error: str = ""

    @property
    def done(self) -> bool:
        """Nothing left to train: every cell (or the target number of trials) finished, failed or pruned."""
        return not any(self.counts[s] for s in ("running", "interrupted", "waiting", "new"))

    def to_dict(self) -> dict:
        return asdict(self) | {"done": self.done}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary(self) -> str:
        what = "cells" if self.kind == "grid" else "trials"
        parts = [f"{self.counts[s]} {s}" for s in STATES if self.counts[s] or s in ("finished", "running")]
        line = f"{self.name}: {self.kind} of {self.total} {what}: {', '.join(parts)}"
        if self.elapsed is not None:
            line += f"; elapsed {_duration(self.elapsed)}"
        if not self.done:
            line += f"; ETA {_duration(self.eta) if self.eta is not None else 'unknown'}"
        return line

    def to_text(self) -> str:
        lines = [self.summary(), f"ledger {self.ledger}; MLflow {self.mlflow}"]
        if not self.launched:
            lines.append("nothing launched yet: no ledger for this spec")
        varied = list(self.rows[0].values) if self.rows else []
        header = ["state", *[k.split(".")[-1] for k in varied], "epoch", "top-1", "where / why"]
        table = [header]
        for r in self.rows:
            table.append([r.state, *[_short(r.values.get(k)) for k in varied], _epoch_text(r),
                          f"{r.top1:.2f}" if r.top1 is not None else "", _where_or_why(r)])
        if self.rows:
            widths = [max(len(row[i]) for row in table) for i in range(len(header))]
            lines.append("")
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        if self.kind == "search" and self.counts["new"]:
            lines.append(f"  ... and {self.counts['new']} trial(s) not sampled yet")
        for launch in self.launches:
            lines += ["", f"Slurm job {launch.job} ({launch.kind}, {launch.tasks} task(s), submitted "
                          f"{_when(launch.submitted)}; logs {launch.logs})"]
            mine = [t for t in self.tasks if job_of(t.job) == launch.job]
            for t in mine:
                why = t.reason + (f" (exit {t.exit_code})" if t.state == "FAILED" and t.exit_code else "")
                lines.append("  " + "  ".join(x for x in (t.job.ljust(10), t.state.ljust(11), t.nodes, why) if x).rstrip())
            if not mine and not self.slurm_error:
                lines.append("  no task known to Slurm any more")
        if self.slurm_error:
            lines.append(f"Slurm: {self.slurm_error}")
        return "\n".join(lines)


def collect(spec_path: str, storage: Optional[str] = None, *, spec_args=None) -> Status:
    """Read where ``spec_path`` (with ``spec_args``: --set, --name) stands. Writes nothing anywhere."""
    from ablate.ledger import NoLedger, storage_url
    from ablate.runner import _open_ledger
    from ablate.spec.builder import SpecArgs

    spec = (spec_args or SpecArgs()).load(spec_path, check_paths=False)  # the data may live on the cluster only
    url = storage_url(storage)
    try:
        ledger = _open_ledger(spec, url, create=False)
        trials, records, launched = ledger.trials(), launches(ledger.study), True
    except NoLedger:
        trials, records, launched = [], [], False
    tracking, runs = _cell_runs(spec.name)
    tasks, slurm_error = [], ""
    if records:
        try:
            tasks = task_states([r.job for r in records])
        except SlurmUnavailable as e:
            slurm_error = str(e)
    alive = _liveness(tasks, {r.job for r in records} if not slurm_error else set())
    if spec.search is None:
        rows = _grid_rows(spec, trials, runs, alive)
        total = len(rows)
    else:
        total = next((r.trials for r in reversed(records) if r.trials), None) or spec.search.trials
        rows = _search_rows(spec, trials, runs, alive)
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    if spec.search is not None:
        started = counts["finished"] + counts["running"] + counts["interrupted"] + counts["waiting"] + counts["pruned"]
        counts["new"] = max(0, total - started - counts["failed"])
    status = Status(spec=str(spec_path), name=spec.name, kind=spec.kind, total=total, rows=rows, counts=counts,
                    elapsed=None, eta=None, ledger=display_url(url), mlflow=display_url(tracking), launched=launched,
                    launches=records, tasks=tasks, slurm_error=slurm_error)
    status.elapsed = _elapsed(trials, records, status.done)
    status.eta = _eta(status, trials, tasks)
    return status


# ---- reading the stores ------------------------------------------------------------------------------

@dataclass
class _Run:
    """What status needs of one MLflow cell run."""
    status: str                      # RUNNING, FINISHED, FAILED, KILLED
    trial: str                       # its ablate.trial_number tag
    top1: Optional[float]
    epochs: Optional[int]            # train.epochs
    reached: int = 0                 # epochs logged so far
    images_per_second: Optional[float] = None  # the latest logged
    mfu: Optional[float] = None


def _cell_runs(name: str) -> tuple[str, dict[str, list[_Run]]]:
    """(tracking URI, the experiment's cell runs by cell key, oldest first); nothing when the store
    or the experiment does not exist (opening a SQLite store that is not there would create it)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from ablate.stores import check_tracking_store
    uri = mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not os.path.exists(path):
        return uri, {}
    if path is None and not uri.startswith(("http://", "https://")) and not database_url(uri):
        check_tracking_store(uri, create=False)  # a file store, a plugin's scheme: one line where MLflow refuses it
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return uri, {}
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{names.ROLE}` = 'cell'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    by_key: dict[str, list[_Run]] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        epochs = run.data.params.get("train.epochs")
        item = _Run(run.info.status, run.data.tags.get(names.TRIAL_NUMBER, ""), run.data.metrics.get("val_top1"),
                    int(epochs) if epochs and epochs.isdigit() else None,
                    images_per_second=run.data.metrics.get("images_per_second"), mfu=run.data.metrics.get("mfu"))
        if run.info.status == "RUNNING":  # training, or interrupted: how far it got
            history = client.get_metric_history(run.info.run_id, "train_loss")
            item.reached = max((m.step for m in history), default=0)
        by_key.setdefault(run.data.tags.get(names.CELL_KEY, ""), []).append(item)
    return uri, by_key


def _liveness(tasks: list[TaskState], jobs: set[str]) -> Callable[[Any], Optional[str]]:
    """A function: RUNNING trial -> why its worker is gone, or None while it may still be running.

    ``jobs``: the launches' Slurm jobs whose tasks Slurm has just been asked about (a worker in
    some other Slurm job, e.g. ``ablate run`` inside ``salloc``, is judged by its pid only)."""
    active = {t.job for t in tasks if t.state in ("RUNNING", "COMPLETING", "CONFIGURING")}
    ended = {t.job: t for t in tasks if not t.active}
    host = socket.gethostname()

    def gone(trial) -> Optional[str]:
        task = trial.user_attrs.get(names.SLURM_TASK) or ""
        if task and job_of(task) in jobs and task not in active:
            t = ended.get(task)
            return f"Slurm task {task} {t.state.lower() if t else 'is no longer running'}; resumes from its checkpoint"
        w_host, _, pid = str(trial.user_attrs.get(names.WORKER, "")).rpartition(":")
        if w_host == host and pid.isdigit() and not pid_alive(int(pid)):
            return f"worker {w_host}:{pid} is gone; resumes from its checkpoint"
        return None
    return gone


def _grid_rows(spec, trials, runs: dict[str, list], gone) -> list[Row]:
    from optuna.trial import TrialState
    by_key: dict[str, list] = {}
    for t in trials:
        key = t.user_attrs.get(names.CELL_KEY)
        if key and names.DUPLICATE not in t.user_attrs:
            by_key.setdefault(key, []).append(t)
    rows = []
    for cell in spec.cells():
        mine = sorted(by_key.get(cell.key, []), key=lambda t: t.number)
        by_state = {s: [t for t in mine if t.state == s] for s in TrialState}
        row = Row(key=cell.key, state="new", values=dict(cell.values), epochs=cell.config.train.epochs)
        cell_runs = runs.get(cell.key, [])
        if by_state[TrialState.COMPLETE]:
            _finished(row, by_state[TrialState.COMPLETE][-1], cell_runs)
        elif by_state[TrialState.RUNNING]:
            _running(row, by_state[TrialState.RUNNING][-1], cell_runs, gone)
        elif by_state[TrialState.WAITING]:
            row.state, row.trial = "waiting", by_state[TrialState.WAITING][0].number
            row.epoch = _epoch_reached(cell_runs)
        elif mine:
            _ended(row, mine[-1])
        rows.append(row)
    return rows


def _search_rows(spec, trials, runs: dict[str, list], gone) -> list[Row]:
    from optuna.trial import TrialState
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        if names.DUPLICATE in t.user_attrs or t.number in retried:
            continue
        key = t.user_attrs.get(names.CELL_KEY, "")
        row = Row(key=key, state="new", values={k: t.params[k] for k in spec.search.space if k in t.params},
                  trial=t.number, epochs=spec.base.train.epochs)
        own = [r for r in runs.get(key, []) if r.trial == str(t.number)] or runs.get(key, [])
        if own and own[-1].epochs:
            row.epochs = own[-1].epochs
        if t.state == TrialState.COMPLETE:
            _finished(row, t, own)
        elif t.state == TrialState.RUNNING:
            _running(row, t, own, gone)
        elif t.state == TrialState.WAITING:
            row.state, row.epoch = "waiting", _epoch_reached(own)
        else:
            _ended(row, t)
        rows.append(row)
    return rows


def _finished(row: Row, trial, runs: list) -> None:
    row.state, row.trial, row.epoch = "finished", trial.number, row.epochs
    row.worker = str(trial.user_attrs.get(names.WORKER, ""))  # who finished it
    row.host = row.worker.rpartition(":")[0]
    row.slurm_task = str(trial.user_attrs.get(names.SLURM_TASK) or "")
    done = [r for r in runs if r.status == "FINISHED" and r.top1 is not None]
    if done:
        row.top1 = done[-1].top1


def _running(row: Row, trial, runs: list, gone) -> None:
    row.trial = trial.number
    row.worker = str(trial.user_attrs.get(names.WORKER, ""))
    row.host = row.worker.rpartition(":")[0]
    row.slurm_task = str(trial.user_attrs.get(names.SLURM_TASK) or "")
    row.epoch = _epoch_reached(runs)
    if runs:
        row.images_per_second, row.mfu = runs[-1].images_per_second, runs[-1].mfu
    why = gone(trial)
    row.state, row.reason = ("interrupted", why) if why else ("running", "")


def _ended(row: Row, trial) -> None:
    from optuna.trial import TrialState
    row.trial = trial.number
    row.state = "pruned" if trial.state == TrialState.PRUNED else "failed"
    row.reason = str(trial.user_attrs.get(names.FAILURE, ""))


def _epoch_reached(runs: list[_Run]) -> Optional[int]:
    running = [r for r in runs if r.status == "RUNNING"]
    return running[-1].reached if running else None


# ---- time --------------------------------------------------------------------------------------------

def _elapsed(trials, records: list[Launch], done: bool) -> Optional[float]:
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start] + [r.submitted for r in records]
    if not starts:
        return None
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    end = max(ends) if done and ends else time.time()
    return max(0.0, end - min(starts))


def _eta(status: Status, trials, tasks: list[TaskState]) -> Optional[float]:
    """Work left over the workers running now, at the pace of the cells finished so far."""
    from optuna.trial import TrialState
    if status.done:
        return 0.0
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                 if t.state == TrialState.COMPLETE and t.datetime_start and t.datetime_complete
                 and names.REUSED_FROM not in t.user_attrs]
    now = time.time()
    if durations:
        per_cell = statistics.median(durations)
    else:  # nothing finished yet: the pace of the running cells
        paces = [(now - t.datetime_start.timestamp()) * r.epochs / r.epoch for r in status.rows
                 for t in trials if t.number == r.trial and r.state == "running" and r.epoch and r.epochs
                 and t.datetime_start]
        if not paces:
            return None
        per_cell = statistics.median(paces)
    left = status.counts["waiting"] + status.counts["new"] + sum(
        1 - (r.epoch or 0) / r.epochs if r.epochs else 1 for r in status.rows if r.state in ("running", "interrupted"))
    workers = max(status.counts["running"], sum(t.state == "RUNNING" for t in tasks))
    return left * per_cell / workers if workers else None


def _epoch_text(r: Row) -> str:
    """Epochs done of the cell's total: all of them once finished, none yet while it starts."""
    if not r.epochs:
        return ""
    if r.state == "finished":
        return f"{r.epochs}/{r.epochs}"
    if r.state in ("running", "interrupted"):
        return f"{r.epoch or 0}/{r.epochs}"
    return f"{r.epoch}/{r.epochs}" if r.epoch else ""  # waiting to resume, or not started


def _where_or_why(r: Row) -> str:
    if r.state in ("running", "interrupted"):
        where = [r.host, f"worker {r.worker}" if r.worker else "", f"slurm {r.slurm_task}" if r.slurm_task else ""]
        speed = "" if r.state != "running" or r.images_per_second is None else \
            f"{r.images_per_second:.0f} img/s" + (f", MFU {r.mfu:.0%}" if r.mfu is not None else "")
        return " ".join(x for x in [*where, r.reason] if x) + (f"; {speed}" if speed else "")
    if r.state == "waiting" and r.epoch:
        # the epoch reported last: its checkpoint may not have been written (a kill between the
        # two re-trains that epoch), so the cell resumes from the last checkpoint, not "after epoch N"
        return f"reached epoch {r.epoch}; resumes from its last checkpoint"
    return r.reason


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _when(epoch_seconds: float) -> str:
    fmt = "%H:%M:%S" if time.time() - epoch_seconds < 20 * 3600 else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(epoch_seconds))


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# ---- following a launch ------------------------------------------------------------------------------

def follow(spec_path: str, launch: Launch, *, storage: Optional[str] = None, echo: Callable[[str], None] = print,
           interval: float = FOLLOW_SECONDS, spec_args=None) -> Status:
    """Print progress whenever it changes, until nothing is left to train or the launch's jobs have
    all ended. Ctrl-C (KeyboardInterrupt) stops following; the jobs go on.

    Once every cell is done the tasks still close their runs and exit: following goes on (up to
    ``ENDING_SECONDS``) until they have, so the last table shows how the jobs ended."""
    said, done_at = None, None
    while True:
        status = collect(spec_path, storage, spec_args=spec_args)
        mine = [t for t in status.tasks if job_of(t.job) == launch.job]
        tasks = ", ".join(f"{t.job} {t.state}{f' ({t.reason})' if t.state == 'PENDING' and t.reason else ''}"
                          for t in mine)
        line = status.summary() + (f"; tasks: {tasks}" if tasks else "")
        if line.split("; elapsed")[0] + tasks != said:
            echo(f"{time.strftime('%H:%M:%S')} {line}")
            said = line.split("; elapsed")[0] + tasks
        if status.done:
            done_at = done_at or time.monotonic()
            if status.slurm_error or not any(t.active for t in mine) \
                    or time.monotonic() - done_at > ENDING_SECONDS:
                return status
        elif not status.slurm_error and mine and not any(t.active for t in mine):
            from ablate.spec.builder import SpecArgs
            see = (spec_args or SpecArgs()).command("status", spec_path, *storage_option(storage))
            echo(f"every task of Slurm job {launch.job} has ended with work left; see `{see}` and the logs in {launch.logs}")
            return status
        time.sleep(interval)
