"""Silence the library messages of a run that a user can do nothing about, and only those.

Each is matched narrowly (its logger or module and its text), so that every other warning of
the same libraries still shows. Called by each process that trains or writes the stores.
"""
from __future__ import annotations

import logging
import warnings

from ablate.stores import quiet_store_logs


def _not_the_one_step_cosine(record: logging.LogRecord) -> bool:
    # timm warns when its cosine schedule has a single step, which is what a warmup as long as
    # training leaves (e.g. one epoch with warmup_epochs: 1); the schedule is as the spec asks
    return "will have no effect on the learning rate" not in record.getMessage()


def quiet_known_noise() -> None:
    quiet_store_logs()  # MLflow's "Creating initial MLflow database tables" INFO lines
    # MLflow's SQL store uses SQLAlchemy's deprecated ``noload``; only an MLflow release can change it
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated",
                            category=DeprecationWarning, module=r"mlflow\.")
    logging.getLogger("timm.scheduler.cosine_lr").addFilter(_not_the_one_step_cosine)
