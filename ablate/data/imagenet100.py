"""ImageNet100: the 100-class ImageNet subset of CMC (Tian et al., 2019), used by the S²-MLP
paper for its ablations (Tables 4-9).

``build_imagenet100`` lays out ``OUT/{train,val}/<wnid>/`` with one symbolic link per image
of an ImageNet-1K tree, for the 100 classes of ``imagenet100_cmc_classes.txt`` (shipped in
this package): no image is copied. The ImageNet-1K validation images must already be in
class folders (``val/<wnid>/*.JPEG``, as the usual ``valprep.sh`` leaves them, or as ``ablate data
imagenet1k`` lays out an ImageNet-1K root from the flat archive). The checks and the staged build
are :mod:`ablate.data.imagenet1k`'s.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ablate.data.constants import is_image_file
from ablate.data.imagenet1k import SPLITS, check_out, missing_classes, read_class_list, resolve_tree, staged_build
from ablate.errors import AblateError

CLASS_LIST = "imagenet100_cmc_classes.txt"


def cmc_classes() -> list[str]:
    """The 100 WordNet ids of CMC's ImageNet100, in file order."""
    return read_class_list(CLASS_LIST)


def build_imagenet100(imagenet: str | Path, out: str | Path, classes: Optional[Sequence[str]] = None,
                      *, force: bool = False) -> dict[str, dict[str, int]]:
    """Link the images of ``classes`` (default: CMC's 100) from ``imagenet`` into ``out``.

    Returns ``{"train": {"images": n, "classes": k}, "val": {...}}``. Refuses a non-empty
    ``out`` unless ``force`` (which replaces ``out/train`` and ``out/val``). The links are
    written to a staging folder first and renamed into place, so a failed build leaves
    no partial tree.
    """
    imagenet = resolve_tree(imagenet)
    classes = list(classes) if classes is not None else cmc_classes()
    loose = [p.name for p in (imagenet / "val").iterdir() if p.is_file() and is_image_file(p.name)][:1]
    if loose:
        raise AblateError(f"--imagenet: {imagenet / 'val'} holds images outside class folders (e.g. {loose[0]}); "
                          "sort them into val/<wnid>/ first (ImageNet's valprep.sh), or build an ImageNet-1K root "
                          "with ablate data imagenet1k and give that as --imagenet")
    problems = [line for split in SPLITS if (line := missing_classes(imagenet / split, classes, split))]
    if problems:
        raise AblateError(f"--imagenet: {imagenet}: " + "; ".join(problems))
    out = check_out(out, imagenet, force)

    counts = {}
    with staged_build(out) as staging:
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
    return counts
