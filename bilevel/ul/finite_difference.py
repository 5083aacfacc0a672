"""DARTS' hypergradient: one unrolled LL step, its second derivative by finite differences."""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.ll import BDA, GradientDescent, Trajectory, evaluate_at
from bilevel.ll.patched import install
from bilevel.state import (
    Draws,
    Objective,
    buffer_copies,
    capture_draws,
    has_none,
    put_back,
    replay_draws,
)
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    add,
    detached_weights,
)
from bilevel.user_warnings import warn_user

Tensors = list[torch.Tensor]


class BeforeLastStep(list):
    """The trainable weights ``w_{T-1}`` from which the last LL step started (a list), with
    ``draws``: torch's generators before that step, whose random draws (dropout masks, noise
    in the objective) the finite differences replay, and ``buffers``: the patched model's
    buffers before that step (copies), from which both finite-difference points evaluate."""

    draws: Draws | None = None
    buffers: list[tuple[nn.Module, str, torch.Tensor]] | None = None


class WeightsBeforeLastStep:
    """An LL-step observer that keeps the (detached) trainable weights at the input of the
    latest step, and the generators' state before it: after the run, the weights ``w_{T-1}``
    from which the last step started and that step's draws. It reads values of the last step
    only, so the steps keep no graph for it and the earlier ones run in place
    (``needs_graph``, ``last_step_only``)."""

    detach_inputs = False
    needs_graph = False
    last_step_only = True

    def __init__(self) -> None:
        self.weights: BeforeLastStep | None = None
        self.draws: Draws | None = None
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] | None = None

    def before_step(self, weights: Tensors, model: nn.Module) -> None:
        """Capture the generators before the step's map draws, and the model's buffers
        before its forward moves them."""
        self.draws = capture_draws(weights[0].device)
        self.buffers = buffer_copies(model)

    def propagate(self, weights: Tensors, opt_state: dict, new: Tensors, new_state: dict) -> None:
        """Keep the step's input weights (the steps never modify them in place)."""
        self.weights = BeforeLastStep(map(torch.Tensor.detach, weights))
        self.weights.draws = self.draws
        self.weights.buffers = self.buffers

    def result(self) -> BeforeLastStep | None:
        """The trainable weights before the last step (and its draws)."""
        return self.weights


@functools.cache
def _norm_floor(dtype: torch.dtype, r: float) -> float:
    """The least norm of the finite-difference direction: ``r / floor`` stays finite."""
    return max(r, 1.0) * torch.finfo(dtype).tiny


def _dynamics_key(ll: Any) -> tuple[Any, ...]:
    """What :func:`_plain_gradient_descent` reads of ``ll``: the object (a weak reference,
    the same one while it lives: the method does not keep a dropped LL optimizer and its
    patched copy of the model alive), its class, rule and hyperparameters, and the count of
    its settings changed since construction (BDA's ``alpha``: :mod:`bilevel.settings`),
    compared by identity."""
    rule, hyper = getattr(ll, "rule", None), getattr(ll, "hyper", None)
    try:
        which = weakref.ref(ll)
    except TypeError:  # (an object that takes no weak reference is kept itself)
        which = ll
    return (which, type(ll), rule, hyper, getattr(ll, "_settings_changes", 0))


def _plain_gradient_descent(ll: Any) -> str | None:
    """Why ``ll``'s step is not ``w - lr * grad_w f(w, lambda)`` (``None`` when it is)."""
    # BDA with alpha = 0 takes exactly the gradient steps of GradientDescent
    plain_bda = isinstance(ll, BDA) and ll.alpha == 0.0
    own_map = type(ll).step_map is not GradientDescent.step_map
    if not isinstance(ll, GradientDescent) or (own_map and not plain_bda):
        return (
            f"the LL is {type(ll).__name__}, whose step is not a plain gradient step on "
            "ll_objective"
        )
    if ll.rule.name != "sgd":
        return f"the LL update rule is {ll.rule.name!r}"
    for name in ("momentum", "weight_decay"):
        values = ll.hyper[name].items if name in ll.hyper else []
        if not all(isinstance(v, float) and v == 0.0 for v in values):
            return f"the LL SGD has {name}"
    for value in ll.hyper["lr"].items:
        learned = value.requires_grad if isinstance(value, torch.Tensor) else callable(value)
        if learned:
            return (
                "the LL step size lr is a UL variable (a tensor that requires grad, or a "
                "callable of the UL model), and DARTS' formula has no term for its "
                "hypergradient"
            )
    return None


