"""Augmentation: timm's posterize bug and its fix, the tensor RandAugment against timm's on
PIL, augmentation errors never counted as bad images, and the DeiT recipe drawn 20,000
times on each loader without an exception."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from scipy.stats import ks_2samp

from ablate.config import CellConfig
from ablate.data.folder import AugmentationError, FolderBatches
from ablate.data.loaders import build_loaders
from ablate.data.rand_augment import LEVEL_TO_ARG, NAME_TO_OP, BatchRandAugment, _Context, timm_hparams
from ablate.data.scan import scan_split
from ablate.data.seeding import generator
from ablate.data.transforms import folder_transforms, keep_one_posterize_bit, policy_ops
from ablate.errors import AblateError
from imagetree import make_tree, photo

CPU = torch.device("cpu")
DEIT = {"randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25, "crop_scale": 0.08, "hflip": 0.5}
HPARAMS = timm_hparams(32, (0.485, 0.456, 0.406))


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)


def as_array(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).numpy().astype(int)


# ---- the bug in timm 1.0.31 + Pillow, and the fix ----------------------------------------------

def test_timm_increasing_posterize_asks_pillow_for_zero_bits():
    """The failure we work around. When timm stops asking for 0 bits (or Pillow accepts it),
    this test fails: drop keep_one_posterize_bit and MIN_POSTERIZE_BITS then."""
    from timm.data.auto_augment import LEVEL_TO_ARG as TIMM_LEVEL_TO_ARG
    from timm.data.auto_augment import AugmentOp, rand_augment_transform

    assert TIMM_LEVEL_TO_ARG["PosterizeIncreasing"](10.0, {}) == (0,)
    with pytest.raises(ValueError, match="bits must be between or equal to 1 and 8"):
        ImageOps.posterize(photo(0), 0)
    # magnitude 9 with noise 0.5 reaches the top of the range in 2.3% of the draws
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=9, hparams={**HPARAMS, "magnitude_std": 0.5})
    random.seed(0)
    failures = 0
    for _ in range(1000):
        try:
            op(photo(1, (16, 16)))
        except ValueError:
            failures += 1
    assert 5 <= failures <= 60
    # and the full DeiT policy fails about once in 800 images
    policy = rand_augment_transform("rand-m9-mstd0.5-inc1", dict(HPARAMS))
    random.seed(1)
    np.random.seed(1)
    failures = 0
    for _ in range(4000):
        try:
            policy(photo(2, (16, 16)))
        except ValueError:
            failures += 1
    assert failures >= 1


def test_folder_recipe_keeps_one_posterize_bit():
    from timm.data.auto_augment import RandAugment

    cfg = CellConfig.model_validate({"model": {"image_size": 32, "patch_size": 4, "width": 16, "depth": 1},
                                     "train": DEIT})
    train, _ = folder_transforms(cfg)
    (policy,) = [t for t in train.transforms if isinstance(t, RandAugment)]
    posterize = [op for op in policy_ops(policy) if op.name == "PosterizeIncreasing"]
    assert len(posterize) == 1
    assert posterize[0].level_fn(10.0, {}) == (1,) and posterize[0].level_fn(0.0, {}) == (4,)
    posterize[0].prob, posterize[0].magnitude = 1.0, 10  # always the top of the range
    out = np.asarray(posterize[0](photo(3)))
    assert set(np.unique(out)) <= {0, 128}  # one bit kept
    # timm's shared tables are untouched: other transforms still get timm's own function
    from timm.data.auto_augment import LEVEL_TO_ARG as TIMM_LEVEL_TO_ARG

    assert TIMM_LEVEL_TO_ARG["PosterizeIncreasing"](10.0, {}) == (0,)


# ---- the tensor RandAugment is timm's --------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LEVEL_TO_ARG))
def test_level_to_arg_is_timms(name):
    from timm.data.auto_augment import LEVEL_TO_ARG as TIMM_LEVEL_TO_ARG

    levels = [i / 40 for i in range(401)] + [13.0, 20.0]  # every boundary of int(level / 10 * 4 or 256 or 110)
    for i, level in enumerate(levels):
        random.seed(i)
        negate = random.random() > 0.5  # timm's _randomly_negate draws the same number
        random.seed(i)
        expected = TIMM_LEVEL_TO_ARG[name](level, HPARAMS) if TIMM_LEVEL_TO_ARG[name] else (0,)
        ours = LEVEL_TO_ARG[name](torch.tensor([level], dtype=torch.float64), torch.tensor([negate]), HPARAMS)
        if name in ("Posterize", "PosterizeIncreasing"):
            expected = (max(1, expected[0]),)  # our one deliberate difference
        assert ours.item() == pytest.approx(expected[0], abs=1e-12), (name, level)


@pytest.mark.parametrize("name", sorted(NAME_TO_OP))
def test_tensor_ops_match_timm_on_pil(name):
    """Every op on a batch of pictures against timm's op on PIL at the same argument: within
    one grey level, and almost everywhere equal (the affine ops differ in float rounding)."""
    from timm.data.auto_augment import AugmentOp

    context = _Context(HPARAMS["img_mean"])
    diffs = []
    for seed in range(12):
        image = photo(seed, (40, 32), noise=12)
        level = float(np.random.default_rng(seed).uniform(0, 10))
        op = AugmentOp(name, prob=1.0, magnitude=level, hparams=HPARAMS)
        random.seed(seed)
        negate = random.random() > 0.5
        random.seed(seed)
        args = op.level_fn(level, op.hparams) if op.level_fn else ()
        if name.startswith("Posterize"):
            args = (max(1, args[0]),)
        expected = np.asarray(op.aug_fn(image, *args, **op.kwargs)).astype(int)
        arg = LEVEL_TO_ARG[name](torch.tensor([level], dtype=torch.float64), torch.tensor([negate]), HPARAMS)
        diffs.append(np.abs(as_array(NAME_TO_OP[name](as_tensor(image), arg, context)) - expected))
    diffs = np.stack(diffs)
    assert diffs.max() <= 1 and diffs.mean() <= 0.01


def test_tensor_posterize_keeps_one_bit_at_the_top_of_the_range():
    x = as_tensor(photo(4, (16, 16), noise=20))
    bits = LEVEL_TO_ARG["PosterizeIncreasing"](torch.tensor([10.0, 12.0], dtype=torch.float64),
                                               torch.tensor([False, True]), {})
    assert bits.tolist() == [1.0, 1.0]
    out = NAME_TO_OP["PosterizeIncreasing"](x.expand(2, -1, -1, -1), bits, _Context((0, 0, 0)))
    assert set(out.unique().tolist()) <= {0, 128} and len(out.unique()) == 2


def test_batch_rand_augment_follows_the_policy():
    """The whole policy (ops, probability, magnitude noise, signs) on the same picture many
    times: the distribution of how much each image changed matches timm's on PIL."""
    from timm.data.auto_augment import rand_augment_transform
    from torchvision import transforms

    image = photo(5, (24, 24), noise=10)
    policy = "rand-m9-mstd0.5-inc1"
    timm_policy = rand_augment_transform(policy, dict(HPARAMS))
    assert keep_one_posterize_bit(transforms.Compose([timm_policy])) == 1
    random.seed(0)
    np.random.seed(0)
    base = np.asarray(image).astype(float)
    ours_policy = BatchRandAugment(policy, HPARAMS)
    n = 4000
    assert (ours_policy.names, ours_policy.num_layers, ours_policy.prob) == ([op.name for op in timm_policy.ops], 2, 0.5)

    def change(a: np.ndarray) -> float:
        return float(np.abs(a.astype(float) - base).mean())

    theirs = [change(np.asarray(timm_policy(image))) for _ in range(n)]
    batch = as_tensor(image).expand(n, -1, -1, -1).contiguous()
    out = ours_policy(batch, generator(0))
    ours = (out.float() - batch.float()).abs().mean(dim=(1, 2, 3)).numpy()
    assert abs(np.mean(np.array(theirs) == 0) - np.mean(ours == 0)) < 0.03  # both ops skipped: 1/4 of images
    assert ks_2samp(theirs, ours).statistic < 0.05
    # a different policy is told apart by the same statistic (the test can fail)
    other = BatchRandAugment("rand-m3-mstd0.5-inc1", HPARAMS)(batch, generator(0))
    weaker = (other.float() - batch.float()).abs().mean(dim=(1, 2, 3)).numpy()
    assert ks_2samp(theirs, weaker).statistic > 0.1


