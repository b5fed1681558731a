"""Vectorized trials: K models trained as one stacked model give the curves they give alone;
population mode asks, groups, prunes, refills and tells real Optuna trials."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import subprocess
import sys
import types
from typing import Any

import optuna
import pytest
import torch
import yaml
from conftest import DIGITS_YAML, hpo, study_file
from optuna.trial import TrialState
from torch import nn

import trainers
from hpo import coordinator, worker
from hpo.config import ConfigError, Vectorize, config_from_dict, load_config
from hpo.population import Member, Population
from hpo.storage import open_storage
from trainers import checkpoint as checkpoint_mod
from trainers.stacked_optim import keeps_padding
from trainers.vectorized import (
    NotVectorizable,
    Slot,
    StackedModel,
    StackedOptimizer,
    StackedTrainer,
    Stopped,
    architecture,
    check_hparams,
    fit_stacked,
    signature,
)

torch.set_num_threads(1)


def toy_data(n: int = 384, features: int = 12, classes: int = 4, seed: int = 0) -> trainers.Data:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w).argmax(1)
    split = n * 3 // 4
    return trainers.Data((x[:split], y[:split]), (x[split:], y[split:]))


def mlp(seed: int, width: int = 16, act: type[nn.Module] = nn.ReLU, dropout: float = 0.0, features: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, width), act(), nn.Dropout(dropout), nn.Linear(width, width), act(), nn.Linear(width, 4))


class Residual(nn.Module):
    """Not a Sequential: runs through vmap, not the batched-matmul path."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.hidden, self.out = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(h + torch.tanh(self.hidden(h)))


