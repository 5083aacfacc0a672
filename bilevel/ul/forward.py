"""Forward-mode hypergradient: tangents carried through the LL steps."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from bilevel.ll import evaluate_at
from bilevel.ul.base import Call, Grads, HypergradientCalculator, detached_weights

MANY = 1000  # scalar hyperparameters above which Forward warns about its cost


class Forward(HypergradientCalculator):
    """Forward-mode hypergradient (FMD): carry ``Z_t = dw_t/dlambda`` through the LL steps.

    The LL propagates ``Z_{t+1} = A_t Z_t + B_t`` (the optimizer state's tangents included:
    momentum buffers, Adam moments) with Jacobian-vector products, one per scalar of the UL
    variables, and keeps no graph across steps: memory is independent of the number of LL
    steps, and cost grows with the number of scalar hyperparameters. Then
    ``dF/dlambda = grad_lambda L_ul + Z_T^T grad_w L_ul``: the same number as ``Reverse``.
    Use it for a few hyperparameters (an L2 coefficient, the LL step size, the momentum) and
    long LL runs; it is the basis of the online method :class:`bilevel.online.OnlineForward`.

    Reference: Franceschi, Donini, Frasconi & Pontil (2017), "Forward and Reverse
    Gradient-Based Hyperparameter Optimization", ICML; Williams & Zipser (1989) (RTRL).

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss.
        ll_model: the LL module.
    """

    name = "forward"

    def differentiable_steps(self, iters: int) -> int:
        """None: the tangents replace the graph."""
        return 0

    def configure(self, ll: Any) -> None:
        """Make the LL carry tangents for the UL parameters."""
        super().configure(ll)
        ll.forward_variables = self.ul_params
        n = sum(p.numel() for p in self.ul_params)
        if n > MANY:
            warnings.warn(
                f"Forward carries one tangent per scalar hyperparameter: {n} Jacobian-vector "
                f"products per LL step, and tangents of {n} times the LL's size in memory. "
                "For this many hyperparameters use Reverse, Truncated or Implicit.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        trajectory = call.trajectory
        variables = trajectory.tangent_variables
        if variables is None or [id(v) for v in variables] != [id(p) for p in self.ul_params]:
            raise ValueError(
                "Forward needs the auxiliary model to carry tangents for its UL parameters. Set "
                "ll.forward_variables = ul.ul_params (ul.configure(ll) does) before ll.optimize, "
                "or let BilevelProblem(ll, ul) configure it."
            )
        weights, active = detached_weights(call.auxiliary_model, trajectory)
        with evaluate_at(call.auxiliary_model, weights):
            loss = self.ul_loss(call)
        w = [weights[i] for i in active]
        grads = torch.autograd.grad(loss, [*self.ul_params, *w], allow_unused=True)
        direct, v = grads[: len(self.ul_params)], grads[len(self.ul_params) :]
        through = sum(
            (z.reshape(z.shape[0], -1) @ vi.reshape(-1))
            for z, vi in zip(trajectory.tangents, v, strict=True)
            if vi is not None
        )
        result: Grads = []
        offset = 0
        for p, d, reached in zip(self.ul_params, direct, trajectory.tangents_reached, strict=True):
            part = None
            if reached and isinstance(through, torch.Tensor):
                part = through[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
            result.append(part if d is None else (d if part is None else d + part))
        return result, loss
