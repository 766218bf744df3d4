"""The Optuna side of ``ablate search``: samplers, pruners, and the spec's space as ``suggest_*`` calls.

A trial trains exactly like a grid cell (:func:`ablate.execute.execute`); only where its
configuration comes from differs.
"""
from __future__ import annotations

import json
from typing import Any

import optuna


def make_sampler(search, seed: int = 0) -> optuna.samplers.BaseSampler:
    name = search.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "cmaes":
        # CMA-ES handles the numeric parameters; categorical ones fall back to random sampling
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "grid":
        return AskTellGridSampler(grid_space(search.space), seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask and tell: Optuna's calls ``Study.stop`` once the grid is used up,
    which raises outside ``Study.optimize`` and so would fail the tell of the last trial. Our
    workers stop by counting the study's trials instead."""

    def after_trial(self, study, trial, state, values) -> None:
        pass  # GridSampler.after_trial does nothing but the stop


def make_pruner(search, epochs: int) -> optuna.pruners.BasePruner:
    """The spec's pruner. A trial reports epochs 1 to ``epochs - 1`` only (see
    :func:`ablate.execute.execute`): one that reaches its last epoch has its result and always ends
    COMPLETE with it.

    Hyperband's ``max_resource`` stays ``epochs``: it is the resource a trial that survives every
    rung trains to, a finish line rather than a rung. Its brackets' rungs at ``epochs`` or beyond
    are never reached, so the bracket whose first rung is ``epochs`` (where ``epochs`` is a power of
    the reduction factor) trains its trials unpruned, as Hyperband's most patient bracket does.
    ``epochs - 1`` would drop that bracket there and put every trial under pruning; Optuna's ``"auto"``
    would infer ``epochs`` too (the largest step reported plus one), but only once a trial ended.
    """
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def grid_space(space: dict) -> dict[str, list[Any]]:
    """Every value of every parameter, for GridSampler (floats: the two bounds)."""
    out = {}
    for key, p in space.items():
        if p.kind == "choice":
            out[key] = [json.dumps(c) if isinstance(c, list) else c for c in p.choices]
        elif p.kind == "int":
            out[key] = list(range(p.low, p.high + 1, p.step or 1))
        else:
            out[key] = [p.low, p.high]
    return out


def suggest(trial: optuna.Trial, space: dict) -> dict[str, Any]:
    """Sample every parameter of the spec's space; parameter names are the dotted setting keys."""
    values = {}
    for key, p in space.items():
        if p.kind == "choice":
            # Optuna's categorical values are scalars: explicit offset lists travel as JSON text
            labels = [json.dumps(c) if isinstance(c, list) else c for c in p.choices]
            values[key] = p.choices[labels.index(trial.suggest_categorical(key, labels))]
        elif p.kind == "int":
            values[key] = trial.suggest_int(key, p.low, p.high, step=p.step or 1, log=bool(p.log))
        else:
            values[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=bool(p.log))
    return values