HPARAMS = [
    {"lr": 0.01, "weight_decay": 1e-3, "optimizer": {"name": "adam", "beta1": 0.85}},
    {"lr": 0.05, "weight_decay": 1e-4, "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True}},
    {"lr": 0.003, "weight_decay": 0.05, "optimizer": {"name": "adamw", "beta2": 0.99}},
    {"lr": 0.1, "optimizer": {"name": "sgd", "momentum": 0.5, "nesterov": False}},
    {"lr": 0.2, "weight_decay": 1e-2, "optimizer": "sgd"},
    {"lr": 0.01, "weight_decay": 1e-3, "optimizer": {"name": "rmsprop", "alpha": 0.9, "momentum": 0.5}},
    {"lr": 0.05, "optimizer": {"name": "adagrad", "lr_decay": 0.01, "initial_accumulator_value": 0.1}},
]


# --- per-slot optimizers ------------------------------------------------------------------------


@pytest.mark.parametrize("specs", [
    [{"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
     {"name": "sgd", "lr": 0.05, "momentum": 0.0},
     {"name": "sgd", "lr": 0.02, "momentum": 0.7, "nesterov": False, "weight_decay": 0.1}],
    [{"name": "adam", "lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 1e-2},
     {"name": "adam", "lr": 3e-3, "eps": 1e-6}],
    [{"name": "adamw", "lr": 1e-2, "weight_decay": 0.1}, {"name": "adamw", "lr": 2e-3, "beta1": 0.95}],
    [{"name": "rmsprop", "lr": 1e-2, "alpha": 0.9, "momentum": 0.8, "weight_decay": 1e-2}, {"name": "rmsprop", "lr": 3e-3}],
    [{"name": "adagrad", "lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}, {"name": "adagrad", "lr": 0.05, "weight_decay": 0.1}],
    [{"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.3},
     {"name": "sgd", "lr": 0.05, "momentum": 0.5, "dampening": 0.1, "weight_decay": 1e-3}, {"name": "sgd", "lr": 0.1, "momentum": 0.9}],
    [{"name": "adam", "lr": 1e-2, "amsgrad": True}, {"name": "adamw", "lr": 5e-3, "amsgrad": True, "weight_decay": 0.1},
     {"name": "adam", "lr": 1e-2}],
    [{"name": "rmsprop", "lr": 1e-2, "centered": True, "momentum": 0.8}, {"name": "rmsprop", "lr": 3e-3, "centered": True},
     {"name": "rmsprop", "lr": 3e-3}],
    # One group mixing every kind: each slot follows its own rule.
    [{"name": "adam", "lr": 1e-2}, {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
     {"name": "adamw", "lr": 5e-3, "weight_decay": 0.3}, {"name": "sgd", "lr": 0.3},
     {"name": "rmsprop", "lr": 1e-3, "momentum": 0.5}, {"name": "adagrad", "lr": 0.02}],
], ids=["sgd", "adam", "adamw", "rmsprop", "adagrad", "sgd-dampening", "amsgrad", "centered-rmsprop", "mixed"])
def test_stacked_optimizer_follows_torch_optim_step_for_step(specs: list[dict]) -> None:
    k = len(specs)
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(k, 5, 3, generator=g), torch.randn(k, 3, generator=g)]
    grads = [[torch.randn(k, 5, 3, generator=g), torch.randn(k, 3, generator=g)] for _ in range(25)]
    stacked = [t.clone().requires_grad_(True) for t in init]
    opt = StackedOptimizer(stacked, specs)
    solo = [[t[i].clone().requires_grad_(True) for t in init] for i in range(k)]
    solo_opts = [trainers.build_optimizer(solo[i], specs[i]) for i in range(k)]
    for step in grads:
        for p, gr in zip(stacked, step):
            p.grad = gr.clone()
        opt.step()
        for i in range(k):
            for p, gr in zip(solo[i], step):
                p.grad = gr[i].clone()
            solo_opts[i].step()
    for i in range(k):
        for p_stacked, p_solo in zip(stacked, solo[i]):
            torch.testing.assert_close(p_stacked[i].detach(), p_solo.detach(), rtol=1e-5, atol=1e-6)


def test_a_refill_with_amsgrad_gets_its_state_made_and_follows_torch_optim() -> None:
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(2, 5, 3, generator=g), torch.randn(2, 3, generator=g)]
    stacked = [t.clone().requires_grad_(True) for t in init]
    opt = StackedOptimizer(stacked, [{"name": "adam", "lr": 1e-2}, {"name": "sgd", "lr": 0.1}])
    assert opt.aux is None  # no slot needs the third copy yet
    spec = {"name": "adam", "lr": 1e-2, "amsgrad": True}
    opt.reset_slot(1, spec)
    solo = [t[1].clone().requires_grad_(True) for t in init]
    alone = trainers.build_optimizer(solo, spec)
    for _ in range(10):
        grads = [torch.randn(2, 5, 3, generator=g), torch.randn(2, 3, generator=g)]
        for p, gr in zip(stacked, grads):
            p.grad = gr.clone()
        opt.step()
        for p, gr in zip(solo, grads):
            p.grad = gr[1].clone()
        alone.step()
    for p_stacked, p_solo in zip(stacked, solo):
        torch.testing.assert_close(p_stacked[1].detach(), p_solo.detach(), rtol=1e-5, atol=1e-6)


def test_hparams_the_stacked_loop_cannot_take_are_named() -> None:
    config = trainers.TrainerConfig()
    with pytest.raises(NotVectorizable, match="optimizer lbfgs"):
        check_hparams({"optimizer": "lbfgs"}, config)
    with pytest.raises(NotVectorizable, match="option maximize is not stacked"):
        check_hparams({"optimizer": {"name": "adam", "maximize": True}}, config)
    # What `fit` itself rejects fails that trial alone (it runs solo), never its group.
    with pytest.raises(NotVectorizable, match="Nesterov momentum requires a momentum"):
        check_hparams({"optimizer": {"name": "sgd", "nesterov": True}}, config)
    with pytest.raises(NotVectorizable, match="momentum"):
        check_hparams({"optimizer": "adagrad", "scheduler": "one-cycle"}, config)
    for stacked in ({"name": "adam", "amsgrad": True}, {"name": "rmsprop", "centered": True}, {"name": "sgd", "momentum": 0.9, "dampening": 0.5}):
        assert check_hparams({"optimizer": stacked}, config)["name"] == stacked["name"]
    assert check_hparams({"lr": 0.1, "optimizer": {"name": "sgd", "momentum": 0.9}}, config)["lr"] == 0.1


# --- grouped training equals solo training ------------------------------------------------------


def solo_run(model: nn.Module, data: trainers.Data, config: trainers.TrainerConfig, hparams: dict) -> trainers.State:
    return trainers.fit(model, data, config, hparams=hparams)


def grouped_run(models: list[nn.Module], hparams: list[dict], seeds: list[int], data: trainers.Data,
                config: trainers.TrainerConfig) -> StackedTrainer:
    """The models trained as one group, each slot drawing its batch order from its seed as `fit` does."""
    trainer = StackedTrainer(data, config, per_slot_data=True)
    trainer.start([copy.deepcopy(m) for m in models], [Slot(key=i, hparams=h, seed=s) for i, (h, s) in enumerate(zip(hparams, seeds))])
    for _ in range(config.epochs):
        trainer.train_epoch()
    return trainer


def assert_as_alone(slot: Slot, weights: dict[str, torch.Tensor] | None, alone: trainers.State, rel: float = 1e-4,
                    abs: float = 1e-5) -> None:
    """The slot's curve (and weights, when given) are the solo run's, within float tolerance."""
    for solo_epoch, slot_epoch in zip(alone.history, slot.history, strict=True):
        for name, value in solo_epoch.items():
            assert slot_epoch[name] == pytest.approx(value, rel=rel, abs=abs), (slot.key, name)
    for name, value in (alone.model.state_dict().items() if weights is not None else ()):
        torch.testing.assert_close(weights[name], value, rtol=rel, atol=abs)


@pytest.mark.parametrize("make", [mlp, Residual], ids=["batched-matmul", "vmap"])
def test_grouped_training_gives_each_trial_its_solo_curve_and_weights(make) -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=4, batch_size=32, device="cpu")
    seeds = [11, 12, 13, 14, 15]
    # The batched path also stacks MLPs whose activations differ.
    acts = [nn.ReLU, nn.GELU, nn.Tanh, nn.ReLU, nn.SiLU]
    models = [make(s, act=acts[i]) if make is mlp else make(s) for i, s in enumerate(seeds)]
    trainer = grouped_run(models, HPARAMS, seeds, data, config)
    assert (trainer.model.plan is not None) == (make is mlp)
    for i, (model, seed) in enumerate(zip(models, seeds)):
        # Solo with the same seed: same initial weights, same data order (per-slot data).
        state = solo_run(model, data, dataclasses.replace(config, seed=seed), HPARAMS[i])
        assert_as_alone(trainer.slots[i], trainer.model.slot_state_dict(i), state)


def test_mlps_of_other_hidden_widths_train_padded_in_one_group_each_with_its_solo_curve_and_weights() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=4, batch_size=32, device="cpu", gradient_clip_val=1.0)
    seeds = [51, 52, 53, 54, 55, 56, 57]
    widths = [16, 8, 12, 4, 16, 6, 10]
    # Every optimizer kind (weight decay included) and every activation that maps 0 to 0.
    acts = [nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.ReLU, nn.ELU, nn.LeakyReLU]
    models = [mlp(s, width=w, act=a) for s, w, a in zip(seeds, widths, acts)]
    trainer = grouped_run(models, HPARAMS, seeds, data, config)
    stacked = trainer.model
    assert stacked.params["3.weight"].shape == (7, 16, 16) and stacked.slot_shapes[0] is None
    assert stacked.slot_shapes[1]["3.weight"] == (8, 8)
    for i, (model, seed) in enumerate(zip(models, seeds)):
        state = solo_run(model, data, dataclasses.replace(config, seed=seed), HPARAMS[i])
        assert_as_alone(trainer.slots[i], stacked.slot_state_dict(i), state)
        # The padding is still exactly zero after every update.
        w = widths[i]
        for name in ("0.weight", "0.bias", "3.bias"):
            assert not stacked.params[name][i][w:].any()
        assert not stacked.params["3.weight"][i][w:].any() and not stacked.params["3.weight"][i][:, w:].any()
        assert not stacked.params["5.weight"][i][:, w:].any()


def test_widths_that_differ_layer_by_layer_pad_to_each_layer_s_widest_with_each_trial_s_solo_curve() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=3, batch_size=32, device="cpu")

    def model(seed: int, first: int, second: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, first), nn.GELU(), nn.Linear(first, second), nn.Tanh(), nn.Linear(second, 4))

    models = [model(71, 16, 6), model(72, 6, 16), model(73, 10, 10)]
    seeds, hparams = [71, 72, 73], [HPARAMS[0], HPARAMS[5], HPARAMS[6]]  # Adam, RMSprop, Adagrad
    trainer = grouped_run(models, hparams, seeds, data, config)
    assert trainer.model.params["2.weight"].shape == (3, 16, 16)
    for i, (m, seed) in enumerate(zip(models, seeds)):
        state = solo_run(m, data, dataclasses.replace(config, seed=seed), hparams[i])
        assert_as_alone(trainer.slots[i], trainer.model.slot_state_dict(i), state)


def test_an_optimizer_with_eps_0_does_not_train_padded() -> None:
    # Its padding's update would be 0/0: NaN, which the next layer's zero weights pass on.
    assert not keeps_padding({"name": "adam", "eps": 0.0}) and not keeps_padding({"name": "rmsprop", "eps": 0})
    assert not keeps_padding({"name": "adagrad", "eps": 0}) and keeps_padding({"name": "adagrad", "eps": 0, "initial_accumulator_value": 0.1})
    assert keeps_padding({"name": "sgd", "momentum": 0.9}) and keeps_padding({"name": "adamw"})
    trainer = StackedTrainer(toy_data(), trainers.TrainerConfig(epochs=1, batch_size=32, device="cpu"))
    eps0 = {"lr": 0.01, "optimizer": {"name": "adam", "eps": 0.0}}
    with pytest.raises(NotVectorizable, match="eps 0"):
        trainer.start([mlp(0, width=16, act=nn.Tanh), mlp(1, width=8, act=nn.Tanh)], [Slot(0, HPARAMS[0]), Slot(1, eps0)])
    trainer.start([mlp(0, width=16, act=nn.Tanh), mlp(1, width=8, act=nn.Tanh)], [Slot(0, eps0), Slot(1, HPARAMS[0])])  # at the group's shapes: no padding
    # A refill refused leaves the group as it was. (Tanh: no unit of the eps-0 slot is dead, whose
    # exact-zero gradient would be 0/0 alone too.)
    before = {k: v.clone() for k, v in trainer.model.params.items()}
    with pytest.raises(NotVectorizable, match="eps 0"):
        trainer.replace(0, mlp(2, width=4, act=nn.Tanh), Slot(2, eps0))
    assert trainer.slots[0].key == 0 and all(torch.equal(before[k], v) for k, v in trainer.model.params.items())
    trainer.train_epoch()
    assert all(torch.isfinite(v).all() for v in trainer.model.params.values())


def member(number: int, model: nn.Module) -> Member:
    return Member(trial=types.SimpleNamespace(number=number), params={}, seed=number, model=model, arch=architecture(model))


def test_the_next_group_is_the_largest_set_that_stacks_cut_to_k_and_a_refill_is_the_least_padded() -> None:
    def population(pool: list[Member], width: int, pad: float = 1.0) -> Population:
        p = Population.__new__(Population)  # only the pool and the settings: no study, no worker
        p.pool, p.width, p.vectorize = list(pool), width, Vectorize(width=width, pad=pad)
        return p

    pool = [member(0, mlp(0, width=8)), member(1, mlp(1, width=8)), *(member(n, mlp(n, width=16)) for n in (2, 3, 4))]
    # Equal shapes only: the three of width 16 are the largest set, though trial 0 is older; cut to K = 2.
    assert [m.trial.number for m in population(pool, 2)._next_group()] == [2, 3]
    # This width-8 MLP (two hidden layers) is 2.58 times smaller than the width-16 one: within pad 2.6, all five stack.
    assert [m.trial.number for m in population(pool, 8, pad=2.6)._next_group()] == [0, 1, 2, 3, 4]
    assert [m.trial.number for m in population(pool, 8, pad=2.5)._next_group()] == [2, 3, 4]
    # Where more trials wait than fit (lookahead > 1), K of one width beat K that need padding.
    waiting = [pool[0], pool[2], pool[1], member(5, mlp(5, width=8))]
    assert [m.trial.number for m in population(waiting, 3, pad=2.6)._next_group()] == [0, 1, 5]
    # A refill takes the waiting trial padded least: the group's own shapes before a narrower one.
    p = population([pool[0], pool[4]], 8, pad=2.6)
    p.group_arch = pool[2].arch
    assert p._fitting(p.pool) is pool[4]
    p.group_arch = pool[0].arch
    assert p._fitting([pool[4]]) is None and p._fitting(p.pool) is pool[0]


def test_what_padding_can_stack_and_what_it_cannot() -> None:
    narrow, wide = architecture(mlp(0, width=8)), architecture(mlp(0, width=16))
    assert narrow.fits(wide) and not wide.fits(narrow) and narrow.size < wide.size
    # Hidden widths may differ layer by layer: the group takes each layer's widest.
    a = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    group = StackedModel([a, b], torch.device("cpu"))
    assert group.params["2.weight"].shape == (2, 16, 16)
    assert {k: tuple(v.shape) for k, v in group.slot_state_dict(1).items()} == {k: tuple(v.shape) for k, v in b.state_dict().items()}
    # Sigmoid(0) = 0.5: a padded unit would feed the next layer. At the group's full width it stacks.
    sigmoid = mlp(1, width=8, act=nn.Sigmoid)
    assert not architecture(sigmoid).fits(wide)
    with pytest.raises(NotVectorizable, match="another architecture"):
        StackedModel([mlp(0, width=16), sigmoid], torch.device("cpu"))
    StackedModel([mlp(1, width=16, act=nn.Sigmoid), mlp(0, width=8)], torch.device("cpu"))
    # Another layer count, other inputs or outputs, or a model off the batched path: no.
    assert not architecture(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))).fits(wide)
    assert not architecture(mlp(0, width=8, features=10)).fits(wide)
    out8 = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    assert not architecture(mlp(0, width=16)).fits(architecture(out8))
    norm = [nn.Sequential(nn.Linear(12, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Linear(w, 4)) for w in (8, 16)]
    assert not architecture(norm[0]).fits(architecture(norm[1]))


def test_a_padded_slot_is_refilled_with_a_wider_model_and_a_full_one_with_a_narrower() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=3, batch_size=32, device="cpu")
    slots = [Slot("a", HPARAMS[0], 61, callbacks=[StopAt(0)]), Slot("b", HPARAMS[1], 62, callbacks=[StopAt(0)])]
    fresh = {"a": ("c", 8, 63, HPARAMS[2]), "b": ("d", 16, 64, HPARAMS[0])}
    ended: list[Slot] = []

    def refill(slot: Slot):
        if slot.key not in fresh:
            return None
        key, width, seed, hparams = fresh[slot.key]
        return mlp(seed, width=width), Slot(key=key, hparams=hparams, seed=seed)

    fit_stacked([mlp(61, width=16), mlp(62, width=4)], slots, data, config, per_slot_data=True, refill=refill,
                on_slot_end=ended.append)
    by_key = {s.key: s for s in ended}
    for key, width, seed, hparams in fresh.values():
        state = solo_run(mlp(seed, width=width), data, dataclasses.replace(config, seed=seed), hparams)
        assert_as_alone(by_key[key], None, state)


