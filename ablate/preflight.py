"""What ``ablate run`` and ``ablate search`` refuse before anything is written, locally or on Slurm.

Each check raises :class:`ablate.errors.AblateError` with one line naming the option or spec
field, what is wrong and what is allowed.
"""
from __future__ import annotations

import torch

from ablate import names
from ablate.devices import usable_cpus
from ablate.errors import AblateError
from ablate.plan import dataset_sizes


def check_kind(spec, spec_path: str, kind: str) -> None:
    """The spec describes what the command runs: a grid for ``run``, a search for ``search``."""
    if kind == names.GRID and spec.search is not None:
        raise AblateError(f"{spec_path}: search: this spec describes a search (allowed: `ablate search {spec_path}`)")
    if kind == names.SEARCH and spec.search is None:
        raise AblateError(f"{spec_path}: search: this spec has no search section (allowed: `ablate run {spec_path}` "
                          "for a grid)")


def check_trials(trials) -> None:
    if trials is not None and trials < 1:
        raise AblateError(f"--trials: {trials} (allowed: a positive integer)")


def check_device(name: str, option: str = "--device") -> None:
    """Refuse an unusable device before anything is written, naming the ``option`` it came from
    as it was given there (``--devices 0`` lists GPU numbers: its ``cuda:0`` is shown as ``0``)."""
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


def worker_count(device: str, devices: list[str], workers: int, gpus_per_cell: int = 1) -> int:
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
    configs = spec.configurations()  # the seeds of a configuration share its batch
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
