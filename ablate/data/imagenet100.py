"""ImageNet100: the 100-class ImageNet subset of CMC (Tian et al., 2019), used by the S²-MLP
paper for its ablations (Tables 4-9).

``build_imagenet100`` lays out ``OUT/{train,val}/<wnid>/`` with one symbolic link per image
of an ImageNet-1K tree, for the 100 classes of ``imagenet100_cmc_classes.txt`` (shipped in
this package): no image is copied. The ImageNet-1K validation images must already be in
class folders (``val/<wnid>/*.JPEG``, as the usual ``valprep.sh`` leaves them).
"""
from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

from ablate.data.constants import is_image_file
from ablate.errors import AblateError

CLASS_LIST = "imagenet100_cmc_classes.txt"
SPLITS = ("train", "val")


def cmc_classes() -> list[str]:
    """The 100 WordNet ids of CMC's ImageNet100, in file order."""
    text = resources.files("ablate.data").joinpath(CLASS_LIST).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _missing(imagenet: Path, classes: Sequence[str]) -> dict[str, list[str]]:
    return {split: [c for c in classes if not (imagenet / split / c).is_dir()] for split in SPLITS}


def build_imagenet100(imagenet: str | Path, out: str | Path, classes: Optional[Sequence[str]] = None,
                      *, force: bool = False) -> dict[str, dict[str, int]]:
    """Link the images of ``classes`` (default: CMC's 100) from ``imagenet`` into ``out``.

    Returns ``{"train": {"images": n, "classes": k}, "val": {...}}``. Refuses a non-empty
    ``out`` unless ``force`` (which replaces ``out/train`` and ``out/val``). The links are
    written to a temporary directory first and renamed into place, so a failed build leaves
    no partial tree.
    """
    imagenet, out = Path(imagenet).expanduser().absolute(), Path(out).expanduser().absolute()
    classes = list(classes) if classes is not None else cmc_classes()
    for split in SPLITS:
        if not (imagenet / split).is_dir():
            raise AblateError(f"--imagenet: {imagenet / split} is missing (allowed: an ImageNet-1K tree with "
                              "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    loose = [p.name for p in (imagenet / "val").iterdir() if p.is_file() and is_image_file(p.name)][:1]
    if loose:
        raise AblateError(f"--imagenet: {imagenet / 'val'} holds images outside class folders (e.g. {loose[0]}); "
                          "sort them into val/<wnid>/ first (ImageNet's valprep.sh)")
    missing = _missing(imagenet, classes)
    problems = [f"{split}/ lacks {len(m)} of the {len(classes)} classes: {', '.join(m[:5])}{' ...' if len(m) > 5 else ''}"
                for split, m in missing.items() if m]
    if problems:
        raise AblateError(f"--imagenet: {imagenet}: " + "; ".join(problems))
    if out.exists() and not out.is_dir():
        raise AblateError(f"--out: {out} is a file (allowed: a new or empty directory)")
    if out.exists() and any(out.iterdir()) and not force:
        raise AblateError(f"--out: {out} is not empty (allowed: a new or empty directory, or --force to replace "
                          "its train/ and val/)")

    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".building-{os.getpid()}"
    counts = {}
    try:
        for split in SPLITS:
            n = 0
            for wnid in classes:
                target = staging / split / wnid
                target.mkdir(parents=True)
                with os.scandir(imagenet / split / wnid) as entries:
                    for entry in entries:
                        if entry.is_file() and not entry.name.startswith("."):
                            os.symlink(entry.path, target / entry.name)
                            n += 1
            counts[split] = {"images": n, "classes": len(classes)}
        for split in SPLITS:
            if (out / split).exists():
                shutil.rmtree(out / split)
            (staging / split).rename(out / split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts
