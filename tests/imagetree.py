"""Pictures and image-folder trees for the data tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo(seed: int, size: tuple[int, int] = (48, 36), noise: float = 0.0) -> Image.Image:
    """A smooth random picture of ``size`` (width, height), with optional fine noise: resizes
    of it are well-behaved, and every augmentation op changes it."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    if not noise:
        return coarse
    pixels = np.asarray(coarse, np.float32) + rng.normal(0, noise, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (48, 36), quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed, size).save(path, quality=quality)
    return path


def make_tree(root: Path, classes: int, per_class: int, sizes=((40, 30), (30, 40)), val_per_class: int = 1) -> Path:
    """``root/{train,val}/c<k>/<i>.JPEG``, cycling through ``sizes`` (width, height)."""
    for c in range(classes):
        for i in range(per_class):
            write_jpeg(root / "train" / f"c{c}" / f"{i}.JPEG", 1000 * c + i, sizes[i % len(sizes)])
        for i in range(val_per_class):
            write_jpeg(root / "val" / f"c{c}" / f"v{i}.JPEG", 10**6 + 1000 * c + i, sizes[i % len(sizes)])
    return root
