"""Augmentation policy strings (``rand-m9-mstd0.5-inc1``) checked when a spec is read, without torch.

``train.randaugment`` takes the policies timm's ``create_transform(auto_augment=...)`` takes:
RandAugment (``rand-...``), AugMix (``augmix-...``) and AutoAugment (``original``, ``originalr``,
``v0``, ``v0r``, ``3a``, each with ``-mstd<std>``). The check is timm's own parser (the function
``create_transform`` calls for that family), which builds the policy's ops from Pillow alone.
``import timm.data.auto_augment`` would import all of timm and torch first (its package
``__init__``), so that module file is loaded by itself: it imports only the standard library,
Pillow and NumPy. Where timm is already imported, its loaded module is used. Which policies each
data path can train (the tensor path: RandAugment) is the loaders' to say.

timm skips a section it cannot read (``rand-m9-mstdhalf`` is ``rand-m9``) and takes an unknown
RandAugment transform set for the default one; here such sections are refused too, so that a typo
in a policy never trains a different augmentation silently.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from functools import lru_cache
from types import ModuleType

#: family -> (the sections timm 1.0 reads after the first, the parser timm's create_transform calls)
FAMILIES = {
    "rand": (re.compile(r"(m|mstd|p)\d[\d.]*|(n|mmax|inc)\d+|t(weights|3aw|3a)"), "rand_augment_transform"),
    "augmix": (re.compile(r"(mstd|a)\d[\d.]*|(m|w|d|b)\d+"), "augment_and_mix_transform"),
    "auto": (re.compile(r"mstd\d[\d.]*"), "auto_augment_transform"),
}
AUTO_AUGMENT = ("original", "originalr", "v0", "v0r", "3a")
ALLOWED = ("a timm policy: rand[-m<magnitude>][-n<ops>][-mstd<std>][-mmax<max>][-inc<0|1>][-p<prob>]"
           "[-t<weights|3a|3aw>], augmix[-m<severity>][-w<width>][-d<depth>][-a<alpha>][-b<0|1>][-mstd<std>], "
           f"or {'|'.join(AUTO_AUGMENT)}[-mstd<std>]; e.g. rand-m9-mstd0.5-inc1")


@lru_cache(maxsize=None)
def _timm_auto_augment() -> ModuleType:
    loaded = sys.modules.get("timm.data.auto_augment")
    if loaded is not None:
        return loaded
    timm = importlib.util.find_spec("timm")
    if timm is None or not timm.submodule_search_locations:
        raise ValueError("timm is not installed (allowed: pip install -e . in the ablate clone)")
    path = os.path.join(list(timm.submodule_search_locations)[0], "data", "auto_augment.py")
    # measured: the file alone takes 0.07 s; `import timm.data.auto_augment` takes 2.7 s (timm, torch, torchvision),
    # which every spec check with a train.randaugment policy (ablate plan) would pay
    spec = importlib.util.spec_from_file_location("_ablate_timm_auto_augment", path)  # lazy: see above
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=256)
def check_policy(policy: str) -> str:
    """``policy`` if timm reads it as written; else ``ValueError`` naming what is wrong."""
    first, *sections = policy.split("-")
    family = first if first in ("rand", "augmix") else "auto"
    if family == "auto" and first not in AUTO_AUGMENT:
        raise ValueError(f"{policy!r} is not a timm augmentation policy (allowed: {ALLOWED})")
    pattern, parser = FAMILIES[family]
    for section in sections:
        if not pattern.fullmatch(section):
            raise ValueError(f"{policy!r}: section {section!r} is not one timm reads (allowed: {ALLOWED})")
    try:
        getattr(_timm_auto_augment(), parser)(policy)
    except (AssertionError, ValueError, KeyError) as e:  # timm's parsers assert on what they cannot read
        raise ValueError(f"{policy!r}: timm cannot read it ({e or 'unknown section'}) (allowed: {ALLOWED})") from None
    return policy
