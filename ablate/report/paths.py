"""Where a report goes, and how it names its MLflow store, its spec and its command: relative to
the working directory, with any password masked, never by an absolute path of the machine that
made it."""
from __future__ import annotations

import os
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


def shown_path(path: str, cwd: Optional[str] = None) -> str:
    """A path as a report shows it: relative to the working directory where it is under it,
    else by its name alone."""
    if not os.path.isabs(path):
        return path
    cwd = os.path.abspath(cwd or os.getcwd())
    if path == cwd or path.startswith(cwd.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, cwd)
    return f"<outside the working directory>/{Path(path).name}"


def shown_command(command: str, cwd: Optional[str] = None) -> str:
    """``command`` with its absolute paths (a spec, ``--out``) shown as :func:`shown_path` does."""
    return " ".join(shown_path(word, cwd) for word in command.split(" "))
