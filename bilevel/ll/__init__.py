"""Lower-level optimizers. Everything that touches ``higher`` lives in this package."""

from bilevel.ll import rules
from bilevel.ll.bda import BDA
from bilevel.ll.fixed_point import FixedPointMap
from bilevel.ll.gradient_descent import GradientDescent
from bilevel.ll.hyper import PerElement, PerStep
from bilevel.ll.patched import evaluate_at, fast_weights
from bilevel.ll.unroll import GradientStep, Trajectory, Unroll
from bilevel.state import LowerLevelDivergenceError

__all__ = [
    "BDA",
    "FixedPointMap",
    "GradientDescent",
    "GradientStep",
    "LowerLevelDivergenceError",
    "PerElement",
    "PerStep",
    "Trajectory",
    "Unroll",
    "evaluate_at",
    "fast_weights",
    "rules",
]
