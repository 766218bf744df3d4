"""How one optimizer step's batch is split over micro-batches and processes.

``train.batch_size`` is the global batch of one optimizer step. A cell trained by ``processes``
processes (ranks) with ``micro`` images per forward/backward pass makes
``accum = batch / (micro x processes)`` passes per rank and step, and sums their gradients.

Split invariance: whatever the split, every step sees the same images with the same augmentation
draws (the loaders draw per global batch, or per sample keyed by its index) and the same
Mixup/CutMix (drawn once per global batch, :func:`mixup_once_per_step`), so the gradient of a
step is the same sum in another order. timm's batch Mixup pairs image ``i`` of a batch with
image ``B-1-i`` (``x.flip(0)``); a micro-batch therefore takes its images in mirrored halves of
the global batch (:func:`shard_positions`), which keeps every pair inside one micro-batch and
in the same order as ``flip(0)`` of the whole batch would put it. The split itself is a machine
setting (what fits this GPU), left out of the cell's key.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch


def shard_positions(batch: int, shards: int, index: int) -> list[int]:
    """Positions in a global batch of ``batch`` images that shard ``index`` of ``shards`` holds.

    An even shard takes its first half from the front and its second half from the back of the
    batch, so that ``flip(0)`` of the shard pairs the images ``flip(0)`` of the batch pairs; an
    odd one (no Mixup) takes a contiguous run.
    """
    size = batch // shards
    if size % 2:
        return list(range(index * size, (index + 1) * size))
    half = size // 2
    return list(range(index * half, (index + 1) * half)) + list(range(batch - (index + 1) * half, batch - index * half))


@dataclass(frozen=True)
class BatchSplit:
    """The split of a ``batch``-image step: ``processes`` ranks, ``micro`` images per pass."""
    batch: int
    micro: int
    processes: int = 1
    rank: int = 0

    def __post_init__(self):
        if self.micro < 1 or self.batch % (self.micro * self.processes):
            raise ValueError(f"batch {self.batch} is not {self.processes} process(es) x a whole number of "
                             f"micro-batches of {self.micro}")

    @property
    def per_rank(self) -> int:
        """Images one rank trains per step."""
        return self.batch // self.processes

    @property
    def accum(self) -> int:
        """Forward/backward passes per rank and step."""
        return self.per_rank // self.micro

    def positions(self) -> Optional[torch.Tensor]:
        """The positions of the global batch this rank trains, micro-batch after micro-batch;
        None when that is the whole batch in its own order (one process, one pass)."""
        shards = self.batch // self.micro
        if shards == 1:
            return None
        mine = range(self.rank * self.accum, (self.rank + 1) * self.accum)
        return torch.tensor([p for s in mine for p in shard_positions(self.batch, shards, s)])

    def val_range(self, n: int) -> tuple[int, int]:
        """The contiguous share of ``n`` validation images this rank evaluates: each image once,
        no padding (DistributedSampler's padding would count some images twice)."""
        return n * self.rank // self.processes, n * (self.rank + 1) // self.processes

    def micro_batches(self, images: torch.Tensor, targets: torch.Tensor
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batch (already in :meth:`positions` order) as its micro-batches.

        A batch that lost images (an unreadable file) is cut into as many passes all the same.
        """
        n = images.shape[0]
        if n == self.micro or self.accum == 1:
            yield images, targets
            return
        bounds = [n * k // self.accum for k in range(self.accum + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                yield images[lo:hi], targets[lo:hi]


def select(images: torch.Tensor, targets: torch.Tensor, positions: Optional[torch.Tensor]):
    """``images[positions], targets[positions]``, or both unchanged when ``positions`` is None."""
    if positions is None:
        return images, targets
    return images[positions.to(images.device)], targets[positions.to(targets.device)]


@contextmanager
def mixup_once_per_step():
    """Mixup/CutMix drawn once per global batch, however many micro-batches call it.

    timm's ``Mixup`` draws its lambda (and CutMix box) from NumPy's global generator at every
    call. Each call made inside this block starts from the generator's state at the block's start,
    so every micro-batch (and every rank: they seed alike) gets the draws one call on the whole
    batch would get, and the generator leaves the block as one call would leave it.
    """
    start = np.random.get_state()
    after = [None]

    def call(mixup, images, targets):
        np.random.set_state(start)
        out = mixup(images, targets)
        after[0] = np.random.get_state()
        return out

    yield call
    if after[0] is not None:
        np.random.set_state(after[0])
