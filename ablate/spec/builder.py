"""Building a :class:`Spec`: sections, seeds, grid, zip, exclude, cells; ``--set`` and ``--name``.

Every check adds to one :class:`~ablate.spec.problems.Problems` and goes on, so that a spec's
problems are reported all at once. Sizes are bounded before anything large is built: a grid is
counted before its product is (``max_cells``).
"""
from __future__ import annotations

import itertools
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import ValidationError

from ablate import names
from ablate.config import (MACHINE_LOCAL, MAX_SEED, S2MLP_ONLY, SECTIONS, CellConfig, applies,
                           flat_params, identity, keys_by_seed)
from ablate.data.cache_check import cache_problem
from ablate.errors import SpecError
from ablate.models import timm_baselines
from ablate.spec.files import DESIGN_KEYS, SPEC_KEYS, SpecFiles, spec_file_problem
from ablate.spec.overrides import Override, experiment_suffix, parse_overrides
from ablate.spec.problems import (Problems, Where, did_you_mean, format_value, format_values, location,
                                      option_where, setting_hint, validate_cell)
from ablate.spec.reference import check_reference, read_reference, rows_for_overrides, same_value
from ablate.spec.report_options import check_baseline, read_report
from ablate.spec.space import read_search
from ablate.spec.types import SETTINGS, Cell, SearchSpec, Spec, configurations
from ablate.spec.yaml_source import expand_env, has_surrogate

#: the most cells (configurations x seeds) a grid may have unless the caller raises the cap
MAX_CELLS = 100_000
#: the longest spec or experiment name (it names folders too)
MAX_NAME = 200
#: settings whose ${VAR} may be unset when planning (where the data is on this machine)
DATA_PATHS = (("data", "root"), ("data", "cache_dir"))


@dataclass(frozen=True)
class SpecArgs:
    """What a command line says about a spec besides its path (``--set``, ``--name``,
    ``--max-cells``): picklable, so that worker processes load the very same spec."""
    overrides: tuple[str, ...] = ()
    name: Optional[str] = None
    max_cells: int = MAX_CELLS

    def load(self, path: str | Path, *, check_paths: bool = True) -> Spec:
        return load_spec(path, overrides=self.overrides, name=self.name, check_paths=check_paths,
                         max_cells=self.max_cells)

    def command(self, verb: str, spec_path: str | Path, *options: str) -> str:
        """``ablate VERB SPEC OPTIONS`` with these same ``--set``/``--name``/``--max-cells``, quoted
        for a shell: the command to print where a user should next look at the same runs."""
        words = ["ablate", verb, str(spec_path), *options, *(w for o in self.overrides for w in ("--set", o))]
        words += ["--name", self.name] if self.name else []
        words += ["--max-cells", str(self.max_cells)] if self.max_cells != MAX_CELLS else []
        return shlex.join(words)


def load_spec(path: str | Path, *, overrides: Sequence[str] = (), name: Optional[str] = None,
              check_paths: bool = True, max_cells: int = MAX_CELLS) -> Spec:
    """Read, merge (``extends``), expand (``${VAR}``), override (``--set``) and validate a spec file.

    Raises :class:`SpecError` listing every problem found, each ``file:line: field: problem``
    (or ``--set KEY=VALUE: problem`` for an override). ``name`` replaces the experiment name
    (``--name``). ``check_paths=False`` plans without the data: a dataset root that is missing,
    or whose ``${VAR}`` is unset, is reported in ``Spec.data_problems`` instead of refused.
    ``max_cells`` caps the number of cells of a grid, counted before any is built.
    """
    return SpecBuilder(Path(path), check_paths=check_paths, overrides=tuple(overrides), name=name,
                       max_cells=max_cells).build()


