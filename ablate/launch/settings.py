"""Slurm settings: a cluster profile that a lab writes once, and ``--slurm KEY=VALUE`` on top.

A profile is a small YAML mapping with the same keys as ``--slurm``::

    partition: gpu
    account: vision-lab
    time: 24:00:00            # per task; a task that reaches it is requeued and resumes
    gpus_per_task: 1
    cpus_per_task: 8
    mem: 64G
    setup: [module load cuda/12.4, source /shared/envs/ablate/bin/activate]
    sbatch: [--mail-type=FAIL]
    logs: /shared/ablate/slurm-logs

``--slurm`` values win over the profile's; the list keys (``sbatch``, ``setup``) add to it.
Every problem (an unknown key, a value Slurm would not take) is found here, before anything is
written or submitted, and reported as one line each.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ablate.errors import SpecError

PROFILE_ENV = "ABLATE_SLURM_PROFILE"

#: key -> what it sets (the allowed keys, in the order `ablate run --help` and errors list them)
KEYS = {
    "partition": "partition to submit to (sbatch --partition; default: the cluster's default)",
    "account": "account to charge (sbatch --account)",
    "qos": "quality of service (sbatch --qos)",
    "time": "time limit per task: minutes, HH:MM:SS or D-HH:MM:SS (default: the partition's); "
            "a task that reaches it is requeued and resumes",
    "gpus_per_task": "GPUs per array task, N or TYPE:N (sbatch --gres=gpu:...); a task with N > 1 "
                     "runs N workers, one per GPU (with --gpus-per-cell: the GPUs per node of one cell)",
    "nodes": "nodes per array task with --gpus-per-cell: one cell's processes spread over them "
             "(--gpus-per-cell / nodes per node; default 1)",
    "cpus_per_task": "CPU cores per array task (sbatch --cpus-per-task); also the worker's torch threads",
    "mem": "memory per task, e.g. 64G (sbatch --mem)",
    "constraint": "node features to require (sbatch --constraint)",
    "nodelist": "nodes to run on (sbatch --nodelist); one node allows SQLite stores",
    "exclude": "nodes to avoid (sbatch --exclude)",
    "max_running": "at most this many tasks running at once (the array's %N throttle)",
    "sbatch": "an extra sbatch option, e.g. --mail-type=FAIL (a list in a profile; repeatable)",
    "setup": "a shell line the job runs before the worker, e.g. module load cuda (a list in a profile; repeatable)",
    "logs": "folder for the tasks' logs, on storage every node sees (default: ./slurm-logs)",
}
LIST_KEYS = ("sbatch", "setup")
#: sbatch options ablate sets itself (the array, its logs, the requeue signal, one process per task)
#: or that have their own key above
RESERVED_SBATCH = {
    "array": "ablate submits the array (--workers N tasks)",
    "output": "the logs go to the logs folder (allowed: logs=DIR)",
    "error": "the logs go to the logs folder (allowed: logs=DIR)",
    "open-mode": "ablate appends, so a requeued task keeps its earlier log",
    "signal": "ablate asks for USR2 before the time limit, to requeue the task",
    "export": "tasks need the submitting environment (the store URLs travel in it)",
    "nodes": "it has its own key (allowed: nodes=N, with --gpus-per-cell)",
    "ntasks": "each array task is one worker, or with --gpus-per-cell one process per GPU of a cell",
    "ntasks-per-node": "each array task is one worker, or with --gpus-per-cell one process per GPU of a cell",
    "wrap": "ablate writes the batch script",
    **{k.replace("_", "-"): f"it has its own key (allowed: {k}=...)" for k in
       ("partition", "account", "qos", "time", "cpus_per_task", "mem", "constraint", "nodelist", "exclude")},
    "gres": "GPUs have their own key (allowed: gpus_per_task=N)",
    "gpus-per-task": "it has its own key (allowed: gpus_per_task=N)",
    "gpus": "it has its own key (allowed: gpus_per_task=N)",
}

_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_GPUS = re.compile(r"^(?:(?P<type>[A-Za-z0-9_.-]+):)?(?P<count>\d+)$")


@dataclass
class SlurmSettings:
    """What one Slurm launch asks for. ``time`` is in minutes (None: the partition's default)."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[int] = None
    gpus_per_task: int = 0
    gpu_type: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    constraint: Optional[str] = None
    nodelist: Optional[str] = None
    exclude: Optional[str] = None
    max_running: Optional[int] = None
    nodes: int = 1
    sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    logs: str = "slurm-logs"

    def sbatch_options(self) -> dict[str, Any]:
        """The extra sbatch options as submitit's ``additional_parameters`` (name -> value or True)."""
        out: dict[str, Any] = {}
        for line in self.sbatch:
            name, eq, value = line[2:].partition("=")
            out[name] = value if eq else True
        return out


def load_settings(assignments: Sequence[str] = (), profile: Optional[str] = None) -> SlurmSettings:
    """Settings from ``profile`` (or ``$ABLATE_SLURM_PROFILE``), then ``assignments`` (KEY=VALUE).

    Raises :class:`~ablate.errors.SpecError` with one line per problem.
    """
    problems: list[str] = []
    raw: dict[str, Any] = {}
    lists: dict[str, list] = {k: [] for k in LIST_KEYS}
    profile = profile or os.environ.get(PROFILE_ENV) or None
    if profile:
        for where, key, value in _read_profile(profile, problems):
            _take(where, key, value, raw, lists, problems)
    for item in assignments:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            problems.append(f"--slurm: {item!r}: not KEY=VALUE (allowed keys: {', '.join(KEYS)})")
            continue
        _take("--slurm", key.strip(), value.strip(), raw, lists, problems)
    settings = SlurmSettings()
    for key, value in raw.items():
        where, value = value
        _set(settings, where, key, value, problems)
    for key, items in lists.items():
        for where, value in items:
            _append(settings, where, key, value, problems)
    if problems:
        raise SpecError(problems)
    return settings


def _read_profile(path: str, problems: list[str]):
    """(``file:line``, key, value) for each entry of a profile file."""
    shown = path
    try:
        text = Path(path).read_text()
    except OSError as e:
        problems.append(f"{shown}: cannot read the Slurm profile ({e.strerror or e})")
        return
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problems.append(f"{shown}{line}: not YAML ({getattr(e, 'problem', None) or e})")
        return
    if node is None:
        return
    if not isinstance(node, yaml.MappingNode):
        problems.append(f"{shown}:{node.start_mark.line + 1}: a Slurm profile is a mapping of KEY: VALUE "
                        f"(allowed keys: {', '.join(KEYS)})")
        return
    for key_node, value_node in node.value:
        where = f"{shown}:{key_node.start_mark.line + 1}"
        yield where, str(key_node.value), _scalar_text(value_node)


def _scalar_text(node: yaml.Node) -> Any:
    """The text of a scalar as written (YAML 1.1 would read ``24:00:00`` as the integer 86400),
    a list of those for a sequence, a dict for a mapping (always refused)."""
    if isinstance(node, yaml.ScalarNode):
        return node.value
    if isinstance(node, yaml.SequenceNode):
        return [_scalar_text(n) for n in node.value]
    return {}


def _take(where: str, key: str, value: Any, raw: dict, lists: dict, problems: list[str]) -> None:
    name = key.replace("-", "_")
    if name not in KEYS:
        close = difflib.get_close_matches(name, list(KEYS), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"{where}: {key}: unknown Slurm setting{hint} (allowed: {', '.join(KEYS)})")
    elif name in LIST_KEYS:
        for v in value if isinstance(value, list) else [value]:
            lists[name].append((where, v))
    else:
        raw[name] = (where, value)  # later (--slurm) wins over earlier (the profile)


def _set(settings: SlurmSettings, where: str, key: str, value: Any, problems: list[str]) -> None:
    def bad(allowed: str) -> None:
        problems.append(f"{where}: {key}: {value!r} (allowed: {allowed})")

    if value is None or isinstance(value, (list, dict)):
        return bad("one value")
    text = str(value).strip()
    if key == "time":
        minutes = parse_time(text)
        if minutes is None:
            return bad("minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, more than zero")
        settings.time = minutes
    elif key == "gpus_per_task":
        m = _GPUS.match(text)
        if not m:
            return bad("a number of GPUs, or TYPE:N such as a100:1")
        settings.gpus_per_task, settings.gpu_type = int(m["count"]), m["type"]
    elif key in ("cpus_per_task", "max_running", "nodes"):
        if not text.isdigit() or int(text) < 1:
            return bad("a positive integer")
        setattr(settings, key, int(text))
    elif key == "mem":
        if not _MEM.match(text):
            return bad("a size such as 64G, 500M or 0 for all of a node's memory")
        settings.mem = text.upper()
    elif key == "logs":
        if not text:
            return bad("a folder")
        settings.logs = text
    elif not text or any(c.isspace() for c in text):
        return bad("a Slurm name or list, without spaces")
    else:
        setattr(settings, key, text)


def _append(settings: SlurmSettings, where: str, key: str, value: Any, problems: list[str]) -> None:
    text = "" if value is None else str(value).strip()
    if key == "setup":
        if not text or isinstance(value, (list, dict)):
            problems.append(f"{where}: setup: {value!r} (allowed: one shell line)")
        else:
            settings.setup.append(text)
        return
    name = text[2:].partition("=")[0]
    if not text.startswith("--") or not name or isinstance(value, (list, dict)):
        problems.append(f"{where}: sbatch: {value!r} (allowed: one long sbatch option, --NAME or --NAME=VALUE)")
    elif name in RESERVED_SBATCH:
        problems.append(f"{where}: sbatch: --{name}: {RESERVED_SBATCH[name]}")
    else:
        settings.sbatch.append(text)


def parse_time(text: str) -> Optional[int]:
    """A Slurm time limit in minutes, rounded up; None if ``text`` is not one (or is zero)."""
    m = _TIME.match(text.strip())
    if not m:
        return None
    days = int(m["days"] or 0)
    a, b, c = (int(x) if x is not None else None for x in (m["a"], m["b"], m["c"]))
    if m["days"] is not None:   # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:         # HH:MM:SS
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:         # MM:SS
        seconds = a * 60 + b
    else:                       # MM
        seconds = a * 60
    return -(-seconds // 60) if seconds > 0 else None
