"""Reverse-mode hypergradients through the LL trajectory: all steps, or the last K."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.base import Call, Grads, HypergradientCalculator


def _check_truncate_iter(value: Any, name: str) -> int:
    """An int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return value


class Reverse(HypergradientCalculator):
    """Back-propagation through all LL steps (reverse-mode hypergradient, RHG; MAML).

    The hypergradient is exact for the unrolled map ``lambda -> L_ul(w_T(lambda), lambda)``.
    Memory grows with the number of LL steps. When the UL parameters are the LL model's own
    weights, this is MAML: the gradient flows to them as the LL's starting point.

    References: Maclaurin et al. (2015); Franceschi et al. (2017), "Forward and Reverse
    Gradient-Based Hyperparameter Optimization", ICML; Finn, Abbeel & Levine (2017), MAML.

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss.
        ll_model: the LL module.
    """

    name = "reverse"
    splits_ul_batch = True  # linear in the UL objective

    def differentiable_steps(self, iters: int) -> int:
        """All of them."""
        return iters

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        loss = self.ul_loss(call)
        grads = torch.autograd.grad(loss, self.ul_params, allow_unused=True)
        return list(grads), loss


class Truncated(Reverse):
    """Back-propagation through the last ``truncate_iter`` LL steps only (K-step RMD).

    The earlier steps run without a graph, so memory grows with K, not with the number of LL
    steps. At a converged LL with step ``alpha`` the result is
    ``grad_lambda L_ul - alpha (dg/dlambda)^T sum_{k<K} (I - alpha H)^k grad_w L_ul``, a
    K-term Neumann approximation of the implicit hypergradient; ``K = iters`` is ``Reverse``.

    Reference: Shaban, Cheng, Hatch & Boots (2019), "Truncated Back-propagation for Bilevel
    Optimization", AISTATS.

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss.
        ll_model: the LL module.
        truncate_iter: K >= 1, the number of final LL steps to differentiate through.
    """

    name = "truncated"

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        truncate_iter: int,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.truncate_iter = truncate_iter

    #: may be set between UL steps, checked as at construction
    truncate_iter = Setting(_check_truncate_iter)

    def settings(self) -> dict[str, int]:
        """The truncation."""
        return {"truncate_iter": self._truncate_iter}

    def differentiable_steps(self, iters: int) -> int:
        """The last ``truncate_iter`` (or all, if fewer)."""
        return min(self._truncate_iter, iters)
