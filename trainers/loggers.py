"""Loggers as callbacks: CSV always, TensorBoard and MLflow when installed.

Each writes into the run's own `log_dir` (one directory per trial) the same metric names that
`state.metrics` holds, so what a search prunes on and what a dashboard shows agree, plus ``lr``.
A resumed run drops the rows of epochs it is about to repeat, so no epoch appears twice.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainers.loop import State


class CSVLogger:
    """``metrics.csv``: one row per epoch with ``epoch``, ``global_step``, ``lr`` and every metric."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.path = Path(log_dir) / "metrics.csv"
        self.fields: list[str] | None = None

    def on_fit_start(self, state: State) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return
        with self.path.open(newline="") as file:
            reader = csv.DictReader(file)
            self.fields = list(reader.fieldnames or []) or None
            rows = [row for row in reader if int(row["epoch"]) < state.epoch]
        self._write(rows, "w")

    def on_validation_end(self, state: State) -> None:
        row = {"epoch": state.epoch, "global_step": state.global_step, "lr": state.lr, **state.metrics}
        if self.fields is None or set(row) - set(self.fields):
            old = self._read()
            self.fields = [*(self.fields or []), *(k for k in row if k not in (self.fields or []))]
            self._write([*old, row], "w")
        else:
            self._write([row], "a")

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as file:
            return list(csv.DictReader(file))

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        if self.fields is None:
            return
        with self.path.open(mode, newline="") as file:
            writer = csv.DictWriter(file, self.fields, restval="")
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)


class TensorBoardLogger:
    """Scalars under the metric names, step = epoch (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(log_dir) / "tensorboard"))

    def on_validation_end(self, state: State) -> None:
        for name, value in {**state.metrics, "lr": state.lr}.items():
            self.writer.add_scalar(name, value, state.epoch)
        self.writer.flush()

    def on_fit_end(self, state: State) -> None:
        self.writer.close()

    def on_exception(self, state: State, error: BaseException) -> None:
        self.writer.close()


class MLflowLogger:
    """An MLflow run in ``log_dir/mlflow.db`` (unless MLFLOW_TRACKING_URI says otherwise), step = epoch."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        import mlflow

        self.mlflow = mlflow
        # MLflow 3 puts its file store in maintenance mode; a per-trial SQLite file needs no server.
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(log_dir).resolve() / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("trainers")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("trainers")
        self.run_id = self.client.create_run(experiment_id, run_name=Path(log_dir).name).info.run_id

    def on_validation_end(self, state: State) -> None:
        for name, value in {**state.metrics, "lr": state.lr}.items():
            self.client.log_metric(self.run_id, name, value, step=state.epoch)

    def on_fit_end(self, state: State) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def on_exception(self, state: State, error: BaseException) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


LOGGERS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def build_loggers(names: list[str], log_dir: str | os.PathLike) -> list[Any]:
    """The loggers named in `names`; an optional one that is not installed is a clear error."""
    loggers = []
    for name in names:
        try:
            loggers.append(LOGGERS[name](log_dir))
        except ImportError as err:
            raise ImportError(f"logger {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]} ({err})") from err
    return loggers
