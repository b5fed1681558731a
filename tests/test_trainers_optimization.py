"""Precision, gradient accumulation, clipping and learning-rate schedules."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainers
from trainers.precision import autocast_for


def make_data(n: int = 256, n_val: int = 64, features: int = 8, classes: int = 3) -> trainers.Data:
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(n, features, generator=g), torch.randn(n_val, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    return trainers.Data((x, (x @ w).argmax(1)), (xv, (xv @ w).argmax(1)))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


class LrRecorder:
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_batch_start(self, state: trainers.State) -> None:
        self.lrs.append(state.lr)


def test_accumulating_four_batches_of_16_equals_one_batch_of_64() -> None:
    data = make_data()
    big, small = make_model(), make_model()
    base = dict(epochs=2, seed=1, optimizer="sgd", lr=0.1, device="cpu")
    trainers.fit(big, data, trainers.TrainerConfig(batch_size=64, **base))
    state = trainers.fit(small, data, trainers.TrainerConfig(batch_size=16, accumulate_grad_batches=4, **base))
    assert state.global_step == 2 * 256 // 64
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_by_norm_limits_the_update() -> None:
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    config = trainers.TrainerConfig(epochs=1, batch_size=256, optimizer="sgd", lr=1.0, device="cpu",
                                    gradient_clip_val=1e-3, shuffle=False)
    trainers.fit(model, make_data(), config)
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert delta.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_gradient_clipping_by_value_limits_each_element() -> None:
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    config = trainers.TrainerConfig(epochs=1, batch_size=256, optimizer="sgd", lr=1.0, device="cpu",
                                    gradient_clip_val=1e-4, gradient_clip_algorithm="value", shuffle=False)
    trainers.fit(model, make_data(), config)
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert delta.abs().max().item() == pytest.approx(1e-4, rel=1e-4)


def test_fp16_scaler_skips_the_step_with_an_inf_gradient_and_halves_its_scale() -> None:
    model = make_model()
    snapshots: list[list[torch.Tensor]] = []
    scales: list[float] = []

    class Watch:
        def on_batch_start(self, state: trainers.State) -> None:
            snapshots.append([p.detach().clone() for p in model.parameters()])
            scales.append(state.scaler.get_scale())

    # An inf gradient at the third step only; the loss itself stays finite, as in a real overflow.
    calls = iter(range(100))
    model[0].weight.register_hook(lambda g: g * math.inf if next(calls) == 2 else g)
    config = trainers.TrainerConfig(epochs=1, batch_size=64, device="cpu", precision="fp16-mixed", seed=0)
    state = trainers.fit(model, make_data(), config, [Watch()])
    snapshots.append([p.detach().clone() for p in model.parameters()])
    scales.append(state.scaler.get_scale())
    changed = [any(not torch.equal(a, b) for a, b in zip(snapshots[i], snapshots[i + 1])) for i in range(4)]
    assert changed == [True, True, False, True]
    assert scales[3] == scales[2] / 2
    assert math.isfinite(state.metrics["train_loss"])


def test_bf16_mixed_runs_the_forward_in_bfloat16_on_cpu() -> None:
    dtypes: list[torch.dtype] = []
    model = make_model()
    model[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    config = trainers.TrainerConfig(epochs=1, batch_size=128, device="cpu", precision="bf16-mixed")
    state = trainers.fit(model, make_data(), config)
    assert set(dtypes) == {torch.bfloat16}
    assert math.isfinite(state.metrics["val_loss"])


def test_precision_on_an_unsupported_device_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="precision bf16-mixed is supported on cpu and cuda"):
        autocast_for("bf16-mixed", torch.device("meta"))
    with pytest.raises(ValueError, match="^precision must be one of"):
        trainers.TrainerConfig(precision="16")


def test_cosine_schedule_with_warmup_gives_the_closed_form_lr_at_every_step() -> None:
    recorder = LrRecorder()
    config = trainers.TrainerConfig(epochs=2, batch_size=32, lr=0.1, device="cpu",
                                    scheduler={"name": "cosine", "warmup_steps": 4, "min_lr": 0.01})
    trainers.fit(make_model(), make_data(), config, [recorder])
    total, warmup = 16, 4
    expected = [
        0.1 * (s + 1) / warmup if s < warmup
        else 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        for s in range(total)
    ]
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)


def test_step_schedule_decays_at_epoch_boundaries_counted_in_optimizer_steps() -> None:
    recorder = LrRecorder()
    config = trainers.TrainerConfig(epochs=4, batch_size=32, lr=1.0, device="cpu", accumulate_grad_batches=2,
                                    scheduler={"name": "step", "step_size": 2, "gamma": 0.5})
    trainers.fit(make_model(), make_data(), config, [recorder])
    # 8 micro-batches = 4 optimizer steps per epoch; the lr is read before each micro-batch.
    assert recorder.lrs == [1.0] * 16 + [0.5] * 16


def test_one_cycle_matches_torch_onecycle_per_step() -> None:
    recorder = LrRecorder()
    config = trainers.TrainerConfig(epochs=2, batch_size=64, lr=0.05, device="cpu", optimizer="sgd",
                                    scheduler={"name": "one-cycle", "pct_start": 0.25})
    trainers.fit(make_model(), make_data(), config, [recorder])
    reference = torch.optim.SGD(make_model().parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.05, total_steps=8, pct_start=0.25)
    expected = []
    for _ in range(8):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)


def test_plateau_reduces_lr_when_the_monitored_metric_stalls() -> None:
    lrs: list[float] = []

    class EpochLr:
        def on_epoch_start(self, state: trainers.State) -> None:
            lrs.append(state.lr)

    def flat_eval(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return {"loss": torch.tensor(float(len(batch[0])))}

    config = trainers.TrainerConfig(epochs=4, batch_size=128, lr=1.0, device="cpu",
                                    scheduler={"name": "plateau", "patience": 1, "factor": 0.5})
    trainers.fit(make_model(), make_data(), config, [EpochLr()], eval_step=flat_eval)
    assert lrs == [1.0, 1.0, 1.0, 0.5]


def test_trial_scheduler_hyperparameters_override_the_config() -> None:
    recorder = LrRecorder()
    config = trainers.TrainerConfig(epochs=1, batch_size=64, lr=1.0, device="cpu",
                                    scheduler={"name": "warmup", "warmup_steps": 2})
    trainers.fit(make_model(), make_data(), config, [recorder], hparams={"scheduler": {"warmup_steps": 4}})
    assert recorder.lrs == [0.25, 0.5, 0.75, 1.0]


def test_unknown_scheduler_option_names_the_setting() -> None:
    with pytest.raises(ValueError, match="^scheduler cosine has no option gamma"):
        trainers.TrainerConfig(scheduler={"name": "cosine", "gamma": 0.1})


def test_label_smoothing_smooths_the_training_loss_only() -> None:
    def smoothed(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], label_smoothing=0.2)

    config = trainers.TrainerConfig(epochs=2, batch_size=32, device="cpu", seed=0)
    by_hand = trainers.fit(make_model(), make_data(), config, train_step=smoothed)
    by_config = trainers.fit(make_model(), make_data(), dataclasses.replace(config, label_smoothing=0.2))
    by_trial = trainers.fit(make_model(), make_data(), config, hparams={"label_smoothing": 0.2})
    plain = trainers.fit(make_model(), make_data(), config)
    assert by_config.history == by_hand.history == by_trial.history
    assert by_config.history[0]["train_loss"] != plain.history[0]["train_loss"]
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="label_smoothing must be at least 0 and below 1"):
            trainers.TrainerConfig(label_smoothing=bad)


def test_a_trial_s_gradient_clip_value_overrides_the_config_s() -> None:
    config = trainers.TrainerConfig(epochs=1, batch_size=32, device="cpu", seed=0, gradient_clip_val=1.0)
    by_trial = trainers.fit(make_model(), make_data(), config, hparams={"gradient_clip_val": 0.01})
    by_config = trainers.fit(make_model(), make_data(), dataclasses.replace(config, gradient_clip_val=0.01))
    loose = trainers.fit(make_model(), make_data(), config)
    assert by_trial.history == by_config.history != loose.history
    with pytest.raises(ValueError, match="gradient_clip_val must be positive"):
        trainers.fit(make_model(), make_data(), config, hparams={"gradient_clip_val": 0})


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adagrad", "rmsprop"])
def test_an_optimizer_with_a_fused_kernel_uses_it_unless_the_spec_chooses(name: str) -> None:
    params = list(make_model().parameters())
    chosen = trainers.build_optimizer(params, {"name": name}).param_groups[0]
    assert chosen.get("fused") is (True if name != "rmsprop" else None)  # RMSprop has no fused kernel
    as_asked = trainers.build_optimizer(params, {"name": name, "foreach": True}).param_groups[0]
    assert as_asked["foreach"] is True and not as_asked.get("fused")
    groups = trainers.build_optimizer([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], {"name": name})
    assert all(g.get("fused") is chosen.get("fused") for g in groups.param_groups)
    named = trainers.build_optimizer(list(make_model().named_parameters()), {"name": name})  # as torch takes them too
    assert named.param_groups[0].get("fused") is chosen.get("fused")
    a_group_chooses = trainers.build_optimizer([{"params": params[:2]}, {"params": params[2:], "foreach": True}], {"name": name})
    assert not any(g.get("fused") for g in a_group_chooses.param_groups)
    # A parameter on a device the kernel does not run on: torch's default, where torch itself
    # would accept fused=True and fail only at the first step.
    meta = [torch.zeros(3, device="meta", requires_grad=True)]
    assert not trainers.build_optimizer(meta, {"name": name}).param_groups[0].get("fused")


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adagrad"])
def test_a_fused_run_follows_the_unfused_run_within_float_rounding(name: str) -> None:
    config = trainers.TrainerConfig(epochs=3, batch_size=32, seed=0, device="cpu", lr=0.01)
    runs = [trainers.fit(make_model(), make_data(), config, hparams={"optimizer": {"name": name, **extra}})
            for extra in ({}, {"fused": False})]
    assert runs[0].optimizer.param_groups[0]["fused"] and not runs[1].optimizer.param_groups[0]["fused"]
    for a, b in zip(runs[0].history, runs[1].history):
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6) for k in a)


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_a_model_with_sparse_gradients_trains_on_torch_s_default_implementation(name: str) -> None:
    # The fused kernels refuse sparse gradients (an embedding with sparse=True) at the first step.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 8, (96,), generator=g)
    data = trainers.Data((x, x % 3), (x[:32], x[:32] % 3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8, 4, sparse=True), nn.Linear(4, 3))
    state = trainers.fit(model, data, trainers.TrainerConfig(epochs=2, batch_size=32, device="cpu", optimizer=name, lr=0.1))
    assert not state.optimizer.param_groups[0].get("fused") and len(state.history) == 2


def test_a_torch_without_the_fused_kernel_gets_its_default_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    class OlderAdagrad(torch.optim.Adagrad):  # as torch 2.4's Adagrad, without `fused`
        def __init__(self, params, lr: float = 0.01, **options) -> None:
            if "fused" in options:
                raise TypeError("__init__() got an unexpected keyword argument 'fused'")
            super().__init__(params, lr=lr, **options)

    from trainers import optim

    monkeypatch.setitem(optim.OPTIMIZERS, "adagrad", OlderAdagrad)
    built = trainers.build_optimizer(make_model().parameters(), {"name": "adagrad", "lr": 0.1})
    assert isinstance(built, OlderAdagrad) and not built.param_groups[0].get("fused")
    with pytest.raises(ValueError, match="optimizer adagrad: .*momentum"):
        trainers.build_optimizer(make_model().parameters(), {"name": "adagrad", "momentum": 0.9})
