"""Trials per hour of the digits MLP study: one trial at a time against population mode.

Both sides run the shipped study (search_spaces/digits_mlp.yaml) with the same sampler seed,
the same budget and epochs, on the CPU with one torch thread, one worker, the embedded journal
storage; side by side in one run. Two search spaces:

- ``shipped``: the study as shipped (layers 1-3, width 32-256, three activations, dropout,
  Adam or SGD): 12 architectures for the stacking to group (activation varies per slot);
- ``fixed-arch``: the same study with the architecture fixed (2 layers of 64, ReLU), the way one
  tunes the optimizer of a chosen model: every trial fits every group.

For each: wall time, trials per hour, the ratio, the best value reached (study quality), the
time until a target accuracy was first reached, and the mean group size.

    python scripts/bench_vectorized.py [--trials 40] [--epochs 20] [--width 8|auto] [--lookahead 1] [--pad 1 3] [--rounds 3] [--spaces shipped fixed-arch] [--seeds 0 1 2]

What stacking gains per architecture of the shipped space (one model alone against K copies):

    python scripts/bench_vectorized.py --architectures [--widths 2 4 8] [--device cuda --precision bf16-mixed]

On a GPU, the digits MLP and the small conv net of search_spaces/digits_conv.yaml, in bf16:

    python scripts/bench_vectorized.py --device cuda --precision bf16-mixed --model mlp conv --spaces fixed-arch \
        --width 32 --trials 128 --epochs 10 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import optuna
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trainers  # noqa: E402
from hpo import coordinator, worker  # noqa: E402
from hpo.config import load_config  # noqa: E402
from hpo.examples.images import convnet, digits_images  # noqa: E402
from hpo.examples.tabular import digits, mlp  # noqa: E402
from hpo.storage import open_storage  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPOUT = {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05}
# Per model: its shipped study, and the architecture that the fixed-arch space pins.
MODELS = {
    "mlp": ("digits_mlp.yaml", {"layers": 2, "width": 64, "activation": "relu", "dropout": DROPOUT}),
    "conv": ("digits_conv.yaml", {"blocks": 2, "channels": 16, "activation": "relu", "dropout": DROPOUT}),
}
# The run's settings: device, precision and the population's lookahead.
SETTINGS = {"lookahead": 1, "device": "cpu", "precision": "32", "ask_ahead": False, "seed": 0, "pad": None}


def study_raw(space: str, trials: int, epochs: int, width: str | None, model: str = "mlp") -> dict:
    shipped, fixed = MODELS[model]
    with open(os.path.join(ROOT, "search_spaces", shipped)) as f:
        raw = yaml.safe_load(f)
    raw["study"].update({"name": f"bench-{model}-{space}-{'solo' if width is None else 'vec'}-s{SETTINGS['seed']}",
                         "n_trials": trials, "ask_ahead": SETTINGS["ask_ahead"], "seed": SETTINGS["seed"]})
    raw["trainer"].update({"epochs": epochs, "device": SETTINGS["device"], "threads": 1, "precision": SETTINGS["precision"]})
    if space == "fixed-arch":
        raw["space"]["model"] = dict(fixed)
        raw["baseline"][0]["model"] = {"dropout": 0.1}
    if width is not None:
        raw["study"]["vectorize"] = {"width": width if width == "auto" else int(width), "lookahead": SETTINGS["lookahead"]}
        if SETTINGS["pad"] is not None:
            raw["study"]["vectorize"]["pad"] = SETTINGS["pad"]
            raw["study"]["name"] += f"-pad{SETTINGS['pad']}"
    return raw


def run(space: str, trials: int, epochs: int, width: str | None, target: float, tmp: str, round_: int = 0,
        model: str = "mlp") -> dict:
    raw = study_raw(space, trials, epochs, width, model)
    raw["study"]["name"] += f"-{round_}"
    path = os.path.join(tmp, raw["study"]["name"] + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    url = os.path.join(tmp, raw["study"]["name"] + ".journal")
    coordinator.create(load_config(path), open_storage(url))
    started = time.perf_counter()
    worker.run_worker(raw["study"]["name"], url, index=0, threads=1)
    elapsed = time.perf_counter() - started
    study = optuna.load_study(study_name=raw["study"]["name"], storage=open_storage(url))
    done = [t for t in study.get_trials() if t.state.is_finished()]
    first = min((t.datetime_start for t in done), default=None)
    reached = sorted(t.datetime_complete for t in done if t.value is not None and t.value >= target)
    widths = [t.user_attrs.get("hpo:vectorized_width", 1) for t in done]
    return {
        "seconds": elapsed,
        "per_hour": len(done) / elapsed * 3600,
        "best": study.best_value,
        "to_target": (reached[0] - first).total_seconds() if reached and first else None,
        "pruned": sum(t.state.name == "PRUNED" for t in done),
        # Trial-epochs trained per second: throughput that more or less pruning does not change.
        "epochs_per_s": sum(len(t.intermediate_values) for t in done) / elapsed,
        "group": statistics.mean(widths),
        "width": next((t.user_attrs["hpo:vectorize"]["width"] for t in done if "hpo:vectorize" in t.user_attrs), None),
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (its best value and the rest come with it)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def warm_up(model: str) -> None:
    """One short fit and one stacked step first, so neither side pays torch's first-call costs."""
    from trainers.vectorized import Slot, fit_stacked

    data, build = (digits_images(), convnet) if model == "conv" else (digits(), mlp)
    config = trainers.TrainerConfig(epochs=1, device=SETTINGS["device"], threads=1, precision=SETTINGS["precision"])
    trainers.fit(build({}, data), data, config)
    fit_stacked([build({}, data) for _ in range(2)], [Slot(i, {}) for i in range(2)], data, config)


