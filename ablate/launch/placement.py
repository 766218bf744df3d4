"""Where the tasks of a Slurm launch may run, and stores they can all share, checked before anything is submitted.

Tasks may start on any node that the request allows. They all need the same ledger, the same
MLflow store and the same checkpoint folder; what cannot work is refused here with one line:

- a SQLite ledger or a local MLflow store (a file on this machine) when the tasks may land on
  several nodes: SQLite's locking is not safe across machines (Optuna's docs say so) and
  another node may not see the file at all;
- a relative checkpoint folder in that case: each task would resolve it on its own node, and a
  preempted cell would restart from scratch elsewhere instead of resuming.

On one node (a one-node partition, or ``nodelist`` naming one node) SQLite works, and relative
paths are made absolute so that tasks find the same files whatever their working directory.
Whether each store can be used at all is :func:`ablate.stores.check_stores`'s question.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ablate.errors import AblateError
from ablate.launch.jobs import run_slurm
from ablate.launch.settings import SlurmSettings, parse_time
from ablate.locks import sqlite_path
from ablate.urls import absolute_sqlite, display_url


@dataclass
class Placement:
    """Where the tasks of a launch may run."""
    partition: str
    nodes: list[str]
    default_time: Optional[int]   # minutes, the partition's default (None: none, or unlimited)
    max_time: Optional[int]       # minutes, the partition's limit (None: unlimited)

    @property
    def where(self) -> str:
        if len(self.nodes) == 1:
            return f"node {self.nodes[0]}"
        return f"any of the {len(self.nodes)} nodes of partition {self.partition}"


@dataclass
class Stores:
    """The stores as the tasks will reach them (absolute where they are local paths)."""
    ledger: str
    tracking: str
    checkpoints: str
    logs: str


def placement(settings: SlurmSettings) -> Placement:
    """The partition the tasks go to and the nodes they may land on, as Slurm says now."""
    rows = [line.split("|") for line in run_slurm(["sinfo", "-h", "-o", "%P|%L|%l"]).stdout.split()]
    partitions = {p.rstrip("*"): (default, limit) for p, default, limit in rows}
    if settings.partition:
        partition = settings.partition
        if partition not in partitions:
            raise AblateError(f"--slurm: partition: {partition!r} is not a partition of this cluster "
                              f"(allowed: {', '.join(sorted(partitions))})")
    else:
        defaults = [p.rstrip("*") for p, _, _ in rows if p.endswith("*")]
        if not defaults:
            raise AblateError("--slurm: partition: this cluster has no default partition "
                              f"(allowed: {', '.join(sorted(partitions))})")
        partition = defaults[0]
    if settings.nodelist:
        nodes = _hostnames(settings.nodelist)
    else:
        listed = run_slurm(["sinfo", "-h", "-N", "-p", partition, "-o", "%N"]).stdout.split()
        excluded = set(_hostnames(settings.exclude)) if settings.exclude else set()
        nodes = sorted(set(listed) - excluded)
    default, limit = partitions[partition]
    return Placement(partition, nodes, parse_time(default) if default not in ("n/a", "infinite") else None,
                     parse_time(limit) if limit not in ("n/a", "infinite") else None)


def _hostnames(nodelist: str) -> list[str]:
    return run_slurm(["scontrol", "show", "hostnames", nodelist]).stdout.split()


def check_shared_stores(ledger: str, tracking: str, checkpoints: str, logs: str, where: Placement,
                 *, ledger_option: str = "--storage") -> Stores:
    """Refuse stores the tasks could not share; return them as the tasks will use them."""
    many = len(where.nodes) > 1
    one_node = (f"or run on one node: --slurm nodelist={where.nodes[0]}" if where.nodes else "")
    if many and sqlite_path(ledger) is not None:
        raise AblateError(f"{ledger_option}: {display_url(ledger)} is a SQLite file, and the tasks may run on "
                          f"{where.where} (allowed: a database server every node reaches, e.g. "
                          f"--storage postgresql://HOST/DB, {one_node})")
    if many and _local_tracking(tracking):
        raise AblateError(f"MLFLOW_TRACKING_URI: {display_url(tracking)} is a store on this machine, and the "
                          f"tasks may run on {where.where} (allowed: an MLflow server, http://HOST:5000, or a "
                          f"database server, postgresql://HOST/DB, {one_node})")
    if many and not os.path.isabs(checkpoints):
        raise AblateError(f"--checkpoints: {checkpoints!r} is a relative path that each task would resolve on "
                          f"its own node, and the tasks may run on {where.where} (allowed: an absolute path on "
                          "storage every node mounts, e.g. --checkpoints /shared/ablate-checkpoints)")
    return Stores(ledger=_absolute_sqlite(ledger), tracking=_absolute_tracking(tracking),
                  checkpoints=os.path.abspath(checkpoints), logs=os.path.abspath(os.path.expanduser(logs)))


def _local_tracking(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _absolute_sqlite(url: str) -> str:
    return absolute_sqlite(url)


def _absolute_tracking(uri: str) -> str:
    if sqlite_path(uri) is not None:
        return _absolute_sqlite(uri)
    if "://" not in uri and not uri.startswith("file:"):
        return os.path.abspath(uri)
    return uri
