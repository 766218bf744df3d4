"""An ImageNet-1K-shaped tree of generated JPEGs: the paper path, rehearsed without ImageNet.

``make_fake_imagenet(out)`` writes what an ImageNet-1K download looks like after the usual
``valprep.sh``: ``train/<wnid>/<wnid>_<n>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_<n>.JPEG``
for the 100 CMC classes of ImageNet100 plus decoy classes that ImageNet100 must leave out.
The images have ImageNet's sizes and aspect ratios (mostly 500x375 and 500x333, some
portrait, square and large ones), and ImageNet's odd files: a few grayscale and CMYK JPEGs.
Each class has its own colour cast, so a model trained on the tree learns something and a
rehearsal can tell a pipeline that learns from one that does not.

Then ``ablate data imagenet100 --imagenet OUT --out IN100`` and ``ablate run`` with
``IMAGENET100_ROOT=IN100`` take exactly the path a user takes with the real data.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ablate.data.imagenet100 import cmc_classes
from ablate.devices import usable_cpus
from ablate.errors import AblateError

#: (width, height, weight): the common ImageNet shapes, landscape 4:3 and 3:2 first
SHAPES = ((500, 375, 50), (500, 333, 20), (375, 500, 10), (333, 500, 5), (500, 500, 7), (640, 480, 4),
          (1024, 768, 2), (500, 281, 2))
GRAY_EVERY, CMYK_EVERY = 13, 47  # ImageNet holds grayscale and CMYK JPEGs; the loaders must take them


def decoy_wnids(count: int) -> list[str]:
    """WordNet-id-shaped names that are not in the CMC list (ImageNet-1K's other 900 classes)."""
    taken = set(cmc_classes())
    out, n = [], 1_000_000
    while len(out) < count:
        wnid = f"n{n:08d}"
        if wnid not in taken:
            out.append(wnid)
        n += 7_919
    return out


def photo(seed: int, width: int, height: int, tint: np.ndarray):
    """Smooth colour fields at two scales plus fine noise, with the class's colour cast:
    compresses like a photograph (tens of KB at 500x375)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    medium = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize((width, height),
                                                                                         Image.BILINEAR)
    pixels = (0.45 * np.asarray(coarse, np.float32) + 0.3 * np.asarray(medium, np.float32)
              + 0.25 * tint + rng.normal(0, 10, (height, width, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _tint(class_index: int) -> np.ndarray:
    return np.random.default_rng(10_007 + class_index).integers(0, 256, 3).astype(np.float32)


def _write(task: tuple[str, int, int]) -> None:
    path, seed, class_index = task
    rng = np.random.default_rng(seed)
    weights = np.array([w for *_, w in SHAPES], float)
    width, height, _ = SHAPES[rng.choice(len(SHAPES), p=weights / weights.sum())]
    image = photo(seed, width, height, _tint(class_index))
    if seed % GRAY_EVERY == 0:
        image = image.convert("L")
    elif seed % CMYK_EVERY == 0:
        image = image.convert("CMYK")
    tmp = f"{path}.tmp"
    image.save(tmp, format="JPEG", quality=int(rng.integers(75, 96)))
    os.replace(tmp, path)  # a killed generation leaves no half-written JPEG


def make_fake_imagenet(out: str | Path, *, train_per_class: int = 3, val_per_class: int = 1, decoys: int = 10,
                       seed: int = 0, workers: Optional[int] = None) -> dict[str, int]:
    """Write the tree under ``out`` (created; existing images are kept). Returns image counts per split."""
    out = Path(out)
    if train_per_class < 1 or val_per_class < 1:
        raise AblateError("--train-per-class/--val-per-class: at least 1 image per class (allowed: 1 or more)")
    if out.exists() and not out.is_dir():
        raise AblateError(f"--out: {out} is a file (allowed: a new or existing directory)")
    wnids = cmc_classes() + decoy_wnids(decoys)
    tasks, counts = [], {"train": 0, "val": 0}
    for c, wnid in enumerate(wnids):
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = f"{wnid}_{i + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * n + i + 1:08d}.JPEG"
                image_seed = seed * 1_000_003 + (c * 1000 + i) * 2 + (split == "val")
                tasks.append((str(folder / name), image_seed, c))
                counts[split] += 1
    todo = [t for t in tasks if not os.path.exists(t[0])]
    processes = workers or usable_cpus()
    if processes > 1 and len(todo) > 32:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write, todo, chunksize=16)
    else:
        for task in todo:
            _write(task)
    return counts
