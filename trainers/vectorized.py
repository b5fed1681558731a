"""K models of one architecture trained as one stacked model: one forward, one backward and one
optimizer update per batch for all of them, each slot with its own hyperparameters.

Small models leave the device idle: on a CPU a digits MLP step is mostly per-op overhead, and
that overhead is paid once for K slots here. The parameters of the K models are stacked along a
new leading dimension (as `torch.func.stack_module_state` stacks them); a plain `nn.Sequential` of linear
layers, element-wise activations and dropout runs as batched matrix products, anything else
through `torch.func.vmap` over `functional_call`. The loss is the *sum* of the slots' mean
losses, so each slot's gradient is exactly its own model's gradient; on the batched-matmul path
its backward is written out (`trainers.stacked_backward`) rather than recorded by autograd.

Per slot, as `fit` does for one run: the optimizer (`trainers.stacked_optim`: SGD, Adam, AdamW by torch's fused kernels,
RMSprop and Adagrad by torch.optim's functional updates, each on the slot's views of the stacked
tensors) and its hyperparameters; the learning-rate schedule; the dropout rate, as a stacked
buffer; batch norm's running statistics; label smoothing; the gradient-clip value; fp16's loss
scale; early stopping, loggers and checkpoints in `fit`'s format; and in the batched-matmul path
the activation. A slot can be replaced (fresh weights and optimizer state, its epoch count back
to 0) or dropped, so a caller can prune and refill slots while the others train on.

On the batched-matmul path, MLPs that differ only in their hidden widths stack too, each slot
padded with zeros to the group's widest sizes (`architecture`): exact where every activation
between two linear layers maps 0 to 0.

Models that cannot be stacked raise `NotVectorizable` when the group is built (the first
forward and backward run there), so the caller can train them one at a time instead.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from trainers import metrics as metrics_mod
from trainers import stacked_backward
from trainers.callbacks import Dispatch
from trainers.checkpoint import Checkpoints
from trainers.config import TrainerConfig
from trainers.data import Data, n_batches
from trainers.loop import (
    NonFiniteLossError,
    State,
    built_in_callbacks,
    clip_value,
    label_smoothing,
    optimizer_spec,
    resolve_device,
)
from trainers.precision import DTYPES, autocast_for
from trainers.schedule import Schedule, build_schedule, merge
from trainers.stacked_optim import StackedOptimizer, StackedScaler, keeps_padding, per_slot, region, stand_in_optimizer

STACKED_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
# Options each stacked optimizer takes per slot (torch.optim's names; beta1/beta2 as in build_optimizer).
OPTIMIZER_OPTIONS = {
    "sgd": {"lr", "weight_decay", "momentum", "nesterov", "dampening"},
    "adam": {"lr", "weight_decay", "beta1", "beta2", "betas", "eps", "amsgrad"},
    "adamw": {"lr", "weight_decay", "beta1", "beta2", "betas", "eps", "amsgrad"},
    "rmsprop": {"lr", "weight_decay", "alpha", "eps", "momentum", "centered"},
    "adagrad": {"lr", "weight_decay", "lr_decay", "eps", "initial_accumulator_value"},
}
# These choose torch's implementation of the same update, which the stacked one replaces.
IMPLEMENTATION_OPTIONS = {"fused", "foreach"}
# Parameter-free element-wise modules: applied to a [K, B, ...] tensor they act on each slot alone.
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
               nn.Identity, nn.Hardtanh, nn.ReLU6, nn.SELU, nn.CELU, nn.Softsign, nn.Tanhshrink)


class NotVectorizable(RuntimeError):
    """These models or settings cannot be trained as one stacked model; the message says why."""


class Stopped(Exception):
    """The caller's `stop` check asked the run to end; the slots still training are in `slots`."""

    def __init__(self, slots: list[Slot]) -> None:
        super().__init__("stopped on request")
        self.slots = slots


def signature(model: nn.Module, *, exact: bool = False) -> tuple:
    """What must agree for models to be stacked: every parameter's and buffer's name, shape and
    dtype, and every submodule's type.

    In a plain `nn.Sequential` of linear layers, element-wise activations and dropout (the
    batched-matmul path) the activations may differ per slot: each distinct one is applied to
    the whole stack and the slots pick theirs, so there the activation is left out unless `exact`.
    """
    tensors = tuple((name, tuple(t.shape), str(t.dtype)) for name, t in (*model.named_parameters(), *model.named_buffers()))
    loose = not exact and _sequential_plan(model) is not None
    modules = tuple((name, "elementwise" if loose and type(m) in ELEMENTWISE else type(m).__qualname__)
                    for name, m in model.named_modules())
    return tensors, modules


@dataclass(frozen=True)
class Architecture:
    """A model's architecture as stacking sees it: `layout`, what must agree for two models to be
    stacked (their `signature` with each tensor's sizes left out, and the first layer's inputs and
    the last layer's outputs); `shapes`, each parameter's and buffer's; and whether its hidden
    widths may be padded with zeros to a wider group's (`paddable`)."""

    layout: tuple
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    paddable: bool

    @functools.cached_property
    def size(self) -> int:
        """Its number of parameter and buffer elements: what a step costs, roughly, per slot."""
        return sum(math.prod(shape) for _, shape in self.shapes)

    def fits(self, group: Architecture) -> bool:
        """Whether a model of this architecture can take a slot in `group` (shapes as the group's,
        or narrower in its hidden widths and padded)."""
        if self.layout != group.layout:
            return False
        if self.shapes == group.shapes:
            return True
        return self.paddable and all(a <= b for (_, mine), (_, theirs) in zip(self.shapes, group.shapes)
                                     for a, b in zip(mine, theirs))


