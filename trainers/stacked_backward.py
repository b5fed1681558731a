"""A training step of the batched-matmul plan (a `StackedModel` of a plain `nn.Sequential` of
linear layers, element-wise activations and dropout) with its backward written out.

For a group of small models autograd's bookkeeping costs more than the arithmetic: every op
records a node and its saved tensors, and every parameter's gradient passes through an
accumulation node. Here the backward is each layer's own formula, in reverse: a linear layer's
grad W = g^T h, grad b = sum of g, g <- g W; dropout's g <- g * mask; the loss's gradient in
closed form (softmax minus the smoothed one-hot, over the rows; 2 (prediction - target) / n); the
common activations through torch's own backward kernels (`DERIVATIVES`), any other element-wise
module through autograd over that one op.
The gradients are added to `.grad` as `backward()` adds them, so clipping, the optimizer and
gradient accumulation see no difference; the equality is tested against autograd.

Under autocast's precisions the same step computes as autocast would: the linear layers in the
low precision, the loss in float32, the gradients added to the float32 `.grad`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from trainers.vectorized import StackedModel


@torch.no_grad()
def loss_and_grads(
    model: StackedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    shared: bool,
    kind: str,
    smoothing: torch.Tensor | None = None,
    weight: float | torch.Tensor = 1.0,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """Each slot's mean loss over the batch, [K]; every parameter's `.grad` grows by the gradient
    of the sum of the losses times `weight`: 1 / accumulate_grad_batches, and with fp16 each
    slot's loss scale ([K]). `overwrite`: the gradient replaces a `.grad` there (one that the
    optimizer kept rather than freed, `StackedOptimizer.zero_grad(keep=True)`), written
    into it where no cast is needed: no new tensor, and the optimizer's views of it stay valid.
    `dtype`: the autocast dtype (bf16, fp16), or None in full precision.
    As autocast does, the linear layers then compute in `dtype` (their inputs, weights and biases
    cast each step), the element-wise layers in their input's dtype, the loss in float32."""
    params = model.params
    h = x.expand(model.size, *x.shape) if shared else x
    # Per layer that needs its backward: (kind, the dtype of its input, of its output, what its
    # gradient needs). As autograd does, a gradient is cast to the dtype of what it is the gradient of.
    tape: list[tuple] = []
    wanted = False  # nothing before the first linear layer needs a gradient: the data does not
    # (A disabled autocast context is not free: 5-10 % of a digits step. Full precision enters none.)
    with torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        for name, layer in model.plan:
            given = h
            if type(layer) is nn.Linear:
                weight_, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
                if dtype is not None:
                    weight_, bias = _cast(weight_, dtype), _cast(bias, dtype)
                    # The shared batch, expanded to K slots without copies, is cast once, not K times.
                    h = _cast(h[0], dtype).expand_as(h) if h.stride(0) == 0 else _cast(h, dtype)
                out = torch.bmm(h, weight_.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight_.transpose(1, 2))
                tape.append(("linear", given.dtype, out.dtype, name, h, weight_, wanted))
                wanted = True
            elif name in model.dropouts:
                if not (model.training and layer.active):
                    continue
                out, mask = model.dropout(name, h)
                if wanted:
                    tape.append(("mask", given.dtype, out.dtype, mask))
            elif not wanted:
                out = model._activate(name, h)
            elif all(type(module) in DERIVATIVES for module, _ in model._kinds[name]):
                out = model._activate(name, h)
                tape.append(("activation", given.dtype, out.dtype, model._kinds[name], h, out))
            else:  # an element-wise module without a formula here: autograd over this op alone
                with torch.enable_grad():
                    leaf = h.detach().requires_grad_(True)
                    out = model._activate(name, leaf)
                tape.append(("autograd", given.dtype, out.dtype, leaf, out))
                out = out.detach()
            h = out
    losses, g = _loss_and_gradient(h, y, shared, kind, smoothing, weight)
    cast = dtype is not None  # (in full precision nothing is cast, so no gradient needs casting back)
    for what, before, after, *saved in reversed(tape):
        if cast:
            g = _as(g, after)
        if what == "linear":
            name, given, weight_, wanted = saved
            weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
            if overwrite and not cast and weight.grad is not None and (bias is None or bias.grad is not None):
                torch.bmm(g.transpose(1, 2), given, out=weight.grad)
                if bias is not None:
                    torch.sum(g, 1, out=bias.grad)
            else:
                _accumulate(weight, torch.bmm(g.transpose(1, 2), given), overwrite)
                if bias is not None:
                    _accumulate(bias, g.sum(1), overwrite)
            if not wanted:
                break
            g = torch.bmm(g, weight_)
        elif what == "mask":
            g = _as(g * saved[0], g.dtype)  # (a 16-bit activation's mask is float32)
        elif what == "activation":
            kinds, given, out = saved
            # Slots with different activations: each slot's gradient through its own (as `_activate`).
            grad = DERIVATIVES[type(kinds[0][0])](g, kinds[0][0], given, out)
            for module, mask in kinds[1:]:
                mask = mask.view(-1, *([1] * (g.dim() - 1)))
                grad = torch.where(mask, DERIVATIVES[type(module)](g, module, given, out), grad)
            g = grad
        else:
            leaf, out = saved
            with torch.enable_grad():
                (g,) = torch.autograd.grad(out, leaf, g)
        if cast:
            g = _as(g, before)
    return losses


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `Tensor.to` returns `t` itself when it has the dtype, but costs a dispatch to find that out.
    return t if t.dtype == dtype else t.to(dtype)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` as autocast hands it to a matrix product: floating point other than float64 in `dtype`."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


_aten = torch.ops.aten
# The gradient through an element-wise module from the gradient of its output, its input and its
# output: torch's own backward kernels, which autograd would call.
DERIVATIVES = {
    nn.ReLU: lambda g, m, x, y: _aten.threshold_backward(g, y, 0),
    nn.GELU: lambda g, m, x, y: _aten.gelu_backward(g, x, approximate=m.approximate),
    nn.Tanh: lambda g, m, x, y: _aten.tanh_backward(g, y),
    nn.Sigmoid: lambda g, m, x, y: _aten.sigmoid_backward(g, y),
    nn.SiLU: lambda g, m, x, y: _aten.silu_backward(g, x),
    nn.LeakyReLU: lambda g, m, x, y: _aten.leaky_relu_backward(g, x, m.negative_slope, False),
    nn.ELU: lambda g, m, x, y: _aten.elu_backward(g, m.alpha, 1, 1, False, x),
    nn.Identity: lambda g, m, x, y: g,
}


def _loss_and_gradient(
    out: torch.Tensor, y: torch.Tensor, shared: bool, kind: str, smoothing: torch.Tensor | None,
    weight: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's mean loss [K], as `StackedTrainer._loss`, and the gradient of their sum times
    `weight` with respect to `out`."""
    k = out.shape[0]
    targets = y.expand(k, *y.shape) if shared else y
    if isinstance(weight, torch.Tensor):  # per slot
        weight = weight.reshape(k, *([1] * (out.dim() - 1)))
    if kind != "classification":
        prediction = out.reshape(targets.shape)
        per = F.mse_loss(prediction, targets, reduction="none")
        n = per[0].numel()
        grad = (prediction - targets).reshape(out.shape).mul_(weight * (2 / n))
        return per.reshape(k, -1).mean(1), grad.to(out.dtype)
    logits = out.float()
    lse = logits.logsumexp(-1, keepdim=True)
    index = targets.long().unsqueeze(-1)
    target = logits.gather(-1, index)
    grad = (logits - lse).exp_()  # softmax
    if smoothing is None:
        per = lse - target
        grad.scatter_add_(-1, index, torch.full_like(target, -1.0))
    else:
        # (1 - e) of the target's one-hot, and e spread evenly over the classes.
        e = smoothing.reshape(k, *([1] * (logits.dim() - 1)))
        per = lse - (1 - e) * target - e * logits.mean(-1, keepdim=True)
        grad.sub_(e / logits.shape[-1]).scatter_add_(-1, index, (e - 1).to(grad.dtype).expand_as(target))
    per = per.squeeze(-1)
    n = per[0].numel()
    return per.reshape(k, -1).mean(1), grad.mul_(weight / n).to(out.dtype)


def _accumulate(param: torch.Tensor, grad: torch.Tensor, overwrite: bool = False) -> None:
    if param.grad is None:
        param.grad = _as(grad, param.dtype)  # computed in the autocast dtype: the cast's backward, as autograd's
    elif overwrite:
        param.grad.copy_(grad)
    else:
        param.grad.add_(_as(grad, param.dtype))
