"""Uint8 images of different sizes packed into one tensor, and small tensors' way to the device.

The cache (:mod:`ablate.data.cache`) stores a split as :class:`PackedRows`; the array loader
(:mod:`ablate.data.array_loader`) gathers a :class:`PackedBatch` from it; the batch transforms
(:mod:`ablate.data.batch_transforms`, :mod:`ablate.data.rand_augment`) crop and augment it on the
device, copying their per-image parameters there with :func:`host_to`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass
class PackedRows:
    """Uint8 images of different sizes in one tensor.

    ``pixels`` is ``(T, W, C)``: rows of a common width ``W``, image ``i`` being rows
    ``start[i]:start[i] + length[i]``. An image whose ``transposed[i]`` is set is stored
    transposed (rows are its columns): the cache stores every image with its short side
    across, so one width fits all. ``start``, ``length`` and ``transposed`` are CPU tensors;
    ``pixels`` may live on any device.
    """
    pixels: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    transposed: torch.Tensor

    def __len__(self) -> int:
        return len(self.start)

    @property
    def heights(self) -> torch.Tensor:
        """Each image's height in its own orientation."""
        return torch.where(self.transposed, self.pixels.shape[1], self.length)

    @property
    def widths(self) -> torch.Tensor:
        return torch.where(self.transposed, self.length, self.pixels.shape[1])


@dataclass
class PackedBatch(PackedRows):
    """``B`` images of different sizes, as :class:`PackedRows` lays them out: one batch."""

    @property
    def canvas(self) -> torch.Tensor:
        """The pixels as one image ``(1, C, T, W)`` (a view)."""
        return self.pixels.permute(2, 0, 1).unsqueeze(0)

    def to(self, device: torch.device, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(self.pixels.to(device, non_blocking=non_blocking), self.start, self.length, self.transposed)

    @classmethod
    def from_images(cls, images: torch.Tensor) -> "PackedBatch":
        """A batch of equal-sized images ``(B, C, H, W)``."""
        b, c, h, w = images.shape
        return cls(images.permute(0, 2, 3, 1).reshape(b * h, w, c), torch.arange(b) * h, torch.full((b,), h),
                   torch.zeros(b, dtype=torch.bool))


Images = Union[PackedBatch, torch.Tensor]


def as_packed(images: Images) -> PackedBatch:
    return images if isinstance(images, PackedBatch) else PackedBatch.from_images(images)


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor (boxes, masks) to ``device``. On CUDA through pinned memory and
    non-blocking, so the CPU never waits for the GPU to finish the previous training step."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
