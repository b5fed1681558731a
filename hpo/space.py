"""The search space: YAML mapping -> tree of nodes -> Optuna define-by-run suggestions.

A trial's parameters reach the user's factories as a nested dict that mirrors the YAML:
a conditional choice becomes ``{"name": <choice>, <its sub-parameters>...}``. Inside
Optuna each parameter is named by its dotted path in that dict (``optimizer.beta1``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hpo.storage import params_in_one_write

Report = Callable[[tuple, str], None]


@dataclass(frozen=True)
class Param:
    name: str
    distribution: BaseDistribution


@dataclass(frozen=True)
class Fixed:
    value: Any


@dataclass(frozen=True)
class Group:
    children: dict[str, Node]


@dataclass(frozen=True)
class Branch:
    """A categorical whose choices carry their own sub-spaces."""

    name: str
    branches: dict[str, Group]


Node = Param | Fixed | Group | Branch

PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
    "fixed": {"type", "value"},
}
_SPEC_HINTS = {"low", "high", "log", "step", "choices", "value"}
_CHOICE_TYPES = (type(None), bool, int, float, str)


def parse(raw: Any, path: tuple, report: Report) -> Group:
    """Builds the node tree, reporting every problem through `report(path, message)`."""
    if not isinstance(raw, Mapping) or not raw:
        report(path, "the search space must be a non-empty mapping of parameter names (expected name: spec)")
        return Group({})
    group = _group(raw, path, "", report)
    _check_unique_names(group, path, report)
    return group


def suggest(trial: optuna.Trial, space: Group) -> dict[str, Any]:
    """Asks `trial` for every parameter active under its own choices; returns the nested dict.

    The sampler's per-thread copy of the study's trials is read afresh, as for a trial that
    `study.ask` made: trials asked together and sampled one after another (population mode) each
    see the parameters of those before them (QMC, for one, infers its search space from the
    running trials there). The values drawn reach the storage in one write
    (`storage.params_in_one_write`)."""
    trial.study._thread_local.cached_all_trials = None
    with params_in_one_write(trial):
        return _resolve(space, lambda name, d: _suggest_param(trial, name, d))


def unflatten(space: Group, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict a trial's factories saw, rebuilt from Optuna's flat params (inverse of `suggest`)."""
    return _resolve(space, lambda name, d: flat.get(name, _MISSING))


_MISSING = object()


def _resolve(space: Group, value_of: Callable[[str, BaseDistribution], Any]) -> dict[str, Any]:
    """Walks the tree, taking each active parameter's value from `value_of(name, distribution)`."""
    out: dict[str, Any] = {}
    for key, node in space.children.items():
        if isinstance(node, Fixed):
            out[key] = node.value
        elif isinstance(node, Group):
            out[key] = _resolve(node, value_of)
        elif isinstance(node, Branch):
            choice = value_of(node.name, CategoricalDistribution(list(node.branches)))
            if choice is not _MISSING:
                out[key] = {"name": choice, **_resolve(node.branches[choice], value_of)}
        else:
            value = value_of(node.name, node.distribution)
            if value is not _MISSING:
                out[key] = value
    return out


def _suggest_param(trial: optuna.Trial, name: str, d: BaseDistribution) -> Any:
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_categorical(name, d.choices)


def flatten(space: Group, nested: Any, path: tuple, report: Report) -> dict[str, Any]:
    """Turns a nested params dict (a baseline trial) into Optuna's flat ``{name: value}``.

    Parameters left out are sampled as usual; values outside the space are reported.
    """
    flat: dict[str, Any] = {}
    if not isinstance(nested, Mapping):
        report(path, f"expected a mapping of parameter values, got {_kind(nested)}")
        return flat
    for key, value in nested.items():
        where = (*path, key)
        node = space.children.get(key)
        if node is None:
            report(where, f"unknown parameter{did_you_mean(key, space.children)}")
        elif isinstance(node, Fixed):
            if value != node.value:
                report(where, f"{value!r} differs from the fixed value (expected {node.value!r})")
        elif isinstance(node, Group):
            flat.update(flatten(node, value, where, report))
        elif isinstance(node, Branch):
            choice, rest = (value, {}) if not isinstance(value, Mapping) else (value.get("name"), dict(value))
            rest.pop("name", None)
            if choice not in node.branches:
                report(where, f"{choice!r} is not a choice (expected one of {', '.join(node.branches)})")
                continue
            flat[node.name] = choice
            flat.update(flatten(node.branches[choice], rest, where, report))
        else:
            if not _contains(node.distribution, value):
                report(where, f"{value!r} is outside the parameter's range (expected {_describe(node.distribution)})")
            else:
                flat[node.name] = value
    return flat


