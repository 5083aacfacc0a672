"""The round-off floor that the library's numerical checks share: a difference of terms of a
given size is taken for round-off below ``ROUNDOFF * eps`` times that size, whatever the scale
of the objectives (a loss summed over 60,000 examples, or 1e-12 near a perfect fit), and
``sqrt(n / MEASURED_TERMS)`` times more where the terms are sums over a batch of ``n >
MEASURED_TERMS`` examples."""

from __future__ import annotations

import math
from typing import Any

import torch

from bilevel.state import tensor_leaves

# A residual below ROUNDOFF * eps times the size of the terms that cancel in it is round-off:
# 0.6 to 2.5 eps measured in float64 at the exact solutions of ridge and logistic problems
# (60 to 80 samples), with room for longer sums; the hypergradient error it leaves is about
# that fraction times the LL's condition number, below what a warning is about.
ROUNDOFF = 100.0

# ROUNDOFF holds for sums of up to this many examples. Beyond, the round-off of a sum grows
# like the square root of its length (Higham & Mary 2019, "A New Approach to Probabilistic
# Rounding Error Analysis", SIAM J. Sci. Comput.): the ridge LL gradient at its float64
# solution measured 100 to 300 eps times the terms' size over 1e6 to 4e6 uncentered
# examples, above ROUNDOFF, and by 2x to 6x apart between one and two torch threads.
MEASURED_TERMS = 100


def roundoff_floor(scale: torch.Tensor, terms: int = 1) -> torch.Tensor:
    """``ROUNDOFF * eps * scale``: the largest value that a difference of terms of size
    ``scale`` (a tensor, whose dtype gives ``eps``) can take from round-off alone; times
    ``sqrt(terms / MEASURED_TERMS)`` where those terms are sums over ``terms`` examples
    (:func:`batch_terms`) and there are more than ``MEASURED_TERMS`` of them."""
    growth = math.sqrt(terms / MEASURED_TERMS) if terms > MEASURED_TERMS else 1.0
    return ROUNDOFF * growth * torch.finfo(scale.dtype).eps * scale


def loss_grew(first: float, last: float, tolerance: float, dtype: torch.dtype) -> bool:
    """Whether a loss grew from ``first`` to ``last`` beyond the relative ``tolerance`` and
    round-off: ``last > first + tolerance |first| + ROUNDOFF eps max(|first|, |last|)``
    (``eps`` of ``dtype``). Every term is relative to the losses compared, none absolute: a
    loss of 1e-20 near a perfect fit that grows tenfold is caught as one of 1e12 summed over
    a data set."""
    noise = ROUNDOFF * torch.finfo(dtype).eps * max(abs(first), abs(last))
    return last > first + tolerance * abs(first) + noise


def batch_terms(data: Any) -> int:
    """The number of examples that an objective sums over a batch ``data`` (a tensor, or
    tuples, lists and dicts of them): the largest leading dimension of its tensors; 1 where
    it holds none (an objective that reads its own data counts as one term)."""
    sizes = [t.shape[0] for _, t in tensor_leaves(data, "data") if t.ndim]
    return max(sizes, default=1)
