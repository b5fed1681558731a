"""Per-epoch cost of `trainers` against a hand-written loop, PyTorch Lightning and PyTorch Ignite.

Same MLP (64-128-128-10, ReLU) on scikit-learn's digits (1,347 train / 450 val), batch 64, Adam
1e-3 with torch's fused kernel in every loop (what `trainers` builds by default; `plain-unfused` is
the hand-written loop with torch.optim's default implementation), seed 0, one CPU thread. Each framework runs in its own subprocess (one process tree, the
frameworks interleaved round by round so that machine noise hits them alike); in each, after a
warm-up fit, fits of `--short` and `--long` epochs are timed `--repeat` times, alternately, and the
marginal cost per epoch is (fastest t_long - fastest t_short) / (long - short): imports, model build
and one-time setup cancel out, and so does most of the machine's noise, which only adds time.
The table gives the best round (noise from other processes only adds time) and the median of the
per-round ratios (each run against the hand-written loop's run of the same round).
Every epoch validates (loss and accuracy) and reads the metrics once.

    python scripts/bench_loop.py                    # all of them, 5 rounds
    python scripts/bench_loop.py --rounds 3 --frameworks plain trainers

`trainers` runs with ``last.pt`` written every epoch (atomic, fsync'ed), `trainers-ckpt5` every 5
epochs (``checkpoint_every: 5``), and `trainers-no-ckpt` without checkpoints, to separate the loop's
cost from the checkpoint's; Lightning with its default
checkpointing (last epoch), no progress bar or logger; Ignite with no checkpoint. Lightning and
Ignite take a DataLoader over a TensorDataset, the way their documentation feeds tensors.

On a GPU, the comparison the README reports uses a small conv net and bf16 autocast in every loop
(the data on the device for all of them):

    python scripts/bench_loop.py --device cuda --model conv --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

BATCH, LR, SEED = 64, 1e-3, 0
# Set from the command line in each worker subprocess.
DEVICE, MODEL, PRECISION = "cpu", "mlp", "32"


def digits():
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # constant pixels stay constant rather than blowing up the validation set
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32, device=DEVICE)  # noqa: E731
    return f(x_train), torch.tensor(y_train, device=DEVICE), f(x_val), torch.tensor(y_val, device=DEVICE)


def mlp():
    """The benchmark's model on `DEVICE`: the MLP, or with ``--model conv`` a small conv net on the
    8x8 images (two 3x3 convolutions, 32 and 64 channels, then a linear layer)."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    if MODEL == "conv":
        net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
    else:
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    return net.to(DEVICE)


def autocast():
    """The forward pass's precision context, as each framework is told to use."""
    import contextlib

    import torch

    if PRECISION == "32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16)


def synchronized(start: float) -> float:
    """Seconds since `start`, once the device has finished the queued work."""
    import torch

    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def adam(parameters, fused: bool = True):
    """Every loop's optimizer: torch's fused Adam, as `trainers` builds it unless told otherwise."""
    import torch

    return torch.optim.Adam(parameters, lr=LR, fused=fused or None)


def run_plain(epochs: int, data, workdir: str, fused: bool = True) -> float:
    import torch
    import torch.nn.functional as F

    x, y, xv, yv = data
    model = mlp()
    optimizer = adam(model.parameters(), fused)
    generator = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator).to(DEVICE)
        total = torch.zeros((), device=DEVICE)
        for i in range(0, len(x), BATCH):
            index = order[i : i + BATCH]
            with autocast():
                loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        model.eval()
        with torch.no_grad(), autocast():
            logits = model(xv)
            metrics = torch.stack([F.cross_entropy(logits, yv), (logits.argmax(1) == yv).float().mean(), total]).tolist()
    assert metrics
    return synchronized(start)


def run_trainers(epochs: int, data, workdir: str, checkpoint: bool = True, every: int = 1) -> float:
    import trainers

    x, y, xv, yv = data
    config = trainers.TrainerConfig(epochs=epochs, batch_size=BATCH, lr=LR, seed=SEED, device=DEVICE, precision=PRECISION,
                                    checkpoint_dir=f"{workdir}/trainers-{epochs}" if checkpoint else None,
                                    save_best=False, resume=False, checkpoint_every=every)
    model = mlp()
    start = time.perf_counter()
    trainers.fit(model, trainers.Data((x, y), (xv, yv)), config, eval_step=loss_and_accuracy)
    return synchronized(start)


def loss_and_accuracy(model, batch):
    """The same validation as the other loops: loss and accuracy (trainers' default step also
    computes top-5 accuracy and macro F1, 0.2 ms more per epoch here)."""
    import torch.nn.functional as F

    logits = model(batch[0])
    return {"loss": F.cross_entropy(logits.float(), batch[1], reduction="sum"), "accuracy": (logits.argmax(1) == batch[1]).sum()}


def run_lightning(epochs: int, data, workdir: str) -> float:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    x, y, xv, yv = data

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            logits = self.net(batch[0])
            self.log("val_loss", F.cross_entropy(logits, batch[1]))
            self.log("val_accuracy", (logits.argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return adam(self.parameters())

    L.seed_everything(SEED, verbose=False)
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=len(xv))
    accelerator = "gpu" if torch.device(DEVICE).type == "cuda" else "cpu"
    trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, precision=PRECISION, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=f"{workdir}/lightning-{epochs}")
    module = Module()
    start = time.perf_counter()
    trainer.fit(module, train, val)
    return synchronized(start)


