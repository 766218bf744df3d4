"""``build_loaders(cfg, device)``: the train and validation batches of one cell.

Which path runs (``Loaders.kind``, recorded in MLflow by the runner):

* ``memory``: digits, held in memory as uint8, augmented as batched tensor ops;
* ``cache``: an image-folder dataset decoded once into a uint8 memory map
  (:mod:`ablate.data.cache`), augmented as batched tensor ops on ``device``;
* ``folder``: the plain PIL + DataLoader path (:mod:`ablate.data.folder`);
* ``synthetic``: random tensors.

``data.loader`` chooses between ``cache`` and ``folder``: ``auto`` takes the cache when one
exists for this size, ``cache`` requires it, ``folder`` never uses it. Both train the same
recipe; where the tensor path cannot (an AutoAugment or AugMix policy), ``auto`` says so and
decodes image files, and ``cache`` refuses. A cache of an image tree that has changed since
it was built (or in an older format) is refused with the command that rebuilds it.

Every path also gives ``train_eval``: a fixed subset of the training split
(:mod:`ablate.data.subset`, ``train.eval_train_images`` images) through the validation
transform, in order, each image once over the ranks: what ``train_top1`` is measured on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ablate.config import NUM_CLASSES, CellConfig
from ablate.data.array_loader import ArrayBatches
from ablate.data.batch_transforms import EvalBatchTransform, TrainBatchTransform, default_backend
from ablate.data.cache import cache_exists, cache_root, default_cache_size, open_cache, split_cache_path
from ablate.data.constants import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size
from ablate.data.digits import load_digits_split
from ablate.data.folder import FolderBatches, usable_workers
from ablate.data.scan import FolderSplit, expand_root, scan_tree
from ablate.data.subset import fixed_subset
from ablate.data.synthetic import SyntheticBatches, SyntheticTrainSubset
from ablate.data.transforms import folder_transforms
from ablate.errors import AblateError


@dataclass
class Loaders:
    """The data of one cell.

    ``train`` yields ``(images float32 (B, C, H, W) normalised, targets int64 (B,))`` and
    drops the last incomplete batch (batch Mixup needs full, even batches); ``val`` keeps
    every image. Batches may already be on the device (memory, cache and synthetic paths).
    ``train_eval`` (``None`` when ``train.eval_train_images`` is 0) is the fixed subset of
    the training split, ``n_train_eval`` images, batched like ``val`` and with its transform;
    it has no epoch (the same images, the same pixels, every epoch).
    """
    train: Iterable[tuple[torch.Tensor, torch.Tensor]]
    val: Iterable[tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    kind: str
    n_train: int
    n_val: int
    train_eval: Optional[Iterable[tuple[torch.Tensor, torch.Tensor]]] = None
    n_train_eval: int = 0

    def set_split(self, split) -> None:
        """Train batches as ``split`` (a :class:`ablate.batching.BatchSplit`) says: this rank's
        images of each global batch, in its micro-batch order."""
        self.train.split = split

    def set_epoch(self, epoch: int) -> None:
        """Shuffle order and augmentation of ``epoch`` depend only on (train.seed, epoch): a
        resumed run sees exactly the batches an uninterrupted one would."""
        for batches in (self.train, self.val):
            batches.set_epoch(epoch)

    def skipped(self) -> int:
        """Distinct unreadable or non-image files skipped so far (each one is logged once)."""
        train = set(self.train.skipped_paths)
        if self.train_eval is not None:
            train |= self.train_eval.skipped_paths  # the same split: a file counts once
        return len(train) + len(self.val.skipped_paths)


def build_loaders(cfg: CellConfig, device: torch.device, *, log: Callable[[str], None] = print,
                  processes: int = 1, rank: int = 0) -> Loaders:
    """The train/val batches for ``cfg`` (see the module docstring for the paths), for rank
    ``rank`` of ``processes``: every rank draws the whole global batch's augmentation (or keys it
    by sample) and keeps its share; validation is split into contiguous shares, each image once."""
    device = torch.device(device)
    name = cfg.data.name
    share = dict(processes=processes, rank=rank)
    if name == "digits":
        return _digits(cfg, device, share)
    if name == "synthetic":
        return _synthetic(cfg, device, share)
    return _image_folder(cfg, device, log, share)


def _train_transform(cfg: CellConfig, mean, std, device: torch.device):
    t = cfg.train
    return TrainBatchTransform(size=cfg.model.image_size, scale=(t.crop_scale, 1.0), hflip=t.hflip, mean=mean,
                               std=std, out_chans=cfg.model.in_chans, randaugment=t.randaugment,
                               random_erasing=t.random_erasing, backend=default_backend(device))


def _eval_transform(cfg: CellConfig, mean, std, device: torch.device, crop_fraction: float):
    return EvalBatchTransform(size=cfg.model.image_size, mean=mean, std=std, out_chans=cfg.model.in_chans,
                              crop_fraction=crop_fraction, backend=default_backend(device))


def _train_subset(cfg: CellConfig, train: ArrayBatches, val: ArrayBatches, common: dict) -> dict:
    """``train_eval`` of the array paths (memory, cache): the fixed subset of ``train``'s usable
    rows, through ``val``'s transform; nothing when measuring is off."""
    subset = fixed_subset(len(train.rows), cfg.train.eval_train_images)
    if subset is None:
        return {}
    rows = train.rows[subset]
    batches = ArrayBatches(train.images, train.labels, val.transform, train=False, rows=rows, **common)
    batches.skipped_paths = train.skipped_paths  # the same split's files: each logged and counted once
    return dict(train_eval=batches, n_train_eval=len(rows))


