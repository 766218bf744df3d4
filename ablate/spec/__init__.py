"""Experiment specs: a YAML file -> a validated :class:`Spec` -> fully resolved :class:`Cell` s.

A spec names the settings of one S²-MLP configuration (``data``, ``model``, ``train``; the
schema of :mod:`ablate.config`) and what to vary: a ``grid`` (cartesian product over dotted
keys), ``zip`` groups (lists varied together), ``exclude`` rules and ``seeds``; or an Optuna
``search``. ``reference`` rows carry a paper table's numbers for the cells that reproduce it.
Command-line overrides (``--set KEY=VALUE``) are read and checked like the spec itself. The
format is documented in ``docs/specs.md``.

Everything a user can get wrong is found here, before anything runs, and reported all at once
as ``file:line: field: problem (allowed: ...)`` in a :class:`~ablate.errors.SpecError`.
Loading reads nothing but the spec files (and checks that dataset roots exist), imports no
user-named code, constructs no Python objects from YAML tags, and imports neither torch nor timm.

The parts, one seam each: :mod:`.yaml_source` (safe, bounded YAML with line numbers; ``${VAR}``),
:mod:`.files` (``extends``), :mod:`.problems` (messages; pydantic errors), :mod:`.overrides`
(``--set``), :mod:`.space` (searches), :mod:`.reference` (paper rows), :mod:`.builder` (the grid
and its cells), :mod:`.help` (``ablate spec-help``).
"""
from ablate.spec.builder import MAX_CELLS, SpecArgs, load_spec, name_problem
from ablate.spec.files import DESIGN_KEYS, SPEC_KEYS
from ablate.spec.help import SettingHelp, format_settings_help, settings_help
from ablate.spec.reference import matching_row, same_value
from ablate.spec.space import OBJECTIVE_METRICS, PRUNERS, SAMPLERS
from ablate.spec.types import SETTINGS, Cell, Objective, Param, SearchSpec, Spec, path_slug

__all__ = ["Cell", "DESIGN_KEYS", "MAX_CELLS", "OBJECTIVE_METRICS", "Objective", "PRUNERS", "Param", "SAMPLERS",
           "SETTINGS", "SPEC_KEYS", "SearchSpec", "SettingHelp", "Spec", "SpecArgs", "format_settings_help",
           "load_spec", "matching_row", "name_problem", "path_slug", "same_value", "settings_help"]