def architecture(model: nn.Module) -> Architecture:
    """`model`'s `Architecture`.

    Padding is exact only on the batched-matmul path (a plain `nn.Sequential` of linear layers,
    element-wise activations and dropout) and where each activation between two linear layers maps
    0 to 0 (ReLU, GELU, tanh, SiLU, ...; not sigmoid or softplus). A padded hidden unit then has
    zero weights in, zero bias, output 0 and zero weights out: it adds exactly 0 to the next layer,
    its gradients are exactly 0, so its weights stay 0 under every stacked optimizer (weight decay
    included), and the slot computes what its own model computes.
    """
    tensors, modules = signature(model)
    plan = _sequential_plan(model)
    linears = [i for i, (_, layer) in enumerate(plan or []) if type(layer) is nn.Linear]
    ends = (plan[linears[0]][1].in_features, plan[linears[-1]][1].out_features) if linears else None
    paddable = bool(linears) and all(_keeps_zero(layer) for i, (_, layer) in enumerate(plan)
                                     if linears[0] < i < linears[-1] and type(layer) in ELEMENTWISE)
    layout = (tuple((name, len(shape), dtype) for name, shape, dtype in tensors), modules, ends)
    return Architecture(layout, tuple((name, shape) for name, shape, _ in tensors), paddable)


def widest(architectures: Sequence[Architecture]) -> Architecture:
    """The architecture that every one of `architectures` (of one layout) fits: each size the largest."""
    first = architectures[0]
    shapes = tuple((name, tuple(max(dims) for dims in zip(*(a.shapes[i][1] for a in architectures))))
                   for i, (name, _) in enumerate(first.shapes))
    return Architecture(first.layout, shapes, all(a.paddable for a in architectures))


def _keeps_zero(module: nn.Module) -> bool:
    with torch.no_grad():
        return bool(_out_of_place(module)(torch.zeros(1)).eq(0).all())


def check_model(model: nn.Module) -> None:
    """Raises `NotVectorizable` for what is known not to stack, before any work."""
    for name, module in model.named_modules():
        # Batch norm stacks: its running statistics are stacked buffers that vmap updates per slot.
        if isinstance(module, (nn.RNNBase,)):
            raise NotVectorizable(f"{type(module).__name__} at {name} uses fused recurrent kernels that vmap cannot batch")


def check_settings(config: TrainerConfig, data: Data) -> None:
    """Raises `NotVectorizable` for trainer settings the stacked loop does not implement yet."""
    unsupported = {
        "compile": config.compile,
        "channels_last": config.channels_last,
    }
    found = [what for what, on in unsupported.items() if on]
    if found:
        raise NotVectorizable(f"trainer setting {', '.join(found)} is not supported by the stacked loop yet")
    if not (isinstance(data.train, tuple) and isinstance(data.val, tuple)):
        raise NotVectorizable("the data streams from a DataLoader; the stacked loop needs tensors")


def check_hparams(hparams: Mapping[str, Any], config: TrainerConfig) -> dict[str, Any]:
    """The slot's optimizer spec; raises `NotVectorizable` for an optimizer or option not stacked yet,
    and for settings `fit` would reject (an optimizer option, a schedule, label smoothing, a clip
    value), so that the trial runs alone and fails there with fit's error, not its group."""
    spec = optimizer_spec(config, hparams)
    name = str(spec.get("name", "adam")).lower()
    if name not in STACKED_OPTIMIZERS:
        raise NotVectorizable(f"optimizer {name} has no stacked implementation (stacked: {', '.join(STACKED_OPTIMIZERS)})")
    unknown = sorted(set(spec) - {"name"} - OPTIMIZER_OPTIONS[name] - IMPLEMENTATION_OPTIONS)
    if unknown:
        raise NotVectorizable(f"optimizer {name} option {', '.join(unknown)} is not stacked yet")
    if name in ("rmsprop", "adagrad") and str(config.precision) == "fp16-mixed":
        # Their stacked updates have no kernel that skips an overflowing slot on the device.
        raise NotVectorizable(f"{name} with precision fp16-mixed is not stacked yet")
    try:
        # Built as `fit` builds them, on a placeholder: what `fit` rejects (an option the optimizer
        # does not take, a schedule it cannot drive) must fail this trial alone, not its group.
        stand_in = stand_in_optimizer(spec)
        schedule = merge(config.scheduler, hparams.get("scheduler"))
        if schedule is not None:
            build_schedule(stand_in, schedule, total_steps=100, steps_per_epoch=10, monitor=config.monitor, mode=config.direction)
        label_smoothing(config, hparams)
        clip_value(config, hparams)
    except ValueError as err:
        raise NotVectorizable(str(err)) from None
    return {**spec, "name": name}


# ---------------------------------------------------------------------------------------------
# The stacked model


class _SlotDropout(nn.Module):
    """Dropout whose rate is a buffer, so that stacking gives every slot its own rate."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))
        self.active = True  # False when every slot's rate is 0: no random numbers drawn at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.active:
            return x
        p = self.p
        keep = (torch.rand_like(x) >= p).to(x.dtype)
        return x * keep / (1 - p)


def _swap_dropout(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `nn.Dropout` replaced by `_SlotDropout` of the same rate."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, _SlotDropout(child.p))
    return model


def _batch_norm_in_float32(model: nn.Module) -> None:
    """Makes `model`'s batch norms run in float32 under autocast. On CUDA, vmap's batch-norm
    rule feeds cuDNN a bfloat16 or float16 input with float32 running statistics, which its
    backward rejects ("Expected running_mean to have type BFloat16"); alone, the same module
    computes in float32 inside cuDNN anyway, so only the output's rounding differs."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not getattr(module, "_float32", False):
            module.__class__ = type(f"Float32{type(module).__name__}", (type(module),),
                                    {"forward": _float32_forward, "_float32": True})


def _float32_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    forward = super(type(self), self).forward
    if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
        return forward(x)
    with torch.autocast(x.device.type, enabled=False):
        return forward(x.float()).to(x.dtype)


