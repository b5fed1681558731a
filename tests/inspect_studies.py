"""Small studies with known numbers, built without training, for the inspect tests."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parent.parent

# Four epochs; the median pruner with no warmup, so the hand-built curves decide everything.
STUDY_YAML = """\
study:
  name: {name}
  direction: maximize
  metric: val_accuracy
  n_trials: {n_trials}
  seed: 0
  sampler: {{name: random}}
  pruner:
    name: median
    options: {{n_startup_trials: 0, n_warmup_steps: 0}}
trainer:
  epochs: 4
  batch_size: 64
  device: cpu
task:
  model: hpo.examples.tabular:mlp
  data: hpo.examples.tabular:digits
space:
  lr: {{type: float, low: 1.0e-3, high: 1.0e-1, log: true}}
  model:
    layers: {{type: int, low: 1, high: 2}}
    width: {{type: categorical, choices: [16, 32]}}
    activation: {{type: categorical, choices: [relu]}}
    dropout: {{type: float, low: 0.0, high: 0.2}}
  optimizer:
    type: categorical
    choices:
      adam:
        beta1: {{type: float, low: 0.8, high: 0.99}}
      sgd:
        momentum: {{type: float, low: 0.5, high: 0.99}}
"""

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)
DISTS = {"lr": FloatDistribution(1e-3, 1e-1, log=True), "model.layers": IntDistribution(1, 2),
         "optimizer": CategoricalDistribution(["adam", "sgd"]),
         "optimizer.beta1": FloatDistribution(0.8, 0.99), "optimizer.momentum": FloatDistribution(0.5, 0.99)}

# name: (state, curve per epoch, seconds, worker, lr)
# The numbers behind tests/test_analysis.py: completed seconds 20 over 20 epochs (1 s per
# epoch); pruned 3 s having run 1 + 2 of their 4 epochs, so 5 epochs were saved (5 s);
# E is the late bloomer the median rule stops at epoch 0.
HAND = {
    "A": ("COMPLETE", [0.5, 0.6, 0.7, 0.8], 4.0, "w1", 0.010),
    "B": ("COMPLETE", [0.4, 0.5, 0.6, 0.7], 4.0, "w2", 0.020),
    "C": ("COMPLETE", [0.3, 0.4, 0.5, 0.6], 4.0, "w1", 0.030),
    "D": ("COMPLETE", [0.2, 0.3, 0.4, 0.5], 4.0, "w2", 0.040),
    "E": ("COMPLETE", [0.1, 0.2, 0.3, 0.9], 4.0, "w1", 0.005),
    "P1": ("PRUNED", [0.05], 1.0, "w2", 0.090),
    "P2": ("PRUNED", [0.15, 0.25], 2.0, "w1", 0.080),
    "F": ("FAIL", [], 0.5, "w2", 0.070),
}


def hand_trials(conditional: bool = True) -> list[FrozenTrial]:
    trials = []
    for i, (name, (state, curve, seconds, worker, lr)) in enumerate(HAND.items()):
        params = {"lr": lr, "model.layers": 1 + i % 2}
        if conditional:
            params["optimizer"] = "adam" if i % 2 else "sgd"
            params["optimizer.beta1" if i % 2 else "optimizer.momentum"] = 0.9 - 0.01 * i
        start = T0 + datetime.timedelta(seconds=10 * i)
        trials.append(FrozenTrial(
            number=i, state=TrialState[state], value=curve[-1] if state == "COMPLETE" else None,
            datetime_start=start, datetime_complete=start + datetime.timedelta(seconds=seconds),
            params=params, distributions={p: DISTS[p] for p in params},
            user_attrs={"hpo:worker": worker, "hpo:seconds": seconds, "hpo:name": name},
            system_attrs={}, intermediate_values=dict(enumerate(curve)), trial_id=i,
        ))
    return trials


def hand_study(conditional: bool = True) -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="hand")
    study.add_trials(hand_trials(conditional))
    return study


def multi_objective_study(n: int = 12) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="multi")
    for i in range(n):
        x, y = i / n, (i * 7 % n) / n
        study.add_trial(optuna.trial.create_trial(
            params={"x": x, "y": y}, distributions={"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)},
            values=[x + 0.1 * y, (1 - x) ** 2 + y], user_attrs={"hpo:worker": f"w{i % 2}", "hpo:seconds": 1.0}))
    return study


def write_yaml(tmp_path: Path, name: str = "inspect-demo", n_trials: int = 8) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(STUDY_YAML.format(name=name, n_trials=n_trials))
    return path


def stored_hand_study(tmp_path: Path, name: str = "hand") -> str:
    """A journal file holding an hpo study (config and all) with the hand-built trials."""
    from hpo import coordinator
    from hpo.config import load_config
    from hpo.storage import open_storage

    journal = str(tmp_path / f"{name}.journal")
    created = coordinator.create(load_config(str(write_yaml(tmp_path, name))), open_storage(journal))
    created.study.add_trials(hand_trials())
    return journal


def hpo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m hpo ARGS` in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("HPO_STORAGE", None)
    return subprocess.run([sys.executable, "-m", "hpo", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
