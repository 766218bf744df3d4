"""Image-folder trees ``root/{train,val}/<class>/<image>``: scanning and the PIL DataLoader path.

The plain loader: every image is decoded with PIL in ``data.workers`` DataLoader processes
and transformed by timm's transforms (:mod:`ablate.data.transforms`). It is the fallback of
the uint8 cache (:mod:`ablate.data.cache`) and the reference the cache path is measured
against.

Bad files never stop an epoch. A file without an image extension inside a class folder is
skipped at scan time; an image PIL cannot decode (truncated, not really a JPEG, ...) is
skipped when it is read: the dataset returns no image for it, the collate function drops
it, and the main process logs it once and counts it (``Loaders.skipped``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ablate.data.seeding import derive_seed, epoch_permutation
from ablate.errors import AblateError

#: what torchvision's ImageFolder accepts, compared case-insensitively (ImageNet uses .JPEG)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")


@dataclass
class FolderSplit:
    """The images of one split, in a fixed order (sorted by class, then path)."""
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index)
    non_images: list[str] = field(default_factory=list)  # files skipped at scan time


def expand_root(root: Optional[str], what: str = "data.root") -> Path:
    """``data.root`` with ``~`` and ``${VAR}`` expanded; an AblateError naming it when absent."""
    if not root:
        raise AblateError(f"{what}: missing (allowed: a directory with train/<class>/ and val/<class>/ folders)")
    path = Path(os.path.expandvars(os.path.expanduser(root)))
    if "$" in str(path):
        raise AblateError(f"{what}: {root}: environment variable not set")
    if not path.is_dir():
        raise AblateError(f"{what}: {path} does not exist (allowed: a directory with train/<class>/ "
                          "and val/<class>/ folders)")
    return path


def class_names(split_dir: Path) -> list[str]:
    """Sorted non-hidden sub-folders of ``split_dir``: the classes, as in torchvision's ImageFolder."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def scan_split(root: Path, split: str, classes: Optional[list[str]] = None) -> FolderSplit:
    """List ``root/split/<class>/**`` (following symlinks). ``classes`` (the training split's)
    fixes the label order; a class folder outside it is an error."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise AblateError(f"data.root: {split_dir} is missing (allowed: a directory with train/<class>/ "
                          "and val/<class>/ folders)")
    found = class_names(split_dir)
    classes = found if classes is None else classes
    if not classes:
        raise AblateError(f"data.root: {split_dir} has no class folders (allowed: {split_dir}/<class>/<image>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise AblateError(f"data.root: {split_dir} has class folders that train/ lacks: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} ({len(unknown)})")
    index = {c: i for i, c in enumerate(classes)}
    samples, non_images = [], []
    for c in found:
        files = []
        for dirpath, dirnames, filenames in os.walk(split_dir / c, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        for path in sorted(files):
            if path.lower().endswith(IMAGE_EXTENSIONS):
                samples.append((path, index[c]))
            else:
                non_images.append(path)
    return FolderSplit(split_dir, list(classes), samples, non_images)


def scan_tree(root: Path) -> dict[str, FolderSplit]:
    """Both splits of ``root``, labelled by the training split's classes."""
    train = scan_split(root, "train")
    return {"train": train, "val": scan_split(root, "val", train.classes)}


# ---- the DataLoader path ------------------------------------------------------------------

class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes one image with PIL and applies ``transform`` under a per-sample seed.

    Indexed by ``(index, seed)`` pairs from :class:`EpochSampler`, so the augmentation of an
    image depends on (run seed, epoch, image) only, whatever the worker count. Returns
    ``(tensor, label, None)``, or ``(None, label, (path, reason))`` for an unreadable image.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        from PIL import Image

        from ablate.data.seeding import seeded_global_rngs

        index, seed = item
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")  # forces the full decode: truncated files fail here
            with seeded_global_rngs(seed):  # timm's transforms draw from the global RNGs
                return self.transform(image), label, None
        except Exception as e:  # noqa: BLE001 - any undecodable file is skipped, never fatal
            return None, label, (path, f"{type(e).__name__}: {e}")


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, per-sample seed)``; shuffled from (seed, epoch) when ``shuffle``."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch = self.epoch if self.shuffle else 0
        order = epoch_permutation(self.n, self.seed, epoch).tolist() if self.shuffle else range(self.n)
        for i in order:
            yield i, derive_seed(self.seed, epoch, i)


def collate_skipping(batch):
    """Stack the decodable images; pass the reasons for the others on to the main process."""
    good = [(x, y) for x, y, bad in batch if bad is None]
    skipped = [bad for _, _, bad in batch if bad is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = zip(*good)
    return torch.stack(images), torch.tensor(targets, dtype=torch.long), skipped


class FolderBatches:
    """A DataLoader over one split that skips (and logs once, and counts) unreadable images.

    In training a batch that lost images is cut to an even size, because batch Mixup/CutMix
    pairs each image with the flipped batch.
    """

    def __init__(self, split: FolderSplit, transform: Callable, *, batch_size: int, train: bool, seed: int,
                 workers: int, device: torch.device, log: Callable[[str], None] = print):
        self.split, self.train, self.log = split, train, log
        self.sampler = EpochSampler(len(split.samples), seed, shuffle=train)
        self.loader = torch.utils.data.DataLoader(
            ImageFileDataset(split.samples, transform), batch_size=batch_size, sampler=self.sampler,
            num_workers=workers, collate_fn=collate_skipping, drop_last=train,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0)
        self.skipped_paths: set[str] = set()
        for path in split.non_images:
            self._skip(path, f"not an image file (allowed extensions: {' '.join(IMAGE_EXTENSIONS)})")

    def _skip(self, path: str, reason: str) -> None:
        if path not in self.skipped_paths:
            self.skipped_paths.add(path)
            self.log(f"data: skipped {path}: {reason}")

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets, skipped in self.loader:
            for path, reason in skipped:
                self._skip(path, reason)
            if skipped and self.train and len(targets) % 2:
                images, targets = images[:-1], targets[:-1]
            if len(targets):
                yield images, targets
