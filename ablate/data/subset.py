"""The fixed subset of a training split on which ``train_top1`` is measured (``train.eval_train_images``).

After every epoch a cell evaluates its model on these training images exactly as it evaluates
the validation split (eval mode, the validation transform, no augmentation), so that the train -
val gap says how far the model fits the images it learns from better than new ones. The subset
depends on the split alone, never on a cell's seed or epoch: every epoch and every cell of a
dataset are measured on the same images, and their gaps compare. It is ``limit`` evenly spaced
positions of the split's fixed order (image-folder splits are sorted by class, so the subset
keeps the classes' proportions), or the whole split when it is no larger.
"""
from __future__ import annotations

from typing import Optional

import torch


def fixed_subset(n: int, limit: int) -> Optional[torch.Tensor]:
    """Positions (int64, ascending, distinct) of the ``limit`` training images out of ``n`` that
    are evaluated after every epoch; ``None`` when there are none (``limit`` 0: measuring is off)."""
    if limit <= 0 or n <= 0:
        return None
    if limit >= n:
        return torch.arange(n)
    return torch.arange(limit) * n // limit  # steps of n / limit > 1: distinct positions
