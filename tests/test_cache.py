"""The uint8 cache stores whole images and crops them as the folder loader does; it notices
a changed image tree and a cache in the old layout."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ablate.cli import cli
from ablate.config import CellConfig
from ablate.data.batch_transforms import PackedBatch, resize_crops, sample_crop_boxes
from ablate.data.cache import build_cache, open_cache, split_cache_path, stored_shape
from ablate.data.constants import CROP_RATIO
from ablate.data.loaders import build_loaders
from ablate.data.scan import scan_split
from ablate.data.seeding import generator
from ablate.errors import AblateError
from imagetree import make_tree, photo

CPU = torch.device("cpu")
GREY_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255  # normalised units -> grey levels
#: original sizes (width, height): 4:3 landscape and portrait, ImageNet's 500x333, square,
#: a 3:1 panorama (many crops fall back to the centre crop), and two over twice the stored
#: side (decoded at a reduced JPEG scale)
SIZES = [(500, 375), (375, 500), (500, 333), (300, 300), (900, 300), (1200, 900), (2000, 1000)]
DRAFT = {(1200, 900), (2000, 1000)}


def quiet(_):
    pass


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """One picture of each of SIZES, the same ones in train/ and val/, cached at 256."""
    root = tmp_path_factory.mktemp("photos") / "images"
    for i, size in enumerate(SIZES):
        for split in ("train", "val"):
            path = root / split / "a" / f"{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(i, size, noise=8).save(path, quality=90)
    build_cache(root, 256, workers=1, progress=False, log=quiet)
    return root


def cfg(root, loader="auto", image_size=224, **data) -> CellConfig:
    return CellConfig.model_validate({"data": {"name": "imagefolder", "root": str(root), "workers": 0,
                                               "loader": loader, **data},
                                      "model": {"image_size": image_size, "patch_size": 16, "width": 16, "depth": 1},
                                      "train": {"batch_size": 8}})


# ---- what is stored ------------------------------------------------------------------------

def test_cache_stores_each_whole_image_at_its_short_side(photos):
    cached = open_cache(split_cache_path(photos / ".ablate-cache", "train", 256), scan_split(photos, "train"))
    batch = cached.images.gather(torch.arange(len(SIZES)))
    assert [(w, h) for w, h in zip(batch.widths.tolist(), batch.heights.tolist())] == \
        [stored_shape(w, h, 256) for w, h in SIZES]
    assert torch.equal(cached.images.heights, batch.heights) and torch.equal(cached.images.widths, batch.widths)
    assert batch.transposed.tolist() == [w > h for w, h in SIZES]  # landscape images are stored transposed
    assert cached.images.pixels.shape == (sum(max(stored_shape(w, h, 256)) for w, h in SIZES), 256, 3)
    # image 0 (500x375 -> 341x256) comes back whole, in its own orientation
    from ablate.data.cache import decode_resized

    stored = decode_resized(str(photos / "train" / "a" / "0.JPEG"), 256)
    assert stored.shape == (256, 341, 3)
    first = batch.pixels[: int(batch.length[0])].permute(1, 0, 2)  # un-transpose
    assert np.array_equal(first.numpy(), stored)


# ---- training crops: torchvision's RandomResizedCrop, relative to the whole image ---------------

def box_statistics(x0, y0, w, h, width, height) -> dict[str, np.ndarray]:
    """Area fraction, log aspect ratio and centre of boxes, relative to their image."""
    return {"area": w * h / (width * height), "log_aspect": np.log(w / h),
            "centre_x": (x0 + w / 2) / width, "centre_y": (y0 + h / 2) / height}


RANGES = {"area": (0, 1), "log_aspect": (math.log(3 / 4), math.log(4 / 3)), "centre_x": (0, 1), "centre_y": (0, 1)}


def total_variation(a: np.ndarray, b: np.ndarray, value_range) -> float:
    """Half the L1 distance of 25-bin histograms (25 bins: 0.5 is a bin's middle, not an edge)."""
    ha = np.histogram(a, 25, value_range)[0] / len(a)
    hb = np.histogram(b, 25, value_range)[0] / len(b)
    return 0.5 * float(np.abs(ha - hb).sum())


@pytest.mark.parametrize("index", [0, 1, 4])
def test_crop_boxes_are_distributed_as_random_resized_crop_on_the_original(photos, index):
    """20,000 boxes of the cache path on an image's stored geometry against 20,000 of
    torchvision's ``RandomResizedCrop.get_params`` on the original image: every statistic's
    histogram within 0.035 total variation (sampling noise alone is about 0.02), while the
    old centre-square layout is off by more than 0.1."""
    from torchvision.transforms import RandomResizedCrop

    width, height = SIZES[index]
    cached = open_cache(split_cache_path(photos / ".ablate-cache", "train", 256), scan_split(photos, "train"))
    heights, widths = cached.images.heights[index].expand(20000), cached.images.widths[index].expand(20000)
    boxes = sample_crop_boxes(heights, widths, (0.08, 1.0), CROP_RATIO, g=generator(index)).numpy()
    sw, sh = stored_shape(width, height, 256)
    ours = box_statistics(boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], sw, sh)
    torch.manual_seed(index)
    original = torch.empty(3, height, width)
    ref = np.array([RandomResizedCrop.get_params(original, (0.08, 1.0), CROP_RATIO) for _ in range(20000)], float)
    theirs = box_statistics(ref[:, 1], ref[:, 0], ref[:, 3], ref[:, 2], width, height)
    # the old layout: boxes inside the centre square of the stored image
    square = sample_crop_boxes(256, 256, (0.08, 1.0), CROP_RATIO, g=generator(index), n=20000).numpy()
    dx, dy = (sw - 256) // 2, (sh - 256) // 2
    old = box_statistics(square[:, 0] + dx, square[:, 1] + dy, square[:, 2] - square[:, 0],
                         square[:, 3] - square[:, 1], sw, sh)
    distance = {k: total_variation(theirs[k], ours[k], RANGES[k]) for k in RANGES}
    assert max(distance.values()) < 0.035, distance
    assert max(total_variation(theirs[k], old[k], RANGES[k]) for k in RANGES) > 0.1


