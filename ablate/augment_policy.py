"""RandAugment policy strings (``rand-m9-mstd0.5-inc1``) checked when a spec is read, without torch.

The check is timm's own parser, ``timm.data.auto_augment.rand_augment_transform``, which builds
the policy's ops from Pillow alone. ``import timm.data.auto_augment`` would import all of timm and
torch first (its package ``__init__``), so the module file is loaded by itself: it imports only
the standard library, Pillow and NumPy. Where timm is already imported, its loaded module is used.

timm skips a section it cannot read (``rand-m9-mstdhalf`` is ``rand-m9``) and takes an unknown
transform set for the default one; here such sections are refused too, so that a typo in a
policy never trains a different augmentation silently.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from functools import lru_cache
from types import ModuleType

#: the sections of a policy after ``rand``, as timm 1.0 reads them
SECTIONS = re.compile(r"(m|mstd|p)\d[\d.]*|(n|mmax|inc)\d+|t(weights|3aw|3a)")
ALLOWED = ("a timm RandAugment policy: rand, then -m<magnitude>, -n<ops>, -mstd<std>, -mmax<max>, -inc<0|1>, "
           "-p<prob>, -t<weights|3a|3aw>; e.g. rand-m9-mstd0.5-inc1")


@lru_cache(maxsize=None)
def _timm_auto_augment() -> ModuleType:
    loaded = sys.modules.get("timm.data.auto_augment")
    if loaded is not None:
        return loaded
    timm = importlib.util.find_spec("timm")
    if timm is None or not timm.submodule_search_locations:
        raise ValueError("timm is not installed (allowed: pip install -e . in the ablate clone)")
    path = os.path.join(list(timm.submodule_search_locations)[0], "data", "auto_augment.py")
    spec = importlib.util.spec_from_file_location("_ablate_timm_auto_augment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=256)
def check_randaugment(policy: str) -> str:
    """``policy`` if timm reads it as written; else ``ValueError`` naming what is wrong."""
    sections = policy.split("-")
    if sections[0] != "rand":
        raise ValueError(f"{policy!r} is not a RandAugment policy (allowed: {ALLOWED})")
    for section in sections[1:]:
        if not SECTIONS.fullmatch(section):
            raise ValueError(f"{policy!r}: section {section!r} is not one timm reads (allowed: {ALLOWED})")
    try:
        _timm_auto_augment().rand_augment_transform(policy)
    except (AssertionError, ValueError, KeyError) as e:  # timm's parser asserts on what it cannot read
        raise ValueError(f"{policy!r}: timm cannot read it ({e or 'unknown section'}) (allowed: {ALLOWED})") from None
    return policy
