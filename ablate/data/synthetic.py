"""Random tensors of the right shape: for measuring model throughput without any decoding."""
from __future__ import annotations

from typing import Iterator

import torch

from ablate.batching import select
from ablate.data.seeding import generator


class SyntheticBatches:
    """``n`` standard-normal images ``(C, H, W)`` with uniform labels, made on ``device``.

    Batch ``b`` of epoch ``e`` is a function of (seed, split, e, b) only (the validation
    split ignores the epoch). ``train`` drops the last incomplete batch.
    """

    def __init__(self, n: int, num_classes: int, shape: tuple[int, int, int], *, batch_size: int,
                 train: bool, seed: int, device: torch.device, processes: int = 1, rank: int = 0):
        self.n, self.num_classes, self.shape = n, num_classes, shape
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, torch.device(device)
        self.epoch = 0
        self.skipped_paths: set[str] = set()
        self.split = None  # training: a BatchSplit (Loaders.set_split); None is the whole batch
        # validation: this rank's contiguous share of the images
        self.share = (n * rank // processes, n * (rank + 1) // processes) if not train else (0, n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.train else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        part, epoch = (1, self.epoch) if self.train else (2, 0)
        positions = self.split.positions() if self.train and self.split is not None else None
        lo, hi = self.share
        for b in range(len(self)):
            first = b * self.batch_size
            size = min(self.batch_size, self.n - first)
            if first + size <= lo or first >= hi:
                continue  # another rank's share
            g = generator(self.seed, part, epoch, b, device=self.device)
            images = torch.randn((size, *self.shape), generator=g, device=self.device)
            targets = torch.randint(self.num_classes, (size,), generator=g, device=self.device)
            if not self.train:
                keep = slice(max(lo - first, 0), min(hi - first, size))
                images, targets = images[keep], targets[keep]
            yield select(images, targets, positions)
