"""Lower-level optimizers. Everything that touches ``higher`` lives in this package."""

from bilevel.ll.gradient_descent import GradientDescent, evaluate_at
from bilevel.ll.unroll import Trajectory

__all__ = ["GradientDescent", "Trajectory", "evaluate_at"]
