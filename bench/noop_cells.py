"""``ablate`` with every cell's training replaced by one that finishes at once: what is left is
the orchestration (claiming, recording, MLflow runs, heartbeats) that bench/orchestration.py
measures.

Usage is the CLI's: ``python bench/noop_cells.py run SPEC --workers 8``. The swap happens at
import time of this file, which the spawned worker processes import again as their main module
(multiprocessing's ``spawn``), so it reaches every worker; nothing in a spec or in ``ablate``
itself can select it.
"""
from __future__ import annotations

import ablate.execute


def _noop_train_cell(cfg, *, on_epoch=None, on_start=None, before_write=None, **_) -> dict[str, float]:
    """One epoch's record, as train_cell returns it, without touching data or a model."""
    if before_write is not None:
        before_write()
    return {"val_top1": 50.0, "val_top5": 90.0, "val_loss": 1.0, "train_seconds": 0.0,
            "images_per_second": 0.0, "epochs": 1}


def _no_latency(spec, cfg, device, run) -> dict:
    return {}


ablate.execute.train_cell = _noop_train_cell
ablate.execute.measure_objectives = _no_latency

if __name__ == "__main__":
    from ablate.cli import main
    main()
