"""``--launcher slurm``: the workers of a grid or a search as one Slurm job array, through submitit.

Each array task runs the same worker loop as a local worker (:func:`ablate.workers.grid_worker`
or :func:`~ablate.workers.search_worker`) around the same ledger, MLflow store and checkpoints;
the launcher only decides where the loop runs. The command returns once the array is submitted.

Stopping and resuming: a task that Slurm stops loses at most the epoch in progress.

- Time limit or preemption: Slurm sends USR2 ``SIGNAL_DELAY_S`` seconds before the end;
  submitit asks :meth:`SlurmWorker.checkpoint` for the task to run next and requeues the task.
- scancel, ``scontrol requeue``, preemption that cancels or requeues: SIGTERM, on which the task
  stops at once (a node that dies: nothing); its cell's trial stays RUNNING in the ledger and
  its MLflow run stays RUNNING.

Either way the cell resumes from its last epoch checkpoint and continues its MLflow run, in
whichever task claims it next: a requeued task first releases the trials its previous life
held; other tasks notice a dead worker by its process id (same node) or its stopped heartbeat.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import submitit
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment
from submitit.slurm.slurm import _make_sbatch_string  # private: its batch script writer, for sbatch --test-only

from ablate import names, tracking
from ablate.context import Context, checkpoint_root
from ablate.errors import AblateError
from ablate.launch.jobs import Launch, record_launch, run_slurm, slurm_task
from ablate.launch.placement import Placement, Stores, check_shared_stores, placement
from ablate.launch.settings import SlurmSettings
from ablate.ledger import Ledger, storage_url
from ablate.locks import retry_busy
from ablate.preflight import check_batches, check_kind, check_trials
from ablate.processes import run_in_group, run_workers
from ablate.progress import survey
from ablate.runner import queue_grid, reusable_keys
from ablate.spec.builder import SpecArgs
from ablate.stores import check_stores
from ablate.urls import display_url
from ablate.workers import follow_cells, grid_worker, search_worker

SIGNAL_DELAY_S = 90      # USR2 this long before the time limit: time to requeue (Slurm may send it up to 60 s early)
TIMEOUT_REQUEUES = 20    # how many times one task may reach its time limit and be requeued
UNLIMITED_MINUTES = 365 * 24 * 60  # submitit wants a number for a partition without a time limit


@dataclass
class Submitted:
    """What ``--launcher slurm`` did, for the command to print."""
    launch: Optional[Launch]   # None: everything had finished, nothing was submitted
    spec_name: str
    queued: str          # "4 cells, 1 already finished, 3 queued" or "3 trials finished of 8"
    request: str         # "partition debug, time 1-00:00:00, 1 GPU per task"
    stores: Stores


def launch(spec_path: str, *, kind: str, workers: int = 1, storage: Optional[str] = None,
           checkpoints: Optional[str] = None, device: str = "auto", settings: SlurmSettings,
           trials: Optional[int] = None, spec_args: Optional[SpecArgs] = None, gpus_per_cell: int = 1,
           reuse: bool = True) -> Submitted:
    """Queue the spec's work and submit its workers as one job array; return without waiting.

    Everything that can be refused is refused before anything is written or submitted: the
    spec, the settings (already parsed), the stores, and the request itself (``sbatch
    --test-only``).
    """
    spec_args = spec_args or SpecArgs()
    spec = spec_args.load(spec_path)
    check_kind(spec, spec_path, kind)
    check_trials(trials)
    _check_cell_shape(settings, gpus_per_cell)
    check_batches(spec, gpus_per_cell)
    where = placement(settings)
    stores = check_shared_stores(storage_url(storage), tracking.tracking_uri(), checkpoint_root(checkpoints),
                                 settings.logs, where)
    check_stores(stores.ledger, stores.tracking)  # each one usable, before either is written
    folder = Path(stores.logs) / spec.slug
    executor = _executor(settings, folder, spec.slug, workers, where, gpus_per_cell)
    _test_only(executor, workers)

    # ---- from here on, things are written: the queue, the experiment, the parent run, the jobs
    ledger = Ledger.for_spec(spec, stores.ledger)
    if kind == names.GRID:
        enqueued, done = queue_grid(spec, ledger)
        cells = len(spec.cells())
        queued = f"{cells} cells, {done} already finished, {enqueued} queued"
        target, finished = None, done == cells
    else:
        ledger.recover_dead()
        target = trials or spec.search.trials
        done, running, waiting = ledger.search_counts()
        queued = f"{done} trials finished of {target}; sampler {spec.search.sampler}"
        finished = done >= target and not running and not waiting
    if finished:  # nothing for a worker to do: submit nothing
        return Submitted(None, spec.name, queued, "", stores)
    with _environment(MLFLOW_TRACKING_URI=stores.tracking):
        experiment_id = tracking.ensure_experiment(spec.name, spec)
        # tagged as Slurm's from the start: its tasks, not this process, run (and close) it
        parent = tracking.start_parent(experiment_id, kind, str(spec_path), tags={names.LAUNCHER: "slurm"},
                                       local=False)
        reusable = reusable_keys(experiment_id, reuse)
    gpus = settings.gpus_per_task if gpus_per_cell == 1 else 0  # a cell's group: one process per GPU
    ctx = Context(spec_path=os.path.abspath(spec_path), storage="", experiment_id=experiment_id,
                  parent_run_id=parent, checkpoints=stores.checkpoints, device=device, progress=False,
                  trials=target or 0, workers=workers * max(1, gpus), spec_args=spec_args,
                  gpus_per_cell=gpus_per_cell, reusable=reusable)
    try:
        # the store URLs reach the tasks through the environment sbatch passes on, not in a file
        with _environment(ABLATE_STORAGE=stores.ledger, MLFLOW_TRACKING_URI=stores.tracking,
                          ABLATE_CHECKPOINTS=stores.checkpoints):
            with executor.batch():
                jobs = [executor.submit(SlurmWorker(kind, replace(ctx, index=i), gpus)) for i in range(workers)]
    except Exception as e:
        with _environment(MLFLOW_TRACKING_URI=stores.tracking):
            tracking.finish_run(parent, "FAILED")
        raise AblateError(f"--launcher slurm: submitting failed ({' '.join(str(e).split())[:500]})") from None
    job = jobs[0].job_id.split("_")[0]
    options = (["--workers", str(workers)] if workers > 1 else []) + (["--device", device] if device != "auto" else []) \
        + (["--gpus-per-cell", str(gpus_per_cell)] if gpus_per_cell > 1 else [])
    record = Launch(job=job, kind=kind, tasks=workers, logs=str(folder), parent_run=parent,
                    submitted=time.time(), trials=target, options=options)
    record_launch(ledger, record)
    with _environment(MLFLOW_TRACKING_URI=stores.tracking):
        for key, value in ((names.LAUNCHER, "slurm"), (names.SLURM_JOB, job), (names.SLURM_LOGS, str(folder))):
            retry_busy(tracking.client().set_tag, parent, key, value)
    return Submitted(record, spec.name, queued, _describe(settings, where, executor), stores)


@contextmanager
def _environment(**values: str):
    """Set environment variables for the body (what sbatch passes on to the tasks), then restore them."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_cell_shape(settings: SlurmSettings, gpus_per_cell: int) -> None:
    """A cell of ``gpus_per_cell`` processes as one array task: ``nodes`` nodes, the same share on each."""
    if gpus_per_cell == 1:
        if settings.nodes > 1:
            raise AblateError(f"--slurm nodes: {settings.nodes} (allowed: 1, or more with --gpus-per-cell: one cell "
                              "spread over several nodes)")
        return
    if gpus_per_cell % settings.nodes:
        raise AblateError(f"--slurm nodes: {settings.nodes} does not divide --gpus-per-cell {gpus_per_cell} "
                          f"(allowed: a divisor of {gpus_per_cell}: each node runs the same number of processes)")
    per_node = gpus_per_cell // settings.nodes
    if settings.gpus_per_task and settings.gpus_per_task != per_node:
        raise AblateError(f"--slurm gpus_per_task: {settings.gpus_per_task} with --gpus-per-cell {gpus_per_cell} on "
                          f"{settings.nodes} node(s) (allowed: {per_node}, the GPUs of one cell on each node)")


