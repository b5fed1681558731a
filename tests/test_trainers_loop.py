"""The loop: event order, early stopping, NaN detection, out-of-memory reporting, metrics."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainers
from trainers import metrics


def make_data(n: int = 64, n_val: int = 32, classes: int = 3) -> trainers.Data:
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(n, 8, generator=g), torch.randn(n_val, 8, generator=g)
    w = torch.randn(8, classes, generator=g)
    return trainers.Data((x, (x @ w).argmax(1)), (xv, (xv @ w).argmax(1)))


def make_model(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes))


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name not in trainers.EVENTS:
            raise AttributeError(name)
        return lambda state, *args: self.events.append(name if name != "on_exception" else f"on_exception:{type(args[0]).__name__}")


def scripted_eval(values: list[float]):
    it = iter(values)

    def eval_step(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return {"loss": torch.tensor(next(it) * len(batch[0]))}

    return eval_step


def test_the_package_exports_what_it_lists_and_its_submodules_as_attributes() -> None:
    assert all(getattr(trainers, name) is not None for name in trainers.__all__)
    assert trainers.load_checkpoint is trainers.checkpoint.load and trainers.metrics.in_top_k is metrics.in_top_k
    with pytest.raises(AttributeError):
        trainers.no_such_name  # noqa: B018


def test_events_fire_in_the_documented_order() -> None:
    recorder = Recorder()
    trainers.fit(make_model(), make_data(), trainers.TrainerConfig(epochs=2, batch_size=32, device="cpu"), [recorder])
    epoch = ["on_epoch_start", *["on_batch_start", "on_batch_end"] * 2,
             "on_validation_start", "on_validation_end", "on_epoch_end"]
    assert recorder.events == ["on_fit_start", *epoch, *epoch, "on_fit_end"]


def test_a_raising_callback_propagates_after_on_exception() -> None:
    class Prune(Exception):
        pass

    class Pruner:
        def on_validation_end(self, state: trainers.State) -> None:
            raise Prune

    recorder = Recorder()
    with pytest.raises(Prune):
        trainers.fit(make_model(), make_data(), trainers.TrainerConfig(epochs=3, batch_size=64, device="cpu"),
                     [Pruner(), recorder])
    assert recorder.events == ["on_fit_start", "on_epoch_start", "on_batch_start", "on_batch_end",
                               "on_validation_start", "on_exception:Prune"]


def test_early_stopping_stops_after_patience_epochs_without_improvement() -> None:
    config = trainers.TrainerConfig(epochs=10, batch_size=64, device="cpu", early_stopping_patience=3)
    state = trainers.fit(make_model(), make_data(), config,
                         eval_step=scripted_eval([1.0, 0.9, 0.95, 0.92, 0.91, 0.5, 0.4]))
    assert len(state.history) == 5  # best at epoch 1, then epochs 2, 3, 4 without improvement
    assert state.stop_reason == ("early stopping: val_loss did not improve by more than 0 for 3 epochs "
                                 "(best 0.9 at epoch 1)")


def test_early_stopping_min_delta_ignores_small_improvements_and_max_mode_follows_accuracy() -> None:
    stopper = trainers.EarlyStopping("val_accuracy", patience=2, min_delta=0.05)
    assert stopper.mode == "max"
    config = trainers.TrainerConfig(epochs=10, batch_size=64, device="cpu")

    def accuracy_eval(values: list[float]):
        it = iter(values)
        return lambda model, batch: {"accuracy": torch.tensor(next(it) * len(batch[0]))}

    state = trainers.fit(make_model(), make_data(), config, [stopper], eval_step=accuracy_eval([0.5, 0.52, 0.54, 0.9]))
    assert len(state.history) == 3 and state.should_stop


def test_nan_loss_is_caught_at_the_check_interval_before_the_epoch_ends() -> None:
    seen = Recorder()

    def poisoned(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * math.nan if seen.events.count("on_batch_end") >= 3 else loss

    config = trainers.TrainerConfig(epochs=1, batch_size=4, device="cpu", nan_check_every=2)
    with pytest.raises(trainers.NonFiniteLossError, match="training loss is nan at epoch 0 .*step 4"):
        trainers.fit(make_model(), make_data(), config, [seen], train_step=poisoned)
    assert seen.events.count("on_batch_end") == 3  # 16 batches in the epoch; stopped at the 4th


def test_nan_loss_without_interval_checks_is_caught_at_epoch_end() -> None:
    def poisoned(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1]) * math.inf

    config = trainers.TrainerConfig(epochs=3, batch_size=4, device="cpu", nan_check_every=0)
    with pytest.raises(trainers.NonFiniteLossError, match="at epoch 0"):
        trainers.fit(make_model(), make_data(), config, train_step=poisoned)


def test_out_of_memory_is_reported_as_such_with_the_settings() -> None:
    recorder = Recorder()

    def hungry(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    config = trainers.TrainerConfig(epochs=1, batch_size=32, device="cpu")
    with pytest.raises(trainers.OutOfMemoryError, match="out of memory on cpu at epoch 0.*batch_size 32.*20.00 GiB"):
        trainers.fit(make_model(), make_data(), config, [recorder], train_step=hungry)
    assert recorder.events[-1] == "on_exception:OutOfMemoryError"


def test_user_code_errors_surface_unchanged_with_their_traceback() -> None:
    def broken(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise ValueError("shape mismatch in my step")

    with pytest.raises(ValueError, match="shape mismatch") as info:
        trainers.fit(make_model(), make_data(), trainers.TrainerConfig(epochs=1, device="cpu"), train_step=broken)
    assert info.traceback[-1].name == "broken"


def test_classification_reports_accuracy_top_k_and_macro_f1_like_scikit_learn() -> None:
    from sklearn.metrics import f1_score, top_k_accuracy_score

    data = make_data(n=256, n_val=200, classes=6)
    model = make_model(classes=6)
    config = trainers.TrainerConfig(epochs=1, batch_size=32, eval_batch_size=64, device="cpu", top_k=3)
    state = trainers.fit(model, data, config)
    x, y = data.val
    with torch.no_grad():
        logits = model(x)
    assert state.metrics["val_accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert state.metrics["val_top3_accuracy"] == pytest.approx(top_k_accuracy_score(y, logits, k=3, labels=range(6)))
    assert state.metrics["val_f1"] == pytest.approx(f1_score(y, logits.argmax(1), average="macro"))
    assert state.metrics["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_macro_f1_ignores_classes_never_seen_nor_predicted() -> None:
    from sklearn.metrics import f1_score

    y, predicted = torch.tensor([0, 0, 1, 1, 3]), torch.tensor([0, 1, 1, 1, 0])
    value = metrics.macro_f1(metrics.confusion(predicted, y, 5)).item()
    assert value == pytest.approx(f1_score(y, predicted, average="macro"))


def test_cross_entropy_rows_is_torch_s_cross_entropy_per_row_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(3, 40, 7, generator=g) * 5, torch.randint(0, 7, (3, 40), generator=g)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(3, 40)
    assert torch.allclose(metrics.cross_entropy_rows(logits, y), expected, rtol=1e-6, atol=1e-5)
    low = metrics.cross_entropy_rows(logits.bfloat16(), y)
    in_float = F.cross_entropy(logits.bfloat16().float().flatten(0, 1), y.flatten(), reduction="none").view(3, 40)
    assert low.dtype == torch.float32 and torch.allclose(low, in_float, rtol=1e-6, atol=1e-5)


def test_top_k_breaks_ties_to_the_lower_index_as_argmax_and_ranks_nan_first() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [5.0, 4.0, 3.0, 2.0]])
    y = torch.tensor([2, 2, 3])
    assert metrics.in_top_k(logits, y, 2).tolist() == [False, False, False]
    assert metrics.in_top_k(logits, y, 3).tolist() == [True, True, False]  # the tie: index 2 is third
    assert metrics.in_top_k(logits, y, 10).tolist() == [True, True, True]  # k above the class count
    # Top-1 is accuracy, ties broken as argmax breaks them: constant logits are not a hit everywhere.
    g = torch.Generator().manual_seed(0)
    rounded = torch.randint(0, 3, (200, 5), generator=g).float()
    target = torch.randint(0, 5, (200,), generator=g)
    assert torch.equal(metrics.in_top_k(rounded, target, 1), rounded.argmax(-1) == target)
    constant = torch.zeros(5, 5)  # a dead model: as many hits as k of the 5 classes, not all
    assert metrics.in_top_k(constant, torch.arange(5), 2).tolist() == [True, True, False, False, False]
    nan = torch.tensor([[float("nan"), 1.0, 2.0], [float("nan")] * 3])
    assert metrics.in_top_k(nan, torch.tensor([2, 0]), 1).tolist() == [False, False]
    assert metrics.in_top_k(nan, torch.tensor([2, 0]), 2).tolist() == [True, False]


@pytest.mark.parametrize("per_slot_targets", [False, True])
def test_stacked_metrics_equal_each_models_own(per_slot_targets: bool) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, 6, generator=g)
    y = torch.randint(0, 6, (4, 50) if per_slot_targets else (50,), generator=g)
    extra = torch.tensor([0.5, 0.25, 1.0, 2.0])
    stacked = metrics.finalize_stacked(metrics.stacked_classification_sums(logits, y, 3), 50, {"train_loss": extra})
    for k in range(4):
        own = metrics.finalize(metrics.classification_sums(logits[k], y[k] if per_slot_targets else y, 3), 50,
                               {"train_loss": extra[k]})
        assert list(stacked[k]) == list(own) and stacked[k] == pytest.approx(own, rel=1e-6)
    prediction, target = torch.randn(3, 20, 2, generator=g), torch.randn(20, 2, generator=g)
    stacked = metrics.finalize_stacked(metrics.stacked_regression_sums(prediction, target), 20)
    for k in range(3):
        assert stacked[k] == pytest.approx(metrics.finalize(metrics.regression_sums(prediction[k], target), 20), rel=1e-6)


def test_regression_reports_mse_and_mae() -> None:
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(64, 8, generator=g), torch.randn(40, 8, generator=g)
    data = trainers.Data((x, x.sum(1)), (xv, xv.sum(1)))
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    state = trainers.fit(model, data, trainers.TrainerConfig(epochs=2, batch_size=16, eval_batch_size=16, device="cpu"),
                         kind="regression")
    with torch.no_grad():
        error = model(xv).squeeze(1) - xv.sum(1)
    assert set(trainers.METRICS["regression"]) == set(state.metrics)
    assert state.metrics["val_mse"] == pytest.approx(error.square().mean().item(), rel=1e-6)
    assert state.metrics["val_mae"] == pytest.approx(error.abs().mean().item(), rel=1e-6)


def test_default_classification_metrics_match_the_published_names() -> None:
    data = make_data(classes=6)
    state = trainers.fit(make_model(6), data, trainers.TrainerConfig(epochs=1, device="cpu"))
    assert set(trainers.METRICS["classification"]) == set(state.metrics)


def test_dataloader_path_gives_the_same_metrics_as_device_tensors() -> None:
    config = trainers.TrainerConfig(epochs=2, batch_size=16, device="cpu", shuffle=False)
    on_device = trainers.fit(make_model(), make_data(), config)
    streamed = trainers.fit(make_model(), make_data(), trainers.TrainerConfig(**{**config.__dict__, "data_on_device": False}))
    assert streamed.history == on_device.history


class DoublesItsInput(nn.Module):
    """Changes its input in place, as `nn.ReLU(inplace=True)` first in a model would."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mul_(2))


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_model_that_changes_its_input_in_place_leaves_the_data_as_it_was(shuffle: bool) -> None:
    # The data of a study is built once and shared by its trials, and every epoch reads it again.
    data = make_data()
    before = [t.clone() for t in (*data.train, *data.val)]
    config = trainers.TrainerConfig(epochs=2, batch_size=16, device="cpu", shuffle=shuffle, seed=0)
    first = trainers.fit(DoublesItsInput(), data, config).history
    assert all(torch.equal(a, b) for a, b in zip(before, (*data.train, *data.val)))
    assert trainers.fit(DoublesItsInput(), data, config).history == first


def test_gradients_are_cleared_after_each_step_also_of_a_param_group_added_by_a_callback() -> None:
    extra = nn.Parameter(torch.zeros(3))
    model = make_model()
    seen: list[tuple[bool, bool]] = []

    class AddGroup:
        def on_fit_start(self, state) -> None:
            state.optimizer.add_param_group({"params": [extra]})

        def on_batch_start(self, state) -> None:
            extra.grad = torch.ones(3)  # as if the loss had used it

        def on_batch_end(self, state) -> None:
            seen.append((extra.grad is None, all(p.grad is None for p in model.parameters())))

    trainers.fit(model, make_data(), trainers.TrainerConfig(epochs=2, batch_size=16, device="cpu"), [AddGroup()])
    assert seen == [(True, True)] * 8
    assert (extra.detach() < 0).all()  # the optimizer stepped it, then its gradient was cleared
