"""The decode-once cache: every image of a split as one uint8 memory-mapped array.

JPEG decoding, not the model, limits a small S²-MLP on a big GPU: an ImageNet100 epoch of a
one-block 112-px ablation cell needs tens of thousands of images per second, far beyond what
PIL decodes on a few cores. ``ablate data cache`` therefore decodes each image once:

* the short side is resized to ``S`` (PIL bilinear, antialiased: what timm's evaluation
  ``Resize`` does) and the centre ``S x S`` square is kept, so every row has one shape;
* rows are written in parallel by a process pool into ``images.npy`` ``(N, S, S, 3)``
  uint8 (a NumPy ``.npy`` file, memory-mapped), with ``labels.npy`` (int64; ``-1`` for an
  image that could not be decoded: skipped, counted, listed in ``meta.json``) and
  ``meta.json`` (class names, size, source, skipped files);
* the build happens in a temporary sibling directory renamed into place at the end, so a
  killed or failed build leaves no half-written cache (a later build removes the debris).

Layout: ``<cache root>/<split>-<S>/`` where the cache root is ``data.cache_dir`` or
``<data root>/.ablate-cache``. With ``S = floor(image_size / 0.875)`` (the default: 256 for
224 px, 128 for 112 px) evaluation on the cache sees exactly the pixels of the folder
loader's resize + centre crop. Training crops come from the stored square, so the random
resized crop never reaches the margins of the long side that the centre square drops.
Rebuild (``--force``) after changing the image tree: a cache is not checked against it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ablate.data.folder import FolderSplit, scan_split
from ablate.data.transforms import EVAL_CROP_PCT
from ablate.errors import AblateError
from ablate.locks import pid_alive

CACHE_DIRNAME = ".ablate-cache"
FORMAT_VERSION = 1
STORAGE = "short side resized to S (PIL bilinear), centre S x S crop, uint8 RGB (N, S, S, 3)"
_CHUNK = 32


def default_cache_size(image_size: int) -> int:
    """The stored side for a model input of ``image_size``: 8/7 of it, as timm's eval resize."""
    return math.floor(image_size / EVAL_CROP_PCT)


def cache_root(data_root: Path, cache_dir: Optional[str] = None) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(cache_dir))) if cache_dir else Path(data_root) / CACHE_DIRNAME


def split_cache_path(root: Path, split: str, size: int) -> Path:
    return Path(root) / f"{split}-{size}"


def cache_exists(path: Path) -> bool:
    return (Path(path) / "meta.json").is_file()


# ---- decoding ---------------------------------------------------------------------------

def decode_square(path: str, size: int) -> np.ndarray:
    """One image as uint8 ``(size, size, 3)``: short side resized to ``size``, centre square.

    Sizes and offsets are computed as torchvision's ``Resize``/``CenterCrop`` compute them.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: let libjpeg decode at a reduced scale >= size (much faster)
        im = im.convert("RGB")
    w, h = im.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


_worker_images: Optional[np.ndarray] = None


def _open_rows(images_path: str) -> None:
    global _worker_images
    _worker_images = np.load(images_path, mmap_mode="r+")


def _decode_rows(task: tuple[int, list[tuple[int, str]]]) -> list[tuple[int, Optional[str]]]:
    """Decode ``(row, path)`` pairs straight into the shared memory map; return the failures."""
    size, items = task
    results = []
    for row, path in items:
        try:
            _worker_images[row] = decode_square(path, size)
            results.append((row, None))
        except Exception as e:  # noqa: BLE001 - an undecodable image is skipped, not fatal
            results.append((row, f"{type(e).__name__}: {e}"))
    return results


# ---- building ---------------------------------------------------------------------------

def _clear_stale_builds(final: Path) -> None:
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            raise AblateError(f"{final}: another build (process {pid}) is writing {tmp}")
        shutil.rmtree(tmp, ignore_errors=True)


def build_split_cache(split: FolderSplit, out: Path, size: int, *, workers: int = 0, force: bool = False,
                      progress: bool = True, on_progress: Optional[Callable[[int], None]] = None,
                      log: Callable[[str], None] = print) -> dict:
    """Decode ``split`` into the cache directory ``out`` (atomic; see the module docstring).

    ``workers`` decoding processes (0: one per CPU core; 1: in this process).
    ``on_progress(done)`` is called after every chunk of images. Returns a summary dict.
    """
    from tqdm import tqdm

    out = Path(out)
    if cache_exists(out) and not force:
        meta = json.loads((out / "meta.json").read_text())
        return {"path": str(out), "images": meta["images"], "skipped": len(meta["skipped"]), "seconds": 0.0,
                "built": False}
    if not split.samples:
        raise AblateError(f"{split.root}: no images to cache (allowed: {split.root}/<class>/<image>)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_builds(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    start = time.perf_counter()
    try:
        tmp.mkdir()
        n = len(split.samples)
        images_path = tmp / "images.npy"
        np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
        labels = np.array([label for _, label in split.samples], dtype=np.int64)
        tasks = [(size, [(i, split.samples[i][0]) for i in range(s, min(n, s + _CHUNK))]) for s in range(0, n, _CHUNK)]
        failures = {}
        workers = workers or os.cpu_count() or 1
        bar = tqdm(total=n, desc=f"cache {split.root.name}-{size}", unit="img", disable=not progress, mininterval=1.0)
        pool = None
        try:
            if workers > 1:
                import multiprocessing

                pool = multiprocessing.get_context("fork").Pool(workers, initializer=_open_rows,
                                                                initargs=(str(images_path),))
                results = pool.imap_unordered(_decode_rows, tasks)
            else:
                _open_rows(str(images_path))
                results = map(_decode_rows, tasks)
            done = 0
            for chunk in results:
                failures.update({row: reason for row, reason in chunk if reason is not None})
                done += len(chunk)
                bar.update(len(chunk))
                if on_progress is not None:
                    on_progress(done)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
            global _worker_images
            _worker_images = None
        skipped = []
        for row in sorted(failures):
            labels[row] = -1
            skipped.append({"path": split.samples[row][0], "reason": failures[row]})
            log(f"data: skipped {split.samples[row][0]}: {failures[row]}")
        np.save(tmp / "labels.npy", labels)
        meta = {"format": FORMAT_VERSION, "storage": STORAGE, "size": size, "split": split.root.name,
                "source": str(split.root), "classes": split.classes, "rows": n, "images": n - len(skipped),
                "skipped": skipped + [{"path": p, "reason": "not an image file"} for p in split.non_images]}
        with open(images_path, "rb+") as f:
            os.fsync(f.fileno())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out.exists():  # --force: swap the old cache out only once the new one is complete
            old = out.parent / f".tmp-{out.name}-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(out), "images": meta["images"], "skipped": len(meta["skipped"]),
            "seconds": time.perf_counter() - start, "built": True}


def build_cache(data_root: str | Path, size: int, *, cache_dir: Optional[str] = None,
                splits: Sequence[str] = ("train", "val"), workers: int = 0, force: bool = False,
                progress: bool = True, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Cache every split of the image-folder tree ``data_root`` at side ``size``.

    Labels follow the training split's sorted class folders, as the folder loader's do.
    Returns ``{split: {"path", "images", "skipped", "seconds", "built"}}``.
    """
    from ablate.data.folder import expand_root

    root = expand_root(str(data_root), "cache source")
    train = scan_split(root, "train")
    target = cache_root(root, cache_dir)
    summary = {}
    for split in splits:
        folder = train if split == "train" else scan_split(root, split, train.classes)
        summary[split] = build_split_cache(folder, split_cache_path(target, split, size), size, workers=workers,
                                           force=force, progress=progress, log=log)
    return summary