def test_each_slot_follows_its_own_learning_rate_schedule_as_fit_does() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=4, batch_size=32, device="cpu", scheduler={"name": "cosine", "warmup_steps": 5})
    # One-cycle also cycles Adam's beta1 (slot 0) and SGD's momentum (slot 1); plateau steps on the
    # slot's own validation loss; the last slot takes the config's cosine with warm-up.
    schedules = [{"name": "one-cycle"}, {"name": "one-cycle", "pct_start": 0.5},
                 {"name": "plateau", "patience": 0, "factor": 0.5, "threshold": 0.5}, {"name": "step", "step_size": 1, "gamma": 0.5}, None]
    hparams = [{**HPARAMS[i], **({"scheduler": spec} if spec else {})} for i, spec in enumerate(schedules)]
    seeds = [31, 32, 33, 34, 35]
    models = [mlp(s) for s in seeds]
    slots = [Slot(key=i, hparams=h, seed=s) for i, (h, s) in enumerate(zip(hparams, seeds))]
    trainer = fit_stacked([copy.deepcopy(m) for m in models], slots, data, config, per_slot_data=True)
    for i, (model, seed) in enumerate(zip(models, seeds)):
        state = solo_run(model, data, dataclasses.replace(config, seed=seed), hparams[i])
        assert slots[i].schedule.scheduler.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]
        assert_as_alone(slots[i], trainer.model.slot_state_dict(i), state)
    assert slots[2].schedule.scheduler.optimizer.param_groups[0]["lr"] < HPARAMS[2]["lr"]  # the plateau did reduce


OPTION_HPARAMS = [  # the options whose state or first step differs: amsgrad, centered RMSprop, SGD dampening
    {"lr": 0.01, "optimizer": {"name": "adam", "amsgrad": True}},
    {"lr": 0.003, "weight_decay": 0.05, "optimizer": {"name": "adamw", "amsgrad": True, "beta2": 0.99}},
    {"lr": 0.01, "optimizer": {"name": "rmsprop", "centered": True, "momentum": 0.5}},
    {"lr": 0.05, "optimizer": {"name": "sgd", "momentum": 0.9, "dampening": 0.3}},
    {"lr": 0.01, "optimizer": {"name": "rmsprop", "centered": True}},
]


@pytest.mark.parametrize("schedule, options, widths", [
    (None, False, [16] * 5), ({"name": "cosine", "warmup_steps": 5}, False, [16] * 5), (None, True, [16] * 5),
    # Padded slots write their own shapes, weights and optimizer state (amsgrad's, centered RMSprop's).
    (None, True, [8, 16, 4, 12, 6]), (None, False, [12, 4, 16, 8, 6]),
], ids=["constant", "cosine", "optimizer options", "padded, options", "padded"])
def test_a_trial_resumes_alone_from_the_checkpoint_its_slot_wrote(tmp_path, schedule, options, widths) -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=4, batch_size=32, device="cpu", scheduler=schedule)
    seeds = [41, 42, 43, 44, 45]
    hparams = OPTION_HPARAMS if options else [HPARAMS[i] for i in (0, 1, 2, 5, 6)]
    # Adam, SGD (nesterov), AdamW, RMSprop (momentum), Adagrad, or OPTION_HPARAMS: each one's state
    # must come back as torch keeps it.
    slots = [Slot(key=i, hparams=h, seed=s, checkpoint_dir=str(tmp_path / f"slot-{i}")) for i, (h, s) in enumerate(zip(hparams, seeds))]
    seen: list[str] = []

    class Watch:
        def on_exception(self, slot: Slot, error: BaseException) -> None:
            seen.append(type(error).__name__)

    slots[0].callbacks.append(Watch())
    # As a worker told to stop: the group ends before the third epoch's first batch.
    with pytest.raises(Stopped):
        fit_stacked([mlp(s, width=w) for s, w in zip(seeds, widths)], slots, data, config, per_slot_data=True,
                    stop=lambda: all(slot.epoch == 2 for slot in slots))
    assert seen == ["Stopped"]  # as `fit` tells its callbacks of an interruption
    for i, seed in enumerate(seeds):
        directory = tmp_path / f"slot-{i}"
        assert checkpoint_mod.load(directory / "last.pt")["epoch"] == 1 and (directory / "best.pt").exists()
        straight = solo_run(mlp(seed, width=widths[i]), data, dataclasses.replace(config, seed=seed), hparams[i])
        resumed = solo_run(mlp(99, width=widths[i]), data, dataclasses.replace(config, seed=seed, checkpoint_dir=str(directory)), hparams[i])
        assert resumed.resumed and len(resumed.history) == 4
        for a, b in zip(straight.history, resumed.history, strict=True):
            for name, value in a.items():
                assert b[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (i, name)
        for name, value in straight.model.state_dict().items():
            torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
        assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_fp16_slot_checkpoints_carry_the_slot_s_loss_scale(tmp_path) -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=1, batch_size=32, device="cpu", precision="fp16-mixed")
    slots = [Slot(key=i, hparams=HPARAMS[i], seed=i, checkpoint_dir=str(tmp_path / f"s{i}")) for i in range(2)]
    trainer = StackedTrainer(data, config)
    trainer.start([mlp(i) for i in range(2)], slots)
    trainer.scaler.scale[1] = 2.0**10
    trainer.train_epoch()
    for i in range(2):
        trainer.checkpoint(i)
    trainer.flush_checkpoints()
    saved = [checkpoint_mod.load(tmp_path / f"s{i}" / "last.pt")["scaler"] for i in range(2)]
    assert [s["scale"] for s in saved] == [2.0**16, 2.0**10]
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(saved[1])  # GradScaler's own format
    assert scaler.get_scale() == 2.0**10


