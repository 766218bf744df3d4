"""Batches from a uint8 image array held in memory (digits) or memory-mapped (the cache).

Each epoch: a permutation of the rows from (seed, epoch); per batch, a background thread
gathers the rows into one (pinned, when the target is a GPU) uint8 tensor, the batch is
copied to the device on a side CUDA stream one step ahead of use, and the batch transform
(:mod:`ablate.data.batch_transforms`) crops, flips and normalises it there. Nothing per
image runs in Python on the GPU path, which is what lets a small S²-MLP be fed at tens of
thousands of images per second.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from ablate.data.seeding import derive_seed, epoch_permutation


class ArrayBatches:
    """Iterable of ``(images float32 (B, C, H', W'), targets int64 (B,))`` on ``device``.

    ``images`` is a uint8 CPU tensor ``(N, H, W, C)`` (possibly backed by a memory map) and
    ``labels`` int64 ``(N,)``; ``rows`` restricts to the usable rows (a cache leaves the rows
    of undecodable images out). ``train`` shuffles per epoch and drops the last incomplete
    batch; evaluation keeps the order and every image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor, int], torch.Tensor],
                 *, batch_size: int, train: bool, seed: int, device: torch.device,
                 rows: Optional[torch.Tensor] = None, skipped_paths: Iterable[str] = ()):
        self.images, self.labels, self.transform = images, labels, transform
        self.rows = torch.arange(len(images)) if rows is None else rows
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, torch.device(device)
        self.epoch = 0
        self.skipped_paths = set(skipped_paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _batch_rows(self) -> list[torch.Tensor]:
        order = self.rows[epoch_permutation(len(self.rows), self.seed, self.epoch)] if self.train else self.rows
        # sorted within a batch: memory-map reads in file order (the batch is the same set)
        return [order[b * self.batch_size:(b + 1) * self.batch_size].sort().values for b in range(len(self))]

    def _gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pin = self.device.type == "cuda"
        out = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        if pin:  # a GPU machine has cores to spare: torch's parallel copy
            torch.index_select(self.images, 0, rows, out=out)
        else:  # NumPy's single-threaded copy leaves the other cores to the batch transform
            np.take(self.images.numpy(), rows.numpy(), axis=0, out=out.numpy())
        labels = self.labels[rows]
        return out, labels.pin_memory() if pin else labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        host = background((self._gather(r) for r in self._batch_rows()), depth=2)
        for b, (x, y) in enumerate(to_device(host, self.device)):
            x = x.permute(0, 3, 1, 2)  # NHWC storage -> NCHW view (channels-last strides)
            seed = derive_seed(self.seed, self.epoch if self.train else 0, b)
            yield self.transform(x, seed), y


def to_device(batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Move batches to ``device``; on CUDA the copy of batch k+1 (on a side stream) overlaps
    the work on batch k."""
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def issue(item):
        with torch.cuda.stream(stream):
            return tuple(t.to(device, non_blocking=True) for t in item)

    items = iter(batches)
    ahead = next(items, None)
    ahead = issue(ahead) if ahead is not None else None
    while ahead is not None:
        main = torch.cuda.current_stream(device)
        main.wait_stream(stream)
        current = ahead
        for t in current:
            t.record_stream(main)  # allocated on the side stream, used on the main one
        item = next(items, None)
        ahead = issue(item) if item is not None else None
        yield current


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def background(items: Iterable, depth: int = 2) -> Iterator:
    """Run the iterator ``items`` in a daemon thread, ``depth`` items ahead of the consumer.

    Exceptions reach the consumer; a consumer that stops early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))

    thread = threading.Thread(target=run, name="ablate-data-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
