"""Search space -> Optuna suggestions -> the nested dict the factories see."""

from __future__ import annotations

import optuna
import pytest

from hpo import space

RAW = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "layers": {"type": "int", "low": 1, "high": 4},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
    "activation": "relu",
    "model": {"width": {"type": "categorical", "choices": [32, 64]}, "bias": True},
    "optimizer": {
        "type": "categorical",
        "choices": {
            "adam": {"beta1": {"type": "float", "low": 0.8, "high": 0.99}},
            "sgd": {
                "momentum": {"type": "float", "low": 0.5, "high": 0.99},
                "schedule": {
                    "type": "categorical",
                    "choices": {"cosine": None, "step": {"gamma": {"type": "float", "low": 0.1, "high": 0.9}}},
                },
            },
        },
    },
}


def parsed() -> space.Group:
    problems: list = []
    group = space.parse(RAW, ("space",), lambda path, message: problems.append((path, message)))
    assert problems == []
    return group


def ask(params: dict | None = None) -> tuple[dict, optuna.trial.FrozenTrial]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    if params:
        study.enqueue_trial(params)
    trial = study.ask()
    nested = space.suggest(trial, parsed())
    study.tell(trial, 0.0)
    return nested, study.trials[0]


def test_nested_dict_mirrors_the_yaml_with_fixed_values_included() -> None:
    nested, _ = ask({"optimizer": "adam"})
    assert set(nested) == {"lr", "layers", "dropout", "activation", "model", "optimizer"}
    assert nested["activation"] == "relu"
    assert nested["model"]["bias"] is True and nested["model"]["width"] in (32, 64)
    assert set(nested["optimizer"]) == {"name", "beta1"} and nested["optimizer"]["name"] == "adam"


def test_only_the_chosen_branch_is_suggested() -> None:
    _, trial = ask({"optimizer": "adam"})
    assert "optimizer.beta1" in trial.params
    assert not any(name.startswith("optimizer.momentum") or name.startswith("optimizer.schedule") for name in trial.params)


def test_branches_nest_to_any_depth() -> None:
    nested, trial = ask({"optimizer": "sgd", "optimizer.schedule": "step"})
    assert nested["optimizer"]["schedule"]["name"] == "step"
    assert 0.1 <= nested["optimizer"]["schedule"]["gamma"] <= 0.9
    assert "optimizer.schedule.gamma" in trial.params and "optimizer.beta1" not in trial.params
    nested, trial = ask({"optimizer": "sgd", "optimizer.schedule": "cosine"})
    assert nested["optimizer"]["schedule"] == {"name": "cosine"}


def test_distributions_keep_log_and_step() -> None:
    _, trial = ask()
    assert trial.distributions["lr"].log is True
    assert trial.distributions["dropout"].step == pytest.approx(0.1)
    assert round(trial.params["dropout"] * 10, 9) == round(trial.params["dropout"] * 10)


def test_baseline_flattens_to_optuna_names() -> None:
    problems: list = []
    flat = space.flatten(parsed(), {"lr": 0.01, "optimizer": {"name": "sgd", "momentum": 0.9, "schedule": "cosine"}}, ("b",), lambda p, m: problems.append(m))
    assert problems == []
    assert flat == {"lr": 0.01, "optimizer": "sgd", "optimizer.momentum": 0.9, "optimizer.schedule": "cosine"}


def test_enqueued_baseline_reaches_the_factories_unchanged() -> None:
    problems: list = []
    flat = space.flatten(parsed(), {"lr": 0.01, "layers": 3, "optimizer": {"name": "adam", "beta1": 0.9}}, (), lambda p, m: problems.append(m))
    nested, _ = ask(flat)
    assert nested["lr"] == 0.01 and nested["layers"] == 3 and nested["optimizer"] == {"name": "adam", "beta1": 0.9}


def test_grid_of_a_discrete_space() -> None:
    problems: list = []
    group = space.parse({"a": {"type": "int", "low": 1, "high": 3}, "b": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.5}, "c": "fixed"}, (), lambda p, m: problems.append(m))
    assert space.grid(group) == {"a": [1, 2, 3], "b": [0.0, 0.5, 1.0]}
    assert space.grid(parsed()) is None  # branches and continuous floats have no grid


def test_unflatten_is_the_inverse_of_suggest() -> None:
    for choice in ("adam", "sgd"):
        nested, trial = ask({"optimizer": choice})
        assert space.unflatten(parsed(), trial.params) == nested
