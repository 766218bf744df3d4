"""Problems in a spec, collected and reported all at once as ``file:line: field: problem (allowed: ...)``.

Also the translation of pydantic's validation errors into those messages, and the validation of
one cell's configuration (:func:`validate_cell`), which every part of the loader uses.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Annotated, Any, Literal, Optional, Protocol, Sequence, Union, get_args, get_origin

from pydantic import ValidationError

from ablate.config import SECTIONS, CellConfig
from ablate.errors import SpecError

#: where a value was written: (file as shown to the user, 1-based line), or (option, 0) for a
#: command-line option such as ``--set model.width=64``
Where = tuple[str, int]


def option_where(option: str) -> Where:
    """The location of a value given on the command line."""
    return (option, 0)


def location(where: Where) -> str:
    file, line = where
    return f"{file}:{line}" if line else file


class Problems:
    """Every problem found, each once, in the order: command-line options, the spec's own file,
    then the files it extends; each by line."""

    def __init__(self, top: str):
        self.top = top
        self._items: dict[str, Where] = {}   # text -> where, in the order found

    def add(self, where: Where, field_name: Optional[str], problem: str) -> None:
        """``file:line: field: problem``; an option (``--set model.width=0``) names its setting itself."""
        prefix = location(where) + (f": {field_name}" if field_name and where[1] else "")
        self._items.setdefault(f"{prefix}: {problem}", where)

    def __len__(self) -> int:
        return len(self._items)

    def raise_if_any(self) -> None:
        if self._items:
            def order(text: str):
                file, line = self._items[text]
                return (0 if not line else 1 if file == self.top else 2, file if line else "", line)
            raise SpecError(sorted(self._items, key=order))


def did_you_mean(word: Any, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.7)
    return f"; did you mean {close[0]}?" if close else ""


def setting_hint(key: Any, settings: Sequence[str]) -> str:
    """``; did you mean model.width?`` for a misspelled dotted setting: the name is compared
    within its section (``model.colour`` is not ``model.norm``); a bare name (``width``) finds
    the setting it ends."""
    key = str(key)
    section, _, name = key.rpartition(".")
    if section:
        in_section = {s.rpartition(".")[2]: s for s in settings if s.rpartition(".")[0] == section}
        if in_section:
            close = difflib.get_close_matches(name, list(in_section), n=1, cutoff=0.7)
            return f"; did you mean {in_section[close[0]]}?" if close else ""
        return did_you_mean(key, settings)
    matches = [s for s in settings if s.endswith("." + key)]
    return f"; did you mean {matches[0]}?" if matches else did_you_mean(key, settings)


def format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return repr(value) if not isinstance(value, bool) else str(value).lower()


def format_values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())


# ---- pydantic errors -> problems -------------------------------------------------------------

def type_label(info) -> str:
    """``int > 0``, ``keep | zero``, ``str | null``: a field's type as a user reads it."""
    label, constraints = _annotation_label(info.annotation), "".join(_constraint_labels(info.metadata))
    if label.endswith(" | null"):  # Optional[float] with gt=0: the bound is on the float
        return label.removesuffix(" | null") + constraints + " | null"
    return label + constraints


def _constraint_labels(metadata) -> list[str]:
    """`` > 0``, `` <= 1``: lower bounds first, however the field declares them."""
    out = []
    for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        for m in metadata:
            if getattr(m, attr, None) is not None:
                out.append(f" {op} {getattr(m, attr)}")
    return out


def _annotation_label(ann) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:  # e.g. Optional[PositiveInt]
        return _annotation_label(args[0]) + "".join(_constraint_labels(ann.__metadata__))
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is Union or type(ann).__name__ == "UnionType":
        return " | ".join("null" if a is type(None) else _annotation_label(a) for a in args)
    if origin is list:
        return f"list[{_annotation_label(args[0])}]" if args else "list"
    return getattr(ann, "__name__", str(ann))


class Substituted(str):
    """A string that ``${VAR}`` substitution made (:func:`ablate.spec.yaml_source.expand_env`),
    with the text the spec wrote (``written``) and how: ``quoted`` (one ``"${VAR}"`` in quotes),
    ``inside`` (within other text) or ``bare`` (one unquoted ``${VAR}`` whose text YAML reads as
    a string): a type error then says where the string came from, not that quotes were written."""

    written: str
    how: str

    def __new__(cls, text: str, written: str, how: str):
        self = super().__new__(cls, text)
        self.written, self.how = written, how
        return self

    def __reduce__(self):
        return (Substituted, (str(self), self.written, self.how))


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
_LOOKS_TYPED = re.compile(r"^[-+]?(\d[\d_]*(\.\d*)?([eE][-+]?\d+)?|\.inf|\.nan|true|false|null)$", re.IGNORECASE)


