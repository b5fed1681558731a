"""Checkpoints: every piece of state a resume needs, written atomically, read with weights_only.

A checkpoint holds the model, optimizer, schedule, gradient scaler, epoch and optimizer-step
counters, the metric history, the best value so far, every RNG the loop or a step may draw from
(torch CPU and CUDA, Python, NumPy, the shuffling generator) and each callback's ``state_dict()``.
Resuming from ``last.pt`` therefore continues the very curve the run would have followed
(bit for bit on CPU with a fixed seed).

The training thread only copies the state's tensors into one shared-memory buffer (0.1 ms for
an MLP and its Adam state, one `torch._foreach_copy_`); a writer process (`trainers.writer`)
pickles and writes them, so serialization, file I/O and fsync overlap the next epoch without
taking the GIL from the training loop. Pickling on a thread instead took 1.2 ms of every epoch
from it. At most one write is in flight; when the next epoch's checkpoint comes before it is
done, the newer one replaces any not yet written (per file), and `fit` waits for all before
returning or raising. Writes go to a temporary file in the same directory, are flushed to disk,
then renamed over the target: a rename within one filesystem is atomic, so a process killed
mid-write leaves the previous checkpoint intact (and at worst a stray ``.*.tmp`` file, which is
never read).

The file holds the tensors packed in one byte buffer (format 2, `pack`): one record to pickle
instead of one per tensor. `load` unpacks it, and still reads format 1 (the nested state).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainers import writer
from trainers.callbacks import improved
from trainers.optim import as_implemented_by

if TYPE_CHECKING:
    from trainers.loop import State

FORMAT = 2  # 2: tensors packed in flat buffers (`pack`); 1: torch.save of the nested state
# Offsets in a packed buffer are multiples of this, so that every dtype can view its slice.
_ALIGN = 16
_ATOMS = frozenset({int, float, bool, str, type(None)})
# Values of the metrics and their history: plain numbers, which `layout` need not search.
_PLAIN_KEYS = ("metrics", "history")


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
    payload = torch.load(path, map_location=map_location, weights_only=True)
    return unpack(payload) if payload.get("format") == FORMAT else payload


def layout(payload: dict[str, Any], plain: tuple[str, ...] = ()
           ) -> tuple[dict[str, Any], list[torch.Tensor], list[tuple], int]:
    """Splits `payload` into its plain values (tensors replaced by None), its tensors, where each
    goes in a flat byte buffer ``(path, dtype, shape, offset)``, and the buffer's size.

    Tensors a flat buffer cannot hold (sparse, quantized) stay among the plain values, as do the
    values of the top-level keys in `plain`, which are not searched: a tensor there is still
    saved, only pickled on its own.
    """
    found: list[tuple[tuple, torch.Tensor]] = []
    state = {key: value if key in plain else _strip(value, (key,), found) for key, value in payload.items()}
    specs, size = [], 0
    for path, tensor in found:
        specs.append((path, _dtype_name(tensor.dtype), tuple(tensor.shape), size))
        size += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return state, [tensor for _, tensor in found], specs, size


def fill(buffer: torch.Tensor, tensors: list[torch.Tensor], specs: list[tuple],
         views: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Copies `tensors` into their places in `buffer` (a CPU byte tensor), as `layout` gave them;
    returns the views it copied into, which a next fill with the same `specs` may pass back."""
    if views is None:
        views = [_view(buffer, tensor.dtype, shape, offset) for tensor, (_, _, shape, offset) in zip(tensors, specs)]
    local = [i for i, tensor in enumerate(tensors) if tensor.device.type == "cpu"]
    if local:  # one call for all of them: a copy per tensor costs more in dispatch than in bytes
        torch._foreach_copy_([views[i] for i in local], [tensors[i] for i in local])
    for i, tensor in enumerate(tensors):
        if tensor.device.type != "cpu":
            views[i].copy_(tensor)
    return views


