"""bilevel: gradient-based bilevel optimization in PyTorch, exact, fast and safe by default."""

from bilevel.problem import BilevelProblem

__version__ = "0.1.0"

__all__ = ["BilevelProblem", "__version__"]
