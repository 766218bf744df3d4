"""Per-image (PIL) transforms of the image-folder loader, built with timm's ``create_transform``.

The recipe is DeiT's, which the S²-MLP paper follows (§4: "we adopt the training strategy of
DeiT"): random resized crop with scale ``(crop_scale, 1)`` and aspect ratio (3/4, 4/3),
horizontal flip, optional RandAugment and random erasing (pixel mode), ImageNet
normalisation; evaluation resizes the short side to ``image_size / 0.875`` and takes the
centre ``image_size`` square. Colour jitter is off: DeiT disables it whenever RandAugment
is on, and leaving it off otherwise keeps this loader and the tensor path of
:mod:`ablate.data.batch_transforms` the same augmentation. Mixup/CutMix act on whole
batches and belong to the training loop.
"""
from __future__ import annotations

from typing import Callable

from ablate.config import CellConfig
from ablate.errors import AblateError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: fraction of the resized image kept by the evaluation centre crop (224 of 256)
EVAL_CROP_PCT = 0.875
#: aspect-ratio range of the random resized crop (torchvision / timm default)
CROP_RATIO = (3 / 4, 4 / 3)


def folder_transforms(cfg: CellConfig) -> tuple[Callable, Callable]:
    """``(train, val)`` PIL-image -> normalised float tensor transforms for ``cfg``."""
    from timm.data import create_transform

    size, t = cfg.model.image_size, cfg.train
    try:
        train = create_transform(
            size, is_training=True, scale=(t.crop_scale, 1.0), ratio=CROP_RATIO, hflip=t.hflip,
            color_jitter=None, auto_augment=t.randaugment, interpolation="bilinear",
            mean=IMAGENET_MEAN, std=IMAGENET_STD, re_prob=t.random_erasing, re_mode="pixel")
    except (AssertionError, ValueError, KeyError) as e:
        raise AblateError(f"train.randaugment: {t.randaugment!r} is not a timm augmentation policy "
                          f"({e or 'unknown section'}; allowed: e.g. rand-m9-mstd0.5-inc1)") from None
    val = create_transform(size, is_training=False, crop_pct=EVAL_CROP_PCT, interpolation="bilinear",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return train, val