def pack(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` as a checkpoint of format 2: ``{"format": 2, "state": its plain values, "buffer":
    all its tensors in one CPU byte tensor, "tensors": where each is, "nbytes": the size}``.
    Plain values only, so that a ``weights_only`` load reads it; `unpack` undoes it."""
    state, tensors, specs, size = layout(payload)
    buffer = torch.empty(size, dtype=torch.uint8)
    fill(buffer, tensors, specs)
    return {**header(state, specs, size), "buffer": buffer}


def header(state: dict[str, Any], specs: list[tuple], size: int) -> dict[str, Any]:
    """A packed checkpoint without its buffer: what the writer process is sent."""
    return {"format": FORMAT, "state": state, "tensors": specs, "nbytes": size}


def unpack(packed: dict[str, Any]) -> dict[str, Any]:
    """The nested payload that `pack` was given (its tensors on the CPU, copies, not views)."""
    buffer = packed["buffer"]
    tensors = {tuple(path): _view(buffer, getattr(torch, dtype), shape, offset).clone()
               for path, dtype, shape, offset in packed["tensors"]}
    return _fill(packed["state"], (), tensors)


@functools.cache
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _view(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[offset : offset + nbytes].view(dtype).view(shape)


def _strip(obj: Any, path: tuple, found: list[tuple[tuple, torch.Tensor]]) -> Any:
    if type(obj) in _ATOMS:  # most leaves: one set lookup instead of three isinstance checks
        return obj
    if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and not obj.is_quantized:
        found.append((path, obj.detach() if obj.requires_grad else obj))
        return None
    if isinstance(obj, dict):
        return {key: _strip(value, (*path, key), found) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(value, (*path, i), found) for i, value in enumerate(obj))
    return obj


def _fill(obj: Any, path: tuple, tensors: dict[tuple, torch.Tensor]) -> Any:
    if path in tensors:
        return tensors[path]
    if isinstance(obj, dict):
        return {key: _fill(value, (*path, key), tensors) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(value, (*path, i), tensors) for i, value in enumerate(obj))
    return obj


@dataclass
class _Packed:
    buffer: writer.Buffer
    meta: dict[str, Any]  # `pack`'s result without the buffer


class Checkpoints:
    """``last.pt`` every `every` epochs (and at the end) and ``best.pt`` when `monitor` improves, in `directory`."""

    def __init__(self, directory: str | os.PathLike, *, monitor: str, mode: str, save_last: bool = True,
                 save_best: bool = True, every: int = 1, epochs: int | None = None) -> None:
        self.directory = Path(directory)
        self.monitor, self.mode = monitor, mode
        self.save_last, self.save_best = save_last, save_best
        self.every, self.epochs = every, epochs
        # Per file, the newest checkpoint not yet sent to the writer; at most one is being written.
        self._pending: dict[Path, _Packed] = {}
        self._in_flight: tuple[writer.Writer, int, _Packed] | None = None
        self._free: list[writer.Buffer] = []

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
        self._collect(block=False)
        # Copied now, before the next step changes the live tensors; pickled and written by the
        # writer process, so the training thread pays only for the copy.
        plain, tensors, specs, size = layout(capture(state), _PLAIN_KEYS)
        buffer = self._buffer(size)
        # Every epoch has the same layout: the views into a reused buffer are made once.
        known = buffer.views if buffer.specs == specs else None
        buffer.views, buffer.specs = fill(buffer.tensor, tensors, specs, known), specs
        packed = _Packed(buffer, header(plain, specs, size))
        targets = [self.best] if self.save_best and is_best else []
        targets += [self.last] if last else []
        # The newest checkpoint per file replaces one not yet written, so short epochs never
        # stall on a slow disk's fsync.
        replaced = {id(self._pending[t]): self._pending[t] for t in targets if t in self._pending}
        self._pending.update(dict.fromkeys(targets, packed))
        for old in replaced.values():
            self._release(old)
        self._dispatch()

    def wait(self) -> None:
        """Blocks until every pending write is on disk; raises the error of one that failed."""
        try:
            while self._in_flight is not None or self._pending:
                self._dispatch()
                self._collect(block=True)
        finally:
            # Normally all are free by now; after an error (or an interrupt) nothing more will
            # be written from them.
            self._drop_pending()
            if self._in_flight is not None:
                self._free.append(self._in_flight[2].buffer)
                self._in_flight = None
            for buffer in self._free:
                buffer.close()
            self._free.clear()

    def _dispatch(self) -> None:
        if self._in_flight is not None or not self._pending:
            return
        packed = next(iter(self._pending.values()))
        targets = [path for path, p in self._pending.items() if p is packed]
        process = writer.start()
        token = process.submit(packed.buffer, packed.meta, targets)  # raises if the writer is gone
        for path in targets:
            del self._pending[path]
        self._in_flight = (process, token, packed)

    def _collect(self, block: bool) -> None:
        """Takes the answer for the write in flight, if any came (waits for it when `block`), and
        sends the next; raises the error of a write that failed."""
        if self._in_flight is None:
            return
        # Asked of the writer that took it: one started since (after a crash) never heard of it.
        process, token, packed = self._in_flight
        done, error = process.result(token, block)  # raises if the writer died: `wait` cleans up
        if not done:
            return
        self._in_flight = None
        self._release(packed)
        if error is not None:
            self._drop_pending()
            raise error
        self._dispatch()

    def _drop_pending(self) -> None:
        stale = {id(p): p for p in self._pending.values()}.values()
        self._pending.clear()
        for packed in stale:
            self._release(packed)

    def _buffer(self, size: int) -> writer.Buffer:
        for i, buffer in enumerate(self._free):
            if buffer.nbytes >= size:
                return self._free.pop(i)
        return writer.Buffer(size, self.directory)

    def _release(self, packed: _Packed) -> None:
        busy = any(p is packed for p in self._pending.values()) or (self._in_flight is not None and self._in_flight[2] is packed)
        if not busy:
            self._free.append(packed.buffer)

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
    if payload.get("format") not in (1, FORMAT):
        raise ValueError(f"checkpoint format {payload.get('format')!r} is not 1 or {FORMAT}")
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(as_implemented_by(payload["optimizer"], state.optimizer))
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


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if _cuda() else [],
        "python": _python_rng(),
        "shuffle": generator.get_state() if generator is not None else None,
        "numpy": None,
    }
    with contextlib.suppress(ImportError):
        state["numpy"] = _numpy_rng()
    return state


# NumPy's global state at the last checkpoint: (its raw words and position, what was saved).
_numpy_last: tuple[bytes, tuple] | None = None


def _numpy_rng() -> tuple:
    """NumPy's global RNG state, with its 624 words as a tensor (weights_only loads need no NumPy
    globals; the uint32 words as int32, which `set_rng_state` casts back bit for bit).

    `np.random.get_state()` copies the words one by one (80 us, half of a checkpoint's RNG
    capture), and a training loop rarely draws from NumPy. So the raw state (words and position,
    2.5 kB read in 1 us) is compared with the last checkpoint's, and the saved state reused when
    it has not moved. Not when a Gaussian was cached then: using it changes no word.
    """
    global _numpy_last
    import numpy as np

    raw = _raw_numpy_state(np)
    if raw is not None and _numpy_last is not None and _numpy_last[0] == raw:
        return _numpy_last[1]
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    saved = (kind, torch.from_numpy(keys.view(np.int32)), pos, has_gauss, cached)
    _numpy_last = (raw, saved) if raw is not None and not has_gauss else None
    return saved


def _raw_numpy_state(np: Any) -> bytes | None:
    try:
        generator = np.random.mtrand._rand._bit_generator
        if type(generator).__name__ != "MT19937":
            return None
        # struct mt19937_state {uint32_t key[624]; int pos;}
        return ctypes.string_at(generator.ctypes.state_address, 624 * 4 + 4)
    except (AttributeError, TypeError):
        return None


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
            np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))


def _python_rng() -> tuple[int, torch.Tensor, float | None]:
    # 625 ints as one tensor: pickling them one by one costs more than the whole model.
    version, keys, gauss = random.getstate()
    # Through an array: torch.tensor() of a 625-tuple converts int by int (40 us a checkpoint).
    return version, torch.frombuffer(array.array("q", keys), dtype=torch.int64), gauss


@functools.cache
def _cuda() -> bool:
    # Asked once: is_available() costs tens of microseconds per checkpoint, and cannot change.
    return torch.cuda.is_available()


def _stateful(callbacks: list[Any]) -> list[tuple[str, Any]]:
    # Keyed by position and class, so a resumed run with the same callback list finds its own state.
    return [
        (f"{i}:{type(cb).__name__}", cb)
        for i, cb in enumerate(callbacks)
        if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))
    ]
