"""S²-MLP models (arXiv 2106.07477): the spatial shift, the network, its analytic cost.

Two halves. The plain-Python one is what this package imports: :mod:`.shift_patterns` (the
named shifts) and :mod:`.cost` (parameter and multiply-add counts), which ``ablate plan``, the
spec checks and :mod:`ablate.config` use without torch. The network needs torch and timm:
:mod:`.s2mlp` (``S2MLP``, ``build_model``, ``VARIANTS``) and :mod:`.shift` (``SpatialShift``);
import those modules by name. :mod:`.listing` is ``ablate models``.

timm names (``s2mlp_wide_16_224``, ``s2mlp_deep_16_224``) are registered as timm registers its
own models: by importing the module that defines them, ``import ablate.models.s2mlp``, then
``timm.create_model(...)``.

Why this package does not import :mod:`.s2mlp` itself (as ``timm.models`` imports its model
modules): importing any submodule runs this file first, and :mod:`ablate.config` imports
:mod:`.shift_patterns` and :mod:`.cost`, so every spec check would pay for torch and timm.
Measured on the development machine (2 shared cores, best of 5): ``import ablate.spec`` takes
0.2 s as it is and 3.5 s with :mod:`.s2mlp` imported here; ``ablate plan`` on the quickstart
1.6 s and 5.1 s.
"""
from __future__ import annotations

from ablate.models.cost import Cost, model_cost
from ablate.models.shift_patterns import SHIFT_PATTERNS, resolve_offsets

__all__ = ["Cost", "SHIFT_PATTERNS", "model_cost", "resolve_offsets"]
