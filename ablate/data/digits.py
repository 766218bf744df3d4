"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale images, 10 classes.

The embedded default dataset: it ships with scikit-learn, so a grid runs on any laptop with
no download. A fixed stratified 80/20 split (``random_state=0``: 1,437 train / 360 val)
keeps every run on the same images. Pixels (0..16) are scaled to uint8 and the whole set is
held in memory; augmentation is the batched tensor pipeline of the cache path, resizing the
8x8 images to the model's ``image_size``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

VAL_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    train_images: torch.Tensor  # uint8 (N, 8, 8, 1)
    train_labels: torch.Tensor  # int64 (N,)
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: float  # of the training pixels, in 0..1 units
    std: float


@lru_cache(maxsize=1)
def load_digits_split() -> DigitsSplit:
    """The fixed stratified split, as uint8 NHWC tensors and normalisation statistics."""
    from sklearn.datasets import load_digits  # lazy: sklearn takes 1 s to import, only the digits need it
    from sklearn.model_selection import train_test_split  # lazy: as above

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    index = np.arange(len(pixels))
    train, val = train_test_split(index, test_size=VAL_FRACTION, stratify=digits.target, random_state=SPLIT_SEED)
    train, val = np.sort(train), np.sort(val)
    as_float = pixels[train].astype(np.float64) / 255
    return DigitsSplit(
        train_images=torch.from_numpy(pixels[train]), train_labels=torch.from_numpy(digits.target[train]).long(),
        val_images=torch.from_numpy(pixels[val]), val_labels=torch.from_numpy(digits.target[val]).long(),
        mean=float(as_float.mean()), std=float(as_float.std()))
