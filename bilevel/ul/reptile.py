"""Reptile: meta-learning an initialization from the displacement of the adapted weights."""

from __future__ import annotations

import torch

from bilevel.ll import evaluate_at
from bilevel.state import check_objective_result
from bilevel.ul.base import Call, Grads, HypergradientCalculator, detached_weights


class Reptile(HypergradientCalculator):
    """Reptile's meta-gradient ``theta - w_T``: the initial weights ``theta`` (the UL
    parameters are the LL model's own) minus the weights after the LL steps on a task.

    Stepping it with ``torch.optim.SGD(lr=epsilon)`` is Reptile's update
    ``theta <- theta + epsilon (w_T - theta)``, averaged over a meta-batch by
    :class:`bilevel.BilevelProblem`. It is not the gradient of an objective: it needs no
    validation split (the UL loss returned, ``ul_objective`` at ``w_T``, is for logging) and
    no LL graph; memory and cost are those of the LL steps alone.

    Reference: Nichol, Achiam & Schulman (2018), "On First-Order Meta-Learning Algorithms".

    Args:
        ul_objective: ``state -> scalar`` loss reported at the adapted weights.
        ul_model: the module holding the initialization (usually ``ll_model`` itself).
        ll_objective: ``state -> scalar`` task loss.
        ll_model: the LL module.
    """

    name = "reptile"
    splits_ul_batch = True  # linear in the UL objective

    def differentiable_steps(self, iters: int) -> int:
        """None."""
        return 0

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        weights, _ = detached_weights(call.trajectory)
        with evaluate_at(call.auxiliary_model, weights), torch.no_grad():
            state = self.states(call.auxiliary_model, *call.val)
            loss = check_objective_result(self.ul_objective(state), "ul_objective", graph=False)
        initial = list(self.ll_model.parameters())
        result: Grads = [
            None if j is None else initial[j].detach() - weights[j].detach()
            for j in self.initial_weight_of
        ]
        return result, loss
