"""``ablate status``: where a grid or a search stands, from any machine that shares its stores.

Every cell's state (waiting / running with host, worker and epoch reached / interrupted /
finished with top-1 / failed with its reason), counts, elapsed time and an ETA, and for Slurm
launches each task's state as Slurm gives it (with Slurm's reason). Cells no longer in the spec
(:mod:`ablate.progress`: a value dropped from the grid, a setting changed) are never counted as
cells of the grid: a section of their own lists those left unfinished (orphaned, with the
command that closes them) and counts the rest. It reads the ledger, the MLflow store and Slurm
and writes nothing: a store that does not exist is not created, no lock
is taken, no run is started. It imports neither torch nor timm.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from optuna.trial import TrialState

from ablate import names, progress, text, tracking
from ablate.launch.jobs import Launch, SlurmUnavailable, TaskState, job_of, launches, task_states
from ablate.ledger import Ledger, NoLedger, storage_url
from ablate.progress import CellProgress, CellState
from ablate.spec.builder import SpecArgs
from ablate.urls import display_url, storage_option

FOLLOW_SECONDS = 3.0
ENDING_SECONDS = 60.0  # how long `follow` waits, once every cell is done, for the tasks to exit
TABLE_ROWS = 50  # cells printed one per row; past that, only those running, interrupted or failed (--all: every one)


@dataclass
class Status:
    spec: str
    name: str
    kind: str                        # grid | search
    total: int                       # cells of the grid, or the search's target number of trials
    rows: list[CellProgress]
    counts: dict[str, int]
    elapsed: Optional[float]         # seconds since the first launch or trial
    eta: Optional[float]             # seconds, None when nothing runs or nothing is known yet
    ledger: str
    mlflow: str
    launched: bool                   # whether the ledger holds this spec at all
    launches: list[Launch] = field(default_factory=list)
    tasks: list[TaskState] = field(default_factory=list)
    slurm_error: str = ""
    orphans: list[CellProgress] = field(default_factory=list)  # cells no longer in the spec (progress.survey)
    close_command: str = ""          # the command that closes the orphaned ones

    @property
    def done(self) -> bool:
        """Nothing left to train: every cell (or the target number of trials) finished, failed or pruned."""
        return not any(self.counts[s] for s in CellState if not s.settled)

    def to_dict(self) -> dict:
        return asdict(self) | {"done": self.done}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary(self) -> str:
        what = "cells" if self.kind == names.GRID else "trials"
        parts = [f"{self.counts[s]} {s}" for s in CellState if s != CellState.ORPHANED
                 and (self.counts[s] or s in (CellState.FINISHED, CellState.RUNNING))]
        line = f"{self.name}: {self.kind} of {self.total} {what}: {', '.join(parts)}"
        if self.counts.get(CellState.ORPHANED):
            line += f"; {self.counts[CellState.ORPHANED]} orphaned (no longer in the spec)"
        if self.elapsed is not None:
            line += f"; elapsed {text.duration(self.elapsed)}"
        if not self.done:
            line += f"; ETA {text.duration(self.eta) if self.eta is not None else 'unknown'}"
        return line

    def shown_rows(self, every_cell: bool = False) -> list[CellProgress]:
        """The rows a person reads: every cell up to :data:`TABLE_ROWS`, past that (unless
        ``every_cell``) only those running, interrupted or failed: a grid of 100,000 cells is
        told by its counts."""
        if every_cell or len(self.rows) <= TABLE_ROWS:
            return self.rows
        return [r for r in self.rows if r.state in (CellState.RUNNING, CellState.INTERRUPTED, CellState.FAILED)]

    def to_text(self, every_cell: bool = False) -> str:
        lines = [self.summary(), f"ledger {self.ledger}; MLflow {self.mlflow}"]
        if not self.launched:
            lines.append("nothing launched yet: no ledger for this spec")
        rows = self.shown_rows(every_cell)
        varied = list(self.rows[0].values) if self.rows else []
        header = ["state", *[k.split(".")[-1] for k in varied], "epoch", "top-1", "where / why"]
        body = [[str(r.state), *[text.value(r.values.get(k)) for k in varied], _epoch_text(r),
                 text.fixed(r.top1, ".2f"), _where_or_why(r)] for r in rows]
        if rows:
            lines.append("")
            lines += ["  " + line for line in text.aligned(header, body, left=len(header))]
        if len(rows) < len(self.rows):
            lines.append(f"  ({len(self.rows) - len(rows)} other {'cells' if self.kind == names.GRID else 'trials'} "
                         f"not shown: the counts above; --all prints every one)")
        if self.kind == names.SEARCH and self.counts[CellState.NEW]:
            lines.append(f"  ... and {self.counts['new']} trial(s) not sampled yet")
        if self.orphans:
            lines += ["", *self._orphans_text()]
        for launch in self.launches:
            lines += ["", f"Slurm job {launch.job} ({launch.kind}, {launch.tasks} task(s), submitted "
                          f"{text.clock(launch.submitted)}; logs {launch.logs})"]
            mine = [t for t in self.tasks if job_of(t.job) == launch.job]
            for t in mine:
                why = t.reason + (f" (exit {t.exit_code})" if t.state == "FAILED" and t.exit_code else "")
                cells = (t.job.ljust(10), t.state.ljust(11), t.nodes, why)
                lines.append("  " + "  ".join(x for x in cells if x).rstrip())
            if not mine and not self.slurm_error:
                lines.append("  no task known to Slurm any more")
        if self.slurm_error:
            lines.append(f"Slurm: {self.slurm_error}")
        return "\n".join(lines)


    def _orphans_text(self) -> list[str]:
        """The cells no longer in the spec: a row for each one left unfinished, a count of the others."""
        orphaned = [r for r in self.orphans if r.state == CellState.ORPHANED]
        ended: dict[str, int] = {}
        for r in self.orphans:
            if r.state != CellState.ORPHANED:
                word = "closed" if r.closed else str(r.state)
                ended[word] = ended.get(word, 0) + 1
        parts = [f"{len(orphaned)} orphaned (left unfinished, no worker of this spec trains "
                 f"{'them' if len(orphaned) > 1 else 'it'}; `{self.close_command}` closes "
                 f"{'them' if len(orphaned) > 1 else 'it'})"] if orphaned else []
        parts += [f"{n} {word}" for word, n in ended.items()]
        lines = [f"no longer in the spec: {', '.join(parts)}"
                 + ("; their runs stay in MLflow, and `ablate report` lists finished ones apart" if ended else "")]
        varied = list(dict.fromkeys(k for r in orphaned for k in r.values))
        header = ["state", *[k.split(".")[-1] for k in varied], "epoch", "top-1", "where / why"]
        body = [[str(r.state), *[text.value(r.values.get(k)) for k in varied], _epoch_text(r),
                 text.fixed(r.top1, ".2f"), _where_or_why(r)] for r in orphaned]
        if body:
            lines += ["  " + line for line in text.aligned(header, body, left=len(header))]
        return lines


def collect(spec_path: str, storage: Optional[str] = None, *, spec_args=None) -> Status:
    """Read where ``spec_path`` (with ``spec_args``: --set, --name) stands. Writes nothing anywhere."""
    spec = (spec_args or SpecArgs()).load(spec_path, check_paths=False)  # the data may live on the cluster only
    url = storage_url(storage)
    try:
        ledger = Ledger.for_spec(spec, url, create=False)
        records, launched = launches(ledger.study), True
    except NoLedger:
        ledger, records, launched = None, [], False
    tasks, slurm_error = [], ""
    if records:
        try:
            tasks = task_states([r.job for r in records])
        except SlurmUnavailable as e:
            slurm_error = str(e)
    gone = _liveness(tasks, {r.job for r in records} if not slurm_error else set())
    target = next((r.trials for r in reversed(records) if r.trials), None) if spec.search is not None else None
    where = progress.survey(spec, ledger, target=target, gone=gone)
    status = Status(spec=str(spec_path), name=spec.name, kind=spec.kind, total=where.total, rows=where.cells,
                    counts={str(s): n for s, n in where.counts.items()}, elapsed=None, eta=None,
                    ledger=display_url(url), mlflow=display_url(tracking.tracking_uri()), launched=launched,
                    launches=records, tasks=tasks, slurm_error=slurm_error, orphans=where.orphans,
                    close_command=(spec_args or SpecArgs()).command("run", spec_path, "--close-orphans",
                                                                    *storage_option(storage)))
    status.elapsed = _elapsed(where.trials, records, status.done)
    status.eta = _eta(status, where.trials, tasks)
    return status


def _liveness(tasks: list[TaskState], jobs: set[str]) -> Callable[[Any], Optional[str]]:
    """A function: RUNNING trial -> why its worker is gone, or None while it may still be running.

    ``jobs``: the launches' Slurm jobs whose tasks Slurm has just been asked about (a worker in
    some other Slurm job, e.g. ``ablate run`` inside ``salloc``, is judged by its process only)."""
    active = {t.job for t in tasks if t.state in ("RUNNING", "COMPLETING", "CONFIGURING")}
    ended = {t.job: t for t in tasks if not t.active}

    def gone(trial) -> Optional[str]:
        task = trial.user_attrs.get(names.SLURM_TASK) or ""
        if task and job_of(task) in jobs and task not in active:
            t = ended.get(task)
            return f"Slurm task {task} {t.state.lower() if t else 'is no longer running'}; resumes from its checkpoint"
        return progress.worker_gone(trial)
    return gone


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
                 for t in trials if t.number == r.trial and r.state == CellState.RUNNING and r.epoch and r.epochs
                 and t.datetime_start]
        if not paces:
            return None
        per_cell = statistics.median(paces)
    left = status.counts[CellState.WAITING] + status.counts[CellState.NEW] + sum(
        1 - (r.epoch or 0) / r.epochs if r.epochs else 1 for r in status.rows
        if r.state in (CellState.RUNNING, CellState.INTERRUPTED))
    workers = max(status.counts[CellState.RUNNING], sum(t.state == "RUNNING" for t in tasks))
    return left * per_cell / workers if workers else None


def _epoch_text(r: CellProgress) -> str:
    """Epochs done of the cell's total: all of them once finished, none yet while it starts."""
    if not r.epochs:
        return ""
    if r.state == CellState.FINISHED:
        return f"{r.epochs}/{r.epochs}"
    if r.state in (CellState.RUNNING, CellState.INTERRUPTED, CellState.ORPHANED):
        return f"{r.epoch or 0}/{r.epochs}"
    return f"{r.epoch}/{r.epochs}" if r.epoch else ""  # waiting to resume, or not started


def _where_or_why(r: CellProgress) -> str:
    if r.state in (CellState.RUNNING, CellState.INTERRUPTED):
        where = [r.host, f"worker {r.worker}" if r.worker else "", f"slurm {r.slurm_task}" if r.slurm_task else ""]
        if r.reason:  # interrupted: the reason names the worker or the Slurm task that is gone
            where = [r.host]
        speed = "" if r.state != CellState.RUNNING or r.images_per_second is None else \
            f"{r.images_per_second:.0f} img/s" + (f", MFU {r.mfu:.0%}" if r.mfu is not None else "")
        return " ".join(x for x in [*where, r.reason] if x) + (f"; {speed}" if speed else "")
    if r.state == CellState.WAITING and r.epoch:
        # the epoch reported last: its checkpoint may not have been written (a kill between the
        # two re-trains that epoch), so the cell resumes from the last checkpoint, not "after epoch N"
        return f"reached epoch {r.epoch}; resumes from its last checkpoint"
    return r.reason


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
            see = (spec_args or SpecArgs()).command("status", spec_path, *storage_option(storage))
            echo(f"every task of Slurm job {launch.job} has ended with work left; see `{see}` and the logs in "
                 f"{launch.logs}")
            return status
        time.sleep(interval)
