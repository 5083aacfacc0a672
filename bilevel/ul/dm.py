"""DM: the single-loop method of multipliers of sl-BAMM (warm-started LL and multiplier)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.ll import evaluate_at
from bilevel.second_derivatives import gradient_to_differentiate
from bilevel.settings import Setting
from bilevel.state import Objective, all_finite, parameter_names
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    add,
    detached_weights,
    refuse_fixed_point_map,
    refuse_rule_weight_decay,
)

Tensors = list[torch.Tensor]


def _zeros_for_none(values: Any, like: Tensors) -> Tensors:
    return [torch.zeros_like(x) if v is None else v for x, v in zip(like, values, strict=True)]


def _check_eta(value: Any, name: str) -> float | str:
    """``"auto"``, or a finite number > 0 as a float."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number > 0 or 'auto', got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 or 'auto', got {value!r}.")
    return float(value)


class DM(HypergradientCalculator):
    """Single-loop bilevel method of multipliers (sl-BAMM's multiplier update): the LL
    weights ``y`` and a multiplier ``z`` (the running estimate of ``H^{-1} grad_y F``) are
    kept across UL steps and advanced once per UL step, together with the UL variables ``x``.

    UL step ``k`` (``f`` the LL objective, ``F`` the UL objective)::

        y_{k+1} = the LL optimizer's run from y_k at x_k         (iters = 1: one LL step)
        z_{k+1} = z_k - eta_k (grad2_yy f(x_k, y_{k+1}) z_k - grad_y F(x_k, y_{k+1}))
        d_k     = grad_x F(x_k, y_{k+1}) - grad2_xy f(x_k, y_{k+1}) z_{k+1}
        x_{k+1} = the UL optimizer's step along d_k              (BilevelProblem.step)

    with ``z_0 = 0`` and ``y_0`` the LL model's weights. ``eta_k`` is ``eta`` when a number,
    or with ``eta="auto"`` the exact line search of one steepest-descent step on
    ``z^T H z / 2 - z^T grad_y F``: ``eta_k = ||r||^2 / (r^T H r)``, ``r = H z_k - grad_y F``
    (0 where ``r^T H r <= 0``). This is the update of the authors' reference code
    (``Darts_W_RHG`` for a number, ``Darts_W_CG`` for ``"auto"``); BOAT's ``DM`` takes its
    derivatives at ``y_k`` (before the LL step) and uses ``z_k`` in ``d_k``. The LL weights
    live in ``ll_model`` itself: each call writes ``y_{k+1}`` into its parameters, so they
    are checkpointed with it; ``z`` and ``k`` are in :meth:`state_dict`.

    At a fixed point ``z = H^{-1} grad_y F`` and ``d`` is the implicit hypergradient. Cost per
    UL step: the LL run, one UL gradient, one LL gradient with its graph, one
    Hessian-vector product (two with ``"auto"``) and one mixed second-derivative product;
    memory of one LL step. The paper's averaging (LL steps on ``mu_k F + (1 - mu_k) f``, for
    LLs without strong convexity) is the LL's business here: run DM over
    :class:`bilevel.ll.BDA` dynamics; the multiplier step uses the Hessian of ``f`` (the
    authors' code with averaging on, and BOAT's GDA variant, use the averaged objective's;
    they agree as ``mu_k -> 0``). DM is stateful: each :meth:`task_gradients` call (each
    ``BilevelProblem.step``) advances ``y`` and ``z`` (``BilevelProblem.hypergradient`` is a
    query that puts them back); it keeps ONE LL problem, so it is not for batches of tasks.
    The UL variables must not be LL weights (MAML-style initializations).

    Reference: Liu, Liu, Yao, Zeng & Zhang (2023), "Averaged Method of Multipliers for
    Bi-Level Optimization without Lower-Level Strong Convexity", ICML (sl-BAMM).

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F``.
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL loss ``f``.
        ll_model: the LL module (weights ``y``, kept across UL steps).
        eta: the multiplier's step, a number > 0 (below ``2 / lambda_max(H)``) or
            ``"auto"`` (exact line search, the default).
    """

    #: one LL state moves across UL steps: the runner refuses task batches and processes
    #: that would each move it
    keeps_ll_state = True

    name = "dm"

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        eta: float | str = "auto",
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.eta = eta
        pairs = zip(self.ul_params, self.initial_weight_of, strict=True)
        shared = [p for p, j in pairs if j is not None]
        if shared:
            raise ValueError(
                f"DM keeps the LL weights across UL steps, so UL parameter(s) "
                f"{parameter_names(ul_model, shared)} cannot also be LL weights (an "
                "initialization, as in MAML). Use Reverse, MemorySavingReverse, FirstOrder or "
                "Reptile for those (Implicit reaches initial weights only through a proximal "
                "term in ll_objective, as in iMAML)."
            )
        #: the multiplier ``z_k``, one tensor per trainable LL parameter (``None``: zeros)
        self.multiplier: Tensors | None = None
        #: UL steps taken
        self.steps = 0
        self._pending: Tensors | None = None

    #: may be set between UL steps, checked as at construction
    eta = Setting(_check_eta)

    def differentiable_steps(self, iters: int) -> int:
        """None: derivatives are taken at the last LL iterate."""
        return 0

    def settings(self) -> dict[str, Any]:
        """The multiplier's step."""
        return {"eta": self.eta}

    def check_against(self, ll: Any) -> None:
        """Also: the LL descends ``ll_objective``, whose Hessian the multiplier step uses (not
        a fixed-point map; no ``weight_decay`` in the update rule: the LL would then settle
        at a zero of ``grad f + wd y`` (L2), or short of one of ``grad f`` (AdamW), while
        ``z`` solves with the Hessian of ``f``)."""
        refuse_fixed_point_map(ll, "DM")
        refuse_rule_weight_decay(getattr(ll, "rule", None), "DM")
        super().check_against(ll)

    def state_dict(self) -> dict[str, Any]:
        """The multiplier and the step count (the LL weights are ``ll_model``'s)."""
        multiplier = None if self.multiplier is None else [z.clone() for z in self.multiplier]
        return {"multiplier": multiplier, "steps": self.steps}

    def state_at_step_start(self) -> dict[str, Any]:
        """:meth:`state_dict` with the multiplier shared: a step replaces it
        (:meth:`commit_state`)."""
        return {"multiplier": self.multiplier, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            ValueError: the multiplier does not match the LL model's trainable parameters.
        """
        if not isinstance(state, dict) or set(state) != {"multiplier", "steps"}:
            raise ValueError(
                "DM state must be a dict with 'multiplier' and 'steps' (from DM.state_dict())."
            )
        steps, multiplier = state["steps"], state["multiplier"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"DM state 'steps' must be an integer >= 0, got {steps!r}.")
        if multiplier is not None:
            params = [p for p in self.ll_model.parameters() if p.requires_grad]
            ok = isinstance(multiplier, list | tuple) and len(multiplier) == len(params)
            ok = ok and all(
                isinstance(z, torch.Tensor) and z.shape == p.shape
                for z, p in zip(multiplier, params, strict=True)
            )
            if not ok:
                raise ValueError(
                    "DM state 'multiplier' must hold one tensor per trainable LL parameter, "
                    f"shaped {[tuple(p.shape) for p in params]}: it was saved for another model."
                )
            multiplier = [z.detach().to(p).clone() for z, p in zip(multiplier, params, strict=True)]
        self.multiplier = multiplier
        self._multiplier_params = (
            None
            if multiplier is None
            else [p for p in self.ll_model.parameters() if p.requires_grad]
        )
        self.steps = steps

    def task_gradients(
        self, ll: Any, train: tuple[Any, Any], val: tuple[Any, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One UL step's hypergradient (added to ``.grad``); advances ``y`` (written into
        ``ll_model``) and ``z``. Returns the UL loss and the last LL loss (detached)."""
        trajectory = self.run_ll(ll, *train, ul_batch=val)
        try:
            loss = self.accumulate(trajectory, val, train)
            pending = self._pending
            new_weights, _ = detached_weights(trajectory)
            new_weights = [w for w, t in zip(new_weights, trajectory.trainable, strict=True) if t]
            if pending is None or not all_finite([*pending, *new_weights]):
                raise FloatingPointError(
                    f"DM's multiplier or LL weights became NaN or inf at UL step {self.steps}: "
                    "lower eta (or use eta='auto') and the LL learning rate."
                )
            made_for = self._pending_params
            self.commit_state(lambda: self._advance(pending, made_for, new_weights))
        finally:
            self._pending = None
            ll.release(trajectory.model)
        return loss, trajectory.losses[-1]

    def _advance(self, multiplier: Tensors, made_for: Tensors, weights: Tensors) -> None:
        """Take the step: the new multiplier (made for the parameters ``made_for``) and the
        new LL weights, written into ``ll_model``."""
        self.multiplier = multiplier
        self._multiplier_params = made_for
        self.steps += 1
        params = [p for p in self.ll_model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        weights, active = detached_weights(call.trajectory)
        y = [weights[i] for i in active]
        trainable = zip(self.ll_model.parameters(), call.trajectory.trainable, strict=True)
        params = [p for p, t in trainable if t]
        made_for = self.__dict__.get("_multiplier_params")
        changed = made_for is not None and [id(p) for p in made_for] != [id(p) for p in params]
        if self.multiplier is not None and changed:
            raise ValueError(
                f"DM's multiplier was built for the trainable LL parameters "
                f"{parameter_names(self.ll_model, made_for)}, but the trainable LL parameters "
                f"are now {parameter_names(self.ll_model, params)}: DM keeps one multiplier "
                "tensor per trainable parameter across UL steps. Keep the trainable set fixed, "
                "or restart the multiplier with dm.load_state_dict({'multiplier': None, "
                "'steps': dm.steps})."
            )
        self._pending_params = params
        z = self.multiplier if self.multiplier is not None else [torch.zeros_like(x) for x in y]
        n = len(self.ul_params)
        with evaluate_at(call.auxiliary_model, weights):
            loss = self.ul_loss(call)
            grads = torch.autograd.grad(loss, [*self.ul_params, *y], allow_unused=True)
            g = gradient_to_differentiate(self.ll_loss(call), y, call.auxiliary_model, "DM")
        direct, v = grads[:n], _zeros_for_none(grads[n:], y)
        linked = [(gi, i) for i, gi in enumerate(g) if gi is not None and gi.requires_grad]

        def vjp(q: Tensors, inputs: list) -> tuple:
            """``sum_i q_i^T d g_i / d inputs`` (``None`` where no path)."""
            if not linked:
                return (None,) * len(inputs)
            return torch.autograd.grad(
                [gi for gi, _ in linked],
                inputs,
                grad_outputs=[q[i] for _, i in linked],
                retain_graph=True,
                allow_unused=True,
            )

        residual = [hz - vi for hz, vi in zip(_zeros_for_none(vjp(z, y), y), v, strict=True)]
        squared = linalg.dot(residual, residual)
        if self._eta == "auto":
            curvature = linalg.dot(residual, _zeros_for_none(vjp(residual, y), y))
            tiny = torch.finfo(curvature.dtype).tiny
            eta = torch.where(
                curvature > 0, squared / curvature.clamp_min(tiny), torch.zeros_like(curvature)
            )
        else:
            eta = self._eta
        new = [(zi - eta * ri).detach() for zi, ri in zip(z, residual, strict=True)]
        cross = vjp(new, self.ul_params)
        self._pending = new
        self.diagnostics["multiplier_residual"] = squared.sqrt().detach()
        # (a number as a tensor of the residual's real dtype, on its device, as "auto" gives)
        taken = squared.new_tensor(eta) if isinstance(eta, float) else eta.detach()
        self.diagnostics["eta"] = taken
        result = [add(d, None if c is None else -c) for d, c in zip(direct, cross, strict=True)]
        return result, loss