@dataclass(frozen=True)
class CacheTarget:
    """One cache to build: the image-folder tree, where the cache goes, the stored side."""
    root: str
    cache_dir: Optional[str]
    size: int


def cache_targets(source: str, *, size: Optional[int] = None, cache_dir: Optional[str] = None) -> list[CacheTarget]:
    """What ``ablate data cache SOURCE`` builds: SOURCE is an image-folder tree (``size``
    default 256, for 224-px models) or a spec file (its dataset root, and every stored size
    its cells need: ``data.cache_size`` or ``floor(image_size / 0.875)``, unless ``size``)."""
    path = Path(source)
    if path.is_dir():
        return [CacheTarget(str(path), cache_dir, size or default_cache_size(224))]
    if not path.is_file():
        raise AblateError(f"{source}: no such spec file or directory (allowed: a spec .yaml or an image-folder "
                          "tree with train/<class>/ and val/<class>/)")
    from ablate.spec import load_spec

    spec = load_spec(path)
    configs = [cell.config for cell in spec.cells()] or [spec.base]
    if spec.search is not None and "model.image_size" in spec.search.space:
        param = spec.search.space["model.image_size"]
        sizes = param.choices or []
        configs += [spec.resolve({"model.image_size": s}) for s in sizes]
    targets = []
    for cfg in configs:
        if not cfg.data.needs_root:
            raise AblateError(f"{source}: data.name: {cfg.data.name} is not read from image files "
                              "(allowed: imagenet100, imagefolder)")
        target = CacheTarget(cfg.data.root, cache_dir or cfg.data.cache_dir,
                             size or cfg.data.cache_size or default_cache_size(cfg.model.image_size))
        if target not in targets:
            targets.append(target)
    return targets


# ---- reading ----------------------------------------------------------------------------

@dataclass
class CachedSplit:
    path: Path
    images: torch.Tensor  # uint8 (N, S, S, 3), memory-mapped
    labels: torch.Tensor  # int64 (N,), -1 for skipped rows
    rows: torch.Tensor  # usable rows
    classes: list[str]
    size: int
    skipped: list[str]


def open_cache(path: Path) -> CachedSplit:
    """Memory-map a built split cache (copy-on-write: nothing ever writes to the file)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')} (allowed: {FORMAT_VERSION})")
        images = np.load(path / "images.npy", mmap_mode="c")
        labels = np.load(path / "labels.npy")
        if images.shape != (meta["rows"], meta["size"], meta["size"], 3) or labels.shape != (meta["rows"],):
            raise ValueError(f"arrays {images.shape} / {labels.shape} do not match meta.json")
    except (OSError, ValueError, KeyError) as e:
        raise AblateError(f"{path}: unreadable cache ({e}); rebuild it with `ablate data cache ... --force`") from None
    labels_t = torch.from_numpy(labels)
    return CachedSplit(path, torch.from_numpy(images), labels_t, torch.nonzero(labels_t >= 0).squeeze(1),
                       list(meta["classes"]), int(meta["size"]), [s["path"] for s in meta["skipped"]])
