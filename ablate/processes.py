"""Worker processes: one worker in this process, or several spawned ones that end with it.

:func:`run_workers` starts ``workers`` copies of a worker loop (:mod:`ablate.workers`), each with
``gpus_per_cell`` processes when a cell spans several, and waits for them. A worker that meets
an error every worker would meet exits with one of :mod:`ablate.context`'s statuses; this
process then stops the others and says why in one line.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import wait
from typing import Callable

from ablate import checkpoint, tracking
from ablate.cell_group import CellGroup, GroupBroken, free_port
from ablate.context import (CHECKPOINT_STOP_EXIT, ERROR_STOP_EXIT, GROUP_BROKEN_EXIT, MLFLOW_REFUSED_EXIT,
                            Context)
from ablate.devices import usable_cpus
from ablate.errors import AblateError
from ablate.lifecycle import die_with_parent, install_stop_handler
from ablate.locks import StoreUnwritable
from ablate.train import resolve_device
from ablate.workers import follow_cells


def run_workers(target: Callable[[Context], None], ctx: Context, workers: int, devices: list[str]) -> None:
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
                loop = target if rank == 0 else follow_cells
                p = mp_ctx.Process(target=_worker_process, args=(loop, wctx, os.getpid()),
                                   name=f"ablate-worker-{i}" + (f".{rank}" if per_cell > 1 else ""))
                p.start()
                procs.append(p)
        while (running := [p for p in procs if p.exitcode is None]) and not _stopped(procs):
            wait([p.sentinel for p in running])
    except BaseException:
        _stop_workers(procs)
        raise
    if _stopped(procs, ERROR_STOP_EXIT, MLFLOW_REFUSED_EXIT):
        _stop_workers(procs)
        if _stopped(procs, MLFLOW_REFUSED_EXIT):
            tracking.refuse_writes()  # the parent run is left to the next invocation to close
        raise AblateError(f"{', '.join(_stopped(procs, ERROR_STOP_EXIT, MLFLOW_REFUSED_EXIT))} stopped on the error "
                          "above, so every worker "
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
    bad = [p.name for p in procs
           if p.exitcode not in (0, None, GROUP_BROKEN_EXIT, ERROR_STOP_EXIT, MLFLOW_REFUSED_EXIT)]
    if bad:
        ctx.log(f"warning: worker(s) {', '.join(bad)} exited abnormally")


def _stopped_on_checkpoint(procs) -> list[str]:
    return _stopped(procs, CHECKPOINT_STOP_EXIT)


def _stopped(procs, *codes: int) -> list[str]:
    """The workers that ended on an error every worker would meet (``codes``: those exit statuses)."""
    return [p.name for p in procs
            if p.exitcode in (codes or (CHECKPOINT_STOP_EXIT, ERROR_STOP_EXIT, MLFLOW_REFUSED_EXIT))]


def _worker_process(target: Callable[[Context], None], ctx: Context, parent_pid: int) -> None:
    """A spawned worker: it dies with its parent, and leaves Ctrl-C to the parent (which stops it)."""
    die_with_parent(parent_pid)
    # a terminal's Ctrl-C reaches the whole process group; the parent alone decides, so that one
    # interrupt gives one message instead of a traceback from every worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent stops a worker with SIGTERM: leave through Python's exit (its cell stays RUNNING
    # to resume), so that what the process holds is released rather than reported leaked; taken
    # between two database statements (lifecycle.interruptible), never lost in a finalizer
    install_stop_handler(_leave)
    try:
        _work(target, ctx)
    except StoreUnwritable as e:  # a full or read-only store: said once (here or by its cell), once by its parent
        if not e.said:
            ctx.log(f"stopped: {e}")
        raise SystemExit(MLFLOW_REFUSED_EXIT if e.what == tracking.STORE else ERROR_STOP_EXIT) from None
    except AblateError as e:  # a store lost for good, a setting refused: said once here, once by the parent
        ctx.log(f"stopped: {e}")
        raise SystemExit(ERROR_STOP_EXIT) from None


def _work(target: Callable[[Context], None], ctx: Context) -> None:
    """``target`` in this worker process, in its cell's group when cells span processes."""
    if ctx.gpus_per_cell == 1:
        target(ctx)
    else:
        run_in_group(target, ctx, ctx.gpus_per_cell, ctx.address)


def run_in_group(target: Callable[[Context], None], ctx: Context, size: int, address: str) -> None:
    """``target`` as rank ``ctx.rank`` of a cell's group of ``size`` processes meeting at ``address``
    (local spawned processes, or the tasks of one Slurm job). The leader tells the others to stop
    once its worker loop ends; a process of the group that dies ends this one with
    ``GROUP_BROKEN_EXIT``, and its cell resumes at the next run."""
    ctx.group = CellGroup.join(ctx.rank, size, address, resolve_device(ctx.device))
    done = False
    try:
        target(ctx)
        if ctx.group.leader:
            ctx.group.send({"stop": True})
        done = True
    except GroupBroken as e:
        ctx.log(f"stopped: {e}; its cell resumes from its last checkpoint")
        raise SystemExit(GROUP_BROKEN_EXIT) from None
    finally:
        ctx.group.leave(done)


def _leave(signum: int) -> SystemExit:
    return SystemExit(128 + signum)


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
