"""The image constants of the data path, in one place (no torch import: the CLI reads them).

The recipe is DeiT's, which the S²-MLP paper follows: ImageNet normalisation, a random
resized crop with aspect ratios (3/4, 4/3), and evaluation on the centre 224 of a 256 resize.
"""
from __future__ import annotations

import math

#: what torchvision's ImageFolder accepts, compared case-insensitively (ImageNet uses .JPEG)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: fraction of the resized image kept by the evaluation centre crop (224 of 256)
EVAL_CROP_PCT = 0.875

#: aspect-ratio range (width / height) of the random resized crop (torchvision / timm default)
CROP_RATIO = (3 / 4, 4 / 3)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def eval_resize_size(image_size: int) -> int:
    """The short side the evaluation transform resizes to before its centre crop: 8/7 of the
    input, rounded down, as timm's ``transforms_imagenet_eval`` (256 for 224, 128 for 112)."""
    return math.floor(image_size / EVAL_CROP_PCT)
