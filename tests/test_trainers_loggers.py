"""Loggers: CSV always, TensorBoard and MLflow when installed; names as in state.metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

import trainers


class Crash(Exception):
    pass


def run(tmp_path: Path, loggers: list[str], callbacks: tuple = (), epochs: int = 3) -> trainers.State:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    torch.manual_seed(0)
    config = trainers.TrainerConfig(epochs=epochs, batch_size=16, device="cpu", log_dir=str(tmp_path / "logs"),
                                    loggers=loggers, checkpoint_dir=str(tmp_path / "ckpt"), seed=0)
    return trainers.fit(nn.Linear(4, 2), trainers.Data((x, y), (x, y)), config, list(callbacks))


def rows(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "logs" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_csv_logger_writes_one_row_per_epoch_with_the_pruning_metric_names(tmp_path: Path) -> None:
    state = run(tmp_path, ["csv"])
    logged = rows(tmp_path)
    assert [int(r["epoch"]) for r in logged] == [0, 1, 2]
    assert set(trainers.METRICS["classification"]) | {"epoch", "global_step", "lr"} == set(logged[0])
    assert float(logged[-1]["val_loss"]) == pytest.approx(state.metrics["val_loss"])


def test_csv_logger_drops_rows_of_epochs_a_resumed_run_repeats(tmp_path: Path) -> None:
    class CrashAfterLogging:
        def on_epoch_end(self, state: trainers.State) -> None:
            if state.epoch == 1:
                raise Crash  # epoch 1 is logged but its checkpoint is never written

    with pytest.raises(Crash):
        run(tmp_path, ["csv"], (CrashAfterLogging(),))
    assert [int(r["epoch"]) for r in rows(tmp_path)] == [0, 1]
    run(tmp_path, ["csv"])
    assert [int(r["epoch"]) for r in rows(tmp_path)] == [0, 1, 2]


def test_tensorboard_logger_writes_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, ["csv", "tensorboard"])
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_accuracy")] == [0, 1, 2]


def test_mlflow_logger_records_the_metric_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = run(tmp_path, ["mlflow"], epochs=2)
    logger = next(cb for cb in state.callbacks if isinstance(cb, trainers.MLflowLogger))
    history = mlflow.MlflowClient(tracking_uri=logger.client.tracking_uri).get_metric_history(logger.run_id, "val_loss")
    assert [m.step for m in history] == [0, 1]
    assert history[-1].value == pytest.approx(state.metrics["val_loss"])


def test_unknown_logger_names_the_setting() -> None:
    with pytest.raises(ValueError, match="^loggers must be among csv, tensorboard, mlflow"):
        trainers.TrainerConfig(loggers=["wandb"])
