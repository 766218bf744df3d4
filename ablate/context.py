"""What the workers of one ``ablate run`` or ``ablate search`` share, and how a worker process ends.

A :class:`Context` is built once by the command (or by a Slurm task) and handed to every worker;
it is picklable because workers are spawned processes. The exit statuses are the protocol by
which a spawned worker tells its parent why it stopped early.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ablate.checkpoint import DEFAULT_ROOT
from ablate.spec.builder import SpecArgs

#: a spawned worker's exit status when it could not write a checkpoint (sysexits' EX_TEMPFAIL:
#: run again once there is room); its parent then stops the others, which would meet it too
CHECKPOINT_STOP_EXIT = 75
#: a worker's exit status when a process of its cell's group died: its cell resumes at the next run
GROUP_BROKEN_EXIT = 76
#: a spawned worker's exit status when an error every worker would meet stopped it (a store lost for
#: good, a setting refused): its parent stops the others and ends the command with one line
ERROR_STOP_EXIT = 77
#: a spawned worker's exit status when the MLflow store refused a write for good (a full disk, a
#: read-only file): as ERROR_STOP_EXIT, and the parent writes nothing more there either
MLFLOW_REFUSED_EXIT = 78


def checkpoint_root(option: Optional[str] = None) -> str:
    """The checkpoint folder: ``--checkpoints``, else ``$ABLATE_CHECKPOINTS``, else ./checkpoints."""
    return option or os.environ.get("ABLATE_CHECKPOINTS") or DEFAULT_ROOT


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
    group: Optional[Any] = None  # its ablate.cell_group.CellGroup, joined in the worker process
    spec: Optional[Any] = None  # the command's Spec, in its own process; a spawned worker loads it again
    #: the cell keys other specs finished in the same stores (read once per invocation; empty with
    #: --no-reuse): such a cell is recorded from their run, not trained again
    reusable: frozenset = frozenset()

    def log(self, msg: str) -> None:
        print(f"{self.prefix}{msg}", flush=True)

    def load_spec(self):
        """The invocation's spec: the command's own in its process, loaded alike (same file, same
        --set) in a spawned worker or a Slurm task."""
        if self.spec is None:
            self.spec = self.spec_args.load(self.spec_path)
        return self.spec

    def __getstate__(self) -> dict:
        # a worker process loads the spec itself (a Spec holds the parsed file; it need not travel)
        return {**self.__dict__, "spec": None, "group": None}