def _out_of_place(module: nn.Module) -> nn.Module:
    """A copy of an element-wise module that does not write into its input: in a group the input
    may be the shared batch (a view of one tensor for all slots), and with activations that differ
    per slot each one reads the same input."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        module.inplace = False
    return module


def _sequential_plan(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The layers of a `nn.Sequential` that the batched-matmul path can run, or None."""
    if type(model) is not nn.Sequential:
        return None
    plan = []
    for name, layer in model.named_children():
        if type(layer) in (nn.Linear, nn.Dropout, _SlotDropout) or type(layer) in ELEMENTWISE:
            plan.append((name, layer))
        else:
            return None
    return plan


class StackedModel:
    """K models of one architecture as stacked parameter tensors [K, ...] with one forward for all
    (on the batched path, MLPs of other hidden widths padded with zeros to the widest).

    `forward(x)` takes a shared batch [B, ...] or a per-slot one [K, B, ...] and returns [K, B, ...].
    """

    def __init__(self, models: Sequence[nn.Module], device: torch.device, *, batched: bool | None = None) -> None:
        if not models:
            raise ValueError("no models to stack")
        archs = [architecture(m) for m in models]
        # The group's shapes: each the largest among the models; narrower models are padded with zeros.
        self.architecture = widest(archs) if all(a.layout == archs[0].layout for a in archs) else archs[0]
        for i, arch in enumerate(archs):
            if not arch.fits(self.architecture):
                raise NotVectorizable(f"model {i} has another architecture than the others (its signature differs)")
        for m in models:
            check_model(m)
        swapped = [_swap_dropout(m).to(device) for m in models]
        self.device = device
        self.base = copy.deepcopy(swapped[0]).to("meta")
        if device.type == "cuda":
            _batch_norm_in_float32(self.base)
        # Per slot: its own shapes where they are narrower than the group's (None: the group's).
        self.slot_shapes = [None if a.shapes == self.architecture.shapes else dict(a.shapes) for a in archs]
        full = dict(self.architecture.shapes)
        self.params = {name: torch.zeros((len(models), *full[name]), dtype=p.dtype, device=device)
                       for name, p in swapped[0].named_parameters()}
        with torch.no_grad():
            for k, m in enumerate(swapped):
                self._write_params(k, m, zero=False)  # onto zeros already
        self.params = {k: v.requires_grad_(True) for k, v in self.params.items()}
        self.buffers = {name: torch.stack([dict(m.named_buffers())[name] for m in swapped]) for name, _ in swapped[0].named_buffers()}
        self.dropouts = {name: m for name, m in self.base.named_modules() if isinstance(m, _SlotDropout)}
        self.plan = _sequential_plan(self.base) if batched is not False else None
        if self.plan is None and any(self.slot_shapes):
            raise NotVectorizable("the models' hidden widths differ, which only the batched-matmul path of an nn.Sequential pads")
        if self.plan is None and any(signature(m, exact=True) != signature(models[0], exact=True) for m in models):
            raise NotVectorizable("the models' activations differ, which only the batched-matmul path of an nn.Sequential handles")
        # Each slot's own activation modules, by position (the batched path applies them per slot).
        self.activations = {name: [_out_of_place(getattr(m, name)) for m in swapped] for name, layer in (self.plan or [])
                            if type(layer) in ELEMENTWISE}
        self._sync_activations()
        self.training = True
        self._vmapped = {
            shared: vmap(self._one, in_dims=(0, 0, None if shared else 0), randomness="different") for shared in (True, False)
        }
        self._sync_dropout()

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> None:
        self.training = mode
        self.base.train(mode)

    def eval(self) -> None:
        self.train(False)

    def _one(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x: torch.Tensor, *, shared: bool = True) -> torch.Tensor:
        if self.plan is None:
            return self._vmapped[shared](self.params, self.buffers, x)
        h = x.expand(self.size, *x.shape) if shared else x  # the shared batch: a view, not K copies
        for name, layer in self.plan:
            if type(layer) is nn.Linear:
                weight, bias = self.params[f"{name}.weight"], self.params.get(f"{name}.bias")
                # [K, B, in] @ [K, in, out], the bias added by the same call (one op less each way).
                h = torch.bmm(h, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            elif type(layer) is _SlotDropout:
                if self.training and layer.active:
                    h, _ = self.dropout(name, h)
            else:
                h = self._activate(name, h)
        return h

    __call__ = forward

    def dropout(self, name: str, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batched path's dropout at `name` in training: `h` masked, in its dtype, and the mask."""
        mask = self.keep_mask(name, h)
        out = h * mask
        return (out if out.dtype == h.dtype else out.to(h.dtype)), mask

    def keep_mask(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """The batched path's dropout mask at `name` for `h` [K, ...]: slot k keeps each unit with
        probability 1 - p_k, rounded to a multiple of 1/65536, and scales it by the inverse of
        that probability, so that the mask's expectation is exactly 1. In h's dtype, or float32
        for a 16-bit h (in bfloat16 the scale 1/0.9 would be 1.109375; in float16 up to 65536)."""
        threshold, scale = self._keep[name]
        shape = (-1, *([1] * (h.dim() - 1)))
        n = h.numel()
        # Four 16-bit uniform numbers from each 64-bit draw: the generator was most of dropout's
        # time, one 32-bit draw per unit for torch.rand_like (digits MLP, 8 slots: 114 us against 83).
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=h.device).random_(-2**63, None)
        keep = bits.view(torch.int16)[:n].view(h.shape) <= threshold.view(shape)
        # One op from the comparison to the scaled mask, and through uint8: on this CPU bool converts
        # to float 4x slower (8 slots of [64, 64]: 12.2 us, 3.3 us from uint8, 4.7 us with the scale).
        mask = torch.mul(keep.view(torch.uint8), scale.view(shape))  # float32, as `scale`
        return mask if h.dtype != torch.float64 else mask.to(h.dtype)

    def _activate(self, name: str, h: torch.Tensor) -> torch.Tensor:
        kinds = self._kinds[name]
        out = kinds[0][0](h)
        for module, mask in kinds[1:]:  # a mixed group: each distinct activation once, each slot takes its own
            out = torch.where(mask.view(-1, *([1] * (h.dim() - 1))), module(h), out)
        return out

    def _sync_activations(self) -> None:
        """Per position: the distinct activations among the slots, with the mask of slots using each."""
        self._kinds: dict[str, list[tuple[nn.Module, torch.Tensor | None]]] = {}
        for name, modules in self.activations.items():
            keys = [(type(m), m.extra_repr()) for m in modules]
            distinct = list(dict.fromkeys(keys))
            self._kinds[name] = [
                (modules[keys.index(key)], torch.tensor([k == key for k in keys], device=self.device))
                for key in distinct
            ]

    def load_slot(self, index: int, model: nn.Module) -> None:
        """Copies `model`'s weights and buffers into slot `index` (a refill), padded with zeros
        where its hidden widths are narrower than the group's."""
        arch = architecture(model)
        if not arch.fits(self.architecture):
            raise NotVectorizable("the new model has another architecture than the group")
        padded = arch.shapes != self.architecture.shapes
        # Straight from the model, not from a copy with its dropout swapped: a refill then costs
        # a copy per tensor, not a deep copy of the module tree (4 ms per trial on the digits MLP).
        with torch.no_grad():
            self._write_params(index, model, zero=padded or self.slot_shapes[index] is not None)
            for name, value in model.named_buffers():
                self.buffers[name][index].copy_(value)
            for name in self.dropouts:
                self.buffers[f"{name}.p"][index] = float(model.get_submodule(name).p)
        self.slot_shapes[index] = dict(arch.shapes) if padded else None
        for name, modules in self.activations.items():
            modules[index] = _out_of_place(getattr(model, name))  # element-wise, without tensors: any device
        self._sync_dropout()
        self._sync_activations()

    def _write_params(self, index: int, model: nn.Module, *, zero: bool) -> None:
        """`model`'s parameters into slot `index`, in the leading corner of each padded tensor;
        `zero`: the rest zeroed first (a slot that is or was padded)."""
        for name, value in model.named_parameters():
            target = self.params[name][index]
            if zero:
                target.zero_()
            target[region(value.shape)].copy_(value)

    def keep(self, indices: Sequence[int]) -> None:
        """Keeps only the slots at `indices`, in that order (the group shrinks)."""
        index = torch.tensor(list(indices), device=self.device, dtype=torch.long)
        self.params = {k: v.detach().index_select(0, index).requires_grad_(True) for k, v in self.params.items()}
        self.buffers = {k: v.index_select(0, index) for k, v in self.buffers.items()}
        self.activations = {name: [modules[i] for i in indices] for name, modules in self.activations.items()}
        self.slot_shapes = [self.slot_shapes[i] for i in indices]
        self._sync_dropout()
        self._sync_activations()

    def slot_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Slot `index`'s weights under the original model's names and in its own shapes (dropout
        rates left out)."""
        shapes = self.slot_shapes[index]
        out = {k: (v[index] if shapes is None else v[index][region(shapes[k])]).detach().clone() for k, v in self.params.items()}
        out.update({k: v[index].clone() for k, v in self.buffers.items() if k.rsplit(".", 1)[0] not in self.dropouts})
        return out

    def own_shapes(self, index: int) -> list[tuple[int, ...]] | None:
        """Slot `index`'s parameter shapes, in the order of `parameters()`, where it is padded."""
        shapes = self.slot_shapes[index]
        return None if shapes is None else [shapes[name] for name in self.params]

    def _sync_dropout(self) -> None:
        self._keep: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, module in self.dropouts.items():
            p = self.buffers[f"{name}.p"]
            module.active = bool((p > 0).any())
            # Units kept of 65536; a uniform int16 r is kept when r <= units - 32769.
            units = ((1 - p.float()) * 65536).round().clamp(0, 65536)
            threshold = (units - 32769).clamp(min=-32768).to(torch.int16)
            scale = torch.where(units > 0, 65536 / units.clamp(min=1), 0).float()  # p = 1: all dropped
            self._keep[name] = (threshold, scale)


# ---------------------------------------------------------------------------------------------
# The loop over a population of slots


@dataclass
class Slot:
    """One model in the group, as its callbacks see it (the fields `trainers.State` has for one run)."""

    key: Any  # the caller's handle, e.g. a trial
    hparams: dict[str, Any]
    seed: int | None = None
    epoch: int = 0  # the epoch being trained or just validated (0-based), as `State.epoch`
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)
    should_stop: bool = False
    stop_reason: str | None = None
    error: BaseException | None = None  # set when this slot failed (a callback raised, a NaN loss)
    resumed: bool = False  # as `State.resumed`; slots always start fresh
    generator: torch.Generator | None = None  # per-slot data order
    global_step: int = 0
    schedule: Schedule | None = None  # as `State.schedule`; set by the trainer
    checkpoint_dir: str | None = None  # this slot's last.pt and best.pt, in `fit`'s format; None: none
    log_dir: str | None = None  # where the config's loggers write for this slot; None: no loggers
    best: float | None = None  # as `State.best` and `State.best_epoch`, kept by the checkpoints
    best_epoch: int = -1
    base_lr: float = 0.0  # the slot's learning rate before any schedule; set by the trainer
    label_smoothing: float = 0.0  # of its training loss (classification); set by the trainer
    clip: float | None = None  # its gradient_clip_val; set by the trainer

    def stop(self, reason: str) -> None:
        """Ends this slot after the current epoch."""
        self.should_stop, self.stop_reason = True, reason

    @property
    def done(self) -> bool:
        return self.should_stop or self.error is not None

    @property
    def lr(self) -> float:
        """The learning rate of the slot's next step, as `State.lr`."""
        return self.schedule.scheduler.optimizer.param_groups[0]["lr"] if self.schedule is not None else self.base_lr


class _StateDict:
    """Stands in for a slot's module, optimizer or scaler where only `state_dict()` is read."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


Refill = Callable[[Slot], "tuple[nn.Module, Slot] | None"]


class StackedTrainer:
    """Trains a group of slots epoch by epoch; the caller may replace or drop slots between epochs.

    Args:
        per_slot_data: each slot draws its own batch order from a generator seeded with its seed
            (as `fit` does for one run); otherwise all slots share one order (the default: one
            gather per batch for all slots, and the slots' curves differ only by their hyperparameters).
    """

    def __init__(
        self,
        data: Data,
        config: TrainerConfig,
        *,
        kind: str = "classification",
        per_slot_data: bool = False,
        seed: int | None = None,
        batched: bool | None = None,
    ) -> None:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        check_settings(config, data)
        self.config, self.kind, self.per_slot_data = config, kind, per_slot_data
        self.device = resolve_device(config.device)
        self.autocast = autocast_for(config.precision, self.device)
        self.data = data.to(self.device)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.batched = batched
        self.model: StackedModel | None = None
        self.written_out = False  # set by `start`
        self._kept_grads = False  # whether `.grad` holds the last step's gradients, for the next to overwrite
        self.optimizer: StackedOptimizer | None = None
        self.scaler: StackedScaler | None = None  # fp16-mixed only
        self.slots: list[Slot] = []
        self.checkpoints: list[Checkpoints | None] = []  # per slot
        self.stop: Callable[[], bool] | None = None  # checked before every batch and slot event

    @property
    def size(self) -> int:
        return len(self.slots)

    def start(self, models: Sequence[nn.Module], slots: Sequence[Slot]) -> None:
        """Builds the stacked model and runs one forward and backward on a real batch: a model that
        cannot be stacked fails here, with `NotVectorizable`, before any slot trained."""
        specs = [check_hparams(s.hparams, self.config) for s in slots]
        self.model = StackedModel(models, self.device, batched=self.batched)
        for spec, shapes in zip(specs, self.model.slot_shapes):
            _check_padding(spec, padded=shapes is not None)
        # The batched path's backward written out: the same gradients in fewer ops (`trainers.stacked_backward`).
        self.written_out = self.model.plan is not None
        self.optimizer = StackedOptimizer(self.model.parameters(), specs)
        if str(self.config.precision) == "fp16-mixed":
            self.scaler = StackedScaler(len(slots), self.device)
        self.slots = list(slots)
        self.checkpoints = [None] * len(slots)
        for k, (slot, spec) in enumerate(zip(self.slots, specs)):
            self._prepare(k, slot, spec)
        self._probe(models)
        for k, slot in enumerate(self.slots):
            self._attach(k, slot)

    def replace(self, index: int, model: nn.Module, slot: Slot) -> None:
        """Slot `index` starts over with `model` (fresh weights and optimizer state) as `slot`."""
        spec = check_hparams(slot.hparams, self.config)
        # Before anything changes: a refill refused leaves the group as it was.
        _check_padding(spec, padded=architecture(model).shapes != self.model.architecture.shapes)
        self.model.load_slot(index, model)
        self.optimizer.reset_slot(index, spec)
        if self.scaler is not None:
            self.scaler.reset_slot(index)
        self.slots[index] = slot
        self._prepare(index, slot, spec)
        self._attach(index, slot)

    def keep(self, indices: Sequence[int]) -> None:
        """Drops every slot not in `indices` (the group shrinks)."""
        if not indices:
            self.slots = []
            return
        self.model.keep(indices)
        self.optimizer.rebind(self.model.parameters(), indices)
        if self.scaler is not None:
            self.scaler.keep(indices)
        self.slots = [self.slots[i] for i in indices]
        self.checkpoints = [self.checkpoints[i] for i in indices]

    def _prepare(self, index: int, slot: Slot, spec: Mapping[str, Any]) -> None:
        """What `fit`'s setup does for one run's training: data order, lr, smoothing, clipping, schedule."""
        if self.per_slot_data and slot.generator is None and slot.seed is not None:
            slot.generator = torch.Generator().manual_seed(slot.seed)
        slot.base_lr = float(spec["lr"])
        slot.label_smoothing = label_smoothing(self.config, slot.hparams)
        slot.clip = clip_value(self.config, slot.hparams)
        self.optimizer.groups[index] = self._schedule(slot)

    def _attach(self, index: int, slot: Slot) -> None:
        # After the probe: a group that falls back to solo runs has opened no logger (an MLflow
        # run, a TensorBoard file) that its trials' solo runs would then open again.
        slot.callbacks = [*built_in_callbacks(self.config, slot.log_dir), *slot.callbacks]
        self.checkpoints[index] = self._checkpoints(slot)

    def _checkpoints(self, slot: Slot) -> Checkpoints | None:
        if slot.checkpoint_dir is None:
            return None
        c = self.config
        return Checkpoints(slot.checkpoint_dir, monitor=c.monitor, mode=c.direction, save_last=c.save_last,
                           save_best=c.save_best, every=c.checkpoint_every, epochs=c.epochs)

    def checkpoint(self, index: int) -> None:
        """Slot `index`'s checkpoints after its epoch, as `fit` writes them and in its format (so a
        retry of the trial resumes alone from them); a failed write fails that slot only."""
        checkpoints, slot = self.checkpoints[index], self.slots[index]
        if checkpoints is None or slot.error is not None:
            return
        try:
            scaler = _StateDict(self.scaler.slot_state_dict(index)) if self.scaler is not None else None
            state = State(model=_StateDict(self.model.slot_state_dict(index)),
                          optimizer=_StateDict(self.optimizer.slot_state_dict(index, self.model.own_shapes(index))), config=self.config,
                          device=self.device, epoch=slot.epoch, global_step=slot.global_step, metrics=slot.metrics,
                          history=slot.history, should_stop=slot.should_stop, stop_reason=slot.stop_reason,
                          schedule=slot.schedule, scaler=scaler, generator=slot.generator or self.generator,
                          callbacks=slot.callbacks, best=slot.best, best_epoch=slot.best_epoch)
            checkpoints.save(state)
        except Exception as err:
            slot.error = err
            return
        slot.best, slot.best_epoch = state.best, state.best_epoch

    def wait_checkpoints(self, index: int) -> None:
        """Blocks until slot `index`'s writes are on disk; a write that failed fails the slot."""
        if self.checkpoints[index] is not None:
            try:
                self.checkpoints[index].wait()
            except Exception as err:
                self.slots[index].error = self.slots[index].error or err

    def flush_checkpoints(self) -> None:
        """Blocks until every slot's writes are on disk, whatever fails (the group is ending)."""
        for checkpoints in self.checkpoints:
            if checkpoints is not None:
                with contextlib.suppress(BaseException):
                    checkpoints.wait()

    def _schedule(self, slot: Slot) -> dict[str, Any] | None:
        """Builds the slot's schedule, as `fit` would, on a torch optimizer that stands in for the
        slot's (over one placeholder tensor): torch's schedulers then drive its param group, which
        the stacked update reads. Returns that group, or None when the slot has no schedule."""
        spec = merge(self.config.scheduler, slot.hparams.get("scheduler"))
        if spec is None:
            slot.schedule = None
            return None
        stand_in = stand_in_optimizer(optimizer_spec(self.config, slot.hparams))
        windows = -(-n_batches(self.data.train, self.config.batch_size) // self.config.accumulate_grad_batches)
        slot.schedule = build_schedule(stand_in, spec, total_steps=windows * self.config.epochs, steps_per_epoch=windows,
                                       monitor=self.config.monitor, mode=self.config.direction)
        stand_in.step()  # no gradient, so no change; torch warns when a scheduler steps before its optimizer did
        return stand_in.param_groups[0]

    def _probe(self, models: Sequence[nn.Module]) -> None:
        # A copy: the probe must not write into the data, whatever the model does to its input.
        x = self.data.train[0][: self.config.batch_size].clone()
        version = x._version
        batch = (x,) if not self.per_slot_data else (x.expand(self.size, *x.shape),)
        # A train-mode forward moves batch norm's running statistics: the probe must leave none moved.
        buffers = {k: v.clone() for k, v in self.model.buffers.items()}
        try:
            with self.autocast():
                out = self.model(batch[0], shared=not self.per_slot_data)
            if x._version != version:
                # The slots share each batch (and, unshuffled, batches are views of the data).
                raise NotVectorizable("the model changes its input in place")
            out.float().sum().backward()
            if self.written_out:  # the step training takes: what fails there falls back to solo runs too
                y = self.data.train[1][: self.config.batch_size].clone()
                y = y if not self.per_slot_data else y.expand(self.size, *y.shape)
                self._backward(batch[0], y, not self.per_slot_data)
                self._kept_grads = True  # and the steps after it, which overwrite the gradients kept
                self._backward(batch[0], y, not self.per_slot_data)
            self.optimizer.zero_grad()
            for k, v in buffers.items():
                self.model.buffers[k].copy_(v)
            # Same outputs as the models themselves (eval mode, so dropout does not differ): this
            # catches modules whose forward keeps Python state that stacking would share.
            self.model.eval()
            with torch.no_grad():
                stacked = self.model(x)[0].float()
                own = copy.deepcopy(models[0]).to(self.device).eval()(x).float()
            self.model.train()
        except NotVectorizable:
            raise
        except Exception as err:  # vmap's own errors say what it could not batch
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise NotVectorizable(f"{type(err).__name__} in the stacked forward/backward: {first[:300]}") from err
        if stacked.shape != own.shape or not torch.allclose(stacked, own, rtol=1e-3, atol=1e-4):
            raise NotVectorizable("the stacked model's output differs from the model's own (a module keeps state outside its tensors?)")

    def _train_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor, bool]]:
        x, y = self.data.train[0], self.data.train[1]
        n, size = len(x), self.config.batch_size
        if self.per_slot_data:
            orders = torch.stack([torch.randperm(n, generator=s.generator) if self.config.shuffle else torch.arange(n)
                                  for s in self.slots]).to(self.device)
            for start in range(0, n, size):
                index = orders[:, start:start + size]
                yield x[index], y[index], False
            return
        order = torch.randperm(n, generator=self.generator).to(self.device) if self.config.shuffle else None
        for start in range(0, n, size):
            if order is None:  # copies, as `trainers.data.batches` gives: never a view of the data
                yield x[start:start + size].clone(), y[start:start + size].clone(), True
            else:
                index = order[start:start + size]
                yield x[index], y[index], True

    def _smoothing(self) -> torch.Tensor | None:
        """Each slot's label smoothing, [K], or None when no slot smooths."""
        if self.kind != "classification" or not any(s.label_smoothing for s in self.slots):
            return None
        return torch.tensor([s.label_smoothing for s in self.slots], device=self.device)

    def _loss(self, out: torch.Tensor, y: torch.Tensor, shared: bool, smoothing: torch.Tensor | None = None) -> torch.Tensor:
        """Each slot's mean loss over the batch, [K]."""
        k = out.shape[0]
        targets = y.expand(k, *y.shape) if shared else y
        if self.kind == "classification":  # label smoothing with a value per slot
            per = metrics_mod.cross_entropy_rows(out, targets, None if smoothing is None else smoothing.view(-1, 1))
        else:
            per = F.mse_loss(out.reshape(targets.shape), targets, reduction="none")
        return per.reshape(k, -1).mean(1)

    def _backward(self, x: torch.Tensor, y: torch.Tensor, shared: bool, smoothing: torch.Tensor | None = None,
                  accumulate: int = 1) -> torch.Tensor:
        """One batch's forward and backward for every slot: each slot's mean loss, [K]; the
        gradients (of the losses over `accumulate`, times fp16's scales) added to `.grad`."""
        scaler = self.scaler
        if self.written_out:
            weight = scaler.scale / accumulate if scaler is not None else 1 / accumulate
            overwrite, self._kept_grads = self._kept_grads, False
            return stacked_backward.loss_and_grads(self.model, x, y, shared=shared, kind=self.kind, smoothing=smoothing,
                                                   weight=weight, dtype=DTYPES.get(str(self.config.precision)),
                                                   overwrite=overwrite)
        with self.autocast():
            out = self.model(x, shared=shared)
        losses = self._loss(out, y, shared, smoothing)
        total = (losses * scaler.scale).sum() if scaler is not None else losses.sum()
        (total / accumulate if accumulate > 1 else total).backward()
        return losses

    def _update(self, clip: torch.Tensor | None = None) -> None:
        """Every slot's optimizer step on the gradients gathered (unscaled, clipped; with fp16,
        skipped by the slots that overflowed), then the gradients cleared."""
        found_inf = None
        if self.scaler is not None:
            found_inf = self.scaler.unscale([p.grad for p in self.model.parameters() if p.grad is not None])
        self._clip(clip)
        self.optimizer.step(found_inf)
        if self.scaler is not None:
            self.scaler.update(found_inf)
        # The written-out backward overwrites the gradients the next step: kept, not freed.
        self._kept_grads = self.written_out
        self.optimizer.zero_grad(keep=self._kept_grads)

    def train_epoch(self) -> list[Slot]:
        """One pass over the training data for every slot, then validation: each slot's `metrics`
        and `history` grow by one epoch. Returns the slots (`epoch` is the epoch just validated)."""
        config = self.config
        self.model.train()
        loss_sum = torch.zeros(self.size, device=self.device)
        steps = 0
        accumulate = config.accumulate_grad_batches
        batches = list(self._train_batches())
        smoothing, clip = self._smoothing(), self._clip_values()
        per_step = [s.schedule.scheduler for s in self.slots if s.schedule is not None and s.schedule.interval == "step"]
        for i, (x, y, shared) in enumerate(batches):
            if self.stop is not None and self.stop():
                raise Stopped(list(self.slots))
            losses = self._backward(x, y, shared, smoothing, accumulate)
            if (i + 1) % accumulate == 0 or i + 1 == len(batches):
                self._update(clip)
                for scheduler in per_step:
                    scheduler.step()
            loss_sum += losses.detach()
            steps += 1
        for slot in self.slots:
            slot.global_step += -(-steps // accumulate)
        train_loss = loss_sum / max(steps, 1)
        per_slot = self.evaluate(train_loss)
        for slot, metrics in zip(self.slots, per_slot):
            slot.metrics = metrics
            slot.history.append(metrics)
            if not math.isfinite(metrics["train_loss"]):
                slot.error = NonFiniteLossError(f"training loss is {metrics['train_loss']} at epoch {slot.epoch}")
        return self.slots

    def _clip_values(self) -> torch.Tensor | None:
        """Each slot's gradient clip value, [K] (inf: not clipped), or None when no slot clips."""
        if all(s.clip is None for s in self.slots):
            return None
        return torch.tensor([math.inf if s.clip is None else s.clip for s in self.slots], device=self.device)

    def _clip(self, value: torch.Tensor | None) -> None:
        """Each slot's gradients clipped by its own value."""
        if value is None:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.config.gradient_clip_algorithm == "value":
            for g in grads:
                g.clamp_(-per_slot(value, g), per_slot(value, g))
            return
        # Per slot: the total norm over that slot's parameters, as clip_grad_norm_ computes it.
        norms = torch.stack([g.reshape(len(g), -1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()
        coef = (value / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(per_slot(coef, g))

    @torch.no_grad()
    def evaluate(self, train_loss: torch.Tensor | None = None) -> list[dict[str, float]]:
        """Each slot's validation metrics, as `trainers.loop.evaluate` computes them for one model."""
        self.model.eval()
        x_all, y_all = self.data.val[0], self.data.val[1]
        sums: dict[str, torch.Tensor] = {}  # each [K]: the group's sums in one tensor per metric
        size = self.config.eval_batch_size
        for start in range(0, len(x_all), size):
            x, y = x_all[start:start + size].clone(), y_all[start:start + size].clone()
            with self.autocast():
                out = self.model(x)
            if self.kind == "classification":
                batch = metrics_mod.stacked_classification_sums(out, y, self.config.top_k)
            else:
                batch = metrics_mod.stacked_regression_sums(out, y)
            metrics_mod.accumulate(sums, batch)
        self.model.train()
        extra = {} if train_loss is None else {"train_loss": train_loss}
        return metrics_mod.finalize_stacked(sums, len(x_all), extra)


def _check_padding(spec: Mapping[str, Any], *, padded: bool) -> None:
    if padded and not keeps_padding(spec):
        raise NotVectorizable(f"optimizer {spec['name']} with eps 0 cannot train a padded slot (its padding's update is 0/0)")


def fit_stacked(
    models: Sequence[nn.Module],
    slots: Sequence[Slot],
    data: Data,
    config: TrainerConfig,
    *,
    kind: str = "classification",
    per_slot_data: bool = False,
    seed: int | None = None,
    refill: Refill | None = None,
    on_slot_end: Callable[[Slot], None] | None = None,
    batched: bool | None = None,
    stop: Callable[[], bool] | None = None,
    before_epoch: Callable[[list[Slot]], None] | None = None,
) -> StackedTrainer:
    """Trains the slots until each has run `config.epochs` epochs or stopped; returns the trainer.

    After every validation each slot's callbacks get ``on_validation_end(slot)`` (and
    ``on_epoch_end``): a callback stops its slot with ``slot.stop(reason)``; one that raises ends
    that slot only, with `slot.error`. A slot with a `checkpoint_dir` gets `fit`'s checkpoints there
    after each epoch. A slot that is done is handed to `on_slot_end`; once every slot's epoch has
    ended, `refill(slot)` is called for each slot done and may give ``(model, new_slot)`` to train
    in its place from epoch 0; otherwise the group shrinks. The
    config's loggers and early stopping act per slot, as `fit`'s do for one run.

    `stop` is checked before every batch and every slot's end of epoch: when it returns True the
    run raises `Stopped` with the slots that were still training (e.g. a worker asked to quit
    hands their trials back between two storage calls, never inside one). `before_epoch(slots)`
    is called before each epoch trains (a worker asks its sampler for the next refills there).
    """
    trainer = StackedTrainer(data, config, kind=kind, per_slot_data=per_slot_data, seed=seed, batched=batched)
    trainer.stop = stop
    trainer.start(models, slots)
    for slot in trainer.slots:
        Dispatch(slot.callbacks)("on_fit_start", slot)
    ended: set[int] = set()  # ids of the slots that had their last event
    try:
        while trainer.size:
            if before_epoch is not None:
                before_epoch(trainer.slots)
            trainer.train_epoch()
            keep, done = [], []
            for index, slot in enumerate(trainer.slots):
                if stop is not None and stop():
                    raise Stopped(trainer.slots[index:] + [trainer.slots[i] for i in keep])
                _validation_end(slot)
                if slot.epoch + 1 >= config.epochs and not slot.done:
                    slot.stop("finished")
                trainer.checkpoint(index)
                if not slot.done:
                    slot.epoch += 1
                    keep.append(index)
                    continue
                trainer.wait_checkpoints(index)  # on disk before the slot's end is told, as `fit` does
                _fit_end(slot)
                ended.add(id(slot))
                if on_slot_end is not None:
                    on_slot_end(slot)
                done.append(index)
            # Refills after every slot's end of this epoch: a caller that asks a sampler for new
            # trials asks once for all the freed slots, having told it every result first.
            replacements = {}
            for index in done:
                new = refill(trainer.slots[index]) if refill is not None else None
                if new is not None:
                    replacements[index] = new
                    keep.append(index)
            keep.sort()
            for index, (model, fresh) in replacements.items():
                trainer.replace(index, model, fresh)
                Dispatch(fresh.callbacks)("on_fit_start", fresh)
            if len(keep) < trainer.size:
                trainer.keep(keep)
    except BaseException as error:  # as `fit` does: every slot not yet ended sees it (loggers close)
        for slot in trainer.slots:
            if id(slot) not in ended:
                with contextlib.suppress(Exception):
                    Dispatch(slot.callbacks)("on_exception", slot, slot.error or error)
        raise
    finally:
        trainer.flush_checkpoints()  # a slot handed back resumes from what was written
    return trainer


def _fit_end(slot: Slot) -> None:
    """`fit`'s last event for a slot that is done: ``on_fit_end``, or ``on_exception`` with its error."""
    emit = Dispatch(slot.callbacks)
    try:
        if slot.error is None:
            emit("on_fit_end", slot)
        else:
            emit("on_exception", slot, slot.error)
    except Exception as err:
        slot.error = slot.error or err


def _validation_end(slot: Slot) -> None:
    if slot.error is not None:
        return
    emit = Dispatch(slot.callbacks)
    try:
        emit("on_validation_end", slot)
        if slot.schedule is not None and slot.schedule.interval == "epoch":  # plateau, as `fit` steps it
            slot.schedule.scheduler.step(slot.metrics[slot.schedule.monitor])
        emit("on_epoch_end", slot)
    except Exception as err:  # one slot's callback (e.g. pruning) ends that slot, not the group
        slot.error = err  # a BaseException (Ctrl-C, a signal) still ends the whole run


def probe_width(
    make_model: Callable[[], nn.Module],
    hparams: Mapping[str, Any],
    data: Data,
    config: TrainerConfig,
    *,
    kind: str = "classification",
    max_width: int = 64,
    steps: int = 6,
    repeats: int = 3,
) -> tuple[int, dict[int, float]]:
    """Chooses K by measurement: doubles the width while the time per slot per training step
    falls, and returns the fastest width with the seconds per slot-step measured at each.

    Each width is timed `repeats` times over `steps` steps and the fastest repeat counts, so a
    burst of load from another process does not end the growth; growth stops after two widths in
    a row that do not beat the best by 5 %, on out of memory (backing off to the last width that
    fit), or when the device's memory is more than 80 % used.
    """
    device = resolve_device(config.device)
    timings: dict[int, float] = {}
    best, width, misses = 1, 1, 0
    while width <= max_width:
        try:
            trainer = StackedTrainer(data, config, kind=kind)
            trainer.start([make_model() for _ in range(width)], [Slot(None, dict(hparams)) for _ in range(width)])
            batches = list(trainer._train_batches())
            runs = []
            for _ in range(repeats):
                for i in range(steps + 1):
                    if i == 1:  # the first step of each repeat warms up
                        _sync(device)
                        started = time.perf_counter()
                    x, y, shared = batches[i % len(batches)]
                    trainer._backward(x, y, shared)  # the step training takes (written out or autograd)
                    trainer._update()
                _sync(device)
                runs.append((time.perf_counter() - started) / steps / width)
            del trainer
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        timings[width] = min(runs)
        if timings[width] < 0.95 * timings[best]:
            best, misses = width, 0
        elif width > 1:
            misses += 1
        if misses >= 2 or (device.type == "cuda" and _memory_used(device) > 0.8):
            break
        width *= 2
    return best, timings


def _memory_used(device: torch.device) -> float:
    free, total = torch.cuda.mem_get_info(device)
    return max(torch.cuda.max_memory_reserved(device) / total, 1 - free / total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "NotVectorizable",
    "Stopped",
    "Slot",
    "StackedModel",
    "StackedOptimizer",
    "StackedTrainer",
    "check_hparams",
    "check_model",
    "check_settings",
    "fit_stacked",
    "probe_width",
    "signature",
    "architecture",
    "Architecture",
    "widest",
]
