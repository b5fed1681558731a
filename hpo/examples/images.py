"""A small conv net on scikit-learn's 8x8 digits as one-channel images (no download)."""

from __future__ import annotations

from typing import Any

from torch import nn

import trainers
from hpo.examples.tabular import ACTIVATIONS, digits


def digits_images() -> trainers.Data:
    """The digits of `hpo.examples.tabular.digits` (same split and scaling) as [N, 1, 8, 8] images."""
    data = digits()
    image = lambda split: (split[0].reshape(-1, 1, 8, 8), split[1])  # noqa: E731
    return trainers.Data(image(data.train), image(data.val))


def convnet(params: dict[str, Any], data: trainers.Data) -> nn.Module:
    """3x3 convolutions at full resolution, then a linear classifier.

    ``params["model"]`` gives ``blocks`` (convolutions), ``channels`` (of the first; each next one
    doubles), ``activation`` and ``dropout`` (before the classifier).
    """
    spec = params.get("model", {})
    x, y = data.train
    act = ACTIVATIONS[spec.get("activation", "relu")]
    channels, size = int(spec.get("channels", 16)), x.shape[1]
    layers: list[nn.Module] = []
    for i in range(int(spec.get("blocks", 2))):
        layers += [nn.Conv2d(size, channels * 2**i, 3, padding=1), act()]
        size = channels * 2**i
    layers += [nn.Flatten(), nn.Dropout(float(spec.get("dropout", 0.0))),
               nn.Linear(size * x.shape[2] * x.shape[3], int(y.max()) + 1)]
    return nn.Sequential(*layers)
