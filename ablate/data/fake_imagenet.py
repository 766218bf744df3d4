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

``classes="imagenet1k"`` writes the 1,000 ILSVRC-2012 classes instead (no decoys), and
``flat_val`` lays the validation images flat, as the official archive ships them
(``val/ILSVRC2012_val_<n>.JPEG``, the same images and numbers as in class folders), with
Kaggle's ``LOC_val_solution.csv`` at the top of the tree: what ``ablate data imagenet1k``
sorts. ``max_side`` shrinks every image (same aspect ratio) for rehearsals that never decode
them: 1,000 classes x 2 images at ImageNet's sizes take tens of CPU-seconds, at 32 px one.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ablate.data.imagenet1k import KAGGLE_CSV_HEADER, imagenet1k_classes
from ablate.data.imagenet100 import cmc_classes
from ablate.devices import usable_cpus
from ablate.errors import AblateError

#: (width, height, weight): the common ImageNet shapes, landscape 4:3 and 3:2 first
SHAPES = ((500, 375, 50), (500, 333, 20), (375, 500, 10), (333, 500, 5), (500, 500, 7), (640, 480, 4),
          (1024, 768, 2), (500, 281, 2))
GRAY_EVERY, CMYK_EVERY = 13, 47  # ImageNet holds grayscale and CMYK JPEGs; the loaders must take them
CLASS_SETS = ("imagenet100", "imagenet1k")
LABELS_FILE = "LOC_val_solution.csv"  # Kaggle's name, written by flat_val beside train/ and val/


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


def _shape(rng: np.random.Generator, max_side: Optional[int]) -> tuple[int, int]:
    weights = np.array([w for *_, w in SHAPES], float)
    width, height, _ = SHAPES[rng.choice(len(SHAPES), p=weights / weights.sum())]
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    return width, height


def _write(task: tuple[str, int, int, Optional[int]]) -> None:
    path, seed, class_index, max_side = task
    rng = np.random.default_rng(seed)
    width, height = _shape(rng, max_side)
    image = photo(seed, width, height, _tint(class_index))
    if seed % GRAY_EVERY == 0:
        image = image.convert("L")
    elif seed % CMYK_EVERY == 0:
        image = image.convert("CMYK")
    tmp = f"{path}.tmp"
    image.save(tmp, format="JPEG", quality=int(rng.integers(75, 96)))
    os.replace(tmp, path)  # a killed generation leaves no half-written JPEG


def _check_val_layout(val: Path, flat_val: bool) -> None:
    """Images are kept across runs: refuse to mix the flat and the sorted layouts in one val/."""
    if not val.is_dir():
        return
    with os.scandir(val) as entries:
        names = [(e.name, e.is_dir()) for e in entries if not e.name.startswith(".")]
    if flat_val and any(is_dir for _, is_dir in names):
        raise AblateError(f"--flat-val: {val} already holds class folders (allowed: a new --out, or leave out "
                          "--flat-val)")
    if not flat_val and any(not is_dir and name.endswith(".JPEG") for name, is_dir in names):
        raise AblateError(f"--out: {val} holds flat validation images (allowed: a new --out, or add --flat-val)")


def make_fake_imagenet(out: str | Path, *, train_per_class: int = 3, val_per_class: int = 1,
                       decoys: Optional[int] = None, seed: int = 0, workers: Optional[int] = None,
                       classes: str = "imagenet100", flat_val: bool = False,
                       max_side: Optional[int] = None) -> dict[str, int]:
    """Write the tree under ``out`` (created; existing images are kept). Returns image counts per split.

    ``classes``: ``imagenet100`` (CMC's 100 plus ``decoys`` other classes, 10 by default) or
    ``imagenet1k`` (the 1,000 classes); ``flat_val`` and ``max_side``: the module docstring."""
    out = Path(out)
    if train_per_class < 1 or val_per_class < 1:
        raise AblateError("--train-per-class/--val-per-class: at least 1 image per class (allowed: 1 or more)")
    if classes not in CLASS_SETS:
        raise AblateError(f"--classes: {classes!r} (allowed: {', '.join(CLASS_SETS)})")
    if classes == "imagenet1k" and decoys:
        raise AblateError("--decoys: only with --classes imagenet100 (ImageNet-1K has no other classes)")
    if max_side is not None and max_side < 1:
        raise AblateError(f"--max-side: {max_side} (allowed: 1 or more pixels)")
    if out.exists() and not out.is_dir():
        raise AblateError(f"--out: {out} is a file (allowed: a new or existing directory)")
    _check_val_layout(out / "val", flat_val)
    if classes == "imagenet1k":
        wnids = imagenet1k_classes()
    else:
        wnids = cmc_classes() + decoy_wnids(10 if decoys is None else decoys)
    tasks, counts, labels = [], {"train": 0, "val": 0}, []
    for c, wnid in enumerate(wnids):
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            folder = out / split / wnid if not (split == "val" and flat_val) else out / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = f"{wnid}_{i + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * n + i + 1:08d}.JPEG"
                image_seed = seed * 1_000_003 + (c * 1000 + i) * 2 + (split == "val")
                tasks.append((str(folder / name), image_seed, c, max_side))
                counts[split] += 1
                if split == "val" and flat_val:
                    width, height = _shape(np.random.default_rng(image_seed), max_side)
                    labels.append(f"{name[:-5]},{wnid} 0 0 {width - 1} {height - 1} ")  # Kaggle: one box, the image
    todo = [t for t in tasks if not os.path.exists(t[0])]
    processes = workers or usable_cpus()
    if processes > 1 and len(todo) > 32:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write, todo, chunksize=16)
    else:
        for task in todo:
            _write(task)
    if flat_val:
        tmp = out / f".{LABELS_FILE}.tmp"
        tmp.write_text("\n".join([",".join(KAGGLE_CSV_HEADER)] + labels) + "\n")
        os.replace(tmp, out / LABELS_FILE)
    return counts
