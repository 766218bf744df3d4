"""Experiment specs: a YAML file -> a validated :class:`Spec` -> fully resolved :class:`Cell` s.

A spec names the settings of one S²-MLP configuration (``data``, ``model``, ``train``; the
schema of :mod:`ablate.config`) and what to vary: a ``grid`` (cartesian product over dotted
keys), ``zip`` groups (lists varied together), ``exclude`` rules and ``seeds``; or an Optuna
``search``. ``reference`` rows carry a paper table's numbers for the cells that reproduce it.
The format is documented in ``docs/specs.md``.

Everything a user can get wrong is found here, before anything runs, and reported all at once
as ``file:line: field: problem (allowed: ...)`` in a :class:`~ablate.errors.SpecError`.
Loading reads nothing but the spec files (and checks that dataset roots exist), imports no
user-named code and constructs no Python objects from YAML tags (``yaml.SafeLoader`` nodes).
"""
from __future__ import annotations

import difflib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import ValidationError

from ablate.config import MACHINE_LOCAL, SECTIONS, CellConfig, cell_key, flat_params
from ablate.errors import AblateError, SpecError

SPEC_KEYS = ("name", "description", "extends", "data", "model", "train", "grid", "zip", "exclude",
             "search", "seeds", "reference")
#: keys that describe what a spec varies: a spec that sets one of grid/zip/search replaces all
#: of these from the spec it extends (an inherited exclude or reference would describe another grid)
DESIGN_KEYS = ("grid", "zip", "exclude", "search", "reference")
SAMPLERS = ("tpe", "random", "nsga2", "cmaes", "grid")
PRUNERS = ("none", "median", "hyperband")
#: objective metric -> the direction used when a spec does not say
OBJECTIVE_METRICS = {
    "val_top1": "maximize", "val_top5": "maximize", "val_loss": "minimize", "macs": "minimize",
    "flops": "minimize", "params": "minimize", "params_paper": "minimize",
    "train_seconds": "minimize", "images_per_second": "maximize"}
DIRECTIONS = ("maximize", "minimize")
SEARCH_KEYS = ("sampler", "objectives", "trials", "pruner", "space")
PARAM_KINDS = ("int", "float", "choice")
PARAM_OPTIONS = ("step", "log")
REFERENCE_KEYS = ("source", "rows")
#: the paper prints parameter counts in 10^6 ("M") on most rows and in 2^20 ("Mi") on some,
#: MACs in 10^9 ("G") and once in 2^30 ("Gi"): a row says which, so ours can be shown alike
REFERENCE_ROW_KEYS = ("when", "top1", "top5", "params_m", "gmacs", "params_unit", "macs_unit", "note")
PARAMS_UNITS = {"M": 1e6, "Mi": 2.0 ** 20}
MACS_UNITS = {"G": 1e9, "Gi": 2.0 ** 30}

#: every dotted setting a grid, zip, search or exclude can name
SETTINGS = tuple(f"{section}.{name}" for section, model in SECTIONS.items() for name in model.model_fields)


# ---------------------------------------------------------------------------------------------
# The public objects
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """One search objective: a final MLflow metric and whether to maximize or minimize it."""
    metric: str
    direction: Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Param:
    """One search-space parameter over a dotted setting.

    ``kind`` int: ``[low, high]`` inclusive, optional ``step`` and ``log``; float: ``[low, high]``,
    optional ``step`` or ``log``; choice: ``choices``, any values the setting accepts.
    """
    kind: Literal["int", "float", "choice"]
    low: Optional[Union[int, float]] = None
    high: Optional[Union[int, float]] = None
    step: Optional[Union[int, float]] = None
    log: bool = False
    choices: Optional[list] = None


@dataclass(frozen=True)
class SearchSpec:
    """An Optuna search: sampler, objectives (one, or several for a Pareto front), trials, pruner, space."""
    sampler: str
    objectives: list[Objective]
    trials: int
    pruner: str
    space: dict[str, Param]


@dataclass(frozen=True)
class Cell:
    """One fully resolved training configuration of a spec, with its stable key."""
    config: CellConfig
    key: str                    # ablate.config.cell_key(config)
    values: dict[str, Any]      # the spec's varied dotted keys -> this cell's value
    seed: int


@dataclass
class Spec:
    """A validated experiment spec. Build it with :func:`load_spec`."""
    name: str
    description: str
    path: Path
    base: CellConfig
    seeds: list[int]
    grid: dict[str, list]
    zip: list[dict[str, list]]
    exclude: list[dict[str, Any]]
    search: Optional[SearchSpec]
    reference: Optional[dict]
    varied: list[str]
    _cells: list[Cell] = field(default_factory=list, repr=False)

    @property
    def slug(self) -> str:
        """``name`` as one safe path component: the folder of its checkpoints and reports."""
        return path_slug(self.name)

    @property
    def kind(self) -> str:
        """``search`` for a search spec, else ``grid`` (a spec without a grid is a grid of one cell)."""
        return "search" if self.search is not None else "grid"

    def cells(self) -> list[Cell]:
        """Every cell in run order: seeds outermost, then the grid keys and zip groups as written.

        A search has no cells before it samples them (:meth:`resolve`); this returns ``[]`` there.
        """
        return list(self._cells)

    def resolve(self, values: dict[str, Any]) -> CellConfig:
        """The base configuration with dotted ``values`` applied and validated.

        Raises :class:`AblateError` naming the values and the problem when the combination is
        invalid (e.g. a sampled width not divisible by the shift's channel groups).
        """
        unknown = [k for k in values if k not in SETTINGS]
        if unknown:
            raise AblateError(f"{self.path}: {unknown[0]}: not a setting{_did_you_mean(unknown[0], SETTINGS)} "
                              "(allowed: data.*, model.*, train.* settings; see `ablate spec-help`)")
        config, errors = _validate_cell(_section_dicts(self.base), values)
        if errors:
            what = _format_values(values) or "base"
            raise AblateError(f"{self.path}: {what}: " + "; ".join(f"{f}: {msg}" for f, _, msg in errors))
        return config


