"""The batched path's written-out backward gives autograd's gradients, and its dropout keeps each
slot's units at that slot's rate."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import trainers
from trainers import stacked_backward
from trainers.vectorized import ELEMENTWISE, NotVectorizable, Slot, StackedModel, StackedTrainer

torch.set_num_threads(1)
CPU = torch.device("cpu")


def mlp(act=nn.ReLU, dropout: float = 0.0, bias: bool = True, first: nn.Module | None = None, out: int = 4) -> nn.Module:
    layers = [nn.Linear(12, 16, bias=bias), act(), nn.Dropout(dropout), nn.Linear(16, 16), act(), nn.Linear(16, out)]
    return nn.Sequential(*([first] if first is not None else []), *layers)


def autograd_step(model: StackedModel, x, y, *, shared=True, kind="classification", smoothing=None, weight=1.0, dtype=None):
    """What `StackedTrainer` does without the written-out step: the forward under autocast,
    `_loss` and `backward()`."""
    trainer = StackedTrainer.__new__(StackedTrainer)
    trainer.kind = kind
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x, shared=shared)
    losses = trainer._loss(out, y, shared, smoothing)
    (losses * weight).sum().backward()
    return losses.detach()


def assert_same_step(models, x, y, *, device: torch.device = CPU, rtol: float = 1e-5, atol: float = 1e-7, **options) -> None:
    """One step of `models` stacked, written out and through autograd: the same losses and gradients."""
    options = {"shared": True, "kind": "classification", **options}
    models = [copy.deepcopy(m) for m in models]
    model = StackedModel(models, device)
    x, y = x.to(device), y.to(device)
    options.update({k: v.to(device) for k, v in options.items() if isinstance(v, torch.Tensor)})
    assert model.plan is not None
    torch.manual_seed(5)  # the same dropout masks for both (CUDA's generator included)
    expected = autograd_step(model, x, y, **options)
    grads = {k: v.grad for k, v in model.params.items()}
    for v in model.params.values():
        v.grad = None
    torch.manual_seed(5)
    losses = stacked_backward.loss_and_grads(model, x, y, **options)
    torch.testing.assert_close(losses, expected, rtol=rtol, atol=atol)
    for name, param in model.params.items():
        assert param.grad.dtype == param.dtype
        torch.testing.assert_close(param.grad, grads[name], rtol=rtol, atol=atol, msg=name)


X, Y = torch.randn(32, 12, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4


@pytest.mark.parametrize("act", ELEMENTWISE, ids=lambda a: a.__name__)
def test_every_elementwise_activation_gives_autograds_gradients(act: type[nn.Module]) -> None:
    # Those in the formula table and those that take autograd over the op alone.
    torch.manual_seed(0)
    assert_same_step([mlp(act, dropout=0.2) for _ in range(3)], X, Y)


@pytest.mark.parametrize("case", [
    "mixed activations", "activation options", "dropout rates 0, 0.3 and 1", "no bias, label smoothing, weight",
    "dropout on the input", "activation on the input", "regression", "regression, several outputs", "per-slot batches",
    "bf16", "fp16 with per-slot loss scales", "bf16 regression", "float64 model under bf16", "float64 smoothing", "bfloat16 model in full precision",
])
def test_the_written_out_step_gives_autograds_gradients(case: str) -> None:
    torch.manual_seed(0)
    if case == "mixed activations":
        assert_same_step([mlp(nn.GELU), mlp(nn.Tanh), mlp(nn.ReLU), mlp(nn.Softsign), mlp(nn.SiLU)], X, Y)
    elif case == "activation options":
        acts = [lambda: nn.GELU(approximate="tanh"), lambda: nn.LeakyReLU(0.2), lambda: nn.ELU(0.5)]
        assert_same_step([mlp(act) for act in acts], X, Y)
    elif case == "dropout rates 0, 0.3 and 1":
        assert_same_step([mlp(dropout=0.3), mlp(dropout=0.0), mlp(dropout=1.0)], X, Y)
    elif case == "no bias, label smoothing, weight":
        assert_same_step([mlp(bias=False) for _ in range(3)], X, Y, smoothing=torch.tensor([0.0, 0.1, 0.3]), weight=0.5)
    elif case == "dropout on the input":
        assert_same_step([mlp(first=nn.Dropout(0.2)) for _ in range(2)], X, Y)
    elif case == "activation on the input":
        assert_same_step([mlp(first=nn.Tanh()), mlp(first=nn.ReLU())], X, Y)
    elif case == "regression":
        assert_same_step([mlp(out=1) for _ in range(3)], X, torch.randn(32), kind="regression")
    elif case == "regression, several outputs":
        assert_same_step([mlp(out=3) for _ in range(3)], X, torch.randn(32, 3), kind="regression")
    elif case == "per-slot batches":
        xs, ys = torch.randn(3, 32, 12), torch.randint(0, 4, (3, 32))
        assert_same_step([mlp(dropout=0.2) for _ in range(3)], xs, ys, shared=False)
    elif case == "bf16":
        assert_same_step([mlp(nn.GELU, dropout=0.2), mlp(nn.Tanh), mlp(nn.Softsign)], X, Y, dtype=torch.bfloat16,
                         smoothing=torch.tensor([0.0, 0.1, 0.2]))
    elif case == "fp16 with per-slot loss scales":
        assert_same_step([mlp(dropout=0.2) for _ in range(3)], X, Y, dtype=torch.float16,
                         weight=torch.tensor([2.0**16, 2.0**10, 1.0]) / 2)
    elif case == "bf16 regression":
        assert_same_step([mlp(out=2) for _ in range(2)], X, torch.randn(32, 2), kind="regression", dtype=torch.bfloat16)
    elif case == "float64 model under bf16":  # autocast leaves float64 alone: so does the written-out step
        assert_same_step([mlp(dropout=0.2).double() for _ in range(2)], X.double(), Y, dtype=torch.bfloat16)
    elif case == "bfloat16 model in full precision":  # its dropout masks are float32
        assert_same_step([mlp(dropout=0.2).bfloat16() for _ in range(2)], X.bfloat16(), Y)
    else:  # per-slot values as torch.tensor makes them under a float64 default dtype
        assert_same_step([mlp() for _ in range(2)], X, Y, smoothing=torch.tensor([0.1, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "fp16-mixed"])
def test_the_trainer_trains_the_same_with_the_written_out_step(precision: str) -> None:
    data = trainers.Data((X.repeat(4, 1), Y.repeat(4)), (X, Y))
    hparams = [{"lr": 0.01, "optimizer": {"name": "adam"}}, {"lr": 0.1, "optimizer": {"name": "sgd", "momentum": 0.9}}]
    runs = {}
    for written_out in (True, False):
        config = trainers.TrainerConfig(epochs=3, batch_size=16, device="cpu", accumulate_grad_batches=2,
                                        gradient_clip_val=0.5, seed=3, precision=precision)
        trainer = StackedTrainer(data, config, seed=3)
        torch.manual_seed(0)
        trainer.start([mlp(dropout=0.25), mlp(nn.GELU, dropout=0.1)], [Slot(i, h) for i, h in enumerate(hparams)])
        assert trainer.written_out
        trainer.written_out = written_out
        torch.manual_seed(7)
        for _ in range(config.epochs):
            trainer.train_epoch()
        runs[written_out] = trainer
    rel = 1e-4  # (in bf16 and fp16 the two came out equal bit for bit here; in float32 within 1e-6)
    for name, param in runs[True].model.params.items():
        torch.testing.assert_close(param, runs[False].model.params[name], rtol=rel, atol=rel / 100, msg=name)
    for written, taped in zip(runs[True].slots, runs[False].slots):
        for ours, theirs in zip(written.history, taped.history, strict=True):
            assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=rel)
            assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=rel)
    if precision == "fp16-mixed":
        torch.testing.assert_close(runs[True].scaler.scale, runs[False].scaler.scale)


def test_dropout_keeps_each_slots_units_at_its_rate_and_scales_them_to_expectation_one() -> None:
    rates = [0.0, 0.1, 0.5, 0.85, 1.0]
    model = StackedModel([mlp(dropout=p) for p in rates], CPU)
    (name,) = model.dropouts
    torch.manual_seed(0)
    mask = model.keep_mask(name, torch.empty(len(rates), 400, 500))
    kept = (mask > 0).float().mean((1, 2))
    for k, p in enumerate(rates):
        values = mask[k][mask[k] > 0]
        if p < 1:
            torch.testing.assert_close(values, torch.full_like(values, 1 / (1 - p)), rtol=1e-4, atol=0)
        # 200,000 units a slot: the kept fraction's standard deviation is below 0.0012.
        assert abs(kept[k].item() - (1 - p)) < 0.005
    assert torch.equal(mask[0], torch.ones_like(mask[0])) and torch.equal(mask[-1], torch.zeros_like(mask[-1]))
    # An odd number of units (the 16-bit draws come four to a 64-bit one).
    assert model.keep_mask(name, torch.empty(len(rates), 3, 7)).shape == (len(rates), 3, 7)
    assert model._keep[name][0][1].item() == 58982 - 32769  # p = 0.1 keeps 58,982 of 65,536 draws
    # For 16-bit activations the mask stays float32: bfloat16 would round 1/0.9 to 1.109375, and
    # float16 overflows at the scale of one unit kept in 65536.
    bf16 = model.keep_mask(name, torch.empty(len(rates), 400, 500, dtype=torch.bfloat16))
    assert bf16.dtype == torch.float32 and bf16[1].max().item() == pytest.approx(1 / 0.9, rel=1e-4)
    nearly_all = StackedModel([mlp(dropout=1 - 1 / 65536)], CPU)
    assert torch.isfinite(nearly_all.keep_mask(name, torch.empty(1, 64, 64, dtype=torch.float16))).all()


def test_a_written_out_step_that_fails_is_found_when_the_group_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by the first-step check, it sends the trials to solo runs instead of failing them all.
    def broken(*args, **kwargs):
        raise RuntimeError("expected m1 and m2 to have the same dtype")

    monkeypatch.setattr(stacked_backward, "loss_and_grads", broken)
    data = trainers.Data((X, Y), (X, Y))
    trainer = StackedTrainer(data, trainers.TrainerConfig(epochs=1, batch_size=16, device="cpu"))
    with pytest.raises(NotVectorizable, match="same dtype"):
        trainer.start([mlp(), mlp()], [Slot(i, {}) for i in range(2)])


def test_the_first_step_check_also_runs_the_steps_that_overwrite_the_kept_gradients(monkeypatch) -> None:
    loss_and_grads = stacked_backward.loss_and_grads

    def broken_when_overwriting(*args, overwrite: bool = False, **kwargs):
        if overwrite:
            raise RuntimeError("bmm(): out must be contiguous")
        return loss_and_grads(*args, **kwargs)

    monkeypatch.setattr(stacked_backward, "loss_and_grads", broken_when_overwriting)
    data = trainers.Data((X, Y), (X, Y))
    trainer = StackedTrainer(data, trainers.TrainerConfig(epochs=1, batch_size=16, device="cpu"))
    with pytest.raises(NotVectorizable, match="out must be contiguous"):
        trainer.start([mlp(), mlp()], [Slot(i, {}) for i in range(2)])


@pytest.mark.parametrize("written_out", [True, False])
def test_gradients_are_kept_between_steps_only_where_the_next_step_overwrites_them(written_out: bool) -> None:
    data = trainers.Data((X.repeat(2, 1), Y.repeat(2)), (X, Y))
    trainer = StackedTrainer(data, trainers.TrainerConfig(epochs=1, batch_size=16, device="cpu"))
    trainer.start([mlp(), mlp()], [Slot(i, {}) for i in range(2)])
    trainer.written_out = written_out
    trainer.train_epoch()
    grads = [p.grad for p in trainer.model.parameters()]
    if written_out:  # the same tensors step after step, and the optimizer's views of them made once
        same = lambda a, b: len(a) == len(b) and all(x is y for x, y in zip(a, b))  # noqa: E731
        assert all(g is not None for g in grads) and same(trainer.optimizer._grads, grads)
        views = trainer.optimizer._slot_grads
        trainer.train_epoch()
        assert same([p.grad for p in trainer.model.parameters()], grads) and trainer.optimizer._slot_grads is views
    else:  # autograd's: freed after each step, and the optimizer holds none through the next
        assert grads == [None] * len(grads) and trainer.optimizer._grads == [] == trainer.optimizer._slot_grads
