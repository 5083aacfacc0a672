"""Upper-level hypergradient calculators."""

from bilevel.ul.base import HypergradientCalculator
from bilevel.ul.first_order import FirstOrder
from bilevel.ul.forward import Forward
from bilevel.ul.implicit import HypergradientDivergenceError, Implicit
from bilevel.ul.ptt import PTT
from bilevel.ul.reptile import Reptile
from bilevel.ul.reverse import Reverse, Truncated

__all__ = [
    "PTT",
    "FirstOrder",
    "Forward",
    "HypergradientCalculator",
    "HypergradientDivergenceError",
    "Implicit",
    "Reptile",
    "Reverse",
    "Truncated",
]