def _got(value: Any) -> str:
    """The value a type error got; a string that reads as a number is shown quoted: a grid
    value "3" is the string 3, which the spec must write without quotes to mean the number.
    A string made by ``${VAR}`` substitution says so, and how to get the number instead."""
    looks_typed = isinstance(value, str) and _LOOKS_TYPED.match(value.strip())
    if isinstance(value, Substituted):
        if not looks_typed:
            return f"{format_value(str(value))} (from {value.written})"
        if value.how == "quoted":
            return (f'the string "{value}" from "{value.written}": a substitution in quotes gives a string '
                    f"(write {value.written} without quotes for YAML to read it)")
        if value.how == "inside":
            return (f'the string "{value}" from {value.written}: a substitution inside other text gives a '
                    "string (write one bare ${VAR} as the whole value for YAML to read it)")
        return f'the string "{value}" from {value.written}, which YAML reads as a string'
    if looks_typed:
        return f'the string "{value}" (write it without quotes)'
    return format_value(value)


def describe_error(err: dict, section: str, name: Optional[str]) -> str:
    """One pydantic error as ``problem (allowed: ...)``."""
    model = SECTIONS[section]
    kind, got = err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return (f"unknown setting{did_you_mean(name, model.model_fields)} "
                f"(allowed: {', '.join(model.model_fields)})")
    if kind in ("value_error", "assertion_error"):
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return msg if "(allowed:" in msg else f"{msg} (allowed: see `ablate spec-help`)"
    info = model.model_fields.get(name) if name else None
    allowed = type_label(info) if info else "see `ablate spec-help`"
    if kind == "literal_error":
        choices = [str(c) for c in get_args(info.annotation)] if info else []
        return f"{format_value(got)} is not a choice{did_you_mean(got, choices)} (allowed: {allowed})"
    if kind == "finite_number":
        return f"expected a finite number, got {format_value(got)} (allowed: {allowed})"
    for word, phrase in _TYPE_WORDS.items():
        if kind.startswith(word + "_"):
            return f"expected {phrase}, got {_got(got)} (allowed: {allowed})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"must be {op} {bound}, got {format_value(got)} (allowed: {allowed})"
    return f"{err['msg']}, got {format_value(got)} (allowed: {allowed})"


def errors_of(exc: ValidationError) -> list[tuple[str, tuple[str, ...], str]]:
    """``(field, involved fields, problem)`` per error; ``field`` is dotted (``model.width``).

    A model-level validator (image size vs patch size, width vs shift groups) reports on the
    section: the settings it involves are the field names its message mentions, first one first.
    """
    out = []
    for err in exc.errors():
        loc = err["loc"]
        section = str(loc[0])
        if len(loc) >= 2:
            name = str(loc[1])
            dotted = f"{section}.{name}"
            out.append((dotted, (dotted,), describe_error(err, section, name)))
            continue
        message = describe_error(err, section, None)
        text = err["msg"]
        names = sorted((n for n in SECTIONS[section].model_fields if re.search(rf"\b{n}\b", text)),
                       key=lambda n: re.search(rf"\b{n}\b", text).start())
        involved = tuple(f"{section}.{n}" for n in names) or (section,)
        out.append((involved[0], involved, message))
    return out


def section_dicts(config: CellConfig) -> dict[str, dict]:
    return {section: getattr(config, section).model_dump() for section in SECTIONS}


def validate_cell(base: dict[str, dict], overrides: dict[str, Any]):
    """``(CellConfig or None, errors)`` for the base sections with dotted overrides applied.

    Strict types: a YAML string is never taken for a number (``"3"`` is not depth 3), nor a
    number for a boolean; integers are accepted where a float is wanted.
    """
    sections = {s: dict(values) for s, values in base.items()}
    for dotted, value in overrides.items():
        section, name = dotted.split(".", 1)
        sections.setdefault(section, {})[name] = value
    try:
        return CellConfig.model_validate(sections, strict=True), []
    except ValidationError as e:
        return None, errors_of(e)


class Checker(Protocol):
    """What the parts of the loader (search space, reference rows) report through: the spec
    builder, which knows the line each path was written on."""

    bad_keys: set[str]   # settings whose grid/zip/search entry is invalid

    def add(self, path: tuple, problem: str, field_name: Optional[str] = None) -> None: ...

    def setting_key(self, key: Any, path: tuple) -> bool: ...

    def values_list(self, value: Any, path: tuple) -> bool: ...

    def listed(self, key: str, value: Any, path: tuple, valid: bool) -> None: ...

    def invalid_reference(self, path: tuple, key: str, value: Any) -> Optional[str]: ...

    def valid_listed(self, key: str) -> str: ...
