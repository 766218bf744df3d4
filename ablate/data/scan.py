"""Image-folder trees ``root/{train,val}/<class>/<image>``: which files a split holds.

One scan serves every reader, so what ``ablate plan`` counts, what the folder loader reads
and what the cache stores are the same files in the same order (sorted by class, then
path). No torch import: the CLI uses it.

Symbolic links: a link to an image file is an image (ImageNet100 from ``ablate data
imagenet100`` is made of them), and a class folder may itself be a link (a subset of a
larger tree). Links to directories *inside* a class folder are not followed: a link such as
``train/a/loop -> ..`` would otherwise make the walk read every class again under ``a``
(and forever, without a loop check). Such a link is listed among the skipped entries.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ablate.data.constants import IMAGE_EXTENSIONS, is_image_file
from ablate.errors import AblateError

SPLITS = ("train", "val")
_LAYOUT = "a directory with train/<class>/ and val/<class>/ folders"


@dataclass
class FolderSplit:
    """The images of one split, in a fixed order (sorted by class, then path)."""
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): entries that are not images

    def fingerprint(self) -> "TreeFingerprint":
        return TreeFingerprint.of(self)


def expand_root(root: Optional[str], what: str = "data.root") -> Path:
    """``data.root`` with ``~`` and ``${VAR}`` expanded; an AblateError naming it when absent."""
    if not root:
        raise AblateError(f"{what}: missing (allowed: {_LAYOUT})")
    path = Path(os.path.expandvars(os.path.expanduser(root)))
    if "$" in str(path):
        raise AblateError(f"{what}: {root}: environment variable not set")
    if not path.is_dir():
        raise AblateError(f"{what}: {path} does not exist (allowed: {_LAYOUT})")
    return path


def class_names(split_dir: Path) -> list[str]:
    """Sorted non-hidden sub-folders of ``split_dir`` (links to folders included): the
    classes, as in torchvision's ImageFolder."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _check_not_a_loop(split_dir: Path, class_dir: Path) -> None:
    """A class folder that is a link to the split folder or above it would list the other
    classes' images under its own label."""
    real_split, real_class = Path(os.path.realpath(split_dir)), Path(os.path.realpath(class_dir))
    if real_split == real_class or real_split.is_relative_to(real_class):
        raise AblateError(f"data.root: {class_dir} is a link to {real_class}, which contains {split_dir} "
                          f"(a loop; allowed: class folders holding images)")


def _class_files(class_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under one class folder, recursively, without following links to folders."""
    images, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(class_dir):  # followlinks=False: see the module docstring
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                skipped.append((os.path.join(dirpath, d), "a link to a folder inside a class folder (not followed)"))
            else:
                kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            if f.startswith("."):
                continue
            path = os.path.join(dirpath, f)
            if is_image_file(f):
                images.append(path)
            else:
                skipped.append((path, f"not an image file (allowed extensions: {' '.join(IMAGE_EXTENSIONS)})"))
    return sorted(images), sorted(skipped)


def scan_split(root: Path, split: str, classes: Optional[list[str]] = None) -> FolderSplit:
    """List ``root/split/<class>/**``. ``classes`` (the training split's) fixes the label
    order; a class folder outside it is an error."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise AblateError(f"data.root: {split_dir} is missing (allowed: {_LAYOUT})")
    found = class_names(split_dir)
    classes = found if classes is None else classes
    if not classes:
        raise AblateError(f"data.root: {split_dir} has no class folders (allowed: {split_dir}/<class>/<image>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise AblateError(f"data.root: {split_dir} has class folders that train/ lacks: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} ({len(unknown)})")
    index = {c: i for i, c in enumerate(classes)}
    samples, skipped = [], []
    for c in found:
        _check_not_a_loop(split_dir, split_dir / c)
        images, others = _class_files(split_dir / c)
        samples += [(path, index[c]) for path in images]
        skipped += others
    return FolderSplit(split_dir, list(classes), samples, skipped)


def scan_tree(root: Path) -> dict[str, FolderSplit]:
    """Both splits of ``root``, labelled by the training split's classes."""
    train = scan_split(root, "train")
    return {"train": train, "val": scan_split(root, "val", train.classes)}


def count_images(root: Path) -> tuple[int, int]:
    """(train, val) image counts of the tree: exactly the files training reads (decodable or
    not: a file that fails to decode is found only when it is read)."""
    splits = scan_tree(Path(root))
    return len(splits["train"].samples), len(splits["val"].samples)


# ---- what a cache was built from ------------------------------------------------------------

@dataclass(frozen=True)
class TreeFingerprint:
    """Names, sizes and modification times of a split's images, and its classes.

    A cache records the fingerprint of the tree it decoded; a cache whose tree no longer has
    that fingerprint is stale. Paths are relative to the split folder, so a tree moved
    together with its cache stays valid. Links are followed for the size and time, so
    replacing the image a link points to is noticed too.
    """
    classes: tuple[str, ...]
    files: tuple[tuple[str, int, int], ...]  # (relative path, size in bytes, mtime in ns); -1, -1: unreadable

    @classmethod
    def of(cls, split: FolderSplit) -> "TreeFingerprint":
        files = []
        for path, _ in split.samples:
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # a dangling link: recorded as such, and noticed if it changes
                size, mtime = -1, -1
            files.append((os.path.relpath(path, split.root), size, mtime))
        return cls(tuple(split.classes), tuple(files))

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update("\0".join(self.classes).encode())
        for name, size, mtime in self.files:
            h.update(f"\n{name}\0{size}\0{mtime}".encode())
        return h.hexdigest()

    def to_json(self) -> dict:
        return {"classes": list(self.classes), "files": [list(f) for f in self.files]}

    @classmethod
    def from_json(cls, data: dict) -> "TreeFingerprint":
        return cls(tuple(data["classes"]), tuple((str(n), int(s), int(m)) for n, s, m in data["files"]))

    def difference(self, now: "TreeFingerprint") -> str:
        """What changed from ``self`` (the cache's) to ``now`` (the tree's), in a few words."""
        if self.classes != now.classes:
            return f"classes changed ({len(self.classes)} then, {len(now.classes)} now)"
        before, after = {f[0]: f[1:] for f in self.files}, {f[0]: f[1:] for f in now.files}
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
        parts = [f"{len(names)} {what} (e.g. {names[0]})" for names, what in
                 ((added, "added"), (removed, "removed"), (changed, "changed in size or time")) if names]
        return ", ".join(parts) or "file order changed"