def test_crops_come_from_the_right_pixels_of_transposed_images(photos):
    """A box in an image's own coordinates crops the same pixels from the packed (transposed)
    storage as from the image itself, with either back-end."""
    from torchvision.transforms.v2 import functional as TF

    from ablate.data.cache import decode_resized

    cached = open_cache(split_cache_path(photos / ".ablate-cache", "train", 256), scan_split(photos, "train"))
    batch = cached.images.gather(torch.tensor([0, 1, 4]))
    boxes = torch.tensor([[10, 20, 210, 170], [30, 5, 130, 300], [500, 40, 700, 200]])  # x0, y0, x1, y1
    for backend in ("loop", "roi_align"):
        out = resize_crops(batch, boxes, 48, backend).float()
        for i, index in enumerate([0, 1, 4]):
            image = torch.from_numpy(decode_resized(str(photos / "train" / "a" / f"{index}.JPEG"), 256).copy())
            image = image.permute(2, 0, 1)
            x0, y0, x1, y1 = boxes[i].tolist()
            expected = TF.resize(image[:, y0:y1, x0:x1], [48, 48], antialias=True).float()
            tolerance = 1.0 if backend == "loop" else 4.0  # roi_align: another filter, same crop
            assert (out[i] - expected).abs().mean() < tolerance, (backend, index)


def test_crop_back_ends_are_the_same_function_on_any_device():
    """``roi_align`` (the CUDA default) and ``loop`` (the CPU default) run here on CPU tensors,
    on a packed batch mixing transposed and upright images: same crops, and an exact copy
    when the box already has the output size."""
    images = torch.stack([torch.from_numpy(np.array(photo(i, (40, 40), noise=5))) for i in range(3)])
    batch = PackedBatch(torch.cat([images[0], images[1].transpose(0, 1), images[2][:24]]),
                        torch.tensor([0, 40, 80]), torch.tensor([40, 40, 24]), torch.tensor([False, True, False]))
    assert batch.heights.tolist() == [40, 40, 24] and batch.widths.tolist() == [40, 40, 40]
    exact = torch.tensor([[3, 5, 19, 21], [10, 2, 26, 18], [20, 4, 36, 20]])
    for backend in ("loop", "roi_align"):
        out = resize_crops(batch, exact, 16, backend)
        assert torch.equal(out[1].round().to(torch.uint8), images[1][2:18, 10:26].permute(2, 0, 1)), backend
        assert torch.equal(out[2].round().to(torch.uint8), images[2][4:20, 20:36].permute(2, 0, 1)), backend
    boxes = torch.tensor([[0, 0, 40, 40], [5, 0, 35, 30], [0, 0, 40, 24]])
    loop, roi = (resize_crops(batch, boxes, 24, b).float() for b in ("loop", "roi_align"))
    assert (loop - roi).abs().mean() < 3


def test_gathering_in_threads_gives_the_same_batch(photos):
    """The copy a CUDA machine uses (several threads) and the CPU one (one), here both on
    CPU; only pinning the buffer needs CUDA."""
    cached = open_cache(split_cache_path(photos / ".ablate-cache", "train", 256), scan_split(photos, "train"))
    rows = torch.tensor([1, 4, 5])
    a, b = cached.images.gather(rows), cached.images.gather(rows, threads=2)
    whole = cached.images.pixels
    assert torch.equal(a.pixels, torch.cat([whole[341:682], whole[1322:2090], whole[2090:2431]]))
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.start, b.start) and torch.equal(a.length, b.length)
    assert a.start.tolist() == [0, 341, 341 + 768] and a.transposed.tolist() == [False, True, True]


# ---- evaluation crops: the folder loader's centre crop -----------------------------------------

