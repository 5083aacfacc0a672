"""MESO (MEHA): single-loop first-order steps on a Moreau-envelope reformulation."""

from __future__ import annotations

from typing import Any

from torch import nn

from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.value_function import (
    FirstOrderMethod,
    StepContext,
    Update,
    add_scaled,
    check_number,
    check_optional_number,
    combine,
    dot,
)


class MESO(FirstOrderMethod):
    """Moreau-envelope based single-loop Hessian-free method (MEHA; BOAT's MESO).

    The LL constraint ``y in argmin f(x, .)`` is written with the Moreau envelope
    ``v_gamma(x, y) = min_theta f(x, theta) + ||theta - y||^2 / (2 gamma)`` as
    ``f(x, y) - v_gamma(x, y) <= 0`` (exact for convex ``f``, and for ``f`` weakly convex with
    ``gamma`` below the inverse weak-convexity modulus), and the method descends the penalty
    ``F / c_k + f - v_gamma`` with ``c_k = c0 (k + 1)^p`` growing (``0 < p < 1/2``), tracking
    the envelope's minimizer ``theta`` by one gradient step per UL step. (BOAT 1.1.1's ``MESO``
    orders the steps otherwise: ``y`` first, at ``x_k``, then ``x`` at ``y_{k+1}``, with
    ``c = 0.2`` at its first step; it was not the reference here.)

    One UL step ``k``, in the paper's order (``theta``, then ``x``, then ``y`` at the new
    ``x``):

    1. ``theta_{k+1} = theta_k - eta (grad_y f(x_k, theta_k) + (theta_k - y_k) / gamma)``;
    2. the UL parameters receive
       ``d_x = grad_x F(x_k, y_k) / c_k + grad_x f(x_k, y_k) - grad_x f(x_k, theta_{k+1})``;
    3. ``y_{k+1} = y_k - lr_y g_y`` with
       ``g_y = grad_y F(x', y_k) / c_k + grad_y f(x', y_k) + (theta_{k+1} - y_k) / gamma``,
       ``x' = x_{k+1}``.

    Step 3 needs ``x_{k+1}``, which the runner's UL optimizer makes after this method
    returns, so it is taken at the start of the next UL step (with that step's batches): the
    iterates are the paper's, and ``ll_model`` holds ``y_k`` while ``x`` is ``x_{k+1}``.
    Cost per UL step: 6 gradient evaluations (2 of ``F``, 4 of ``f``; 4 at the first UL
    step, which has no ``y`` update); ``ll.iters`` is not used; memory: ``theta``.

    For fixed ``c`` the iterates converge to a minimizer of the penalized problem, which is
    ``O(1 / c)`` from the bilevel solution; the growing ``c_k`` removes that bias slowly (the
    UL objective's weight falls like ``(k + 1)^-p``).

    Reference: Liu, Liu, Yao, Zeng & Zhang (2024), "Moreau Envelope for Nonconvex Bi-Level
    Optimization: A Single-loop and Hessian-free Solution Strategy", ICML.

    Args:
        ul_objective: ``state -> scalar`` UL objective ``F``.
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL objective ``f``.
        ll_model: the LL module; its trainable parameters are ``y``, updated in place.
        gamma: the Moreau envelope's parameter (> 0).
        c0: the penalty's initial value ``c_0`` (> 0).
        p: its growth exponent (>= 0; the paper's analysis takes ``0 < p < 1/2``; ``p = 0``
            keeps ``c`` fixed).
        eta: step size of ``theta``; ``None``: ``ll.lr``.
        lr_y: step size of ``y``; ``None``: ``ll.lr``.
    """

    name = "meso"
    auxiliary_names = ("theta",)

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        gamma: float = 10.0,
        c0: float = 1.0,
        p: float = 0.25,
        eta: float | None = None,
        lr_y: float | None = None,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.gamma = gamma
        self.c0 = c0
        self.p = p
        self.eta = eta
        self.lr_y = lr_y

    # may be set between UL steps, checked as at construction
    gamma = Setting(check_number)
    c0 = Setting(check_number)
    p = Setting(check_number, closed=True)
    eta = Setting(check_optional_number)
    lr_y = Setting(check_optional_number)

    def settings(self) -> dict[str, Any]:
        """The hyperparameters a resumed run must share."""
        return {"gamma": self.gamma, "c0": self.c0, "p": self.p, "eta": self.eta, "lr_y": self.lr_y}

    def c_at(self, step: int) -> float:
        """The penalty ``c_k = c0 (k + 1)^p`` of UL step ``step``."""
        return self._c0 * (step + 1) ** self._p

    def _update(self, c: StepContext) -> Update:
        y = self.current_y()
        theta = self._auxiliary_or("theta", y)
        eta = c.lr if self._eta is None else self._eta
        if c.step > 0:  # step 3 of the previous UL step, at x_{k} = the previous x_{k+1}
            lr_y = c.lr if self._lr_y is None else self._lr_y
            _, ul_y, _ = self.grad(self.ul_objective, "ul_objective", y, c.val)
            _, ll_y, _ = self.grad(self.ll_objective, "ll_objective", y, c.train)
            inv_c = 1.0 / self.c_at(c.step - 1)
            d_y = [
                g + inv_c * u + (t - w) / self._gamma
                for g, u, w, t in zip(ll_y, ul_y, y, theta, strict=True)
            ]
            y = add_scaled(y, d_y, -lr_y)
        _, th_y, _ = self.grad(self.ll_objective, "ll_objective", theta, c.train)
        d_theta = [g + (t - w) / self._gamma for g, t, w in zip(th_y, theta, y, strict=True)]
        theta = add_scaled(theta, d_theta, -eta)
        ck = self.c_at(c.step)
        ul_loss, _, ul_x = self.grad(self.ul_objective, "ul_objective", y, c.val, True, False)
        ll_loss, _, ll_x = self.grad(self.ll_objective, "ll_objective", y, c.train, True, False)
        envelope, _, th_x = self.grad(
            self.ll_objective, "ll_objective", theta, c.train, True, False
        )
        differences = [t - w for t, w in zip(theta, y, strict=True)]
        gap = ll_loss - envelope - dot(differences, differences) / (2 * self._gamma)
        return Update(
            ul_loss=ul_loss,
            ll_loss=ll_loss,
            x_direction=combine((1.0 / ck, ul_x), (1.0, ll_x), (-1.0, th_x)),
            y=y,
            auxiliary={"theta": theta},
            diagnostics={"c": ck, "gap": gap},
        )
