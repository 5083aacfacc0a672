"""F2SA: fully first-order bilevel optimization through a growing Lagrangian penalty."""

from __future__ import annotations

from typing import Any

from torch import nn

from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.value_function import (
    FirstOrderMethod,
    StepContext,
    Update,
    check_number,
    check_optional_number,
    combine,
    grown,
    start_and_cap,
)


class F2SA(FirstOrderMethod):
    """F2SA (Fully First-order Stochastic Approximation): gradient descent on
    ``L_lambda(x) = min_y [F(x, y) + lambda f(x, y)] - lambda min_z f(x, z)``, whose gradient
    tends to the hypergradient as ``lambda`` grows (the error is ``O(1 / lambda)`` for a
    strongly convex LL), with ``lambda`` increased every UL step.

    One UL step ``k`` (``alpha = ll.lr``, ``T = ll.iters``), from the kept ``y_k`` and ``z_k``:

    1. ``T`` times: ``z <- z - alpha grad_y f(x_k, z)`` and
       ``y <- y - a_k (grad_y F(x_k, y) + lambda_k grad_y f(x_k, y))``, with
       ``a_k = lr_y / (1 + lambda_k)`` (the paper's ``alpha_k = O(1 / lambda_k)``: the
       smoothness of ``F + lambda f`` is at most ``(1 + lambda)`` that of ``F`` and ``f``, so a
       step that is stable for them is stable here);
    2. the UL parameters receive
       ``d_x = grad_x F(x_k, y) + lambda_k (grad_x f(x_k, y) - grad_x f(x_k, z))``;
    3. ``lambda_{k+1} = min(lambda_k + lam_growth, lam_max)``.

    Everything is a gradient of ``F`` or ``f``: no Hessian, no Jacobian. Cost per UL step:
    ``2 T + 3`` gradient evaluations (``T`` of ``f`` for ``z``, ``T`` of ``F + lambda f`` for
    ``y``, then ``F`` and ``f`` twice with respect to ``x``); memory: ``z``.

    The analysis assumes a strongly convex LL; the penalty form itself (shared with V-PBGD)
    also behaves on LLs that are convex and satisfy a quadratic-growth condition. The UL step
    size must not grow with ``lambda``: ``d_x`` stays bounded because ``y`` solves its
    penalized problem at fixed ``x`` before each UL step.

    Reference: Kwon, Kwon, Wright & Nowak (2023), "A Fully First-Order Method for Stochastic
    Bilevel Optimization", ICML. Defaults ``lam=1``, ``lam_growth=0.1`` are benchopt's starting
    values; benchopt lets the increment decay (``0.1 / (k + 1)^(1/7)``) and decays the steps of
    ``y``, ``z`` and ``x`` (as ``(k + 1)^-5/7``, ``^-4/7``, ``^-4/7``); here ``lambda`` grows
    linearly (cap it with ``lam_max``) and the steps are constant. The paper's oracles are
    stochastic, with new samples at every inner step and for the ``x`` step (benchopt draws
    them so); this class takes all its gradients of a UL step on the batches given to that
    step, so a minibatch per UL step gives the minibatch problem's ``y`` and ``z``.

    Args:
        ul_objective: ``state -> scalar`` UL objective ``F``.
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL objective ``f``.
        ll_model: the LL module; its trainable parameters are ``y`` (the penalized variable),
            updated in place.
        lam: the multiplier at the first UL step (> 0).
        lam_growth: added to it after every UL step (>= 0).
        lam_max: its largest value (``None``: no limit).
        lr_y: the base step size of the ``y`` steps (``a_k = lr_y / (1 + lambda_k)``);
            ``None``: ``ll.lr``.
    """

    name = "f2sa"
    auxiliary_names = ("z",)

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        lam: float = 1.0,
        lam_growth: float = 0.1,
        lam_max: float | None = None,
        lr_y: float | None = None,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.lam = lam
        self.lam_growth = lam_growth
        self.lam_max = lam_max
        self.lr_y = lr_y

    # may be set between UL steps, checked as at construction (the multiplier never falls
    # below its start)
    lam, lam_max = start_and_cap("lam", "lam_max")
    lam_growth = Setting(check_number, closed=True)
    lr_y = Setting(check_optional_number)

    def settings(self) -> dict[str, Any]:
        """The hyperparameters a resumed run must share."""
        return {
            "lam": self.lam,
            "lam_growth": self.lam_growth,
            "lam_max": self.lam_max,
            "lr_y": self.lr_y,
        }

    def lam_at(self, step: int) -> float:
        """The multiplier of UL step ``step``."""
        return grown(self._lam, self._lam_growth, self._lam_max, step)

    def _update(self, c: StepContext) -> Update:
        lam = self.lam_at(c.step)
        y = self.current_y()
        z = self._auxiliary_or("z", y)
        z = self.ll_descend(z, c.iters, c.lr, c.train)
        lr_y = (c.lr if self._lr_y is None else self._lr_y) / (1.0 + lam)

        reads_y: list[bool] = []

        def penalized(w: list) -> Any:
            # F may not read y (grad_y F = 0): the LL term carries the graph
            ul = self.value(self.ul_objective, "ul_objective", w, c.val, require_graph=False)
            reads_y.append(ul.requires_grad)
            return ul + lam * self.value(self.ll_objective, "ll_objective", w, c.train)

        y = self.descend(penalized, y, c.iters, lr_y)
        ul_loss, _, ul_x = self.grad(self.ul_objective, "ul_objective", y, c.val, True, False)
        self.refuse_ul_without_graph(reads_y, ul_x)  # F must read x or y
        ll_loss, _, ll_x = self.grad(self.ll_objective, "ll_objective", y, c.train, True, False)
        _, _, ll_z_x = self.grad(self.ll_objective, "ll_objective", z, c.train, True, False)
        return Update(
            ul_loss=ul_loss,
            ll_loss=ll_loss,
            x_direction=combine((1.0, ul_x), (lam, ll_x), (-lam, ll_z_x)),
            y=y,
            auxiliary={"z": z},
            diagnostics={"lambda": lam},
        )
