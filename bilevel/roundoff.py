"""The round-off floor that the library's numerical checks share: a difference of terms of a
given size is taken for round-off below ``ROUNDOFF * eps`` times that size, whatever the scale
of the objectives (a loss summed over 60,000 examples, or 1e-12 near a perfect fit)."""

from __future__ import annotations

import torch

# A residual below ROUNDOFF * eps times the size of the terms that cancel in it is round-off:
# 0.6 to 2.5 eps measured in float64 at the exact solutions of ridge and logistic problems
# (60 to 80 samples), with room for longer sums; the hypergradient error it leaves is about
# that fraction times the LL's condition number, below what a warning is about.
ROUNDOFF = 100.0


def roundoff_floor(scale: torch.Tensor) -> torch.Tensor:
    """``ROUNDOFF * eps * scale``: the largest value that a difference of terms of size
    ``scale`` (a tensor, whose dtype gives ``eps``) can take from round-off alone."""
    return ROUNDOFF * torch.finfo(scale.dtype).eps * scale
