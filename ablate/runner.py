"""``ablate run`` and ``ablate search``: validate, queue in the ledger, train with workers, summarise.

One worker trains one cell at a time: it claims a trial from the ledger, opens (or continues)
the cell's MLflow child run, trains with :func:`ablate.train.train_cell` while keeping the
trial's heartbeat, then records the outcome in MLflow first and the ledger second. If a worker
dies between the two, the next worker that claims the cell finds the finished MLflow run and
only tells the ledger, so each cell ends with exactly one finished run.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ablate import checkpoint, names
from ablate.cell_group import CellGroup, GroupBroken, StoppedByLeader, free_port
from ablate.checkpoint import DEFAULT_ROOT
from ablate.errors import AblateError
from ablate.spec.builder import SpecArgs
from ablate.tracking import spec_tags
from ablate.urls import display_url

POLL_SECONDS = 2.0
#: a spawned worker's exit status when it could not write a checkpoint (sysexits' EX_TEMPFAIL:
#: run again once there is room); its parent then stops the others, which would meet it too
CHECKPOINT_STOP_EXIT = 75
#: a spawned worker's exit status when an error every worker would meet stopped it (a store lost for
#: good, a setting refused): its parent stops the others and ends the command with one line
ERROR_STOP_EXIT = 77
#: a worker's exit status when a process of its cell's group died: its cell resumes at the next run
GROUP_BROKEN_EXIT = 76


@dataclass
class Context:
    """What every worker of one invocation shares (picklable: workers are spawned processes)."""
    spec_path: str
    storage: str
    experiment_id: str
    parent_run_id: str
    checkpoints: str
    device: str = "auto"
    threads: int = 0
    prefix: str = ""
    progress: Optional[bool] = None
    trials: int = 0  # search only: the study's target number of trials
    workers: int = 1  # how many workers share this invocation (for the ETA)
    index: int = 0  # this worker's number among them
    spec_args: SpecArgs = SpecArgs()  # --set, --name, --max-cells: every worker loads the same spec
    gpus_per_cell: int = 1  # processes (GPUs) that train one cell together
    rank: int = 0  # this process's rank in its cell's group (0: the worker that claims and records)
    address: str = ""  # the group's rendezvous, tcp://host:port
    group: Optional[CellGroup] = None  # joined in the worker process

    def log(self, msg: str) -> None:
        print(f"{self.prefix}{msg}", flush=True)


def checkpoint_root(option: Optional[str] = None) -> str:
    return option or os.environ.get("ABLATE_CHECKPOINTS") or DEFAULT_ROOT


def _objective_values(spec, metrics: dict) -> list[float]:
    if spec.search is None:
        return [metrics["val_top1"]]
    from ablate.latency import objective_metric  # latency:cpu is the metric latency_ms.cpu
    return [float(metrics[objective_metric(o.metric)]) for o in spec.search.objectives]


def check_device(name: str, option: str = "--device") -> None:
    """Refuse an unusable device before anything is written, naming the ``option`` it came from
    as it was given there (``--devices 0`` lists GPU numbers: its ``cuda:0`` is shown as ``0``)."""
    import torch
    gpus = option == "--devices"
    shown = name.removeprefix("cuda:") if gpus else name
    allowed = "GPU numbers of this machine, e.g. 0,1" if gpus else "auto, cpu, cuda, cuda:N"
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                              "cpu" if name == "auto" else name)
    except RuntimeError:
        raise AblateError(f"{option}: {shown!r} is not a device (allowed: {allowed})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AblateError(f"{option}: {shown}: CUDA is not available on this machine "
                          f"(allowed: {'leave --devices out to train on the CPU' if gpus else 'auto, cpu'})")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        first, last = ("0", str(count - 1)) if gpus else ("cuda:0", f"cuda:{count - 1}")
        raise AblateError(f"{option}: {shown}: this machine has {count} GPU(s) (allowed: {first} to {last})")
    if device.type not in ("cpu", "cuda"):
        raise AblateError(f"{option}: {shown!r} (allowed: {allowed})")


def _open_ledger(spec, storage: str, *, create: bool = True):
    """The spec's ledger; ``create=False`` for readers: only an existing one (else ``NoLedger``), nothing written."""
    from ablate.ledger import Ledger
    from ablate.search import make_pruner, make_sampler
    if spec.search is None:
        return Ledger(storage, spec.name, kind="grid", create=create, metric_names=["val_top1"])
    return Ledger(storage, spec.name, [o.direction for o in spec.search.objectives],
                  sampler=make_sampler(spec.search), pruner=make_pruner(spec.search, spec.base.train.epochs),
                  kind="search", create=create, metric_names=[o.metric for o in spec.search.objectives])


