"""BVFIM: a regularized value function of the LL behind a log barrier (first order)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilevel.state import Objective
from bilevel.ul.value_function import (
    FirstOrderMethod,
    StepContext,
    Update,
    check_number,
    check_optional_number,
    check_schedule,
    combine,
    evaluate_schedule,
)

Schedule = float | Callable[[int], float]


class BVFIM(FirstOrderMethod):
    """Bi-level Value-Function-based Interior-point Method.

    The LL constraint is written with the regularized value function
    ``phi_mu(x) = min_z f(x, z) + (mu / 2) ||z||^2`` and moved into the UL objective by a log
    barrier, ``min_x min_y F(x, y) + (theta / 2) ||y||^2 - sigma ln(phi_mu(x) - f(x, y))``,
    with ``mu, theta, sigma -> 0`` along the UL steps; Danskin's theorem gives the UL
    direction from gradients of ``F`` and ``f`` only (``grad phi_mu(x) = grad_x f(x, z)``).

    One UL step ``k`` (``alpha = ll.lr``, ``T = ll.iters``), with ``mu_k, theta_k, sigma_k``:

    1. ``z``: ``T`` steps ``z <- z - alpha (grad_y f(x_k, z) + mu_k z)``, warm-started;
       ``phi = f(x_k, z) + (mu_k / 2) ||z||^2``;
    2. the barrier's weight ``rho = sigma_k / s`` with the slack ``s`` below;
    3. ``y``: ``y_iters`` steps
       ``y <- y - lr_y / (1 + rho) (grad_y F(x_k, y) + theta_k y + rho grad_y f(x_k, y))``,
       warm-started from the kept ``y``;
    4. the UL parameters receive
       ``grad_x F(x_k, y) + rho (grad_x f(x_k, y) - grad_x f(x_k, z))``.

    The slack. In the paper the barrier is ``-sigma ln(phi_mu(x) - f(x, y))``, whose gradient
    weight is ``sigma / (phi_mu(x) - f(x, y))``; steps 3-4 are exactly its gradient with that
    weight frozen at ``rho``. The authors' code (and BOAT's VSO) evaluate the logarithm's
    argument as ``phi_mu(x) - f_lb`` (``f_lb`` a lower bound of ``f``: the negated dimension
    in their example, 0 in BOAT) so that it never becomes non-positive, which makes the
    barrier act as a penalty with weight ``rho = sigma / (phi_mu(x) - f_lb)``. Plain
    gradient steps on the true barrier leave its domain or stall (measured), so this class
    takes the code's form: ``ll_lower_bound=None`` (default) uses the slack of the
    regularized LL solution itself, ``s = phi_mu(x) - f(x, z) = (mu_k / 2) ||z||^2``, which
    is the code's slack when ``f_lb`` is the LL's minimum value; a number ``f_lb`` uses
    ``s = phi - f_lb`` as the code does. The LL is enforced only as far as ``rho`` grows:
    with the code's schedules (``mu, theta, sigma`` all divided by ``(k + 1)^1.1``) ``rho``
    stays constant and the result keeps an O(1) bias on a quadratic test problem; the
    defaults here let ``sigma`` decay more slowly (``(k + 1)^-0.5``) so that ``rho`` grows.
    The step ``lr_y / (1 + rho)`` keeps the ``y`` steps stable as ``rho`` grows.

    Assumptions: none on convexity in the paper's analysis (which concerns the barrier
    problems' solutions as the parameters vanish); a non-singleton LL solution set is
    handled (the optimistic solution is approached). The slack of the default form vanishes
    where the regularized LL solution ``z`` is 0: there ``rho`` is infinite and the step is
    refused. Cost per UL step: ``T + y_iters + 3`` gradient evaluations (``y_iters`` of them of
    ``F`` and ``f`` together); memory: ``z``.

    Reference: Liu, Liu, Yuan, Zeng & Zhang (2021), "A Value-Function-based Interior-point
    Method for Non-convex Bi-level Optimization", ICML.

    Args:
        ul_objective: ``state -> scalar`` UL objective ``F``.
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL objective ``f``.
        ll_model: the LL module; its trainable parameters are ``y``, updated in place.
        mu: the value function's regularization: a number ``mu_0`` (then
            ``mu_k = mu_0 / (k + 1)^1.1``, the authors' schedule) or a callable ``k -> mu_k``.
        theta: the UL regularization of ``y``: a number (``/ (k + 1)^1.1``) or a callable.
        sigma: the barrier parameter: a number (``/ (k + 1)^0.5``) or a callable.
        y_iters: steps of ``y`` per UL step; ``None``: ``ll.iters``.
        lr_y: base step size of ``y``; ``None``: ``ll.lr``.
        ll_lower_bound: ``f_lb`` (see above); ``None``: the self-calibrated slack.
    """

    name = "bvfim"
    auxiliary_names = ("z",)

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        mu: Schedule = 0.01,
        theta: Schedule = 0.01,
        sigma: Schedule = 0.01,
        y_iters: int | None = None,
        lr_y: float | None = None,
        ll_lower_bound: float | None = None,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.mu = check_schedule(mu, "mu")
        self.theta = check_schedule(theta, "theta")
        self.sigma = check_schedule(sigma, "sigma")
        if y_iters is not None and (
            isinstance(y_iters, bool) or not isinstance(y_iters, int) or y_iters < 1
        ):
            raise ValueError(f"y_iters must be an integer >= 1 or None, got {y_iters!r}.")
        self.y_iters = y_iters
        self.lr_y = check_optional_number(lr_y, "lr_y")
        self.ll_lower_bound = (
            None
            if ll_lower_bound is None
            else check_number(ll_lower_bound, "ll_lower_bound", low=-float("inf"))
        )

    def settings(self) -> dict[str, Any]:
        """The hyperparameters a resumed run must share."""

        def plain(value: Schedule) -> Any:
            return value if isinstance(value, float) else getattr(value, "__name__", "callable")

        return {
            "mu": plain(self.mu),
            "theta": plain(self.theta),
            "sigma": plain(self.sigma),
            "y_iters": self.y_iters,
            "lr_y": self.lr_y,
            "ll_lower_bound": self.ll_lower_bound,
        }

    def parameters_at(self, step: int) -> tuple[float, float, float]:
        """``(mu_k, theta_k, sigma_k)`` of UL step ``step``."""
        decays = {"mu": 1.1, "theta": 1.1, "sigma": 0.5}
        values = []
        for name, power in decays.items():
            given = getattr(self, name)
            if callable(given):
                values.append(evaluate_schedule(given, name, step))
            else:
                values.append(given / (step + 1) ** power)
        return values[0], values[1], values[2]

    def _update(self, c: StepContext) -> Update:
        mu, theta, sigma = self.parameters_at(c.step)
        y = self.current_y()

        def regularized(w: list[torch.Tensor]) -> torch.Tensor:
            value = self.value(self.ll_objective, "ll_objective", w, c.train)
            return value + 0.5 * mu * sum((v * v).sum() for v in w)

        z = self.descend(regularized, self._auxiliary_or("z", y), c.iters, c.lr)
        f_z, _, f_z_x = self.grad(self.ll_objective, "ll_objective", z, c.train, True, False)
        reg = 0.5 * mu * torch.stack([(v * v).sum() for v in z]).sum()
        slack = reg if self.ll_lower_bound is None else f_z + reg - self.ll_lower_bound
        if not bool(slack > 0):
            raise FloatingPointError(
                f"BVFIM step {c.step}: the barrier's slack is {float(slack):.3g} <= 0 "
                + (
                    "(the regularized LL solution z is 0, so the value-function constraint has "
                    "no interior); pass ll_lower_bound (a lower bound of the LL objective) or "
                    "use PBGD or F2SA."
                    if self.ll_lower_bound is None
                    else "(the LL objective went below ll_lower_bound); pass a true lower bound."
                )
            )
        rho = sigma / slack

        def barrier(w: list[torch.Tensor]) -> torch.Tensor:
            ul = self.value(self.ul_objective, "ul_objective", w, c.val)
            ll = self.value(self.ll_objective, "ll_objective", w, c.train)
            return ul + 0.5 * theta * sum((v * v).sum() for v in w) + rho * ll

        lr_y = (c.lr if self.lr_y is None else self.lr_y) / (1.0 + rho)
        y_iters = c.iters if self.y_iters is None else self.y_iters
        y = self.descend(barrier, y, y_iters, lr_y)
        ul_loss, _, ul_x = self.grad(self.ul_objective, "ul_objective", y, c.val, True, False)
        ll_loss, _, ll_x = self.grad(self.ll_objective, "ll_objective", y, c.train, True, False)
        return Update(
            ul_loss=ul_loss,
            ll_loss=ll_loss,
            x_direction=combine((1.0, ul_x), (rho, ll_x), (-rho, f_z_x)),
            y=y,
            auxiliary={"z": z},
            diagnostics={"mu": mu, "theta": theta, "sigma": sigma, "rho": rho.detach()},
        )
