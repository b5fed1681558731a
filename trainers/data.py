"""Datasets as device-resident tensors, batched by index slices.

Small and medium datasets fit on the device; slicing a pre-shuffled permutation
there costs nothing per sample, where a DataLoader pays Python per item. A
`torch.utils.data.DataLoader` is accepted too, for data that does not fit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

Split = tuple[torch.Tensor, ...] | DataLoader


@dataclass
class Data:
    """Training and validation splits: each a tuple of tensors (inputs, targets) or a DataLoader."""

    train: Split
    val: Split

    def to(self, device: torch.device, *, channels_last: bool = False) -> Data:
        return Data(_split_to(self.train, device, channels_last), _split_to(self.val, device, channels_last))


def place(
    data: Data,
    device: torch.device,
    *,
    on_device: bool | None,
    batch_size: int,
    eval_batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    num_workers: int = 0,
    channels_last: bool = False,
) -> Data:
    """Tensors on `device` when they fit (or `on_device` says so); otherwise DataLoaders that
    stream batches from host memory with `num_workers` and pinned memory."""
    if on_device is None:
        on_device = _fits(data, device)
    if on_device:
        return data.to(device, channels_last=channels_last)

    def loader(split: Split, size: int, shuffle: bool) -> Split:
        if isinstance(split, DataLoader):
            return split
        return DataLoader(
            TensorDataset(*split), batch_size=size, shuffle=shuffle, generator=generator,
            num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        )

    return Data(loader(data.train, batch_size, shuffle), loader(data.val, eval_batch_size, False))


def n_batches(split: Split, batch_size: int) -> int:
    return len(split) if isinstance(split, DataLoader) else -(-len(split[0]) // batch_size)


def as_data(obj: Any) -> Data:
    """Accepts what a data factory may return: `Data`, ``{"train": …, "val": …}``,
    or ``(x_train, y_train, x_val, y_val)``."""
    if isinstance(obj, Data):
        data = obj
    elif isinstance(obj, dict) and set(obj) >= {"train", "val"}:
        data = Data(_as_split(obj["train"]), _as_split(obj["val"]))
    elif isinstance(obj, Sequence) and len(obj) == 4:
        data = Data(_as_split(obj[0:2]), _as_split(obj[2:4]))
    else:
        raise TypeError(
            "a data factory must return trainers.Data, {'train': ..., 'val': ...} or "
            f"(x_train, y_train, x_val, y_val), not {type(obj).__name__}"
        )
    for name, split in (("train", data.train), ("val", data.val)):
        if isinstance(split, tuple) and len({len(t) for t in split}) != 1:
            raise ValueError(f"the {name} tensors have different lengths: {[len(t) for t in split]}")
    return data


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    device: torch.device,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yields batches on `device`; for tensors, one permutation per epoch and index slices."""
    if isinstance(split, DataLoader):
        for batch in split:
            yield tuple(_to(t, device, channels_last) for t in batch)
        return
    n = len(split[0])
    if not shuffle:
        # A copy, as a DataLoader's batch is: a slice would be a view of data that later epochs
        # and trials share, and a model or step that changed its input in place would change it.
        for start in range(0, n, batch_size):
            yield tuple(t[start : start + batch_size].clone() for t in split)
        return
    # The permutation is drawn on the CPU with the seeded generator so that the order is the
    # same on every device; moving n int64s once per epoch is negligible.
    order = torch.randperm(n, generator=generator).to(device, non_blocking=True)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield tuple(t[index] for t in split)


def _as_split(obj: Any) -> Split:
    if isinstance(obj, DataLoader):
        return obj
    return tuple(t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in obj)


def _split_to(split: Split, device: torch.device, channels_last: bool = False) -> Split:
    if isinstance(split, DataLoader):
        return split
    return tuple(_to(t, device, channels_last) for t in split)


def _to(t: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    t = t.to(device, non_blocking=True)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _fits(data: Data, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # CPU tensors are already where the model is
    size = sum(t.numel() * t.element_size() for split in (data.train, data.val) if isinstance(split, tuple) for t in split)
    free, _ = torch.cuda.mem_get_info(device)
    return size < free / 2  # leave the other half for activations
