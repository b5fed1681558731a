"""The callback protocol: a fixed list of events and a plain state object.

Events, in the order the loop fires them, and what `state` holds at each::

    on_fit_start                      model, optimizer, schedule, scaler ready; a resumed run has
                                      state.epoch = first epoch to run, global_step, history, best
      on_epoch_start                  state.epoch set
        on_batch_start                state.batch (tensors on the device), state.batch_index
        on_batch_end                  state.loss (a tensor: reading it is a host sync);
                                      state.global_step counts optimizer steps, already
                                      advanced when this micro-batch ended an accumulation window
      on_validation_start             the training part of the epoch is done
      on_validation_end               state.metrics holds train_* and val_* of this epoch (floats)
      on_epoch_end                    the epoch's schedule step is done
      (checkpoint: best.pt if `monitor` improved, then last.pt)
      ... next epoch, unless a callback called state.stop(reason)
    on_fit_end
    on_exception(state, error)        instead of the rest, when anything raised; the error
                                      propagates after every callback saw it

A callback implements any subset of these methods, and may implement ``state_dict()`` and
``load_state_dict(d)``: that state is saved in every checkpoint and restored on resume.
An exception raised by a callback ends the run and propagates to the caller of `fit`
(this is how a hyperparameter search stops a trial early without the loop knowing about it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

from trainers.config import resolve_mode

if TYPE_CHECKING:
    from trainers.loop import State

EVENTS = (
    "on_fit_start",
    "on_epoch_start",
    "on_batch_start",
    "on_batch_end",
    "on_validation_start",
    "on_validation_end",
    "on_epoch_end",
    "on_fit_end",
    "on_exception",
)


class Callback(Protocol):
    """Any object with some of the `EVENTS` methods; none is required."""

    def on_validation_end(self, state: State) -> None: ...


class Dispatch:
    """Calls each event only on the callbacks that implement it (table built once per fit)."""

    def __init__(self, callbacks: list[Any]) -> None:
        self._table = {
            event: [getattr(cb, event) for cb in callbacks if callable(getattr(cb, event, None))]
            for event in EVENTS
        }

    def __call__(self, event: str, *args: Any) -> None:
        for handler in self._table[event]:
            handler(*args)

    def wants(self, event: str) -> bool:
        return bool(self._table[event])


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode` (min or max)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping:
    """Stops when `monitor` has not improved by more than `min_delta` for `patience` validations.

    Example::

        trainers.fit(model, data, config, [EarlyStopping("val_accuracy", patience=3)])
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "auto") -> None:
        if patience < 0:
            raise ValueError(f"patience cannot be negative but got {patience}.")
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode = resolve_mode(monitor, mode)
        self.best: float | None = None
        self.best_epoch = -1
        self.wait = 0

    def on_validation_end(self, state: State) -> None:
        if self.monitor not in state.metrics:
            raise KeyError(f"early stopping monitors {self.monitor!r}, which the loop does not report "
                           f"(it reports {', '.join(state.metrics)})")
        value = state.metrics[self.monitor]
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = value, state.epoch, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            state.stop(
                f"early stopping: {self.monitor} did not improve by more than {self.min_delta:g} for "
                f"{self.wait} epochs (best {self.best:.6g} at epoch {self.best_epoch})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
