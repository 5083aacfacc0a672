"""Lower-level optimizers. Everything that touches ``higher`` lives in this package."""

from bilevel.ll.gradient_descent import GradientDescent, Trajectory, evaluate_at

__all__ = ["GradientDescent", "Trajectory", "evaluate_at"]
