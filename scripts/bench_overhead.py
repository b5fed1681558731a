"""Per-trial overhead of hpo's worker against a plain Optuna loop on the same storage.

Both sides run the same trials: the same TPE sampler and median pruner, the same search
space, the same tiny model trained by `trainers.fit` for 3 epochs with a report per epoch.
What differs is only hpo's bookkeeping (config, budget checks, per-trial attributes).
Side by side in one run, alternating, so machine noise hits both alike.

    python scripts/bench_overhead.py [--trials 60] [--redis redis://127.0.0.1:6379/14] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

import optuna
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trainers  # noqa: E402
from hpo import coordinator, samplers, space, worker  # noqa: E402
from hpo.config import load_config  # noqa: E402
from hpo.objective import PruningCallback  # noqa: E402
from hpo.storage import open_storage, redact  # noqa: E402

STUDY = {
    "study": {"name": "bench", "direction": "maximize", "metric": "val_accuracy", "seed": 0, "n_trials": 1,
              "sampler": {"name": "tpe", "options": {"n_startup_trials": 10}}, "pruner": "median"},
    "trainer": {"epochs": 3, "batch_size": 64, "threads": 1},
    "task": {"model": "hpo.examples.tabular:mlp", "data": "bench_task:data"},
    "space": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "model": {"width": {"type": "categorical", "choices": [8, 16]}, "layers": 1},
        "optimizer": {"type": "categorical", "choices": {"adam": {"beta1": {"type": "float", "low": 0.8, "high": 0.99}},
                                                         "sgd": {"momentum": {"type": "float", "low": 0.5, "high": 0.99}}}},
    },
}
TASK = """
import torch
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return x[:192], y[:192], x[192:], y[192:]
"""


def fresh(url: str, name: str) -> str:
    """Redis: a key prefix per study, so that opening it replays only its own journal."""
    return f"{url}?prefix={name}" if url.startswith("redis") else url


def plain_optuna(url: str, name: str, n_trials: int, config) -> float:
    started = time.perf_counter()  # opening the storage counts on both sides
    storage = open_storage(fresh(url, name))
    sampler = samplers.build_sampler("tpe", config.study.sampler_options, 0, config.space)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                pruner=samplers.build_pruner("median", {}))
    data = trainers.as_data(__import__("bench_task").data())
    from hpo.examples.tabular import mlp

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial, config.space)
        state = trainers.fit(mlp(params, data), data, config.trainer, [PruningCallback(trial, "val_accuracy")], hparams=params)
        return state.metrics["val_accuracy"]

    study.optimize(objective, n_trials=n_trials)
    return (time.perf_counter() - started) / n_trials


def hpo_worker(url: str, name: str, n_trials: int, path: str) -> float:
    raw = yaml.safe_load(open(path))
    raw["study"].update({"name": name, "n_trials": n_trials})
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    coordinator.create(load_config(path), open_storage(fresh(url, name)))
    started = time.perf_counter()
    worker.run_worker(name, fresh(url, name), index=0, threads=1)
    return (time.perf_counter() - started) / n_trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "bench_task.py"), "w") as f:
        f.write(TASK)
    sys.path.insert(0, tmp)
    path = os.path.join(tmp, "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(STUDY, f)
    config = load_config(path)

    storages = {"journal file (embedded)": os.path.join(tmp, "bench.journal"), "sqlite": f"sqlite:///{tmp}/bench.db"}
    for label, url in (("redis", args.redis), ("postgresql", args.postgres)):
        try:
            open_storage(url)
            storages[label] = url
        except Exception as err:
            print(f"# skipping {label}: {err}")
    print(f"{args.trials} trials x {args.rounds} rounds per side, TPE + median pruner, 3 epochs of a tiny MLP, 1 thread\n")
    print("| storage | plain Optuna ms/trial | hpo ms/trial | hpo / Optuna |")
    print("|---|---|---|---|")
    for label, url in storages.items():
        # Warm-up: first-use costs (imports, connection pools, table creation) hit neither side.
        plain_optuna(url, f"warm-{uuid.uuid4().hex[:6]}", 3, config)
        plain, ours = [], []
        for _ in range(args.rounds):
            plain.append(plain_optuna(url, f"plain-{uuid.uuid4().hex[:6]}", args.trials, config))
            ours.append(hpo_worker(url, f"hpo-{uuid.uuid4().hex[:6]}", args.trials, path))
        p, h = statistics.median(plain) * 1e3, statistics.median(ours) * 1e3
        print(f"| {label} ({redact(url) if '://' in url else 'file'}) | {p:.1f} | {h:.1f} | {h / p:.2f} |", flush=True)


if __name__ == "__main__":
    main()
