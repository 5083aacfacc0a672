"""BVFIM: a regularized value function of the LL behind a log barrier (first order)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.value_function import (
    FirstOrderMethod,
    StepContext,
    Update,
    check_choice,
    check_number,
    check_optional_number,
    check_schedule,
    combine,
    dot,
    evaluate_schedule,
)

Schedule = float | Callable[[int], float]


def _check_y_iters(value: Any, name: str) -> int | None:
    """``None`` or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}.")
    return value


def _check_slack_pair(slack: str, ll_lower_bound: float | None, later: bool) -> None:
    """Refuse ``ll_lower_bound`` without ``slack="lower_bound"``, or that slack without it
    (``later``: one of them set after construction, which alone can never enter or leave
    that slack: the message says so)."""
    if (slack == "lower_bound") != (ll_lower_bound is not None):
        cure = (
            " Set alone, neither can switch slack='lower_bound' on or off (the other one "
            "would have to change with it): build a new BVFIM with both."
            if later
            else ""
        )
        raise ValueError(
            "ll_lower_bound is needed with slack='lower_bound' and only there, got "
            f"slack={slack!r} and ll_lower_bound={ll_lower_bound!r}.{cure}"
        )


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
    weight is ``sigma / (phi_mu(x) - f(x, y))``; steps 3-4 are its gradient with that weight
    frozen at ``rho`` for the UL step (plain gradient steps with the weight re-evaluated at
    every inner iterate stall: measured, x stays 0.2 from x* on the test quadratic).
    ``slack="barrier"`` (default) takes the paper's slack at the kept ``y``,
    ``s = max(phi_mu(x_k) - f(x_k, y_k), slack_floor * (mu_k / 2) ||z||^2)``: when ``y``
    leaves the LL's near-optimal level set the slack shrinks and ``rho`` grows (up to
    ``1 / slack_floor`` times the regularized value), as an interior-point method's barrier
    does. ``slack="regularized"`` (the default before) uses the largest slack,
    ``(mu_k / 2) ||z||^2``, whatever ``y`` is; ``slack="lower_bound"`` with
    ``ll_lower_bound = f_lb`` takes ``phi - f_lb`` as the authors' code (and BOAT's VSO) do.
    These two make the barrier a penalty whose weight does not look at ``y``.

    Why the old default diverged. The penalty form solves ``min F + rho (f - phi)``, which is
    bounded below only when ``rho`` exceeds a problem-dependent ``rho_min`` (about the UL's
    curvature in ``y`` over the LL's; 1.2 on the benchmark quadratic of
    ``benchmarks/bilevel_curves.py``, where ``F`` is indefinite in ``(x, y)``). With the
    regularized slack ``rho = 2 sigma / (mu ||z||^2)`` depends on the size of ``z`` (0.14 to
    0.35 there), and shrinks as the iterates grow: a runaway. The paper gives no scale-free
    rule for ``sigma`` (it has the units of ``F``, the slack those of ``f``); the default slack
    removes the runaway, and a problem that needs more should raise ``sigma``.

    Checks (one device sync per UL step): a non-positive slack, and an inner loop that
    increased its objective (gradient descent on an L-smooth function decreases it whenever
    the step is below 2/L, so an increase beyond round-off proves the step too large) raise
    FloatingPointError naming the step size to lower (``ll.lr`` for ``z``, ``lr_y`` for ``y``).

    Assumptions: none on convexity in the paper's analysis (which concerns the barrier
    problems' solutions as the parameters vanish); a non-singleton LL solution set is
    handled (the optimistic solution is approached). The slack vanishes where the
    regularized LL solution ``z`` is 0: there the step is refused. Cost per UL step:
    ``T + y_iters + 3`` gradient evaluations (``y_iters`` of them of ``F`` and ``f``
    together) and 3 forward evaluations (the checks and the slack); memory: ``z``.

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
        ll_lower_bound: ``f_lb`` for ``slack="lower_bound"`` (see above).
        slack: ``"barrier"`` (default; ``"lower_bound"`` when ``ll_lower_bound`` is given),
            ``"regularized"`` or ``"lower_bound"`` (see above).
        slack_floor: the barrier slack's floor, as a fraction of ``(mu_k / 2) ||z||^2``
            (in ``(0, 1]``; 1 gives ``"regularized"``).
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
        slack: str | None = None,
        slack_floor: float = 0.3,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.mu = mu
        self.theta = theta
        self.sigma = sigma
        self.y_iters = y_iters
        self.lr_y = lr_y
        self.ll_lower_bound = ll_lower_bound
        self.slack = slack
        self.slack_floor = slack_floor

    def _check_ll_lower_bound(self, value: Any) -> float | None:
        """``None`` or a number; given only with ``slack="lower_bound"``."""
        bound = check_optional_number(value, "ll_lower_bound", low=-math.inf)
        if "_slack" in self.__dict__:
            _check_slack_pair(self._slack, bound, later=True)
        return bound

    def _check_slack(self, value: Any) -> str:
        """One of the slacks (``None``: by ``ll_lower_bound``), ``"lower_bound"`` with
        ``ll_lower_bound`` and only there."""
        bound = self._ll_lower_bound
        if value is None:
            value = "barrier" if bound is None else "lower_bound"
        slack = check_choice(value, "slack", ("barrier", "regularized", "lower_bound"))
        _check_slack_pair(slack, bound, later="_slack" in self.__dict__)
        return slack

    # may be set between UL steps, checked as at construction
    mu = Setting(check_schedule)
    theta = Setting(check_schedule)
    sigma = Setting(check_schedule)
    y_iters = Setting(_check_y_iters)
    lr_y = Setting(check_optional_number)
    ll_lower_bound = Setting(_check_ll_lower_bound, reads_object=True)
    slack = Setting(_check_slack, reads_object=True)
    slack_floor = Setting(check_number, high=1.0)

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
            "slack": self.slack,
            "slack_floor": self.slack_floor,
        }

    def parameters_at(self, step: int) -> tuple[float, float, float]:
        """``(mu_k, theta_k, sigma_k)`` of UL step ``step``."""
        decays = {"mu": 1.1, "theta": 1.1, "sigma": 0.5}
        values = []
        for name, power in decays.items():
            given = getattr(self, f"_{name}")
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
            return value + 0.5 * mu * dot(w, w)

        z_start = self._auxiliary_or("z", y)
        with torch.no_grad(), self._ul_frozen(True):
            before_z = self.value(self.ll_objective, "ll_objective", z_start, c.train, False)
            before_z = before_z + 0.5 * mu * dot(z_start, z_start)
        z = self.descend(regularized, z_start, c.iters, c.lr)
        f_z, _, f_z_x = self.grad(self.ll_objective, "ll_objective", z, c.train, True, False)
        reg = 0.5 * mu * dot(z, z)
        phi = f_z + reg
        with torch.no_grad(), self._ul_frozen(True):
            f_y = self.value(self.ll_objective, "ll_objective", y, c.train, False).detach()
            F_y = self.value(self.ul_objective, "ul_objective", y, c.val, False).detach()
        y_iters = c.iters if self._y_iters is None else self._y_iters
        if self._slack == "barrier":  # the paper's slack at the kept y, floored
            slack = torch.maximum(phi - f_y, self._slack_floor * reg)
        elif self._slack == "regularized":
            slack = reg
        else:
            slack = phi - self._ll_lower_bound
        rho = sigma / slack

        reads_y: list[bool] = []

        def barrier(w: list[torch.Tensor]) -> torch.Tensor:
            # F may not read y (grad_y F = 0): the LL term carries the graph
            ul = self.value(self.ul_objective, "ul_objective", w, c.val, require_graph=False)
            reads_y.append(ul.requires_grad)
            ll = self.value(self.ll_objective, "ll_objective", w, c.train)
            return ul + 0.5 * theta * dot(w, w) + rho * ll

        before_y = F_y + 0.5 * theta * dot(y, y) + rho * f_y
        lr_y = (c.lr if self._lr_y is None else self._lr_y) / (1.0 + rho)
        y = self.descend(barrier, y, y_iters, lr_y)
        ul_loss, _, ul_x = self.grad(self.ul_objective, "ul_objective", y, c.val, True, False)
        self.refuse_ul_without_graph(reads_y, ul_x)  # F must read x or y
        ll_loss, _, ll_x = self.grad(self.ll_objective, "ll_objective", y, c.train, True, False)
        after_y = ul_loss + 0.5 * theta * dot(y, y) + rho * ll_loss
        self._check(c.step, slack, (before_z, phi), (before_y, after_y))
        return Update(
            ul_loss=ul_loss,
            ll_loss=ll_loss,
            x_direction=combine((1.0, ul_x), (rho, ll_x), (-rho, f_z_x)),
            y=y,
            auxiliary={"z": z},
            diagnostics={
                "mu": mu,
                "theta": theta,
                "sigma": sigma,
                "rho": rho.detach(),
                "slack": slack.detach(),
                "ll_gap": (f_y - phi).detach(),
            },
        )

    def _check(
        self,
        step: int,
        slack: torch.Tensor,
        z_values: tuple[torch.Tensor, torch.Tensor],
        y_values: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Refuse the step (FloatingPointError, with the cure) if the barrier has no interior,
        or if an inner loop increased its objective: plain gradient descent on an L-smooth
        function decreases it whenever the step is below 2/L, so an increase beyond round-off
        proves the step too large for the problem's curvature."""
        values = torch.stack([slack.detach(), *z_values, *y_values]).to(torch.float64)
        s, z0, z1, y0, y1 = values.tolist()  # one device sync per UL step
        tol = math.sqrt(torch.finfo(slack.dtype).eps)
        if math.isfinite(s) and not s > 0:
            raise FloatingPointError(
                f"BVFIM step {step}: the barrier's slack is {s:.3g} <= 0 "
                + (
                    "(the regularized LL solution z is 0, so the value-function constraint has "
                    "no interior); pass ll_lower_bound (a lower bound of the LL objective) or "
                    "use PBGD or F2SA."
                    if self._slack != "lower_bound"
                    else "(the LL objective went below ll_lower_bound); pass a true lower bound."
                )
            )
        if not all(map(math.isfinite, (s, z0, z1, y0, y1))):
            return  # (NaN or inf, from the data or the objectives: the commit says so)
        if not z1 <= z0 + tol * (abs(z0) + abs(z1)):
            raise FloatingPointError(
                f"BVFIM step {step}: the inner loop on the regularized LL objective increased it "
                f"({z0:.6g} -> {z1:.6g}): ll.lr is above 2 / (the LL's curvature) here. Lower "
                "ll.lr (the LL's curvature may have grown with the UL variables)."
            )
        if not y1 <= y0 + tol * (abs(y0) + abs(y1)):
            raise FloatingPointError(
                f"BVFIM step {step}: the y loop increased its objective F + theta/2 |y|^2 + rho f "
                f"({y0:.6g} -> {y1:.6g}): its step lr_y / (1 + rho) is above 2 / (its "
                "curvature). Lower lr_y (default ll.lr): the UL objective's curvature in y "
                "exceeds the LL's."
            )
