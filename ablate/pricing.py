"""What a cell will cost, priced from what earlier runs measured.

A cell is priced, in this order:

1. **measured**: finished runs of the same model configuration (every ``model.*`` setting, the
   precision, checkpointing and compile) on the same kind of device trained at a known rate:
   device-seconds per training image = processes / images per second (their median);
2. **FLOP model at a measured MFU**: the cell's training FLOPs (6 x MACs per training image,
   2 x MACs per validation image) at the median MFU that finished runs on that kind of device
   achieved (any configuration), against the device's dense peak (:mod:`ablate.devices`);
3. **FLOP model at ``--mfu``**: an MFU the user states;
4. otherwise not priced: nothing measured, nothing assumed.

Measurements come from the MLflow store the runs went to, read only (a store that does not exist
is not created), across every experiment in it.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Optional

from mlflow.tracking import MlflowClient

from ablate import names, tracking
from ablate.locks import sqlite_path
from ablate.stores import quiet_store_logs

#: the GPU a plan prices for when it is told nothing about the GPU and sees none (it says so)
REFERENCE_GPU = "NVIDIA H100"


def is_cpu(device: str) -> bool:
    """Whether a device name (``--gpu``, or the name a run recorded) is a CPU's."""
    return device.strip().lower().startswith("cpu")


def hours_unit(device: str) -> str:
    """What a device-hour of ``device`` is called: ``CPU-h`` for a CPU, ``GPU-h`` for a GPU,
    ``device-h`` where no kind of device is named (nothing is priced then)."""
    if not device:
        return "device-h"
    return "CPU-h" if is_cpu(device) else "GPU-h"


@dataclass
class Measured:
    """One finished cell run's throughput."""
    device: str               # the device's name (ablate.device_name), e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    config: str               # what its speed depends on (:func:`speed_key`)
    images_per_second: float  # training images per second, all processes together
    processes: int
    mfu: Optional[float]


@dataclass
class Price:
    hours: Optional[float]    # device-hours; None: not priced
    source: str               # "measured", "MFU 38%" (measured), "MFU 40% (--mfu)", or "" (not priced)
    detail: str = ""          # where the figure came from, for the JSON and the notes


@dataclass
class Pricer:
    device: str                                       # the kind of device priced for ("": none named)
    runs: list[Measured] = field(default_factory=list)
    mfu: Optional[float] = None                       # --mfu: an MFU the user states
    peak: Optional[float] = None                      # the device's dense peak FLOP/s, if known

    @property
    def unit(self) -> str:
        """``CPU-h`` or ``GPU-h``: what the plan's device-hours are hours of."""
        return hours_unit(self.device)

    def on_device(self) -> list[Measured]:
        if not self.device:  # no kind named: no run is of it
            return []
        wanted = self.device.lower()
        return [r for r in self.runs if wanted in r.device.lower()]

    def measured_mfu(self) -> tuple[Optional[float], int]:
        values = [r.mfu for r in self.on_device() if r.mfu]
        return (statistics.median(values), len(values)) if values else (None, 0)

    def price(self, cfg, macs: int, train_images: int, val_images: int) -> Price:
        """Device-hours of ``cfg`` (a CellConfig) over its epochs (see the module docstring)."""
        if not self.device:
            return Price(None, "", "no kind of device named (--gpu NAME)")
        epochs = cfg.train.epochs
        same = [r for r in self.on_device() if r.config == speed_key(cfg)]
        if same:
            per_image = statistics.median(r.processes / r.images_per_second for r in same)
            # validation: one forward pass an image, a third of a training step's work
            hours = epochs * (train_images + val_images / 3) * per_image / 3600
            return Price(hours, "measured", f"median of {len(same)} run(s) of this configuration on {self.device}")
        flops = 2 * macs * (3 * train_images + val_images) * epochs
        mfu, count = self.measured_mfu()
        if mfu and self.peak:
            return Price(flops / (self.peak * mfu) / 3600, f"MFU {mfu:.0%}",
                         f"FLOP model at the median MFU of {count} run(s) on {self.device}")
        if self.mfu and self.peak:
            return Price(flops / (self.peak * self.mfu) / 3600, f"MFU {self.mfu:.0%} (--mfu)",
                         f"FLOP model at --mfu {self.mfu:g} of {self.device}'s {self.peak / 1e12:.0f} TFLOP/s")
        return Price(None, "", f"nothing measured on {self.device} yet")


def speed_key(cfg) -> str:
    """What a training step's speed depends on, besides the device: the model, the precision,
    activation checkpointing and compile (the data and the seed do not change the step)."""
    what = {"model": cfg.model.model_dump(mode="json"), "amp": cfg.train.amp,
            "grad_checkpointing": cfg.train.grad_checkpointing, "compile": cfg.train.compile}
    return json.dumps(what, sort_keys=True)


def measured_runs(uri: Optional[str] = None) -> list[Measured]:
    """Every finished cell run with a throughput in the MLflow store at ``uri`` (default: the
    current one); nothing when there is no store (none is created)."""
    uri = uri or tracking.tracking_uri()
    path = sqlite_path(uri)
    if path is None and not uri.startswith(("http://", "https://", "postgresql", "mysql")):
        return []
    if path is not None and not os.path.exists(path):
        return []
    quiet_store_logs()
    experiments = [e.experiment_id for e in MlflowClient(uri).search_experiments()]
    out = []
    for run in tracking.all_runs(experiments, f"tags.`{names.ROLE}` = 'cell' and attributes.status = 'FINISHED'",
                                 uri=uri):
        rate, device = run.data.metrics.get(names.IMAGES_PER_SECOND), run.data.tags.get(names.DEVICE_NAME)
        if not (rate and device):
            continue
        try:  # the data section's paths are another machine's: the speed does not depend on them
            cfg = tracking.config_from_params(run.data.params, without_data=True)
        except ValueError:  # params of an older version that no longer validate
            continue
        out.append(Measured(device, speed_key(cfg), rate, int(run.data.tags.get(names.PROCESSES, "1")),
                            run.data.metrics.get(names.MFU)))
    return out
