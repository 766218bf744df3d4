"""Datasets and loaders: digits, synthetic, image folders with bad files, ImageNet100 layout,
the uint8 cache and its batched tensor augmentation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ablate.cli import cli
from ablate.config import CellConfig
from ablate.data.batch_transforms import TrainBatchTransform, random_erase, resize_crops, sample_crop_boxes
from ablate.data.cache import build_cache, build_split_cache, open_cache, split_cache_path
from ablate.data.scan import scan_split
from ablate.data.imagenet100 import build_imagenet100, cmc_classes
from ablate.data.loaders import build_loaders
from ablate.data.seeding import generator
from ablate.errors import AblateError

CPU = torch.device("cpu")
CLASSES = ("ant", "bee", "cat")


def config(**sections) -> CellConfig:
    base = {"model": {"image_size": 32, "patch_size": 4, "width": 16, "depth": 1},
            "train": {"batch_size": 4, "crop_scale": 0.5}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return CellConfig.model_validate(base)


def batches(iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in iterable]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def write_jpeg(path: Path, seed: int, size=(48, 36)) -> None:
    """A smooth random picture (so resizes of it are well-behaved), as a small JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=90)


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/{train,val}/<class>/ with 5 train and 2 val JPEGs per class, one truncated JPEG and
    one text file in train/."""
    root = tmp_path / "images"
    for c, name in enumerate(CLASSES):
        for i in range(5):
            write_jpeg(root / "train" / name / f"{i}.JPEG", 10 * c + i, size=(48, 36) if i % 2 else (36, 48))
        for i in range(2):
            write_jpeg(root / "val" / name / f"v{i}.jpg", 100 + 10 * c + i)
    good = (root / "train" / "ant" / "0.JPEG").read_bytes()
    (root / "train" / "ant" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    return root


# ---- digits and synthetic ----------------------------------------------------------------------

def test_digits_fixed_stratified_split():
    loaders = build_loaders(config(train={"batch_size": 64}), CPU)
    assert (loaders.kind, loaders.num_classes, loaders.n_train, loaders.n_val) == ("memory", 10, 1437, 360)
    assert len(loaders.train) == 1437 // 64 and len(loaders.val) == 6
    val = batches(loaders.val)
    assert [len(y) for _, y in val] == [64] * 5 + [40]  # validation keeps the last batch
    counts = torch.bincount(torch.cat([y for _, y in val]), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    x, y = next(iter(loaders.train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1])  # grayscale replicated to in_chans


def test_digits_batches_depend_only_on_seed_and_epoch():
    cfg = config(train={"batch_size": 64, "hflip": 0.5, "randaugment": "rand-m9-mstd0.5", "random_erasing": 0.25})
    first, second = build_loaders(cfg, CPU), build_loaders(cfg, CPU)
    first.set_epoch(3)
    epoch3 = batches(first.train)
    second.set_epoch(7)
    batches(second.train)  # whatever ran before does not matter
    second.set_epoch(3)
    assert same(epoch3, batches(second.train))
    second.set_epoch(4)
    assert not same(epoch3, batches(second.train))
    other_seed = build_loaders(config(train={**cfg.train.model_dump(), "seed": 1}), CPU)
    other_seed.set_epoch(3)
    assert not same(epoch3, batches(other_seed.train))
    assert same(batches(first.val), batches(second.val))


def test_synthetic_shapes_and_determinism():
    cfg = config(data={"name": "synthetic", "num_classes": 7, "train_size": 10, "val_size": 5},
                 model={"in_chans": 2})
    loaders = build_loaders(cfg, CPU)
    assert (loaders.kind, loaders.num_classes, loaders.n_train, loaders.n_val) == ("synthetic", 7, 10, 5)
    train = batches(loaders.train)
    assert [x.shape for x, _ in train] == [(4, 2, 32, 32)] * 2  # last incomplete batch dropped
    assert [len(y) for _, y in batches(loaders.val)] == [4, 1]
    assert all(y.dtype == torch.int64 and int(y.max()) < 7 for _, y in train)
    assert same(train, batches(build_loaders(cfg, CPU).train))
    loaders.set_epoch(1)
    assert not same(train, batches(loaders.train))


# ---- image folders -----------------------------------------------------------------------------

def test_folder_loader_skips_bad_files_and_counts_them(tree):
    logged = []
    loaders = build_loaders(config(data={"name": "imagefolder", "root": str(tree), "workers": 0},
                                   train={"batch_size": 4}), CPU, log=logged.append)
    assert (loaders.kind, loaders.num_classes, loaders.n_train, loaders.n_val) == ("folder", 3, 16, 6)
    for epoch in (1, 2):
        loaders.set_epoch(epoch)
        train = batches(loaders.train)
        assert all(len(y) % 2 == 0 for _, y in train)  # a batch that lost an image stays even
        assert sum(len(y) for _, y in train) == 14  # 4 batches of 4; the broken image's batch cut to 2
    val = batches(loaders.val)
    assert [len(y) for _, y in val] == [4, 2]
    assert torch.equal(torch.cat([y for _, y in val]), torch.tensor([0, 0, 1, 1, 2, 2]))
    x, _ = val[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert loaders.skipped() == 2
    skipped = [line for line in logged if "skipped" in line]
    assert len(skipped) == 2  # each bad file logged once, not once per epoch
    assert any("broken.jpg" in line for line in skipped) and any("notes.txt" in line for line in skipped)


def test_folder_batches_do_not_depend_on_worker_count(tree):
    def run(workers):
        loaders = build_loaders(config(data={"name": "imagefolder", "root": str(tree), "workers": workers},
                                       train={"batch_size": 4, "hflip": 0.5}), CPU, log=lambda _: None)
        loaders.set_epoch(5)
        return batches(loaders.train)

    assert same(run(0), run(2))


def test_folder_errors_name_the_path(tmp_path, tree):
    with pytest.raises(AblateError, match=str(tmp_path / "nowhere")):
        build_loaders(config(data={"name": "imagefolder", "root": str(tmp_path / "nowhere")}), CPU)
    (tmp_path / "only-train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(AblateError, match=r"only-train/val is missing"):
        build_loaders(config(data={"name": "imagefolder", "root": str(tmp_path / "only-train")}), CPU)
    with pytest.raises(AblateError, match="imagenet100 has 100"):
        build_loaders(config(data={"name": "imagenet100", "root": str(tree), "workers": 0}), CPU, log=lambda _: None)


# ---- ImageNet100 -------------------------------------------------------------------------------

@pytest.fixture
def fake_imagenet(tmp_path) -> Path:
    """CMC's 100 wnids x 2 files per split, plus 3 classes ImageNet100 does not use."""
    root = tmp_path / "imagenet"
    for wnid in cmc_classes() + ["n00000001", "n00000002", "n00000003"]:
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                (root / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(b"jpeg")
    return root


def test_cmc_class_list_is_shipped():
    classes = cmc_classes()
    assert len(classes) == len(set(classes)) == 100 and all(c.startswith("n") and len(c) == 9 for c in classes)


def test_data_imagenet100_links_the_cmc_classes(tmp_path, fake_imagenet):
    out = tmp_path / "imagenet100"
    result = CliRunner().invoke(cli, ["data", "imagenet100", "--imagenet", str(fake_imagenet), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "train: 200 images, 100 classes" in result.output and "val: 200 images, 100 classes" in result.output
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(cmc_classes())
    link = out / "val" / cmc_classes()[0] / f"{cmc_classes()[0]}_1.JPEG"
    assert link.is_symlink() and link.resolve() == (fake_imagenet / "val" / cmc_classes()[0] / link.name).resolve()
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]

    again = CliRunner().invoke(cli, ["data", "imagenet100", "--imagenet", str(fake_imagenet), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output and "--force" in again.output
    forced = CliRunner().invoke(cli, ["data", "imagenet100", "--imagenet", str(fake_imagenet), "--out", str(out),
                                      "--force"])
    assert forced.exit_code == 0 and len(list((out / "train").iterdir())) == 100


def test_data_imagenet100_names_missing_classes(tmp_path, fake_imagenet):
    import shutil

    gone = cmc_classes()[10:17]
    for wnid in gone:
        shutil.rmtree(fake_imagenet / "val" / wnid)
    result = CliRunner().invoke(cli, ["data", "imagenet100", "--imagenet", str(fake_imagenet),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "val/ lacks 7 of the 100 classes" in result.output and gone[0] in result.output
    assert "train/ lacks" not in result.output
    assert not (tmp_path / "out" / "train").exists()


def test_build_imagenet100_with_a_class_subset(tmp_path, fake_imagenet):
    counts = build_imagenet100(fake_imagenet, tmp_path / "sub", classes=cmc_classes()[:3])
    assert counts == {"train": {"images": 6, "classes": 3}, "val": {"images": 6, "classes": 3}}


# ---- the uint8 cache ---------------------------------------------------------------------------

def folder_cfg(tree, **data):
    return config(data={"name": "imagefolder", "root": str(tree), "workers": 0, **data})


def test_cache_build_layout_and_labels(tree):
    summary = build_cache(tree, 36, workers=2, progress=False, log=lambda _: None)
    assert summary["train"]["images"] == 15 and summary["train"]["skipped"] == 2  # broken.jpg + notes.txt
    assert summary["val"]["images"] == 6 and summary["val"]["skipped"] == 0
    path = split_cache_path(tree / ".ablate-cache", "train", 36)
    assert path == Path(summary["train"]["path"])
    assert sorted(os.listdir(path)) == ["files.json", "geometry.npy", "labels.npy", "meta.json", "pixels.npy"]
    folder = scan_split(tree, "train")
    cached = open_cache(path, folder)
    # whole images, short side 36: 48x36 landscape -> 48 rows stored transposed, 36x48 portrait -> 48 rows
    assert cached.images.pixels.shape == (15 * 48, 36, 3) and cached.images.pixels.dtype == torch.uint8
    assert cached.classes == list(CLASSES)
    expected = torch.tensor([label for _, label in folder.samples])
    broken = [i for i, (p, _) in enumerate(folder.samples) if p.endswith("broken.jpg")]
    assert torch.equal(cached.labels[cached.rows], expected[cached.rows])  # folder order and labels
    assert cached.labels[broken].tolist() == [-1] and len(cached.rows) == 15
    assert cached.images.length[broken].tolist() == [0] and cached.undecodable == [folder.samples[broken[0]][0]]
    landscape = [i for i, (p, _) in enumerate(folder.samples) if Path(p).stem in ("1", "3")]
    assert cached.images.transposed[landscape].all() and int(cached.images.transposed.sum()) == len(landscape)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == 2 and {Path(s["path"]).name for s in meta["skipped"]} == {"broken.jpg", "notes.txt"}
    again = build_cache(tree, 36, workers=1, progress=False, log=lambda _: None)
    assert again["train"]["built"] is False


def test_cache_loader_matches_the_folder_loader(tree):
    build_cache(tree, 36, workers=1, progress=False, log=lambda _: None)  # 36 = 32 / 0.875, rounded down
    cache = build_loaders(folder_cfg(tree), CPU, log=lambda _: None)
    folder = build_loaders(folder_cfg(tree, loader="folder"), CPU, log=lambda _: None)
    assert (cache.kind, folder.kind) == ("cache", "folder")
    assert (cache.n_train, cache.n_val, cache.num_classes) == (15, 6, 3)
    assert cache.skipped() == 2
    # evaluation: the same pixels as timm's resize + centre crop
    xc, yc = (torch.cat(t) for t in zip(*cache.val))
    xf, yf = (torch.cat(t) for t in zip(*folder.val))
    assert torch.equal(yc, yf)
    assert torch.allclose(xc, xf, atol=1e-5)
    # training: normalised float batches of the model's size, all labels once per epoch
    cache.set_epoch(2)
    train = batches(cache.train)
    assert [tuple(x.shape) for x, _ in train] == [(4, 3, 32, 32)] * 3
    x = torch.cat([x for x, _ in train])
    lo = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    hi = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert x.dtype == torch.float32 and (x >= lo.view(1, 3, 1, 1) - 1e-5).all() and (x <= hi.view(1, 3, 1, 1) + 1e-5).all()
    assert set(torch.cat([y for _, y in train]).tolist()) <= {0, 1, 2}
    again = build_loaders(folder_cfg(tree), CPU, log=lambda _: None)
    again.set_epoch(2)
    assert same(train, batches(again.train))
    again.set_epoch(3)
    assert not same(train, batches(again.train))


def test_loader_cache_without_a_cache_names_the_command(tree):
    with pytest.raises(AblateError, match=r"ablate data cache .*images --size 36"):
        build_loaders(folder_cfg(tree, loader="cache"), CPU)
    logged = []
    assert build_loaders(folder_cfg(tree), CPU, log=logged.append).kind == "folder"  # auto falls back
    assert any("no uint8 cache" in line for line in logged)


def test_cache_dir_and_cache_size_settings(tree, tmp_path):
    elsewhere = tmp_path / "caches"
    build_cache(tree, 40, cache_dir=str(elsewhere), workers=1, progress=False, log=lambda _: None)
    assert (elsewhere / "train-40" / "meta.json").is_file() and not (tree / ".ablate-cache").exists()
    loaders = build_loaders(folder_cfg(tree, cache_dir=str(elsewhere), cache_size=40), CPU, log=lambda _: None)
    assert loaders.kind == "cache"
    assert next(iter(loaders.val))[0].shape == (4, 3, 32, 32)


def test_failed_cache_build_leaves_nothing(tree):
    split = scan_split(tree, "train")
    out = split_cache_path(tree / ".ablate-cache", "train", 36)

    def fail(done):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_split_cache(split, out, 36, workers=2, progress=False, on_progress=fail, log=lambda _: None)
    assert list((tree / ".ablate-cache").iterdir()) == []
    # debris of a build killed with SIGKILL (a dead process id) is cleared by the next build
    stale = tree / ".ablate-cache" / ".tmp-train-36-999999999"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"partial")
    build_split_cache(split, out, 36, workers=1, progress=False, log=lambda _: None)
    assert sorted(p.name for p in (tree / ".ablate-cache").iterdir()) == ["train-36"]


def test_data_cache_command(tree):
    result = CliRunner().invoke(cli, ["data", "cache", str(tree), "--size", "36", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "train-36: 15 images, 2 skipped" in result.output and "val-36: 6 images, 0 skipped" in result.output
    again = CliRunner().invoke(cli, ["data", "cache", str(tree), "--size", "36"])
    assert again.exit_code == 0 and "exists" in again.output
    missing = CliRunner().invoke(cli, ["data", "cache", str(tree / "nope"), "--size", "36"])
    assert missing.exit_code == 2 and "nope" in missing.output


def test_data_cache_from_a_spec(tree, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\ndata: {{name: imagefolder, root: {tree}, workers: 0}}\n"
                    "model: {image_size: 32, patch_size: 4, width: 16, depth: 1}\n"
                    "grid: {model.patch_size: [4, 8]}\n")
    result = CliRunner().invoke(cli, ["data", "cache", str(spec), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("train-36: 15 images") == 1  # one size for both cells
    digits = tmp_path / "digits.yaml"
    digits.write_text("name: d\ndata: {name: digits}\n")
    result = CliRunner().invoke(cli, ["data", "cache", str(digits)])
    assert result.exit_code == 2 and "digits" in result.output


# ---- batched tensor augmentation ---------------------------------------------------------------

def test_crop_boxes_follow_random_resized_crop():
    boxes = sample_crop_boxes(40, 60, (0.25, 1.0), g=generator(0), n=2000)
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 60).all() and (y1 <= 40).all() and (w > 0).all()
    area = (w * h).float() / 2400
    assert area.min() >= 0.24 and area.max() <= 1.0
    assert ((w.float() / h).log().abs() <= np.log(4 / 3) + 0.1).all()
    # nothing fits a 1-pixel-high strip: the centre-crop fallback
    assert sample_crop_boxes(1, 50, (0.9, 1.0), g=generator(0), n=3).tolist() == [[24, 0, 25, 1]] * 3
    assert torch.equal(boxes, sample_crop_boxes(40, 60, (0.25, 1.0), g=generator(0), n=2000))


def test_resize_backends_agree():
    images = torch.from_numpy(np.stack([np.asarray(Image.fromarray(
        np.random.default_rng(i).integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC))
        for i in range(6)])).permute(0, 3, 1, 2)
    boxes = torch.tensor([[0, 0, 64, 64], [8, 8, 40, 40], [0, 10, 50, 60], [20, 5, 30, 15], [0, 0, 64, 32], [3, 7, 60, 61]])
    loop = resize_crops(images, boxes, 24, "loop").float()
    roi = resize_crops(images, boxes, 24, "roi_align")
    assert loop.shape == roi.shape == (6, 3, 24, 24)
    assert (loop - roi).abs().mean() < 3  # same crops; the filters differ slightly


def test_train_transform_flips_and_erases_deterministically():
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    no_aug = TrainBatchTransform(size=20, scale=(1.0, 1.0), hflip=0.0, mean=(0.5,) * 3, std=(0.5,) * 3, out_chans=3)
    flip = TrainBatchTransform(size=20, scale=(1.0, 1.0), hflip=1.0, mean=(0.5,) * 3, std=(0.5,) * 3, out_chans=3)
    plain = no_aug(images, seed=0)
    assert torch.allclose(plain, images.float() / 127.5 - 1, atol=1e-5)  # full-image crop at full size
    assert torch.allclose(flip(images, seed=0), plain.flip(-1))
    erased = random_erase(plain.clone(), 1.0, g=generator(1), noise_seed=2)
    changed = (erased != plain).flatten(1).any(1)
    assert changed.all()
    assert torch.equal(erased, random_erase(plain.clone(), 1.0, g=generator(1), noise_seed=2))


def test_tensor_randaugment_rejects_other_policies():
    with pytest.raises(AblateError, match="rand-m"):
        build_loaders(config(train={"randaugment": "augmix-m5"}), CPU)


def test_gpu_pipeline_runs_on_any_device():
    """The roi_align back-end (the one CUDA uses) with every augmentation, here on CPU tensors."""
    from ablate.data.batch_transforms import EvalBatchTransform

    images = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    common = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), out_chans=3)
    train = TrainBatchTransform(size=24, scale=(0.3, 1.0), hflip=0.5, randaugment="rand-m9-n2-mstd0.5-inc1",
                                random_erasing=0.5, backend="roi_align", **common)
    x = train(images, seed=3)
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, train(images, seed=3)) and not torch.equal(x, train(images, seed=4))
    loop = EvalBatchTransform(size=24, crop_fraction=0.875, **common)(images)
    roi = EvalBatchTransform(size=24, crop_fraction=0.875, backend="roi_align", **common)(images)
    assert roi.shape == loop.shape == (16, 3, 24, 24)


# ---- symbolic links, counts, workers, warnings ---------------------------------------------------

def test_a_symlink_loop_in_a_class_folder_is_not_followed(tree):
    """``train/ant/loop -> ..`` would list every class again under ``ant``: the link is
    skipped (and said so), and counts, labels and training are those of the real files."""
    from ablate.data.scan import count_images

    before = scan_split(tree, "train")
    os.symlink("..", tree / "train" / "ant" / "loop")
    after = scan_split(tree, "train")
    assert after.samples == before.samples and len(after.samples) == 16
    assert (str(tree / "train" / "ant" / "loop"), "a link to a folder inside a class folder (not followed)") \
        in after.skipped
    assert count_images(tree) == (16, 6)
    logged = []
    loaders = build_loaders(folder_cfg(tree), CPU, log=logged.append)
    assert (loaders.kind, loaders.n_train, loaders.n_val) == ("folder", 16, 6)
    assert any("loop" in line and "not followed" in line for line in logged)
    build_cache(tree, 36, workers=1, progress=False, log=lambda _: None)
    assert build_loaders(folder_cfg(tree), CPU, log=lambda _: None).n_train == 15  # 16 less the truncated JPEG


def test_linked_class_folders_are_followed_but_not_into_a_loop(tree, tmp_path):
    from ablate.data.scan import count_images

    elsewhere = tmp_path / "more" / "dog"
    for i in range(3):
        write_jpeg(elsewhere / f"{i}.jpg", 500 + i)
    os.symlink(elsewhere, tree / "train" / "dog")
    split = scan_split(tree, "train")
    assert split.classes == ["ant", "bee", "cat", "dog"] and sum(1 for _, c in split.samples if c == 3) == 3
    assert count_images(tree) == (19, 6)
    os.symlink(".", tree / "train" / "zzz")  # a class folder that is the split folder itself
    with pytest.raises(AblateError, match="loop"):
        scan_split(tree, "train")


def test_imagenet100_links_to_image_files_train_on_both_loaders(tmp_path):
    """ImageNet100 is made of links to image files: the folder loader, the cache (and its
    staleness check through the links) and the counts all read them."""
    from ablate.data.scan import count_images

    imagenet = tmp_path / "imagenet"
    classes = cmc_classes()[:3]
    for c, wnid in enumerate(classes):
        for split, n in (("train", 4), ("val", 2)):
            for i in range(n):
                write_jpeg(imagenet / split / wnid / f"{wnid}_{i}.JPEG", 100 * c + i, size=(40, 30))
    out = tmp_path / "imagenet100"
    build_imagenet100(imagenet, out, classes=classes)
    assert (out / "train" / classes[0] / f"{classes[0]}_0.JPEG").is_symlink()
    assert count_images(out) == (12, 6)
    folder = build_loaders(folder_cfg(out, loader="folder"), CPU, log=lambda _: None)
    build_cache(out, 36, workers=1, progress=False, log=lambda _: None)
    cache = build_loaders(folder_cfg(out, loader="cache"), CPU, log=lambda _: None)
    assert (folder.n_train, folder.n_val) == (cache.n_train, cache.n_val) == (12, 6)
    assert cache.skipped() == folder.skipped() == 0
    write_jpeg(imagenet / "train" / classes[0] / f"{classes[0]}_0.JPEG", 999, size=(40, 30))  # the linked file changes
    with pytest.raises(AblateError, match="stale cache"):
        build_loaders(folder_cfg(out, loader="cache"), CPU, log=lambda _: None)


def test_data_modules_that_the_cli_reads_do_not_import_torch():
    """``ablate.data.scan`` and ``ablate.data.constants`` (image counts and constants for
    ``ablate plan``) load without torch or timm, the package's own import aside."""
    import subprocess
    import sys

    code = ("import sys, types\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'timm', 'torchvision'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "package = types.ModuleType('ablate')\n"
            f"package.__path__ = [{str(Path(__file__).parents[1] / 'ablate')!r}]\n"
            "sys.modules['ablate'] = package\n"
            "import ablate.data, ablate.data.scan, ablate.data.constants\n"
            "print(ablate.data.constants.IMAGE_EXTENSIONS[0], ablate.data.scan.count_images.__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [".jpg", "count_images"]


def test_image_constants_have_one_home():
    """The DeiT constants live in ablate.data.constants; other data modules use them."""
    from ablate.data import batch_transforms, cache, constants, scan, transforms

    assert batch_transforms.CROP_RATIO is constants.CROP_RATIO
    assert transforms.IMAGENET_MEAN is constants.IMAGENET_MEAN and transforms.EVAL_CROP_PCT is constants.EVAL_CROP_PCT
    assert scan.IMAGE_EXTENSIONS is constants.IMAGE_EXTENSIONS
    assert cache.default_cache_size(224) == constants.eval_resize_size(224) == 256


def test_data_workers_are_capped_at_the_usable_cpus_without_warnings(tree, capfd):
    """``data.workers: 64`` on this machine: as many workers as CPUs, and neither DataLoader
    nor any other part of the data path warns (warnings are errors here)."""
    import warnings

    from ablate.data.folder import usable_workers

    cpus = len(os.sched_getaffinity(0))
    assert usable_workers(64) == cpus and usable_workers(1) == 1 and usable_workers(0) == 0
    deit = {"batch_size": 4, "randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25, "crop_scale": 0.08}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logged = []
        folder = build_loaders(config(data={"name": "imagefolder", "root": str(tree), "workers": 64, "loader": "folder"},
                                      train=deit), CPU, log=logged.append)
        assert folder.train.loader.num_workers == cpus
        assert any(f"{cpus} workers" in line for line in logged)
        batches(folder.train)
        batches(folder.val)
        build_cache(tree, 36, workers=1, progress=False, log=lambda _: None)
        cache = build_loaders(config(data={"name": "imagefolder", "root": str(tree), "loader": "cache"}, train=deit),
                              CPU, log=lambda _: None)
        batches(cache.train)
        batches(cache.val)
        batches(build_loaders(config(train={**deit, "batch_size": 64}), CPU).train)  # digits
    assert "Warning" not in capfd.readouterr().err


def test_data_workers_leave_slurm_s_signals_to_the_trainer(tree, tmp_path):
    """Slurm signals every process of a task. A forked worker must neither run the trainer's
    handlers (submitit's USR2 one checkpoints and requeues the job) nor die of SIGTERM, which
    makes the trainer raise "DataLoader worker killed" mid-epoch."""
    import multiprocessing
    import signal
    import time
    ran = tmp_path / "handler-ran-in"

    def trainer_handler(signum, frame):  # what submitit's handler and ablate's SIGTERM one stand for
        with open(ran, "a") as f:
            f.write(f"{os.getpid()}\n")
    old = {s: signal.signal(s, trainer_handler) for s in (signal.SIGTERM, signal.SIGUSR2)}
    earlier = set(multiprocessing.active_children())  # an earlier test's loaders in this process may live on
    try:
        loaders = build_loaders(config(data={"name": "imagefolder", "root": str(tree), "workers": 2,
                                             "loader": "folder"}, train={"batch_size": 2}), CPU, log=lambda _: None)
        it = iter(loaders.train)
        next(it), next(it)  # a batch from each worker (round robin): both have run their init function
        workers = [p for p in multiprocessing.active_children() if p.pid != os.getpid() and p not in earlier]
        assert len(workers) == 2
        for p in workers:
            os.kill(p.pid, signal.SIGUSR2)
            os.kill(p.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(p.is_alive() for p in workers)
        rest = list(it)  # the epoch goes on with the same workers
        assert rest and not ran.exists()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_a_data_worker_does_not_print_the_trainer_hanging_up_mid_handover(capsys):
    """multiprocessing's resource sharer thread calls sys.excepthook when the trainer leaves while
    a worker hands it a batch; in a worker that is no error of its own, and anything else still prints."""
    import sys

    from ablate.data.folder import _unless_handover_cut_short
    seen = []
    hook = _unless_handover_cut_short(lambda *exc: seen.append(exc[0]))

    def raised(code: str, filename: str):
        try:
            exec(compile(code, filename, "exec"), {})
        except BaseException:
            return sys.exc_info()
    sharer = os.path.join(os.path.dirname(os.__file__), "multiprocessing", "resource_sharer.py")
    hook(*raised("raise ConnectionResetError(104, 'Connection reset by peer')", sharer))
    hook(*raised("raise EOFError()", sharer))
    hook(*raised("raise ConnectionResetError(104, 'Connection reset by peer')", "/data/my_transform.py"))
    hook(*raised("raise ValueError('a bug')", sharer))
    assert seen == [ConnectionResetError, ValueError]
