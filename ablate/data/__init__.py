"""Datasets and loaders: imagenet100, imagefolder, digits, synthetic; the uint8 cache.

``build_loaders(cfg, device)`` (:mod:`ablate.data.loaders`) is the one entry point of training;
``ablate data imagenet100`` and ``ablate data cache`` prepare ImageNet100 and its decode-once
cache. This package imports nothing: its torch-free modules (:mod:`.constants`, :mod:`.scan`,
:mod:`.cache_check`) serve the spec checks and ``ablate plan`` without torch, so the loaders are
imported by their module's name.
"""