class FiniteDifference(HypergradientCalculator):
    """DARTS' second-order approximation: the hypergradient through ONE LL gradient step,
    with the mixed second derivative taken by central finite differences.

    With the last LL step ``w' = w - xi * grad_w f(w, lambda)`` (``f`` the LL objective,
    ``F`` the UL objective, ``xi`` the LL step size)::

        dF(w', lambda)/dlambda = grad_lambda F(w', lambda) - xi * grad2_{lambda,w} f(w, lambda) v
        v = grad_w' F(w', lambda)
        grad2_{lambda,w} f(w, lambda) v ~ (grad_lambda f(w+, lambda) - grad_lambda f(w-, lambda))
                                          / (2 eps),     w+- = w +- eps v,  eps = r / ||v||

    (Liu, Simonyan & Yang 2019, eq. 7-8; DARTS uses ``r = 0.01``). The perturbation has norm
    ``r`` in weight space and the error is ``O(r^2)``: with one LL step the result is the exact
    hypergradient of the unrolled step (``Reverse`` on a one-step LL) up to ``O(r^2)``. A
    per-parameter or per-element step size ``xi`` enters the direction, ``u = xi * v``
    (``w+- = w +- (r / ||u||) u``), the same formula with ``xi`` moved inside. When the UL
    variables include the LL's initial weights (MAML-style), the same two evaluations also
    give ``(I - xi H) v``: ``v - (grad_w f(w+) - grad_w f(w-)) / (2 eps)``.

    With ``T > 1`` LL steps it is an approximation: the one-step unrolled hypergradient of
    the LAST step, taken from the weights ``w = w_{T-1}`` before it, with the earlier steps'
    dependence on ``lambda`` ignored (``w_{T-1}`` treated as a constant; for initial weights,
    ``dw_{T-1}/dw_0`` taken as the identity, as first-order MAML does). At a converged LL this
    is ``Truncated`` with K = 1: the implicit formula with ``H^{-1}`` replaced by ``xi * I``,
    too small by about ``xi * lambda(H)`` along each eigendirection, and turned away from the
    exact hypergradient as ``H`` grows ill-conditioned (ridge, 100 LL steps: cosine 0.98-1.00
    at condition number 2, 0.75-0.90 at 50; ``benchmarks/fd_many_steps.py``). A
    ``RuntimeWarning`` says so once. DARTS uses it this way, alternating one LL step and one
    UL step.

    Cost: no LL graph (the LL runs with an observer that keeps ``w_{T-1}``; all steps but the
    last are taken in place); then one UL gradient and two LL gradients. No Hessian-vector
    product. The LL must be plain SGD (no momentum, no weight decay). An LL objective that
    draws at random (dropout, noise) is evaluated at ``w+`` and ``w-`` with the last LL step's
    draws (replayed; the global RNG is left as it was): the mixed derivative of that step,
    where two different draws would add noise growing as ``1 / r``.

    Reference: Liu, Simonyan & Yang (2019), "DARTS: Differentiable Architecture Search", ICLR.

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F``.
        ul_model: module with the UL variables ``lambda``.
        ll_objective: ``state -> scalar`` LL loss ``f``.
        ll_model: the LL module (weights ``w``).
        r: the finite-difference radius in weight space (> 0; DARTS: 0.01). The error is
            ``O(r^2)``; round-off grows as ``r`` shrinks (about ``machine epsilon / r``). It is
            in the weights' units (the scale of the objectives does not matter): where the
            mixed derivative changes over distances in weight space shorter than ``r`` (small
            weights, or a sharp LL such as a logistic one at a low learned temperature), the
            default is far off ``Reverse``; give ``r`` a fraction of that scale there. A
            radius that the rounding of the two points eats (below ``eps * ||w||``, ``w`` the
            weights it moves, ``eps`` their dtype's machine epsilon, and less than half of
            ``2 r`` left between the rounded points) raises ``ValueError`` naming a working
            one: the points would be the same floating-point numbers, and the finite
            difference 0.
    """

    name = "finite_difference"

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        r: float = 1e-2,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.r = r
        self._warned_steps = False

    @property
    def r(self) -> float:
        """The finite-difference radius; may be set between steps, checked as at
        construction."""
        return self._r

    @r.setter
    def r(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"r must be a number > 0 (the finite-difference radius), got {value!r}."
            )
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"r must be a finite number > 0 (DARTS uses 0.01), got {value!r}.")
        self._r = float(value)

    def differentiable_steps(self, iters: int) -> int:
        """None: the finite differences replace the LL graph."""
        return 0

    def settings(self) -> dict[str, Any]:
        """The finite-difference radius."""
        return {"r": self._r}

    def check_against(self, ll: Any) -> None:
        """Also: the LL step is plain SGD, the step this method differentiates."""
        super().check_against(ll)
        self._check_dynamics(ll)

    def observer(self, ll: Any) -> WeightsBeforeLastStep:
        """Keep the weights before the last LL step (the LL's dynamics checked once per LL
        object, its rule and hyperparameters, fixed at its construction, and again after a
        setting of it changed)."""
        checked = self.__dict__.get("_checked_ll")
        key = _dynamics_key(ll)
        if checked is None or not all(map(operator.is_, checked, key)):
            self._check_dynamics(ll)
            self._checked_ll = key
        return WeightsBeforeLastStep()

    @staticmethod
    def _check_dynamics(ll: Any) -> None:
        reason = _plain_gradient_descent(ll)
        if reason is not None:
            raise ValueError(
                f"FiniteDifference differentiates one plain gradient step w - lr * grad f, but "
                f"{reason}. Use GradientDescent(..., optimizer='sgd') without momentum (put "
                "a weight decay into ll_objective), or use Reverse/Truncated for other dynamics."
            )

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        trajectory = call.trajectory
        before = trajectory.observed
        weights, active = detached_weights(trajectory)
        if not isinstance(before, list) or len(before) != len(active):
            raise ValueError(
                "FiniteDifference needs an LL run that kept the weights before its last step: "
                "run the LL with ul.run_ll(ll, data, target) and pass its .model, or let "
                "BilevelProblem(ll, ul) drive it (ll.optimize does not record them)."
            )
        if trajectory.iters > 1:
            self._warn_if_many_steps(trajectory)
        # one step size for every tensor (a number, ``common``): the direction is v itself,
        # and xi joins the scalar factor; per-tensor or per-element step sizes enter it
        xi, common = self._step_sizes(trajectory, len(active))
        wanted, initial = self._layout(active)
        n = len(self.ul_params)
        with evaluate_at(call.auxiliary_model, weights):  # restores the weights on exit
            loss = self.ul_loss(call)
            w = weights if len(active) == len(weights) else [weights[i] for i in active]
            grads = torch.autograd.grad(loss, [*self.ul_params, *w], allow_unused=True)
            direct, v = grads[:n], list(grads[n:])
            if has_none(v):  # a weight the UL loss does not read: v = 0 there
                v = [torch.zeros_like(x) if g is None else g for x, g in zip(w, v, strict=True)]
            u = v if common is not None else [lr * g for lr, g in zip(xi, v, strict=True)]
            norm = torch.linalg.vector_norm(u[0]) if len(u) == 1 else linalg.norm(u)
            # u = 0 (the UL loss is flat in w): w+- = w, and the difference is exactly 0 (the
            # floor keeps eps finite, r / floor <= 1 / tiny, so that 0 * eps is not NaN)
            norm = norm.clamp_min(_norm_floor(norm.dtype, self._r))
            eps = self._r / norm
            # the perturbation eps * u (no graph: u and eps come from gradients taken without)
            delta = list(map(eps.mul, u))
            # the size of the weights moved, whose round-off the radius must be above
            size = torch.linalg.vector_norm(before[0]) if len(before) == 1 else linalg.norm(before)
            plus, minus = self._ll_gradients(call, weights, active, before, delta, wanted)
        # mixed = (plus - minus) * scale, the second derivative along u (times xi when the
        # direction is v); the UL parameters take direct - mixed. scale = xi / (2 eps), with
        # 1 / eps = ||u|| / r
        scale = norm * ((common if common is not None else 1.0) / (2 * self._r))
        # the perturbation's multiple of u = xi * v (the same point as eps * v with one xi)
        self.diagnostics["fd_epsilon"] = eps if common is None else eps / common
        result: list[torch.Tensor | None] = []
        for d, pl, mi in zip(direct, plus[:n], minus[:n], strict=True):
            if pl is None or mi is None:
                result.append(d)
            elif d is None:
                result.append((mi - pl) * scale)
            else:
                result.append(torch.addcmul(d, pl - mi, scale, value=-1))
        if initial:  # (I - xi H) v for the UL parameters that are initial weights
            curvatures = {
                k: None if pl is None or mi is None else (pl - mi) * scale
                for k, pl, mi in zip(wanted, plus[n:], minus[n:], strict=True)
            }
            for i, k in initial:
                curvature = curvatures[k]
                result[i] = add(result[i], v[k] if curvature is None else v[k] - curvature)
        # (read after all the work is queued: the UL loss check that follows waits for it too)
        floor = torch.finfo(size.dtype).eps * float(size)
        if self._r < floor < math.inf:  # only then can the points' rounding eat the radius
            self._refuse_rounded_radius(before, delta, float(size))
        return result, loss

    def _refuse_rounded_radius(self, before: Tensors, delta: Tensors, size: float) -> None:
        """Raise if less than half of the points' intended distance ``2 ||delta|| = 2 r``
        survives their rounding: ``w + delta`` and ``w - delta`` are then the same
        floating-point numbers, or nearly, and the finite difference round-off or exactly 0,
        leaving the direct term alone. Called where ``r < eps ||w||`` only: a radius below
        the round-off of the whole weights' norm may still survive on the weights it moves
        (a large intercept beside small weights), and is then let through. A ``delta``
        shorter than ``r`` (the UL loss flat in ``w``: the difference is 0 by right) too."""
        intended = 2.0 * float(linalg.norm(delta))
        realized = float(
            linalg.norm(
                [torch.add(b, d) - torch.sub(b, d) for b, d in zip(before, delta, strict=True)]
            )
        )
        if not (intended >= self._r and realized < 0.5 * intended):
            return
        dtype = before[0].dtype
        eps = torch.finfo(dtype).eps
        working = max(1e-2, eps ** (1 / 3) * size)
        raise ValueError(
            f"FiniteDifference's radius r={self._r:g} is below the round-off of the LL weights "
            f"it moves (machine epsilon {eps:.3g} times ||w|| = {size:.4g}: {eps * size:.3g}): "
            f"w + eps v and w - eps v are {realized:.3g} apart where they should be 2r = "
            f"{intended:.3g}, so the finite difference of the LL gradients is round-off or "
            "exactly 0, and the hypergradient would be its direct term alone. r is the norm of "
            "the perturbation in weight space (DARTS' eps = 0.01 / ||v|| is r = 0.01, the "
            f"default): use r={working:.3g}, a fraction of the weights' scale well above "
            "round-off."
        )

    def _layout(self, active: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """For the trainable weights at positions ``active`` of the LL model: the indices into
        ``active`` of those that a UL parameter initializes (``wanted``, whose LL gradient the
        finite differences also take), and ``(UL parameter, index into active)`` for each UL
        parameter that is an initial weight. Worked out once per set of trainable weights."""
        key = tuple(active)
        cached = self.__dict__.get("_cached_layout")
        if cached is not None and cached[0] == key:
            return cached[1]
        position = {j: k for k, j in enumerate(active)}
        initial = [
            (i, position[j])
            for i, j in enumerate(self.initial_weight_of)
            if j is not None and j in position
        ]
        starts = {j for j in self.initial_weight_of if j is not None}
        wanted = [position[j] for j in active if j in starts]
        self._cached_layout = (key, (wanted, initial))
        return wanted, initial

    def _ll_gradients(
        self,
        call: Call,
        weights: Tensors,
        active: list[int],
        before: BeforeLastStep,
        delta: Tensors,
        wanted: list[int],
    ) -> tuple[Sequence[torch.Tensor | None], Sequence[torch.Tensor | None]]:
        """``grad f`` with respect to the UL parameters and the trainable weights at positions
        ``wanted`` (those that UL parameters initialize), at ``w_{T-1} + delta`` and at
        ``w_{T-1} - delta`` (the other LL weights from ``weights``, as they are). Both points
        are evaluated with the last LL step's random draws (dropout, noise: the mixed
        derivative of that step; other draws would add O(1/eps) noise) and with the buffers
        that step saw (a forward that moves them, as spectral norm's power iteration or a
        call counter, would otherwise evaluate the two points with different models: an
        O(1/eps) error); the generators and buffers are put back afterwards. Installs the
        moved weights in the auxiliary model: call it where they are restored afterwards."""
        draws = getattr(before, "draws", None)
        step_buffers = getattr(before, "buffers", None) or []
        kept = buffer_copies(call.auxiliary_model) if step_buffers else []
        at = list(weights)
        both = []
        with contextlib.nullcontext() if draws is None else replay_draws(draws) as replay:
            for sign in (1.0, -1.0):
                if sign < 0 and replay is not None:
                    replay.rewind()
                if step_buffers:
                    put_back(step_buffers)
                # w_{T-1} and delta carry no graph: the moved weights are new leaves
                moved = [
                    torch.add(b, d, alpha=sign).requires_grad_()
                    for b, d in zip(before, delta, strict=True)
                ]
                if len(moved) == len(at):  # every LL weight is trainable
                    at = moved
                else:
                    for i, x in zip(active, moved, strict=True):
                        at[i] = x
                install(call.auxiliary_model, at)
                loss = self.ll_loss(call)
                inputs = (
                    [*self.ul_params, *(moved[k] for k in wanted)] if wanted else self.ul_params
                )
                both.append(torch.autograd.grad(loss, inputs, allow_unused=True))
            if kept:
                put_back(kept)
        return both[0], both[1]

    def _step_sizes(self, trajectory: Trajectory, count: int) -> tuple[list[Any], float | None]:
        """The LL step size of the last step, one per trainable tensor (numbers, or detached
        tensors), and their common value when they are all one number (else ``None``).
        Worked out once while the run hands over the same list (a constant schedule's)."""
        values = trajectory.step_sizes
        if values is None or len(values) != count:
            raise ValueError(
                "FiniteDifference needs the LL step size of the last step (the LL run did not "
                "record one per trainable parameter): use a bilevel.ll.GradientDescent LL."
            )
        cached = self.__dict__.get("_cached_step_sizes")
        if cached is not None and cached[0] is values:
            return cached[1]
        xi = [v.detach() if isinstance(v, torch.Tensor) else float(v) for v in values]
        common = xi[0] if all(isinstance(x, float) and x == xi[0] for x in xi) else None
        # (the list is kept with its values: a tensor among them is read when used)
        self._cached_step_sizes = (values, (xi, common))
        return xi, common

    def _warn_if_many_steps(self, trajectory: Trajectory) -> None:
        if trajectory.iters > 1 and not self._warned_steps:
            self._warned_steps = True
            warn_user(
                f"FiniteDifference differentiates only the last of the {trajectory.iters} LL "
                "steps (DARTS' one-step approximation; the earlier steps' dependence on the "
                "UL variables is ignored): it is not the hypergradient of the whole LL run "
                "nor the implicit one. Use iters=1 for DARTS' alternating scheme, or Reverse, "
                "Truncated or Implicit for the hypergradient of a longer LL run.",
                RuntimeWarning,
            )