def architectures(epochs: int = 5, repeats: int = 3, widths: tuple[int, ...] = (2, 4, 8)) -> None:
    """What stacking gains per architecture of the shipped space: each model trained alone
    against K copies stacked, ms per trial-epoch, the best of `repeats`; and K = 8 with the
    backward through autograd instead of written out (`trainers.stacked_backward`)."""
    from trainers.vectorized import Slot, StackedTrainer

    data = digits()
    config = trainers.TrainerConfig(epochs=epochs, device=SETTINGS["device"], threads=1, precision=SETTINGS["precision"],
                                    optimizer={"name": "adam", "lr": 1e-3})

    def best(run_once) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run_once()
            times.append(time.perf_counter() - started)
        return min(times) / epochs * 1e3

    def stacked(params: dict, k: int, written_out: bool) -> float:
        trainer = StackedTrainer(data, config, seed=0)
        trainer.start([mlp(params, data) for _ in range(k)], [Slot(i, {}) for i in range(k)])
        trainer.written_out = trainer.written_out and written_out

        def run_once() -> None:
            for _ in range(epochs):
                trainer.train_epoch()

        return best(run_once) / k

    print(f"digits MLP, ReLU, dropout 0.1, Adam, {epochs} epochs, best of {repeats}, {SETTINGS['device']}, 1 thread\n")
    print("| layers x width | alone, ms / epoch | " + " | ".join(f"K = {k}" for k in widths) + f" | K = {widths[-1]}, autograd backward |")
    print("|---|---:|" + "---:|" * (len(widths) + 1))
    for layers in (1, 2, 3):
        for width in (32, 64, 128, 256):
            params = {"model": {"layers": layers, "width": width, "activation": "relu", "dropout": 0.1}}
            alone = best(lambda: trainers.fit(mlp(params, data), data, config))  # noqa: B023
            ratios = [alone / stacked(params, k, True) for k in widths] + [alone / stacked(params, widths[-1], False)]
            print(f"| {layers} x {width} | {alone:.1f} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", default="8", help="population width, or auto")
    parser.add_argument("--lookahead", type=int, default=1, help="population mode's lookahead")
    parser.add_argument("--pad", type=float, nargs="+", default=[None],
                        help="population mode's pad (default: the study's default); several: each its own population run, side by side")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side; the median is shown")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="study seeds (the sampler's, and the trials' torch seeds): each its own study, so its "
                             "own set of trials; the ratio varies with them")
    parser.add_argument("--target", type=float, default=0.975, help="validation accuracy for the time-to-target column")
    parser.add_argument("--spaces", nargs="+", default=["shipped", "fixed-arch"], choices=["shipped", "fixed-arch"])
    parser.add_argument("--model", nargs="+", default=["mlp"], choices=list(MODELS),
                        help="mlp: search_spaces/digits_mlp.yaml; conv: search_spaces/digits_conv.yaml")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--ask-ahead", action="store_true",
                        help="study.ask_ahead: true on both sides (the default with Redis or a database; off on the journal file)")
    parser.add_argument("--architectures", action="store_true",
                        help="instead: per architecture of the shipped space, a model alone against K copies stacked")
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8],
                        help="with --architectures: the K to stack (the last one also through autograd)")
    args = parser.parse_args()
    SETTINGS.update(lookahead=args.lookahead, device=args.device, precision=args.precision, ask_ahead=args.ask_ahead)
    args.pad = list(dict.fromkeys(args.pad))  # the same pad twice would resume its own finished study
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.architectures:
        warm_up("mlp")
        architectures(widths=tuple(args.widths))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            warm_up(model)
            for space in args.spaces:
                for seed in args.seeds:
                    SETTINGS["seed"] = seed
                    runs: dict[object, list[dict]] = {"solo": [], **{pad: [] for pad in args.pad}}
                    for r in range(args.rounds):
                        # Alternating which side goes first, so drifting machine load hits both alike.
                        order = [("solo", None), *((pad, args.width) for pad in args.pad)][:: 1 if r % 2 == 0 else -1]
                        for mode, width in order:
                            SETTINGS["pad"] = None if mode == "solo" else mode
                            runs[mode].append(run(space, args.trials, args.epochs, width, args.target, tmp, r, model))
                    for pad in args.pad:
                        # Each round's ratio, solo and population side by side: drifts of the machine's speed
                        # that outlast a round cancel out here, not in the medians of each side apart.
                        paired = [(v["per_hour"] / s["per_hour"], v["epochs_per_s"] / s["epochs_per_s"])
                                  for s, v in zip(runs["solo"], runs[pad])]
                        variant = f", pad {pad:g}" if len(args.pad) > 1 else ""
                        label = f"{model} {space}{variant}" + (f", seed {seed}" if len(args.seeds) > 1 else "")
                        rows.append((label, median_run(runs["solo"]), median_run(runs[pad]), paired, f"{model} {space}{variant}"))
    where = "CPU, 1 thread" if args.device == "cpu" else f"{torch.cuda.get_device_name(args.device)}, {args.precision}"
    print(f"digits {'/'.join(args.model)}, {args.trials} trials x {args.epochs} epochs, {where}, "
          f"TPE seed{'s' if len(args.seeds) > 1 else ''} {', '.join(map(str, args.seeds))}, "
          f"median pruner, median of {args.rounds} rounds, lookahead {args.lookahead}, "
          f"ask_ahead {'on' if args.ask_ahead else 'off'}, pad {', '.join('default' if p is None else f'{p:g}' for p in args.pad)}\n")
    print("| model and space | mode | wall s | trials/hour | ratio | trial-epochs/s | ratio | best val_accuracy | s to reach "
          f"{args.target} | pruned | mean group |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def fmt(v):
        return "never" if v is None else f"{v:.1f}"

    for space, solo, vec, _, _ in rows:
        ratio = vec["per_hour"] / solo["per_hour"]
        epochs_ratio = vec["epochs_per_s"] / solo["epochs_per_s"]
        print(f"| {space} | solo | {solo['seconds']:.1f} | {solo['per_hour']:.0f} | 1.00 | {solo['epochs_per_s']:.0f} | 1.00 | "
              f"{solo['best']:.4f} | {fmt(solo['to_target'])} | {solo['pruned']} | 1 |")
        print(f"| {space} | population (width {vec['width']}) | {vec['seconds']:.1f} | {vec['per_hour']:.0f} | {ratio:.2f} | "
              f"{vec['epochs_per_s']:.0f} | {epochs_ratio:.2f} | {vec['best']:.4f} | {fmt(vec['to_target'])} | "
              f"{vec['pruned']} | {vec['group']:.1f} |")

    print()
    for space, _, _, paired, _ in rows:
        print(f"{space}: trials/hour ratio of each round {', '.join(f'{r:.2f}' for r, _ in paired)}; "
              f"median {statistics.median(r for r, _ in paired):.2f}")
    if len(args.seeds) > 1:
        # Each seed is another study, with other trials (another mix of models, other pruning).
        for group in dict.fromkeys(row[4] for row in rows):
            per_seed = [row[3] for row in rows if row[4] == group]
            hourly = [statistics.median(r for r, _ in paired) for paired in per_seed]
            epochs = [statistics.median(e for _, e in paired) for paired in per_seed]
            print(f"{group}, over {len(per_seed)} seeds: trials/hour ratio {', '.join(f'{r:.2f}' for r in hourly)}; "
                  f"median {statistics.median(hourly):.2f}, range {min(hourly):.2f}-{max(hourly):.2f}; "
                  f"trial-epochs/s ratio median {statistics.median(epochs):.2f}")


if __name__ == "__main__":
    main()
