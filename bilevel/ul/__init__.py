"""Upper-level hypergradient calculators."""

from bilevel.ul.alternating import Alternating
from bilevel.ul.amigo import AmIGO
from bilevel.ul.base import HypergradientCalculator
from bilevel.ul.bome import BOME
from bilevel.ul.bvfim import BVFIM
from bilevel.ul.checkpointed_reverse import MemorySavingReverse
from bilevel.ul.dm import DM
from bilevel.ul.f2sa import F2SA
from bilevel.ul.finite_difference import FiniteDifference
from bilevel.ul.first_order import FirstOrder
from bilevel.ul.forward import Forward
from bilevel.ul.gaffo import GAFFO
from bilevel.ul.iga import IGA
from bilevel.ul.implicit import HypergradientDivergenceError, Implicit
from bilevel.ul.meso import MESO
from bilevel.ul.pbgd import PBGD
from bilevel.ul.ptt import PTT
from bilevel.ul.reptile import Reptile
from bilevel.ul.reverse import Reverse, Truncated
from bilevel.ul.saba import SABA
from bilevel.ul.sampling import Sampler
from bilevel.ul.soba import SOBA
from bilevel.ul.stocbio import StocBiO
from bilevel.ul.stochastic_implicit import StochasticImplicit

__all__ = [
    "BOME",
    "BVFIM",
    "DM",
    "F2SA",
    "GAFFO",
    "IGA",
    "MESO",
    "PBGD",
    "PTT",
    "SABA",
    "SOBA",
    "Alternating",
    "AmIGO",
    "FiniteDifference",
    "FirstOrder",
    "Forward",
    "HypergradientCalculator",
    "HypergradientDivergenceError",
    "Implicit",
    "MemorySavingReverse",
    "Reptile",
    "Reverse",
    "Sampler",
    "StocBiO",
    "StochasticImplicit",
    "Truncated",
]
