"""V-PBGD / G-PBGD: gradient descent on a penalty of the LL optimality gap (first order)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilevel.second_derivatives import gradient_to_differentiate
from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.value_function import (
    FirstOrderMethod,
    StepContext,
    Update,
    add_scaled,
    check_choice,
    check_number,
    check_optional_number,
    combine,
    dot,
    grown,
    start_and_cap,
)


class PBGD(FirstOrderMethod):
    """Penalty-based bilevel gradient descent: gradient steps on
    ``F(x, y) + gamma p(x, y)`` in ``(x, y)`` jointly, where the penalty ``p`` measures how far
    ``y`` is from solving the LL.

    - ``penalty="value"`` (V-PBGD): ``p(x, y) = f(x, y) - min_y' f(x, y')``; the minimum is
      approximated by ``y_hat``, ``T = ll.iters`` steps ``y_hat <- y_hat - alpha grad_y f(x_k,
      y_hat)`` (``alpha = ll.lr``) warm-started from the previous ``y_hat``, and Danskin's
      theorem gives ``grad p = (grad_x f(x, y) - grad_x f(x, y_hat), grad_y f(x, y))``: first
      order only.
    - ``penalty="gradient"`` (G-PBGD): ``p(x, y) = ||grad_y f(x, y)||^2``; its gradient takes
      one Hessian-vector product (double backward) per step, so this variant is *not*
      Hessian-free, and it needs no inner loop.

    One UL step: ``d = grad F(x_k, y_k) / gamma_k + grad p(x_k, y_k)``; the UL parameters
    receive ``d_x`` and ``y_{k+1} = y_k - lr_y d_y``. This is the paper's update
    ``(x, y) <- (x, y) - alpha (grad F + gamma grad p)`` with its step size choice
    ``alpha = O(1 / gamma)`` written as ``lr / gamma``, so that one learning rate stays
    stable while ``gamma`` grows; the paper's ``alpha`` is ``lr / gamma``. For ``gamma < 1`` the
    factor ``1 / gamma`` lengthens the step (the authors' code uses ``min(1 / gamma, 1)``).

    The penalized problem's solution is ``O(1 / gamma)`` from the bilevel one when the LL
    satisfies a Polyak-Lojasiewicz condition (strong convexity or not), so ``gamma`` trades
    accuracy for conditioning: with ``d`` scaled as above, progress along the LL solution set
    slows by ``1 / gamma``. ``gamma_k = min(gamma + gamma_growth k, gamma_max)`` lets it grow.
    Cost per UL step (value penalty): ``T + 3`` gradient evaluations; memory: ``y_hat``.
    Gradient penalty: one UL gradient, one LL gradient with its graph and one backward pass
    through it (a Hessian-vector product); ``ll.iters`` is not used.

    Reference: Shen & Chen (2023), "On Penalty-based Bilevel Gradient Descent Method", ICML.

    Args:
        ul_objective: ``state -> scalar`` UL objective ``F``.
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL objective ``f``.
        ll_model: the LL module; its trainable parameters are ``y``, updated in place.
        gamma: the penalty constant at the first step (> 0).
        gamma_growth: added to ``gamma`` after every UL step (>= 0).
        gamma_max: the largest penalty (``None``: no limit).
        penalty: ``"value"`` (V-PBGD, Hessian-free) or ``"gradient"`` (G-PBGD).
        lr_y: step size of the update of ``y``; ``None``: ``ll.lr``.
    """

    name = "pbgd"
    auxiliary_names = ("y_hat",)

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        gamma: float = 10.0,
        gamma_growth: float = 0.0,
        gamma_max: float | None = None,
        penalty: str = "value",
        lr_y: float | None = None,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.gamma = gamma
        self.gamma_growth = gamma_growth
        self.gamma_max = gamma_max
        self.penalty = penalty
        self.lr_y = lr_y

    # may be set between UL steps, checked as at construction (the penalty never falls below
    # its start)
    gamma, gamma_max = start_and_cap("gamma", "gamma_max")
    gamma_growth = Setting(check_number, closed=True)
    penalty = Setting(check_choice, ("value", "gradient"))
    lr_y = Setting(check_optional_number)

    def settings(self) -> dict[str, Any]:
        """The hyperparameters a resumed run must share."""
        return {
            "gamma": self.gamma,
            "gamma_growth": self.gamma_growth,
            "gamma_max": self.gamma_max,
            "penalty": self.penalty,
            "lr_y": self.lr_y,
        }

    def gamma_at(self, step: int) -> float:
        """The penalty constant of UL step ``step``."""
        return grown(self._gamma, self._gamma_growth, self._gamma_max, step)

    def _update(self, c: StepContext) -> Update:
        gamma = self.gamma_at(c.step)
        y = self.current_y()
        ul_loss, ul_y, ul_x = self.grad(self.ul_objective, "ul_objective", y, c.val, wrt_x=True)
        auxiliary = {}
        if self._penalty == "value":
            y_hat = self.ll_descend(self._auxiliary_or("y_hat", y), c.iters, c.lr, c.train)
            ll_loss, p_y, ll_x = self.grad(
                self.ll_objective, "ll_objective", y, c.train, wrt_x=True
            )
            ll_hat, _, ll_hat_x = self.grad(
                self.ll_objective, "ll_objective", y_hat, c.train, wrt_x=True, wrt_y=False
            )
            p_x = combine((1.0, ll_x), (-1.0, ll_hat_x))
            penalty = ll_loss - ll_hat
            auxiliary["y_hat"] = y_hat
        else:
            ll_loss, penalty, p_y, p_x = self._gradient_penalty(y, c.train)
        scale = 1.0 / gamma
        d_y = add_scaled(p_y, ul_y, scale)
        lr_y = c.lr if self._lr_y is None else self._lr_y
        return Update(
            ul_loss=ul_loss,
            ll_loss=ll_loss,
            x_direction=combine((scale, ul_x), (1.0, p_x)),
            y=add_scaled(y, d_y, -lr_y),
            auxiliary=auxiliary,
            diagnostics={"gamma": gamma, "penalty": penalty},
        )

    def _gradient_penalty(
        self, y: list[torch.Tensor], batch: tuple[Any, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
        """``f``, ``p = ||grad_y f||^2`` and ``grad p`` (one double backward)."""
        leaves = [w.detach().requires_grad_() for w in y]
        value = self.value(self.ll_objective, "ll_objective", leaves, batch)
        grads = gradient_to_differentiate(value, leaves, self._model, "PBGD(penalty='gradient')")
        if all(g is None for g in grads):
            raise ValueError("ll_objective does not depend on the trainable LL parameters.")
        penalty = dot(grads, grads)
        if not penalty.requires_grad:  # f linear in y: the penalty is constant
            zeros = [torch.zeros_like(w) for w in leaves]
            return value.detach(), penalty.detach(), zeros, [None] * len(self.ul_params)
        out = torch.autograd.grad(penalty, [*leaves, *self.ul_params], allow_unused=True)
        n = len(leaves)
        p_y = [
            torch.zeros_like(w) if g is None else g for w, g in zip(leaves, out[:n], strict=True)
        ]
        return value.detach(), penalty.detach(), p_y, list(out[n:])
