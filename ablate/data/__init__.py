"""Datasets and loaders: imagenet100, imagefolder, digits, synthetic; the uint8 cache.

``build_loaders(cfg, device)`` is the one entry point of training; ``ablate data
imagenet100`` and ``ablate data cache`` prepare ImageNet100 and its decode-once cache.
"""
from ablate.data.loaders import Loaders, build_loaders

__all__ = ["Loaders", "build_loaders"]
