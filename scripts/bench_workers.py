"""Parallel efficiency of 4 workers on one study: plain Optuna against hpo, per storage.

Each trial's work is a sleep of 50 ms spread over 5 reported steps (10 ms each), so the
ideal wall time is the total sleep of all trials divided by the number of workers, and
efficiency = ideal / wall: 1.0 means the storage, the sampler (TPE, constant liar) and
the pruner (median) cost nothing. Each worker is a process; all of them import first,
then start together, open the study and run; the wall time runs from the start to the last
worker's end. Each side's study is new, under its own Redis key prefix (a journal shared with
earlier studies would make every worker replay them). Plain Optuna uses its own storage classes (JournalRedisBackend, RDBStorage
without heartbeat, JournalFileBackend) and `study.optimize` with the same sampler and pruner;
hpo uses `hpo.worker.run_worker` with its storage, budget lock, heartbeat and bookkeeping.
A third side, the loop alone, trains the same trials (each for the epochs hpo trained it) by
`trainers.fit` with no storage at all: the most any worker that trains them can reach here.

    python scripts/bench_workers.py [--trials 240] [--workers 4] [--storages redis,postgresql,journal]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid

import optuna
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, STEP_S = 5, 0.010
SAMPLER_OPTIONS = {"n_startup_trials": 10, "multivariate": True, "group": True, "constant_liar": True}
PRUNER_OPTIONS = {"n_startup_trials": 5, "n_warmup_steps": 1}

# The same objective for both sides: hpo reaches it through the training loop (a train step
# that sleeps, an eval step that reports the value), plain Optuna calls it directly.
TASK = """
import time
import torch

STEP_S = STEP_SECONDS

class Point(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.x, self.y, self.epoch = params["x"], params["y"], 0

def model(params):
    return Point(params)

def data():
    x = torch.zeros(1, 1)
    return x, torch.zeros(1), x, torch.zeros(1)

def value(x, y, step):
    return (x - 2) ** 2 + (y + 1) ** 2 + 4.0 / (step + 1)

def train_step(model, batch):
    time.sleep(STEP_S)
    model.epoch += 1
    return model.w.sum() * 0

def eval_step(model, batch):
    return {"objective": torch.tensor(value(model.x, model.y, model.epoch - 1))}
""".replace("STEP_SECONDS", repr(STEP_S))

STUDY = {
    "study": {"name": "bench", "direction": "minimize", "metric": "val_objective", "seed": 0,
              "sampler": {"name": "tpe", "options": SAMPLER_OPTIONS},
              "pruner": {"name": "median", "options": PRUNER_OPTIONS}},
    "trainer": {"epochs": STEPS, "batch_size": 1, "threads": 1, "device": "cpu"},
    "task": {"model": "bench_workers_task:model", "data": "bench_workers_task:data",
             "train_step": "bench_workers_task:train_step", "eval_step": "bench_workers_task:eval_step",
             "metrics": ["val_objective"]},
    "space": {"x": {"type": "float", "low": -10, "high": 10}, "y": {"type": "float", "low": -10, "high": 10}},
}


def plain_storage(label: str, url: str):
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    if label == "redis":
        base, _, prefix = url.partition("?prefix=")
        return JournalStorage(JournalRedisBackend(base, prefix=prefix))
    if label == "journal":
        return JournalStorage(JournalFileBackend(url))
    return RDBStorage(url.replace("postgresql://", "postgresql+psycopg://", 1) if label == "postgresql" else url)


def import_driver(label: str) -> None:
    """The storage's driver, imported before the start on both sides as the rest of the code is:
    SQLAlchemy, psycopg and alembic take about a second to import on 4 busy processes, once per
    worker's life, which would weigh on a few-second benchmark as it never does on a real study."""
    if label in ("postgresql", "sqlite"):
        import alembic.script  # noqa: F401
        import optuna.storages._rdb.storage  # noqa: F401
        import sqlalchemy.orm  # noqa: F401
    if label == "postgresql":
        import psycopg  # noqa: F401
    if label == "redis":
        import redis  # noqa: F401


def plain_worker(label: str, url: str, name: str, index: int, n_trials: int, ready, go, out) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import_driver(label)
    slept = 0.0

    def objective(trial: optuna.Trial) -> float:
        nonlocal slept
        x, y = trial.suggest_float("x", -10, 10), trial.suggest_float("y", -10, 10)
        for step in range(STEPS):
            time.sleep(STEP_S)
            slept += STEP_S
            v = (x - 2) ** 2 + (y + 1) ** 2 + 4.0 / (step + 1)
            trial.report(v, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return v

    ready.put(index)
    go.wait()
    cpu = time.process_time()
    study = optuna.load_study(study_name=name, storage=plain_storage(label, url),
                              sampler=optuna.samplers.TPESampler(seed=index, **SAMPLER_OPTIONS),
                              pruner=optuna.pruners.MedianPruner(**PRUNER_OPTIONS))
    # Optuna's own global budget: stop once the study holds n_trials finished or running trials.
    study.optimize(objective, n_trials=n_trials,
                   callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=None)])
    out.put((time.perf_counter(), slept, time.process_time() - cpu))