def name_problem(name: Any, given: bool = True, example: str = "name: my-ablation") -> Optional[str]:
    """Why ``name`` cannot name an experiment, or ``None``: one ``problem (allowed: ...)``, whose
    ``example`` is written as the spec (``name: my-ablation``) or the option (``--name my-ablation``)
    gives it. Any printable text of up to :data:`MAX_NAME` characters with a letter or digit will
    do: the folders named after it use its :attr:`~ablate.spec.Spec.slug`, which stays inside them
    whatever the name."""
    if not isinstance(name, str) or not name.strip():
        got = format_value(name) if given else "nothing"
        return f"expected a non-empty string (the MLflow experiment name), got {got} (allowed: e.g. {example})"
    if len(name) > MAX_NAME:
        return f"{len(name)} characters (allowed: at most {MAX_NAME})"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"contains control characters (allowed: printable text, e.g. {example})"
    if has_surrogate(name):
        return f"holds a lone surrogate (bytes that are not UTF-8 text) (allowed: valid Unicode text, e.g. {example})"
    if not re.search(r"[A-Za-z0-9]", name):
        return f"{name!r} has no letter or digit (allowed: e.g. {example})"
    return None


class SpecBuilder:
    """Reads, merges, overrides and checks one spec; every check adds to ``problems`` and goes on."""

    def __init__(self, path: Path, *, check_paths: bool = True, overrides: tuple[str, ...] = (),
                 name: Optional[str] = None, max_cells: int = MAX_CELLS):
        self.path = path
        self.shown = str(path)
        self.check_paths = check_paths
        self.override_items = overrides
        self.name_option = name
        self.max_cells = max_cells
        self.problems = Problems(self.shown)
        self.files = SpecFiles(self.problems)
        self.origins = self.files.origins       # path in the merged spec -> where it was written
        self.zip_paths: dict[str, tuple] = {}   # zip key -> its path in the spec, for line numbers
        self.bad_keys: set[str] = set()         # settings whose grid/zip/search entry is invalid
        self.invalid_values: dict[str, list[tuple[Any, Where]]] = {}  # setting -> (value, where) of a listed value invalid on its own
        self.valid_values: dict[str, list] = {}  # setting -> the listed values valid on their own
        self.inherited: set[tuple] = set()      # zip paths of values a section axis takes from the base
        self.fixed: dict[str, Override] = {}    # settings fixed by --set
        self.spec_values: dict[str, Any] = {}   # what the spec itself said for each of them (or the default)
        self.varied_by_spec: set[str] = set()   # of them, those the spec's grid, zip or search varied
        self.unset_data: list[tuple[tuple, str]] = []   # (path, variable) of an unset ${VAR} in a data path
        self.ambiguous = False                  # a ${VAR} gave an integer with a leading zero
        self.data_problems: list[str] = []

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

    # -- the whole spec --

    def build(self) -> Spec:
        problem = spec_file_problem(self.path)
        if problem:
            raise SpecError([f"{self.shown}: {problem}"])
        overrides = parse_overrides(self.override_items, self.problems)
        raw = self.files.read(self.path, self.shown)
        if self.files.unreadable:  # a file that could not be parsed or extended: the rest would mislead
            self.problems.raise_if_any()
        raw = expand_env(raw, (), self._unset_variable, self._ambiguous_variable)
        if self.ambiguous:  # as for an ambiguous number written in the file: the values would mislead
            self.problems.raise_if_any()
        self._apply(overrides, raw)

        for key in raw:
            if key not in SPEC_KEYS:
                self.add((key,), f"unknown key{did_you_mean(key, SPEC_KEYS)} (allowed: {', '.join(SPEC_KEYS)})")
        spec_name = raw.get("name")
        spec_name = str(spec_name) if isinstance(spec_name, str) else spec_name  # not a Substituted ${VAR}
        problem = name_problem(spec_name, given="name" in raw)
        if problem:
            self.add(("name",), problem, "name")
        if self.name_option is not None and name_problem(self.name_option, example="--name my-ablation"):
            self.problems.add(option_where("--name"), None, name_problem(self.name_option,
                                                                         example="--name my-ablation"))
        description = raw.get("description") or ""
        if not isinstance(description, str):
            self.add(("description",), "expected a string (allowed: one line of text)")
            description = ""
        description = str(description)

        for key in DESIGN_KEYS:
            if key in raw and raw[key] is None:
                self.add((key,), "is empty (allowed: leave the key out, or give it a value; see docs/specs.md)")
        base = self._sections(raw)
        seeds = self._seeds(raw.get("seeds", [0]))
        raw = self._section_axes(raw, base)
        grid = self._grid(raw.get("grid"))
        zips = self._zips(raw.get("zip"))
        search = self._search(raw.get("search"), base) if raw.get("search") is not None else None
        if search is not None and (grid or zips):
            self.add(("search",), "a spec has either a grid (with zip) or a search, not both "
                     "(allowed: remove grid/zip, or search)")
        varied = self._varied(grid, zips, search)
        self._varied_keys = set(varied)
        fits = search is not None or self._count_fits(grid, zips, seeds)
        if fits:
            self._check_values(base, grid, zips)
        exclude = self._exclude(raw.get("exclude"), varied)
        reference = read_reference(raw.get("reference"), self)
        reference = rows_for_overrides(reference, {k: o.value for k, o in self.fixed.items()})
        baseline = self._baseline(raw.get("report"), varied, grid, zips, search)

        cells = []
        base_config = self._base_config(base, set(varied) | self.bad_keys)
        if not self.problems and search is None and fits:
            combos = self._combinations(grid, zips, exclude)
            cells = self._cells(base, combos, seeds, varied)
        if not self.problems and search is None:
            self._check_unique(cells)
            check_reference(reference, cells, self)
            check_baseline(baseline, [c.values for c in cells], self)
        if not self.problems:
            self._check_timm(cells, base_config)
        if not self.problems:
            self._check_data(search, cells, base_config)
        self.problems.raise_if_any()

        if len(seeds) > 1:
            varied = varied + [names.SEED]
            cells = [Cell(c.shared, c.key, {**c.values, names.SEED: c.seed}, c.seed) for c in cells]
        given = {o.key: o.value for o in overrides}
        name = self.name_option or spec_name + experiment_suffix(self._effective(overrides, base_config, seeds))
        return Spec(name=name, description=description, path=self.path, base=base_config, seeds=seeds,
                    grid=grid, zip=zips, exclude=exclude, search=search, reference=reference,
                    varied=varied, _cells=cells, spec_name=spec_name, overrides=given,
                    data_problems=self.data_problems, baseline=baseline)

    # -- environment variables and overrides --

    def _unset_variable(self, path: tuple, variable: str) -> None:
        if path in DATA_PATHS:  # where the data is: refused by `run` (check_data), only noted by `plan`
            self.unset_data.append((path, variable))
            return
        self.add(path, f"environment variable {variable} is not set (allowed: set it, or write "
                 f"${{{variable}:-default}})")

    def _ambiguous_variable(self, path: tuple, problem: str) -> None:
        self.add(path, problem)
        self.ambiguous = True

    def _apply(self, overrides: list[Override], raw: dict) -> None:
        """Write each override into the merged spec, as if the spec said so, located at its option."""
        for o in overrides:
            if o.key == "seeds":
                self.spec_values["seeds"] = raw.get("seeds", [0])
                raw["seeds"] = o.value
                self.files.forget("seeds")
                self.origins[("seeds",)] = o.where
                continue
            section, name = o.key.split(".", 1)
            if raw.get(section) is None:
                raw[section] = {}
            default = SECTIONS[section].model_fields[name].get_default(call_default_factory=True)
            written = raw[section] if isinstance(raw[section], dict) else {}
            self.spec_values[o.key] = written.get(name, default)
            if isinstance(raw[section], dict):
                raw[section] = {**raw[section], name: o.value}
                self.files.forget(section, name)
                self.origins[(section, name)] = o.where
                self.unset_data = [(p, v) for p, v in self.unset_data if p != (section, name)]
            self.fixed[o.key] = o

    def _effective(self, overrides: list[Override], config: CellConfig, seeds: list[int]) -> dict[str, Any]:
        """The overrides that change what the spec trains, with their resolved values: a setting
        the spec varied, or whose value differs from the spec's (or its default); the seeds. A
        machine-local setting (``ablate.config.MACHINE_LOCAL``: where the data is, how a batch is
        split) never does: it is not part of a cell's key, so its runs are the spec's own."""
        flat = flat_params(config)
        out: dict[str, Any] = {}
        for o in overrides:
            if o.key in MACHINE_LOCAL:
                continue
            if o.key == "seeds":
                if self.spec_values["seeds"] != seeds:
                    out["seeds"] = seeds
            elif o.key in self.varied_by_spec or not same_value(self.spec_values[o.key], flat[o.key]):
                out[o.key] = flat[o.key]
        return out

    # -- sections --

    def _sections(self, raw: dict) -> dict[str, dict]:
        base = {}
        for section in SECTIONS:
            value = raw.get(section)
            if value is None:
                base[section] = {}
            elif not isinstance(value, dict):
                self.add((section,), f"expected a mapping of settings, got {format_value(value)} "
                         f"(allowed: {', '.join(SECTIONS[section].model_fields)})")
                base[section] = {}
            else:
                base[section] = value
        self._check_model_kind("model", base["model"], ("model",))
        if "seed" in base["train"]:
            self.add(("train", "seed"), "set seeds with the top-level `seeds:` list (allowed: seeds: [0, 1, 2])")
        return base

    def _base_config(self, base: dict, varied: set[str]) -> CellConfig:
        """The base alone. A value invalid on its own is refused at its line even where the grid
        or search replaces it in every cell (a typo there is still a typo, and would come back
        with the first spec that extends this one); a combination of settings (image size and
        patch size) that involves a varied setting is left to the cells, which hold other values."""
        config, errors = validate_cell(base, {})
        for dotted, involved, message in errors:
            if len(involved) == 1 or not varied.intersection(involved):
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

    def setting_key(self, key: Any, path: tuple) -> bool:
        """Whether a grid/zip/search/exclude key names a setting; adds the problem if not."""
        if key in SETTINGS:
            if key == names.SEED:
                self.add(path, "vary seeds with the top-level `seeds:` list (allowed: seeds: [0, 1, 2])")
                return False
            return True
        self.add(path, f"names no setting{setting_hint(key, SETTINGS)} (allowed: a dotted setting such as model.width; "
                 "see `ablate spec-help`)")
        return False

    # -- seeds, grid, zip, exclude --

    def _seeds(self, seeds: Any) -> list[int]:
        ok = (isinstance(seeds, list) and seeds
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds))
        if not ok:
            self.add(("seeds",), f"expected a non-empty list of integers >= 0, got {format_value(seeds)} "
                     "(allowed: e.g. seeds: [0, 1, 2])", "seeds")
            return [0]
        if max(seeds) > MAX_SEED:
            self.add(("seeds",), f"seed {max(seeds)} is too large (allowed: integers from 0 to {MAX_SEED})", "seeds")
            return [0]
        if len(set(seeds)) != len(seeds):
            self.add(("seeds",), f"repeated seed in {format_value(seeds)} (allowed: distinct seeds)", "seeds")
        return list(dict.fromkeys(seeds))

    def values_list(self, value: Any, path: tuple) -> bool:
        if not isinstance(value, list):
            self.add(path, f"expected a list of values, got {format_value(value)} (allowed: e.g. [a, b])")
            return False
        if not value:
            self.add(path, "empty list (allowed: at least one value)")
            return False
        return True

    def _section_axes(self, raw: dict, base: dict) -> dict:
        """``grid: {model: [{timm: mixer_b16_224}, {width: 384, depth: 36}]}``: a grid axis named by a
        section, whose values are mappings of its settings applied together. Each becomes one zip
        group of dotted settings; a setting an entry leaves out keeps the base's value there."""
        grid = raw.get("grid")
        if not isinstance(grid, dict) or not any(k in SECTIONS for k in grid):
            return raw
        zips = raw.get("zip")
        if isinstance(zips, dict):  # one group becomes the first of a list: its lines move with it
            for p, where in [(p, w) for p, w in self.origins.items() if p[:1] == ("zip",) and len(p) > 1]:
                self.origins[("zip", 0) + p[1:]] = where
            zips = [zips]
        elif zips is None:
            zips = []
        groups = []
        for section in [k for k in grid if k in SECTIONS]:
            entries, path = grid[section], ("grid", section)
            if not self.values_list(entries, path):
                continue
            if not all(isinstance(e, dict) and e for e in entries):
                self.add(path, f"expected a list of mappings of {section} settings (allowed: e.g. {section}: "
                         "[{timm: mixer_b16_224}, {token_mixing: shift}])")
                continue
            names_ = list(dict.fromkeys(n for e in entries for n in e))
            good = all(self.setting_key(f"{section}.{n}", path + (i, n))
                       for i, e in enumerate(entries) for n in e)
            if not good:
                continue
            for i, entry in enumerate(entries):
                self._check_model_kind(section, entry, path + (i,))
            fields = SECTIONS[section].model_fields
            inherited = {n: base[section].get(n, fields[n].get_default(call_default_factory=True)) for n in names_}
            group = {f"{section}.{n}": [e.get(n, inherited[n]) for e in entries] for n in names_}
            index = (len(zips) if isinstance(zips, list) else 0) + len(groups)
            for n in names_:
                for i in range(len(entries)):
                    self.origins[("zip", index, f"{section}.{n}", i)] = self.where(*path, i, n) \
                        if n in entries[i] else self.where(*path, i)
                    if n not in entries[i]:
                        self.inherited.add(("zip", index, f"{section}.{n}", i))
                self.origins[("zip", index, f"{section}.{n}")] = self.where(*path)
            self.origins.setdefault(("zip", index), self.where(*path))
            groups.append(group)
        rest = {k: v for k, v in grid.items() if k not in SECTIONS}
        out = {**raw, "zip": (zips + groups) if isinstance(zips, list) else zips}
        if rest:
            out["grid"] = rest
        else:
            out.pop("grid")
            self.origins.setdefault(("grid",), self.where("grid"))
        return out

    def _check_model_kind(self, section: str, written: Any, path: tuple) -> None:
        """A mapping that chooses a timm model may not also set S²-MLP's own settings (nor one that
        chooses S²-MLP timm's arguments): they would be dropped without a word."""
        if section != "model" or not isinstance(written, dict):
            return
        if written.get("timm") is not None:
            for n in (n for n in written if n in S2MLP_ONLY):
                self.add(path + (n,), f"applies to S²-MLP, not to the timm model {written['timm']} (allowed: "
                         "model.timm_args for the timm model's own arguments)", f"model.{n}")
        elif "timm" in written and "timm_args" in written and written["timm_args"]:
            self.add(path + ("timm_args",), "applies to a timm model only, and this mapping sets timm: null "
                     "(allowed: a model.timm name beside it)", "model.timm_args")

    def _grid(self, grid: Any) -> dict[str, list]:
        if grid is None:
            return {}
        if not isinstance(grid, dict) or not grid:
            self.add(("grid",), f"expected a mapping of dotted settings to lists, got {format_value(grid)} "
                     "(allowed: e.g. grid: {model.shift: [none, four]})")
            return {}
        out = {}
        for key, values in grid.items():
            if self.setting_key(key, ("grid", key)):
                if key in self.fixed:  # --set replaces this axis by its one value
                    self.varied_by_spec.add(key)
                elif self.values_list(values, ("grid", key)):
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
            self.varied_by_spec.update(k for k in group if k in self.fixed)
            group = {k: v for k, v in group.items() if k not in self.fixed}
            if not group:
                continue  # every setting of the group is fixed by --set
            good = {k: v for k, v in group.items()
                    if self.setting_key(k, path + (k,)) and self.values_list(v, path + (k,))}
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

    def _check_values(self, base: dict, grid: dict, zips: list[dict]) -> None:
        """Every value the grid and zip list, on its own, at its own line: before anything that
        refers to the values (``exclude``, ``reference`` rows, ``report.baseline``) is read, so that
        a typo is reported where it was written rather than where something names its correct
        spelling, and whatever the other settings of its cells are. A value a section axis takes
        from the base is the base's, refused at the base's line."""
        lists = [(k, v, ("grid", k)) for k, v in grid.items()]
        lists += [(k, v, self.zip_paths[k]) for group in zips for k, v in group.items()]
        for key, values, path in lists:
            for i, value in enumerate(values):
                if path + (i,) in self.inherited:
                    continue
                _, errors = validate_cell(base, {key: value})
                messages = [message for _, involved, message in errors if involved == (key,)]
                for message in messages:
                    self.add(path + (i,), f"cell {format_values({key: value})}: {message}", ".".join(map(str, path)))
                self.listed(key, value, path + (i,), valid=not messages)

    def listed(self, key: str, value: Any, path: tuple, valid: bool) -> None:
        """Note a value that the grid, a zip group or a search choice lists for ``key``, and
        whether it is valid on its own, for what refers to it (:meth:`invalid_reference`)."""
        if valid:
            self.valid_values.setdefault(key, []).append(value)
        else:
            self.invalid_values.setdefault(key, []).append((value, self.where(*path)))

    def invalid_reference(self, path: tuple, key: str, value: Any) -> Optional[str]:
        """``eigth is not a valid model.shift, see line 7`` where something written at ``path``
        (an ``exclude`` rule, a ``reference`` row, ``report.baseline``) names a value listed for
        ``key`` that is itself invalid, else ``None``: the line named says why."""
        for bad, where in self.invalid_values.get(key, ()):
            if same_value(bad, value):
                line = f"line {where[1]}" if where[0] == self.where(*path)[0] or not where[1] else location(where)
                return f"{format_value(value)} is not a valid {key}, see {line}"
        return None

    def valid_listed(self, key: str) -> str:
        """The values listed for ``key`` that are valid, as the ``allowed`` of a reference to another."""
        return ", ".join(format_value(v) for v in self.valid_values.get(key, ())) or "none listed is valid"

    def _search(self, search: Any, base: dict) -> Optional[SearchSpec]:
        if isinstance(search, dict) and isinstance(search.get("space"), dict) and self.fixed:
            space = search["space"]
            self.varied_by_spec.update(k for k in space if k in self.fixed)
            if space and all(k in self.fixed for k in space):
                where = self.fixed[next(iter(space))].where
                self.problems.add(where, None, "fixes every setting the search varies (allowed: --set settings "
                                  "the search space leaves out, or at most all but one of it)")
                return None
            search = {**search, "space": {k: v for k, v in space.items() if k not in self.fixed}}
        return read_search(search, base, self)

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

    def _baseline(self, report: Any, varied: list[str], grid: dict, zips: list[dict],
                  search: Optional[SearchSpec]) -> dict[str, Any]:
        """``report.baseline``, its values checked against what the grid, zip or search varies."""
        choices = dict(grid)
        for group in zips:
            choices.update(group)
        ranges = {}
        for key, param in (search.space if search else {}).items():
            if param.kind == "choice":
                choices[key] = param.choices
            else:
                ranges[key] = (param.low, param.high)
        fixed = {k: o.value for k, o in self.fixed.items()}
        return read_report(report, varied, choices, ranges, fixed, self)

    def _exclude(self, rules: Any, varied: list[str]) -> list[dict[str, Any]]:
        """The rules, with the settings --set fixes taken out: a rule that wants the fixed value
        keeps its other conditions; a rule that wants another value can match no cell and is dropped."""
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
            if any(k in self.fixed and not same_value(self.fixed[k].value, v) for k, v in rule.items()):
                continue
            rule = {k: v for k, v in rule.items() if k not in self.fixed}
            bad = [k for k in rule if k not in varied]
            for k in bad:
                self.add(path + (k,), f"not a varied setting (allowed: {', '.join(varied) or 'grid or zip keys'})",
                         f"exclude[{i}].{k}")
            for k in (k for k in rule if k in varied):
                problem = self.invalid_reference(path + (k,), k, rule[k])
                if problem:
                    self.add(path + (k,), f"{problem} (allowed: {self.valid_listed(k)})", f"exclude[{i}].{k}")
                    bad.append(k)
            if not bad:
                out.append((i, rule))
        self._exclude_index = [i for i, _ in out]
        return [rule for _, rule in out]

    def _count_fits(self, grid: dict, zips: list[dict], seeds: list[int]) -> bool:
        """Whether the grid's cells (before exclude) fit under ``max_cells``: counted, not built."""
        count = math.prod(len(v) for v in grid.values()) * math.prod(len(next(iter(g.values()))) for g in zips)
        count *= len(seeds)
        if count > self.max_cells:
            path = ("grid",) if grid else ("zip",) if zips else ("seeds",)
            self.add(path, f"{count:,} cells (allowed: at most {self.max_cells:,}; raise the cap with "
                     "--max-cells if you mean it)", path[0])
            return False
        return True

    def _combinations(self, grid: dict, zips: list[dict], exclude: list[dict]) -> list[dict[str, Any]]:
        """The varied values of every cell before seeds; each rule of ``exclude`` must drop some."""
        factors = [[{k: v} for v in values] for k, values in grid.items()]
        factors += [[dict(zip(group, row)) for row in zip(*group.values())] for group in zips]
        combos = [dict(kv for part in parts for kv in part.items()) for parts in itertools.product(*factors)]
        kept = []
        used = [False] * len(exclude)
        for combo in combos:
            hits = [i for i, rule in enumerate(exclude) if all(same_value(combo[k], v) for k, v in rule.items())]
            for i in hits:
                used[i] = True
            if not hits:
                kept.append(combo)
        for i, rule in enumerate(exclude):
            if not used[i]:
                self.add(("exclude", self._exclude_index[i]), f"matches no cell: {format_values(rule)} (allowed: "
                         "values the grid or zip lists hold)", f"exclude[{self._exclude_index[i]}]")
        if combos and not kept:
            self.add(("exclude",), "excludes every cell (allowed: rules that leave at least one)")
        return kept

    # -- cells --

    def _cells(self, base: dict, combos: list[dict], seeds: list[int], varied: list[str]) -> list[Cell]:
        resolved = []
        for combo in combos:
            config, errors = validate_cell(base, combo)
            for dotted, involved, message in errors:
                mine = [k for k in involved if k in combo]
                if not mine:
                    continue  # a base problem: reported once, by _base_config
                shown = {k: combo[k] for k in mine}
                path = self._varied_path(mine[0])
                self.add(path, f"cell {format_values(shown)}: {message}", ".".join(map(str, path)))
            resolved.append((combo, config))
        if self.problems:
            return []
        # what a configuration's cells share, worked out once: seeds change only train.seed (a
        # 100,000-cell grid would otherwise dump and hash every setting of every cell twice)
        shared = []
        for _, config in resolved:
            flat, m = flat_params(config), config.model
            shared.append((config, identity(config), {k: flat[k] if applies(k, m.timm, m.token_mixing) else None
                                                      for k in varied}))
        keys = [keys_by_seed(ident, seeds) for _, ident, _ in shared]
        cells = []
        for i, seed in enumerate(seeds):
            for (config, _, values), of_seed in zip(shared, keys):
                values = {k: seed if k == names.SEED else v for k, v in values.items()}
                cells.append(Cell(config, of_seed[i], values, seed))
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
                         f"cells {format_values(other.values) or 'base'} and {format_values(cell.values)} are "
                         f"the same configuration (allowed: distinct values; {local} are machine-local and "
                         "not part of a cell's identity; token_mixing: none is shift: none; a timm model "
                         "ignores S²-MLP's settings)", "grid")
                return
            first[cell.key] = cell

    # -- timm baselines --

    def _check_timm(self, cells: list[Cell], base: CellConfig) -> None:
        """Build each distinct timm model once (on the meta device): an unknown name or argument is
        a spec error, not a failed cell. ``model.timm_args`` with no timm cell is one too."""
        configs = configurations(cells, base)
        if not any(c.model.timm for c in configs):
            if ("model", "timm_args") in self.origins:
                self.add(("model", "timm_args"), "applies to a timm model only, and no cell has one (allowed: "
                         "set model.timm too, or leave timm_args out)", "model.timm_args")
            return
        seen = set()
        for config in configs:
            m = config.model
            if m.timm is None:
                continue
            what = json.dumps([m.timm, m.timm_args, m.image_size, m.in_chans, m.drop_path, config.num_classes > 0],
                              sort_keys=True)
            if what in seen:
                continue
            seen.add(what)
            if timm_baselines.cached(m, config.num_classes) is not None:
                continue  # built and counted before
            problem = timm_baselines.problem(m, config.num_classes)
            if problem:
                key = "model.timm_args" if "timm cannot build" in problem or "fixes" in problem else "model.timm"
                path = self._varied_path(key) if key in self._varied_keys else (tuple(key.split(".")))
                self.add(path, problem, key)

    # -- data --

    def _check_data(self, search: Optional[SearchSpec], cells: list[Cell], base: CellConfig) -> None:
        """Dataset roots: a dataset that needs one must name it (always); the folder must exist
        and its ${VAR} be set to train (``check_paths``), else planning notes why it is not ready."""
        not_ready: list[tuple[Where, str, str]] = []
        unset = dict(self.unset_data)
        for path, variable in self.unset_data:
            not_ready.append((self.where(*path), ".".join(path), f"environment variable {variable} is not set "
                              f"(allowed: set it, or write ${{{variable}:-default}})"))
        seen = set()
        for config in configurations(cells, base):
            data = config.data
            if not data.needs_root or (data.name, data.root) in seen:
                continue
            seen.add((data.name, data.root))
            where = self.where("data", "root") if ("data", "root") in self.origins else self.where("data", "name")
            if not data.root:
                self.problems.add(where, "data.root", f"{data.name} needs a dataset root (allowed: a folder with "
                                  "train/ and val/, e.g. root: ${IMAGENET100_ROOT})")
            elif ("data", "root") in unset:
                continue
            elif not Path(data.root).is_dir():
                not_ready.append((where, "data.root", f"no such directory {data.root} (allowed: an existing folder "
                                  "with train/ and val/; relative paths start at the working directory)"))
            elif data.name == "imagefolder" and not (Path(data.root) / "train").is_dir():
                not_ready.append((where, "data.root", f"{data.root} has no train/ folder (allowed: "
                                  "root/train/<class>/<image> and root/val/<class>/<image>)"))
        not_ready += self._cache_not_ready(cells, base, unset)
        for where, field_name, problem in not_ready:
            if self.check_paths:
                self.problems.add(where, field_name, problem)
            else:
                self.data_problems.append(f"{location(where)}: {field_name}: {problem}")

    def _cache_not_ready(self, cells: list[Cell], base: CellConfig, unset: dict) -> list[tuple[Where, str, str]]:
        """``data.loader: cache`` without a current cache for a configuration's image size: found
        here, with the data that is not in place, rather than when its first cell starts."""
        out, seen = [], set()
        for config in configurations(cells, base):
            data = config.data
            key = (data.root, data.cache_dir, data.cache_size, config.model.image_size)
            if data.loader != "cache" or not data.needs_root or ("data", "root") in unset or key in seen:
                continue
            seen.add(key)
            problem = cache_problem(data, config.model.image_size)
            if problem:
                field = ("data", "loader") if ("data", "loader") in self.origins else ("data", "root")
                out.append((self.where(*field), "data.loader", problem))
        return out

