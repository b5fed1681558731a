"""The loop, checkpoints, precision and population mode on a CUDA device.

CI has no GPU, so these skip there; they run wherever torch sees one (scripts/gpu_check.sh).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import ROOT, hpo
from optuna.trial import TrialState
from test_stacked_backward import X, Y, assert_same_step
from test_stacked_backward import mlp as stackable_mlp
from test_trainers_checkpoint import Crash, CrashAt, make_data, make_model
from torch import nn

import trainers
from hpo.examples.images import convnet, digits_images
from hpo.storage import open_storage
from trainers import checkpoint
from trainers.vectorized import Slot, StackedTrainer, Stopped, fit_stacked

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_run_resumed_on_cuda_continues_the_uninterrupted_curve(tmp_path: Path) -> None:
    settings = dict(epochs=6, batch_size=32, seed=7, device="cuda", optimizer="adamw",
                    scheduler={"name": "cosine", "warmup_steps": 5})
    straight_model = make_model(0)
    straight = trainers.fit(straight_model, make_data(), trainers.TrainerConfig(**settings, checkpoint_dir=str(tmp_path / "a")))
    assert next(straight_model.parameters()).device.type == "cuda"

    config = trainers.TrainerConfig(**settings, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(Crash):
        trainers.fit(make_model(0), make_data(), config, [CrashAt(3)])
    saved = checkpoint.load(tmp_path / "b" / "last.pt")
    assert saved["epoch"] == 2 and all(t.device.type == "cpu" for t in saved["model"].values())
    torch.manual_seed(123)  # the resumed process's own RNG state must not matter, the CUDA one included
    torch.cuda.manual_seed_all(123)
    resumed_model = make_model(99)
    resumed = trainers.fit(resumed_model, make_data(), config)

    assert resumed.resumed
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fp16_scaler_on_cuda_skips_the_step_with_an_inf_gradient() -> None:
    model = make_model(0)
    scales: list[float] = []

    class Watch:
        def on_batch_start(self, state: trainers.State) -> None:
            scales.append(state.scaler.get_scale())

    calls = iter(range(100))
    model[0].weight.register_hook(lambda g: g * math.inf if next(calls) == 2 else g)
    config = trainers.TrainerConfig(epochs=2, batch_size=64, device="cuda", precision="fp16-mixed", seed=0)
    state = trainers.fit(model, make_data(), config, [Watch()])
    assert scales[3] == scales[2] / 2
    assert math.isfinite(state.metrics["train_loss"])


def test_bf16_mixed_on_cuda_runs_the_forward_in_bfloat16() -> None:
    dtypes: list[torch.dtype] = []
    model = make_model(0)
    model[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    state = trainers.fit(model, make_data(), trainers.TrainerConfig(epochs=2, device="cuda", precision="bf16-mixed"))
    assert set(dtypes) == {torch.bfloat16} and math.isfinite(state.metrics["val_loss"])


def test_cuda_out_of_memory_is_reported_as_such() -> None:
    class Greedy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.empty(1 << 50, dtype=torch.uint8, device=x.device)  # a petabyte
            return self.linear(x)

    with pytest.raises(trainers.OutOfMemoryError, match=r"^out of memory on cuda(:0)? at epoch 0, optimizer step 0 \(batch_size 64"):
        trainers.fit(Greedy(), make_data(), trainers.TrainerConfig(epochs=1, device="cuda"))
    # The loop freed what it could: the next fit on the same device runs.
    trainers.fit(make_model(0), make_data(), trainers.TrainerConfig(epochs=1, device="cuda"))


def test_a_compiled_channels_last_conv_net_trains_in_bf16() -> None:
    data = digits_images()
    config = trainers.TrainerConfig(epochs=2, device="cuda", precision="bf16-mixed", compile=True, channels_last=True, seed=0)
    state = trainers.fit(convnet({}, data), data, config)
    assert state.metrics["val_accuracy"] > 0.8


def test_grouped_training_on_cuda_gives_each_trial_its_solo_curve() -> None:
    data = digits_images()
    config = trainers.TrainerConfig(epochs=3, batch_size=64, device="cuda")
    seeds = [1, 2, 3, 4]
    hparams = [{"lr": lr, "optimizer": {"name": "adam", "betas": (0.9, 0.99)}} for lr in (1e-3, 2e-3, 3e-3, 5e-3)]
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(convnet({"model": {"channels": 8}}, data))
    trainer = StackedTrainer(data, config, per_slot_data=True)
    trainer.start([copy.deepcopy(m) for m in models], [Slot(key=i, hparams=h, seed=s) for i, (h, s) in enumerate(zip(hparams, seeds))])
    for _ in range(config.epochs):
        trainer.train_epoch()
    for i, (model, seed) in enumerate(zip(models, seeds)):
        state = trainers.fit(model, data, dataclasses.replace(config, seed=seed), hparams=hparams[i])
        for solo_epoch, slot_epoch in zip(state.history, trainer.slots[i].history, strict=True):
            for name, value in solo_epoch.items():
                # Grouped and solo convolutions take different cuDNN kernels: equal up to float32
                # rounding, which may flip a prediction or two (1/450 of accuracy each).
                assert slot_epoch[name] == pytest.approx(value, rel=2e-3, abs=5e-3), (i, name)


def test_grouped_fp16_with_schedules_trains_on_cuda() -> None:
    data = digits_images()
    config = trainers.TrainerConfig(epochs=2, device="cuda", precision="fp16-mixed", scheduler={"name": "one-cycle"})
    models = [convnet({"model": {"channels": 8}}, data) for _ in range(4)]
    hparams = [{"lr": lr, "optimizer": name} for lr, name in ((1e-3, "adam"), (3e-3, "adamw"), (0.05, "sgd"), (2e-3, "adam"))]
    hparams[2]["optimizer"] = {"name": "sgd", "momentum": 0.9}  # one-cycle cycles SGD's momentum
    slots = [Slot(key=i, hparams=h) for i, h in enumerate(hparams)]
    trainer = fit_stacked(models, slots, data, config)
    assert trainer.scaler.scale.device.type == "cuda"
    assert all(s.history[-1]["val_accuracy"] > 0.5 and math.isfinite(s.history[-1]["train_loss"]) for s in slots)


def test_a_batch_norm_conv_slot_checkpointed_on_cuda_resumes_alone(tmp_path: Path) -> None:
    data = digits_images()
    config = trainers.TrainerConfig(epochs=3, device="cuda", precision="bf16-mixed")

    def conv_bn(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))

    slots = [Slot(key=i, hparams={"lr": 3e-3, "optimizer": name}, seed=i, checkpoint_dir=str(tmp_path / str(i)))
             for i, name in enumerate(("adam", "sgd"))]
    with pytest.raises(Stopped):
        fit_stacked([conv_bn(i) for i in range(2)], slots, data, config, stop=lambda: all(s.epoch == 2 for s in slots))
    for slot in slots:
        resumed = trainers.fit(conv_bn(99), data, dataclasses.replace(config, checkpoint_dir=slot.checkpoint_dir), hparams=slot.hparams)
        assert resumed.resumed and len(resumed.history) == 3 and resumed.history[:2] == slot.history
        assert math.isfinite(resumed.history[-1]["val_loss"]) and next(resumed.model.parameters()).device.type == "cuda"


@pytest.mark.e2e
def test_hpo_run_in_population_mode_on_cuda_in_bf16(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "search_spaces" / "digits_conv.yaml").read_text())
    raw["study"].update(name="conv-cuda", n_trials=12, vectorize={"width": "auto"})
    raw["trainer"].update(epochs=4, device="cuda", precision="bf16-mixed")
    path = tmp_path / "conv.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = hpo("run", str(path), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="conv-cuda", storage=open_storage(str(tmp_path / "hpo.journal")))
    trials = study.get_trials()
    assert len(trials) == 12 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert study.best_value > 0.8
    widths = {t.user_attrs["hpo:vectorize"]["width"] for t in trials}
    assert len(widths) == 1 and widths.pop() >= 2
    print("auto width on", torch.cuda.get_device_name(), json.dumps(trials[0].user_attrs["hpo:vectorize"]))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_the_written_out_step_gives_autograds_gradients_on_cuda(dtype: torch.dtype | None) -> None:
    # cuBLAS may pick other kernels for the two paths' products: equal within the precision's rounding.
    tolerance = {None: (1e-4, 1e-6), torch.bfloat16: (2e-2, 1e-3), torch.float16: (5e-3, 1e-4)}[dtype]
    torch.manual_seed(0)
    models = [stackable_mlp(nn.ReLU, dropout=0.2), stackable_mlp(nn.GELU, dropout=0.0), stackable_mlp(nn.Tanh, dropout=1.0)]
    assert_same_step(models, X, Y, device=torch.device("cuda"), dtype=dtype, smoothing=torch.tensor([0.0, 0.1, 0.2]),
                     rtol=tolerance[0], atol=tolerance[1])