def count_sleeps() -> list[float]:
    """Wraps the task's train step to count the sleeps it runs (the loop imports it by name from
    the task's module); returns a one-element list holding the seconds slept so far. And pays a
    process's first torch optimizer before the start (it imports torch._dynamo, about a second: a
    cost of any PyTorch objective, as the plain side pays its imports before)."""
    sys.path.insert(0, os.environ["HPO_BENCH_TASK_DIR"])
    import bench_workers_task as task
    import torch

    slept = [0.0]
    original = task.train_step

    def counted_step(model, batch):
        slept[0] += STEP_S
        return original(model, batch)

    task.train_step = counted_step
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    return slept


def hpo_worker(label: str, url: str, name: str, index: int, n_trials: int, ready, go, out) -> None:
    from hpo import worker

    slept = count_sleeps()
    import_driver(label)
    ready.put(index)
    go.wait()
    cpu = time.process_time()
    worker.run_worker(name, url, index=index, threads=1)
    out.put((time.perf_counter(), slept[0], time.process_time() - cpu))


def loop_worker(label: str, path: str, name: str, index: int, n_trials: int, ready, go, out, epochs: list[int]) -> None:
    """The ceiling: the same trials (same epochs each as hpo's were trained) by `trainers.fit`
    alone, as hpo's worker runs it, with no storage, no sampler, no pruner."""
    import dataclasses

    import trainers
    from hpo import objective
    from hpo.config import load_config

    slept = count_sleeps()
    config = load_config(path)
    task = objective.prepare(config)
    ready.put(index)
    go.wait()
    cpu = time.process_time()
    for number, n_epochs in enumerate(epochs):
        params = {"x": 0.0, "y": 0.0}
        objective.seed_torch(number)
        data = task.data(params)
        trainers.fit(task.model(params, data), data,
                     dataclasses.replace(config.trainer, seed=number, threads=1, epochs=n_epochs),
                     hparams=params, kind=config.task.kind, train_step=task.train_step, eval_step=task.eval_step)
    out.put((time.perf_counter(), slept[0], time.process_time() - cpu))


def side(target, label: str, url: str, name: str, workers: int, n_trials: int,
         shares: list[list[int]] | None = None) -> tuple[float, float, float]:
    """Starts `workers` processes, lets them go together; returns (efficiency, wall seconds,
    the workers' CPU milliseconds per trial). `shares`: each worker's extra argument."""
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=target, args=(label, url, name, i, n_trials, ready, go, out, *([shares[i]] if shares else [])))
             for i in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    started = time.perf_counter()
    go.set()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    wall = max(end for end, _, _ in results) - started
    ideal = sum(slept for _, slept, _ in results) / workers
    return ideal / wall, wall, sum(cpu for _, _, cpu in results) / n_trials * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=240)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--storages", default="redis,postgresql,journal")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    from hpo import coordinator
    from hpo.config import load_config
    from hpo.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "bench_workers_task.py"), "w") as f:
        f.write(TASK)
    os.environ["HPO_BENCH_TASK_DIR"] = tmp
    sys.path.insert(0, tmp)
    urls = {"redis": args.redis, "postgresql": args.postgres, "journal": os.path.join(tmp, "bench.journal"),
            "sqlite": f"sqlite:///{tmp}/bench.db"}
    print(f"{args.workers} workers, {args.trials} trials of 5 x 10 ms steps, TPE (constant liar) + median pruner")
    print("efficiency = (total sleep / workers) / wall time; CPU = the workers' CPU time per trial\n")
    print("loop alone = the same trials, as many epochs each as hpo trained them, by trainers.fit in the same")
    print("number of processes, without storage, sampler or pruner: the ceiling for any worker that trains them\n")
    print("| storage | plain Optuna | hpo | loop alone | plain wall s | hpo wall s | plain CPU ms/trial | hpo CPU ms/trial |")
    print("|---|---|---|---|---|---|---|---|")
    for label in args.storages.split(","):
        plain_name, hpo_name = f"plain-{uuid.uuid4().hex[:6]}", f"hpo-{uuid.uuid4().hex[:6]}"
        url = plain_url = urls[label]
        if label == "redis":
            url, plain_url = f"{url}?prefix={hpo_name}", f"{url}?prefix={plain_name}"
        try:
            optuna.create_study(storage=plain_storage(label, plain_url), study_name=plain_name, direction="minimize")
        except Exception as err:
            print(f"# skipping {label}: {type(err).__name__}: {err}")
            continue
        raw = dict(STUDY, study={**STUDY["study"], "name": hpo_name, "n_trials": args.trials})
        path = os.path.join(tmp, f"{hpo_name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(raw, f)
        coordinator.create(load_config(path), open_storage(url))
        plain_eff, plain_wall, plain_cpu = side(plain_worker, label, plain_url, plain_name, args.workers, args.trials)
        hpo_eff, hpo_wall, hpo_cpu = side(hpo_worker, label, url, hpo_name, args.workers, args.trials)
        trained = [len(t.intermediate_values) for t in optuna.load_study(study_name=hpo_name, storage=open_storage(url)).trials
                   if t.state.is_finished()]
        loop_eff, _, _ = side(loop_worker, label, path, hpo_name, args.workers, args.trials,
                              shares=[trained[i::args.workers] for i in range(args.workers)])
        print(f"| {label} | {plain_eff:.2f} | {hpo_eff:.2f} | {loop_eff:.2f} | {plain_wall:.1f} | {hpo_wall:.1f} | "
              f"{plain_cpu:.1f} | {hpo_cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
