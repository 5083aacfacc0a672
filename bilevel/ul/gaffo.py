"""GAFFO: single-loop first-order steps on a regularized gap function of the LL, with
optional LL inequality constraints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilevel.ll import evaluate_at
from bilevel.settings import Fixed, Setting
from bilevel.state import Objective, check_objective_result, make_state
from bilevel.ul.value_function import (
    Batch,
    FirstOrderMethod,
    StepContext,
    Tensors,
    Update,
    add_scaled,
    check_number,
    check_optional_number,
    combine,
    dot,
)

Constraints = Callable[[dict[str, Any]], torch.Tensor]


def _check_constraints(value: Any, name: str) -> Constraints | None:
    """``None`` or a callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable: state -> tensor (<= 0 feasible).")
    return value


class GAFFO(FirstOrderMethod):
    """Gap-function based first-order method for bilevel problems whose LL may carry
    inequality constraints ``g(x, y) <= 0`` (``ll_constraints``).

    With the LL Lagrangian ``L(x, y, z) = f(x, y) + <z, g(x, y)>`` (``z >= 0``), the doubly
    regularized gap function

        ``G(x, y, z) = max_{theta, lam >= 0} L(x, y, lam) - L(x, theta, z) - R``,
        ``R = ||theta - y||^2 / (2 gamma1) + ||lam - z||^2 / (2 gamma2)``

    is ``>= 0`` and vanishes exactly at the LL's KKT pairs ``(y, z)`` (for an LL convex in
    ``y``), so the bilevel problem is ``min F(x, y) s.t. G(x, y, z) <= 0``; the method descends
    the penalty ``F / c_k + G`` in ``(x, y, z)`` with ``c_k = c0 (k + 1)^p``. The maximizer
    in ``lam`` is explicit, ``lam* = max(0, z + gamma2 g(x, y))``; ``theta`` is tracked by one
    gradient step per UL step; Danskin's theorem gives ``grad G`` from gradients of ``f`` and
    ``g`` only.

    One UL step ``k`` (all at ``(x_k, y_k, z_k)``; the paper's Algorithm 1, BiC-GAFFA):

    1. ``theta_{k+1} = theta_k - eta (grad_y L(x_k, theta_k, z_k) + (theta_k - y_k) / gamma1)``;
       ``lam = max(0, z_k + gamma2 g(x_k, y_k))``;
    2. ``d_x = grad_x F / c_k + grad_x L(x_k, y_k, lam) - grad_x L(x_k, theta_{k+1}, z_k)``
       goes to the UL parameters;
    3. ``y_{k+1} = y_k - lr_y g_y`` with
       ``g_y = grad_y F / c_k + grad_y L(x_k, y_k, lam) + (theta_{k+1} - y_k) / gamma1``;
    4. ``z_{k+1} = Proj_[0, z_max](z_k - lr_z d_z)``,
       ``d_z = -g(x_k, theta_{k+1}) + (lam - z_k) / gamma2``.

    What is verified. The paper's text (Algorithm 1 and its equation numbers) could not be
    read here: only its abstract was available. The rule above was checked line by line
    against the authors' published code (github.com/PerryChuh/BiC-GAFFA, ``1. Toy/Toy.py``,
    the synthetic experiment of the paper's Section 6.1; the SVM and hyper-cleaning scripts
    have the same structure): the same four directions, evaluated at the same points
    (``theta_{k+1}`` in ``d_x`` and ``d_z``, ``lam`` from ``y_k``, ``x`` and ``y`` moved
    together at ``x_k``), ``c_k = c0 (k + 1)^p`` (the code uses ``p = 0.3`` and sweeps
    ``p`` up to 0.49), and ``z`` clipped to ``[0, R]`` (``R = 10`` in the hyperparameter
    experiments: ``z_max`` here, unbounded by default). Not taken from the code: its cap
    ``c_k <= 10`` in the toy script (not in the other scripts), its projections of ``theta``
    and ``y`` onto a set ``Y`` (this class has no set constraint on ``y``; put such
    constraints in ``ll_constraints``), and its step-size ratios (``eta = 10 lr_y``,
    ``lr_z = lr_y`` in the toy script; here all default to ``ll.lr``). BOAT 1.1.1's
    ``GAFFO`` operation is a different algorithm (a finite-difference probe of the LL
    gradient, with UL and LL variables of the same shape) and was not used as a reference.
    (The repository's current ``Toy/Toy.py`` treats its toy constraint as an equality:
    ``lam = z + gamma2 g`` unprojected, ``z`` clipped to ``[-R, R]``; the inequality form here,
    ``lam = max(0, .)`` and ``z >= 0``, is that of its ``GAN/bi_wgan.py``.)

    Without constraints ``G`` is ``f - v_gamma1``, the Moreau-envelope gap of
    :class:`~bilevel.ul.MESO`, and the two methods differ only in the order of the updates
    (here ``x`` and ``y`` move together, at ``x_k``). Assumptions (the paper's abstract): an
    LL convex in ``y`` (no strong convexity, no joint convexity of the constraints).
    Cost per UL step: 3 gradient
    evaluations of ``f`` (with constraints: of ``L``, plus 2 evaluations of ``g`` and one of
    ``f``) and one of ``F``; ``ll.iters`` is not used; memory: ``theta`` and the
    multipliers ``z``.

    Reference: Yao, Yin, Zeng & Zhang (2025), "Overcoming Lower-Level Constraints in Bilevel
    Optimization: A Novel Approach with Regularized Gap Functions", ICLR (arXiv:2406.01992).

    Args:
        ul_objective: ``state -> scalar`` UL objective ``F``.
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL objective ``f``.
        ll_model: the LL module; its trainable parameters are ``y``, updated in place.
        ll_constraints: ``state -> tensor`` of LL constraint values, feasible where ``<= 0``
            (evaluated on the LL batch like ``ll_objective``); ``None``: an unconstrained LL.
        gamma1: the proximal parameter of ``theta`` (> 0).
        gamma2: the proximal parameter of the multipliers (> 0).
        c0: the penalty's initial value (> 0).
        p: its growth exponent (>= 0; ``p = 0`` keeps it fixed).
        eta: step size of ``theta``; ``None``: ``ll.lr``.
        lr_y: step size of ``y``; ``None``: ``ll.lr``.
        lr_z: step size of ``z``; ``None``: ``lr_y``.
        z_max: upper bound of the multipliers (the authors' code clips them to ``[0, R]``);
            ``None``: no upper bound.
    """

    name = "gaffo"
    auxiliary_names = ("theta", "z")
    free_shape_auxiliary = ("z",)

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        ll_constraints: Constraints | None = None,
        gamma1: float = 10.0,
        gamma2: float = 1.0,
        c0: float = 1.0,
        p: float = 0.25,
        eta: float | None = None,
        lr_y: float | None = None,
        lr_z: float | None = None,
        z_max: float | None = None,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.ll_constraints = ll_constraints
        self.gamma1 = gamma1
        self.gamma2 = gamma2
        self.c0 = c0
        self.p = p
        self.eta = eta
        self.lr_y = lr_y
        self.lr_z = lr_z
        self.z_max = z_max

    ll_constraints = Fixed(
        "the multipliers z kept across UL steps are one per constraint value it returns, "
        "and checkpoints record whether there are any",
        _check_constraints,
    )
    # may be set between UL steps, checked as at construction
    gamma1 = Setting(check_number)
    gamma2 = Setting(check_number)
    c0 = Setting(check_number)
    p = Setting(check_number, closed=True)
    eta = Setting(check_optional_number)
    lr_y = Setting(check_optional_number)
    lr_z = Setting(check_optional_number)
    z_max = Setting(check_optional_number)

    def settings(self) -> dict[str, Any]:
        """The hyperparameters a resumed run must share."""
        return {
            "constrained": self.ll_constraints is not None,
            "gamma1": self.gamma1,
            "gamma2": self.gamma2,
            "c0": self.c0,
            "p": self.p,
            "eta": self.eta,
            "lr_y": self.lr_y,
            "lr_z": self.lr_z,
            "z_max": self.z_max,
        }

    def c_at(self, step: int) -> float:
        """The penalty ``c_k = c0 (k + 1)^p`` of UL step ``step``."""
        return self._c0 * (step + 1) ** self._p

    def _constraint_values(self, weights: Tensors, batch: Batch) -> torch.Tensor:
        """``g(x, y)`` at the LL weights ``weights`` (detached)."""
        assert self.ll_constraints is not None
        model = self._model
        assert model is not None
        with torch.no_grad(), self._ul_frozen(True):
            with evaluate_at(model, self._full(weights)):
                values = self.ll_constraints(make_state(*batch, self.ul_model, model))
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise TypeError(
                "ll_constraints must return a real floating-point tensor of constraint values "
                f"(feasible where <= 0), got {got}; for complex weights, constrain real "
                "quantities of them (w.real, w.abs())."
            )
        return values.detach()

    def _lagrangian(self, multipliers: torch.Tensor | None) -> Objective:
        """``state -> f + <multipliers, g>`` (``f`` alone without constraints)."""
        if multipliers is None:
            return self.ll_objective

        def lagrangian(state: dict[str, Any]) -> torch.Tensor:
            value = check_objective_result(self.ll_objective(state), "ll_objective")
            assert self.ll_constraints is not None
            values = self.ll_constraints(state)
            if not isinstance(values, torch.Tensor) or values.shape != multipliers.shape:
                raise ValueError(
                    "ll_constraints must return a tensor of the same shape at every call, got "
                    f"{getattr(values, 'shape', type(values).__name__)} after "
                    f"{tuple(multipliers.shape)}."
                )
            return value + (multipliers * values).sum()

        return lagrangian

    def _update(self, c: StepContext) -> Update:
        y = self.current_y()
        theta = self._auxiliary_or("theta", y)
        eta = c.lr if self._eta is None else self._eta
        lr_y = c.lr if self._lr_y is None else self._lr_y
        z = lam = None
        if self.ll_constraints is not None:
            g_y = self._constraint_values(y, c.train)
            saved = self.auxiliary.get("z")
            z = torch.zeros_like(g_y) if saved is None else saved[0].clone()
            if z.shape != g_y.shape:
                raise ValueError(
                    f"ll_constraints returned shape {tuple(g_y.shape)}, the multipliers kept "
                    f"have shape {tuple(z.shape)}."
                )
            lam = torch.clamp_min(z + self._gamma2 * g_y, 0.0)
        at_theta = self._lagrangian(z)
        _, th_y, _ = self.grad(at_theta, "ll_objective", theta, c.train)
        d_theta = [g + (t - w) / self._gamma1 for g, t, w in zip(th_y, theta, y, strict=True)]
        theta = add_scaled(theta, d_theta, -eta)
        ck = self.c_at(c.step)
        ul_loss, ul_y, ul_x = self.grad(self.ul_objective, "ul_objective", y, c.val, wrt_x=True)
        lag_value, lag_y, lag_x = self.grad(self._lagrangian(lam), "ll_objective", y, c.train, True)
        ll_loss = lag_value
        if lam is not None:  # the Lagrangian is not the LL loss
            ll_loss = self.reported_value(self.ll_objective, "ll_objective", y, c.train)
        th_value, _, th_x = self.grad(at_theta, "ll_objective", theta, c.train, True, False)
        d_y = [
            u / ck + g + (t - w) / self._gamma1
            for u, g, w, t in zip(ul_y, lag_y, y, theta, strict=True)
        ]
        auxiliary = {"theta": theta}
        differences = [t - w for t, w in zip(theta, y, strict=True)]
        proximal = dot(differences, differences)
        gap = lag_value - th_value - proximal / (2 * self._gamma1)
        if z is not None and lam is not None:
            lr_z = lr_y if self._lr_z is None else self._lr_z
            g_theta = self._constraint_values(theta, c.train)
            d_z = -g_theta + (lam - z) / self._gamma2
            auxiliary["z"] = [torch.clamp(z - lr_z * d_z, min=0.0, max=self._z_max)]
            gap = gap - ((lam - z) ** 2).sum() / (2 * self._gamma2)
        return Update(
            ul_loss=ul_loss,
            ll_loss=ll_loss,
            x_direction=combine((1.0 / ck, ul_x), (1.0, lag_x), (-1.0, th_x)),
            y=add_scaled(y, d_y, -lr_y),
            auxiliary=auxiliary,
            diagnostics={"c": ck, "gap": gap},
        )