def test_eval_crops_match_the_folder_loader(photos):
    """Pixel for pixel (below 1e-3 grey levels) where the image is decoded at full scale;
    images over twice the stored side are decoded at a reduced JPEG scale: within 1 grey
    level on average and 8 at most."""
    cache = build_loaders(cfg(photos, "cache"), CPU, log=quiet)
    folder = build_loaders(cfg(photos, "folder"), CPU, log=quiet)
    xc, yc = (torch.cat(t) for t in zip(*cache.val))
    xf, yf = (torch.cat(t) for t in zip(*folder.val))
    assert torch.equal(yc, yf) and xc.shape == xf.shape == (len(SIZES), 3, 224, 224)
    grey = ((xc - xf) * GREY_STD).abs()
    for i, size in enumerate(SIZES):
        if size in DRAFT:
            assert grey[i].mean() < 1 and grey[i].max() <= 8, size
        else:
            assert grey[i].max() < 1e-3, size


def test_eval_crops_with_a_non_default_cache_size(photos, tmp_path):
    """A cache at another short side keeps the same fraction of the image (224/256 of the
    short side) and resizes it: close to the folder loader's crop, not identical."""
    build_cache(photos, 300, cache_dir=str(tmp_path / "c300"), workers=1, progress=False, log=quiet)
    cache = build_loaders(cfg(photos, "cache", cache_dir=str(tmp_path / "c300"), cache_size=300), CPU, log=quiet)
    folder = build_loaders(cfg(photos, "folder"), CPU, log=quiet)
    grey = ((torch.cat([x for x, _ in cache.val]) - torch.cat([x for x, _ in folder.val])) * GREY_STD).abs()
    assert grey.mean() < 3


# ---- a changed tree, an old cache ------------------------------------------------------------

@pytest.fixture
def small_tree(tmp_path) -> Path:
    root = make_tree(tmp_path / "images", classes=2, per_class=3)
    build_cache(root, 36, workers=1, progress=False, log=quiet)
    return root


def small_cfg(root, loader="cache") -> CellConfig:
    return cfg(root, loader, image_size=32)


def refused(root, loader="cache") -> str:
    with pytest.raises(AblateError) as e:
        build_loaders(small_cfg(root, loader), CPU, log=quiet)
    return str(e.value)


@pytest.mark.parametrize("change", ["touch", "rewrite", "add", "remove", "rename", "new class"])
def test_a_changed_tree_makes_the_cache_stale(small_tree, change):
    image = small_tree / "train" / "c0" / "1.JPEG"
    if change == "touch":
        st = image.stat()
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "rewrite":
        photo(99, (40, 30)).save(image, quality=50)
    elif change == "add":
        shutil.copy(image, image.with_name("9.JPEG"))
    elif change == "remove":
        image.unlink()
    elif change == "rename":
        image.rename(image.with_name("renamed.JPEG"))
    else:
        shutil.copytree(small_tree / "train" / "c0", small_tree / "train" / "c9")
        shutil.copytree(small_tree / "val" / "c0", small_tree / "val" / "c9")
    for loader in ("cache", "auto"):
        message = refused(small_tree, loader)
        assert "\n" not in message and "stale cache" in message
        assert f"ablate data cache {small_tree} --size 36 --force" in message
    if change in ("add", "remove", "rename"):
        assert "1 added" in message or "1 removed" in message
    # `ablate data cache` rebuilds it, saying why, and training reads the new tree
    result = CliRunner().invoke(cli, ["data", "cache", str(small_tree), "--size", "36", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "rebuilding" in result.output and "rebuilt" in result.output
    loaders = build_loaders(small_cfg(small_tree), CPU, log=quiet)
    assert loaders.n_train == len(scan_split(small_tree, "train").samples)


def test_an_unchanged_tree_keeps_its_cache(small_tree):
    meta = (small_tree / ".ablate-cache" / "train-36" / "meta.json").stat().st_mtime_ns
    assert build_loaders(small_cfg(small_tree), CPU, log=quiet).kind == "cache"
    again = build_cache(small_tree, 36, workers=1, progress=False, log=quiet)
    assert again["train"]["built"] is False and again["train"]["rebuilt"] is None
    assert (small_tree / ".ablate-cache" / "train-36" / "meta.json").stat().st_mtime_ns == meta


def test_a_cache_in_the_old_centre_square_layout_is_refused_and_rebuilt(small_tree):
    """Format 1 (centre squares, ``images.npy``) as the previous version wrote it."""
    old = small_tree / ".ablate-cache" / "train-36"
    shutil.rmtree(old)
    old.mkdir()
    split = scan_split(small_tree, "train")
    np.save(old / "images.npy", np.zeros((len(split.samples), 36, 36, 3), np.uint8))
    np.save(old / "labels.npy", np.array([label for _, label in split.samples], np.int64))
    (old / "meta.json").write_text(json.dumps({
        "format": 1, "storage": "short side resized to S (PIL bilinear), centre S x S crop, uint8 RGB (N, S, S, 3)",
        "size": 36, "split": "train", "source": str(split.root), "classes": split.classes,
        "rows": len(split.samples), "images": len(split.samples), "skipped": []}))
    message = refused(small_tree)
    assert "format 1" in message and "centre S x S" in message and "--force" in message
    summary = build_cache(small_tree, 36, workers=1, progress=False, log=quiet)
    assert summary["train"]["built"] and "format 1" in summary["train"]["rebuilt"]
    assert build_loaders(small_cfg(small_tree), CPU, log=quiet).kind == "cache"
