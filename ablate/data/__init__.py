"""Datasets and loaders: imagenet100, imagefolder, digits, synthetic; the uint8 cache.

``build_loaders(cfg, device)`` is the one entry point of training; ``ablate data
imagenet100`` and ``ablate data cache`` prepare ImageNet100 and its decode-once cache.
Importing this package (or :mod:`ablate.data.constants`, :mod:`ablate.data.scan`) does not
import torch: ``build_loaders`` and ``Loaders`` are loaded on first use.
"""
from __future__ import annotations

__all__ = ["Loaders", "build_loaders"]


def __getattr__(name: str):
    if name in __all__:
        from ablate.data import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