def _executor(settings: SlurmSettings, folder: Path, slug: str, workers: int, where: Placement,
              gpus_per_cell: int = 1):
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=TIMEOUT_REQUEUES)
    extra = {"export": "ALL", **settings.sbatch_options()}  # ALL: even where SBATCH_EXPORT says otherwise
    minutes = settings.time or where.default_time or where.max_time
    if minutes is None:
        extra["time"] = "UNLIMITED"
        minutes = UNLIMITED_MINUTES
    if settings.mem:
        extra["mem"] = settings.mem
    # a short time limit gets its warning a quarter before the end rather than before it starts
    delay = min(SIGNAL_DELAY_S, minutes * 60 // 4)
    params = dict(job_name=f"ablate-{slug}", time=minutes, partition=where.partition,
                  array_parallelism=min(settings.max_running or workers, workers), signal_delay_s=delay,
                  stderr_to_stdout=True, setup=list(settings.setup), additional_parameters=extra)
    for key in ("account", "qos", "constraint", "nodelist", "exclude", "cpus_per_task"):
        if getattr(settings, key) is not None:
            params[key] = getattr(settings, key)
    if settings.gpus_per_task:
        params["gres"] = f"gpu:{settings.gpu_type + ':' if settings.gpu_type else ''}{settings.gpus_per_task}"
    if gpus_per_cell > 1:  # one array task is one cell's group: a process per GPU, over `nodes` nodes
        params.update(nodes=settings.nodes, ntasks_per_node=gpus_per_cell // settings.nodes)
    executor.update_parameters(**params)
    return executor


def _test_only(executor, workers: int) -> None:
    """Ask Slurm whether it would take the array as it will be submitted, without submitting it."""
    # submitit writes the batch script only when it submits; this is its own writer (a private
    # function, the only one we use) run on the same parameters, so the check sees that script
    script = _make_sbatch_string(command="true", folder=executor.folder, map_count=workers if workers > 1 else None,
                                 **executor.parameters)
    result = run_slurm(["sbatch", "--test-only", "--parsable"], check=False, input=script)
    if result.returncode != 0:
        lines = [line.removeprefix("sbatch: error: ").strip() for line in result.stderr.splitlines() if line.strip()]
        raise AblateError(f"--slurm: Slurm refuses the request: {'; '.join(lines) or 'sbatch --test-only failed'}")


def _describe(settings: SlurmSettings, where: Placement, executor) -> str:
    params = executor.parameters
    time_text = params["additional_parameters"].get("time") or _format_minutes(params["time"])
    parts = [f"partition {where.partition}", f"time {time_text} per task"]
    if settings.gpus_per_task:
        parts.append(f"{params['gres'].removeprefix('gpu:')} GPU(s) per task")
    if settings.cpus_per_task:
        parts.append(f"{settings.cpus_per_task} CPUs per task")
    if settings.mem:
        parts.append(f"{settings.mem} per task")
    return ", ".join(parts)


def _format_minutes(minutes: int) -> str:
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00" if days else f"{rest // 60:02d}:{rest % 60:02d}:00"


class SlurmWorker:
    """One array task: the local worker loop, under Slurm (pickled by submitit into the log folder).

    It holds no secret: the store URLs come from the task's environment.
    """

    def __init__(self, kind: str, ctx: Context, gpus: int):
        self.kind, self.ctx, self.gpus = kind, ctx, gpus

    def __call__(self) -> str:
        task = slurm_task() or "?"
        try:
            storage = os.environ["ABLATE_STORAGE"]
        except KeyError:
            raise RuntimeError("ABLATE_STORAGE is not set in this task: the job must get the submitting "
                               "environment (sbatch --export=ALL)") from None
        cpus = _allocated_cpus()
        ctx = replace(self.ctx, storage=storage, threads=max(1, cpus // max(1, self.gpus)) if cpus else 0)
        if ctx.gpus_per_cell > 1:
            return self._cell_group(ctx, task, storage)
        ctx.log(f"task {task} on {socket.gethostname()}: {max(1, self.gpus)} {self.kind} worker(s)"
                f"{', CUDA_VISIBLE_DEVICES=' + os.environ['CUDA_VISIBLE_DEVICES'] if 'CUDA_VISIBLE_DEVICES' in os.environ else ''}"
                f"{f', {cpus} CPUs' if cpus else ''}; ledger {display_url(storage)}")
        spec = ctx.load_spec()
        ledger = Ledger.for_spec(spec, storage)
        # a requeued task: what its previous life held is certainly not running any more
        released = ledger.release_gone(lambda t: t.user_attrs.get(names.SLURM_TASK) == task)
        if released:
            ctx.log(f"task {task}: released trial(s) {released} of its previous run, to resume them")
        # submitit only logs SIGTERM; scancel, preemption and a requeue send it, and stopping at
        # once loses less than training on until SIGKILL (KillWait later) cuts an epoch anyway
        signal.signal(signal.SIGTERM, _stop)
        target = grid_worker if self.kind == names.GRID else search_worker
        if self.gpus > 1:
            run_workers(target, ctx, self.gpus, [f"cuda:{i}" for i in range(self.gpus)])
        else:
            target(ctx)
        return _close_parent_if_done(spec, ledger, ctx)

    def _cell_group(self, ctx: Context, task: str, storage: str) -> str:
        """One process of a task that is one cell's group (--gpus-per-cell): Slurm started one per
        GPU (or CPU process), on one or several nodes; submitit says which rank this is and where
        rank 0 listens. Rank 0 is the worker that claims and records; the others follow it."""
        env = TorchDistributedEnvironment()
        has_gpus = "CUDA_VISIBLE_DEVICES" in os.environ and ctx.device != "cpu"
        device = f"cuda:{env.local_rank}" if has_gpus else ctx.device
        ctx = replace(ctx, rank=env.rank, device=device, prefix=f"[rank {env.rank}] " if env.rank else "")
        ctx.log(f"task {task} on {socket.gethostname()}: rank {env.rank} of a {env.world_size}-process cell group "
                f"on {device}; rank 0 at {env.master_addr}:{env.master_port}; ledger {display_url(storage)}")
        spec = ctx.load_spec()
        ledger = Ledger.for_spec(spec, storage) if env.rank == 0 else None
        if ledger is not None:
            released = ledger.release_gone(lambda t: t.user_attrs.get(names.SLURM_TASK) == task)
            if released:
                ctx.log(f"task {task}: released trial(s) {released} of its previous run, to resume them")
        signal.signal(signal.SIGTERM, _stop)
        worker = grid_worker if self.kind == names.GRID else search_worker
        run_in_group(follow_cells if env.rank else worker, ctx, env.world_size,
                     f"tcp://{env.master_addr}:{env.master_port}")
        return "follower" if env.rank else _close_parent_if_done(spec, ledger, ctx)

    def checkpoint(self):
        """Time limit or preemption (submitit's USR2 handler): run this same worker again once requeued.

        Nothing to save here: the ledger, the MLflow runs and the epoch checkpoints hold all state.
        submitit requeues the job and exits next; the SIGTERM with which Slurm then ends the task
        must not interrupt that exit (it would print a traceback from wherever the exit had got to).
        """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return DelayedSubmission(self)


def _stop(signum, frame) -> None:
    """SIGTERM in an array task: leave now. The cell stays RUNNING in the ledger, with its MLflow run
    and its last epoch checkpoint, for whichever worker takes it over (see the module's docstring).
    Once: a second SIGTERM must not interrupt the exit the first one started."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _allocated_cpus() -> int:
    """The CPUs Slurm gave this task (--cpus-per-task, else the job's share of the node): torch's
    threads, so that tasks sharing a node do not each use all of its cores. 0 if Slurm does not say."""
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_JOB_CPUS_PER_NODE"):
        digits = re.match(r"\d+", os.environ.get(name, ""))  # e.g. "8", or "8(x2)" over several nodes
        if digits:
            return int(digits[0])
    return 0


def _close_parent_if_done(spec, ledger, ctx: Context) -> str:
    """The last task to finish closes the launch's parent run (several may: the result is the same)."""
    where = survey(spec, ledger, runs=[], target=ctx.trials or None)
    if not where.done:
        return "unfinished"
    status = "FINISHED" if spec.search is not None or where.ok else "FAILED"
    tracking.finish_run(ctx.parent_run_id, status)
    return status.lower()