def test_each_slot_stops_early_and_logs_its_epochs_as_fit_does_for_the_trial_alone(tmp_path) -> None:
    data = toy_data()
    # Slots whose val_loss stops improving by 0.05 stop; with per-slot data each where it would alone.
    config = trainers.TrainerConfig(epochs=8, batch_size=32, device="cpu", early_stopping_patience=1,
                                    early_stopping_min_delta=0.05,
                                    scheduler={"name": "cosine", "warmup_steps": 5})
    seeds = [51, 52, 53, 54, 55]
    slots = [Slot(key=i, hparams=HPARAMS[i], seed=s, log_dir=str(tmp_path / "group" / str(i))) for i, s in enumerate(seeds)]
    fit_stacked([mlp(s) for s in seeds], slots, data, config, per_slot_data=True)
    stopped = 0
    for i, seed in enumerate(seeds):
        alone = solo_run(mlp(seed), data, dataclasses.replace(config, seed=seed, log_dir=str(tmp_path / "alone" / str(i))), HPARAMS[i])
        reason = None if slots[i].stop_reason == "finished" else slots[i].stop_reason  # ran all its epochs
        assert len(slots[i].history) == len(alone.history) and reason == alone.stop_reason, i
        stopped += alone.stop_reason is not None and alone.stop_reason.startswith("early stopping")
        group_rows = list(csv.DictReader((tmp_path / "group" / str(i) / "metrics.csv").open()))
        alone_rows = list(csv.DictReader((tmp_path / "alone" / str(i) / "metrics.csv").open()))
        assert [r.keys() for r in group_rows] == [r.keys() for r in alone_rows] and len(group_rows) == len(alone.history)
        for g, a in zip(group_rows, alone_rows):
            assert {k: pytest.approx(float(v), rel=1e-4, abs=1e-5) for k, v in a.items()} == {k: float(v) for k, v in g.items()}
    assert stopped >= 1  # the test would show nothing if no slot stopped early


def test_each_slot_smooths_its_labels_as_fit_does_for_the_trial_alone() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=3, batch_size=32, device="cpu", label_smoothing=0.05)
    seeds = [71, 72, 73]
    hparams = [{**HPARAMS[0], "label_smoothing": 0.0}, {**HPARAMS[1], "label_smoothing": 0.3}, HPARAMS[2]]  # the last: 0.05
    models = [mlp(s) for s in seeds]
    trainer = grouped_run(models, hparams, seeds, data, config)
    for i, (model, seed) in enumerate(zip(models, seeds)):
        state = solo_run(model, data, dataclasses.replace(config, seed=seed), hparams[i])
        assert_as_alone(trainer.slots[i], trainer.model.slot_state_dict(i), state)
    with pytest.raises(NotVectorizable, match="label_smoothing must be at least 0 and below 1"):
        check_hparams({"label_smoothing": 1.0}, config)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_each_slot_clips_its_gradients_by_its_own_value_as_fit_does(algorithm: str) -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=2, batch_size=32, device="cpu", gradient_clip_val=0.5,
                                    gradient_clip_algorithm=algorithm)
    seeds = [81, 82, 83]
    # Tight enough to bite: 0.05 and 0.01, and the config's 0.5 for the last.
    hparams = [{**HPARAMS[0], "gradient_clip_val": 0.05}, {**HPARAMS[1], "gradient_clip_val": 0.01}, HPARAMS[4]]
    models = [mlp(s) for s in seeds]
    trainer = grouped_run(models, hparams, seeds, data, config)
    unclipped = solo_run(mlp(seeds[1]), data, dataclasses.replace(config, seed=seeds[1], gradient_clip_val=None), HPARAMS[1])
    for i, (model, seed) in enumerate(zip(models, seeds)):
        state = solo_run(model, data, dataclasses.replace(config, seed=seed), hparams[i])
        assert_as_alone(trainer.slots[i], trainer.model.slot_state_dict(i), state)
    assert trainer.slots[1].history[-1]["train_loss"] != pytest.approx(unclipped.history[-1]["train_loss"], rel=1e-3)