def _digits(cfg: CellConfig, device: torch.device, share: dict) -> Loaders:
    d = load_digits_split()
    mean, std = (d.mean,), (d.std,)
    common = dict(batch_size=cfg.train.batch_size, seed=cfg.train.seed, device=device, **share)
    train = ArrayBatches(d.train_images, d.train_labels, _train_transform(cfg, mean, std, device), train=True, **common)
    val = ArrayBatches(d.val_images, d.val_labels, _eval_transform(cfg, mean, std, device, 1.0), train=False, **common)
    return Loaders(train, val, 10, "memory", len(d.train_labels), len(d.val_labels),
                   **_train_subset(cfg, train, val, common))


def _synthetic(cfg: CellConfig, device: torch.device, share: dict) -> Loaders:
    d, m = cfg.data, cfg.model
    shape = (m.in_chans, m.image_size, m.image_size)
    common = dict(batch_size=cfg.train.batch_size, seed=cfg.train.seed, device=device, **share)
    train = SyntheticBatches(d.train_size, d.num_classes, shape, train=True, **common)
    val = SyntheticBatches(d.val_size, d.num_classes, shape, train=False, **common)
    subset = {}
    if cfg.train.eval_train_images:
        train_eval = SyntheticTrainSubset(d.train_size, cfg.train.eval_train_images, d.num_classes, shape, **common)
        if train_eval.n:
            subset = dict(train_eval=train_eval, n_train_eval=train_eval.n)
    return Loaders(train, val, d.num_classes, "synthetic", d.train_size, d.val_size, **subset)


def _image_folder(cfg: CellConfig, device: torch.device, log: Callable[[str], None], share: dict) -> Loaders:
    d = cfg.data
    root = expand_root(d.root)
    if cfg.model.in_chans != 3:
        raise AblateError(f"model.in_chans: {cfg.model.in_chans} does not fit the RGB images of {root} (allowed: 3)")
    splits = scan_tree(root)
    size = d.cache_size or default_cache_size(cfg.model.image_size)
    where = cache_root(root, d.cache_dir)
    paths = {split: split_cache_path(where, split, size) for split in ("train", "val")}
    missing = [str(p) for p in paths.values() if not cache_exists(p)]
    if d.loader == "cache" and missing:
        source = d.root if d.root else str(root)
        option = f" --out {d.cache_dir}" if d.cache_dir else ""
        raise AblateError(f"data.loader: cache: no cache at {', '.join(missing)}; build it with: "
                          f"ablate data cache {source} --size {size}{option}")
    if d.loader == "folder" or missing:
        if d.loader == "auto":
            log(f"data: no uint8 cache at {where} for size {size}; decoding image files "
                f"(`ablate data cache {d.root} --size {size}` makes this faster)")
        return _folder(cfg, root, splits, device, log, share)
    try:
        train_tf = _train_transform(cfg, IMAGENET_MEAN, IMAGENET_STD, device)
    except AblateError as e:
        if d.loader == "cache":
            raise
        log(f"data: not using the uint8 cache: {e}; decoding image files")
        return _folder(cfg, root, splits, device, log, share)
    return _cache(cfg, splits, paths, train_tf, device, log, share)


