"""ablate: ablation studies of the S²-MLP vision model (Yu et al., WACV 2022).

Importing ``ablate`` imports neither torch nor timm, so the command line starts fast. The timm
model names (``s2mlp_wide_16_224``, ``s2mlp_deep_16_224``) are registered by ``import
ablate.models.s2mlp`` (see :mod:`ablate.models`).

Imports sit at the top of each module. Where a module defers one into a function, so that a
command that does not need a heavy package (torch, timm, MLflow, Optuna, matplotlib, ...) never
pays for it, the import carries a ``# lazy: <reason>`` comment on its line; there is no other way
of importing late. ``tests/test_imports.py`` holds every module to this, and the import graph of
``ablate`` to no cycle.
"""
__version__ = "0.1.0"
