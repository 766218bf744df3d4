"""Seeds derived from (run seed, epoch, batch or sample): what makes a resumed run reproducible.

Every random choice of the data pipeline (shuffle order, crop boxes, flips, RandAugment ops,
erasing) draws from a generator seeded by :func:`derive_seed` of the coordinates it belongs
to, never from a generator that carries state across epochs. A run resumed at epoch ``e``
therefore sees exactly the batches an uninterrupted run would, whatever ran before it in
the same process and however many loader workers there are.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integer coordinates, stable across processes and versions."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh torch generator seeded by :func:`derive_seed` of ``parts``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n`` samples in ``epoch``: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=generator(seed, epoch, 0x5EED))


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed Python's, NumPy's and torch's CPU global RNGs inside the block, restore them after.

    For library transforms (timm's PIL augmentations) that draw from the global generators
    and take no generator argument. Only torch's CPU generator is seeded: ``torch.manual_seed``
    would also reseed every GPU generator (which ``fork_rng(devices=[])`` does not restore, so
    a loader running in the training process would reseed the model's dropout), and before
    CUDA starts it records a stack trace per call, which made it the slowest step of a sample.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        torch.random.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def global_rngs_untouched(device: torch.device | str = "cpu"):
    """Inside the block, draw from Python's, NumPy's and torch's global RNGs (and ``device``'s,
    when it is a GPU) as much as you like: they are back where they were afterwards.

    For work between two training epochs that must not change what training draws next, such
    as evaluating the training subset (a DataLoader's iterator takes its base seed from torch's
    global generator unless it has its own).
    """
    device = torch.device(device)
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