class Tempered(nn.Module):
    """A 0-dim parameter (a temperature): its stacked form is [K]."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin, self.temperature = nn.Linear(12, 4), nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) / self.temperature


def test_a_0_dim_parameter_is_clipped_and_scaled_per_slot() -> None:
    data = toy_data()
    seeds = [91, 92]
    for config in (trainers.TrainerConfig(epochs=2, batch_size=32, device="cpu", gradient_clip_val=0.1),
                   trainers.TrainerConfig(epochs=1, batch_size=32, device="cpu", precision="fp16-mixed")):
        models = [Tempered(s) for s in seeds]
        trainer = grouped_run(models, HPARAMS[:2], seeds, data, config)
        for i, (model, seed) in enumerate(zip(models, seeds)):
            state = solo_run(model, data, dataclasses.replace(config, seed=seed), HPARAMS[i])
            assert_as_alone(trainer.slots[i], trainer.model.slot_state_dict(i), state, rel=2e-3, abs=2e-3)


def test_a_stopped_group_tells_every_slot_that_had_no_last_event() -> None:
    data = toy_data()
    models = [mlp(1), mlp(2)]
    with torch.no_grad():
        models[1][0].weight.fill_(math.nan)  # slot 1's loss is NaN: it fails in its first epoch
    seen: dict[int, str] = {}

    class Watch:
        def __init__(self, key: int) -> None:
            self.key = key

        def on_exception(self, slot: Slot, error: BaseException) -> None:
            seen[self.key] = type(error).__name__

    slots = [Slot(key=i, hparams=HPARAMS[i], callbacks=[Watch(i)]) for i in range(2)]
    batches = iter(range(10**6))  # 9 batches an epoch, then the stop before the first slot's end
    with pytest.raises(Stopped) as stopped:
        fit_stacked(models, slots, data, trainers.TrainerConfig(epochs=3, batch_size=32, device="cpu"),
                    stop=lambda: next(batches) >= 9)
    assert seen == {0: "Stopped", 1: "NonFiniteLossError"}
    assert stopped.value.slots == slots


def test_fp16_slots_scale_their_own_losses_and_skip_only_their_own_overflowing_step() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=2, batch_size=32, device="cpu", precision="fp16-mixed")
    seeds = [21, 22, 23]
    models = [mlp(s) for s in seeds]
    trainer = StackedTrainer(data, config, per_slot_data=True)
    trainer.start([copy.deepcopy(m) for m in models], [Slot(key=i, hparams=HPARAMS[i], seed=s) for i, s in enumerate(seeds)])
    weight = trainer.model.params["0.weight"]
    before_step: list[torch.Tensor] = []  # slot weights as each step's gradients are unscaled, i.e. before the step
    unscale = trainer.scaler.unscale

    def overflow_slot_0(grads: list[torch.Tensor]) -> torch.Tensor:
        before_step.append(weight.detach().clone())
        if len(before_step) == 3:
            assert grads[0] is weight.grad
            grads[0][0] *= math.inf
        return unscale(grads)

    # Slot 0's (Adam) first-layer gradient overflows at its third step, in the group and alone.
    # (Injected before the unscale: the group's backward is written out, with no autograd hooks.)
    trainer.scaler.unscale = overflow_slot_0
    for _ in range(config.epochs):
        trainer.train_epoch()
    skipped, next_step = before_step[2], before_step[3]
    assert torch.equal(skipped[0], next_step[0]) and not torch.equal(skipped[2], next_step[2])
    steps = 2 * -(-len(data.train[0]) // config.batch_size)
    assert [s.item() for s in trainer.optimizer.steps] == [steps - 1, 0, steps]  # SGD (slot 1) keeps no count
    for i, (model, seed) in enumerate(zip(models, seeds)):
        if i == 0:
            calls = iter(range(10**6))
            model[0].weight.register_hook(lambda g, calls=calls: g * math.inf if next(calls) == 2 else g)
        state = solo_run(model, data, dataclasses.replace(config, seed=seed), HPARAMS[i])
        assert trainer.scaler.scale[i].item() == state.scaler.get_scale() == (2.0**15 if i == 0 else 2.0**16)
        for solo_epoch, slot_epoch in zip(state.history, trainer.slots[i].history, strict=True):
            for name, value in solo_epoch.items():
                # Losses within fp16 rounding; counted metrics within two of the 96 validation samples.
                close = dict(rel=2e-3) if name.endswith("loss") else dict(abs=2.5 / len(data.val[0]))
                assert slot_epoch[name] == pytest.approx(value, **close), (i, name)
        # fp16 products round differently batched and alone, and Adam's normalized step turns
        # such differences in tiny gradients into whole steps of lr: close, not float32-close.
        stacked = trainer.model.slot_state_dict(i)
        for name, value in state.model.state_dict().items():
            torch.testing.assert_close(stacked[name], value, rtol=0, atol=2e-2)


def test_shared_data_order_is_one_order_for_every_slot() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=2, batch_size=32, device="cpu")
    seeds = [3, 4, 5]
    models = [mlp(s) for s in seeds]
    trainer = StackedTrainer(data, config, seed=99)
    trainer.start([copy.deepcopy(m) for m in models], [Slot(i, HPARAMS[i], s) for i, s in enumerate(seeds)])
    for _ in range(2):
        trainer.train_epoch()
    # Each slot equals its model trained alone on the group's order (seed 99).
    for i, model in enumerate(models):
        state = solo_run(model, data, dataclasses.replace(config, seed=99), HPARAMS[i])
        assert trainer.slots[i].history[-1]["val_loss"] == pytest.approx(state.metrics["val_loss"], rel=1e-4)


def test_a_plan_may_begin_with_an_in_place_activation_or_dropout_on_the_shared_batch() -> None:
    # The shared batch reaches every slot as one expanded view: nothing may write into it, and with
    # activations that differ per slot each one must read the same input.
    data = toy_data()
    x_before = data.train[0].clone()
    config = trainers.TrainerConfig(epochs=3, batch_size=32, device="cpu", shuffle=False)

    def starting_with(first: nn.Module, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(first, nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))

    firsts = [nn.ReLU(inplace=True), nn.Tanh(), nn.ReLU(inplace=True)]
    models = [starting_with(first, seed) for seed, first in enumerate(firsts)]
    trainer = StackedTrainer(data, config)
    trainer.start([copy.deepcopy(m) for m in models], [Slot(key=i, hparams=HPARAMS[i]) for i in range(3)])
    for _ in range(config.epochs):
        trainer.train_epoch()
    assert torch.equal(data.train[0], x_before)
    for i, model in enumerate(models):
        # Each solo run on its own copy: `fit` hands unshuffled batches as views of the data, which
        # an in-place first module writes into (the group does not).
        alone = solo_run(model, toy_data(), config, HPARAMS[i])
        assert_as_alone(trainer.slots[i], trainer.model.slot_state_dict(i), alone)
    dropped = StackedTrainer(data, config)
    dropped.start([starting_with(nn.Dropout(p), 0) for p in (0.1, 0.3)], [Slot(key=i, hparams={}) for i in range(2)])
    assert all(math.isfinite(m["train_loss"]) for m in (s.metrics for s in dropped.train_epoch()))


def test_signature_ignores_activation_only_where_the_batched_path_handles_it() -> None:
    assert signature(mlp(0, act=nn.ReLU)) == signature(mlp(1, act=nn.GELU))
    assert signature(mlp(0, act=nn.ReLU), exact=True) != signature(mlp(1, act=nn.GELU), exact=True)
    assert signature(mlp(0, width=16)) != signature(mlp(0, width=32))
    with pytest.raises(NotVectorizable, match="activations differ"):
        StackedModel([mlp(0, act=nn.ReLU), mlp(1, act=nn.GELU)], torch.device("cpu"), batched=False)


def test_dropout_rate_is_per_slot() -> None:
    data = toy_data()
    models = [mlp(1, dropout=0.0), mlp(1, dropout=0.5)]
    assert signature(models[0]) == signature(models[1])  # a rate does not change the architecture
    stacked = StackedModel(models, torch.device("cpu"))
    x = data.train[0][:64]
    torch.manual_seed(0)
    out = stacked(x)
    stacked.eval()
    clean = stacked(x)
    assert torch.allclose(out[0], clean[0]) and not torch.allclose(out[1], clean[1])


# --- pruning, refill, shrink -------------------------------------------------------------------


class StopAt:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_end(self, slot: Slot) -> None:
        if slot.epoch == self.epoch:
            raise RuntimeError(f"pruned at epoch {slot.epoch}")


def test_a_slot_stopped_at_epoch_2_is_refilled_and_the_new_curve_starts_at_epoch_0() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=5, batch_size=32, device="cpu")
    slots = [Slot("a", HPARAMS[0], 1), Slot("b", HPARAMS[1], 2, callbacks=[StopAt(2)]), Slot("c", HPARAMS[2], 3)]
    ended: list[Slot] = []
    seen: dict[str, list[int]] = {}

    class Record:
        def __init__(self, name: str) -> None:
            self.name = name

        def on_validation_end(self, slot: Slot) -> None:
            seen.setdefault(self.name, []).append(slot.epoch)

    for s in slots:
        s.callbacks.append(Record(s.key))
    fresh = iter([("d", HPARAMS[3], 4)])

    def refill(slot: Slot):
        nxt = next(fresh, None)
        if nxt is None:
            return None
        key, hparams, seed = nxt
        return mlp(seed), Slot(key=key, hparams=hparams, seed=seed, callbacks=[Record(key)])

    trainer = fit_stacked([mlp(1), mlp(2), mlp(3)], slots, data, config, refill=refill, on_slot_end=ended.append)
    assert trainer.size == 0
    by_key = {s.key: s for s in ended}
    assert str(by_key["b"].error) == "pruned at epoch 2" and len(by_key["b"].history) == 3
    assert seen["d"] == [0, 1, 2, 3, 4] and len(by_key["d"].history) == 5
    assert by_key["a"].error is None and len(by_key["a"].history) == 5
    # The refilled slot trained from fresh weights: its first epoch matches a fresh solo run.
    solo = solo_run(mlp(4), data, dataclasses.replace(config, epochs=1, seed=0), HPARAMS[3])
    assert by_key["d"].history[0]["val_accuracy"] == pytest.approx(solo.metrics["val_accuracy"], abs=0.1)


def test_non_finite_loss_fails_one_slot_only() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=2, batch_size=32, device="cpu")
    slots = [Slot(0, {"lr": 1e6, "optimizer": "sgd"}, 1), Slot(1, HPARAMS[0], 2)]
    ended: list[Slot] = []
    fit_stacked([mlp(1), mlp(2)], slots, data, config, on_slot_end=ended.append)
    by_key = {s.key: s for s in ended}
    assert isinstance(by_key[0].error, trainers.NonFiniteLossError)
    assert by_key[1].error is None and by_key[1].metrics["val_accuracy"] > 0.5


# --- what cannot be stacked -------------------------------------------------------------------


class Recurrent(nn.Module):
    """The features as a sequence through a GRU: recurrent kernels do not stack."""

    def __init__(self, features: int = 12, width: int = 8) -> None:
        super().__init__()
        self.rnn, self.out = nn.GRU(1, width, batch_first=True), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x.unsqueeze(-1))[1][0])


def test_batch_norm_keeps_running_statistics_per_slot_as_each_trial_alone() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=3, batch_size=32, device="cpu")
    seeds = [61, 62, 63]

    def with_bn(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    models = [with_bn(s) for s in seeds]
    trainer = grouped_run(models, HPARAMS, seeds, data, config)
    for i, (model, seed) in enumerate(zip(models, seeds)):
        state = solo_run(model, data, dataclasses.replace(config, seed=seed), HPARAMS[i])
        # Running mean, variance and batch count are among the weights compared.
        assert_as_alone(trainer.slots[i], trainer.model.slot_state_dict(i), state)
    assert trainer.model.slot_state_dict(0)["1.num_batches_tracked"].item() == config.epochs * 9


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if h.sum() > 0:  # control flow on a value that differs per slot
            return h
        return -h


class ScalesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mul_(0.5))


def test_a_model_that_changes_its_input_in_place_runs_alone_and_the_data_stays_as_it_was() -> None:
    # The slots of a group share each batch: one slot's write would feed the others its output.
    data = toy_data()
    before = [t.clone() for t in (*data.train, *data.val)]
    config = trainers.TrainerConfig(epochs=1, batch_size=32, device="cpu", shuffle=False)
    with pytest.raises(NotVectorizable, match="changes its input in place"):
        StackedTrainer(data, config).start([ScalesItsInput(), ScalesItsInput()], [Slot(i, {}) for i in range(2)])
    assert all(torch.equal(a, b) for a, b in zip(before, (*data.train, *data.val)))


def test_models_that_cannot_be_stacked_are_named_with_the_reason() -> None:
    data = toy_data()
    config = trainers.TrainerConfig(epochs=1, batch_size=32, device="cpu")
    recurrent = [Recurrent() for _ in range(2)]
    with pytest.raises(NotVectorizable, match="GRU at rnn uses fused recurrent kernels"):
        StackedTrainer(data, config).start(recurrent, [Slot(i, {}) for i in range(2)])
    with pytest.raises(NotVectorizable, match="data-dependent control flow"):
        StackedTrainer(data, config).start([Branchy(), Branchy()], [Slot(i, {}) for i in range(2)])
    with pytest.raises(NotVectorizable, match="compile"):
        StackedTrainer(data, dataclasses.replace(config, compile=True))
    # A schedule `fit` would reject: the trial runs alone and fails there, with fit's own error.
    with pytest.raises(NotVectorizable, match="scheduler name must be one of"):
        check_hparams({"scheduler": {"name": "sometimes"}}, config)


# --- population mode in the worker --------------------------------------------------------------

POP_TASK = '''
import torch
from torch import nn

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1]) > 0).long()
    return x[:256], y[:256], x[256:], y[256:]

class Recurrent(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.rnn, self.out = nn.GRU(1, width, batch_first=True), nn.Linear(width, 2)

    def forward(self, x):
        return self.out(self.rnn(x.unsqueeze(-1))[1][0])

def model(params):
    m = params.get("model", {})
    width = m.get("width", 16)
    if m.get("recurrent"):  # the features as a sequence: GRU kernels do not stack
        return Recurrent(width)
    if m.get("empty"):  # no parameters: nothing to train
        return nn.Sequential(nn.Flatten())
    if m.get("norm"):
        return nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 2))
    if m.get("slow"):  # a training step of 0.1 s: long enough epochs to stop a worker inside one
        return nn.Sequential(nn.Linear(8, width), Slow(), nn.ReLU(), nn.Linear(width, 2))
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Dropout(m.get("dropout", 0.0)), nn.Linear(width, 2))

class Slow(nn.Module):
    def forward(self, x):
        if self.training:
            import time
            time.sleep(0.1)
        return x
'''


def pop_study(tmp_path, name: str, *, vectorize: dict | None, baseline: list, n_trials: int, epochs: int = 4,
              pruner: Any = "none", space: dict | None = None, trainer: dict | None = None, study: dict | None = None) -> str:
    (tmp_path / "poptask.py").write_text(POP_TASK)
    raw = {
        "study": {"name": name, "direction": "maximize", "metric": "val_accuracy", "n_trials": n_trials, "seed": 3,
                  "sampler": "random", "pruner": pruner, **(study or {})},
        "trainer": {"epochs": epochs, "batch_size": 32, "device": "cpu", "threads": 1, **(trainer or {})},
        "task": {"model": "poptask:model", "data": "poptask:data"},
        "space": space or {
            "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "model": {"width": {"type": "categorical", "choices": [8, 16]}, "norm": False},
            "optimizer": {"type": "categorical", "choices": {"adam": {"beta1": {"type": "float", "low": 0.8, "high": 0.95}},
                                                              "sgd": {"momentum": {"type": "float", "low": 0.0, "high": 0.9}}}},
        },
        "baseline": baseline,
    }
    if vectorize is not None:
        raw["study"]["vectorize"] = vectorize
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def run_study(path: str, url: str, name: str) -> tuple[optuna.Study, worker.Summary]:
    coordinator.create(load_config(path), open_storage(url))
    summary = worker.run_worker(name, url, index=0, threads=1)
    return optuna.load_study(study_name=name, storage=open_storage(url)), summary


MIXED = [
    {"lr": 0.05, "model": {"width": 8}, "optimizer": {"name": "adam", "beta1": 0.9}},
    {"lr": 0.02, "model": {"width": 16}, "optimizer": {"name": "sgd", "momentum": 0.9}},
    {"lr": 0.01, "model": {"width": 8}, "optimizer": {"name": "sgd", "momentum": 0.5}},
    {"lr": 0.03, "model": {"width": 16}, "optimizer": {"name": "adam", "beta1": 0.85}},
    {"lr": 0.04, "model": {"width": 8}, "optimizer": {"name": "adam", "beta1": 0.8}},
]


def test_population_groups_one_ask_by_architecture_and_each_trial_keeps_its_solo_curve(tmp_path) -> None:
    vec, vec_summary = run_study(pop_study(tmp_path, "vec", vectorize={"width": 5, "data": "per_slot"}, baseline=MIXED, n_trials=5),
                                 str(tmp_path / "vec.journal"), "vec")
    solo, _ = run_study(pop_study(tmp_path, "solo", vectorize=None, baseline=MIXED, n_trials=5),
                        str(tmp_path / "solo.journal"), "solo")
    assert vec_summary.states == {"COMPLETE": 5}
    trials = vec.get_trials()
    # One ask of five: widths 8 (three trials) and 16 (two) trained as two groups.
    assert [t.user_attrs["hpo:vectorized_width"] for t in trials] == [3, 2, 3, 2, 3]
    for t in trials:
        assert t.user_attrs["hpo:vectorize"] == {"width": 5, "auto": False, "data": "per_slot", "padding": 1.0}
        assert t.user_attrs["hpo:worker"] and t.user_attrs["hpo:seeds"] == {"sampler": 3}
        assert set(t.user_attrs["hpo:metrics"]) >= {"val_accuracy", "val_loss", "train_loss"}
    # Per-slot data order and the trial's seed: the same curve as the trial trained alone.
    for grouped, alone in zip(trials, solo.get_trials(), strict=True):
        assert grouped.params == alone.params
        assert list(grouped.intermediate_values) == [0, 1, 2, 3]
        for step, value in alone.intermediate_values.items():
            assert grouped.intermediate_values[step] == pytest.approx(value, abs=1e-6)
        assert grouped.user_attrs["hpo:metrics"]["val_loss"] == pytest.approx(alone.user_attrs["hpo:metrics"]["val_loss"], rel=1e-4)


def test_population_pads_narrower_trials_into_one_group_within_pad_and_each_keeps_its_solo_curve(tmp_path) -> None:
    vec, summary = run_study(pop_study(tmp_path, "pad", vectorize={"width": 5, "data": "per_slot", "pad": 2.5}, baseline=MIXED,
                                       n_trials=5), str(tmp_path / "pad.journal"), "pad")
    solo, _ = run_study(pop_study(tmp_path, "solo", vectorize=None, baseline=MIXED, n_trials=5), str(tmp_path / "solo.journal"), "solo")
    assert summary.states == {"COMPLETE": 5}
    trials = vec.get_trials()
    # Widths 8 and 16 in one group of five: a width-8 model padded to 16 is 1.98 times its size.
    assert [t.user_attrs["hpo:vectorized_width"] for t in trials] == [5] * 5
    assert [t.user_attrs["hpo:vectorize"]["padding"] for t in trials] == [1.98, 1.0, 1.98, 1.0, 1.98]
    for grouped, alone in zip(trials, solo.get_trials(), strict=True):
        for step, value in alone.intermediate_values.items():
            assert grouped.intermediate_values[step] == pytest.approx(value, abs=1e-6)
    # Under a pad of 1.9 they may not share a group: two groups, as with equal shapes only.
    vec, _ = run_study(pop_study(tmp_path, "tight", vectorize={"width": 5, "pad": 1.9}, baseline=MIXED, n_trials=5),
                       str(tmp_path / "tight.journal"), "tight")
    assert [t.user_attrs["hpo:vectorized_width"] for t in vec.get_trials()] == [3, 2, 3, 2, 3]


def test_population_prunes_a_slot_at_epoch_2_and_refills_it_with_a_trial_that_starts_at_epoch_0(tmp_path) -> None:
    slow = {"lr": 1e-3, "model": {"width": 16}, "optimizer": {"name": "sgd", "momentum": 0.0}}
    good = [{"lr": 0.05, "model": {"width": 16}, "optimizer": {"name": "adam", "beta1": 0.9}}] * 4
    pruner = {"name": "threshold", "options": {"lower": 0.7, "n_warmup_steps": 2}}
    study, summary = run_study(
        pop_study(tmp_path, "prune", vectorize={"width": 4, "lookahead": 1}, baseline=[slow, *good], n_trials=5, epochs=5, pruner=pruner),
        str(tmp_path / "prune.journal"), "prune")
    trials = study.get_trials()
    assert summary.states == {"PRUNED": 1, "COMPLETE": 4}
    assert trials[0].state == TrialState.PRUNED and list(trials[0].intermediate_values) == [0, 1, 2]
    assert trials[0].user_attrs["hpo:pruned"].startswith("pruned at epoch 2")
    # Trial 4 was asked when slot 0 was freed, and trained five epochs of its own from epoch 0.
    refill = trials[4]
    assert refill.state == TrialState.COMPLETE and list(refill.intermediate_values) == [0, 1, 2, 3, 4]
    assert refill.user_attrs["hpo:vectorized_width"] == 4
    assert refill.datetime_start >= trials[0].datetime_complete
    assert refill.datetime_complete > trials[3].datetime_complete


def test_a_model_without_parameters_fails_its_trials_alone_and_the_worker_goes_on(tmp_path) -> None:
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}, "model": {"empty": True}}
    study, summary = run_study(pop_study(tmp_path, "empty", vectorize={"width": 3, "pad": 4}, baseline=[], n_trials=3, space=space),
                               str(tmp_path / "empty.journal"), "empty")
    assert summary.states == {"FAIL": 3}
    assert all("empty parameter list" in t.user_attrs["hpo:fail_reason"] for t in study.get_trials())


def test_a_model_that_cannot_be_stacked_runs_alone_with_one_warning_line(tmp_path, capfd) -> None:
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}, "model": {"width": 16, "recurrent": True}}
    study, summary = run_study(pop_study(tmp_path, "gru", vectorize={"width": 4}, baseline=[], n_trials=6, space=space),
                               str(tmp_path / "gru.journal"), "gru")
    assert summary.states == {"COMPLETE": 6}
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["hpo: warning: vectorize: GRU at rnn uses fused recurrent kernels that vmap cannot batch; "
                        "running trials one at a time"]
    assert all(t.user_attrs["hpo:vectorized_width"] == 1 for t in study.get_trials())


def test_a_batch_norm_model_trains_in_groups(tmp_path, capfd) -> None:
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}, "model": {"width": 16, "norm": True}}
    study, summary = run_study(pop_study(tmp_path, "bn", vectorize={"width": 3}, baseline=[], n_trials=6, space=space),
                               str(tmp_path / "bn.journal"), "bn")
    assert summary.states == {"COMPLETE": 6} and "warning" not in capfd.readouterr().err
    assert [t.user_attrs["hpo:vectorized_width"] for t in study.get_trials()] == [3] * 6
    assert study.best_value > 0.8


def test_auto_width_is_measured_and_recorded(tmp_path, capfd) -> None:
    study, summary = run_study(pop_study(tmp_path, "auto", vectorize={"width": "auto", "max_width": 8}, baseline=[], n_trials=6),
                               str(tmp_path / "auto.journal"), "auto")
    assert sum(summary.states.values()) == 6
    chosen = {t.user_attrs["hpo:vectorize"]["width"] for t in study.get_trials()}
    assert len(chosen) == 1 and chosen.pop() in (1, 2, 4, 8)
    assert "hpo: vectorize: auto chose width" in capfd.readouterr().err


# --- the study file ---------------------------------------------------------------------------


@pytest.mark.parametrize(("vectorize", "expected"), [
    ("{width: 0}", "study.vectorize.width: 0 is not a positive integer or auto (expected an integer >= 1 or auto)"),
    ("{width: fast}", "study.vectorize.width: 'fast' is not a positive integer or auto (expected an integer >= 1 or auto)"),
    ("{widht: 4}", "study.vectorize.widht: unknown key; did you mean width? (expected one of data, lookahead, max_width, pad, width)"),
    ("{width: 4, pad: 0.5}", "study.vectorize.pad: 0.5 is not a number >= 1 (expected a number >= 1)"),
    ("{width: 4, pad: .nan}", "study.vectorize.pad: nan is not a number >= 1 (expected a number >= 1)"),
    ("{width: 4, lookahead: 0}", "study.vectorize.lookahead: 0 is not an integer >= 1 (expected an integer >= 1)"),
    ("{width: 4, data: per-slot}", "study.vectorize.data: 'per-slot' is not a data mode; did you mean per_slot? (expected shared or per_slot)"),
    ("{width: 4, max_width: 8}", "study.vectorize.max_width: max_width bounds auto only (expected width: auto, or no max_width)"),
    ("{width: auto, max_width: 0}", "study.vectorize.max_width: 0 is not an integer >= 1 (expected an integer >= 1)"),
    ("8", "study.vectorize: 8 is not a mapping (expected vectorize: {width: 8} or {width: auto})"),
])
def test_vectorize_mistakes_are_one_line_each_with_the_line_number(tmp_path, vectorize: str, expected: str) -> None:
    text = DIGITS_YAML.read_text().replace("  n_trials: 40\n", f"  n_trials: 40\n  vectorize: {vectorize}\n")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert [str(p) for p in info.value.problems] == [f"{path}:8: {expected}"]


def test_vectorize_defaults_and_round_trip(tmp_path) -> None:
    text = DIGITS_YAML.read_text().replace("  n_trials: 40\n", "  n_trials: 40\n  vectorize: {}\n")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    config = load_config(str(path))
    assert config.study.vectorize == Vectorize(width="auto", data="shared", max_width=64, lookahead=1, pad=1.0)
    assert config_from_dict(json.loads(json.dumps(config.raw)), "stored").study == config.study


# --- end to end: the CLI, Redis, two workers ---------------------------------------------------


def population_file(tmp_path, name: str, width: Any = 4, epochs: int | None = None) -> str:
    """The shipped digits study, short, in population mode; the low-lr baseline is pruned at epoch 1."""
    from test_e2e import FAST, SLOW_BASELINE

    path = study_file(tmp_path, name, **FAST)
    raw = yaml.safe_load(path.read_text())
    if epochs is not None:
        raw["trainer"]["epochs"] = epochs
    # Four baseline trials of one architecture: the first worker's first ask is a group of four.
    raw["baseline"] = [SLOW_BASELINE, *({**SLOW_BASELINE, "lr": lr, "optimizer": {"name": "adam", "beta1": 0.9}}
                                        for lr in (0.003, 0.01, 0.02))]
    raw["study"]["vectorize"] = {"width": width}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def started_worker(tmp_path, path: str, name: str) -> tuple[optuna.Study, subprocess.Popen]:
    """The study of file `path` created on a journal in `tmp_path`, and an `hpo worker` process on it."""
    url = str(tmp_path / f"{name}.journal")
    coordinator.create(load_config(path), open_storage(url))
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "worker", "--study", name, "--storage", url, "--threads", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return study, proc


def wait_for(condition, timeout: float = 60) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.05)


@pytest.mark.parametrize("ask_ahead", [False, True])
def test_asking_ahead_samples_the_refills_while_the_slots_last_epoch_trains(tmp_path, ask_ahead: bool) -> None:
    good = [{"lr": 0.05, "model": {"width": 16}, "optimizer": {"name": "adam", "beta1": 0.9}}] * 6
    path = pop_study(tmp_path, "ahead", vectorize={"width": 2}, baseline=good, n_trials=6, epochs=3, study={"ask_ahead": ask_ahead})
    study, summary = run_study(path, str(tmp_path / "ahead.journal"), "ahead")
    trials = study.get_trials()
    assert summary.states == {"COMPLETE": 6} and len(trials) == 6
    assert all(list(t.intermediate_values) == [0, 1, 2] for t in trials)
    for first, refill in ((trials[0], trials[2]), (trials[2], trials[4])):
        # Asked ahead: before the slot it refills was told (while its last epoch trained).
        # Otherwise after: the ask waits for every result before it.
        assert (refill.datetime_start < first.datetime_complete) is ask_ahead
        assert refill.user_attrs["hpo:vectorized_width"] == 2


def test_a_signal_hands_back_the_trials_asked_ahead_too(tmp_path) -> None:
    import signal

    slow = [{"lr": 0.05, "model": {"width": 16, "slow": True}, "optimizer": {"name": "adam", "beta1": 0.9}}] * 4
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}, "model": {"width": 16, "slow": True},
             "optimizer": {"type": "categorical", "choices": {"adam": {"beta1": {"type": "float", "low": 0.8, "high": 0.95}}}}}
    path = pop_study(tmp_path, "ahead-term", vectorize={"width": 2}, baseline=slow, n_trials=4, epochs=2, space=space,
                     study={"ask_ahead": True})
    study, proc = started_worker(tmp_path, path, "ahead-term")
    # Trials 2 and 3 (enqueued baselines) are asked as the group's last epoch starts (each epoch
    # takes about a second).
    wait_for(lambda: len(study.get_trials(states=[TrialState.RUNNING])) >= 4)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING], [(t.number, t.state.name) for t in trials]
    stopped = sorted(t.number for t in trials if t.state == TrialState.FAIL)
    # The two training and the two asked ahead: failed with the reason and re-queued with their params.
    assert stopped == [0, 1, 2, 3], ([(t.number, t.state.name) for t in trials], err)
    assert all(t.user_attrs["hpo:fail_reason"].startswith("interrupted by SIGTERM") for t in trials[:4])
    retried = {t.user_attrs["hpo:retry_of"]: t.system_attrs["fixed_params"] for t in trials if t.state == TrialState.WAITING}
    assert retried == {t.number: t.params for t in trials[:4]}


@pytest.mark.e2e
def test_hpo_run_in_population_mode(tmp_path) -> None:
    result = hpo("run", population_file(tmp_path, "pop-run"), "--threads", "1", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "best: trial #" in result.stdout
    study = optuna.load_study(study_name="pop-run", storage=open_storage(str(tmp_path / "hpo.journal")))
    trials = study.get_trials()
    assert len(trials) == 9 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert trials[0].state == TrialState.PRUNED and study.best_value > 0.5
    assert all(t.user_attrs["hpo:vectorize"]["width"] == 4 for t in trials)
    status = hpo("status", "--json", cwd=tmp_path)
    assert json.loads(status.stdout)["counts"]["COMPLETE"] == sum(t.state == TrialState.COMPLETE for t in trials)


@pytest.mark.e2e
def test_two_population_workers_share_a_study_on_redis(tmp_path, redis_url: str) -> None:
    name = "pop-redis"
    # Groups of small MLPs train fast: enough epochs that the worker up first cannot finish the
    # study while the other still imports torch.
    created = hpo("create", population_file(tmp_path, name, epochs=150), "--storage", redis_url, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    workers = [
        subprocess.Popen([sys.executable, "-m", "hpo", "worker", "--study", name, "--storage", redis_url, "--threads", "1",
                          "--worker-index", str(i)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for w in workers:
        _out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    study = optuna.load_study(study_name=name, storage=open_storage(redis_url))
    trials = study.get_trials()
    # The budget held across both workers' asks of up to four trials each.
    assert len(trials) == 9
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len({t.user_attrs["hpo:worker"] for t in trials}) == 2
    assert [t.user_attrs["hpo:vectorized_width"] for t in trials[:4]] == [4, 4, 4, 4]
    assert len({t.user_attrs["hpo:worker"] for t in trials[:4]}) == 1


def test_the_heartbeat_covers_every_trial_a_population_worker_holds(tmp_path) -> None:
    from hpo import heartbeat

    study = optuna.create_study(storage=open_storage(str(tmp_path / "b.journal")), study_name="beat")
    trials = [study.ask() for _ in range(3)]
    beat = heartbeat.Heartbeat(study, "w", 30, 120, 2)
    beat.running(trials)
    beat.beat()  # the heartbeat thread's next beat
    assert heartbeat.workers(study)["w"]["trial"] == 0 and heartbeat.workers(study)["w"]["trials"] == [0, 1, 2]
    beat.running(None)
    beat.ahead(trials[1:])  # asked ahead for the next refills
    beat.beat()
    assert heartbeat.workers(study)["w"]["trials"] == [1, 2]
    beat.ahead(None)
    beat.beat()
    assert heartbeat.workers(study)["w"]["trial"] is None


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 0), ("SIGINT", 130)])
def test_a_signal_hands_back_every_trial_the_population_worker_holds(tmp_path, sig: str, code: int) -> None:
    import signal

    path = pop_study(tmp_path, "term", vectorize={"width": 3, "lookahead": 2}, baseline=MIXED, n_trials=8, epochs=100_000)
    study, proc = started_worker(tmp_path, path, "term")
    wait_for(lambda: any(t.intermediate_values for t in study.get_trials()))
    proc.send_signal(getattr(signal, sig))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    # Three training and three waiting (lookahead 2 x width 3): all failed with the reason and re-queued.
    assert len(stopped) == 6, ([(t.number, t.state.name) for t in trials], err)
    assert all(t.user_attrs["hpo:fail_reason"].startswith(f"interrupted by {sig}") for t in stopped)
    retried = sorted(t.user_attrs["hpo:retry_of"] for t in trials if t.state == TrialState.WAITING)
    assert retried == sorted(t.number for t in stopped)


@pytest.mark.e2e
def test_trials_handed_back_by_a_population_worker_resume_from_their_slot_checkpoints(tmp_path) -> None:
    import signal

    epochs = 150
    path = pop_study(tmp_path, "ckpt", vectorize={"width": 2}, baseline=MIXED[0::2], n_trials=3, epochs=epochs,
                     trainer={"checkpoint_dir": str(tmp_path / "ckpt")})
    study, first = started_worker(tmp_path, path, "ckpt")
    wait_for(lambda: any(len(t.intermediate_values) >= 3 for t in study.get_trials()))
    first.send_signal(signal.SIGTERM)
    _out, err = first.communicate(timeout=60)
    assert first.returncode == 0 and "vectorize" not in err, err  # grouped, not run alone
    stopped = {t.number: t for t in study.get_trials() if t.state == TrialState.FAIL}
    trained = {n: len(t.intermediate_values) for n, t in stopped.items() if t.intermediate_values}
    assert len(trained) == 2, err  # the group of two (widths 8 and 8) was training

    second = subprocess.run(first.args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    trials = study.get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in trials:
        origin = t.user_attrs.get("hpo:retry_of")
        if origin in trained:
            # Resumed from the last epoch its slot wrote; the curve is whole and continuous.
            assert t.state == TrialState.COMPLETE and t.user_attrs["hpo:resumed_at_epoch"] >= trained[origin] - 1
            assert list(t.intermediate_values) == list(range(epochs))


def test_population_mode_on_postgresql_beats_for_every_trial(tmp_path, postgres_url: str) -> None:
    # RDB storages use Optuna's own per-trial heartbeat: each held trial gets one.
    path = pop_study(tmp_path, "pg", vectorize={"width": 3}, baseline=MIXED, n_trials=5)
    raw = yaml.safe_load(open(path).read())
    raw["study"].update({"heartbeat_interval": 1, "grace_period": 5})
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    study, summary = run_study(path, postgres_url, "pg")
    assert summary.states == {"COMPLETE": 5}
    assert [t.user_attrs["hpo:vectorized_width"] for t in study.get_trials()] == [2, 2, 2, 2, 2]
