"""Images/s of the plain JPEG loader against the decode-once uint8 cache, same augmentation.

Generates (or reuses, with ``--root``) an image-folder tree of ImageNet-sized JPEGs (500x375,
smooth random content so files are a realistic ~70 KB), builds the cache with ``ablate data
cache``'s function, then measures in the same run, each over whole passes after a warm-up:

* ``--recipe crop`` (default): random resized crop (224), flip and normalisation only;
  ``folder`` is torchvision ``ImageFolder`` + PIL + ``DataLoader(num_workers=--workers)``,
  ``cache`` the memory-mapped whole images cropped and flipped as tensor ops on ``--device``;
* ``--recipe deit``: the full DeiT recipe (RandAugment rand-m9-mstd0.5-inc1, random erasing
  0.25) through ``ablate``'s own loaders, ``data.loader: folder`` against ``data.loader: cache``.

Prints ``name: value`` lines, among them both images/s and their ratio. Targets: ratio >= 2
on a 2-core CPU; with ``--device cuda``, the cache path >= 20,000 images/s at 224 px.

    python bench/data_speed.py                        # 2,000 images, about two minutes on 2 cores
    python bench/data_speed.py --recipe deit --images 600
    python bench/data_speed.py --device cuda --images 8000 --batch-size 512 --passes 5
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ablate.devices import usable_cpus


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="image-folder tree to use or create (default: a temp dir)")
    p.add_argument("--images", type=int, default=2000, help="images to generate in train/")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=224, help="output side of the random resized crop")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the folder path")
    p.add_argument("--passes", type=int, default=1, help="timed passes over the images, per path")
    p.add_argument("--device", default="cpu", help="where the cache path augments: cpu or cuda")
    p.add_argument("--recipe", choices=("crop", "deit"), default="crop",
                   help="crop: crop + flip only; deit: the full recipe through ablate's loaders")
    return p.parse_args()


# ---- the generated tree -------------------------------------------------------------------

def synthetic_photo(seed: int, width: int = 500, height: int = 375):
    """Smooth colour fields at two scales plus fine noise: compresses like a photo (~70 KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    medium = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    fine = rng.normal(0, 10, (height, width, 3))
    pixels = 0.6 * np.asarray(coarse, np.float32) + 0.4 * np.asarray(medium, np.float32) + fine
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(task: tuple[str, int]) -> None:
    path, seed = task
    synthetic_photo(seed).save(path, quality=90)


def make_tree(root: Path, images: int, classes: int) -> None:
    tasks = []
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            folder = root / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            tasks.append((str(folder / f"{split}_{i:06d}.JPEG"), i if split == "train" else 10**6 + i))
    todo = [t for t in tasks if not os.path.exists(t[0])]
    with multiprocessing.get_context("fork").Pool(usable_cpus()) as pool:
        pool.map(_write, todo, chunksize=16)


# ---- the two paths ------------------------------------------------------------------------

def folder_loader(root: Path, size: int, batch_size: int, workers: int):
    from torchvision import datasets, transforms

    from ablate.data.constants import IMAGENET_MEAN, IMAGENET_STD

    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), tf), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True)


def cache_loader(root: Path, size: int, batch_size: int, device: torch.device):
    from ablate.data.array_loader import ArrayBatches
    from ablate.data.batch_transforms import TrainBatchTransform, default_backend
    from ablate.data.cache import cache_root, default_cache_size, open_cache, split_cache_path
    from ablate.data.constants import IMAGENET_MEAN, IMAGENET_STD
    from ablate.data.scan import scan_split

    path = split_cache_path(cache_root(root), "train", default_cache_size(size))
    cached = open_cache(path, scan_split(root, "train"))
    transform = TrainBatchTransform(size=size, scale=(0.08, 1.0), hflip=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                    out_chans=3, backend=default_backend(device))
    return ArrayBatches(cached.images, cached.labels, transform, batch_size=batch_size, train=True, seed=0,
                        device=device, rows=cached.rows)


def deit_loader(root: Path, size: int, batch_size: int, workers: int, device: torch.device, loader: str):
    """ablate's own training loader for the full DeiT recipe (``loader``: folder or cache)."""
    from ablate.config import CellConfig
    from ablate.data.loaders import build_loaders

    cfg = CellConfig.model_validate({
        "data": {"name": "imagefolder", "root": str(root), "workers": workers, "loader": loader},
        "model": {"image_size": size, "patch_size": 16},
        "train": {"batch_size": batch_size, "randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25,
                  "crop_scale": 0.08}})
    return build_loaders(cfg, device, log=lambda _: None).train


def images_per_second(loader, passes: int, device: torch.device) -> float:
    """Whole passes over ``loader``, timed from its first batch (worker start-up excluded)."""
    rates = []
    for p in range(passes + 1):  # pass 0 warms up (page cache, workers, kernels)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(p)
        n, start = 0, None
        for images, _ in loader:
            if start is None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                continue
            n += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if p:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    tmp = None if args.root else tempfile.TemporaryDirectory(prefix="ablate-data-speed-")
    root = Path(args.root or tmp.name)
    start = time.perf_counter()
    make_tree(root, args.images, args.classes)
    sizes = [p.stat().st_size for p in (root / "train").rglob("*.JPEG")]
    print(f"root: {root}")
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"cpu_cores: {os.cpu_count()}")
    print(f"train_images: {len(sizes)}")
    print(f"jpeg_kb_mean: {statistics.mean(sizes) / 1024:.1f}")
    print(f"generate_seconds: {time.perf_counter() - start:.1f}")

    from ablate.data.cache import build_cache, default_cache_size
    cache_size = default_cache_size(args.size)
    splits = ("train", "val") if args.recipe == "deit" else ("train",)  # ablate's loaders open both
    summary = build_cache(root, cache_size, splits=splits, progress=False, log=lambda _: None)["train"]
    print(f"cache_size: {cache_size}")
    if summary["built"]:
        print(f"cache_build_seconds: {summary['seconds']:.1f}")
        print(f"cache_build_images_per_second: {summary['images'] / summary['seconds']:.0f}")

    print(f"recipe: {args.recipe}")
    if args.recipe == "deit":
        folder_batches = deit_loader(root, args.size, args.batch_size, args.workers, torch.device("cpu"), "folder")
        cache_batches = deit_loader(root, args.size, args.batch_size, args.workers, device, "cache")
    else:
        folder_batches = folder_loader(root, args.size, args.batch_size, args.workers)
        cache_batches = cache_loader(root, args.size, args.batch_size, device)
    folder = images_per_second(folder_batches, args.passes, torch.device("cpu"))
    cache = images_per_second(cache_batches, args.passes, device)
    print(f"folder_images_per_second: {folder:.0f}")
    print(f"cache_images_per_second: {cache:.0f}")
    print(f"speedup: {cache / folder:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
