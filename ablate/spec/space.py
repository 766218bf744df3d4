"""An Optuna search in a spec: sampler, objectives, trials, pruner and the space of settings.

``search: {sampler, objectives, trials, pruner, space: {dotted: {int|float|choice: ...}}}``;
each bound and choice must be a valid value of its setting on its own (combinations are
checked per trial by :meth:`~ablate.spec.Spec.resolve`).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from ablate.spec.problems import Checker, did_you_mean, format_value, validate_cell
from ablate.spec.types import Objective, Param, SearchSpec

SAMPLERS = ("tpe", "random", "nsga2", "cmaes", "grid")
PRUNERS = ("none", "median", "hyperband")
#: objective metric -> the direction used when a spec does not say
OBJECTIVE_METRICS = {
    "val_top1": "maximize", "val_top5": "maximize", "val_loss": "minimize", "macs": "minimize",
    "flops": "minimize", "params": "minimize", "params_paper": "minimize",
    "train_seconds": "minimize", "images_per_second": "maximize",
    "latency:cpu": "minimize", "latency:cuda": "minimize"}  # measured per trial before it trains (ablate/latency.py)
DIRECTIONS = ("maximize", "minimize")
SHORT_DIRECTIONS = {"max": "maximize", "min": "minimize"}
SEARCH_KEYS = ("sampler", "objectives", "trials", "pruner", "space")
PARAM_KINDS = ("int", "float", "choice")
PARAM_OPTIONS = ("step", "log")


def read_search(search: Any, base: dict, check: Checker) -> Optional[SearchSpec]:
    path = ("search",)
    if not isinstance(search, dict):
        check.add(path, f"expected a mapping with {', '.join(SEARCH_KEYS)} (allowed: see docs/specs.md)")
        return None
    for key in search:
        if key not in SEARCH_KEYS:
            check.add(path + (key,), f"unknown key{did_you_mean(key, SEARCH_KEYS)} "
                      f"(allowed: {', '.join(SEARCH_KEYS)})")
    sampler = search.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        check.add(path + ("sampler",), f"unknown sampler {format_value(sampler)}{did_you_mean(sampler, SAMPLERS)} "
                  f"(allowed: {', '.join(SAMPLERS)})")
    pruner = search.get("pruner", "none")
    if pruner is None or pruner is False:
        pruner = "none"
    if pruner not in PRUNERS:
        check.add(path + ("pruner",), f"unknown pruner {format_value(pruner)}{did_you_mean(pruner, PRUNERS)} "
                  f"(allowed: {', '.join(PRUNERS)})")
    trials = search.get("trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        check.add(path + ("trials",), f"expected an integer > 0, got "
                  f"{format_value(trials) if 'trials' in search else 'nothing'} (allowed: e.g. trials: 40)",
                  "search.trials")
        trials = 1
    objectives = _objectives(search.get("objectives"), check)
    if len(objectives) > 1 and pruner != "none":
        check.add(path + ("pruner",), f"pruner {pruner} with {len(objectives)} objectives: Optuna cannot prune "
                  "multi-objective studies (allowed: pruner: none, or a single objective)", "search.pruner")
    if len(objectives) > 1 and sampler == "cmaes":
        check.add(path + ("sampler",), "cmaes optimizes a single objective (allowed: nsga2, tpe, random or "
                  "grid for several objectives)", "search.sampler")
    space = _space(search.get("space"), base, check)
    return SearchSpec(sampler=sampler, objectives=objectives, trials=trials, pruner=pruner, space=space)


def _objectives(objectives: Any, check: Checker) -> list[Objective]:
    path = ("search", "objectives")
    if not isinstance(objectives, list) or not objectives:
        check.add(path, "expected a non-empty list of {metric, direction} (allowed: e.g. "
                  "[{metric: val_top1, direction: maximize}])", "search.objectives")
        return []
    out = []
    for i, item in enumerate(objectives):
        p = path + (i,)
        if isinstance(item, str):
            item = {"metric": item}
        if isinstance(item, dict) and len(item) == 1 and not {"metric", "direction"} & set(item):
            (metric, direction), = item.items()  # the short form: {val_top1: max}, {latency:cpu: min}
            item = {"metric": metric, "direction": direction}
        if isinstance(item, dict) and item.get("direction") in SHORT_DIRECTIONS:
            item = {**item, "direction": SHORT_DIRECTIONS[item["direction"]]}
        if not isinstance(item, dict):
            check.add(p, "expected {metric, direction} (allowed: e.g. {metric: macs, direction: minimize})")
            continue
        for key in item:
            if key not in ("metric", "direction"):
                check.add(p + (key,), f"unknown key{did_you_mean(key, ('metric', 'direction'))} "
                          "(allowed: metric, direction)")
        metric = item.get("metric")
        if metric not in OBJECTIVE_METRICS:
            check.add(p + ("metric",), f"unknown metric {format_value(metric)}"
                      f"{did_you_mean(metric, OBJECTIVE_METRICS)} (allowed: {', '.join(OBJECTIVE_METRICS)})",
                      f"search.objectives[{i}].metric")
            continue
        direction = item.get("direction", OBJECTIVE_METRICS[metric])
        if direction not in DIRECTIONS:
            check.add(p + ("direction",), f"unknown direction {format_value(direction)} "
                      f"(allowed: {', '.join(DIRECTIONS)})", f"search.objectives[{i}].direction")
            continue
        if any(o.metric == metric for o in out):
            check.add(p, f"{metric} is an objective twice (allowed: each metric once)",
                      f"search.objectives[{i}]")
            continue
        out.append(Objective(metric=metric, direction=direction))
    return out


def _space(space: Any, base: dict, check: Checker) -> dict[str, Param]:
    path = ("search", "space")
    if not isinstance(space, dict) or not space:
        check.add(path, "expected a mapping of dotted settings to parameters (allowed: e.g. "
                  "{model.width: {int: [64, 768], step: 64}, train.lr: {float: [1.0e-4, 3.0e-3], log: true}})",
                  "search.space")
        return {}
    out = {}
    for key, spec in space.items():
        if check.setting_key(key, path + (key,)):
            param = _param(spec, path + (key,), f"search.space.{key}", check)
            if param is not None and _param_values_valid(key, param, base, path + (key,), check):
                out[key] = param
            else:
                check.bad_keys.add(key)
    return out


def _param(spec: Any, path: tuple, shown: str, check: Checker) -> Optional[Param]:
    allowed = "{int: [low, high]} with optional step and log, {float: [low, high]} with optional " \
              "step or log, or {choice: [values]}"
    if not isinstance(spec, dict):
        check.add(path, f"expected a parameter, got {format_value(spec)} (allowed: {allowed})", shown)
        return None
    kinds = [k for k in spec if k in PARAM_KINDS]
    for key in spec:
        if key not in PARAM_KINDS + PARAM_OPTIONS:
            check.add(path + (key,), f"unknown key{did_you_mean(key, PARAM_KINDS + PARAM_OPTIONS)} "
                      f"(allowed: {', '.join(PARAM_KINDS + PARAM_OPTIONS)})", f"{shown}.{key}")
    if len(kinds) != 1:
        check.add(path, f"needs exactly one of int, float, choice, got {len(kinds)} (allowed: {allowed})", shown)
        return None
    kind = kinds[0]
    value, log, step = spec[kind], spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        check.add(path + ("log",), "expected true or false (allowed: log: true)", f"{shown}.log")
        return None
    if kind == "choice":
        if not check.values_list(value, path + ("choice",)):
            return None
        if step is not None or log:
            check.add(path, "step and log apply to int and float parameters (allowed: {choice: [values]})", shown)
        if len({json.dumps(v, sort_keys=True, default=str) for v in value}) != len(value):
            check.add(path + ("choice",), "repeated value (allowed: distinct choices)", f"{shown}.choice")
        return Param(kind="choice", choices=list(value))
    number = int if kind == "int" else (int, float)
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, number) and not isinstance(v, bool) for v in value)):
        check.add(path + (kind,), f"expected [low, high] of {'integers' if kind == 'int' else 'numbers'}, got "
                  f"{format_value(value)} (allowed: e.g. {kind}: [{'64, 768' if kind == 'int' else '1.0e-4, 3.0e-3'}])",
                  f"{shown}.{kind}")
        return None
    low, high = value
    if low > high:
        check.add(path + (kind,), f"low {low} > high {high} (allowed: low <= high)", f"{shown}.{kind}")
        return None
    if step is not None:
        if not isinstance(step, number) or isinstance(step, bool) or step <= 0:
            check.add(path + ("step",), f"expected a {'positive integer' if kind == 'int' else 'positive number'}, "
                      f"got {format_value(step)} (allowed: e.g. step: {64 if kind == 'int' else 0.1})",
                      f"{shown}.step")
            return None
        if log and step != 1:
            check.add(path + ("step",), "step and log together are not supported by Optuna "
                      "(allowed: one of them)", f"{shown}.step")
            return None
    if log and low <= 0:
        check.add(path + (kind,), f"log scale needs low > 0, got {low} (allowed: positive bounds)",
                  f"{shown}.{kind}")
        return None
    return Param(kind=kind, low=low, high=high, step=step, log=log)


def _param_values_valid(key: str, param: Param, base: dict, path: tuple, check: Checker) -> bool:
    """Each choice and each bound must be a valid value of its setting on its own.

    Combinations (a width against the shift's groups) are checked per trial by Spec.resolve.
    """
    values = param.choices if param.kind == "choice" else [param.low, param.high]
    ok = True
    for i, value in enumerate(values):
        _, errors = validate_cell(base, {key: value})
        where = path + (("choice", i) if param.kind == "choice" else (param.kind,))
        messages = [message for _, involved, message in errors if involved == (key,)]
        for message in messages:
            check.add(where, f"{format_value(value)}: {message}", f"search.space.{key}")
        if param.kind == "choice":
            check.listed(key, value, where, valid=not messages)
        ok = ok and not messages
    return ok
