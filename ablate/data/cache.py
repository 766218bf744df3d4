"""The decode-once cache: every image of a split, whole, in one uint8 memory-mapped array.

JPEG decoding, not the model, limits a small S²-MLP on a big GPU: an ImageNet100 epoch of a
one-block 112-px ablation cell needs tens of thousands of images per second, far beyond what
PIL decodes on a few cores. ``ablate data cache`` therefore decodes each image once.

What is stored (format 2): each image whole, its short side resized to ``S`` and its long
side in proportion (PIL bilinear, antialiased, sizes as torchvision's ``Resize(S)`` computes
them: what timm's evaluation transform does before its centre crop). Training crops are
then drawn relative to the whole image, as the folder loader's ``RandomResizedCrop`` draws
them, and evaluation takes the same centre crop. (Format 1 kept only the centre ``S x S``
square, so training never saw the sides of a 4:3 image; such a cache is refused.)

Layout of ``<cache root>/<split>-<S>/``, where the cache root is ``data.cache_dir`` or
``<data root>/.ablate-cache``:

* ``pixels.npy`` ``(T, S, 3)`` uint8: the images one after another, each with its short side
  across (a landscape image is stored transposed), so that one array holds them all with no
  padding and an image is one contiguous block;
* ``geometry.npy`` ``(N, 3)`` int64: per image its first row, its number of rows (the
  stored long side; 0 for an image that could not be read) and whether it is transposed;
* ``labels.npy`` int64 ``(N,)``: ``-1`` for an image that could not be decoded (skipped,
  counted, listed in ``meta.json``);
* ``meta.json``: format, size, classes, skipped files, and the fingerprint digest of the
  image tree; ``files.json``: that fingerprint (names, sizes, modification times), so that
  a changed tree is noticed and described (:class:`ablate.data.scan.TreeFingerprint`).

Rows are written in parallel by a process pool into the memory map; the build happens in a
temporary sibling directory renamed into place at the end, so a killed or failed build
leaves no half-written cache (a later build removes the debris).

With ``S = floor(image_size / 0.875)`` (the default: 256 for 224 px, 128 for 112 px)
evaluation on the cache sees exactly the pixels of the folder loader's resize + centre crop
(up to JPEG draft decoding of images over twice ``S``: see :func:`decode_resized`).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ablate.data.array_loader import PackedImages
# the layout (where a cache lives, its format) and its staleness are torch-free, for the spec checks
from ablate.data.cache_check import (FORMAT_VERSION, cache_root, default_cache_size,  # noqa: F401 (the API)
                                     split_cache_path, stale_reason)
from ablate.data.scan import FolderSplit, expand_root, scan_split
from ablate.devices import usable_cpus
from ablate.errors import AblateError
from ablate.liveness import pid_alive
from ablate.spec import load_spec

STORAGE = ("whole image, short side resized to S (PIL bilinear), long side in proportion; "
           "packed rows (T, S, 3) uint8, landscape images transposed")
_CHUNK = 32


def cache_exists(path: Path) -> bool:
    return (Path(path) / "meta.json").is_file()


def rebuild_command(source: Path, size: int, cache_dir: Optional[str] = None) -> str:
    option = f" --out {cache_dir}" if cache_dir else ""
    return f"ablate data cache {source} --size {size}{option} --force"


# ---- decoding ---------------------------------------------------------------------------

def stored_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of an image after its short side is resized to ``size``, as
    torchvision's ``Resize(size)`` computes it."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def decode_resized(path: str, size: int) -> np.ndarray:
    """One image as uint8 ``(height, width, 3)``, its short side resized to ``size``.

    A JPEG is decoded at a reduced DCT scale (PIL's ``draft``) when the image is at least
    twice ``size`` on both sides: much faster, and the result then differs from a full
    decode + resize by about one grey level on average. The output size is computed from
    the original size, so it is always the folder loader's.
    """
    with Image.open(path) as im:
        width, height = im.size
        im.draft("RGB", (size, size))  # JPEG: libjpeg decodes at a scale that keeps both sides >= size
        im = im.convert("RGB")
    shape = stored_shape(width, height, size)
    if im.size != shape:
        im = im.resize(shape, Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:  # reads the header only
        return im.size


_worker_pixels: Optional[np.ndarray] = None


def _open_pixels(pixels_path: str) -> None:
    global _worker_pixels
    _worker_pixels = np.load(pixels_path, mmap_mode="r+") if pixels_path else None


def _read_sizes(task: tuple[int, list[tuple[int, str]]]) -> list[tuple[int, Optional[tuple[int, int]], Optional[str]]]:
    """``(row, (width, height) or None, failure reason or None)`` for each ``(row, path)``."""
    _, items = task
    results = []
    for row, path in items:
        try:
            results.append((row, _image_size(path), None))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for files it cannot identify
            results.append((row, None, f"{type(e).__name__}: {e}"))
    return results


def _decode_rows(task: tuple[int, list[tuple[int, str, int, int, bool]]]) -> list[tuple[int, Optional[str]]]:
    """Decode ``(row, path, start, length, transposed)`` items straight into the shared memory
    map; return the failures."""
    size, items = task
    results = []
    for row, path, start, length, transposed in items:
        try:
            image = decode_resized(path, size)
        except Exception as e:  # noqa: BLE001 - an undecodable image (any PIL error) is skipped, not fatal
            results.append((row, f"{type(e).__name__}: {e}"))
            continue
        block = image.transpose(1, 0, 2) if transposed else image
        if block.shape != (length, size, 3):  # the file changed since its header was read
            results.append((row, f"changed while caching ({block.shape[:2]} rows x cols, expected {(length, size)})"))
            continue
        _worker_pixels[start:start + length] = block
        results.append((row, None))
    return results


def _run(fn, tasks, workers: int, pixels_path: str, progress: Callable[[int], None]) -> list:
    """``fn`` over ``tasks`` in a pool of ``workers`` processes (1: here), in any order."""
    out = []
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_open_pixels, initargs=(pixels_path,))
            results = pool.imap_unordered(fn, tasks)
        else:
            _open_pixels(pixels_path)
            results = map(fn, tasks)
        for chunk in results:
            out += chunk
            progress(len(chunk))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _open_pixels("")
    return out


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

    An existing cache is kept when it is current; one in an older format or of a tree that
    has changed since is rebuilt (``rebuilt`` in the summary says why); ``force`` always
    rebuilds. ``workers`` decoding processes (0: one per usable CPU; 1: in this process).
    ``on_progress(done)`` is called after every chunk of images. Returns a summary dict.
    """
    out = Path(out)
    rebuilt = "--force" if force and cache_exists(out) else None
    if cache_exists(out) and not force:
        rebuilt = stale_reason(out, split)
        if rebuilt is None:
            meta = json.loads((out / "meta.json").read_text())
            return {"path": str(out), "images": meta["images"], "skipped": len(meta["skipped"]), "seconds": 0.0,
                    "built": False, "rebuilt": None}
        log(f"data: rebuilding {out}: {rebuilt}")
    if not split.samples:
        raise AblateError(f"{split.root}: no images to cache (allowed: {split.root}/<class>/<image>)")
    fingerprint = split.fingerprint()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_builds(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    start_time = time.perf_counter()
    n = len(split.samples)
    workers = workers or usable_cpus()
    bar = tqdm(total=2 * n, desc=f"cache {split.root.name}-{size}", unit="img", disable=not progress, mininterval=1.0)
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        bar.update(k)
        if on_progress is not None:
            on_progress(done)

    try:
        tmp.mkdir()
        # pass 1: image sizes from the headers, hence each image's place in the packed array
        chunks = [(size, [(i, split.samples[i][0]) for i in range(s, min(n, s + _CHUNK))]) for s in range(0, n, _CHUNK)]
        failures: dict[int, str] = {}
        geometry = np.zeros((n, 3), dtype=np.int64)
        for row, wh, reason in _run(_read_sizes, chunks, workers, "", advance):
            if wh is None:
                failures[row] = reason
                continue
            w, h = stored_shape(*wh, size)
            geometry[row, 1:] = (max(w, h), w > h)
        geometry[:, 0] = np.cumsum(geometry[:, 1]) - geometry[:, 1]
        pixels_path = tmp / "pixels.npy"
        total = int(geometry[:, 1].sum())
        np.lib.format.open_memmap(pixels_path, mode="w+", dtype=np.uint8, shape=(total, size, 3)).flush()
        # pass 2: decode into the memory map
        todo = [i for i in range(n) if i not in failures]
        tasks = [(size, [(i, split.samples[i][0], *map(int, geometry[i][:2]), bool(geometry[i][2]))
                         for i in todo[s:s + _CHUNK]]) for s in range(0, len(todo), _CHUNK)]
        advance(len(failures))
        for row, reason in _run(_decode_rows, tasks, workers, str(pixels_path), advance):
            if reason is not None:
                failures[row] = reason
        if split.fingerprint() != fingerprint:
            raise AblateError(f"{split.root}: images changed while the cache was being built; run the command again")
        labels = np.array([label for _, label in split.samples], dtype=np.int64)
        skipped = []
        for row in sorted(failures):
            labels[row] = -1
            skipped.append({"path": split.samples[row][0], "reason": failures[row]})
            log(f"data: skipped {split.samples[row][0]}: {failures[row]}")
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "geometry.npy", geometry)
        (tmp / "files.json").write_text(json.dumps(fingerprint.to_json()))
        meta = {"format": FORMAT_VERSION, "storage": STORAGE, "size": size, "split": split.root.name,
                "source": str(split.root), "source_digest": fingerprint.digest(), "classes": split.classes,
                "rows": n, "pixel_rows": total, "images": n - len(skipped),
                "skipped": skipped + [{"path": p, "reason": r} for p, r in split.skipped]}
        with open(pixels_path, "rb+") as f:
            os.fsync(f.fileno())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out.exists():  # a rebuild: swap the old cache out only once the new one is complete
            old = out.parent / f".tmp-{out.name}-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(out), "images": meta["images"], "skipped": len(meta["skipped"]),
            "seconds": time.perf_counter() - start_time, "built": True, "rebuilt": rebuilt}