def test_weighted_policy_chooses_ops_as_timm_does():
    policy = BatchRandAugment("rand-m9-n3-tweights", HPARAMS)
    choices = policy._choices(20000, generator(0))
    assert all(len(set(row)) == 3 for row in choices.tolist())  # no op twice (timm: replace=False)
    first = np.bincount(choices[:, 0].numpy(), minlength=len(policy.names)) / 20000
    assert np.allclose(first, policy.weights.numpy() / policy.weights.sum().item(), atol=0.01)


def test_tensor_path_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(AblateError, match="RandAugment policies only"):
        BatchRandAugment("augmix-m5", HPARAMS)
    with pytest.raises(AblateError, match="GaussianBlur|Desaturate"):
        BatchRandAugment("rand-m9-t3a", HPARAMS)
    with pytest.raises(AblateError, match="not a timm augmentation policy"):
        BatchRandAugment("rand-m9-zz3", HPARAMS)
    from ablate.data.cache import build_cache

    root = make_tree(tmp_path / "images", classes=2, per_class=2)
    build_cache(root, 36, workers=1, progress=False, log=lambda _: None)
    common = {"model": {"image_size": 32, "patch_size": 4, "width": 16, "depth": 1},
              "train": {"randaugment": "original-mstd0.5", "batch_size": 2}}
    with pytest.raises(AblateError, match="RandAugment policies only"):
        build_loaders(CellConfig.model_validate(
            {**common, "data": {"name": "imagefolder", "root": str(root), "loader": "cache", "workers": 0}}), CPU)
    logged = []
    loaders = build_loaders(CellConfig.model_validate(
        {**common, "data": {"name": "imagefolder", "root": str(root), "workers": 0}}), CPU, log=logged.append)
    assert loaders.kind == "folder" and any("not using the uint8 cache" in line for line in logged)


