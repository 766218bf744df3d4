"""A spec file and the chain of files it ``extends``, merged into one mapping with the line of every value.

``extends: base.yaml`` (relative to the extending file) starts from another spec: the sections
``data``, ``model`` and ``train`` merge setting by setting, any other key is replaced whole, and a
spec that sets one of ``grid``/``zip``/``search`` replaces all of the design keys it inherits.
"""
from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path

from ablate.config import SECTIONS
from ablate.spec.problems import Problems, Where, format_value
from ablate.spec.yaml_source import read_yaml_file

SPEC_KEYS = ("name", "description", "extends", "data", "model", "train", "grid", "zip", "exclude",
             "search", "seeds", "reference", "report")
#: keys that describe what a spec varies: a spec that sets one of grid/zip/search replaces all
#: of these from the spec it extends (an inherited exclude, reference or report baseline would describe another grid)
DESIGN_KEYS = ("grid", "zip", "exclude", "search", "reference", "report")
#: the longest chain of extends followed
MAX_EXTENDS = 32


class SpecFiles:
    """Reads a spec and what it extends; ``origins`` maps each path in the merged mapping
    (``("model", "width")``, ``("grid", "model.shift", 2)``) to where it was written."""

    def __init__(self, problems: Problems):
        self.problems = problems
        self.origins: dict[tuple, Where] = {}
        self.unreadable = False   # a file failed to parse, or an extends failed

    def read(self, path: Path, shown: str, chain: tuple[Path, ...] = ()) -> dict:
        chain = chain or (path.resolve(),)
        before = len(self.problems)
        data, lines = read_yaml_file(path, shown, self.problems)
        if data is None and len(self.problems) > before:
            self.unreadable = True
            return {}
        origins = {p: (shown, line) for p, line in lines.items()}
        if not isinstance(data, dict):
            self.problems.add((shown, 1), "spec", f"expected a mapping of keys, got {type(data).__name__} "
                              f"(allowed: {', '.join(SPEC_KEYS)})")
            self.unreadable = True
            return {}
        extends = data.pop("extends", None)
        if "extends" in (p[0] for p in origins if p):
            self.unreadable = True  # until the extended file is read
            where = origins[("extends",)]
            if not isinstance(extends, str) or not extends:
                self.problems.add(where, "extends", f"expected a relative file path, got "
                                  f"{format_value(extends)} (allowed: a path relative to this file)")
            else:
                parent = (path.parent / extends).resolve()
                parent_shown = os.path.normpath(os.path.join(os.path.dirname(shown), extends))
                if parent in chain:
                    self.problems.add(where, "extends", f"{extends} extends this file again "
                                      "(allowed: a chain of extends without cycles)")
                elif len(chain) >= MAX_EXTENDS:
                    self.problems.add(where, "extends", f"a chain of more than {MAX_EXTENDS} files "
                                      f"(allowed: at most {MAX_EXTENDS} specs, each extending the next)")
                elif not parent.exists():
                    self.problems.add(where, "extends", f"no such file {extends} (looked for "
                                      f"{parent}){did_you_mean_file(path.parent / extends, extends)} "
                                      "(allowed: an existing spec, relative to this file)")
                elif unsafe_file(parent):
                    self.problems.add(where, "extends", f"{extends} ({parent}) {unsafe_file(parent)}")
                else:
                    self.unreadable = False
                    inherited = self.read(parent, parent_shown, chain + (parent,))
                    data = self._merge(inherited, data)
        origins.pop(("extends",), None)
        for p, where in origins.items():
            if p and p[0] != "extends":
                self.origins[p] = where
        return data

    def _merge(self, inherited: dict, own: dict) -> dict:
        """``own`` over ``inherited``: sections setting by setting, other keys whole.

        The origins of replaced values are dropped so that problems point at the winning line.
        """
        merged = dict(inherited)
        if any(k in own for k in ("grid", "zip", "search")):
            for k in DESIGN_KEYS:
                if k not in own:
                    merged.pop(k, None)
                    self.forget(k)
        for key, value in own.items():
            if key in SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
                for name in value:
                    self.forget(key, name)
            else:
                merged[key] = value
                self.forget(key)
        return merged

    def forget(self, *prefix) -> None:
        for p in [p for p in self.origins if p[:len(prefix)] == prefix]:
            del self.origins[p]


def spec_file_problem(path: Path) -> str | None:
    """Why the spec a command names cannot be read, or None: it does not exist, or it is a
    folder, a device, a FIFO or a socket (``/dev/zero`` would be read without end, a FIFO block)."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return f"no such spec file{did_you_mean_file(path, str(path))} (allowed: a path to a YAML spec)"
    except OSError as e:
        return f"cannot be read ({e.strerror}) (allowed: a spec file you can read)"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a spec file (allowed: a path to a YAML spec)"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file but {file_kind(st.st_mode)} (allowed: a path to a YAML spec file)"
    return None


#: what a spec file's name ends with
SPEC_SUFFIXES = (".yaml", ".yml")


def did_you_mean_file(path: Path, shown: str) -> str:
    """``; did you mean experiments/quickstart.yaml?`` for a spec path that does not exist: the
    same name with the other YAML suffix (``.yml`` for ``.yaml``), else the spec files in its
    folder nearest it by name (a typo, a missing suffix), written as the user wrote the path.
    Empty where the folder cannot be listed or nothing there is near."""
    try:
        names = sorted(e.name for e in os.scandir(path.parent)
                       if e.name.endswith(SPEC_SUFFIXES) and e.is_file())
    except OSError:
        return ""
    stem, suffix = os.path.splitext(path.name)
    other = {".yml": ".yaml", ".yaml": ".yml"}.get(suffix)
    if other and stem + other in names:
        close = [stem + other]
    else:  # the nearest by stem (every name shares .yaml), and any about as near (run1, run2 for run3)
        ratio = {n: difflib.SequenceMatcher(None, stem.lower(), os.path.splitext(n)[0].lower()).ratio()
                 for n in names}
        best = max(ratio.values(), default=0.0)
        close = [n for n in sorted(names, key=ratio.get, reverse=True) if ratio[n] >= max(0.6, best - 0.05)][:3]
    if not close:
        return ""
    folder = os.path.dirname(shown)
    return "; did you mean " + " or ".join(os.path.join(folder, name) for name in close) + "?"


def file_kind(mode: int) -> str:
    """``a FIFO``, ``a character device``, ...: what a path that is not a regular file is."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "another kind of file"


def unsafe_file(path: Path) -> str | None:
    """Why a spec that ``extends`` names must not be read, or None. A device or a FIFO would be
    read without end (``/dev/zero``) or block; a file that another user owns, or that any user
    may write, could change what this spec trains behind its author's back."""
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot be read ({e.strerror}) (allowed: a spec file you can read)"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder (allowed: a spec file, relative to this file)"
    if not stat.S_ISREG(st.st_mode):
        return ("is not a regular file (a device, a FIFO or a socket) (allowed: a spec file, relative to "
                "this file)")
    if st.st_uid not in (0, os.geteuid()):
        return (f"belongs to another user (uid {st.st_uid}) (allowed: a spec owned by you or by root; "
                "copy it to extend it)")
    if st.st_mode & stat.S_IWOTH:
        return (f"may be written by any user (mode {stat.S_IMODE(st.st_mode):o}) (allowed: a spec only its "
                f"owner may write: chmod o-w {path})")
    return None
