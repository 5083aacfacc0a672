"""Implicit-function-theorem hypergradients with a matrix-free linear solver."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.ll import Trajectory, evaluate_at
from bilevel.roundoff import batch_terms, roundoff_floor
from bilevel.second_derivatives import gradient_to_differentiate, refuse_once_differentiable
from bilevel.settings import Setting, check_count
from bilevel.state import Objective, all_finite, names_without_gradient
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    detached_weights,
    gradient_scale,
    refuse_rule_weight_decay,
)
from bilevel.user_warnings import warn_user


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def _check_ll_learning_rate(value: Any, name: str) -> float | None:
    """``None``, or a number > 0 (a tensor's value) as a float."""
    if isinstance(value, torch.Tensor):
        value = float(value.detach())
    if value is not None and not _positive(value):
        raise ValueError(f"{name} must be a number > 0 or None, got {value!r}.")
    return None if value is None else float(value)


def _check_tolerance(value: Any, name: str) -> float:
    """A number >= 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    return float(value)


def _check_damping(value: Any, name: str) -> float:
    """A finite number >= 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _check_stationarity_warning(value: Any, name: str) -> float | None:
    """``None`` or a number > 0."""
    if value is not None and not _positive(value):
        raise ValueError(f"{name} must be None or a number > 0, got {value!r}.")
    return value


def _check_policy(value: Any, name: str) -> str:
    """``"raise"`` or ``"warn"``."""
    if value not in ("raise", "warn"):
        raise ValueError(f"{name} must be 'raise' or 'warn', got {value!r}.")
    return value


def _check_alpha_used(alpha: Any, method: Any) -> None:
    """Refuse a given ``alpha`` with a ``method`` that does not read it (not a series)."""
    if alpha is not None and not (isinstance(method, str) and method in SERIES):
        solver = repr(method) if isinstance(method, str) else "a callable solver"
        raise ValueError(
            f"alpha={alpha!r} was given, but method={solver} does not use it: alpha is the "
            "step of the series, method='neumann' and method='fixed_point', and nothing else "
            "reads it (a callable solve(matvec, b) -> x takes its own settings). Leave alpha "
            "out, or pick a series method to take steps of alpha."
        )


class HypergradientDivergenceError(FloatingPointError):
    """The linear solve behind an implicit hypergradient diverged.

    Attributes:
        safe_alpha: for a series whose step ``alpha`` was above ``2 / lambda_max``, a step that
            converges, ``1 / lambda_max`` (``None`` where no smaller step is the cure).
    """

    def __init__(self, message: str, *, safe_alpha: float | None = None) -> None:
        super().__init__(message)
        self.safe_alpha = safe_alpha


METHODS = ("cg", "neumann", "fixed_point", "normal_cg", "minres")
SERIES = ("neumann", "fixed_point")
NOT_SYMMETRIC = (
    "method={method!r} needs a symmetric system, but the LL is a fixed-point map: "
    "(I - dPhi/dw)^T q = v is not symmetric. Use method='fixed_point' (it converges when Phi "
    "is a contraction) or method='normal_cg'."
)


class Implicit(HypergradientCalculator):
    """Implicit hypergradient at an (approximately) converged LL solution ``w``.

    With ``g = grad_w L_ll(w, lambda)``, ``H = dg/dw`` and ``v = grad_w L_ul``::

        dF/dlambda = grad_lambda L_ul - (dg/dlambda)^T q,    H q = v

    ``q`` comes from a matrix-free linear solver over Hessian-vector products, all taken from
    one graph of ``g``: conjugate gradient (``"cg"``, needs ``H`` positive definite), a
    truncated Neumann series (``"neumann"``), a fixed-point iteration (``"fixed_point"``),
    MINRES (``"minres"``, symmetric indefinite ``H``: an LL at a saddle point), CG on the
    normal equations (``"normal_cg"``, any nonsingular ``H``), or any callable
    ``solve(matvec, b) -> x`` on lists of tensors (e.g. a dense solve; its residual is checked
    with one extra product). The two series converge only when ``0 < alpha < 2 /
    lambda_max(H)``: ``alpha="auto"`` estimates ``lambda_max`` by power iteration and uses
    ``1 / lambda_max``; with any ``alpha``, a series that provably diverges raises
    :class:`HypergradientDivergenceError` (or warns, with ``on_divergence="warn"``) with the
    measured ``lambda_max`` and a safe ``alpha``.

    With a proximal LL objective ``L_i(w) + (reg/2)||w - theta||^2`` and ``theta`` the UL
    parameters this is iMAML: ``dF/dtheta = (I + H_i/reg)^{-1} grad L_test(w)``.

    ``damping=delta > 0`` solves ``(H + delta I) q = v`` instead (Tikhonov / Levenberg-Marquardt
    damping): a biased hypergradient, on purpose, that stays defined where ``H`` is indefinite
    or nearly singular (an LL stopped short of its minimum; iMAML under batch norm). As
    ``delta`` grows, ``q`` tends to ``v / delta``: the first-order direction, scaled. The
    iMAML authors' released Omniglot code solves ``(2 I + H/(reg + 10)) q = v``, which is
    the proximal objective's system with ``damping = reg + 20``, up to a factor that Adam
    ignores.

    The system is that of ``ll_objective`` alone: an LL update rule with a ``weight_decay``
    (an L2 term added to the gradient, or AdamW's decoupled decay) ends elsewhere and is
    refused (put the penalty in ``ll_objective``).

    References: Pedregosa (2016), "Hyperparameter optimization with approximate gradient"
    (HOAG); Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with Implicit
    Gradients" (iMAML); Lorraine, Vicol & Duvenaud (2020) (Neumann); Grazzi et al. (2020),
    "On the Iteration Complexity of Hypergradient Computation" (fixed point).

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss.
        ll_model: the LL module.
        ll_learning_rate: the LL step size, the default ``alpha`` of Neumann and fixed point;
            ``None`` (the default) reads it from the LL run. Given, it must agree with the LL
            optimizer's (:class:`bilevel.BilevelProblem` checks).
        k: solver iterations (CG, MINRES, normal CG), series terms after the first (Neumann)
            or updates (fixed point); >= 1.
        tolerance: relative residual ``||H q - v|| / ||v||`` at which CG, MINRES and
            normal_cg stop (>= 0); the series (``neumann``, ``fixed_point``) take all ``k``
            steps and report ``converged`` against it.
        method: one of ``"cg"``, ``"neumann"``, ``"fixed_point"``, ``"minres"``,
            ``"normal_cg"``, or a callable ``solve(matvec, b) -> x``.
        alpha: step of Neumann / fixed point: ``None`` (the LL step size), a float, or
            ``"auto"``. The other methods do not use it, and refuse it when given.
        power_iters: power iterations used to estimate ``lambda_max``.
        on_divergence: ``"raise"``, or ``"warn"`` (once per calculator; every solve's
            ``diagnostics["diverged"]`` says whether it diverged).
        stationarity_warning: warn (once) when the LL gradient at the auxiliary model is
            above this fraction of its norm at the first LL step, or (plain SGD) when the
            distance left to the stationary point, estimated from the last step's
            contraction, is above this fraction of the distance travelled: the implicit
            formula assumes a stationary LL, and an LL that oscillates (a step size near
            ``2 / lambda_max``) or stopped early gives a wrong hypergradient. A final
            gradient at round-off (below ``100 eps`` times the larger of ``||H w||`` and
            ``||H|| ||w||``, estimated, and ``sqrt(n / 100)`` times that over ``n > 100``
            examples) never warns. ``None``: never.
        damping: ``delta >= 0`` added to the system's diagonal, ``(H + delta I) q = v``; 0 (the
            default) is the exact implicit hypergradient.
    """

    name = "implicit"

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        ll_learning_rate: float | None = None,
        k: int = 10,
        tolerance: float = 1e-10,
        method: str | linalg.Solve = "cg",
        alpha: float | str | None = None,
        power_iters: int = 20,
        on_divergence: str = "raise",
        stationarity_warning: float | None = 0.1,
        damping: float = 0.0,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.damping = damping
        self.ll_learning_rate = ll_learning_rate
        self.tolerance = tolerance
        self.method = method
        self.alpha = alpha
        self.power_iters = power_iters
        self.on_divergence = on_divergence
        self.k = k
        self.stationarity_warning = stationarity_warning
        self._warned_graph = False
        self._warned_divergence = False
        self._warned_stationarity = False

    def _check_method(self, value: Any) -> str | linalg.Solve:
        """A solver's name or a callable; one that does not use a given ``alpha`` is refused."""
        if not (callable(value) or value in METHODS):
            raise ValueError(
                f"method must be one of {METHODS} or a callable solve(matvec, b) -> x, got "
                f"{value!r}."
            )
        _check_alpha_used(self.__dict__.get("_alpha"), value)
        return value

    def _check_alpha(self, value: Any) -> float | str | None:
        """``None``, ``"auto"`` or a number > 0, and only with a series ``method``."""
        if not (value is None or value == "auto" or _positive(value)):
            raise ValueError(f"alpha must be None, 'auto' or a number > 0, got {value!r}.")
        _check_alpha_used(value, self._method)
        return value

    # the settings: each may be set between steps, checked as at construction (and the
    # runner's next step checks the method against the LL optimizer again)
    ll_learning_rate = Setting(_check_ll_learning_rate)
    k = Setting(check_count)
    tolerance = Setting(_check_tolerance)
    method = Setting(_check_method, reads_object=True)
    alpha = Setting(_check_alpha, reads_object=True)
    power_iters = Setting(check_count)
    on_divergence = Setting(_check_policy)
    stationarity_warning = Setting(_check_stationarity_warning)
    damping = Setting(_check_damping)

    def differentiable_steps(self, iters: int) -> int:
        """None: the LL graph is not needed."""
        return 0

    @property
    def splits_ul_batch(self) -> bool:  # type: ignore[override]
        """The two series are linear in the right-hand side ``v``; CG, MINRES and normal CG
        are not (their Krylov space, and where they stop, depend on ``v``), nor is a user's
        solver known to be."""
        return isinstance(self._method, str) and self._method in SERIES

    def settings(self) -> dict[str, Any]:
        """Solver, iterations, tolerance, series step, and damping where there is one, and
        ``power_iters`` where ``alpha="auto"`` picks the step with other than the default 20
        (so that checkpoints written before these were recorded still resume)."""
        method = self._method if isinstance(self._method, str) else type(self._method).__name__
        settings = {
            "k": self._k,
            "method": method,
            "tolerance": self._tolerance,
            "alpha": self._alpha,
        }
        if self._damping:
            settings["damping"] = self._damping
        if self._alpha == "auto" and self._method in SERIES and self._power_iters != 20:
            settings["power_iters"] = self._power_iters
        return settings

    def check_against(self, ll: Any) -> None:
        """Also: a given ``ll_learning_rate`` that the solver uses (a series' default step)
        equals the LL optimizer's step size. (The seed signature made it required for every
        solver, so a value that CG never reads is not held against it.)"""
        super().check_against(ll)
        if not getattr(ll, "solves_ll_objective", True):
            raise ValueError(
                "Implicit needs an LL run that ends at a stationary point of ll_objective; "
                f"{type(ll).__name__} aggregates the UL gradient into its steps (alpha > 0), so "
                "the implicit function theorem does not apply. Use Reverse or Truncated, or "
                "alpha=0."
            )
        used = self._method in SERIES and self._alpha is None
        if not getattr(ll, "descends_objective", True):  # a fixed-point map, before any run
            self._check_fixed_point_map(used)
            return
        refuse_rule_weight_decay(getattr(ll, "rule", None), "Implicit")
        lr = ll.lr
        plain = getattr(ll, "optimizer", None) == "sgd"  # where the LL step is the series' step
        if not (used and plain) or self._ll_learning_rate is None or not _positive(lr):
            return
        if float(lr) != self._ll_learning_rate:
            raise ValueError(
                f"Implicit(ll_learning_rate={self._ll_learning_rate:g}) disagrees with the LL "
                f"optimizer's lr={float(lr):g}. Leave ll_learning_rate out (it is read from the "
                "LL run), or pass alpha=<number> to give the series another step on purpose."
            )

    def _check_fixed_point_map(self, used: bool) -> None:
        """Refuse, before any LL run, what does not apply to a fixed-point map's
        non-symmetric system ``(I - dPhi/dw)^T q = v``: CG and MINRES, ``alpha="auto"``, and
        an ``ll_learning_rate`` (the map has none; the series' default step is 1)."""
        if self._method in ("cg", "minres"):
            raise ValueError(NOT_SYMMETRIC.format(method=self._method))
        if self._method in SERIES and self._alpha == "auto":
            raise ValueError(
                "alpha='auto' takes 1 / lambda_max from power iteration, which bounds no step "
                "of the non-symmetric system (I - dPhi/dw)^T q = v of a fixed-point map. Leave "
                "alpha out (alpha=1 is the map's own adjoint iteration q <- (dPhi/dw)^T q + v, "
                "which converges where the map contracts), give it a number, or use "
                "method='normal_cg'."
            )
        if used and self._ll_learning_rate is not None and self._ll_learning_rate != 1.0:
            raise ValueError(
                f"Implicit(ll_learning_rate={self._ll_learning_rate:g}) was given, but a "
                "fixed-point map has no learning rate: the series' default step is 1 (the map's "
                "own adjoint iteration q <- (dPhi/dw)^T q + v). Leave ll_learning_rate out, or "
                "pass alpha=<number> to give the series another step."
            )

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        self._warn_if_graph(call.trajectory)
        weights, active = detached_weights(call.trajectory)
        w = [weights[i] for i in active]
        n = len(self.ul_params)
        with evaluate_at(call.auxiliary_model, weights):
            loss = self.ul_loss(call)
            grads = torch.autograd.grad(loss, [*self.ul_params, *w], allow_unused=True)
            if all(g is None for g in grads):
                raise ValueError(
                    "ul_objective depends neither on the LL weights nor on the UL parameters: "
                    "its hypergradient would be silently zero. Compute it from "
                    "state['ll_model'] and/or state['ul_model']."
                )
            direct = grads[:n]
            v = [
                torch.zeros_like(x) if gv is None else gv
                for x, gv in zip(w, grads[n:], strict=True)
            ]
            g = self._residual(call, w)
        self._refuse_unread(call, active, g)
        g = [torch.zeros_like(x) if gi is None else gi for x, gi in zip(w, g, strict=True)]
        linked = [(gi, i) for i, gi in enumerate(g) if gi.requires_grad]

        def vjp(q: list[torch.Tensor], inputs: list[torch.Tensor], graph: bool = False) -> tuple:
            if not linked:
                return (None,) * len(inputs)
            return torch.autograd.grad(
                [gi for gi, _ in linked],
                inputs,
                grad_outputs=[q[i] for _, i in linked],
                retain_graph=True,
                create_graph=graph,
                allow_unused=True,
            )

        def hvp(q: list[torch.Tensor]) -> list[torch.Tensor]:
            return [
                torch.zeros_like(x) if h is None else h for x, h in zip(w, vjp(q, w), strict=True)
            ]

        matvec = self._operator(hvp, w, call.trajectory, vjp, [gi for gi, _ in linked])
        q, info = self._solver(call.trajectory).run(matvec, v)
        self.diagnostics = {**info.as_dict(), "ll_grad_norm": linalg.norm(g).detach()}
        self._check_stationary(
            call.trajectory,
            lambda: roundoff_floor(
                self._gradient_scale(call, w, g, hvp), batch_terms(call.train_data)
            ),
        )
        if info.diverged:
            self._report_divergence(info, matvec, v, loss)
        indirect = vjp(q, self.ul_params)
        result = [
            d if ind is None else (-ind if d is None else d - ind)
            for d, ind in zip(direct, indirect, strict=True)
        ]
        return result, loss

    def _refuse_unread(self, call: Call, active: list[int], g: list[torch.Tensor | None]) -> None:
        """Refuse trainable LL weights that the stationarity residual at the auxiliary model
        does not read (conditional computation that skipped them in this evaluation): the
        system's rows and columns for them are zero, so it is singular and a solver's answer
        (CG's grows without bound) would be taken for the hypergradient."""
        names = names_without_gradient(self.ll_model, g, active)
        if names:
            raise ValueError(
                f"ll_objective at the LL solution does not depend on the trainable ll_model "
                f"parameter(s) {names} (they were read at the first LL step: conditional "
                "computation skipped them in this evaluation), so the LL Hessian is singular "
                "in them and the implicit hypergradient is undefined. Make ll_objective read "
                "every trainable parameter at every evaluation, freeze those it skips, or use "
                "Reverse/Truncated."
            )

    def _residual(self, call: Call, w: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The LL stationarity residual ``g`` at the auxiliary model's weights, with its
        graph: the gradient of ``ll_objective`` for gradient dynamics, ``w - Phi(w)`` for a
        fixed-point map (the run's step map says which)."""
        step_map = call.trajectory.step_map
        if step_map is None or step_map.symmetric:
            refuse_rule_weight_decay(getattr(step_map, "rule", None), "Implicit")
            method = self._method if isinstance(self._method, str) else "<a solver>"
            who = f"Implicit(method={method!r})"
            return gradient_to_differentiate(self.ll_loss(call), w, call.auxiliary_model, who)
        state = self.states(call.auxiliary_model, call.train_data, call.train_target)
        return step_map.residual(w, state)

    def _operator(
        self,
        hvp: linalg.MatVec,
        w: list[torch.Tensor],
        trajectory: Trajectory,
        vjp: Any,
        residual: list[torch.Tensor],
    ) -> linalg.Operator:
        """``q -> (dg/dw)^T q`` (plus ``damping * q``); for a non-symmetric ``dg/dw`` (a
        fixed-point map) also its transpose, by a double vector-Jacobian product, for
        ``normal_cg`` (refused, when a solver first asks for it, where the ``residual`` ``g``
        passes through a once-differentiable Function: its backward would be
        differentiated)."""
        step_map = trajectory.step_map
        if self._damping:
            hvp = self._damped(hvp)
        if step_map is None or step_map.symmetric:
            return linalg.Operator(hvp, symmetric=True)
        if self._method in ("cg", "minres"):
            raise ValueError(NOT_SYMMETRIC.format(method=self._method))
        dummy = [torch.zeros_like(x, requires_grad=True) for x in w]
        with torch.enable_grad():
            products = vjp(dummy, w, graph=True)  # (dg/dw)^T d, linear in the dummy d
        linear = [torch.zeros_like(x) if h is None else h for x, h in zip(w, products, strict=True)]
        checked = []

        def jvp(u: list[torch.Tensor]) -> list[torch.Tensor]:
            if not checked:  # solvers that never take the transpose (fixed point) are exact
                checked.append(True)
                method = self._method if isinstance(self._method, str) else "<a solver>"
                refuse_once_differentiable(
                    residual,
                    w,
                    f"Implicit(method={method!r}), whose transposed products are derivatives "
                    "of vector-Jacobian products,",
                    "fixed_point_map",
                    "method='fixed_point' or 'neumann' (first derivatives of the map only), or "
                    "Reverse",
                )
            live = [(h, ui) for h, ui in zip(linear, u, strict=True) if h.requires_grad]
            if not live:
                return [torch.zeros_like(x) for x in w]
            out = torch.autograd.grad(
                [h for h, _ in live],
                dummy,
                grad_outputs=[ui for _, ui in live],
                retain_graph=True,
                allow_unused=True,
            )
            return [torch.zeros_like(x) if o is None else o for x, o in zip(w, out, strict=True)]

        return linalg.Operator(hvp, rmatvec=self._damped(jvp) if self._damping else jvp)

    def _damped(self, product: linalg.MatVec) -> linalg.MatVec:
        """``q -> product(q) + damping * q``."""
        delta = self._damping

        def damped(q: list[torch.Tensor]) -> list[torch.Tensor]:
            return [h + delta * x for h, x in zip(product(q), q, strict=True)]

        return damped

    def _warn_if_graph(self, trajectory: Trajectory) -> None:
        if trajectory.differentiable_steps and not self._warned_graph:
            self._warned_graph = True
            warn_user(
                "Implicit does not use the LL graph the auxiliary model recorded; set "
                "ll.differentiable_steps = 0 (BilevelProblem does) so that LL memory does not "
                "grow with the number of steps.",
            )

    def _gradient_scale(
        self,
        call: Call,
        w: list[torch.Tensor],
        g: list[torch.Tensor],
        hvp: linalg.MatVec,
    ) -> torch.Tensor:
        """The size of the terms that cancel in the LL stationarity residual ``g`` at ``w``
        (a 0-d tensor), which sets its round-off: ``bilevel.ul.base.gradient_scale`` for
        a gradient (``||H w||``, or ``||H|| ||w||`` where it is larger), ``||w||`` for a
        fixed-point residual ``w - Phi(w)``."""
        step_map = call.trajectory.step_map
        if step_map is not None and not step_map.symmetric:
            return linalg.norm([x.detach() for x in w])
        return gradient_scale(hvp, w, g)

    def _check_stationary(self, trajectory: Trajectory, floor: Callable[[], torch.Tensor]) -> None:
        """Warn (once) when the LL run did not end near a stationary point: its gradient is
        still above ``stationarity_warning`` of the first step's, or (plain SGD) the
        distance left to travel, estimated from the rate at which the last step shrank the
        gradient, is above that fraction of the distance travelled. The second catches a
        first gradient inflated by a transient sharp direction (iMAML under batch norm:
        1.4% of it left, yet the weights as far from the solution as from the start).

        A final gradient at round-off is stationary, whatever the ratios say (an LL started
        at its solution has a first gradient at round-off too, and their ratio is noise): no
        warning where it is below ``floor()``, ``bilevel.roundoff.roundoff_floor`` of the size
        of the terms that cancel in it (:meth:`_gradient_scale`, taken only on the way to a
        warning) and of the number of examples it sums (at 1e6 examples its round-off reached
        100 to 300 eps times that size, and the warning came and went with torch's thread
        count)."""
        start = trajectory.initial_grad_norm
        if start is None:
            return
        norms = [start, self.diagnostics["ll_grad_norm"], *self._distance_norms(trajectory)]
        first, final, *distance = torch.stack([n.double() for n in norms]).tolist()  # one sync
        # (no absolute floor under first: at an LL objective of scale 1e-32 the gradients are
        # below 1e-30, and a floor there made every ratio small; first = 0 only at an LL
        # started at an exact stationary point, where any later gradient is growth)
        ratio = final / first if first > 0 else (math.inf if final > 0 else 0.0)
        self.diagnostics["ll_grad_ratio"] = ratio
        left = self._distance_left(trajectory.step_size, final, distance)
        if left is not None:
            self.diagnostics["ll_distance_ratio"] = left
        limit = self._stationarity_warning
        if limit is None or self._warned_stationarity:
            return
        if ratio <= limit and (left is None or left <= limit):
            return
        if final <= float(floor()):  # its products: on this path only
            return
        self._warned_stationarity = True  # once per calculator (the setting stays the user's)
        step_map = trajectory.step_map
        if step_map is not None and not step_map.symmetric:  # a fixed-point map: no lr, no H
            warn_user(
                f"The fixed-point residual ||w - Phi(w)|| at the auxiliary model is {ratio:.0%} "
                "of its value at the first iteration: the LL is not stationary (not at its "
                "fixed point), and the implicit hypergradient assumes it is. Run more "
                "iterations (iters; the map must contract where it runs), or use Reverse.",
                RuntimeWarning,
            )
            return
        if ratio > limit:
            found = (
                f"The LL gradient at the auxiliary model is {ratio:.0%} of its norm at the "
                "first LL step"
            )
        else:
            found = (
                f"The LL gradient fell to {ratio:.2e} times its first value, but the last LL "
                f"step shrank it only by a factor {self.diagnostics['ll_contraction']:.3g}: at "
                f"that rate the weights are still about {left:.0%} of the distance they travelled "
                "away from the stationary point"
            )
        warn_user(
            f"{found}: the LL is not stationary, and the implicit hypergradient assumes it is. "
            "Run more LL steps, lower the LL learning rate if the LL oscillates (it must stay "
            "below 2 / lambda_max), or use Reverse.",
            RuntimeWarning,
        )

    def _distance_norms(self, trajectory: Trajectory) -> list[torch.Tensor]:
        """For plain SGD runs of two steps or more, ``[||g_{T-1}||, ||w_T - w_0||, floor]``
        (0-d tensors): the LL gradient at the start of the last step, the distance travelled
        and the round-off of the weights (``roundoff_floor(||w_T||)``); ``[]`` where the
        distance estimate does not apply."""
        previous = trajectory.last_grad_norm
        if not trajectory.plain_sgd or trajectory.iters < 2 or previous is None:
            return []
        start = [p for p in self.ll_model.parameters() if p.requires_grad]
        end = [w for w, t in zip(trajectory.weights, trajectory.trainable, strict=True) if t]
        if len(start) != len(end):
            return []
        moved = [b.detach() - a.detach() for a, b in zip(start, end, strict=True)]
        size = linalg.norm([w.detach() for w in end])
        return [previous, linalg.norm(moved), roundoff_floor(size)]

    def _distance_left(self, lr: float | None, final: float, distance: list[float]) -> float | None:
        """The distance still to travel to the stationary point, ``lr ||g_T|| / (1 - rho)``
        with ``rho = ||g_T|| / ||g_{T-1}||`` (linear convergence), over the distance travelled
        (``distance``: :meth:`_distance_norms`' values); ``inf`` for a gradient that did not
        shrink. ``None`` where it does not apply, and where the last step, ``lr ||g_T||``, is
        within the weights' round-off (``ROUNDOFF * eps * ||w_T||``): rounding then stalls
        the run (the step no longer moves the weights, ``rho`` is 1), and ``rho`` measures
        that, not the convergence. (A small gradient ratio is no reason to skip it: on an
        ill-conditioned LL the stiff directions settle at once, and the ratio fell to 5.6e-7
        with 94% of the distance still to go.)"""
        if not distance or lr is None:
            return None
        previous, travelled, floor = distance
        if lr * final <= floor:
            return None
        rho = final / max(previous, 1e-300)
        self.diagnostics["ll_contraction"] = rho
        if rho >= 1:
            return math.inf
        return lr * final / (1 - rho) / max(travelled, 1e-300)

    def _solver(self, trajectory: Trajectory) -> linalg.Solver:
        """The linear solver of this call (the series' step may come from the LL run)."""
        if callable(self._method):
            return linalg.as_solver(self._method, self._tolerance)
        if self._method not in SERIES:
            return linalg.make_solver(self._method, self._k, self._tolerance)
        if self._alpha == "auto":
            return linalg.auto_alpha(
                lambda a: linalg.make_solver(self._method, self._k, self._tolerance, alpha=a),
                self._power_iters,
            )
        alpha = self._alpha if self._alpha is not None else self._ll_step_size(trajectory)
        return linalg.make_solver(self._method, self._k, self._tolerance, alpha=alpha)

    def _ll_step_size(self, trajectory: Trajectory) -> float:
        step = self._ll_learning_rate
        if step is None:
            step = trajectory.step_size
        if step is None:
            raise ValueError(
                f"method={self._method!r} needs a step alpha < 2 / lambda_max(H), and the LL step "
                "size is not one number (per-parameter or per-step step sizes): pass "
                "alpha=<number> or alpha='auto'."
            )
        return step

    def _smallest_eigenvalue(
        self, matvec: linalg.MatVec, like: list[torch.Tensor], lambda_max: float
    ) -> float | None:
        """An upper estimate of the symmetric system's smallest eigenvalue when it is below
        zero (no series step converges), else ``None``; on the divergence path only.

        Power iteration on ``lambda_max I - A`` gives a Rayleigh quotient at most
        ``lambda_max - lambda_min(A)``, so the estimate is never below ``lambda_min(A)``: a
        negative one proves an indefinite ``A`` (a ``lambda_max`` at or below zero does
        too)."""
        if not lambda_max > 0:
            return lambda_max if math.isfinite(lambda_max) else None

        def shifted(q: list[torch.Tensor]) -> list[torch.Tensor]:
            return [lambda_max * x - h for x, h in zip(q, matvec(q), strict=True)]

        lambda_min = lambda_max - float(linalg.power_iteration(shifted, like, self._power_iters))
        return lambda_min if lambda_min < -1e-6 * lambda_max else None

    def _report_divergence(
        self,
        info: linalg.SolverInfo,
        matvec: linalg.MatVec,
        v: list[torch.Tensor],
        loss: torch.Tensor,
    ) -> None:
        if not all_finite([loss.detach(), *v]):
            raise FloatingPointError(
                "the UL loss or its gradient with respect to the LL weights is not finite "
                f"(UL loss {float(loss.detach()):.4g}): check the validation data and the UL "
                "objective for NaN, log(0) or division by zero."
            )
        name = self._method if isinstance(self._method, str) else "the given solver"
        safe_alpha = None  # a step that converges, where a smaller one is the cure
        if self._method == "cg":
            message = (
                "CG met a direction of non-positive curvature (or a non-finite residual): the LL "
                "Hessian is not positive definite at the auxiliary model's weights, so the LL "
                "has not converged to a minimum. Run more LL steps, add L2 regularization to "
                "the LL objective, use method='minres' (symmetric indefinite) or "
                "method='normal_cg', or use Reverse/Truncated."
            )
        elif self._method in SERIES and not getattr(matvec, "symmetric", True):
            # a fixed-point map: the system is not symmetric, and lambda_max bounds no step
            system = "(I - dPhi/dw)^T" + (f" + {self._damping:g} I" if self._damping else "")
            message = (
                f"The {name} series diverged on the fixed-point map's adjoint system "
                f"{system} q = v: its residual went from {info.rhs_norm:.3g} to "
                f"{info.residual_norm:.3g} in {info.iterations} steps (alpha {info.alpha:.3g}). "
                "With alpha = 1 it is the iteration q <- (dPhi/dw)^T q + v, which converges "
                "where the map contracts at the LL's result; this map does not there (or, "
                "non-normal, its residual grows for some steps before it shrinks: then more "
                "steps k help). Use method='normal_cg' (any nonsingular I - dPhi/dw), or make "
                "the map a contraction (e.g. scale a recurrent weight below norm 1)."
            )
        elif self._method in SERIES:
            lambda_max = float(linalg.power_iteration(matvec, v, self._power_iters))
            self.diagnostics["lambda_max"] = lambda_max
            lambda_min = self._smallest_eigenvalue(matvec, v, lambda_max)
            alpha = info.alpha
            system = f"H + {self._damping:g} I" if self._damping else "H"
            matrix = "the damped system's" if self._damping else "the LL Hessian's"
            diverged = (
                f"The {name} series diverged: its residual went from {info.rhs_norm:.3g} "
                f"to {info.residual_norm:.3g} in {info.iterations} steps."
            )
            indefinite = (
                "the LL is not at a minimum. Use method='minres' (symmetric indefinite) or "
                "method='normal_cg', run more LL steps or add L2 regularization to the LL "
                "objective, or use Reverse/Truncated."
            )
            if lambda_min is not None:  # no step converges: a smaller alpha is no cure
                message = (
                    f"{diverged} {system} is not positive definite at the auxiliary model's "
                    f"weights ({matrix} eigenvalues reach about {lambda_min:.4g}, and "
                    f"{lambda_max:.4g} at the top), so the series diverges for every alpha: "
                    f"{indefinite}"
                )
            elif alpha * lambda_max <= 1.25:
                # about 1/lambda_max (alpha='auto'): half the stable bound, which the power
                # iteration's estimate (from below) would have to miss by 60%
                message = (
                    f"{diverged} Its alpha {alpha:.3g} is about 1/lambda_max({system}), half "
                    f"the bound 2/lambda_max ({matrix} largest eigenvalue is about "
                    f"{lambda_max:.4g}), so a smaller alpha is no cure: {system} has an "
                    "eigenvalue at or below zero at the auxiliary model's weights, too close "
                    f"to a small positive one for the estimate to resolve: {indefinite}"
                )
            else:
                safe_alpha = 1.0 / lambda_max
                message = (
                    f"{diverged} It converges only for alpha < 2/lambda_max({system}); alpha "
                    f"is {alpha:.3g} and {matrix} largest eigenvalue is about "
                    f"{lambda_max:.4g}, so use alpha={safe_alpha:.3g} (alpha='auto' does "
                    "this) or method='cg'."
                )
        else:
            message = (
                f"{name} returned a non-finite solution or residual, or one above that of q = 0 "
                f"(residual {info.residual_norm:.3g}, ||v|| = {info.rhs_norm:.3g}): the LL "
                "Hessian may be singular at the auxiliary model's weights. Run more LL steps, "
                "add L2 regularization to the LL objective, or pass damping > 0."
            )
        if self._on_divergence == "raise":
            raise HypergradientDivergenceError(message, safe_alpha=safe_alpha)
        if not self._warned_divergence:  # once: diagnostics["diverged"] tells every time
            self._warned_divergence = True
            warn_user(message, RuntimeWarning)
