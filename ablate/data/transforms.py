"""Per-image (PIL) transforms of the image-folder loader, built with timm's ``create_transform``.

The recipe is DeiT's, which the S²-MLP paper follows (§4: "we adopt the training strategy of
DeiT"): random resized crop with scale ``(crop_scale, 1)`` and aspect ratio (3/4, 4/3),
horizontal flip, optional RandAugment and random erasing (pixel mode), ImageNet
normalisation; evaluation resizes the short side to ``image_size / 0.875`` and takes the
centre ``image_size`` square. Colour jitter is off: DeiT disables it whenever RandAugment
is on, and leaving it off otherwise keeps this loader and the tensor path of
:mod:`ablate.data.batch_transforms` the same augmentation. Mixup/CutMix act on whole
batches and belong to the training loop.

timm 1.0.31's posterize can ask current Pillow for 0 bits, which Pillow refuses (about one
sample in 800 with ``rand-m9-mstd0.5-inc1``): :func:`keep_one_posterize_bit` gives the
posterize ops of the policy timm built a level-to-argument function that keeps at least
one bit, the same rule as the tensor path (:mod:`ablate.data.rand_augment`).
"""
from __future__ import annotations

from typing import Callable

from timm.data import auto_augment, create_transform
from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment

from ablate.config import CellConfig
from ablate.data.constants import CROP_RATIO, EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from ablate.data.rand_augment import MIN_POSTERIZE_BITS
from ablate.errors import AblateError


class _AtLeastOneBit:
    """timm's posterize level -> bits, never fewer than one. A class rather than a closure: the
    transform travels to DataLoader workers by pickle where they are spawned (a worker process of
    ``ablate run --workers N`` or ``--gpus-per-cell N`` starts its loaders' workers that way)."""

    def __init__(self, level_to_arg: Callable):
        self.level_to_arg = level_to_arg

    def __call__(self, level, hparams):
        bits, = self.level_to_arg(level, hparams)
        return max(MIN_POSTERIZE_BITS, bits),


def policy_ops(policy) -> list:
    """The ``AugmentOp``s of a timm augmentation policy (RandAugment, AutoAugment, AugMix)."""
    if isinstance(policy, (RandAugment, AugMixAugment)):
        return list(policy.ops)
    if isinstance(policy, AutoAugment):
        return [op for sub_policy in policy.policy for op in sub_policy]
    raise TypeError(f"not a timm augmentation policy: {policy!r}")


def keep_one_posterize_bit(transform) -> int:
    """Patch, in place, the posterize ops of every augmentation policy inside ``transform``
    (a torchvision ``Compose`` from timm's ``create_transform``); returns how many policies
    it found. Only this transform's op objects change, never timm's shared tables."""
    policies = [t for t in getattr(transform, "transforms", [])
                if isinstance(t, (RandAugment, AutoAugment, AugMixAugment))]
    for policy in policies:
        for op in policy_ops(policy):
            if op.aug_fn is auto_augment.posterize:
                op.level_fn = _AtLeastOneBit(op.level_fn)
    return len(policies)


def folder_transforms(cfg: CellConfig) -> tuple[Callable, Callable]:
    """``(train, val)`` PIL-image -> normalised float tensor transforms for ``cfg``."""
    size, t = cfg.model.image_size, cfg.train
    try:
        train = create_transform(
            size, is_training=True, scale=(t.crop_scale, 1.0), ratio=CROP_RATIO, hflip=t.hflip,
            color_jitter=None, auto_augment=t.randaugment, interpolation="bilinear",
            mean=IMAGENET_MEAN, std=IMAGENET_STD, re_prob=t.random_erasing, re_mode="pixel")
    except (AssertionError, ValueError, KeyError) as e:
        raise AblateError(f"train.randaugment: {t.randaugment!r} is not a timm augmentation policy "
                          f"({e or 'unknown section'}; allowed: e.g. rand-m9-mstd0.5-inc1)") from None
    if t.randaugment and keep_one_posterize_bit(train) != 1:
        raise RuntimeError(f"timm's create_transform no longer returns its augmentation policy as one step of a "
                           f"Compose: {train!r}")
    val = create_transform(size, is_training=False, crop_pct=EVAL_CROP_PCT, interpolation="bilinear",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return train, val
