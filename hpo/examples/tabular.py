"""MLPs on scikit-learn's bundled tabular datasets (digits, wine, breast cancer, diabetes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import trainers

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def mlp(params: dict[str, Any], data: trainers.Data) -> nn.Module:
    """An MLP sized from the data; ``params["model"]`` gives layers, width, activation, dropout."""
    spec = params.get("model", {})
    x, y = data.train
    out = int(y.max()) + 1 if not y.is_floating_point() else (1 if y.dim() == 1 else y.shape[1])
    width, act = int(spec.get("width", 64)), ACTIVATIONS[spec.get("activation", "relu")]
    layers: list[nn.Module] = []
    size = x.shape[1]
    for _ in range(int(spec.get("layers", 2))):
        layers += [nn.Linear(size, width), act(), nn.Dropout(float(spec.get("dropout", 0.0)))]
        size = width
    layers.append(nn.Linear(size, out))
    return nn.Sequential(*layers)


def digits() -> trainers.Data:
    """8x8 handwritten digits, 1,797 images, 10 classes."""
    from sklearn.datasets import load_digits

    return _split(*load_digits(return_X_y=True), classification=True)


def wine() -> trainers.Data:
    """178 wines, 13 chemical features, 3 cultivars."""
    from sklearn.datasets import load_wine

    return _split(*load_wine(return_X_y=True), classification=True)


def breast_cancer() -> trainers.Data:
    """569 tumours, 30 features, malignant or benign."""
    from sklearn.datasets import load_breast_cancer

    return _split(*load_breast_cancer(return_X_y=True), classification=True)


def diabetes() -> trainers.Data:
    """442 patients, 10 features, disease progression (regression, standardized target)."""
    from sklearn.datasets import load_diabetes

    return _split(*load_diabetes(return_X_y=True), classification=False)


def _split(x: Any, y: Any, *, classification: bool) -> trainers.Data:
    """A fixed stratified 75/25 split, features standardized on the training part."""
    from sklearn.model_selection import train_test_split

    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y if classification else None
    )
    # Constant features (border pixels of digits) keep scale 1 rather than blowing up to 1e8.
    mean, std = x_train.mean(0), x_train.std(0)
    std[std < 1e-8] = 1.0
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    if not classification:
        y_mean, y_std = y_train.mean(), y_train.std()
        y_train, y_val = (y_train - y_mean) / y_std, (y_val - y_mean) / y_std
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = (lambda a: torch.tensor(a, dtype=torch.long)) if classification else as_x
    return trainers.Data((as_x(x_train), as_y(y_train)), (as_x(x_val), as_y(y_val)))
