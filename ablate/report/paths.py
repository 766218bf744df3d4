"""Where a report goes, and how it names its MLflow store, its spec and its command: relative to
the working directory, with any password masked, never by an absolute path of the machine that
made it. The command is one that can be run again: its paths are relative to the working
directory even where they climb out of it, and the report says where that directory is from
its own folder (:func:`run_in`)."""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

from ablate.spec.types import path_slug
from ablate.urls import display_url, is_sqlite

#: where reports go, under the working directory, unless --out says otherwise (git-ignored)
REPORTS_DIR = "reports"


def default_out(name: str) -> Path:
    """``reports/<slug>/`` under the working directory (git-ignored; ``results/`` holds the
    committed reference reports, written only with ``--out``)."""
    return Path(REPORTS_DIR) / path_slug(name)


def shown_store(uri: str, cwd: Optional[str] = None) -> str:
    """The tracking URI as a report shows it: password masked, a local file relative to the
    working directory, and a local file elsewhere by its name alone (never an absolute path)."""
    shown = display_url(uri, cwd)
    sqlite = shown.split(":///", 1)[0] + ":///" if is_sqlite(shown) else "sqlite:///"  # any driver: sqlite+pysqlite
    for prefix in (sqlite, "file://", ""):
        rest = shown[len(prefix):]
        if shown.startswith(prefix) and os.path.isabs(rest):
            return f"{prefix}<outside the working directory>/{Path(rest).name}"
    return shown


def _relative(path: str, start: str) -> Optional[str]:
    """``path`` relative to ``start`` where they share a folder below the filesystem's root;
    ``None`` where they share only the root (``../../../../work/main`` is an absolute path in
    all but name) or lie on different drives."""
    try:
        if os.path.dirname(os.path.commonpath([path, start])) == os.path.commonpath([path, start]):
            return None  # the common folder is the root itself
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return None


def shown_path(path: str, cwd: Optional[str] = None) -> str:
    """A path of the command a report records (a spec, ``--out``): relative to the working
    directory, also where it is outside it (``../specs/x.yaml``), so that the command runs again;
    by its name alone only where the two share no folder but the root.

    Relative rather than a copy of the spec beside the report: a spec may ``extends`` files by
    paths relative to itself (``../quickstart.yaml``), which a lone copy would break, and the
    command must read the same file the report was made of. A name alone
    (``<outside the working directory>/x.yaml``) names a file no command can find."""
    if not os.path.isabs(path):
        return path
    cwd = os.path.abspath(cwd or os.getcwd())
    relative = _relative(os.path.abspath(path), cwd)
    return relative if relative is not None else f"<outside the working directory>/{Path(path).name}"


def shown_command(command: str, cwd: Optional[str] = None) -> str:
    """``command`` with its absolute paths (a spec, ``--out``) shown as :func:`shown_path` does."""
    try:
        words = shlex.split(command)
    except ValueError:  # not a shell's words (an unbalanced quote): space-separated as given
        return " ".join(shown_path(word, cwd) for word in command.split(" "))
    return shlex.join(shown_path(word, cwd) for word in words)


def run_in(out_dir: Path, cwd: Optional[str] = None) -> str:
    """The working directory a report's command ran in, relative to the report's folder
    (``../..`` for the default ``reports/<name>/``): where its command runs again; ``""`` where
    the two share no folder but the root (the report names no absolute path)."""
    relative = _relative(os.path.abspath(cwd or os.getcwd()), os.path.abspath(out_dir))
    return Path(relative).as_posix() if relative is not None else ""
