"""Per-slot optimizers and fp16 loss scaling on stacked tensors: K models' parameters stacked
along a leading dimension, each slot updated by its own rule and hyperparameters, as the torch
optimizer `fit` would build for it alone (`trainers.vectorized` trains with them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim.adagrad import adagrad
from torch.optim.rmsprop import rmsprop

from trainers.optim import build_optimizer


class StackedOptimizer:
    """SGD (momentum, nesterov, dampening), Adam and AdamW (amsgrad), RMSprop (momentum, centered)
    and Adagrad on stacked tensors,
    each slot with its own kind and hyperparameters, numerically as `torch.optim` (``fused=True``
    for the first three, whose kernels also skip an fp16 slot's overflowing step on the device).

    Slot k's parameters, gradients and state are the views ``t[k]`` of the stacked tensors (no
    copies), and each slot's update is one call of torch's fused kernel over all of its tensors:
    one pass over memory. A formula on [K, ...] tensors with per-slot coefficient tensors was
    measured first: its dozen element-wise passes made the update cost more than the forward and
    backward at width 256 on a CPU.
    """

    def __init__(self, params: list[torch.Tensor], specs: Sequence[Mapping[str, Any]]) -> None:
        self.params = params
        self.raw = [dict(s) for s in specs]  # as given: what `fit` builds a torch optimizer from
        self.specs = [_fused_options(s) for s in specs]
        # Per slot, the param group of a scheduled slot's stand-in torch optimizer (see
        # `StackedTrainer`): each step takes its lr, and one-cycle's momentum or betas, from it.
        self.groups: list[dict[str, Any] | None] = [None] * len(specs)
        self.m = [torch.zeros_like(p) for p in params]  # SGD's and RMSprop's momentum buffer, Adam's first moment
        self.v = [torch.zeros_like(p) for p in params]  # Adam's second moment, RMSprop's square average, Adagrad's sum
        # amsgrad's maximum of the second moment, centered RMSprop's gradient average: made when a
        # slot first needs them (a third copy of every parameter).
        self.aux: list[torch.Tensor] | None = None
        # Adam's and AdamW's step counts, one [K] tensor: each step adds 1 to every such slot's count
        # in one op (one kernel launch on a GPU, not K); the fused kernels read each slot's 0-d view.
        self.counts = torch.zeros(len(specs), dtype=torch.float32, device=params[0].device)
        self.counting = torch.tensor([float(_counted(s["name"])) for s in self.raw], device=params[0].device)
        # RMSprop's and Adagrad's counts: on the CPU, as torch.optim keeps them (Adagrad reads its
        # count on the host every step, which on a GPU would be a sync per tensor).
        self.host_steps = [_host_step(s["name"]) for s in self.raw]
        self.started = [False] * len(specs)  # whether the slot has stepped: SGD's first step copies the gradient
        # The gradients of the last step and each slot's views of them (`zero_grad`).
        self._grads: list[torch.Tensor] = []
        self._slot_grads: list[tuple[torch.Tensor, ...]] = []
        self._views()
        if any(_needs_aux(s) for s in self.specs):
            self._make_aux()
        for k, spec in enumerate(self.raw):
            self._initial_sum(k, spec)

    def _initial_sum(self, index: int, spec: Mapping[str, Any]) -> None:
        if spec["name"] == "adagrad" and spec.get("initial_accumulator_value", 0):
            for v in self.slot_v[index]:
                v.fill_(float(spec["initial_accumulator_value"]))

    def _views(self) -> None:
        # Per slot, the views of its tensors, made once (`unbind` is one call per tensor, not per slot).
        self.slot_params = list(zip(*(p.unbind(0) for p in self.params)))
        self.slot_m = list(zip(*(m.unbind(0) for m in self.m)))
        self.slot_v = list(zip(*(v.unbind(0) for v in self.v)))
        self.slot_aux = list(zip(*(x.unbind(0) for x in self.aux))) if self.aux is not None else None
        self.count_views = self.counts.unbind(0)

    @property
    def steps(self) -> list[torch.Tensor]:
        """Each slot's step count (an SGD slot's stays 0)."""
        return [host if host is not None else count for host, count in zip(self.host_steps, self.count_views)]

    def _make_aux(self) -> None:
        self.aux = [torch.zeros_like(p) for p in self.params]
        self._views()

    def zero_grad(self, keep: bool = False) -> None:
        """Frees the gradients; or (`keep`) leaves them, unchanged, for a backward that overwrites
        them (`stacked_backward.loss_and_grads(overwrite=True)`; one that adds would add to them):
        each step then reuses the same tensors and the slots' views of them, made once (`unbind` per
        step costs per slot)."""
        if not keep:
            for p in self.params:
                p.grad = None
            self._grads, self._slot_grads = [], []  # not held through the next forward and backward

    @torch.no_grad()
    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """One update of every slot; with fp16's `found_inf` ([K], 1.0 where a slot's gradients
        overflowed), those slots skip it on the device, as `GradScaler.step` has a fused kernel do."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        every = len(live) == len(self.params)
        grads = [self.params[i].grad for i in live]
        if len(grads) != len(self._grads) or any(g is not seen for g, seen in zip(grads, self._grads)):
            self._grads, self._slot_grads = grads, list(zip(*(g.unbind(0) for g in grads)))
        slot_grads = self._slot_grads
        self.counts.add_(self.counting)
        for k, (kind, options) in enumerate(self.specs):
            if self.groups[k] is not None:
                options = _scheduled(kind, options, self.groups[k])
            pick = (lambda views: list(views)) if every else (lambda views: [views[i] for i in live])  # noqa: E731
            params, grads, m = pick(self.slot_params[k]), list(slot_grads[k]), pick(self.slot_m[k])
            skip = found_inf[k] if found_inf is not None else None
            first, self.started[k] = not self.started[k], True
            if kind == "sgd":
                # The first update sets buf = grad, as torch's clone does (then dampening applies).
                torch._fused_sgd_(params, grads, m if options["momentum"] else [], is_first_step=first,
                                  maximize=False, found_inf=skip, **options)
                continue
            if kind in ("rmsprop", "adagrad"):
                # torch.optim's own functional update (foreach: one pass per op over the slot's
                # tensors), which adds 1 to each step tensor it is given: copies, and one count kept here.
                steps = [self.host_steps[k].clone() for _ in live]
                if kind == "rmsprop":
                    averages = pick(self.slot_aux[k]) if options["centered"] else []
                    rmsprop(params, grads, pick(self.slot_v[k]), averages, m if options["momentum"] else [], steps,
                            foreach=True, **options)
                else:
                    adagrad(params, grads, pick(self.slot_v[k]), steps, foreach=True, maximize=False, **options)
                self.host_steps[k] += 1
                continue
            fused = torch._fused_adamw_ if kind == "adamw" else torch._fused_adam_
            fused(params, grads, m, pick(self.slot_v[k]), pick(self.slot_aux[k]) if options["amsgrad"] else [],
                  [self.count_views[k]] * len(live), maximize=False, found_inf=skip, **options)
        if found_inf is not None:
            self.counts.sub_(found_inf * self.counting)  # a skipped step does not count, as in torch.optim's fused Adam

    def slot_state_dict(self, index: int, shapes: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """Slot `index`'s state as the `state_dict()` of the torch optimizer that `fit` builds for
        the trial, so that the trial run alone resumes from it. `shapes`: the slot's own parameter
        shapes, in the order of the parameters, where it is padded (None: the stacked ones)."""
        kind = self.specs[index][0]
        own = shapes if shapes is not None else [p.shape[1:] for p in self.params]
        placeholders = [torch.empty(shape) for shape in own]  # only their order and shapes count
        regions = [region(shape) for shape in own]
        optimizer = build_optimizer(placeholders, self.raw[index])
        if self.groups[index] is not None:  # a schedule's current values, and its initial_lr
            optimizer.param_groups[0].update({k: v for k, v in self.groups[index].items() if k != "params"})
        momentum = optimizer.param_groups[0].get("momentum")
        options = self.specs[index][1]
        for i, p in enumerate(placeholders):
            step, m, v = self.steps[index], self.m[i][index][regions[i]], self.v[i][index][regions[i]]
            if kind in ("adam", "adamw"):
                optimizer.state[p] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
                if options["amsgrad"]:
                    optimizer.state[p]["max_exp_avg_sq"] = self.aux[i][index][regions[i]]
            elif kind == "rmsprop":
                optimizer.state[p] = {"step": step, "square_avg": v, **({"momentum_buffer": m} if momentum else {})}
                if options["centered"]:
                    optimizer.state[p]["grad_avg"] = self.aux[i][index][regions[i]]
            elif kind == "adagrad":
                optimizer.state[p] = {"step": step, "sum": v}
            elif momentum:
                optimizer.state[p] = {"momentum_buffer": m}
        return optimizer.state_dict()

    def reset_slot(self, index: int, spec: Mapping[str, Any]) -> None:
        """Fresh state and hyperparameters for slot `index` (a refill)."""
        with torch.no_grad():
            for state in (*self.m, *self.v, *(self.aux or [])):
                state[index].zero_()
        self.counts[index] = 0
        self.counting[index] = float(_counted(spec["name"]))
        self.host_steps[index] = _host_step(spec["name"])
        self.started[index] = False
        self.raw[index] = dict(spec)
        self.specs[index] = _fused_options(spec)
        if self.aux is None and _needs_aux(self.specs[index]):
            self._make_aux()
        self._initial_sum(index, spec)
        self.groups[index] = None

    def rebind(self, params: list[torch.Tensor], indices: Sequence[int]) -> None:
        """Follows `StackedModel.keep`: new parameter tensors, state of the kept slots only."""
        index = torch.tensor(list(indices), device=params[0].device, dtype=torch.long)
        self.params = params
        self.m = [m.index_select(0, index) for m in self.m]
        self.v = [v.index_select(0, index) for v in self.v]
        self.aux = [x.index_select(0, index) for x in self.aux] if self.aux is not None else None
        self.counts, self.counting = self.counts.index_select(0, index), self.counting.index_select(0, index)
        self.host_steps = [self.host_steps[i] for i in indices]
        self._grads, self._slot_grads = [], []
        self.started = [self.started[i] for i in indices]
        self.raw = [self.raw[i] for i in indices]
        self.specs = [self.specs[i] for i in indices]
        self.groups = [self.groups[i] for i in indices]
        self._views()


def stand_in_optimizer(spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The torch optimizer `fit` would build from `spec`, over one placeholder tensor: what
    schedulers drive, and what says whether `fit` accepts the spec."""
    return build_optimizer([torch.zeros((), requires_grad=True)], spec)


def _counted(kind: str) -> bool:
    """Whether a slot's step count is one of `StackedOptimizer.counts` (the fused Adam kernels')."""
    return kind in ("adam", "adamw")


def _host_step(kind: str) -> torch.Tensor | None:
    return torch.zeros((), dtype=torch.float32) if kind in ("rmsprop", "adagrad") else None


def _scheduled(kind: str, options: dict[str, Any], group: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with the schedule's current values from a torch param group."""
    options = {**options, "lr": group["lr"]}
    if kind in ("sgd", "rmsprop"):
        options["momentum"] = group["momentum"]
    elif kind in ("adam", "adamw"):
        options["beta1"], options["beta2"] = group["betas"]
    return options


def _fused_options(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The kernel and its keyword arguments for one slot, with torch.optim's defaults."""
    name = spec["name"]
    lr = float(spec.get("lr", 1e-3))
    decay = float(spec.get("weight_decay", 0.0))
    if name == "rmsprop":
        return name, {"lr": lr, "alpha": float(spec.get("alpha", 0.99)), "eps": float(spec.get("eps", 1e-8)),
                      "weight_decay": decay, "momentum": float(spec.get("momentum", 0.0)),
                      "centered": bool(spec.get("centered", False))}
    if name == "adagrad":
        return name, {"lr": lr, "lr_decay": float(spec.get("lr_decay", 0.0)), "weight_decay": decay,
                      "eps": float(spec.get("eps", 1e-10))}
    if name == "sgd":
        return name, {"lr": lr, "weight_decay": decay, "momentum": float(spec.get("momentum", 0.0)),
                      "nesterov": bool(spec.get("nesterov", False)), "dampening": float(spec.get("dampening", 0.0))}
    beta1, beta2 = spec.get("betas", (spec.get("beta1", 0.9), spec.get("beta2", 0.999)))
    beta1, beta2 = float(spec.get("beta1", beta1)), float(spec.get("beta2", beta2))
    decay = float(spec.get("weight_decay", 1e-2 if name == "adamw" else 0.0))  # torch's defaults
    return name, {"lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": decay, "eps": float(spec.get("eps", 1e-8)),
                  "amsgrad": bool(spec.get("amsgrad", False))}


def region(shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of a narrower tensor's place in its zero-padded one (the leading corner)."""
    return tuple(slice(0, n) for n in shape)


def keeps_padding(spec: Mapping[str, Any]) -> bool:
    """Whether a slot with this optimizer keeps zero-padded elements (gradient and state 0) at 0:
    not where its update divides by the root of that state plus an eps of 0 (0/0)."""
    name, options = _fused_options(spec)
    if name == "sgd" or (name == "adagrad" and float(spec.get("initial_accumulator_value", 0.0)) > 0):
        return True
    return options["eps"] > 0


def _needs_aux(spec: tuple[str, dict[str, Any]]) -> bool:
    return bool(spec[1].get("amsgrad") or spec[1].get("centered"))


def per_slot(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[K] values shaped to scale or bound a stacked [K, ...] tensor slot by slot."""
    return values.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class StackedScaler:
    """fp16's loss scaling per slot: `torch.amp.GradScaler`'s scale, growth tracker and rules (its
    defaults), one of each per slot, as [K] tensors on the device; no host sync per step."""

    def __init__(self, size: int, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        self.init_scale, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.scale = torch.full((size,), init_scale, dtype=torch.float32, device=device)
        self.tracker = torch.zeros(size, dtype=torch.int32, device=device)

    def unscale(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Divides each slot's gradients by its scale, in place; returns [K] floats, 1.0 where a
        slot's gradients hold inf or NaN."""
        inv = self.scale.double().reciprocal().float()  # as GradScaler computes it
        found = torch.zeros_like(self.scale, dtype=torch.bool)
        for g in grads:
            g.mul_(per_slot(inv, g))
            found |= ~torch.isfinite(g).reshape(len(g), -1).all(1)
        return found.float()

    def update(self, found_inf: torch.Tensor) -> None:
        """Halves the scale of each slot that overflowed; doubles it after `growth_interval` clean steps."""
        found = found_inf.bool()
        tracker = torch.where(found, 0, self.tracker + 1)
        grown = self.scale * self.growth_factor
        grow = (tracker == self.growth_interval) & torch.isfinite(grown)
        self.scale = torch.where(found, self.scale * self.backoff_factor, torch.where(grow, grown, self.scale))
        self.tracker = torch.where(tracker == self.growth_interval, 0, tracker).to(torch.int32)

    def slot_state_dict(self, index: int) -> dict[str, Any]:
        """Slot `index`'s scaler as `GradScaler.state_dict()` gives it."""
        return {"scale": self.scale[index].item(), "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": int(self.tracker[index].item())}

    def reset_slot(self, index: int) -> None:
        self.scale[index] = self.init_scale
        self.tracker[index] = 0

    def keep(self, indices: Sequence[int]) -> None:
        index = torch.tensor(list(indices), device=self.scale.device, dtype=torch.long)
        self.scale, self.tracker = self.scale.index_select(0, index), self.tracker.index_select(0, index)