def path_slug(name: str) -> str:
    """``name`` reduced to letters, digits, ``.``, ``_`` and ``-`` (no separators, no ``..``)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return slug or "unnamed"


def load_spec(path: str | Path, *, check_paths: bool = True) -> Spec:
    """Read, merge (``extends``), expand (``${VAR}``) and validate a spec file.

    Raises :class:`SpecError` listing every problem found, each ``file:line: field: problem``.
    ``check_paths=False`` skips the dataset-root checks (to plan without the data at hand).
    """
    return _SpecBuilder(Path(path), check_paths).build()


# ---------------------------------------------------------------------------------------------
# Problems: collected, never raised one at a time
# ---------------------------------------------------------------------------------------------

Where = tuple[str, int]   # (file as shown to the user, 1-based line)


class _Problems:
    def __init__(self, top: str):
        self.top = top
        self._items: dict[str, tuple[str, int]] = {}   # text -> (file, line), in the order found

    def add(self, where: Where, field_name: str, problem: str) -> None:
        file, line = where
        self._items.setdefault(f"{file}:{line}: {field_name}: {problem}", (file, line))

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self) -> None:
        if self._items:
            # the spec's own file first, then the files it extends; each by line
            order = sorted(self._items, key=lambda t: (self._items[t][0] != self.top, self._items[t]))
            raise SpecError(order)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.7)
    return f"; did you mean {close[0]}?" if close else ""


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return repr(value) if not isinstance(value, bool) else str(value).lower()


def _format_values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_format_value(v)}" for k, v in values.items())


# ---------------------------------------------------------------------------------------------
# Safe YAML with line numbers
# ---------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``, a classic trap)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))

_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _read_yaml(path: Path, shown: str, problems: _Problems) -> tuple[Any, dict[tuple, int]]:
    """The document's plain Python value and the line of every key and list item in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        problems.add((shown, 1), "file", f"not UTF-8 text ({e.reason}) (allowed: a UTF-8 YAML file)")
        return None, {}
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or "invalid YAML"
        if e.context and e.context_mark and e.problem:
            what += f" ({e.context} at line {e.context_mark.line + 1})"
        problems.add((shown, mark.line + 1 if mark else 1), "yaml", f"syntax error: {what} (allowed: valid YAML)")
        return None, {}
    except yaml.YAMLError as e:
        problems.add((shown, 1), "yaml", f"syntax error: {e} (allowed: valid YAML)")
        return None, {}
    if node is None:
        problems.add((shown, 1), "spec", "the file is empty (allowed: a mapping with name, data, model, "
                     "train and optionally grid, zip, exclude, seeds, search, reference, extends)")
        return None, {}
    lines: dict[tuple, int] = {}
    try:
        return _construct(loader, node, (), lines, shown, problems), lines
    finally:
        loader.dispose()


def _construct(loader: _Loader, node: yaml.Node, path: tuple, lines: dict, shown: str,
               problems: _Problems) -> Any:
    line = node.start_mark.line + 1
    lines.setdefault(path, line)
    dotted = ".".join(str(p) for p in path) or "spec"
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        problems.add((shown, line), dotted, f"YAML tag {node.tag} is not allowed (allowed: plain mappings, "
                     "lists, strings, numbers, booleans)")
        return None
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
        out = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.add((shown, key_node.start_mark.line + 1), dotted, "a key must be a plain word")
                continue
            key = _construct(loader, key_node, path + ("<key>",), {}, shown, problems)
            if key in out:
                problems.add((shown, key_node.start_mark.line + 1), ".".join(map(str, path + (key,))),
                             "duplicate key (allowed: each key once per mapping)")
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _construct(loader, value_node, path + (key,), lines, shown, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, path + (i,), lines, shown, problems) for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node)
    except yaml.constructor.ConstructorError:
        problems.add((shown, line), dotted, f"YAML tag {node.tag} is not allowed (allowed: plain strings, "
                     "numbers, booleans, null)")
        return None


# ---------------------------------------------------------------------------------------------
# Pydantic errors -> problems
# ---------------------------------------------------------------------------------------------

def _type_label(info) -> str:
    """``int > 0``, ``keep | zero``, ``str | null``: a field's type as a user reads it."""
    label, constraints = _annotation_label(info.annotation), "".join(_constraint_labels(info.metadata))
    if label.endswith(" | null"):  # Optional[float] with gt=0: the bound is on the float
        return label.removesuffix(" | null") + constraints + " | null"
    return label + constraints


