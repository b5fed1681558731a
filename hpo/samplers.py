"""Sampler and pruner names from the study file -> Optuna objects.

Options that matter for parallel workers are written out here rather than left to
Optuna's defaults, which have changed between releases.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import optuna

from hpo import space as space_mod

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "gp": optuna.samplers.GPSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "qmc": optuna.samplers.QMCSampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
}

SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    # multivariate + group model joint and conditional parameters; constant_liar keeps
    # parallel workers from sampling next to each other's running trials.
    "tpe": {"n_startup_trials": 10, "multivariate": True, "group": True, "constant_liar": True},
    "gp": {"n_startup_trials": 10},
    "cmaes": {"n_startup_trials": 1},
    "nsga2": {"population_size": 50},
    "qmc": {"qmc_type": "sobol", "scramble": True},
    "random": {},
    "grid": {},
}

MULTI_OBJECTIVE_SAMPLERS = {"tpe", "gp", "nsga2", "qmc", "random", "grid"}

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "patient": optuna.pruners.PatientPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "none": optuna.pruners.NopPruner,
}

PRUNER_DEFAULTS: dict[str, dict[str, Any]] = {
    "median": {"n_startup_trials": 5, "n_warmup_steps": 1},
    "percentile": {"n_startup_trials": 5, "n_warmup_steps": 1},
}

# Arguments that take Python objects or that hpo sets itself; not options in the YAML.
_NOT_OPTIONS = {
    "seed", "search_space", "constraints_func", "gamma", "weights", "independent_sampler",
    "mutation", "crossover", "elite_population_selection_strategy", "child_generation_strategy",
    "after_trial_strategy", "source_trials", "wrapped_pruner", "self",
}


def options_of(cls: type) -> list[str]:
    """The YAML-settable keyword arguments of a sampler or pruner class."""
    return [p for p in inspect.signature(cls.__init__).parameters if p not in _NOT_OPTIONS and p not in ("args", "kwargs")]


def build_sampler(
    name: str, options: Mapping[str, Any], seed: int | None, space: space_mod.Group
) -> optuna.samplers.BaseSampler:
    kwargs = {**SAMPLER_DEFAULTS[name], **options, "seed": seed}
    if name == "grid":
        kwargs["search_space"] = space_mod.grid(space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[name](**kwargs)


def check_hyperband(options: Mapping[str, Any]) -> None:
    """Optuna checks hyperband's resources only when it builds its brackets, at the first trial's
    first report (and a `min_resource` of 0 passes even then): its brackets' own checks, now."""
    low, high = options.get("min_resource", 1), options.get("max_resource", "auto")
    optuna.pruners.SuccessiveHalvingPruner(min_resource=low, reduction_factor=options.get("reduction_factor", 3),
                                           bootstrap_count=options.get("bootstrap_count", 0))
    if high != "auto" and (not isinstance(high, int) or isinstance(low, int) and high < low):
        raise ValueError(f"The value of `max_resource` is {high!r}, but must be 'auto' or an integer >= `min_resource` ({low})")


def build_pruner(
    name: str, options: Mapping[str, Any], wrapped: tuple[str, Mapping[str, Any]] | None = None
) -> optuna.pruners.BasePruner:
    kwargs = {**PRUNER_DEFAULTS.get(name, {}), **options}
    if name == "patient":
        kwargs["wrapped_pruner"] = build_pruner(*wrapped) if wrapped else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return PRUNERS[name](**kwargs)
