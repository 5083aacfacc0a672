"""A small multi-layer perceptron."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected network: ``Linear -> ReLU`` per hidden layer, then a linear output.

    Inputs with more than two dimensions are flattened after the batch dimension, so images
    can be fed directly.

    Args:
        in_features: input size (after flattening).
        hidden: sizes of the hidden layers (empty: a linear model).
        out_features: output size.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        for value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"layer sizes must be integers >= 1, got {sizes}.")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))
