"""Whether ``data.loader: cache`` can train a configuration, answered without torch or numpy.

``ablate plan`` names a missing or stale cache beside the other data that is not in place, and
``ablate run``/``ablate search`` refuse it with the spec's other problems, before any cell
starts (:mod:`ablate.data.loaders` would otherwise find it at the first cell). The cache's
layout (where it lives, its format) and what makes it stale are defined here, torch-free, and
:mod:`ablate.data.cache` (which writes and reads caches) uses them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ablate.data.constants import eval_resize_size
from ablate.data.scan import TreeFingerprint, expand_root, scan_tree
from ablate.errors import AblateError

#: the folder under the data root a cache goes to by default, and the format this version reads
CACHE_DIRNAME = ".ablate-cache"
FORMAT_VERSION = 2


def default_cache_size(image_size: int) -> int:
    """The stored short side for a model input of ``image_size``: 8/7 of it, as timm's eval resize."""
    return eval_resize_size(image_size)


def cache_root(data_root: Path, cache_dir: Optional[str] = None) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(cache_dir))) if cache_dir else Path(data_root) / CACHE_DIRNAME


def split_cache_path(root: Path, split: str, size: int) -> Path:
    return Path(root) / f"{split}-{size}"


def cache_paths(root: Path, cache_dir: Optional[str], size: int) -> dict[str, Path]:
    """``{split: <cache root>/<split>-<size>}`` as ``ablate data cache`` writes them."""
    where = cache_root(root, cache_dir)
    return {split: split_cache_path(where, split, size) for split in ("train", "val")}


def stale_reason(path: Path, split) -> Optional[str]:
    """Why the cache at ``path`` cannot serve ``split`` (a :class:`~ablate.data.scan.FolderSplit`):
    unreadable, another format, a changed tree; None when it can."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable meta.json ({e})"
    if meta.get("format") != FORMAT_VERSION:
        return (f"built in format {meta.get('format')} ({meta.get('storage', 'unknown layout')}); this version "
                f"reads format {FORMAT_VERSION} (whole images)")
    now = split.fingerprint()
    if meta.get("source_digest") == now.digest():
        return None
    try:
        then = TreeFingerprint.from_json(json.loads((path / "files.json").read_text()))
        what = then.difference(now)
    except (OSError, ValueError, KeyError, TypeError):
        what = "its fingerprint differs"
    return f"{split.root} changed since the cache was built: {what}"


def cache_problem(data, image_size: int) -> Optional[str]:
    """Why ``data`` (a :class:`~ablate.config.DataConfig` with ``loader: cache``) has no usable
    cache for ``image_size``: missing, in another format, or of a tree that changed since it was
    built; None when it can be used (or the loader is not ``cache``)."""
    if data.loader != "cache" or not data.root:
        return None
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
        why = stale_reason(path, splits[split])
        if why is not None:
            return f"cache: {path}: stale cache, {why} (allowed: rebuild it with: {build} --force)"
    return None