# ---- augmentation errors are bugs, decode errors are bad files ---------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_augmentation_error_stops_the_epoch_and_names_the_image(tmp_path, workers):
    """timm's raw increasing posterize at the top of its range: Pillow refuses 0 bits. That
    is an augmentation bug: it is raised (one line naming the image), never counted as a
    skipped image, while the truncated JPEG beside it is skipped as before."""
    from timm.data.auto_augment import AugmentOp
    from torchvision import transforms

    root = make_tree(tmp_path / "images", classes=1, per_class=4)
    good = (root / "train" / "c0" / "0.JPEG").read_bytes()
    (root / "train" / "c0" / "broken.JPEG").write_bytes(good[: len(good) // 2])
    split = scan_split(root, "train")
    zero_bits = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    logged = []
    harmless = FolderBatches(split, transforms.Compose([transforms.Resize((8, 8)), transforms.PILToTensor()]),
                             batch_size=5, train=False, seed=0, workers=workers, device=CPU, log=logged.append)
    assert sum(len(y) for _, y in harmless) == 4 and harmless.skipped_paths == {str(root / "train/c0/broken.JPEG")}
    buggy = FolderBatches(split, transforms.Compose([zero_bits, transforms.PILToTensor()]), batch_size=5,
                          train=False, seed=0, workers=workers, device=CPU, log=logged.append)
    with pytest.raises(AugmentationError) as failure:
        list(buggy)
    message = str(failure.value)
    assert "\n" not in message and "augmentation failed on" in message and ".JPEG" in message
    assert "ValueError: bits must be between or equal to 1 and 8" in message
    assert any("ImageOps.posterize" in note or "posterize" in note for note in failure.value.__notes__)
    assert buggy.skipped_paths <= {str(root / "train/c0/broken.JPEG")}  # never counted as a bad image
    from ablate.train import describe_failure

    assert describe_failure(failure.value).startswith("AugmentationError: augmentation failed on ")


# ---- the DeiT recipe, 20,000 samples on each loader ----------------------------------------------

def deit_config(root, loader: str) -> CellConfig:
    return CellConfig.model_validate({
        "data": {"name": "imagefolder", "root": str(root), "workers": 0, "loader": loader},
        "model": {"image_size": 32, "patch_size": 4, "width": 16, "depth": 1},
        "train": {**DEIT, "batch_size": 250}})


@pytest.fixture(scope="module")
def deit_tree(tmp_path_factory):
    from ablate.data.cache import build_cache

    root = make_tree(tmp_path_factory.mktemp("deit") / "images", classes=5, per_class=50,
                     sizes=((40, 30), (30, 40), (36, 36), (48, 27)))
    build_cache(root, 36, workers=1, progress=False, log=lambda _: None)
    return root


def draw(loaders, samples: int) -> int:
    n, epoch = 0, 0
    while n < samples:
        loaders.set_epoch(epoch)
        for x, y in loaders.train:
            assert torch.isfinite(x).all()
            n += len(y)
        epoch += 1
    return n


@pytest.mark.slow
def test_deit_recipe_20000_samples_on_the_folder_loader(deit_tree):
    from timm.data.auto_augment import LEVEL_TO_ARG as TIMM_LEVEL_TO_ARG
    from timm.data.auto_augment import RandAugment

    loaders = build_loaders(deit_config(deit_tree, "folder"), CPU, log=lambda _: None)
    assert loaders.kind == "folder"
    # count the draws where timm would have asked Pillow for 0 bits
    (policy,) = [t for t in loaders.train.loader.dataset.transform.transforms if isinstance(t, RandAugment)]
    (posterize,) = [op for op in policy.ops if op.name == "PosterizeIncreasing"]
    zero_bit_draws = []
    fixed = posterize.level_fn

    def counting(level, hparams):
        zero_bit_draws.append(TIMM_LEVEL_TO_ARG["PosterizeIncreasing"](level, hparams) == (0,))
        return fixed(level, hparams)

    posterize.level_fn = counting
    assert draw(loaders, 20000) >= 20000
    assert loaders.skipped() == 0
    assert sum(zero_bit_draws) >= 5  # the draws that raised before the fix happened, and passed


@pytest.mark.slow
def test_deit_recipe_20000_samples_on_the_cache_loader(deit_tree):
    loaders = build_loaders(deit_config(deit_tree, "cache"), CPU, log=lambda _: None)
    assert loaders.kind == "cache"
    assert draw(loaders, 20000) >= 20000
    assert loaders.skipped() == 0


def test_the_folder_transforms_travel_to_spawned_data_workers():
    """A worker of `ablate run --workers N` (or of a cell's group) is a spawned process, and so are
    its DataLoader's workers: the transform reaches them by pickle. The posterize patch was a
    closure, and every such cell with RandAugment failed with "Can't pickle local object"."""
    import pickle

    from PIL import Image

    from ablate.config import CellConfig
    from ablate.data.seeding import seeded_global_rngs
    from ablate.data.transforms import folder_transforms

    cfg = CellConfig.model_validate({"data": {"name": "digits"}, "model": {"image_size": 32, "patch_size": 4},
                                     "train": {"randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25}})
    train_tf, val_tf = folder_transforms(cfg)
    again = pickle.loads(pickle.dumps(train_tf))
    pickle.loads(pickle.dumps(val_tf))
    image = Image.new("RGB", (40, 36), (120, 30, 200))
    with seeded_global_rngs(7):
        a = train_tf(image)
    with seeded_global_rngs(7):
        b = again(image)
    assert torch.equal(a, b)
