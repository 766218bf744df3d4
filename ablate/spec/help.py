"""``ablate spec-help``: every setting of ``data:``, ``model:`` and ``train:`` with its type and default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ablate.config import SECTIONS
from ablate.spec.files import SPEC_KEYS
from ablate.spec.problems import format_value, type_label


@dataclass(frozen=True)
class SettingHelp:
    name: str          # dotted, e.g. model.width
    type: str          # e.g. "int > 0", "keep | zero"
    default: Any
    description: str


def settings_help() -> list[SettingHelp]:
    """Every data, model and train setting with its type, default and one-line description."""
    out = []
    for section, model in SECTIONS.items():
        for name, info in model.model_fields.items():
            out.append(SettingHelp(f"{section}.{name}", type_label(info), info.get_default(call_default_factory=True),
                                   info.description or ""))
    return out


def format_settings_help() -> str:
    rows = settings_help()
    width = max(len(r.name) for r in rows)
    lines = ["Settings of data:, model: and train: (dotted names are what grid, zip, exclude, search and "
             "--set name).",
             "Top-level keys: " + ", ".join(SPEC_KEYS) + ". Format: docs/specs.md.", ""]
    section = None
    for r in rows:
        if r.name.split(".")[0] != section:
            section = r.name.split(".")[0]
            lines += ([""] if lines[-1] else []) + [f"{section}:"]
        default = "null" if r.default is None else format_value(r.default)
        lines.append(f"  {r.name.ljust(width)}  {r.type}  (default {default})")
        lines.append(f"  {' ' * width}  {r.description}")
    return "\n".join(lines)
