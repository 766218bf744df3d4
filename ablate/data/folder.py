"""The plain image-folder loader: PIL decoding in DataLoader processes, timm's transforms.

Every image is decoded with PIL in ``data.workers`` DataLoader processes and transformed by
timm's transforms (:mod:`ablate.data.transforms`). It is the fallback of the uint8 cache
(:mod:`ablate.data.cache`) and the reference the cache path is measured against. Which
files a split holds is :mod:`ablate.data.scan`'s business.

Bad files never stop an epoch; bugs always do:

* a file without an image extension inside a class folder is skipped at scan time, and an
  image PIL cannot decode (truncated, not really a JPEG, ...) is skipped when it is read: the
  dataset returns no image for it, the collate function drops it, and the main process logs
  it once and counts it (``Loaders.skipped``);
* an exception raised while *transforming* a decoded image is a bug in the augmentation,
  not a bad file: it stops the epoch as an :class:`AugmentationError` naming the image (with
  the worker's traceback attached as a note), so the cell fails with that reason.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from PIL import Image

from ablate.data.scan import FolderSplit
from ablate.data.seeding import derive_seed, epoch_permutation, seeded_global_rngs
from ablate.devices import usable_cpus


class AugmentationError(RuntimeError):
    """An augmentation raised on a decodable image: a bug to fix, never a corrupt image."""


@dataclass(frozen=True)
class Undecodable:
    path: str
    reason: str


@dataclass(frozen=True)
class TransformFailed:
    path: str
    error: str
    traceback: str


def usable_workers(requested: int) -> int:
    """``data.workers`` capped at :func:`usable_cpus`.

    More decoding processes than cores only take turns on the same cores (and with the
    training loop); DataLoader warns about exactly that. The cap keeps a spec written for a
    big machine quiet and efficient on a small one.
    """
    return min(requested, usable_cpus())


def _decode(path: str):
    with Image.open(path) as im:
        return im.convert("RGB")  # forces the full decode: truncated files fail here


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes one image with PIL and applies ``transform`` under a per-sample seed.

    Indexed by ``(index, seed)`` pairs from :class:`EpochSampler`, so the augmentation of an
    image depends on (run seed, epoch, image) only, whatever the worker count. Returns
    ``(tensor, label, None)``, or ``(None, label, Undecodable | TransformFailed)``: failures
    travel to the main process as data, where :class:`FolderBatches` skips or raises.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        path, label = self.samples[index]
        try:
            image = _decode(path)
        except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
            return None, label, Undecodable(path, f"{type(e).__name__}: {e}")
        try:
            with seeded_global_rngs(seed):  # timm's transforms draw from the global RNGs
                return self.transform(image), label, None
        except Exception as e:  # noqa: BLE001 - re-raised in the main process, see FolderBatches
            return None, label, TransformFailed(path, f"{type(e).__name__}: {e}", traceback.format_exc())


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, per-sample seed)``; shuffled from (seed, epoch) when ``shuffle``.

    Training (``shuffle``): whole global batches of ``batch`` images, each cut to this rank's
    positions when a ``split`` is set (:class:`ablate.batching.BatchSplit`); the seed belongs to
    the image, so its augmentation is the same whichever rank and micro-batch trains it.
    Evaluation: this rank's contiguous share of the images, each image once over the ranks.
    """

    def __init__(self, n: int, seed: int, shuffle: bool, batch: int = 1, processes: int = 1, rank: int = 0):
        self.n, self.seed, self.shuffle, self.epoch, self.batch = n, seed, shuffle, 0, batch
        self.processes, self.rank, self.split = processes, rank, None

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n * self.rank // self.processes, self.n * (self.rank + 1) // self.processes))
        order = epoch_permutation(self.n, self.seed, self.epoch)
        full = self.n // self.batch * self.batch
        positions = self.split.positions() if self.split is not None else None
        if positions is None:
            return order[:full].tolist()
        return order[:full].view(-1, self.batch)[:, positions].reshape(-1).tolist()

    def __len__(self) -> int:
        return len(self._indices()) if not self.shuffle else self.n // self.batch * self.batch // self.processes

    def __iter__(self):
        epoch = self.epoch if self.shuffle else 0
        for i in self._indices():
            yield i, derive_seed(self.seed, epoch, i)