def _folder(cfg: CellConfig, root: Path, splits: dict, device: torch.device, log: Callable[[str], None],
            share: dict) -> Loaders:
    train_tf, val_tf = folder_transforms(cfg)
    workers = usable_workers(cfg.data.workers)
    common = dict(batch_size=cfg.train.batch_size, seed=cfg.train.seed, workers=workers, device=device, log=log,
                  **share)
    train = FolderBatches(splits["train"], train_tf, train=True, **common)
    val = FolderBatches(splits["val"], val_tf, train=False, **common)
    _check_classes(cfg, splits["train"].classes, root)
    log(f"data: folder loader on {root}: {len(splits['train'].samples)} train / {len(splits['val'].samples)} val "
        f"images, {len(splits['train'].classes)} classes, {workers} workers")
    subset, whole = {}, splits["train"]
    positions = fixed_subset(len(whole.samples), cfg.train.eval_train_images)
    if positions is not None:
        # the split's files that are not images were logged by the training loader: not again
        part = FolderSplit(whole.root, whole.classes, [whole.samples[i] for i in positions.tolist()])
        train_eval = FolderBatches(part, val_tf, train=False, **common)
        train_eval.skipped_paths = train.skipped_paths  # an unreadable image is logged and counted once
        subset = dict(train_eval=train_eval, n_train_eval=len(part.samples))
    return Loaders(train, val, len(splits["train"].classes), "folder",
                   len(splits["train"].samples), len(splits["val"].samples), **subset)


def _cache(cfg: CellConfig, splits: dict, paths: dict[str, Path], train_tf, device: torch.device,
           log: Callable[[str], None], share: dict) -> Loaders:
    train_c, val_c = (open_cache(paths[s], splits[s], cache_dir=cfg.data.cache_dir) for s in ("train", "val"))
    if train_c.size < cfg.model.image_size:
        log(f"data: warning: cache size {train_c.size} is smaller than model.image_size {cfg.model.image_size}")
    common = dict(batch_size=cfg.train.batch_size, seed=cfg.train.seed, device=device, **share)
    # evaluation keeps the fraction of the short side the folder loader's centre crop keeps
    # (224 of 256): exactly its pixels when the cache has the default size
    crop = min(1.0, cfg.model.image_size / eval_resize_size(cfg.model.image_size))
    skipped = {}
    for split, cached in (("train", train_c), ("val", val_c)):
        skipped[split] = [(path, "could not be decoded when the cache was built") for path in cached.undecodable]
        skipped[split] += splits[split].skipped
        for path, reason in skipped[split]:
            log(f"data: skipped {path}: {reason}")
    train = ArrayBatches(train_c.images, train_c.labels, train_tf, train=True, rows=train_c.rows,
                         skipped_paths=[p for p, _ in skipped["train"]], **common)
    val = ArrayBatches(val_c.images, val_c.labels, _eval_transform(cfg, IMAGENET_MEAN, IMAGENET_STD, device, crop),
                       train=False, rows=val_c.rows, skipped_paths=[p for p, _ in skipped["val"]], **common)
    _check_classes(cfg, train_c.classes, paths["train"])
    log(f"data: uint8 cache {paths['train'].parent} (short side {train_c.size}): {len(train_c.rows)} train / "
        f"{len(val_c.rows)} val images, {len(train_c.classes)} classes, augmented on {device}")
    return Loaders(train, val, len(train_c.classes), "cache", len(train_c.rows), len(val_c.rows),
                   **_train_subset(cfg, train, val, common))


def _check_classes(cfg: CellConfig, classes: list[str], where) -> None:
    expected = NUM_CLASSES.get(cfg.data.name)
    if cfg.data.needs_root and expected is not None and len(classes) != expected:
        raise AblateError(f"data.root: {where} has {len(classes)} classes, {cfg.data.name} has {expected} "
                          f"(allowed: a tree made by `ablate data {cfg.data.name}`, or data.name: imagefolder)")