def _constraint_labels(metadata) -> list[str]:
    out = []
    for m in metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
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


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _describe_error(err: dict, section: str, name: Optional[str]) -> str:
    """One pydantic error as ``problem (allowed: ...)``."""
    model = SECTIONS[section]
    kind, got = err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return (f"unknown setting{_did_you_mean(name, model.model_fields)} "
                f"(allowed: {', '.join(model.model_fields)})")
    if kind in ("value_error", "assertion_error"):
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return msg if "(allowed:" in msg else f"{msg} (allowed: see `ablate spec-help`)"
    info = model.model_fields.get(name) if name else None
    allowed = _type_label(info) if info else "see `ablate spec-help`"
    if kind == "literal_error":
        choices = [str(c) for c in get_args(info.annotation)] if info else []
        return f"{_format_value(got)} is not a choice{_did_you_mean(got, choices)} (allowed: {allowed})"
    for word, phrase in _TYPE_WORDS.items():
        if kind.startswith(word + "_"):
            return f"expected {phrase}, got {_format_value(got)} (allowed: {allowed})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"must be {op} {bound}, got {_format_value(got)} (allowed: {allowed})"
    return f"{err['msg']}, got {_format_value(got)} (allowed: {allowed})"


def _errors_of(exc: ValidationError) -> list[tuple[str, tuple[str, ...], str]]:
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
            out.append((dotted, (dotted,), _describe_error(err, section, name)))
            continue
        message = _describe_error(err, section, None)
        text = err["msg"]
        names = sorted((n for n in SECTIONS[section].model_fields if re.search(rf"\b{n}\b", text)),
                       key=lambda n: re.search(rf"\b{n}\b", text).start())
        involved = tuple(f"{section}.{n}" for n in names) or (section,)
        out.append((involved[0], involved, message))
    return out


def _section_dicts(config: CellConfig) -> dict[str, dict]:
    return {section: getattr(config, section).model_dump() for section in SECTIONS}


def _validate_cell(base: dict[str, dict], overrides: dict[str, Any]):
    """``(CellConfig or None, errors)`` for the base sections with dotted overrides applied."""
    sections = {s: dict(values) for s, values in base.items()}
    for dotted, value in overrides.items():
        section, name = dotted.split(".", 1)
        sections.setdefault(section, {})[name] = value
    try:
        return CellConfig.model_validate(sections), []
    except ValidationError as e:
        return None, _errors_of(e)


# ---------------------------------------------------------------------------------------------
# Building a Spec
# ---------------------------------------------------------------------------------------------