def collate_skipping(batch):
    """Stack the transformed images; pass the failures of the others on to the main process."""
    good = [(x, y) for x, y, failure in batch if failure is None]
    failures = [failure for _, _, failure in batch if failure is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), failures
    images, targets = zip(*good)
    return torch.stack(images), torch.tensor(targets, dtype=torch.long), failures


def _leave_stopping_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGUSR2. Slurm signals every process of a task
    (scancel, preemption, the time-limit warning), and a forked worker inherits the trainer's
    Python handlers: each worker would also checkpoint and requeue the job (submitit's USR2
    handler) or die and make the trainer raise "DataLoader worker killed" mid-epoch. The trainer
    alone acts on them and shuts its workers down; a worker left behind exits with its parent.

    Nor does a worker print the trainer leaving in the middle of a batch's hand-over (see
    :func:`_handover_cut_short`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    sys.excepthook = _unless_handover_cut_short(sys.excepthook)


def _handover_cut_short(exc_type, tb) -> bool:
    """A connection error in multiprocessing's resource sharer: the thread through which a worker
    hands a batch's file descriptors to the trainer, which hung up mid-way. The trainer's side of
    that hand-over reports any real failure; in the worker it only means the trainer has left
    (a requeue, a stop), and Python would print it as a traceback in the task's log."""
    if not issubclass(exc_type, (ConnectionError, EOFError)):
        return False
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
            return True
        tb = tb.tb_next
    return False


def _unless_handover_cut_short(hook):
    def excepthook(exc_type, exc, tb):
        if not _handover_cut_short(exc_type, tb):
            hook(exc_type, exc, tb)
    return excepthook


class FolderBatches:
    """A DataLoader over one split that skips (and logs once, and counts) unreadable images
    and stops at the first augmentation failure.

    In training a batch that lost images is cut to an even size, because batch Mixup/CutMix
    pairs each image with the flipped batch. ``workers`` is used as given (see
    :func:`usable_workers` for the cap the loaders apply).
    """

    def __init__(self, split: FolderSplit, transform: Callable, *, batch_size: int, train: bool, seed: int,
                 workers: int, device: torch.device, log: Callable[[str], None] = print,
                 processes: int = 1, rank: int = 0):
        self.folder, self.train, self.log = split, train, log
        self.sampler = EpochSampler(len(split.samples), seed, shuffle=train, batch=batch_size,
                                    processes=processes, rank=rank)
        self.loader = torch.utils.data.DataLoader(
            ImageFileDataset(split.samples, transform), batch_size=batch_size // processes if train else batch_size,
            sampler=self.sampler,
            num_workers=workers, collate_fn=collate_skipping, drop_last=train,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=_leave_stopping_to_the_trainer,
            # evaluation draws nothing from torch's global generator (an iterator's base seed comes
            # from it unless the loader has its own): evaluating between epochs changes no training
            generator=None if train else torch.Generator())
        self.skipped_paths: set[str] = set()
        for path, reason in split.skipped:
            self._skip(path, reason)

    def _skip(self, path: str, reason: str) -> None:
        if path not in self.skipped_paths:
            self.skipped_paths.add(path)
            self.log(f"data: skipped {path}: {reason}")

    @property
    def split(self):
        return self.sampler.split

    @split.setter
    def split(self, value) -> None:
        self.sampler.split = value

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets, failures in self.loader:
            for failure in failures:
                if isinstance(failure, TransformFailed):
                    error = AugmentationError(f"augmentation failed on {failure.path}: {failure.error.splitlines()[0]} "
                                              "(a bug in the transform, not a bad image)")
                    error.add_note(f"in the data loader:\n{failure.traceback}")
                    raise error
                self._skip(failure.path, failure.reason)
            if failures and self.train and len(targets) % 2:
                images, targets = images[:-1], targets[:-1]
            if len(targets):
                yield images, targets