def execute(spec, cfg, key: str, trial, ledger, ctx: Context, *, prune: bool = False) -> str:
    """Train one cell (or trial) and record it. Returns the final state name, or TAKEN_OVER when
    the trial went to another worker meanwhile (this one was paused past the heartbeat's grace)."""
    from ablate.ledger import TakenOver
    try:
        return _execute(spec, cfg, key, trial, ledger, ctx, prune=prune)
    except TakenOver as e:  # the cell is the new owner's: its run and checkpoint are left to it
        ctx.log(f"cell {key}: left to another worker: {e}")
        return "TAKEN_OVER"


def _execute(spec, cfg, key: str, trial, ledger, ctx: Context, *, prune: bool = False) -> str:
    import optuna

    from ablate import tracking
    from ablate.ledger import TakenOver
    from ablate.locks import StoreLost
    from ablate.latency import measure_objectives
    from ablate.train import CellFailed, describe_failure, is_out_of_memory, resolve_device, train_cell

    ckpt_dir = Path(ctx.checkpoints) / spec.slug / key
    done = tracking.finished_run(ctx.experiment_id, key)
    if done is not None:
        # A grid: the worker that trained it died before telling the ledger. A search: the sampler
        # proposed a configuration already trained; training is deterministic, so its result is
        # this trial's result too, recorded as this trial's own run that says where it came from.
        if spec.search is not None and done.data.tags.get(names.TRIAL_NUMBER) != str(trial.number):
            tracking.CellRun.copy_of(done, ctx.parent_run_id, trial.number)
        metrics = done.data.metrics
        _record(None, ledger, trial, "COMPLETE", _objective_values(spec, metrics))  # MLflow has it already
        _remove_checkpoints(ckpt_dir, ctx)
        ctx.log(f"cell {key}: already finished in MLflow (top-1 {metrics.get('val_top1', float('nan')):.2f})")
        return "COMPLETE"

    device = resolve_device(ctx.device)
    run = tracking.CellRun.open(ctx.experiment_id, ctx.parent_run_id, cfg, key, varied=spec.varied,
                                spec_file=ctx.spec_path, device=str(device),
                                trial_number=trial.number,
                                run_name=_run_name(spec, cfg, trial.number), tags=spec_tags(spec))
    ctx.log(f"cell {key} ({_run_name(spec, cfg, trial.number)}): "
            f"{'resuming' if run.resumed else 'training'} on {device}")

    def on_epoch(stats):
        step = stats.epoch
        run.log_metrics(stats.metrics(), step=step)
        if prune:
            trial.report(stats.val_top1, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {step} (top-1 {stats.val_top1:.2f})")

    group = ctx.group or CellGroup()
    try:
        with ledger.heartbeat(trial):
            measured = measure_objectives(spec, cfg, device, run)  # latency:* objectives: built, not trained yet
            group.send({"cell": cfg.model_dump(mode="json"), "checkpoint_dir": str(ckpt_dir)})
            metrics = train_cell(cfg, device=device, checkpoint_dir=ckpt_dir, on_epoch=on_epoch,
                                 before_write=lambda: ledger.check_owner(trial),
                                 on_start=run.set_tags, group=group, log=lambda m: ctx.log(f"  {m}"),
                                 progress=ctx.progress)
    except optuna.TrialPruned as e:
        _record(run, ledger, trial, "PRUNED", reason=str(e))
        ctx.log(f"cell {key}: {e}")
        return "PRUNED"
    except (KeyboardInterrupt, SystemExit, TakenOver, StoreLost):
        raise  # leave the cell RUNNING: the next run notices the dead worker and resumes it
    except checkpoint.CheckpointWriteFailed as e:
        # not this cell's fault and every next cell would meet it too: stop, and hand the cell
        # back to the queue (its MLflow run stays RUNNING) to resume once the disk has room
        ledger.release_gone(lambda t: t.number == trial.number)
        ctx.log(f"cell {key}: stopped: {e}")
        if mp.parent_process() is not None:
            raise SystemExit(CHECKPOINT_STOP_EXIT) from None  # a spawned worker: its parent says the rest
        raise
    except Exception as e:
        if group.distributed and (isinstance(e, GroupBroken) or is_out_of_memory(e)):
            # not the cell's fault: the attempt ends, the group with it, and the cell resumes
            ledger.release_gone(lambda t: t.number == trial.number)
            ctx.log(f"cell {key}: stopped: {describe_failure(e)}; it resumes from its last checkpoint at the next run")
            raise SystemExit(GROUP_BROKEN_EXIT) from None
        reason = describe_failure(e)
        if is_out_of_memory(e) and device.type == "cuda":
            import torch
            torch.cuda.empty_cache()
        if not isinstance(e, CellFailed) and not is_out_of_memory(e):
            import traceback
            traceback.print_exc()
        _record(run, ledger, trial, "FAIL", reason=reason)
        ctx.log(f"cell {key}: FAILED: {reason}")
        if group.distributed and not isinstance(e, CellFailed):
            # the other ranks may be waiting in a collective this rank never reaches: end the group
            raise SystemExit(GROUP_BROKEN_EXIT) from None
        return "FAIL"
    # val_top1/val_top5/losses are already the last per-epoch values; log the run-level ones
    per_epoch = ("epochs", "train_loss", "val_loss", "val_top1", "val_top5")
    ledger.check_owner(trial)
    run.log_metrics({k: v for k, v in metrics.items() if k not in per_epoch}, step=metrics["epochs"])
    _record(run, ledger, trial, "COMPLETE", _objective_values(spec, {**metrics, **measured}))
    _remove_checkpoints(ckpt_dir, ctx)  # finished: the MLflow run is the record now
    ctx.log(f"cell {key}: done, top-1 {metrics['val_top1']:.2f}  top-5 {metrics['val_top5']:.2f}  "
            f"{metrics['train_seconds']:.0f}s")
    return "COMPLETE"


def _remove_checkpoints(ckpt_dir: Path, ctx: Context) -> None:
    """A finished cell's checkpoint folder, and the folders above it once empty (the root only
    where it is the default one in the working directory, which a run creates)."""
    from ablate.checkpoint import remove
    remove(ckpt_dir, Path(ctx.checkpoints), remove_root=ctx.checkpoints == DEFAULT_ROOT)


def _record(run, ledger, trial, state: str, values: Optional[list[float]] = None,
            reason: Optional[str] = None) -> None:
    """Record a cell's outcome (``state``: COMPLETE, PRUNED or FAIL): in MLflow first, the ledger second.

    Every exit of :func:`execute` goes through here. A worker that dies between the two leaves a
    finished MLflow run and a RUNNING trial; the next worker to claim the cell finds the run and
    only tells the ledger (``run`` None: MLflow holds the outcome already).
    """
    from optuna.trial import TrialState
    ledger.check_owner(trial)  # TakenOver: another worker owns the cell now and records it
    if run is not None:
        run.close(state, reason)
    ledger.tell(trial, TrialState[state], values if state == "COMPLETE" else None, reason=reason)


def _overrides_note(spec) -> str:
    """`` (spec quickstart, --set train.epochs=1)`` after an experiment name that is not the spec's own."""
    return f" ({spec.origin()})" if spec.origin() else ""


def _run_name(spec, cfg, number: int) -> str:
    from ablate.config import flat_params
    flat = flat_params(cfg)
    parts = [f"{k.split('.')[-1]}={_short(flat[k])}" for k in spec.varied if k in flat]
    return " ".join(parts) or f"trial {number}"


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        from ablate.models.shift_patterns import shift_label
        return shift_label(v)
    return str(v)


# ---- workers -------------------------------------------------------------------------------------

def _setup_worker(ctx: Context) -> None:
    import torch

    from ablate.quiet import quiet_known_noise
    quiet_known_noise()
    if ctx.threads:
        torch.set_num_threads(ctx.threads)


def _wait_for_others(ctx: Context, what: str, said: bool) -> bool:
    """Nothing to claim, but work still runs elsewhere: wait in case its worker dies."""
    if not said:
        ctx.log(f"waiting: {what} running in other workers")
    time.sleep(POLL_SECONDS)
    _keep_group(ctx)
    return True


def _keep_group(ctx: Context) -> None:
    """Tell the other ranks of this worker's group that it is still there (they wait in a broadcast)."""
    if ctx.group is not None and ctx.group.distributed:
        ctx.group.send({"idle": True})


def follow_cells(ctx: Context) -> None:
    """A rank other than 0: train every cell the group's leader hands over, until it says stop.

    Only the leader records; a cell that fails here fails there too (the checks are agreed), so
    this rank just waits for the next one."""
    from ablate.config import CellConfig
    from ablate.train import CellFailed, resolve_device, train_cell
    _setup_worker(ctx)
    device = resolve_device(ctx.device)
    ctx.log(f"rank {ctx.rank} of {ctx.gpus_per_cell} on {device} (pid {os.getpid()}): trains the cells rank 0 hands over")
    while True:
        message = ctx.group.send()
        if message.get("stop"):
            return
        if "cell" not in message:
            continue  # the leader is waiting for work
        try:
            train_cell(CellConfig(**message["cell"]), device=device, checkpoint_dir=Path(message["checkpoint_dir"]),
                       group=ctx.group, log=lambda m: None, progress=False)
        except (CellFailed, StoppedByLeader):
            continue


def grid_worker(ctx: Context) -> None:
    """Claim and train cells until none is waiting or running anywhere."""
    _setup_worker(ctx)
    spec = ctx.spec_args.load(ctx.spec_path)
    ledger = _open_ledger(spec, ctx.storage)
    cells = {c.key: c for c in spec.cells()}
    started, trained, waited = time.time(), 0, False
    while True:
        trial = ledger.claim(cells.keys())  # only this spec's cells: another spec of the same name keeps its own
        if trial is None:
            ledger.recover_dead()
            counts = ledger.counts(set(cells))
            if counts["WAITING"]:
                continue
            if not counts["RUNNING"]:
                return
            waited = _wait_for_others(ctx, f"{counts['RUNNING']} cell(s)", waited)
            continue
        waited = False
        key = trial.user_attrs[names.CELL_KEY]
        execute(spec, cells[key].config, key, trial, ledger, ctx)
        trained += 1
        counts = ledger.counts(set(cells))
        finished = counts["COMPLETE"] + counts["FAIL"]
        remaining = len(cells) - finished
        per_cell = (time.time() - started) / trained
        ctx.log(f"grid: {finished}/{len(cells)} cells finished ({counts['FAIL']} failed), "
                f"ETA {_duration(per_cell * remaining / ctx.workers)}")


def _wait_for_same_config(ledger, trial, key: str, ctx: Context) -> None:
    """Another worker is training this very configuration for an earlier trial: let it finish.

    Its finished run then stands for this trial too (see :func:`execute`); were both to train,
    they would share one checkpoint folder and one MLflow run. An earlier trial that has no
    configuration yet (asked a moment ago, its key about to be set) is waited for as well, else
    both could start the same configuration. Earlier trials never wait for later ones, so two
    workers cannot wait for each other.
    """
    from optuna.trial import TrialState
    said = False
    while True:
        earlier = [t for t in ledger.trials(states=(TrialState.RUNNING,)) if t.number < trial.number]
        same = any(t.user_attrs.get(names.CELL_KEY) == key for t in earlier)
        if not same and all(names.CELL_KEY in t.user_attrs for t in earlier):
            return
        if same and not said:
            ctx.log(f"trial {trial.number}: same configuration as a running trial; waiting for its result")
            said = True
        time.sleep(POLL_SECONDS if same else 0.2)
        _keep_group(ctx)
        ledger.recover_dead()


def search_worker(ctx: Context) -> None:
    """Ask the sampler (or take a waiting retry), train, tell, until the study has its trials."""
    from optuna.trial import TrialState

    from ablate.config import cell_key
    from ablate.search import counted_trials, make_sampler, suggest
    _setup_worker(ctx)
    spec = ctx.spec_args.load(ctx.spec_path)
    ledger = _open_ledger(spec, ctx.storage)
    # Seeded from the study's size and the worker's number: one worker on the same study state
    # samples the same trials again, while parallel workers and resumed searches do not propose
    # the same configurations as each other.
    ledger.study.sampler = make_sampler(spec.search, seed=len(ledger.trials()) * 100 + ctx.index)
    prune = len(spec.search.objectives) == 1 and spec.search.pruner not in (None, "none")
    waited = False
    while True:
        ledger.recover_dead()
        finished, running, waiting = counted_trials(ledger)
        if not waiting and finished + running >= ctx.trials:
            if not running:
                return
            waited = _wait_for_others(ctx, f"{running} trial(s)", waited)
            continue
        waited = False
        trial = ledger.ask()
        values = suggest(trial, spec.search.space)
        try:
            cfg = spec.resolve(values)
        except AblateError as e:
            ledger.tell(trial, TrialState.FAIL, reason=f"invalid configuration: {e}")
            ctx.log(f"trial {trial.number}: invalid configuration: {e}")
            continue
        key = cell_key(cfg)
        ledger.set_cell_key(trial, key)
        with ledger.heartbeat(trial):
            _wait_for_same_config(ledger, trial, key, ctx)
        execute(spec, cfg, key, trial, ledger, ctx, prune=prune)
        finished, running, _ = counted_trials(ledger)
        ctx.log(f"search: {finished}/{ctx.trials} trials finished")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _run_workers(target: Callable[[Context], None], ctx: Context, workers: int, devices: list[str]) -> None:
    """Run ``workers`` copies of ``target``: in this process for one, else spawned processes.

    The worker processes end with this one: stopped when it is interrupted (Ctrl-C, SIGTERM
    through :func:`ablate.lifecycle.sigterm_as_interrupt`) or fails, killed by the kernel when it
    is killed. Their cells stay RUNNING in the ledger, to resume.
    """
    per_cell = ctx.gpus_per_cell
    if workers == 1 and per_cell == 1:
        if devices:
            ctx.device = devices[0]
        target(ctx)
        return
    procs = []
    mp_ctx = mp.get_context("spawn")
    threads = ctx.threads or max(1, usable_cpus() // (workers * per_cell))
    try:
        for i in range(workers):
            address = f"tcp://127.0.0.1:{free_port()}" if per_cell > 1 else ""
            for rank in range(per_cell):
                n = i * per_cell + rank
                name = f"[w{i}] " if per_cell == 1 else f"[w{i}.{rank}] "
                wctx = Context(**{**ctx.__dict__, "prefix": name if workers > 1 or rank else "", "index": i,
                                  "threads": threads, "progress": False if workers > 1 or rank else ctx.progress,
                                  "device": devices[n] if devices else ctx.device, "rank": rank, "address": address})
                p = mp_ctx.Process(target=_worker_process, args=(target if rank == 0 else follow_cells, wctx, os.getpid()),
                                   name=f"ablate-worker-{i}" + (f".{rank}" if per_cell > 1 else ""))
                p.start()
                procs.append(p)
        from multiprocessing.connection import wait
        while (running := [p for p in procs if p.exitcode is None]) and not _stopped(procs):
            wait([p.sentinel for p in running])
    except BaseException:
        _stop_workers(procs)
        raise
    if _stopped(procs, ERROR_STOP_EXIT):
        _stop_workers(procs)
        raise AblateError(f"{', '.join(_stopped(procs, ERROR_STOP_EXIT))} stopped on the error above, so every worker "
                          "was stopped; run the same command again once it is fixed: finished cells are kept and "
                          "the others resume")
    if _stopped_on_checkpoint(procs):
        _stop_workers(procs)  # then name every worker that met it, the ones still leaving too
        stopped = _stopped_on_checkpoint(procs)
        raise checkpoint.CheckpointWriteFailed(
            f"{', '.join(stopped)} could not write a checkpoint (the line above says which and why), so every "
            "worker was stopped; run again once it is writable: finished cells are kept and the others resume")
    broken = [p.name for p in procs if p.exitcode == GROUP_BROKEN_EXIT]
    if broken:
        ctx.log(f"warning: worker(s) {', '.join(broken)} stopped: a process of their cell's group died; "
                "its cell resumes from its last checkpoint at the next run")
    bad = [p.name for p in procs if p.exitcode not in (0, None, GROUP_BROKEN_EXIT, ERROR_STOP_EXIT)]
    if bad:
        ctx.log(f"warning: worker(s) {', '.join(bad)} exited abnormally")


def _stopped_on_checkpoint(procs) -> list[str]:
    return _stopped(procs, CHECKPOINT_STOP_EXIT)


def _stopped(procs, *codes: int) -> list[str]:
    """The workers that ended on an error every worker would meet (``codes``: those exit statuses)."""
    return [p.name for p in procs if p.exitcode in (codes or (CHECKPOINT_STOP_EXIT, ERROR_STOP_EXIT))]


def _worker_process(target: Callable[[Context], None], ctx: Context, parent_pid: int) -> None:
    """A spawned worker: it dies with its parent, and leaves Ctrl-C to the parent (which stops it)."""
    import signal

    from ablate.lifecycle import die_with_parent
    die_with_parent(parent_pid)
    # a terminal's Ctrl-C reaches the whole process group; the parent alone decides, so that one
    # interrupt gives one message instead of a traceback from every worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent stops a worker with SIGTERM: leave through Python's exit (its cell stays RUNNING
    # to resume), so that what the process holds is released rather than reported leaked
    signal.signal(signal.SIGTERM, _leave)
    try:
        _work(target, ctx)
    except AblateError as e:  # a store lost for good, a setting refused: said once here, once by the parent
        ctx.log(f"stopped: {e}")
        raise SystemExit(ERROR_STOP_EXIT) from None


def _work(target: Callable[[Context], None], ctx: Context) -> None:
    """``target`` in this worker process, in its cell's group when cells span processes."""
    if ctx.gpus_per_cell == 1:
        target(ctx)
        return
    from ablate.train import resolve_device
    ctx.group = CellGroup.join(ctx.rank, ctx.gpus_per_cell, ctx.address, resolve_device(ctx.device))
    try:
        target(ctx)
        if ctx.group.leader:
            ctx.group.send({"stop": True})
    except GroupBroken as e:
        ctx.log(f"stopped: {e}")
        raise SystemExit(GROUP_BROKEN_EXIT) from None
    finally:
        ctx.group.leave()


def _leave(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _stop_workers(procs, grace: float = 10.0) -> None:
    """SIGTERM every worker, SIGKILL those still there after ``grace`` seconds; return once all are gone."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()


# ---- the two commands ----------------------------------------------------------------------------

def _estimated_cost(cell) -> float:
    """Training MACs of a cell. Workers claim cells in queue order, so queueing the longest first
    keeps the last cell from starting late on one GPU while the others sit idle."""
    from ablate.config import num_classes
    from ablate.models.cost import model_cost
    return model_cost(cell.config.model, num_classes(cell.config.data)).macs * cell.config.train.epochs


def usable_cpus() -> int:
    """CPU cores this process may run on (a Slurm job or a container may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _worker_count(device: str, devices: list[str], workers: int, gpus_per_cell: int = 1) -> int:
    """Check the devices and the number of workers before anything is written; one worker per listed GPU
    (per ``gpus_per_cell`` of them). Returns the number of workers (cells trained at once).

    Each process trains with its own data loading, so more processes than CPU cores only make
    every one of them slower (and a typo such as --workers 100000 would start that many).
    """
    if devices:
        for d in devices:
            check_device(d, "--devices")
    else:
        check_device(device)
    if gpus_per_cell > 1 and not devices and device != "cpu":
        import torch
        if device.startswith("cuda") or torch.cuda.is_available():  # every rank would share one GPU
            raise AblateError(f"--gpus-per-cell: {gpus_per_cell} processes per cell need a GPU each: list them with "
                              f"--devices (allowed: e.g. --devices 0,1 --gpus-per-cell 2, or --device cpu for CPU "
                              "processes)")
    if devices and len(devices) % gpus_per_cell:
        raise AblateError(f"--gpus-per-cell: {gpus_per_cell} does not divide the {len(devices)} GPUs of --devices "
                          f"(allowed: a divisor of {len(devices)})")
    count = len(devices) // gpus_per_cell if devices else workers
    processes, cap = count * gpus_per_cell, usable_cpus()
    if processes > cap and gpus_per_cell == 1:
        option = "--devices" if devices else "--workers"
        raise AblateError(f"{option}: {count} workers, more than the {cap} CPU cores this process may use "
                          f"(allowed: 1 to {cap} workers)")
    if processes > cap:
        raise AblateError(f"--gpus-per-cell: {processes} training processes, more than the {cap} CPU cores this "
                          f"process may use (allowed: 1 to {cap} processes, workers x --gpus-per-cell)")
    return count


def check_batches(spec, gpus_per_cell: int) -> None:
    """Before anything runs: every cell's batch divides over ``gpus_per_cell`` processes (and its
    micro-batch), and its training split holds at least one batch (an epoch of no step would train
    nothing and record chance accuracy as a finished result)."""
    from ablate.plan import dataset_sizes
    configs = [c.config for c in spec.cells()] if spec.search is None else [spec.base]
    for cfg in configs:
        t = cfg.train
        micro = t.micro_batch if isinstance(t.micro_batch, int) else 1
        if t.batch_size % (gpus_per_cell * micro):
            what = f"{gpus_per_cell} processes x micro_batch {micro}" if micro > 1 else f"{gpus_per_cell} processes"
            raise AblateError(f"{spec.path}: train.batch_size: {t.batch_size} does not divide over --gpus-per-cell "
                              f"{what} (allowed: a multiple of {gpus_per_cell * micro})")
        sizes = dataset_sizes(cfg.data)
        if sizes is not None and t.batch_size > sizes[0]:
            raise AblateError(f"{spec.path}: train.batch_size: {t.batch_size} is larger than the {sizes[0]} training "
                              f"images of {cfg.data.name}: an epoch would train nothing (allowed: at most {sizes[0]})")


def _run_under_parent(target: Callable[[Context], None], ctx: Context, workers: int, devices: list[str],
                      outcome: Callable[[], str] = lambda: "FINISHED") -> None:
    """Run the workers and end the parent run once: ``outcome()`` (FINISHED or FAILED) when they
    return, KILLED when interrupted (Ctrl-C or SIGTERM), FAILED when this process crashes."""
    from ablate import tracking
    from ablate.lifecycle import sigterm_as_interrupt
    status = "FAILED"
    try:
        with sigterm_as_interrupt():
            _run_workers(target, ctx, workers, devices)
        status = outcome()
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.finish_run(ctx.parent_run_id, status)


def _close_gone_parents(experiment_id: str) -> None:
    from ablate import tracking
    closed = tracking.close_gone_parents(experiment_id)
    if closed:
        print(f"marked {len(closed)} parent run(s) KILLED: their ablate process on this machine is gone", flush=True)


def _checkpoints_ours(option: Optional[str]) -> bool:
    """Whether the checkpoint root is ablate's own default (./checkpoints), not a folder a user named."""
    return not option and not os.environ.get("ABLATE_CHECKPOINTS")


def _remove_empty_checkpoints(root: str, spec, with_root: bool) -> None:
    """The spec's checkpoint folder where nothing is left in it, and the root too when ``with_root``
    (ours, or made by this run)."""
    from ablate.checkpoint import remove_empty
    remove_empty(Path(root) / spec.slug, Path(root), remove_root=with_root)


@dataclass
class Summary:
    total: int
    complete: int
    failed: list[tuple[str, str]]  # (cell description, reason)
    pending: int

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending


def _prepare(spec_path: str, spec_args: SpecArgs, kind: str, device: str, devices: Optional[list[str]],
             workers: int, storage: Optional[str], gpus_per_cell: int = 1, checkpoints: Optional[str] = None):
    """What ``run`` and ``search`` check before anything is written: the spec (of this ``kind``),
    the devices and workers, and both stores. Returns (spec, devices, workers, ledger URL)."""
    from ablate.ledger import storage_url
    from ablate.quiet import quiet_known_noise
    from ablate.stores import check_stores

    quiet_known_noise()
    spec = spec_args.load(spec_path)  # raises SpecError before anything is written
    if kind == "grid" and spec.search is not None:
        raise AblateError(f"{spec_path}: search: this spec describes a search (allowed: `ablate search {spec_path}`)")
    if kind == "search" and spec.search is None:
        raise AblateError(f"{spec_path}: search: this spec has no search section (allowed: `ablate run {spec_path}` for a grid)")
    devices = devices or []
    if gpus_per_cell < 1:
        raise AblateError(f"--gpus-per-cell: {gpus_per_cell} (allowed: a positive integer)")
    workers = _worker_count(device, devices, workers, gpus_per_cell)
    check_batches(spec, gpus_per_cell)
    from ablate.cell_group import dist_timeout
    from ablate.devices import peak_from_setting
    peak_from_setting()  # ABLATE_PEAK_TFLOPS and ABLATE_DIST_TIMEOUT, if set, are numbers: refused now, not in a cell
    dist_timeout()
    checkpoint.check_root(checkpoint_root(checkpoints), "--checkpoints" if checkpoints else
                          "ABLATE_CHECKPOINTS" if os.environ.get("ABLATE_CHECKPOINTS") else "checkpoint folder")
    url = storage_url(storage)
    check_stores(url)  # both stores usable, before either is written
    return spec, devices, workers, url


def run_grid(spec_path: str, *, workers: int = 1, storage: Optional[str] = None, device: str = "auto",
             devices: Optional[list[str]] = None, checkpoints: Optional[str] = None,
             progress: Optional[bool] = None, spec_args: SpecArgs = SpecArgs(), gpus_per_cell: int = 1) -> Summary:
    """``ablate run``: every cell of the spec's grid trained once, recorded in MLflow."""
    from ablate import tracking

    spec, devices, workers, url = _prepare(spec_path, spec_args, "grid", device, devices, workers, storage,
                                           gpus_per_cell, checkpoints)
    cells = spec.cells()
    ledger = _open_ledger(spec, url)
    enqueued, done = ledger.enqueue_cells(sorted(cells, key=_estimated_cost, reverse=True))
    keys = {c.key for c in cells}
    counts = ledger.counts(keys)
    resume = _to_resume(ledger, keys)
    queue = f"{done} already finished, " + (f"{resume} to resume, " if resume else "") + \
        f"{max(0, counts['WAITING'] - resume)} queued" + (f", {counts['RUNNING']} running elsewhere" if counts["RUNNING"] else "")
    experiment_id = tracking.ensure_experiment(spec.name, spec)
    _close_gone_parents(experiment_id)
    print(f"{spec.name}{_overrides_note(spec)}: {len(cells)} cells, {queue}; "
          f"ledger {display_url(url)}; MLflow {display_url(tracking.tracking_uri())}", flush=True)
    root = checkpoint_root(checkpoints)
    with_root = _checkpoints_ours(checkpoints) or not Path(root).exists()
    if not counts["WAITING"] and not counts["RUNNING"]:  # nothing to train: no parent run for it
        _remove_empty_checkpoints(root, spec, with_root)
        return summarize_grid(spec, ledger)
    parent = tracking.start_parent(experiment_id, "grid", str(spec_path), tags=spec_tags(spec))
    ctx = Context(spec_path=str(spec_path), storage=url, experiment_id=experiment_id, parent_run_id=parent,
                  checkpoints=root, device=device, progress=progress, workers=workers, spec_args=spec_args,
                  gpus_per_cell=gpus_per_cell)
    _run_under_parent(grid_worker, ctx, workers, devices,
                      outcome=lambda: "FINISHED" if summarize_grid(spec, ledger).ok else "FAILED")
    summary = summarize_grid(spec, ledger)
    if not summary.pending:
        _remove_empty_checkpoints(root, spec, with_root)
    return summary


def _to_resume(ledger, keys: set[str]) -> int:
    """Cells of ``keys`` waiting as the retry of an interrupted run (a dead worker's trial), not as new work."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState
    return len({t.user_attrs.get(names.CELL_KEY) for t in ledger.trials(states=(TrialState.WAITING,))
                if t.user_attrs.get(names.CELL_KEY) in keys and RetryHeartbeatStaleTrialCallback.retry_history(t)})


def summarize_grid(spec, ledger) -> Summary:
    from optuna.trial import TrialState
    by_key: dict[str, list] = {}
    for t in ledger.trials():
        key = t.user_attrs.get(names.CELL_KEY)
        if key and names.DUPLICATE not in t.user_attrs:
            by_key.setdefault(key, []).append(t)
    complete, failed, pending = 0, [], 0
    for cell in spec.cells():
        trials = by_key.get(cell.key, [])
        states = {t.state for t in trials}
        if TrialState.COMPLETE in states:
            complete += 1
        elif states & {TrialState.WAITING, TrialState.RUNNING} or not trials:
            pending += 1
        else:
            last = max(trials, key=lambda t: t.number)
            desc = ", ".join(f"{k}={_short(v)}" for k, v in cell.values.items()) or cell.key
            failed.append((desc, last.user_attrs.get(names.FAILURE, "unknown")))
    return Summary(total=len(spec.cells()), complete=complete, failed=failed, pending=pending)


def run_search(spec_path: str, *, trials: Optional[int] = None, workers: int = 1, storage: Optional[str] = None,
               device: str = "auto", devices: Optional[list[str]] = None, checkpoints: Optional[str] = None,
               progress: Optional[bool] = None, spec_args: SpecArgs = SpecArgs(),
               gpus_per_cell: int = 1) -> dict[str, int]:
    """``ablate search``: continue the spec's study until it holds ``trials`` finished trials."""
    from ablate import tracking
    from ablate.search import counted_trials

    if trials is not None and trials < 1:
        raise AblateError(f"--trials: {trials} (allowed: a positive integer)")
    spec, devices, workers, url = _prepare(spec_path, spec_args, "search", device, devices, workers, storage,
                                           gpus_per_cell, checkpoints)
    target = trials or spec.search.trials
    ledger = _open_ledger(spec, url)
    ledger.recover_dead()
    finished, running, waiting = counted_trials(ledger)
    if finished >= target and not running and not waiting:
        asked = f"--trials {target}" if trials else f"the {target} of the spec's search.trials"
        print(f"{spec.name}: the study already has {finished} finished trials"
              f"{', more than' if finished > target else ', as many as'} {asked}: nothing to do", flush=True)
        _remove_empty_checkpoints(checkpoint_root(checkpoints), spec, _checkpoints_ours(checkpoints))
        return ledger.counts()
    experiment_id = tracking.ensure_experiment(spec.name, spec)
    _close_gone_parents(experiment_id)
    root = checkpoint_root(checkpoints)
    with_root = _checkpoints_ours(checkpoints) or not Path(root).exists()
    parent = tracking.start_parent(experiment_id, "search", str(spec_path), tags=spec_tags(spec))
    resume = f", {waiting} to resume" if waiting else ""  # a search waits only on retries of interrupted trials
    print(f"{spec.name}{_overrides_note(spec)}: {finished} trials finished of {target}{resume}; "
          f"sampler {spec.search.sampler}; "
          f"ledger {display_url(url)}; MLflow {display_url(tracking.tracking_uri())}", flush=True)
    ctx = Context(spec_path=str(spec_path), storage=url, experiment_id=experiment_id, parent_run_id=parent,
                  checkpoints=root, device=device, progress=progress, trials=target,
                  workers=workers, spec_args=spec_args, gpus_per_cell=gpus_per_cell)
    _run_under_parent(search_worker, ctx, workers, devices)
    _, running, waiting = counted_trials(ledger)
    if not running and not waiting:
        _remove_empty_checkpoints(root, spec, with_root)
    return ledger.counts()
