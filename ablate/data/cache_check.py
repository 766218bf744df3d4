"""Whether ``data.loader: cache`` can train a configuration, answered without torch or numpy.

``ablate plan`` names a missing or stale cache beside the other data that is not in place, and
``ablate run``/``ablate search`` refuse it with the spec's other problems, before any cell
starts (:mod:`ablate.data.loaders` would otherwise find it at the first cell). The cache's
layout is :mod:`ablate.data.cache`'s; the few names read here follow it (a test pins them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ablate.data.constants import eval_resize_size
from ablate.errors import AblateError

#: as ablate.data.cache: the folder under the data root, and the format this version reads
CACHE_DIRNAME = ".ablate-cache"
FORMAT_VERSION = 2


def cache_paths(root: Path, cache_dir: Optional[str], size: int) -> dict[str, Path]:
    """``{split: <cache root>/<split>-<size>}`` as ``ablate data cache`` writes them."""
    where = Path(os.path.expandvars(os.path.expanduser(cache_dir))) if cache_dir else Path(root) / CACHE_DIRNAME
    return {split: where / f"{split}-{size}" for split in ("train", "val")}


def cache_problem(data, image_size: int) -> Optional[str]:
    """Why ``data`` (a :class:`~ablate.config.DataConfig` with ``loader: cache``) has no usable
    cache for ``image_size``: missing, in another format, or of a tree that changed since it was
    built; None when it can be used (or the loader is not ``cache``)."""
    if data.loader != "cache" or not data.root:
        return None
    from ablate.data.scan import expand_root, scan_tree
    try:
        root = expand_root(data.root)
    except AblateError:
        return None  # the root itself is reported by the spec's data checks
    size = data.cache_size or eval_resize_size(image_size)
    option = f" --out {data.cache_dir}" if data.cache_dir else ""
    build = f"ablate data cache {data.root} --size {size}{option}"
    paths = cache_paths(root, data.cache_dir, size)
    missing = [str(p) for p in paths.values() if not (p / "meta.json").is_file()]
    if missing:
        return f"cache: no cache at {', '.join(missing)} (allowed: build it with: {build}, or data.loader: auto)"
    try:
        splits = scan_tree(root)
    except AblateError as e:
        return f"cache: {e}"
    for split, path in paths.items():
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            return f"cache: {path}: unreadable meta.json ({e}) (allowed: rebuild it with: {build} --force)"
        if meta.get("format") != FORMAT_VERSION:
            return (f"cache: {path}: stale cache, built in format {meta.get('format')} (this version reads "
                    f"format {FORMAT_VERSION}) (allowed: rebuild it with: {build} --force)")
        if meta.get("source_digest") != splits[split].fingerprint().digest():
            return (f"cache: {path}: stale cache, {splits[split].root} changed since it was built "
                    f"(allowed: rebuild it with: {build} --force)")
    return None