def params(space: Group) -> list[Param]:
    """Every parameter in the tree, branches included (each Branch is itself a categorical)."""
    found: list[Param] = []
    for node in space.children.values():
        if isinstance(node, Param):
            found.append(node)
        elif isinstance(node, Group):
            found.extend(params(node))
        elif isinstance(node, Branch):
            found.append(Param(node.name, CategoricalDistribution(list(node.branches))))
            for sub in node.branches.values():
                found.extend(params(sub))
    return found


def has_branches(space: Group) -> bool:
    return any(
        isinstance(node, Branch) or (isinstance(node, Group) and has_branches(node))
        for node in space.children.values()
    )


def grid(space: Group) -> dict[str, list[Any]] | None:
    """The grid of a fully discrete space without branches, or None."""
    if has_branches(space):
        return None
    values: dict[str, list[Any]] = {}
    for p in params(space):
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            values[p.name] = list(d.choices)
        elif isinstance(d, IntDistribution):
            values[p.name] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            n = round((d.high - d.low) / d.step)
            values[p.name] = [round(d.low + i * d.step, 12) for i in range(n + 1)]
        else:
            return None
    return values


def _group(raw: Mapping, path: tuple, prefix: str, report: Report) -> Group:
    children: dict[str, Node] = {}
    for key, spec in raw.items():
        where = (*path, key)
        if not isinstance(key, str) or not key.isidentifier():
            report(where, f"parameter name {key!r} is not a valid name (expected letters, digits and _)")
            continue
        node = _node(spec, where, f"{prefix}{key}", report)
        if node is not None:
            children[key] = node
    return Group(children)


def _node(spec: Any, path: tuple, name: str, report: Report) -> Node | None:
    if not isinstance(spec, Mapping):
        if isinstance(spec, list) and not all(isinstance(v, _CHOICE_TYPES) for v in spec):
            report(path, "a fixed list may hold only scalars (expected numbers, strings, booleans or null)")
        return Fixed(spec)
    if "type" not in spec:
        hints = _SPEC_HINTS & set(spec)
        if hints:
            report(path, f"has {', '.join(sorted(hints))} but no type (expected type: float, int, categorical or fixed)")
            return None
        return _group(spec, path, f"{name}.", report) if spec else Fixed({})
    kind = spec["type"]
    if kind not in PARAM_KEYS:
        report((*path, "type"), f"unknown type {kind!r}{did_you_mean(kind, PARAM_KEYS)} (expected float, int, categorical or fixed)")
        return None
    for key in spec:
        if key not in PARAM_KEYS[kind]:
            report((*path, key), f"unknown key for a {kind} parameter{did_you_mean(key, PARAM_KEYS[kind])} (expected {', '.join(sorted(PARAM_KEYS[kind] - {'type'}))})")
    if kind == "fixed":
        if "value" not in spec:
            report(path, "a fixed parameter needs value (expected value: ...)")
            return None
        return Fixed(spec["value"])
    if kind == "categorical":
        return _categorical(spec, path, name, report)
    return _numeric(kind, spec, path, name, report)