class _SpecBuilder:
    """Reads, merges and checks one spec; every check adds to ``problems`` and goes on."""

    def __init__(self, path: Path, check_paths: bool):
        self.path = path
        self.shown = str(path)
        self.check_paths = check_paths
        self.problems = _Problems(self.shown)
        self.origins: dict[tuple, Where] = {}
        self.zip_paths: dict[str, tuple] = {}   # zip key -> its path in the spec, for line numbers
        self.bad_keys: set[str] = set()         # settings whose grid/zip/search entry is invalid
        self.unreadable = False                 # a file failed to parse, or an extends failed

    # -- where a value was written --

    def where(self, *path) -> Where:
        """Line of the most specific written part of ``path`` (a key, a list item, or its parent)."""
        path = tuple(path)
        while path:
            if path in self.origins:
                return self.origins[path]
            path = path[:-1]
        return (self.shown, 1)

    def add(self, path: tuple, problem: str, field_name: Optional[str] = None) -> None:
        self.problems.add(self.where(*path), field_name or ".".join(str(p) for p in path), problem)

    # -- reading and extends --

    def _read(self, path: Path, shown: str, chain: tuple[Path, ...]) -> dict:
        data, lines = _read_yaml(path, shown, self.problems)
        if data is None:
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
            if not isinstance(extends, str) or not extends:
                self.problems.add(origins[("extends",)], "extends", f"expected a relative file path, got "
                                  f"{_format_value(extends)} (allowed: a path relative to this file)")
            else:
                parent = (path.parent / extends).resolve()
                parent_shown = os.path.normpath(os.path.join(os.path.dirname(shown), extends))
                if parent in chain:
                    self.problems.add(origins[("extends",)], "extends", f"{extends} extends this file again "
                                      "(allowed: a chain of extends without cycles)")
                elif not parent.is_file():
                    self.problems.add(origins[("extends",)], "extends", f"no such file {extends} (looked for "
                                      f"{parent}) (allowed: an existing spec, relative to this file)")
                else:
                    self.unreadable = False
                    inherited = self._read(parent, parent_shown, chain + (parent,))
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
                    self._forget(k)
        for key, value in own.items():
            if key in SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
                for name in value:
                    self._forget(key, name)
            else:
                merged[key] = value
                self._forget(key)
        return merged

    def _forget(self, *prefix) -> None:
        for p in [p for p in self.origins if p[:len(prefix)] == prefix]:
            del self.origins[p]

    # -- environment variables --

    def _expand(self, value: Any, path: tuple) -> Any:
        if isinstance(value, dict):
            return {k: self._expand(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._expand(v, path + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value

        def substitute(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            got = os.environ.get(name)
            if got:  # like the shell's ${VAR:-default}: an empty variable takes the default too
                return got
            if default is not None:
                return default
            self.add(path, f"environment variable {name} is not set (allowed: set it, or write "
                     f"${{{name}:-default}})")
            return m.group(0)

        return _ENV.sub(substitute, value)

    # -- the whole spec --

    def build(self) -> Spec:
        if not self.path.is_file():
            raise SpecError([f"{self.shown}: no such spec file (allowed: a path to a YAML spec)"])
        raw = self._read(self.path, self.shown, (self.path.resolve(),))
        if self.unreadable:  # a file that could not be parsed or extended: the rest would mislead
            self.problems.raise_if_any()
        raw = self._expand(raw, ())

        for key in raw:
            if key not in SPEC_KEYS:
                self.add((key,), f"unknown key{_did_you_mean(key, SPEC_KEYS)} (allowed: {', '.join(SPEC_KEYS)})")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            self.add(("name",), f"expected a non-empty string (the MLflow experiment name), got "
                     f"{_format_value(name) if 'name' in raw else 'nothing'} (allowed: e.g. name: my-ablation)",
                     "name")
        description = raw.get("description") or ""
        if not isinstance(description, str):
            self.add(("description",), "expected a string (allowed: one line of text)")
            description = ""

        for key in DESIGN_KEYS:
            if key in raw and raw[key] is None:
                self.add((key,), "is empty (allowed: leave the key out, or give it a value; see docs/specs.md)")
        base = self._sections(raw)
        seeds = self._seeds(raw.get("seeds", [0]))
        grid = self._grid(raw.get("grid"))
        zips = self._zips(raw.get("zip"))
        search = self._search(raw.get("search"), base) if raw.get("search") is not None else None
        if search is not None and (grid or zips):
            self.add(("search",), "a spec has either a grid (with zip) or a search, not both "
                     "(allowed: remove grid/zip, or search)")
        varied = self._varied(grid, zips, search)
        exclude = self._exclude(raw.get("exclude"), varied)
        reference = self._reference(raw.get("reference"))

        cells = []
        base_config = self._base_config(base, set(varied) | self.bad_keys)
        if not self.problems:
            combos = self._combinations(grid, zips, exclude)
            cells = self._cells(base, combos, seeds, varied) if search is None else []
        if not self.problems and search is None:
            self._check_unique(cells)
            self._check_reference(reference, cells)
        if not self.problems and self.check_paths:
            configs = [c.config for c in cells] or [base_config]
            self._check_data_roots(configs)
        self.problems.raise_if_any()

        if len(seeds) > 1:
            varied = varied + ["train.seed"]
            cells = [Cell(c.config, c.key, {**c.values, "train.seed": c.seed}, c.seed) for c in cells]
        return Spec(name=name, description=description, path=self.path, base=base_config, seeds=seeds,
                    grid=grid, zip=zips, exclude=exclude, search=search, reference=reference,
                    varied=varied, _cells=cells)

    # -- sections --

    def _sections(self, raw: dict) -> dict[str, dict]:
        base = {}
        for section in SECTIONS:
            value = raw.get(section)
            if value is None:
                base[section] = {}
            elif not isinstance(value, dict):
                self.add((section,), f"expected a mapping of settings, got {_format_value(value)} "
                         f"(allowed: {', '.join(SECTIONS[section].model_fields)})")
                base[section] = {}
            else:
                base[section] = value
        if "seed" in base["train"]:
            self.add(("train", "seed"), "set seeds with the top-level `seeds:` list (allowed: seeds: [0, 1, 2])")
        return base

    def _base_config(self, base: dict, varied: set[str]) -> CellConfig:
        """The base alone; its problems on settings the grid or search sets are left to the cells."""
        config, errors = _validate_cell(base, {})
        for dotted, involved, message in errors:
            if not varied.intersection(involved):
                self.problems.add(self._setting_where(involved), dotted, message)
        if config is not None:
            return config
        sections = {}
        for section, model in SECTIONS.items():
            try:
                sections[section] = model.model_validate(base[section])
            except ValidationError:
                sections[section] = model.model_construct(**base[section])
        return CellConfig.model_construct(**sections)

    def _setting_where(self, involved) -> Where:
        """The line of the first involved setting the spec writes, else of its section."""
        for dotted in involved:
            parts = tuple(dotted.split(".", 1))
            if parts in self.origins:
                return self.origins[parts]
        return self.where(involved[0].split(".")[0])

    def _setting_key(self, key: Any, path: tuple) -> bool:
        """Whether a grid/zip/search/exclude key names a setting; adds the problem if not."""
        if key in SETTINGS:
            if key == "train.seed":
                self.add(path, "vary seeds with the top-level `seeds:` list (allowed: seeds: [0, 1, 2])")
                return False
            return True
        key = str(key)
        hint = _did_you_mean(key, SETTINGS)
        if not hint and "." not in key:
            matches = [s for s in SETTINGS if s.endswith("." + key)]
            hint = f"; did you mean {matches[0]}?" if matches else ""
        self.add(path, f"names no setting{hint} (allowed: a dotted setting such as model.width; "
                 "see `ablate spec-help`)")
        return False

    # -- seeds, grid, zip, exclude --

    def _seeds(self, seeds: Any) -> list[int]:
        ok = (isinstance(seeds, list) and seeds
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds))
        if not ok:
            self.add(("seeds",), f"expected a non-empty list of integers >= 0, got {_format_value(seeds)} "
                     "(allowed: e.g. seeds: [0, 1, 2])")
            return [0]
        if len(set(seeds)) != len(seeds):
            self.add(("seeds",), f"repeated seed in {_format_value(seeds)} (allowed: distinct seeds)")
        return list(dict.fromkeys(seeds))

    def _values_list(self, value: Any, path: tuple) -> bool:
        if not isinstance(value, list):
            self.add(path, f"expected a list of values, got {_format_value(value)} (allowed: e.g. [a, b])")
            return False
        if not value:
            self.add(path, "empty list (allowed: at least one value)")
            return False
        return True

    def _grid(self, grid: Any) -> dict[str, list]:
        if grid is None:
            return {}
        if not isinstance(grid, dict) or not grid:
            self.add(("grid",), f"expected a mapping of dotted settings to lists, got {_format_value(grid)} "
                     "(allowed: e.g. grid: {model.shift: [none, four]})")
            return {}
        out = {}
        for key, values in grid.items():
            if self._setting_key(key, ("grid", key)):
                if self._values_list(values, ("grid", key)):
                    out[key] = values
                else:
                    self.bad_keys.add(key)
        return out

    def _zips(self, zips: Any) -> list[dict[str, list]]:
        """``zip`` is one group (a mapping) or a list of groups; each group's lists have one length."""
        if zips is None:
            return []
        groups = [(zips, ("zip",))] if isinstance(zips, dict) else (
            [(g, ("zip", i)) for i, g in enumerate(zips)] if isinstance(zips, list) else None)
        if not groups:
            self.add(("zip",), "expected a mapping of dotted settings to equal-length lists, or a list of such "
                     "mappings (allowed: e.g. zip: {model.image_size: [112, 224], train.batch_size: [256, 128]})")
            return []
        out = []
        for group, path in groups:
            if not isinstance(group, dict) or not group:
                self.add(path, "expected a mapping of dotted settings to equal-length lists "
                         "(allowed: e.g. {model.image_size: [112, 224], train.batch_size: [256, 128]})")
                continue
            good = {k: v for k, v in group.items()
                    if self._setting_key(k, path + (k,)) and self._values_list(v, path + (k,))}
            self.bad_keys.update(k for k in group if k in SETTINGS)
            lengths = {k: len(v) for k, v in good.items()}
            if len(set(lengths.values())) > 1:
                self.add(path, "lists of unequal length " + ", ".join(f"{k}: {n}" for k, n in lengths.items())
                         + " (allowed: lists of one length, varied together)", ".".join(map(str, path)))
            elif good and len(good) == len(group):
                out.append(good)
                for k in good:
                    self.zip_paths.setdefault(k, path + (k,))
        return out

    def _varied(self, grid: dict, zips: list[dict], search: Optional[SearchSpec]) -> list[str]:
        """Grid keys, zip keys and search keys in the order written; each may appear once."""
        sources = [(k, ("grid", k)) for k in grid] + [(k, self.zip_paths[k]) for group in zips for k in group]
        sources += [(k, ("search", "space", k)) for k in (search.space if search else {})]
        varied, seen = [], {}
        for key, path in sources:
            if key in seen:
                self.add(path, f"varied twice (also at {seen[key]}) (allowed: each setting in one place: the "
                         "grid, one zip group, or the search space)", ".".join(map(str, path)))
                continue
            seen[key] = ".".join(map(str, path))
            varied.append(key)
        return varied

    def _exclude(self, rules: Any, varied: list[str]) -> list[dict[str, Any]]:
        if rules is None:
            return []
        if not isinstance(rules, list):
            rules = [rules]
        out = []
        for i, rule in enumerate(rules):
            path = ("exclude", i)
            if not isinstance(rule, dict) or not rule:
                self.add(path, "expected a mapping of varied settings to values (allowed: e.g. "
                         "- {model.shift: none, model.patch_size: 4})", f"exclude[{i}]")
                continue
            bad = [k for k in rule if k not in varied]
            for k in bad:
                self.add(path + (k,), f"not a varied setting (allowed: {', '.join(varied) or 'grid or zip keys'})",
                         f"exclude[{i}].{k}")
            if not bad:
                out.append(rule)
        return out

    def _combinations(self, grid: dict, zips: list[dict], exclude: list[dict]) -> list[dict[str, Any]]:
        """The varied values of every cell before seeds; each rule of ``exclude`` must drop some."""
        factors = [[{k: v} for v in values] for k, values in grid.items()]
        factors += [[dict(zip(group, row)) for row in zip(*group.values())] for group in zips]
        combos = [dict(kv for part in parts for kv in part.items()) for parts in itertools.product(*factors)]
        kept = []
        used = [False] * len(exclude)
        for combo in combos:
            hits = [i for i, rule in enumerate(exclude) if all(_same(combo[k], v) for k, v in rule.items())]
            for i in hits:
                used[i] = True
            if not hits:
                kept.append(combo)
        for i, rule in enumerate(exclude):
            if not used[i]:
                self.add(("exclude", i), f"matches no cell: {_format_values(rule)} (allowed: values the grid "
                         "or zip lists hold)", f"exclude[{i}]")
        if combos and not kept:
            self.add(("exclude",), "excludes every cell (allowed: rules that leave at least one)")
        return kept

    # -- cells --

    def _cells(self, base: dict, combos: list[dict], seeds: list[int], varied: list[str]) -> list[Cell]:
        resolved = []
        for combo in combos:
            config, errors = _validate_cell(base, combo)
            for dotted, involved, message in errors:
                mine = [k for k in involved if k in combo]
                if not mine:
                    continue  # a base problem: reported once, by _base_config
                shown = {k: combo[k] for k in mine}
                path = self._varied_path(mine[0])
                self.add(path, f"cell {_format_values(shown)}: {message}", ".".join(map(str, path)))
            resolved.append((combo, config))
        if self.problems:
            return []
        cells = []
        for seed in seeds:
            for combo, config in resolved:
                config = config.model_copy(update={"train": config.train.model_copy(update={"seed": seed})})
                flat = flat_params(config)
                values = {k: flat[k] for k in varied}
                cells.append(Cell(config=config, key=cell_key(config), values=values, seed=seed))
        return cells

    def _varied_path(self, key: str) -> tuple:
        return ("grid", key) if ("grid", key) in self.origins else self.zip_paths.get(key, ("grid",))

    def _check_unique(self, cells: list[Cell]) -> None:
        first: dict[str, Cell] = {}
        for cell in cells:
            if cell.key in first:
                other = first[cell.key]
                local = ", ".join(sorted(MACHINE_LOCAL))
                self.add(("grid",) if ("grid",) in self.origins else ("zip",),
                         f"cells {_format_values(other.values) or 'base'} and {_format_values(cell.values)} are "
                         f"the same configuration (allowed: distinct values; {local} are machine-local and "
                         "not part of a cell's identity)", "grid")
                return
            first[cell.key] = cell

    # -- search --

    def _search(self, search: Any, base: dict) -> Optional[SearchSpec]:
        path = ("search",)
        if not isinstance(search, dict):
            self.add(path, f"expected a mapping with {', '.join(SEARCH_KEYS)} (allowed: see docs/specs.md)")
            return None
        for key in search:
            if key not in SEARCH_KEYS:
                self.add(path + (key,), f"unknown key{_did_you_mean(key, SEARCH_KEYS)} "
                         f"(allowed: {', '.join(SEARCH_KEYS)})")
        sampler = search.get("sampler", "tpe")
        if sampler not in SAMPLERS:
            self.add(path + ("sampler",), f"unknown sampler {_format_value(sampler)}{_did_you_mean(sampler, SAMPLERS)} "
                     f"(allowed: {', '.join(SAMPLERS)})")
        pruner = search.get("pruner", "none")
        if pruner is None or pruner is False:
            pruner = "none"
        if pruner not in PRUNERS:
            self.add(path + ("pruner",), f"unknown pruner {_format_value(pruner)}{_did_you_mean(pruner, PRUNERS)} "
                     f"(allowed: {', '.join(PRUNERS)})")
        trials = search.get("trials")
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            self.add(path + ("trials",), f"expected an integer > 0, got "
                     f"{_format_value(trials) if 'trials' in search else 'nothing'} (allowed: e.g. trials: 40)",
                     "search.trials")
            trials = 1
        objectives = self._objectives(search.get("objectives"))
        if len(objectives) > 1 and pruner != "none":
            self.add(path + ("pruner",), f"pruner {pruner} with {len(objectives)} objectives: Optuna cannot prune "
                     "multi-objective studies (allowed: pruner: none, or a single objective)", "search.pruner")
        if len(objectives) > 1 and sampler == "cmaes":
            self.add(path + ("sampler",), "cmaes optimizes a single objective (allowed: nsga2, tpe, random or "
                     "grid for several objectives)", "search.sampler")
        space = self._space(search.get("space"), base)
        return SearchSpec(sampler=sampler, objectives=objectives, trials=trials, pruner=pruner, space=space)

    def _objectives(self, objectives: Any) -> list[Objective]:
        path = ("search", "objectives")
        if not isinstance(objectives, list) or not objectives:
            self.add(path, "expected a non-empty list of {metric, direction} (allowed: e.g. "
                     "[{metric: val_top1, direction: maximize}])", "search.objectives")
            return []
        out = []
        for i, item in enumerate(objectives):
            p = path + (i,)
            if isinstance(item, str):
                item = {"metric": item}
            if not isinstance(item, dict):
                self.add(p, "expected {metric, direction} (allowed: e.g. {metric: macs, direction: minimize})")
                continue
            for key in item:
                if key not in ("metric", "direction"):
                    self.add(p + (key,), f"unknown key{_did_you_mean(key, ('metric', 'direction'))} "
                             "(allowed: metric, direction)")
            metric = item.get("metric")
            if metric not in OBJECTIVE_METRICS:
                self.add(p + ("metric",), f"unknown metric {_format_value(metric)}"
                         f"{_did_you_mean(metric, OBJECTIVE_METRICS)} (allowed: {', '.join(OBJECTIVE_METRICS)})",
                         f"search.objectives[{i}].metric")
                continue
            direction = item.get("direction", OBJECTIVE_METRICS[metric])
            if direction not in DIRECTIONS:
                self.add(p + ("direction",), f"unknown direction {_format_value(direction)} "
                         f"(allowed: {', '.join(DIRECTIONS)})", f"search.objectives[{i}].direction")
                continue
            if any(o.metric == metric for o in out):
                self.add(p, f"{metric} is an objective twice (allowed: each metric once)",
                         f"search.objectives[{i}]")
                continue
            out.append(Objective(metric=metric, direction=direction))
        return out

    def _space(self, space: Any, base: dict) -> dict[str, Param]:
        path = ("search", "space")
        if not isinstance(space, dict) or not space:
            self.add(path, "expected a mapping of dotted settings to parameters (allowed: e.g. "
                     "{model.width: {int: [64, 768], step: 64}, train.lr: {float: [1.0e-4, 3.0e-3], log: true}})",
                     "search.space")
            return {}
        out = {}
        for key, spec in space.items():
            if self._setting_key(key, path + (key,)):
                param = self._param(spec, path + (key,), f"search.space.{key}")
                if param is not None and self._param_values_valid(key, param, base, path + (key,)):
                    out[key] = param
                else:
                    self.bad_keys.add(key)
        return out

    def _param(self, spec: Any, path: tuple, shown: str) -> Optional[Param]:
        allowed = "{int: [low, high]} with optional step and log, {float: [low, high]} with optional " \
                  "step or log, or {choice: [values]}"
        if not isinstance(spec, dict):
            self.add(path, f"expected a parameter, got {_format_value(spec)} (allowed: {allowed})", shown)
            return None
        kinds = [k for k in spec if k in PARAM_KINDS]
        for key in spec:
            if key not in PARAM_KINDS + PARAM_OPTIONS:
                self.add(path + (key,), f"unknown key{_did_you_mean(key, PARAM_KINDS + PARAM_OPTIONS)} "
                         f"(allowed: {', '.join(PARAM_KINDS + PARAM_OPTIONS)})", f"{shown}.{key}")
        if len(kinds) != 1:
            self.add(path, f"needs exactly one of int, float, choice, got {len(kinds)} (allowed: {allowed})", shown)
            return None
        kind = kinds[0]
        value, log, step = spec[kind], spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            self.add(path + ("log",), "expected true or false (allowed: log: true)", f"{shown}.log")
            return None
        if kind == "choice":
            if not self._values_list(value, path + ("choice",)):
                return None
            if step is not None or log:
                self.add(path, "step and log apply to int and float parameters (allowed: {choice: [values]})", shown)
            if len({json.dumps(v, sort_keys=True, default=str) for v in value}) != len(value):
                self.add(path + ("choice",), "repeated value (allowed: distinct choices)", f"{shown}.choice")
            return Param(kind="choice", choices=list(value))
        number = int if kind == "int" else (int, float)
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, number) and not isinstance(v, bool) for v in value)):
            self.add(path + (kind,), f"expected [low, high] of {'integers' if kind == 'int' else 'numbers'}, got "
                     f"{_format_value(value)} (allowed: e.g. {kind}: [{'64, 768' if kind == 'int' else '1.0e-4, 3.0e-3'}])",
                     f"{shown}.{kind}")
            return None
        low, high = value
        if low > high:
            self.add(path + (kind,), f"low {low} > high {high} (allowed: low <= high)", f"{shown}.{kind}")
            return None
        if step is not None:
            if not isinstance(step, number) or isinstance(step, bool) or step <= 0:
                self.add(path + ("step",), f"expected a {'positive integer' if kind == 'int' else 'positive number'}, "
                         f"got {_format_value(step)} (allowed: e.g. step: {64 if kind == 'int' else 0.1})",
                         f"{shown}.step")
                return None
            if log and step != 1:
                self.add(path + ("step",), "step and log together are not supported by Optuna "
                         "(allowed: one of them)", f"{shown}.step")
                return None
        if log and low <= 0:
            self.add(path + (kind,), f"log scale needs low > 0, got {low} (allowed: positive bounds)",
                     f"{shown}.{kind}")
            return None
        return Param(kind=kind, low=low, high=high, step=step, log=log)

    def _param_values_valid(self, key: str, param: Param, base: dict, path: tuple) -> bool:
        """Each choice and each bound must be a valid value of its setting on its own.

        Combinations (a width against the shift's groups) are checked per trial by Spec.resolve.
        """
        values = param.choices if param.kind == "choice" else [param.low, param.high]
        ok = True
        for i, value in enumerate(values):
            _, errors = _validate_cell(base, {key: value})
            for dotted, involved, message in errors:
                if involved == (key,):
                    where = path + (("choice", i) if param.kind == "choice" else (param.kind,))
                    self.add(where, f"{_format_value(value)}: {message}", f"search.space.{key}")
                    ok = False
        return ok

    # -- reference --

    def _reference(self, reference: Any) -> Optional[dict]:
        if reference is None:
            return None
        path = ("reference",)
        if not isinstance(reference, dict):
            self.add(path, "expected {source, rows} (allowed: see docs/specs.md)")
            return None
        for key in reference:
            if key not in REFERENCE_KEYS:
                self.add(path + (key,), f"unknown key{_did_you_mean(key, REFERENCE_KEYS)} "
                         f"(allowed: {', '.join(REFERENCE_KEYS)})")
        if not isinstance(reference.get("source"), str):
            self.add(path + ("source",), "expected a string naming the paper table (allowed: e.g. "
                     "\"S2-MLP paper, Table 7 (ImageNet100)\")", "reference.source")
        rows = reference.get("rows")
        if not isinstance(rows, list) or not rows:
            self.add(path + ("rows",), "expected a non-empty list of rows (allowed: e.g. "
                     "- {when: {model.shift: four}, top1: 87.1, top5: 97.1})", "reference.rows")
            return None
        for i, row in enumerate(rows):
            self._reference_row(row, path + ("rows", i), f"reference.rows[{i}]")
        return reference

    def _reference_row(self, row: Any, path: tuple, shown: str) -> None:
        if not isinstance(row, dict):
            self.add(path, "expected a mapping (allowed: {when: {...}, top1, top5, params_m, gmacs})", shown)
            return
        for key in row:
            if key not in REFERENCE_ROW_KEYS:
                self.add(path + (key,), f"unknown key{_did_you_mean(key, REFERENCE_ROW_KEYS)} "
                         f"(allowed: {', '.join(REFERENCE_ROW_KEYS)})", f"{shown}.{key}")
        when = row.get("when")
        if not isinstance(when, dict) or not when:
            self.add(path + ("when",), "expected a mapping of dotted settings to values (allowed: e.g. "
                     "when: {model.shift: four})", f"{shown}.when")
        else:
            for key in when:
                self._setting_key(key, path + ("when", key))
        for key in ("top1", "top5", "params_m", "gmacs"):
            if key in row and (not isinstance(row[key], (int, float)) or isinstance(row[key], bool)):
                self.add(path + (key,), f"expected a number, got {_format_value(row[key])} "
                         "(allowed: the paper's printed number)", f"{shown}.{key}")
        for key, units in (("params_unit", PARAMS_UNITS), ("macs_unit", MACS_UNITS)):
            if key in row and row[key] not in units:
                self.add(path + (key,), f"unknown unit {_format_value(row[key])} (allowed: {', '.join(units)})",
                         f"{shown}.{key}")

    def _check_reference(self, reference: Optional[dict], cells: list[Cell]) -> None:
        """Every reference row describes exactly one configuration of the grid."""
        if not reference:
            return
        first_seed = cells[0].seed if cells else 0
        configs = [flat_params(c.config) for c in cells if c.seed == first_seed]
        for i, row in enumerate(reference.get("rows") or []):
            when = row.get("when") or {}
            hits = sum(all(_same(flat.get(k), v) for k, v in when.items()) for flat in configs)
            if hits != 1:
                self.add(("reference", "rows", i, "when"),
                         f"matches {hits} configurations of the grid (allowed: values that pick out exactly one)",
                         f"reference.rows[{i}].when")

    # -- data --

    def _check_data_roots(self, configs: list[CellConfig]) -> None:
        seen = set()
        for config in configs:
            data = config.data
            if not data.needs_root or (data.name, data.root) in seen:
                continue
            seen.add((data.name, data.root))
            where = ("data", "root") if ("data", "root") in self.origins else ("data", "name")
            if not data.root:
                self.add(where, f"{data.name} needs a dataset root (allowed: a folder with train/ and val/, "
                         "e.g. root: ${IMAGENET100_ROOT})", "data.root")
            elif not Path(data.root).is_dir():
                self.add(where, f"no such directory {data.root} (allowed: an existing folder with train/ and "
                         "val/; relative paths start at the working directory)", "data.root")
            elif data.name == "imagefolder" and not (Path(data.root) / "train").is_dir():
                self.add(where, f"{data.root} has no train/ folder (allowed: root/train/<class>/<image> and "
                         "root/val/<class>/<image>)", "data.root")


def _same(a: Any, b: Any) -> bool:
    """Equality of spec values across YAML spellings (4 == 4.0; offset lists compare as lists)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


# ---------------------------------------------------------------------------------------------
# `ablate spec-help`
# ---------------------------------------------------------------------------------------------

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
            out.append(SettingHelp(f"{section}.{name}", _type_label(info), info.get_default(call_default_factory=True),
                                   info.description or ""))
    return out


def format_settings_help() -> str:
    rows = settings_help()
    width = max(len(r.name) for r in rows)
    lines = ["Settings of data:, model: and train: (dotted names are what grid, zip, exclude and search name).",
             "Top-level keys: " + ", ".join(SPEC_KEYS) + ". Format: docs/specs.md.", ""]
    section = None
    for r in rows:
        if r.name.split(".")[0] != section:
            section = r.name.split(".")[0]
            lines += ([""] if lines[-1] else []) + [f"{section}:"]
        default = "null" if r.default is None else _format_value(r.default)
        lines.append(f"  {r.name.ljust(width)}  {r.type}  (default {default})")
        lines.append(f"  {' ' * width}  {r.description}")
    return "\n".join(lines)
