"""BOME: a value-function constraint followed by a dynamic barrier (first order)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.roundoff import batch_terms, roundoff_floor
from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.value_function import (
    FirstOrderMethod,
    StepContext,
    Update,
    add_scaled,
    check_choice,
    check_number,
    check_optional_schedule,
    combine,
    dot,
    evaluate_schedule,
)


class BOME(FirstOrderMethod):
    """BOME (Bilevel Optimization Made Easy): first-order steps on the value-function
    reformulation ``min_{x,y} F(x, y) s.t. q(x, y) = f(x, y) - min_y' f(x, y') <= 0``, with
    the dynamic barrier of Gong, Liu & Liu (2021) choosing the multiplier at every step.

    One UL step ``k`` (``alpha = ll.lr``, ``T = ll.iters``):

    1. ``y_hat = y_k`` after ``T`` steps ``y_hat <- y_hat - alpha grad_y f(x_k, y_hat)``;
    2. ``q(x, y) = f(x, y) - f(x, y_hat)`` with ``y_hat`` held fixed, so
       ``grad q = (grad_x f(x_k, y_k) - grad_x f(x_k, y_hat), grad_y f(x_k, y_k))``;
    3. ``phi = eta ||grad q||^2`` (``phi="grad_norm"``, the paper's default) or
       ``eta q(x_k, y_k)`` (``phi="value"``);
       ``lambda = max(phi - <grad F, grad q>, 0) / ||grad q||^2`` (0 where ``grad q = 0``,
       and where the inner steps moved on round-off gradients alone: the first step, ``alpha
       ||grad_y f(x_k, y_k)||``, within one floor ``ROUNDOFF * eps * ||y||`` and ``||y_hat -
       y||`` within ``T`` of them (``sqrt(n / 100)`` times that over ``n > 100`` examples,
       ``bilevel.roundoff.roundoff_floor``): ``y`` then solves the LL in floating point, and
       ``grad q`` is round-off, whose square would make ``lambda`` about ``1e14`` and ``d``
       noise);
    4. ``d = grad F(x_k, y_k) + lambda grad q``: the UL parameters receive ``d_x`` (the UL
       optimizer steps them, with the paper's ``xi`` as its learning rate) and
       ``y_{k+1} = y_k - lr_y d_y``.

    ``d`` is the direction closest to ``grad F`` whose inner product with ``grad q`` is at
    least ``phi``: ``F`` decreases as far as the constraint allows. No Hessian is used.
    Cost per UL step: ``T + 3`` gradient evaluations (``T`` of ``f`` for ``y_hat``, one of ``F``
    and two of ``f`` with respect to ``(x, y)``); memory: two copies of ``y``.

    The paper's analysis covers non-convex LL objectives (under a PL-type condition on the
    value-function constraint) and a non-singleton LL solution set. With a constant step
    there is no fixed point (the barrier keeps moving ``y``): the iterates stay in a
    neighbourhood of a stationary point whose size shrinks with the step (on the tests'
    strongly convex quadratic, ``|x - x*|`` levels off near 0.095 at ``xi = 0.1`` and 0.044
    at ``xi = 0.03``); decrease both steps together for a smaller error (``lr_y`` takes a
    schedule), and give the inner loop enough steps (with 3 instead of 5 the same run
    stalls at 0.089 instead of 0.033).

    Reference: Liu, Ye, Wright, Stone & Liu (2022), "BOME! Bilevel Optimization Made Easy: A
    Simple First-Order Approach", NeurIPS.

    Args:
        ul_objective: ``state -> scalar`` UL objective ``F``.
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL objective ``f``.
        ll_model: the LL module; its trainable parameters are the LL variables ``y``, updated
            in place at every UL step.
        eta: the barrier's control parameter (> 0); the paper's default 0.5.
        phi: ``"grad_norm"`` (``phi = eta ||grad q||^2``, the paper's default) or ``"value"``
            (``phi = eta q``).
        lr_y: step size of the update of ``y`` (the paper's ``xi``, shared with the UL
            optimizer's learning rate): a number, or a callable ``k -> step size`` to follow
            a decreasing UL schedule (``torch.optim.lr_scheduler.LambdaLR``, given as
            ``BilevelProblem(..., ul_scheduler=...)`` so that checkpoints keep it); ``None``:
            ``ll.lr``, as benchopt's BOME does.
    """

    name = "bome"

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        eta: float = 0.5,
        phi: str = "grad_norm",
        lr_y: float | Callable[[int], float] | None = None,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.eta = eta
        self.phi = phi
        self.lr_y = lr_y

    # may be set between UL steps, checked as at construction
    eta = Setting(check_number)
    phi = Setting(check_choice, ("grad_norm", "value"))
    lr_y = Setting(check_optional_schedule)

    def settings(self) -> dict[str, Any]:
        """The hyperparameters a resumed run must share."""
        lr_y = self.lr_y
        if callable(lr_y):
            lr_y = getattr(lr_y, "__name__", "callable")
        return {"eta": self.eta, "phi": self.phi, "lr_y": lr_y}

    def _update(self, c: StepContext) -> Update:
        y = self.current_y()
        y_hat = self.ll_descend(y, c.iters, c.lr, c.train)
        ul_loss, ul_y, ul_x = self.grad(self.ul_objective, "ul_objective", y, c.val, wrt_x=True)
        ll_loss, q_y, ll_x = self.grad(self.ll_objective, "ll_objective", y, c.train, wrt_x=True)
        ll_hat, _, ll_hat_x = self.grad(
            self.ll_objective, "ll_objective", y_hat, c.train, wrt_x=True, wrt_y=False
        )
        q_x = combine((1.0, ll_x), (-1.0, ll_hat_x))
        squared_norm = dot(q_y, q_y)
        if any(g is not None for g in q_x):
            squared_norm = squared_norm + dot(q_x, q_x)
        inner = dot(ul_y, q_y)
        if any(u is not None and v is not None for u, v in zip(ul_x, q_x, strict=True)):
            inner = inner + dot(ul_x, q_x)
        gap = ll_loss - ll_hat
        phi = self._eta * (squared_norm if self._phi == "grad_norm" else gap)
        tiny = torch.finfo(squared_norm.dtype).tiny
        lam = torch.clamp_min(phi - inner, 0.0) / squared_norm.clamp_min(tiny)
        # y solves the LL in floating point where the inner steps moved on round-off
        # gradients alone, each at most about the floor of ||y|| (lr g, with lr ||H|| < 2 and
        # g at the floor of ||H|| ||y||; 4 steps on 1e6 uncentered examples moved 70 to 340
        # eps ||y||, and lambda was 0 or 4e10 by the thread count): the first step, lr q_y,
        # and all T together within that. Then q and grad q are differences of equal terms,
        # and lambda would be round-off over round-off squared (1e14, steering d by noise):
        # grad q = 0, lambda = 0. (Their travel alone is not enough: in float32 a floor is
        # 1e-5 ||y||, and T = 100 steps that converge travel less than T of them from a y
        # whose gradient is 1e3 times its round-off: lambda was 0 where the formula gave 1e3)
        floor = roundoff_floor(linalg.norm(y), batch_terms(c.train[0]))
        moved = linalg.norm([a - b for a, b in zip(y_hat, y, strict=True)])
        first = c.lr * linalg.norm(q_y)
        at_solution = (first <= floor) & (moved <= c.iters * floor)
        lam = torch.where(at_solution, torch.zeros_like(lam), lam)
        lr_y = c.lr if self._lr_y is None else evaluate_schedule(self._lr_y, "lr_y", c.step)
        d_y = add_scaled(ul_y, q_y, lam)
        return Update(
            ul_loss=ul_loss,
            ll_loss=ll_loss,
            x_direction=combine((1.0, ul_x), (lam, q_x)),
            y=add_scaled(y, d_y, -lr_y),
            diagnostics={"lambda": lam.detach(), "q": gap},
        )
