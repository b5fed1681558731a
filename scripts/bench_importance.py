"""Cost of hyperparameter importance at 100, 1,000 and 10,000 trials, per evaluator.

Synthetic studies (6 parameters, one of them conditional) are built in memory with
`optuna.trial.create_trial` + `study.add_trials`, so the script measures importance only.
Prints one Markdown table row per (trials, method): the time of one evaluation on all
trials (uncapped, as Optuna's `get_param_importances` does it) and of what `hpo plot
importance` does (bootstrap resamples, capped at hpo.importance.MAX_TRIALS trials each).

Run:  python scripts/bench_importance.py [--sizes 100 1000 10000] [--evaluators ped-anova fanova mdi]
"""

from __future__ import annotations

import argparse
import math
import random
import time

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hpo import importance
from hpo.trials_view import TrialsView

DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "layers": IntDistribution(1, 4),
    "width": CategoricalDistribution([32, 64, 128, 256]),
    "optimizer": CategoricalDistribution(["adam", "sgd"]),
    "optimizer.momentum": FloatDistribution(0.5, 0.99),  # only when optimizer == sgd
}


def synthetic_study(n: int, seed: int = 0) -> optuna.Study:
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        params = {
            "lr": math.exp(rng.uniform(math.log(1e-4), math.log(1e-1))),
            "weight_decay": math.exp(rng.uniform(math.log(1e-6), math.log(1e-2))),
            "layers": rng.randint(1, 4),
            "width": rng.choice([32, 64, 128, 256]),
            "optimizer": rng.choice(["adam", "sgd"]),
        }
        if params["optimizer"] == "sgd":
            params["optimizer.momentum"] = rng.uniform(0.5, 0.99)
        # lr matters most, then layers, then momentum when present; the rest is noise.
        value = -abs(math.log10(params["lr"]) + 2.5) - 0.2 * abs(params["layers"] - 2)
        value -= 0.5 * abs(params.get("optimizer.momentum", 0.9) - 0.9) + rng.gauss(0, 0.05)
        dists = {k: DISTRIBUTIONS[k] for k in params}
        trials.append(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--evaluators", nargs="+", default=list(importance.EVALUATORS), choices=list(importance.EVALUATORS))
    parser.add_argument("--repeats", type=int, default=10, help="bootstrap resamples in the hpo row (default 10)")
    parser.add_argument("--max-uncapped", type=int, default=1000, help="skip one-shot fANOVA/MDI above this many trials (default 1000)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("| trials | evaluator | one evaluation, all trials | hpo plot importance (resamples x trials) |")
    print("|---:|---|---:|---:|")
    for n in args.sizes:
        study = synthetic_study(n)
        for name in args.evaluators:
            once = "skipped"
            if name == "ped-anova" or n <= args.max_uncapped:
                started = time.perf_counter()
                optuna.importance.get_param_importances(TrialsView.of(study, study.trials), evaluator=importance.EVALUATORS[name](0))
                once = f"{time.perf_counter() - started:.2f} s"
            started = time.perf_counter()
            result = importance.compute(study, name, repeats=args.repeats)
            hpo_time = time.perf_counter() - started
            print(f"| {n:,} | {importance.LABELS[name]} | {once} | {hpo_time:.2f} s ({result.repeats} x {result.per_resample:,}) |", flush=True)


if __name__ == "__main__":
    main()
