"""Lower-level optimizers. Everything that touches ``higher`` lives in this package."""

from bilevel.ll import rules
from bilevel.ll.gradient_descent import GradientDescent
from bilevel.ll.patched import evaluate_at, fast_weights
from bilevel.ll.unroll import GradientStep, Trajectory, Unroll

__all__ = [
    "GradientDescent",
    "GradientStep",
    "Trajectory",
    "Unroll",
    "evaluate_at",
    "fast_weights",
    "rules",
]
