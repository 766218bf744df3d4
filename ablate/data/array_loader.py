"""Batches from uint8 images held in memory (digits) or memory-mapped (the cache).

Each epoch: a permutation of the images from (seed, epoch); per batch, a background thread
gathers the images into one packed (pinned, when the target is a GPU) uint8 tensor, the batch is
copied to the device on a side CUDA stream one step ahead of use, and the batch transform
(:mod:`ablate.data.batch_transforms`) crops, flips and normalises it there. Nothing per
image runs in Python on the GPU path, which is what lets a small S²-MLP be fed at tens of
thousands of images per second.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional

import torch

from ablate.batching import select
from ablate.data.packed import PackedBatch, PackedRows
from ablate.data.seeding import derive_seed, epoch_permutation
from ablate.devices import usable_cpus


class PackedImages(PackedRows):
    """A whole split's images (in memory or memory-mapped), laid out as :class:`PackedRows`."""

    @classmethod
    def from_fixed(cls, images: torch.Tensor) -> "PackedImages":
        """Equal-sized images ``(N, H, W, C)`` (a view, no copy)."""
        n, h, w, c = images.shape
        return cls(images.reshape(n * h, w, c), torch.arange(n) * h, torch.full((n,), h),
                   torch.zeros(n, dtype=torch.bool))

    def gather(self, rows: torch.Tensor, *, pin: bool = False, threads: int = 1) -> PackedBatch:
        """The images ``rows`` as one packed batch (``pin``: in pinned memory, for CUDA).

        One contiguous block copy per image (8x faster than a row-indexed ``take``), split
        over ``threads`` threads (NumPy releases the GIL while it copies): a GPU machine has
        cores to spare, a CPU run keeps them for the batch transform.
        """
        start, length = self.start[rows], self.length[rows]
        out_start = torch.cumsum(length, 0) - length
        out = torch.empty((int(length.sum()), *self.pixels.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        src, dst = self.pixels.numpy(), out.numpy()
        blocks = list(zip(start.tolist(), length.tolist(), out_start.tolist()))

        def copy(part: list[tuple[int, int, int]]) -> None:
            for s, n, o in part:
                dst[o:o + n] = src[s:s + n]

        if threads > 1 and len(blocks) > threads:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(copy, [blocks[i::threads] for i in range(threads)]))
        else:
            copy(blocks)
        return PackedBatch(out, out_start, length, self.transposed[rows])


class ArrayBatches:
    """Iterable of ``(images float32 (B, C, H', W'), targets int64 (B,))`` on ``device``.

    ``images`` is :class:`PackedImages` (the cache) or a uint8 CPU tensor ``(N, H, W, C)``
    (the digits), ``labels`` int64 ``(N,)``; ``rows`` restricts to the usable rows (a cache
    leaves the rows of undecodable images out). ``train`` shuffles per epoch and drops the
    last incomplete batch; evaluation keeps the order and every image.
    """

    def __init__(self, images, labels: torch.Tensor, transform: Callable[[PackedBatch, int], torch.Tensor],
                 *, batch_size: int, train: bool, seed: int, device: torch.device,
                 rows: Optional[torch.Tensor] = None, skipped_paths: Iterable[str] = (),
                 processes: int = 1, rank: int = 0):
        self.images = images if isinstance(images, PackedImages) else PackedImages.from_fixed(images)
        self.labels, self.transform = labels, transform
        self.rows = torch.arange(len(self.images)) if rows is None else rows
        if not train:  # this rank's contiguous share: every validation image once over the ranks
            n = len(self.rows)
            self.rows = self.rows[n * rank // processes:n * (rank + 1) // processes]
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, torch.device(device)
        self.epoch = 0
        self.split = None  # training: a BatchSplit (Loaders.set_split); None is the whole batch
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

    def _gather(self, rows: torch.Tensor) -> tuple[PackedBatch, torch.Tensor]:
        pin = self.device.type == "cuda"  # pinned memory needs CUDA; the copy is the same either way
        labels = self.labels[rows]
        threads = min(8, usable_cpus()) if pin else 1
        return self.images.gather(rows, pin=pin, threads=threads), labels.pin_memory() if pin else labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # every rank augments the whole global batch (the draws belong to its positions) and keeps its share
        positions = self.split.positions() if self.train and self.split is not None else None
        host = background((self._gather(r) for r in self._batch_rows()), depth=2)
        for b, (x, y) in enumerate(to_device(host, self.device)):
            seed = derive_seed(self.seed, self.epoch if self.train else 0, b)
            yield select(self.transform(x, seed), y, positions)


def to_device(batches: Iterable[tuple[PackedBatch, torch.Tensor]], device: torch.device
              ) -> Iterator[tuple[PackedBatch, torch.Tensor]]:
    """Move ``(images, labels)`` batches to ``device`` (the images' geometry stays on the CPU,
    where the crop boxes are drawn); on CUDA the copy of batch k+1 (on a side stream) overlaps
    the work on batch k."""
    if device.type != "cuda":
        for images, labels in batches:
            yield images.to(device), labels.to(device)
        return
    stream = torch.cuda.Stream(device)

    def issue(item):
        images, labels = item
        with torch.cuda.stream(stream):
            return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    items = iter(batches)
    ahead = next(items, None)
    ahead = issue(ahead) if ahead is not None else None
    while ahead is not None:
        main = torch.cuda.current_stream(device)
        main.wait_stream(stream)
        current = ahead
        for t in (current[0].pixels, current[1]):
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

    Exceptions reach the consumer; a consumer that stops early (the generator closed) stops the
    thread and waits for it to end.
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
        # wait for the thread to leave (it finishes the item in hand, then sees the flag): a daemon
        # thread still inside a torch op when the interpreter exits aborts the process (exit 134,
        # "terminate called without an active exception") after the run has printed its summary
        stop.set()
        thread.join()
