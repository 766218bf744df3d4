"""ImageNet-1K (ILSVRC-2012) as an image-folder root, for the paper's ImageNet-1K table; and
what every ImageNet-derived tree shares (ImageNet100 is built from the same helpers).

``build_imagenet1k(imagenet, out)`` checks an ImageNet-1K tree and lays out
``OUT/train/<wnid>`` and ``OUT/val/<wnid>`` as symbolic links, so that ``data.name:
imagenet1k`` (or ``imagefolder``) reads it; no image is copied. ``train/`` must hold the 1,000 class folders of
``imagenet1k_classes.txt`` (timm's ``imagenet_synsets.txt``, copied verbatim: the standard
ILSVRC-2012 wnids, sorted). The validation images may be

- already sorted into ``val/<wnid>/`` (ImageNet's ``valprep.sh``): each class folder is linked;
- flat in ``val/`` (``ILSVRC2012_val_00000001.JPEG`` ..., as the official archive and Kaggle
  ship them): ``OUT/val/<wnid>/`` gets one link per image, sorted by a labels file.

Labels files (:func:`read_val_labels`): Kaggle's ``LOC_val_solution.csv`` (header
``ImageId,PredictionString``, the first token of PredictionString is the wnid), a plain
``<file name> <wnid>`` per line, or one wnid per line (TensorFlow's
``imagenet_2012_validation_synset_labels.txt``: line n labels ``ILSVRC2012_val_<n>.JPEG``).
Without ``--val-labels``, :data:`LABEL_FILES` are looked for in ``val/``, the tree, beside it,
and at the top of a Kaggle download when the tree is its ``ILSVRC/Data/CLS-LOC``.

Every problem is found before anything is written and reported one line each; the links are
built in a staging folder (:func:`staged_build`) that replaces ``OUT``'s ``train/`` and
``val/`` only once complete.
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ablate.data.constants import is_image_file
from ablate.errors import AblateError

CLASS_LIST = "imagenet1k_classes.txt"
SPLITS = ("train", "val")
#: labels files looked for when --val-labels is not given, in this order
LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt", "imagenet_2012_validation_synset_labels.txt")
KAGGLE_CSV_HEADER = ("ImageId", "PredictionString")
_SHOWN = 5  # names shown per problem
_LABELS_ALLOWED = ("allowed: Kaggle's LOC_val_solution.csv, a text file of '<file name> <wnid>' lines, "
                   "or one wnid per line in image-number order")


# ---- class lists -------------------------------------------------------------------------------

def read_class_list(name: str) -> list[str]:
    """The WordNet ids of a class list shipped in ``ablate/data`` (one per line, ``#`` comments)."""
    text = resources.files("ablate.data").joinpath(name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def imagenet1k_classes() -> list[str]:
    """The 1,000 ILSVRC-2012 wnids, sorted (the order of timm's and torchvision's class indices)."""
    return read_class_list(CLASS_LIST)


def shown(names: Sequence[str]) -> str:
    """The first few of ``names``, and ``...`` when there are more."""
    return ", ".join(names[:_SHOWN]) + (" ..." if len(names) > _SHOWN else "")


# ---- checks shared by the ImageNet commands -------------------------------------------------------

def resolve_tree(imagenet: str | Path) -> Path:
    """``--imagenet`` as an absolute path (links are made to it, not to where it resolves), with
    ``train/`` and ``val/`` folders."""
    root = Path(os.path.expanduser(imagenet)).absolute()
    for split in SPLITS:
        if not (root / split).is_dir():
            raise AblateError(f"--imagenet: {root / split} is missing (allowed: an ImageNet-1K tree with "
                              "train/<wnid>/*.JPEG and val/, its images in class folders or flat)")
    return root


def check_out(out: str | Path, imagenet: Path, force: bool) -> Path:
    """``--out`` as an absolute path: a new or empty folder, or (``force``) one whose train/ and
    val/ may be replaced, and never the source tree, inside its splits or holding them."""
    out = Path(os.path.expanduser(out)).absolute()
    if out.exists() and not out.is_dir():
        raise AblateError(f"--out: {out} is a file (allowed: a new or empty directory)")
    if out.is_symlink() and not out.exists():
        raise AblateError(f"--out: {out} is a link to {os.readlink(out)}, which does not exist (allowed: a new or "
                          "empty directory)")
    real_out, real_in = Path(os.path.realpath(out)), Path(os.path.realpath(imagenet))
    splits_in = [Path(os.path.realpath(imagenet / s)) for s in SPLITS]
    splits_out = [real_out / s for s in SPLITS]
    if (real_out == real_in or any(real_out.is_relative_to(s) for s in splits_in)
            or any(real_in.is_relative_to(s) for s in splits_out)):
        raise AblateError(f"--out: {out} overlaps --imagenet {imagenet} (allowed: a directory outside the "
                          "ImageNet tree's train/ and val/)")
    if out.exists() and any(out.iterdir()) and not force:
        raise AblateError(f"--out: {out} is not empty (allowed: a new or empty directory, or --force to replace "
                          "its train/ and val/)")
    return out


def missing_classes(split_dir: Path, classes: Sequence[str], split: str) -> Optional[str]:
    """One line naming the class folders ``split_dir`` lacks, or None."""
    missing = [c for c in classes if not (split_dir / c).is_dir()]
    if not missing:
        return None
    return f"{split}/ lacks {len(missing)} of the {len(classes)} classes: {shown(missing)}"


def image_names(folder: Path) -> list[str]:
    """The non-hidden image files directly in ``folder`` (links to files included), sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if not e.name.startswith(".") and is_image_file(e.name) and e.is_file())


def count_images(folder: Path) -> int:
    return len(image_names(folder))


@contextlib.contextmanager
def staged_build(out: Path) -> Iterator[Path]:
    """An empty folder to build ``train/`` and ``val/`` in. When the block completes they
    replace those of ``out`` (created if new; anything else in it is kept, e.g. a data cache);
    when it fails, the folder is removed and ``out`` is as it was.

    The folder lies beside a new ``out`` and inside an existing one: on the same file system
    either way, so the final step is a rename. A file system that refuses a read or a write
    (permissions, a full disk) is an AblateError naming ``out``."""
    if out.exists():
        staging = out / f".building-{os.getpid()}"
    else:
        staging = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as e:
        raise AblateError(f"--out: {out}: cannot write {e.filename or staging} ({e.strerror or e})") from None
    try:
        yield staging
        if not out.exists():
            staging.rename(out)
            return
        for split in SPLITS:
            old = out / split
            if old.exists() or old.is_symlink():
                old.rename(staging / f"old-{split}")  # removed below with the staging folder
            (staging / split).rename(old)
    except OSError as e:  # the source unreadable or the target full half-way: reported, nothing kept
        raise AblateError(f"--out: {out}: the build stopped: {e.strerror or e}: {e.filename}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- validation labels ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Label:
    wnid: str
    line: int


def _stem(name: str) -> str:
    return os.path.splitext(name)[0] if is_image_file(name) else name


def read_val_labels(path: Path, where: str = "--val-labels") -> dict[str, Label]:
    """``{image file name without its extension: Label}`` from a labels file (formats: module
    docstring). An unreadable file or a malformed line is an AblateError (one line); wnids are
    not checked here."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise AblateError(f"{where}: {path}: not a text file ({_LABELS_ALLOWED})") from None
    except OSError as e:
        raise AblateError(f"{where}: {path}: cannot read it ({e.strerror or e}; {_LABELS_ALLOWED})") from None
    lines = text.splitlines()
    header = next(csv.reader(lines[:1]), [])
    rows: list[tuple[int, list[str]]]
    if tuple(h.strip() for h in header) == KAGGLE_CSV_HEADER:
        rows = [(n, [r[0].strip(), (r[1].split() or [""])[0]] if len(r) >= 2 else r)
                for n, r in enumerate(csv.reader(lines[1:]), start=2) if r and any(f.strip() for f in r)]
        form = "ImageId,<wnid> ..."
    else:
        rows = [(n, line.split()) for n, line in enumerate(lines, start=1)
                if line.strip() and not line.lstrip().startswith("#")]
        form = "<file name> <wnid>"
        if rows and all(len(r) == 1 for _, r in rows):  # one wnid per line, in image-number order
            rows = [(n, [f"ILSVRC2012_val_{i:08d}", r[0]]) for i, (n, r) in enumerate(rows, start=1)]
    if not rows:
        raise AblateError(f"{where}: {path}: holds no labels ({_LABELS_ALLOWED})")
    bad = [n for n, r in rows if len(r) != 2 or not r[0] or not r[1]]
    if bad:
        raise AblateError(f"{where}: {path}:{bad[0]}: {len(bad)} line(s) are not '{form}' "
                          f"(lines {shown([str(n) for n in bad])}; {_LABELS_ALLOWED})")
    outside = [(n, r[0]) for n, r in rows if "/" in r[0] or "\\" in r[0] or r[0] in (".", "..")]
    if outside:
        n, name = outside[0]
        raise AblateError(f"{where}: {path}:{n}: {name!r} is a path; {len(outside)} line(s) name files outside "
                          "val/ (allowed: plain file names of images in val/)")
    labels: dict[str, Label] = {}
    for n, (name, wnid) in rows:
        key = _stem(name)
        before = labels.setdefault(key, Label(wnid, n))
        if before.wnid != wnid:
            raise AblateError(f"{where}: {path}:{n}: {name} is labelled {before.wnid} on line {before.line} and "
                              f"{wnid} here (allowed: one wnid per image)")
    return labels


def find_val_labels(root: Path) -> tuple[Optional[Path], list[Path]]:
    """The first of :data:`LABEL_FILES` in ``val/``, the tree, beside it, or at the top of a Kaggle
    download (``<top>/ILSVRC/Data/CLS-LOC``); and the folders looked in."""
    places = [root / "val", root, root.parent]
    if [p.name for p in (root, root.parent, root.parent.parent)] == ["CLS-LOC", "Data", "ILSVRC"]:
        places.append(root.parents[2])
    for name in LABEL_FILES:
        for place in places:
            if (place / name).is_file():
                return place / name, places
    return None, places


# ---- ImageNet-1K ---------------------------------------------------------------------------------

@dataclass
class ValLayout:
    """Where the validation images of each class are: ``folders`` (link ``val/<wnid>``) or
    ``files`` (``{wnid: [file names in val/]}``, from ``labels``)."""
    counts: dict[str, int]
    files: Optional[dict[str, list[str]]] = None
    labels: Optional[Path] = None


def sort_flat_val(val: Path, images: Sequence[str], labels_path: Path, known: Sequence[str],
                  where: str = "--val-labels") -> tuple[dict[str, list[str]], list[str]]:
    """The flat validation images by class (for the wnids of ``known`` that have images), and the
    problems: images without a label, labels naming unknown wnids, labelled images val/ lacks."""
    labels = read_val_labels(labels_path, where)
    known_set = set(known)
    problems = []
    unknown = sorted({(label.line, label.wnid) for label in labels.values() if label.wnid not in known_set})
    if unknown:
        problems.append(f"{where}: {labels_path}: {len(unknown)} label(s) name unknown wnids: "
                        f"{shown([f'{w} (line {n})' for n, w in unknown])} (allowed: the {len(known)} "
                        f"ILSVRC-2012 wnids, e.g. {known[0]})")
    files: dict[str, list[str]] = {}
    unlabelled = []
    for name in images:
        label = labels.get(_stem(name))
        if label is None:
            unlabelled.append(name)
        elif label.wnid in known_set:
            files.setdefault(label.wnid, []).append(name)
    if unlabelled:
        problems.append(f"{where}: {labels_path}: {len(unlabelled)} image(s) in {val} have no label: "
                        f"{shown(unlabelled)} (allowed: a label for every image)")
    present = {_stem(name) for name in images}
    absent = sorted(k for k in labels if k not in present)
    if absent:
        problems.append(f"{where}: {labels_path}: labels {len(absent)} image(s) that {val} lacks: {shown(absent)} "
                        "(allowed: a complete val/, as the archive ships it)")
    return files, problems


def val_layout(root: Path, classes: Sequence[str], labels: Optional[str | Path],
               problems: list[str]) -> Optional[ValLayout]:
    """How ``root/val`` is laid out, with its image count per class; what is wrong goes to
    ``problems`` (None then, when the layout itself is unusable)."""
    val = root / "val"
    with os.scandir(val) as entries:
        entries = [e for e in entries if not e.name.startswith(".")]
    loose = sorted(e.name for e in entries if is_image_file(e.name) and e.is_file())
    folders = {e.name for e in entries if e.is_dir()} & set(classes)
    if loose and folders:
        problems.append(f"--imagenet: {val} holds {len(folders)} class folders and {len(loose)} images outside them "
                        "(a valprep.sh stopped half-way?; allowed: all images in val/<wnid>/, or all flat in val/ "
                        "with a labels file)")
        return None
    if not loose:
        line = missing_classes(val, classes, "val")
        if line:
            problems.append(f"--imagenet: {root}: {line}")
            return None
        return ValLayout({c: count_images(val / c) for c in classes})
    where = "--val-labels" if labels is not None else "val labels"
    if labels is not None:
        labels_path = Path(os.path.expanduser(labels)).absolute()
    else:
        labels_path, places = find_val_labels(root)
        if labels_path is None:
            problems.append(f"--imagenet: {val} holds {len(loose)} images outside class folders and no labels file "
                            f"was found ({' or '.join(LABEL_FILES)} in {', '.join(str(p) for p in places)}; "
                            "allowed: --val-labels FILE)")
            return None
    try:
        files, found = sort_flat_val(val, loose, labels_path, classes, where)
    except AblateError as e:  # an unreadable or malformed file: reported with the tree's other problems
        problems.append(str(e))
        return None
    problems.extend(found)
    return ValLayout({c: len(files.get(c, ())) for c in classes}, files, labels_path)


def build_imagenet1k(imagenet: str | Path, out: str | Path, *, val_labels: Optional[str | Path] = None,
                     force: bool = False) -> dict:
    """Check the ImageNet-1K tree ``imagenet`` and link it into ``out`` (module docstring).

    Returns ``{"classes": 1000, "train": images, "val": images, "val_labels": the labels file
    used or None, "out": out}``; a ``val_labels`` given for a val/ already in class folders is
    not needed and not read (the CLI says so). Every problem is one line of one AblateError,
    raised before anything is written.
    """
    root = resolve_tree(imagenet)
    classes = imagenet1k_classes()
    problems: list[str] = []
    try:
        out = check_out(out, root, force)
    except AblateError as e:
        problems.append(str(e))
    line = missing_classes(root / "train", classes, "train")
    train_counts = {} if line else {c: count_images(root / "train" / c) for c in classes}
    if line:
        problems.append(f"--imagenet: {root}: {line}")
    val = val_layout(root, classes, val_labels, problems)
    for split, counts in (("train", train_counts), ("val", val.counts if val else {})):
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            problems.append(f"--imagenet: {root}: {split}/ has no images for {len(empty)} of the {len(classes)} "
                            f"classes: {shown(empty)}")
    if problems:
        raise AblateError("\n".join(problems))

    with staged_build(out) as staging:
        for split in SPLITS:
            (staging / split).mkdir()
        for wnid in classes:
            os.symlink(root / "train" / wnid, staging / "train" / wnid, target_is_directory=True)
            if val.files is None:
                os.symlink(root / "val" / wnid, staging / "val" / wnid, target_is_directory=True)
            else:
                (staging / "val" / wnid).mkdir()
                for name in val.files[wnid]:
                    os.symlink(root / "val" / name, staging / "val" / wnid / name)
    return {"classes": len(classes), "train": sum(train_counts.values()), "val": sum(val.counts.values()),
            "val_labels": val.labels, "out": out}