def run_ignite(epochs: int, data, workdir: str) -> float:
    import torch
    import torch.nn.functional as F
    from ignite.engine import Events, create_supervised_evaluator, create_supervised_trainer
    from ignite.metrics import Accuracy, Loss
    from torch.utils.data import DataLoader, TensorDataset

    x, y, xv, yv = data
    torch.manual_seed(SEED)
    model = mlp()
    optimizer = adam(model.parameters())
    # Ignite's documented hook for a custom forward: the same autocast as the other loops.
    def forward(model, x):
        with autocast():
            return model(x).float()

    trainer = create_supervised_trainer(model, optimizer, F.cross_entropy, model_fn=forward)
    evaluator = create_supervised_evaluator(model, metrics={"accuracy": Accuracy(), "loss": Loss(F.cross_entropy)},
                                            model_fn=forward)
    val = DataLoader(TensorDataset(xv, yv), batch_size=len(xv))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run(val))
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    start = time.perf_counter()
    trainer.run(train, max_epochs=epochs)
    return synchronized(start)


def run_trainers_ckpt5(epochs: int, data, workdir: str) -> float:
    return run_trainers(epochs, data, workdir, every=5)


def run_trainers_no_checkpoint(epochs: int, data, workdir: str) -> float:
    return run_trainers(epochs, data, workdir, checkpoint=False)


def run_plain_unfused(epochs: int, data, workdir: str) -> float:
    return run_plain(epochs, data, workdir, fused=False)


RUNNERS = {"plain": run_plain, "plain-unfused": run_plain_unfused, "trainers": run_trainers, "trainers-ckpt5": run_trainers_ckpt5,
           "trainers-no-ckpt": run_trainers_no_checkpoint, "lightning": run_lightning, "ignite": run_ignite}


def worker(framework: str, short: int, long: int, repeat: int, device: str, model: str, precision: str) -> None:
    """One subprocess: warm up, then time `repeat` short and long fits, alternately; prints the
    marginal cost per epoch from the fastest of each (noise only ever adds time) as JSON."""
    import logging
    import warnings

    import torch

    global DEVICE, MODEL, PRECISION
    DEVICE, MODEL, PRECISION = device, model, precision

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = digits()
    with tempfile.TemporaryDirectory() as workdir:
        run = RUNNERS[framework]
        run(1, data, workdir + "/warm")
        shorts, longs = [], []
        for i in range(repeat):
            shorts.append(run(short, data, f"{workdir}/{i}"))
            longs.append(run(long, data, f"{workdir}/{i}"))
    print(json.dumps({"framework": framework, "per_epoch": (min(longs) - min(shorts)) / (long - short)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=35)
    parser.add_argument("--repeat", type=int, default=3, help="short and long fits per run (the fastest of each counts)")
    parser.add_argument("--frameworks", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--model", default="mlp", choices=["mlp", "conv"])
    # No fp16 here: it needs a gradient scaler, which each loop would set up its own way.
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--worker", choices=list(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    setting = ["--device", args.device, "--model", args.model, "--precision", args.precision]
    if args.worker:
        worker(args.worker, args.short, args.long, args.repeat, args.device, args.model, args.precision)
        return
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    import os

    results: dict[str, list[float]] = {name: [] for name in args.frameworks}
    for round_ in range(args.rounds):
        for name in args.frameworks:
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--short", str(args.short),
                                  "--long", str(args.long), "--repeat", str(args.repeat), *setting],
                                 capture_output=True, text=True,
                                 env={**os.environ, **env}, check=False)
            if out.returncode != 0:
                print(f"{name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                results.pop(name, None)
                continue
            if name in results:
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1])["per_epoch"])
                # As it comes, so that a run cut short still leaves its figures.
                print(f"  {name}: {results[name][-1] * 1e3:.2f} ms/epoch", file=sys.stderr, flush=True)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    import torch

    versions = {"torch": torch.__version__}
    for module, name in (("lightning", "lightning"), ("ignite", "pytorch-ignite")):
        try:
            versions[name] = __import__(module).__version__
        except ImportError:
            pass
    print(f"\nper-epoch cost, {args.rounds} rounds, epochs {args.short}->{args.long}, {args.model} on {args.device}, "
          f"precision {args.precision}, 1 CPU thread "
          f"({', '.join(f'{k} {v}' for k, v in versions.items())})\n")
    # Noise from other processes only ever adds time, so the fastest round is the cleanest estimate;
    # the median ratio pairs each round with the hand-written loop's run of the same round, so that
    # a slow spell of the machine, which lasts longer than one run, cancels out.
    base = results.get("plain")
    print("| loop | ms / epoch (best round) | x hand-written (best) | ms / epoch (median) | x hand-written (median of rounds) |")
    print("|---|---:|---:|---:|---:|")
    for name, times in results.items():
        best, median = min(times), statistics.median(times)
        ratio_best = f"{best / min(base):.2f}x" if base else "-"
        ratio_median = f"{statistics.median(t / b for t, b in zip(times, base)):.2f}x" if base else "-"
        print(f"| {name} | {best * 1e3:.2f} | {ratio_best} | {median * 1e3:.2f} | {ratio_median} |")


if __name__ == "__main__":
    main()
