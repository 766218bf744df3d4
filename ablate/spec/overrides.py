"""Command-line overrides: ``--set KEY=VALUE`` on a spec, read like the spec itself.

KEY is a dotted setting (``model.width``) or ``seeds``; VALUE is YAML, read by the spec's own
safe loader (``64`` is an integer, ``1e-3`` a float, ``null`` none, ``[[0,1],[0,-1]]`` a list,
``'3'`` a string). A problem names the option it came from: ``--set model.widht=64: ...``.

An override replaces what the spec writes for that setting, in the base configuration and in
the design alike: a setting the grid (or a zip group, or the search space) varies is fixed at
the override's value, which removes it from what varies (``--set model.width=64`` on a width
grid leaves one cell per seed). :func:`experiment_suffix` names the experiment such a run records
into, so that it never mixes with the spec's own runs; an override of a machine-local setting
(where the data is, how a batch is split) alone records into the spec's own.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ablate import names
from ablate.spec.problems import Problems, Where, option_where, setting_hint
from ablate.spec.types import SETTINGS
from ablate.spec.yaml_source import read_yaml_text

#: what --set may name besides the dotted settings
OVERRIDE_KEYS = ("seeds",)
ALLOWED = "a dotted setting such as model.width, or seeds; see `ablate spec-help`"


@dataclass(frozen=True)
class Override:
    key: str      # a dotted setting, or "seeds"
    value: Any    # the YAML value
    text: str     # as typed, "model.width=64"

    @property
    def where(self) -> Where:
        return option_where(f"--set {self.text}")


def parse_overrides(items: Iterable[str], problems: Problems, *, settings: Iterable[str] = SETTINGS,
                    extra: Iterable[str] = OVERRIDE_KEYS, bare_prefix: Optional[str] = None,
                    allowed: str = ALLOWED) -> list[Override]:
    """The overrides of ``items`` (``KEY=VALUE`` strings), each problem added to ``problems``.

    ``bare_prefix`` (``"model."``) lets a key leave its section out (``ablate models --set width=384``).
    """
    settings, extra = tuple(settings), tuple(extra)
    known = settings + extra
    out: dict[str, Override] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        where = option_where(f"--set {item}")
        if not sep or not key:
            problems.add(where, None, "expected KEY=VALUE (allowed: e.g. --set model.width=64)")
            continue
        if bare_prefix and "." not in key and bare_prefix + key in settings:
            key = bare_prefix + key
        if key not in known:
            problems.add(where, None, f"unknown setting {key}{setting_hint(key, settings)} (allowed: {allowed})")
            continue
        if key == names.SEED:
            problems.add(where, None, "set seeds with --set seeds=[0, 1, 2] (allowed: a list of seeds)")
            continue
        if not raw.strip():
            problems.add(where, None, f"no value after = (allowed: a YAML value, e.g. {key}=null for none)")
            continue
        before = len(problems)
        value, _ = read_yaml_text(raw, where[0], problems, line_of=lambda line: where,
                                  empty=(None, "no value after = (allowed: a YAML value)"))
        if len(problems) > before:
            continue
        if key in out:
            problems.add(where, None, f"{key} is set twice (also --set {out[key].text}) (allowed: each setting once)")
            continue
        out[key] = Override(key, value, item)
    return list(out.values())


def experiment_suffix(effective: dict[str, Any]) -> str:
    """``+`` and 8 hex digits of a hash of the overrides that change the spec (dotted -> resolved
    value; machine-local settings never do): the same overrides always give the same experiment,
    different ones never share one."""
    if not effective:
        return ""
    canonical = json.dumps(effective, sort_keys=True, separators=(",", ":"))
    return "+" + hashlib.sha256(canonical.encode()).hexdigest()[:8]
