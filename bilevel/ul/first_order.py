"""First-order hypergradient: drop every second-order term."""

from __future__ import annotations

import torch

from bilevel.ll import evaluate_at
from bilevel.ul.base import Call, Grads, HypergradientCalculator, add, detached_weights


class FirstOrder(HypergradientCalculator):
    """First-order approximation: treat the LL solution as if it did not depend on lambda.

    For a hyperparameter this is the direct gradient ``grad_lambda L_ul(w_T, lambda)``. For a UL
    parameter that is the LL's initial weight (MAML), ``dw_T/dtheta`` is taken as the
    identity, which adds ``grad_w L_ul(w_T)``: first-order MAML. No LL graph is needed.

    References: Finn, Abbeel & Levine (2017), MAML (first-order variant); Nichol, Achiam &
    Schulman (2018), "On First-Order Meta-Learning Algorithms".

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss.
        ll_model: the LL module.
    """

    name = "first_order"
    splits_ul_batch = True  # linear in the UL objective

    def differentiable_steps(self, iters: int) -> int:
        """None."""
        return 0

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        weights, active = detached_weights(call.trajectory)
        with evaluate_at(call.auxiliary_model, weights):
            loss = self.ul_loss(call)
        grads = torch.autograd.grad(
            loss, [*self.ul_params, *(weights[i] for i in active)], allow_unused=True
        )
        direct = grads[: len(self.ul_params)]
        through_w = dict(zip(active, grads[len(self.ul_params) :], strict=True))
        result = [
            add(d, through_w.get(j)) for d, j in zip(direct, self.initial_weight_of, strict=True)
        ]
        return result, loss
