"""A cell's checkpoint on disk: written whole or not at all, read back only if intact and inert.

``last.pt`` is a ``torch.save`` file of tensors and plain data (numbers, strings, lists,
dicts), so it is read with ``torch.load(weights_only=True)``: a planted file whose pickle
would call a function (``os.system``, say) is refused instead of run. Its path is
predictable (``checkpoints/<spec>/<cell key>/last.pt``), so that matters.

``last.pt.sha256`` beside it is the integrity record: the sha256 of the newest checkpoint's
bytes first, then those of the two before it. The record is written before the new checkpoint
is renamed into place, so a kill between the two leaves the previous checkpoint, still listed
(every listed checkpoint is one this cell wrote, so resuming from any of them is exact).
A checkpoint that does not match, cannot be read, or holds more than plain data is moved
aside (``last.pt.bad-<time>``) with a one-line warning and the cell starts from scratch:
never a silently wrong result, never a cell that fails at every attempt.

A write that fails (a full disk, a read-only folder) removes its temporary file and raises
:class:`CheckpointWriteFailed`: every further cell would fail the same way, so the runner
stops the grid and leaves the cell to resume once there is room.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from ablate.errors import AblateError

DEFAULT_ROOT = "checkpoints"  # under the working directory, unless --checkpoints or $ABLATE_CHECKPOINTS say otherwise
_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteFailed(AblateError):
    """A checkpoint could not be written; the message says which file and why, in one line."""


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _temp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class _HashingWriter:
    """What ``torch.save`` writes to: the file, hashed on the way, and the OSError it met kept.

    torch's zip writer reports a failed write as ``unexpected pos ...``; keeping the OSError
    lets us say what happened (``No space left on device``) instead.
    """

    def __init__(self, file):
        self.file, self.sha, self.error = file, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            n = self.file.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(data)
        return n

    def flush(self) -> None:
        self.file.flush()


def _write_failed(path: Path, e: OSError) -> CheckpointWriteFailed:
    if e.errno in _SPACE:
        return CheckpointWriteFailed(f"no space left on device writing {path} (free some space and run again: "
                                     f"finished cells are kept and this one resumes)")
    return CheckpointWriteFailed(f"cannot write {path}: {e.strerror or e} (run again once it is writable: "
                                 f"finished cells are kept and this one resumes)")


def _oserror_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e``, if any (torch wraps it in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _open_new(path: Path):
    try:
        return open(path, "wb")
    except FileNotFoundError:  # another worker removed the empty folder as it finished its cell
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb")


def _write_temp(path: Path, write: Callable) -> tuple[Path, str]:
    """Write ``path``'s temporary file through ``write(file)`` and flush it to disk.

    Returns the temporary file and the sha256 of its bytes; on failure the file is gone.
    """
    tmp = _temp_path(path)
    writer = None
    try:
        with _open_new(tmp) as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before a name points at them
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = (writer.error if writer is not None else None) or _oserror_in(e)
        if cause is not None and isinstance(e, Exception):
            raise _write_failed(path, cause) from e
        raise
    return tmp, writer.sha.hexdigest()


def save(state: dict, path: Path) -> None:
    """Write ``state`` (tensors and plain data only) to ``path``, then list it in its integrity record."""
    import torch  # lazy: the runner's parent imports this module for paths and clean-up, never torch
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_failed(path, e) from e
    tmp, digest = _write_temp(path, lambda w: torch.save(state, w))
    try:
        # the newest first; the earlier ones stay listed because one of them may still be in place
        listed = [digest] + [d for d in _listed_digests(path) if d != digest][:2]
        record, _ = _write_temp(record_path(path), lambda w: w.write("".join(f"{d}\n" for d in listed).encode()))
        os.replace(record, record_path(path))
        os.replace(tmp, path)  # a kill before this line keeps the previous checkpoint, still listed
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _listed_digests(path: Path) -> list[str]:
    try:
        return record_path(path).read_text().split()
    except (OSError, UnicodeDecodeError):
        return []


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def set_aside(path: Path, why: str, log: Callable[[str], None]) -> Path:
    """Move a checkpoint that cannot be used (and its record) out of the way, saying so."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bad = path.with_name(f"{path.name}.bad-{stamp}")
    os.replace(path, bad)
    record = record_path(path)
    if record.exists():
        os.replace(record, record.with_name(f"{record.name}.bad-{stamp}"))
    log(f"warning: checkpoint {path} {why}; moved to {bad.name}, the cell starts from scratch")
    return bad


def load(path: Path, map_location, log: Callable[[str], None] = print) -> Optional[dict]:
    """The checkpoint at ``path`` if there is one and it is intact, else None (set aside if it was bad)."""
    import torch  # lazy: the runner's parent imports this module for paths and clean-up, never torch
    if not path.exists():
        return None
    listed = _listed_digests(path)
    if not listed:
        set_aside(path, "has no integrity record (" + record_path(path).name + ")", log)
        return None
    try:
        digest = _sha256(path)
    except OSError as e:
        set_aside(path, f"cannot be read ({e.strerror or e})", log)
        return None
    if digest not in listed:
        set_aside(path, "does not match its integrity record (changed or damaged)", log)
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that would run code
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        set_aside(path, f"cannot be loaded as plain tensors and data ({type(e).__name__}: {first[:200]})", log)
        return None
    if not isinstance(state, dict):
        set_aside(path, f"holds a {type(state).__name__}, not a checkpoint", log)
        return None
    return state


def remove(cell_dir: Path, root: Path, *, remove_root: bool = False) -> None:
    """Remove a finished cell's folder, then its spec's folder and (``remove_root``) the root if empty."""
    shutil.rmtree(cell_dir, ignore_errors=True)
    remove_empty(cell_dir.parent, root, remove_root=remove_root)


def remove_empty(spec_dir: Path, root: Path, *, remove_root: bool = False) -> None:
    """Remove a spec's checkpoint folder, then (``remove_root``) the root, each only if empty.

    ``os.rmdir`` removes only an empty folder, so a folder another worker is using stays.
    """
    for folder in [spec_dir] + ([root] if remove_root and spec_dir.parent == root else []):
        try:
            folder.rmdir()
        except OSError:  # not empty (another cell's checkpoint), already gone, or not ours to remove
            return


# ---- the checkpoint root, checked before anything trains -----------------------------------------

def check_root(root: str | Path, option: str = "--checkpoints") -> None:
    """Refuse (one-line :class:`AblateError` naming ``option``) a checkpoint root that no cell could
    write to: a file, a folder that is not writable, or a path below a file. Creates nothing; a
    root that does not exist yet is fine where its nearest existing folder is writable."""
    root = Path(root)
    shown = f"{option} {root}"
    if root.exists() and not root.is_dir():
        raise AblateError(f"{shown}: is not a folder (allowed: a folder where each cell keeps its checkpoints, "
                          "or a path where one may be created)")
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise AblateError(f"{shown}: {existing} is not a folder, so nothing can be created below it "
                              "(allowed: a path under a writable folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == root else f"cannot be created: {existing} is not writable"
        raise AblateError(f"{shown}: {what} (allowed: a folder you may write to, e.g. --checkpoints "
                          "./checkpoints)")
