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


class SyntheticTrainSubset:
    """The first ``limit`` training images of epoch 0, in order, evaluated like the validation split.

    A synthetic training split is drawn anew every epoch from (seed, epoch, batch): its first
    epoch stands for it, so ``train_top1`` says how well the model fits images it has trained on.
    Each batch is drawn whole, as training drew it, and cut to the images kept; the ranks take
    contiguous shares, each image once over them.
    """

    def __init__(self, n_train: int, limit: int, num_classes: int, shape: tuple[int, int, int], *,
                 batch_size: int, seed: int, device: torch.device, processes: int = 1, rank: int = 0):
        self.n = min(limit, n_train // batch_size * batch_size)  # the images epoch 0 trains on
        self.num_classes, self.shape = num_classes, shape
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.skipped_paths: set[str] = set()
        self.share = (self.n * rank // processes, self.n * (rank + 1) // processes)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        lo, hi = self.share
        for b in range(len(self)):
            first = b * self.batch_size
            size = min(self.batch_size, self.n - first)
            if first + size <= lo or first >= hi:
                continue  # another rank's share
            g = generator(self.seed, 1, 0, b, device=self.device)  # SyntheticBatches' training draws, epoch 0
            images = torch.randn((self.batch_size, *self.shape), generator=g, device=self.device)
            targets = torch.randint(self.num_classes, (self.batch_size,), generator=g, device=self.device)
            keep = slice(max(lo - first, 0), min(hi - first, size))
            yield images[keep], targets[keep]
