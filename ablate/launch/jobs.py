"""The Slurm jobs of a spec: recorded in its ledger, asked of Slurm, cancelled.

Each Slurm launch appends a record (job id, tasks, log folder, parent run) to a user attribute
of the spec's ledger study, so ``ablate status`` and ``ablate cancel`` find the jobs from any
machine that shares the stores. Slurm itself is asked through its commands (``squeue`` for what
is queued or running, with the reason a task waits; ``sacct`` for what has ended), never through
a file of ours. Nothing here imports submitit, torch or MLflow.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

from ablate import names
from ablate.errors import AblateError
from ablate.locks import retry_busy, store_lock

#: Slurm states in which a task still holds (or waits for) a node
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")


class SlurmUnavailable(AblateError):
    """Slurm's commands are missing here or its controller does not answer."""


@dataclass
class Launch:
    """One ``--launcher slurm`` submission of a spec."""
    job: str               # the Slurm job id (of the array)
    kind: str              # grid | search
    tasks: int             # array tasks (workers)
    logs: str              # the folder of the tasks' logs
    parent_run: str        # the MLflow parent run its tasks record under
    submitted: float       # epoch seconds
    trials: Optional[int] = None  # search: the study's target number of trials
    options: list[str] = field(default_factory=list)  # its worker options (--workers, --device, --gpus-per-cell)


@dataclass
class TaskState:
    """One line of Slurm's answer: an array task (``45_1``), a range still pending (``45_[2-7]``) or a job."""
    job: str
    state: str             # PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, TIMEOUT, PREEMPTED, ...
    reason: str            # Slurm's reason (why it waits, or why it ended), "" for none
    nodes: str
    elapsed: str
    exit_code: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def slurm_task() -> Optional[str]:
    """The Slurm job this process runs in: ``ARRAYJOB_TASK`` in an array, else the job id; None outside Slurm."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def job_of(task: str) -> str:
    """``45`` for ``45_1``, ``45_[2-7]`` or ``45``."""
    return task.split("_", 1)[0]


# ---- records in the ledger -----------------------------------------------------------------------

def launches(study) -> list[Launch]:
    """The Slurm launches recorded on a ledger study, oldest first."""
    raw = study.user_attrs.get(names.SLURM_LAUNCHES)
    return [Launch(**item) for item in json.loads(raw)] if raw else []


def record_launch(ledger, launch: Launch) -> None:
    """Append ``launch`` to the study's records (under the store lock: two launches at once keep both)."""
    with store_lock(ledger.url):
        records = [asdict(x) for x in launches(ledger.study)] + [asdict(launch)]
        retry_busy(ledger.study.set_user_attr, names.SLURM_LAUNCHES, json.dumps(records))


# ---- asking Slurm ----------------------------------------------------------------------------------

def run_slurm(args: list[str], *, timeout: float = 60, check: bool = True,
              input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a Slurm command; a missing command or an unreachable controller is :class:`SlurmUnavailable`."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError:
        raise SlurmUnavailable(f"{args[0]}: not found on this machine (allowed: a Slurm login node, "
                               "or --launcher local)") from None
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"{args[0]}: no answer from Slurm in {timeout:.0f} s") from None
    if check and result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
        raise SlurmUnavailable(f"{args[0]}: {message}")
    return result


def task_states(jobs: Iterable[str]) -> list[TaskState]:
    """Every task of ``jobs``: squeue's view of those queued or running (with the reason a task
    waits), sacct's of those that ended. Without accounting, ended tasks are simply absent."""
    jobs = sorted({job_of(j) for j in jobs}, key=int)
    if not jobs:
        return []
    out: dict[str, TaskState] = {}
    acct = run_slurm(["sacct", "-n", "-P", "-X", "-j", ",".join(jobs),
                      "-o", "JobID,State,Reason,NodeList,Elapsed,ExitCode"], check=False)
    if acct.returncode == 0:
        for line in acct.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 6 and parts[0]:
                state, _, by = parts[1].partition(" ")  # "CANCELLED by 0": the uid that cancelled it
                reason = parts[2] if parts[2] != "None" else f"by uid {by.split()[-1]}" if by else ""
                if state == "COMPLETED":  # sacct keeps the last reason it waited for (e.g. BeginTime after a requeue)
                    reason = ""
                out[parts[0]] = TaskState(parts[0], state, reason, _nodes(parts[3]), parts[4], parts[5])
    queue = run_slurm(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i|%T|%r|%N|%M"], check=False)
    if queue.returncode != 0 and "Invalid job id" not in queue.stderr:
        raise SlurmUnavailable(f"squeue: {' '.join(queue.stderr.split())}")
    queued = {}
    for line in queue.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            reason = parts[2] if parts[2] != "None" else ""
            queued[parts[0]] = TaskState(parts[0], parts[1], reason, _nodes(parts[3]), parts[4])
    # squeue lists pending tasks one by one (-r): while it lists a job's tasks, sacct's active
    # placeholders for the rest of its array (``45_[2-7]``, or ``45`` itself) are stale
    listed = {job_of(k) for k in queued}
    out = {k: v for k, v in out.items() if not (v.active and job_of(k) in listed and ("[" in k or "_" not in k))}
    out.update(queued)
    return sorted(out.values(), key=_task_order)


def _nodes(text: str) -> str:
    return "" if text in ("None assigned", "(null)", "n/a") else text


def _task_order(t: TaskState):
    job, _, task = t.job.partition("_")
    first = task.strip("[]").split("-")[0].split("%")[0].split(",")[0]
    return int(job), int(first) if first.isdigit() else -1


def active_jobs(jobs: Iterable[str]) -> list[str]:
    """Those of ``jobs`` that still have a task queued or running, as squeue sees it now."""
    jobs = sorted({job_of(j) for j in jobs}, key=int)
    if not jobs:
        return []
    queue = run_slurm(["squeue", "-h", "-j", ",".join(jobs), "-o", "%F|%T"], check=False)
    if queue.returncode != 0 and "Invalid job id" not in queue.stderr:
        raise SlurmUnavailable(f"squeue: {' '.join(queue.stderr.split())}")
    return sorted({line.split("|")[0] for line in queue.stdout.split()
                   if line.split("|")[-1] in ACTIVE_STATES}, key=int)


def cancel_jobs(jobs: list[str], *, wait: float = 120.0) -> list[str]:
    """scancel ``jobs`` (every task of each array) and wait until Slurm no longer runs any of them.

    Returns those still ending after ``wait`` seconds (scancel sends SIGTERM, then SIGKILL after
    the cluster's KillWait; a node that does not answer can hold a task in COMPLETING longer).
    """
    if not jobs:
        return []
    run_slurm(["scancel", *jobs])
    deadline = time.monotonic() + wait
    while True:
        left = active_jobs(jobs)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
