"""S²-MLP models (arXiv 2106.07477): the spatial shift, the network, its analytic cost.

:mod:`ablate.models.shift_patterns` and :mod:`ablate.models.cost` are plain Python, and so is
importing this package: ``ablate plan`` validates specs and prices them without torch. The
network (:mod:`ablate.models.s2mlp`, :mod:`ablate.models.shift`) needs torch and timm; its
names here (``from ablate.models import S2MLP, build_model``) import it on first use.

timm names (``s2mlp_wide_16_224``, ``s2mlp_deep_16_224``): importing :mod:`ablate.models.s2mlp`
registers them, and ``import ablate.models`` sees to it that it is imported together with
timm: at once when timm is already imported, else right after timm is (``timm.create_model``
needs ``import timm`` first). So ``import ablate.models`` then ``timm.create_model(...)`` works
in either order, while a process that never imports timm never pays for torch.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

from ablate.models.cost import Cost, model_cost
from ablate.models.shift_patterns import SHIFT_PATTERNS, resolve_offsets

#: the names of the torch modules, imported on first access
_LAZY = {"Affine": "s2mlp", "PreNormS2Block": "s2mlp", "S2Block": "s2mlp", "S2MLP": "s2mlp", "VARIANTS": "s2mlp",
         "build_model": "s2mlp", "SpatialShift": "shift", "spatial_shift": "shift"}

__all__ = ["Affine", "Cost", "PreNormS2Block", "S2Block", "S2MLP", "SHIFT_PATTERNS", "SpatialShift",
           "VARIANTS", "build_model", "model_cost", "resolve_offsets", "spatial_shift"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"ablate.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Imports :mod:`ablate.models.s2mlp` (which registers the variants) right after timm.

    Python has no post-import hook, so this finder answers for ``timm`` only: it lets the other
    finders locate timm and wraps that one spec's loader so that, once timm's own code has run,
    the variants are registered. It then leaves ``sys.meta_path``.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_timm = spec.loader.exec_module  # this spec's own loader: patching it touches no other import

            def exec_module(module):
                exec_timm(module)
                self.remove()
                importlib.import_module("ablate.models.s2mlp")

            spec.loader.exec_module = exec_module
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def _register_with_timm() -> None:
    if "timm" in sys.modules:
        importlib.import_module("ablate.models.s2mlp")
    elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithTimm())


_register_with_timm()
