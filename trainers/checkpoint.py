"""Checkpoints: every piece of state a resume needs, written atomically, read with weights_only.

A checkpoint holds the model, optimizer, schedule, gradient scaler, epoch and optimizer-step
counters, the metric history, the best value so far, every RNG the loop or a step may draw from
(torch CPU and CUDA, Python, NumPy, the shuffling generator) and each callback's ``state_dict()``.
Resuming from ``last.pt`` therefore continues the very curve the run would have followed
(bit for bit on CPU with a fixed seed).

The state's tensors are copied on the training thread (tens of microseconds for a small model);
a background thread pickles and writes them, so serialization, file I/O and fsync overlap the
next epoch. At most one write is in flight; when the next epoch's checkpoint comes before it is
done, the newer one replaces any not yet written (per file), and `fit` waits for all before returning
or raising. Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
target: a rename within one filesystem is atomic, so a process killed mid-write leaves the previous
checkpoint intact (and at worst a stray ``.*.tmp`` file, which is never read).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainers.callbacks import improved

if TYPE_CHECKING:
    from trainers.loop import State

FORMAT = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary sibling, fsync, then rename over `path`."""
    _atomic_write(lambda file: torch.save(obj, file), Path(path))


def _atomic_write(write: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            # Without fsync a power loss after the rename can leave an empty file on some filesystems.
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


class Checkpoints:
    """``last.pt`` every `every` epochs (and at the end) and ``best.pt`` when `monitor` improves, in `directory`."""

    def __init__(self, directory: str | os.PathLike, *, monitor: str, mode: str, save_last: bool = True,
                 save_best: bool = True, every: int = 1, epochs: int | None = None) -> None:
        self.directory = Path(directory)
        self.monitor, self.mode = monitor, mode
        self.save_last, self.save_best = save_last, save_best
        self.every, self.epochs = every, epochs
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: dict[Path, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @property
    def last(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best(self) -> Path:
        return self.directory / "best.pt"

    def save(self, state: State) -> None:
        if self.monitor not in state.metrics:
            raise KeyError(f"checkpoints monitor {self.monitor!r}, which the loop does not report "
                           f"(it reports {', '.join(state.metrics)})")
        is_best = improved(state.metrics[self.monitor], state.best, self.mode)
        if is_best:
            state.best, state.best_epoch = state.metrics[self.monitor], state.epoch
        done = state.epoch + 1
        last = self.save_last and (done % self.every == 0 or done == self.epochs or state.should_stop)
        if not (last or (self.save_best and is_best)):
            return
        self._raise_error()
        # Copied now, before the next step changes the live tensors; pickled and written on the
        # writer thread, so the training thread pays only for the copy.
        payload = _copy_tensors(capture(state))
        targets = [self.best] if self.save_best and is_best else []
        targets += [self.last] if last else []
        with self._lock:
            # A write still in flight is not waited for: the newest payload per file replaces
            # one not yet written, so short epochs never stall on a slow disk's fsync.
            self._pending.update(dict.fromkeys(targets, payload))
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name="checkpoint-writer")
                self._writer.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._error is not None:
                    self._writer = None
                    return
                batch, self._pending = self._pending, {}
            try:
                blobs: dict[int, io.BytesIO] = {}
                for path, payload in batch.items():
                    blob = blobs.get(id(payload))
                    if blob is None:  # best.pt and last.pt of one epoch: pickled once
                        blob = blobs[id(payload)] = io.BytesIO()
                        torch.save(payload, blob)
                    _atomic_write(lambda file, blob=blob: file.write(blob.getbuffer()), path)
            except BaseException as error:  # re-raised on the training thread by save() or wait()
                self._error = error

    def wait(self) -> None:
        """Blocks until every pending write is on disk; raises the error of one that failed."""
        while (writer := self._writer) is not None:
            writer.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            with self._lock:
                self._pending.clear()
            raise error

    def resume(self, state: State) -> bool:
        """Restores `state` from ``last.pt`` when there is one; returns whether it did."""
        if not self.last.exists():
            return False
        restore(state, load(self.last, state.device))
        return True


def capture(state: State) -> dict[str, Any]:
    """Everything a resume needs, as tensors and plain Python values."""
    schedule = state.schedule.scheduler.state_dict() if state.schedule is not None else None
    return {
        "format": FORMAT,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "schedule": schedule,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "metrics": dict(state.metrics),
        "history": [dict(row) for row in state.history],
        "best": state.best,
        "best_epoch": state.best_epoch,
        "should_stop": state.should_stop,
        "stop_reason": state.stop_reason,
        "rng": rng_state(state.generator),
        "callbacks": {key: cb.state_dict() for key, cb in _stateful(state.callbacks)},
    }


def restore(state: State, payload: dict[str, Any]) -> None:
    """Loads `payload` into the live objects of `state`; the run continues at the next epoch."""
    if payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {payload.get('format')!r} is not {FORMAT}")
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    if state.schedule is not None and payload["schedule"] is not None:
        state.schedule.scheduler.load_state_dict(payload["schedule"])
    if state.scaler is not None and payload["scaler"] is not None:
        state.scaler.load_state_dict(payload["scaler"])
    state.epoch = payload["epoch"] + 1
    state.global_step = payload["global_step"]
    state.metrics, state.history = payload["metrics"], payload["history"]
    state.best, state.best_epoch = payload["best"], payload["best_epoch"]
    state.should_stop, state.stop_reason = payload["should_stop"], payload["stop_reason"]
    for key, cb in _stateful(state.callbacks):
        if key in payload["callbacks"]:
            cb.load_state_dict(payload["callbacks"][key])
    set_rng_state(payload["rng"], state.generator)


def _copy_tensors(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {key: _copy_tensors(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tensors(value) for value in obj)
    return obj


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": _python_rng(),
        "shuffle": generator.get_state() if generator is not None else None,
        "numpy": None,
    }
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # A tensor, so weights_only loading needs no NumPy globals.
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys.tolist()), gauss))
    if generator is not None and state["shuffle"] is not None:
        generator.set_state(state["shuffle"].cpu())
    if state["numpy"] is not None:
        with contextlib.suppress(ImportError):
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _python_rng() -> tuple[int, torch.Tensor, float | None]:
    # 625 ints as one tensor: pickling them one by one costs more than the whole model.
    version, keys, gauss = random.getstate()
    return version, torch.tensor(keys, dtype=torch.int64), gauss


def _stateful(callbacks: list[Any]) -> list[tuple[str, Any]]:
    # Keyed by position and class, so a resumed run with the same callback list finds its own state.
    return [
        (f"{i}:{type(cb).__name__}", cb)
        for i, cb in enumerate(callbacks)
        if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))
    ]
