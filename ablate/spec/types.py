"""The objects a loaded spec is made of: :class:`Spec`, its :class:`Cell` s and its search."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ablate import names
from ablate.config import MACHINE_LOCAL, SECTIONS, CellConfig
from ablate.errors import AblateError
from ablate.spec.problems import format_value, format_values, section_dicts, setting_hint, validate_cell

#: every dotted setting a grid, zip, search, exclude or ``--set`` can name
SETTINGS = tuple(f"{section}.{name}" for section, model in SECTIONS.items() for name in model.model_fields)


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
class ReferenceRow:
    """One row of a paper's table: the settings (``when``, dotted -> value) of the configuration
    it describes and the paper's numbers for it; a number or unit the spec leaves out is None."""
    when: dict[str, Any]
    top1: Optional[float] = None
    top5: Optional[float] = None
    params_m: Optional[float] = None
    gmacs: Optional[float] = None
    params_unit: Optional[str] = None  # M (10^6, the default) or Mi (2^20)
    macs_unit: Optional[str] = None    # G (10^9, the default) or Gi (2^30)
    note: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The row as a spec writes it: the keys it gives."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Reference:
    """A paper table's numbers (``reference``): where they come from and one row per configuration."""
    source: str
    rows: tuple[ReferenceRow, ...]


@dataclass(frozen=True)
class Cell:
    """One fully resolved training configuration of a spec, with its stable key."""
    shared: CellConfig          # the configuration, as its seeds share it (any train.seed)
    key: str                    # ablate.config.cell_key(config)
    values: dict[str, Any]      # the spec's varied dotted keys -> this cell's value
    seed: int

    @cached_property
    def config(self) -> CellConfig:
        """The cell's own configuration, ``shared`` with this cell's seed: made when first asked
        (a 100,000-cell grid read by ``ablate status`` needs only keys and values)."""
        if self.shared.train.seed == self.seed:
            return self.shared
        return self.shared.model_copy(update={"train": self.shared.train.model_copy(update={"seed": self.seed})})


def configurations(cells: list[Cell], base: CellConfig) -> list[CellConfig]:
    """The distinct configurations of ``cells`` (``Cell.shared``; ``[base]`` where there are none)."""
    return list({id(c.shared): c.shared for c in cells}.values()) or [base]


@dataclass
class Spec:
    """A validated experiment spec. Build it with :func:`~ablate.spec.load_spec`.

    ``name`` is the MLflow experiment (and ledger study) this spec records into: the spec's own
    ``name``, with ``+<hash>`` appended when command-line overrides change it, or what ``--name``
    says. ``overrides`` are those ``--set`` values, dotted setting (or ``seeds``) -> value.
    ``data_problems`` say why the dataset is not ready (loaded with ``check_paths=False``).
    ``baseline`` is ``report.baseline``: the varied values of the configuration a report compares
    the others with (``{}``: the first configuration).
    """
    name: str
    description: str
    path: Path
    base: CellConfig
    seeds: list[int]
    grid: dict[str, list]
    zip: list[dict[str, list]]
    exclude: list[dict[str, Any]]
    search: Optional[SearchSpec]
    reference: Optional[Reference]
    varied: list[str]
    _cells: list[Cell] = field(default_factory=list, repr=False)
    spec_name: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    data_problems: list[str] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """``name`` as one safe path component: the folder of its checkpoints and reports."""
        return path_slug(self.name)

    @property
    def kind(self) -> str:
        """``search`` for a search spec, else ``grid`` (a spec without a grid is a grid of one cell)."""
        return names.SEARCH if self.search is not None else names.GRID

    def cells(self) -> list[Cell]:
        """Every cell in run order: seeds outermost, then the grid keys and zip groups as written.

        A search has no cells before it samples them (:meth:`resolve`); this returns ``[]`` there.
        """
        return list(self._cells)

    def configurations(self) -> list[CellConfig]:
        """The grid's distinct configurations as their seeds share them (``base`` for a search):
        what a check of the models, the batches or the data needs once per configuration."""
        return configurations(self._cells, self.base)

    @property
    def machine_local(self) -> dict[str, Any]:
        """The ``overrides`` of machine-local settings (``ablate.config.MACHINE_LOCAL``: where the
        data is, how a step's batch is split): they change no cell key and no experiment name."""
        return {k: v for k, v in self.overrides.items() if k in MACHINE_LOCAL}

    @property
    def identity_overrides(self) -> dict[str, Any]:
        """The ``overrides`` that change what is trained (all but the :attr:`machine_local` ones)."""
        return {k: v for k, v in self.overrides.items() if k not in MACHINE_LOCAL}

    def origin(self) -> str:
        """Where the experiment name comes from, when it is not the spec's own:
        ``spec quickstart, --set train.epochs=1 --set model.width=32``; for machine-local
        overrides alone, that they record into the spec's own experiment; else ``""``."""
        if self.name == self.spec_name and not self.overrides:
            return ""
        local = self.machine_local
        local_sets = " ".join(f"--set {k}={format_value(v)}" for k, v in local.items())
        if self.name == self.spec_name and len(local) == len(self.overrides):
            return (f"{local_sets} {'is' if len(local) == 1 else 'are'} machine-local: recorded into the spec's "
                    f"own experiment {self.spec_name}")
        sets = " ".join(f"--set {k}={format_value(v)}" for k, v in self.overrides.items() if k not in local)
        note = f"; machine-local: {local_sets}" if local else ""
        return f"spec {self.spec_name}" + (f", {sets}" if sets else "") + note

    def resolve(self, values: dict[str, Any]) -> CellConfig:
        """The base configuration with dotted ``values`` applied and validated.

        Raises :class:`AblateError` naming the values and the problem when the combination is
        invalid (e.g. a sampled width not divisible by the shift's channel groups).
        """
        unknown = [k for k in values if k not in SETTINGS]
        if unknown:
            raise AblateError(f"{self.path}: {unknown[0]}: not a setting{setting_hint(unknown[0], SETTINGS)} "
                              "(allowed: data.*, model.*, train.* settings; see `ablate spec-help`)")
        config, errors = validate_cell(section_dicts(self.base), values)
        if errors:
            what = format_values(values) or "base"
            raise AblateError(f"{self.path}: {what}: " + "; ".join(f"{f}: {msg}" for f, _, msg in errors))
        return config


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
#: how every hashed slug ends; a name that ends so is hashed too, so it cannot be another name's slug
_HASHED = re.compile(r".*-[0-9a-f]{8}")


def path_slug(name: str) -> str:
    """``name`` as one path component that stays inside the folder it is joined to.

    A name of letters, digits, ``.``, ``_``, ``+`` and ``-`` (not starting with ``.`` or ``-``)
    is its own slug, unless it ends in ``-`` and 8 hex digits. Any other name is reduced to
    those characters and given ``-`` and 8 hex digits of its hash (``../../x`` -> ``x-9cdf6a50``,
    ``a-b-c14cddc0`` -> ``a-b-c14cddc0-ed4701d6``). A slug that is a name cannot end like a
    hashed one, so two names never share a folder (short of two hashes of the same
    characters agreeing in 32 bits).
    """
    if _SAFE.fullmatch(name) and len(name) <= 200 and not _HASHED.fullmatch(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip(".-")[:150] or "unnamed"
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