def _numeric(kind: str, spec: Mapping, path: tuple, name: str, report: Report) -> Param | None:
    number = int if kind == "int" else (int, float)
    ok = True
    for key in ("low", "high"):
        value = spec.get(key)
        if value is None:
            report(path, f"a {kind} parameter needs {key} (expected {key}: <number>)")
            ok = False
        elif isinstance(value, bool) or not isinstance(value, number) or (kind == "float" and not math.isfinite(value)):
            report((*path, key), f"{value!r} is not {'an integer' if kind == 'int' else 'a number'} (expected {'an integer' if kind == 'int' else 'a finite number'})")
            ok = False
    log = spec.get("log", False)
    if not isinstance(log, bool):
        report((*path, "log"), f"{log!r} is not a boolean (expected true or false)")
        ok = False
    step = spec.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
        report((*path, "step"), f"{step!r} is not a positive {'integer' if kind == 'int' else 'number'} (expected step > 0)")
        ok = False
    if not ok:
        return None
    low, high = spec["low"], spec["high"]
    if low >= high:
        report((*path, "low"), f"low {low} is not below high {high} (expected low < high)")
        return None
    if log and low <= 0:
        report((*path, "low"), f"log scale needs low > 0, got {low} (expected a positive low)")
        return None
    if log and step is not None and not (kind == "int" and step == 1):
        report((*path, "step"), "step cannot be combined with log: true (expected one of them)")
        return None
    if step is not None:
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            report((*path, "step"), f"step {step} does not divide the range {low}..{high} (expected (high - low) to be a multiple of step)")
            return None
    if kind == "int":
        return Param(name, IntDistribution(low, high, log=log, step=step or 1))
    return Param(name, FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step)))


def _categorical(spec: Mapping, path: tuple, name: str, report: Report) -> Node | None:
    choices = spec.get("choices")
    where = (*path, "choices")
    if isinstance(choices, Mapping):
        if not choices:
            report(where, "no choices (expected at least one)")
            return None
        branches: dict[str, Group] = {}
        for choice, sub in choices.items():
            if not isinstance(choice, str):
                report((*where, choice), f"branch name {choice!r} is not a string (expected a name such as adam)")
            elif sub is None:
                branches[choice] = Group({})
            elif not isinstance(sub, Mapping):
                report((*where, choice), f"a branch holds a sub-space, got {_kind(sub)} (expected a mapping or nothing)")
            elif "name" in sub:
                report((*where, choice, "name"), "'name' is taken by the choice itself (expected another parameter name)")
            else:
                branches[choice] = _group(sub, (*where, choice), f"{name}.", report)
        return Branch(name, branches)
    if not isinstance(choices, list):
        report(where if "choices" in spec else path, f"choices must be a list or a mapping of branches, got {_kind(choices)} (expected [a, b, ...])")
        return None
    if not choices:
        report(where, "no choices (expected at least one)")
        return None
    for i, choice in enumerate(choices):
        if not isinstance(choice, _CHOICE_TYPES):
            report((*where, i), f"choice {choice!r} is not a scalar (expected a number, string, boolean or null; for sub-spaces use a mapping of branches)")
            return None
    if len({repr(c) for c in choices}) != len(choices):
        report(where, "the same choice is listed twice (expected distinct choices)")
        return None
    return Param(name, CategoricalDistribution(choices))


def _check_unique_names(space: Group, path: tuple, report: Report) -> None:
    seen: dict[str, tuple] = {}

    def walk(group: Group, where: tuple) -> None:
        for key, node in group.children.items():
            here = (*where, key)
            if isinstance(node, Param):
                if node.name in seen:
                    report(here, f"parameter {node.name} is defined in more than one branch, also at {'.'.join(map(str, seen[node.name]))} (expected unique names: move it out of the branches or rename it)")
                seen.setdefault(node.name, here)
            elif isinstance(node, Group):
                walk(node, here)
            elif isinstance(node, Branch):
                seen.setdefault(node.name, here)
                for choice, sub in node.branches.items():
                    walk(sub, (*here, "choices", choice))

    walk(space, path)


def _contains(d: BaseDistribution, value: Any) -> bool:
    try:
        if isinstance(value, bool) and not isinstance(d, CategoricalDistribution):
            return False
        return d._contains(d.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def _describe(d: BaseDistribution) -> str:
    if isinstance(d, CategoricalDistribution):
        return "one of " + ", ".join(map(repr, d.choices))
    step = f" step {d.step}" if getattr(d, "step", None) not in (None, 1) else ""
    return f"{d.low}..{d.high}{step}{' log' if d.log else ''}"


def did_you_mean(word: Any, options: Any) -> str:
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