def build_cache(data_root: str | Path, size: int, *, cache_dir: Optional[str] = None,
                splits: Sequence[str] = ("train", "val"), workers: int = 0, force: bool = False,
                progress: bool = True, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Cache every split of the image-folder tree ``data_root`` at short side ``size``.

    Labels follow the training split's sorted class folders, as the folder loader's do.
    Returns ``{split: {"path", "images", "skipped", "seconds", "built", "rebuilt"}}``.
    """
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
                              "(allowed: imagenet100, imagenet1k, imagefolder)")
        target = CacheTarget(cfg.data.root, cache_dir or cfg.data.cache_dir,
                             size or cfg.data.cache_size or default_cache_size(cfg.model.image_size))
        if target not in targets:
            targets.append(target)
    return targets


# ---- reading ----------------------------------------------------------------------------

@dataclass
class CachedSplit:
    path: Path
    images: PackedImages  # pixels memory-mapped
    labels: torch.Tensor  # int64 (N,), -1 for skipped rows
    rows: torch.Tensor  # usable rows
    classes: list[str]
    size: int  # the stored short side
    undecodable: list[str]  # images that could not be decoded when the cache was built


def open_cache(path: Path, split: FolderSplit, *, cache_dir: Optional[str] = None) -> CachedSplit:
    """Memory-map the cache at ``path`` of the image folder ``split`` (copy-on-write: nothing
    ever writes to the file). A cache in another format, or of a tree that has changed since
    it was built, is refused with the command that rebuilds it."""
    path = Path(path)
    size = int(path.name.rsplit("-", 1)[-1])  # as split_cache_path names it
    rebuild = rebuild_command(split.root.parent, size, cache_dir)
    stale = stale_reason(path, split)
    if stale is not None:
        raise AblateError(f"{path}: stale cache: {stale}; rebuild it with: {rebuild}")
    try:
        meta = json.loads((path / "meta.json").read_text())
        pixels = np.load(path / "pixels.npy", mmap_mode="c")
        geometry = np.load(path / "geometry.npy")
        labels = np.load(path / "labels.npy")
        n = meta["rows"]
        if (meta["size"] != size or pixels.shape != (meta["pixel_rows"], size, 3) or geometry.shape != (n, 3) or labels.shape != (n,)
                or int(geometry[:, 1].sum()) != pixels.shape[0]):
            raise ValueError(f"arrays {pixels.shape} / {geometry.shape} / {labels.shape} do not match meta.json")
    except (OSError, ValueError, KeyError) as e:
        raise AblateError(f"{path}: unreadable cache ({e}); rebuild it with: {rebuild}") from None
    geometry_t = torch.from_numpy(geometry)
    images = PackedImages(torch.from_numpy(pixels), geometry_t[:, 0].clone(), geometry_t[:, 1].clone(),
                          geometry_t[:, 2].bool())
    labels_t = torch.from_numpy(labels)
    undecodable = [split.samples[i][0] for i in np.flatnonzero(labels < 0)]  # same files, same order: not stale
    return CachedSplit(path, images, labels_t, torch.nonzero(labels_t >= 0).squeeze(1), list(meta["classes"]), size,
                       undecodable)
