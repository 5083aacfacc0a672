"""Bi-level Descent Aggregation (BDA): LL steps that aggregate the UL and LL gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilevel.ll.gradient_descent import GradientDescent
from bilevel.ll.rules import UpdateRule
from bilevel.ll.unroll import THROUGH_STEPS, GradientStep, Observer, Tensors, Unroll
from bilevel.second_derivatives import refuse_once_differentiable
from bilevel.settings import Fixed, Setting
from bilevel.state import (
    Objective,
    buffer_copies,
    check_data_matches,
    check_objective_result,
    make_state,
    modes_kept,
    parameter_names,
    put_back,
)

NEEDS_UL_BATCH = (
    "BDA's LL steps descend on the UL objective too, so every LL run needs the UL batch: "
    "use BilevelProblem(ll, ul).step(train, val) / .hypergradient(train, val), "
    "ul.run_ll(ll, x, y, ul_batch=(vx, vy)), or ll.run(x, y, ul_batch=(vx, vy)) "
    "(ll.optimize(x, y) has no UL batch to give)."
)


def _number(value: Any, name: str) -> float:
    """A real Python number (not a bool, not NaN) as a float, or a ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN.")
    return value


def _check_alpha(value: Any, name: str) -> float:
    """A number in [0, 1]."""
    value = _number(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}.")
    return value


def _check_alpha_decay(value: Any, name: str) -> float:
    """A number in (0, 1]."""
    value = _number(value, name)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r} (1 keeps alpha constant).")
    return value


def _check_ul_scale(value: Any, name: str) -> float:
    """A finite number > 0."""
    value = _number(value, name)
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return value


def _check_objective(value: Any, name: str) -> Objective:
    """A callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable: state -> scalar tensor.")
    return value


class BDAStep(GradientStep):
    """The step map of BDA: the update rule applied to the aggregated direction
    ``(1 - alpha_k) grad_y f(x, y) + alpha_k * ul_scale * grad_y F(x, y)``,
    ``alpha_k = alpha * alpha_decay**k``.

    ``F`` (``ul_objective``) is evaluated on the UL batch through the same patched model as
    ``f`` (``ll_objective``), and both gradients come from one backward pass of
    ``(1 - alpha_k) f + alpha_k ul_scale F`` (with its graph when the step keeps one, so that
    ``Reverse``/``Truncated`` differentiate through the UL term as well). The loss the step
    reports is ``f``: the run's ``losses`` stay the LL objective's values.

    Args:
        objective: the LL objective ``f``.
        ul_objective: the UL objective ``F``.
        ul_state: the state ``F`` sees (the UL batch, the UL model, the patched LL model).
        alpha: ``alpha_0``, in [0, 1].
        alpha_decay: the factor of ``alpha_k`` per step, in (0, 1].
        ul_scale: ``s_u / s_l`` (> 0).
        rule: the update rule.
        on_first_grads: called with the aggregated gradients of the first step (``None``
            where neither objective reaches a parameter).
    """

    def __init__(
        self,
        objective: Objective,
        ul_objective: Objective,
        ul_state: dict[str, Any],
        alpha: float,
        alpha_decay: float,
        ul_scale: float,
        rule: UpdateRule,
        on_first_grads: Callable[[tuple], None],
    ) -> None:
        super().__init__(objective, rule, on_first_grads)
        self.ul_objective = ul_objective
        self.ul_state = ul_state
        self.alpha = alpha
        self.alpha_decay = alpha_decay
        self.ul_scale = ul_scale
        #: whether a direction with a graph was checked for once-differentiable Functions
        self.checked_graph = False
        #: whether the patched LL model has buffers that a forward may move in place
        self.buffered = next(ul_state["ll_model"].buffers(), None) is not None

    def alpha_at(self, step: int) -> float:
        """``alpha_k = alpha * alpha_decay**k`` (a Python float)."""
        return self.alpha * self.alpha_decay**step

    def direction(
        self, weights: Tensors, state: dict, step: int, create_graph: bool
    ) -> tuple[torch.Tensor, Tensors]:
        """The LL loss ``f`` and the aggregated direction at ``weights``."""
        loss = check_objective_result(self.objective(state), "ll_objective")
        alpha = self.alpha_at(step)
        ul_weight = alpha * self.ul_scale
        total = loss if alpha == 0.0 else (1.0 - alpha) * loss  # alpha = 0: exactly GD
        if ul_weight != 0.0:
            with modes_kept(self.ul_state["ll_model"]):  # its .eval() stays in it
                ul_loss = self.ul_objective(self.ul_state)
            ul_loss = check_objective_result(ul_loss, "ul_objective")
            total = total + ul_weight * ul_loss
            if create_graph and self.buffered:
                # F's graph may have saved buffers (batch-norm running statistics, read in
                # eval mode) that the next step's f moves in place (in train mode) without a
                # version bump: it keeps its own (Reverse was 4e-2 off at momentum 0.5)
                put_back(buffer_copies(self.ul_state["ll_model"]))
        if create_graph and not self.checked_graph:  # the UL method differentiates it
            self.checked_graph = True  # once per run (a BDAStep is made per run)
            what = "ll_objective" if ul_weight == 0.0 else "ll_objective and ul_objective"
            refuse_once_differentiable(total, weights, THROUGH_STEPS, what)
        grads = torch.autograd.grad(total, weights, create_graph=create_graph, allow_unused=True)
        if step == 0:
            self.on_first_grads(grads)
        # a weight that only F moves has no gradient once alpha_k underflows to zero
        direction = [
            torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads, strict=True)
        ]
        return loss, direction

    def residual(self, weights: Tensors, state: dict) -> list[torch.Tensor | None]:
        """Refused when ``alpha > 0``: the run does not stop at a zero of ``grad_y f``."""
        if self.alpha != 0.0:
            raise ValueError(IMPLICIT_REFUSED)
        return super().residual(weights, state)


IMPLICIT_REFUSED = (
    "the implicit function theorem does not apply to a BDA lower level with alpha > 0: its "
    "steps aggregate the UL gradient, so the LL run does not end at a stationary point of "
    "ll_objective (and in the non-singleton case BDA is made for, the LL Hessian is "
    "singular). "
    "Use Reverse or Truncated (they differentiate through the aggregated steps), or "
    "GradientDescent / BDA(alpha=0) with Implicit."
)


class BDA(GradientDescent):
    """Bi-level Descent Aggregation: LL steps on the aggregated UL and LL gradients.

    BDA solves the optimistic bilevel problem ``min_x min_{y in S(x)} F(x, y)``, ``S(x) =
    argmin_y f(x, y)``, also when ``S(x)`` is not a singleton, by letting the UL objective
    choose among the LL solutions while the LL is optimized. Each LL step is::

        y_{k+1} = y_k - (alpha_k s_u grad_y F(x, y_k) + (1 - alpha_k) s_l grad_y f(x, y_k))
        alpha_k = alpha * alpha_decay**k

    which is the paper's aggregation with ``s_l = lr`` and ``s_u = ul_scale * lr``: the
    update rule (``optimizer``) receives the direction ``(1 - alpha_k) grad_y f + alpha_k
    ul_scale grad_y F`` in place of ``grad_y f``. With plain SGD that is exactly the paper's
    step; other rules (momentum, Adam) apply their transform to the aggregated direction.
    ``F`` is ``ul_objective`` on the UL batch that the runner hands to the LL run
    (``ul_batch``), evaluated at every LL step; ``f`` is ``ll_objective`` on the LL batch.
    ``alpha = 0`` is plain :class:`GradientDescent`, step for step and bit for bit.

    The hypergradient is taken through these dynamics with ``Reverse`` or ``Truncated``
    (their graph includes the UL term's second derivatives), or ``Forward``. ``Implicit``
    does not apply (the run does not end at a stationary point of ``f``):
    :attr:`solves_ll_objective` is ``False`` when ``alpha > 0``, for methods to refuse it.

    An LL parameter that only ``F`` depends on is optimized by the UL term alone (the
    paper's counter-example has one); a parameter that neither objective depends on is
    refused at the first step. Each LL step costs one evaluation of ``f`` and ``F`` and one
    backward pass through both; with ``Reverse`` the graph holds both per step.

    The paper's analysis takes ``alpha_k`` in (0, 1) decreasing to 0 with ``s_l`` below
    ``1 / L_f``; BOAT's configurations use ``alpha = 0.5, alpha_decay = 0.9``.

    Reference: Liu, Mu, Yuan, Zeng & Zhang (2020), "A Generic First-Order Algorithmic
    Framework for Bi-Level Programming Beyond Lower-Level Singleton", ICML.

    Args:
        ll_objective: ``state -> scalar`` LL loss ``f``.
        ll_model: the module whose weights the LL optimizes (``y``).
        ul_model: the module holding the UL variables (``x``).
        lr: the LL step size ``s_l`` (> 0), in any form :class:`GradientDescent` accepts.
        iters: number of LL steps (>= 1).
        ul_objective: ``state -> scalar`` UL loss ``F``, evaluated with the UL batch.
        alpha: the aggregation weight of the first step, ``alpha_0``, in [0, 1].
        alpha_decay: the factor of ``alpha_k`` per step, in (0, 1] (1: constant).
        ul_scale: ``s_u / s_l`` (> 0): the UL term's step relative to the LL term's.
        optimizer: the update rule, as in :class:`GradientDescent`.
        momentum: as in :class:`GradientDescent`.
        betas: as in :class:`GradientDescent`.
        eps: as in :class:`GradientDescent`.
        differentiable_steps: as in :class:`GradientDescent`.
        growth_tolerance: as in :class:`GradientDescent`.
        on_growth: what a run whose ``f`` grows does (``"raise"``, ``"warn"`` or
            ``"ignore"``, as in :class:`GradientDescent`). ``"ignore"`` by default: the UL term
            may raise ``f`` on purpose (it picks among the LL solutions); a run that blows up
            to NaN or inf is refused whatever this says.
    """

    def __init__(
        self,
        ll_objective: Objective,
        ll_model: nn.Module,
        ul_model: nn.Module,
        lr: Any,
        iters: int,
        *,
        ul_objective: Objective,
        alpha: float,
        alpha_decay: float,
        ul_scale: float = 1.0,
        optimizer: str | UpdateRule = "sgd",
        momentum: Any = None,
        betas: Any = None,
        eps: Any = None,
        differentiable_steps: int | None = None,
        on_growth: str = "ignore",
        growth_tolerance: float = 1e-3,
    ) -> None:
        self.ul_objective = ul_objective
        self.alpha = alpha
        self.alpha_decay = alpha_decay
        self.ul_scale = ul_scale
        super().__init__(
            ll_objective,
            ll_model,
            ul_model,
            lr,
            iters,
            optimizer=optimizer,
            momentum=momentum,
            betas=betas,
            eps=eps,
            differentiable_steps=differentiable_steps,
            on_growth=on_growth,
            growth_tolerance=growth_tolerance,
        )

    ul_objective = Fixed(
        "BilevelProblem checked that the UL method differentiates the same function",
        _check_objective,
        cure="To change it, build BDA, the UL method and the BilevelProblem again with the "
        "new ul_objective.",
    )
    # may be set between runs, checked as at construction (each run's step map reads them)
    alpha = Setting(_check_alpha)
    alpha_decay = Setting(_check_alpha_decay)
    ul_scale = Setting(_check_ul_scale)

    @property
    def reads_ul_batch(self) -> bool:
        """Whether the LL steps depend on the UL batch (``alpha > 0``): then a UL batch cannot
        be split by examples across processes (each share would steer its own LL run)."""
        return self._alpha != 0.0

    @property
    def solves_ll_objective(self) -> bool:
        """Whether a run ends (as ``iters`` grows) at a stationary point of ``ll_objective``
        alone, as implicit differentiation assumes: only with ``alpha = 0``."""
        return self._alpha == 0.0

    def settings(self) -> dict[str, Any]:
        """:meth:`GradientDescent.settings` and the aggregation's ``alpha``, ``alpha_decay``
        and ``ul_scale`` (as ``bda_alpha``, ... : RMSprop has an ``alpha`` too) where they
        differ from plain gradient descent's (``alpha = 0``) or the defaults
        (``alpha_decay = 1``, ``ul_scale = 1``). Reference: Liu et al. (2020), ICML."""
        settings = super().settings()
        for name, default in (("alpha", 0.0), ("alpha_decay", 1.0), ("ul_scale", 1.0)):
            value = getattr(self, name)
            if value != default:
                settings[f"bda_{name}"] = value
        return settings

    def alphas(self) -> list[float]:
        """``alpha_k`` of each LL step of a run."""
        return [self._alpha * self._alpha_decay**k for k in range(self.iters)]

    def start(
        self,
        data: Any,
        target: Any,
        graph_from_start: bool = False,
        observer: Observer | None = None,
        ul_batch: tuple[Any, Any] | None = None,
        copy: bool = True,
    ) -> Unroll:
        """Begin an LL run on ``(data, target)`` with the UL batch ``ul_batch`` (``copy``: as
        :meth:`GradientDescent.start`)."""
        if ul_batch is None:
            raise ValueError(NEEDS_UL_BATCH)
        if not isinstance(ul_batch, tuple | list) or len(ul_batch) != 2:
            raise TypeError(
                f"ul_batch must be a pair (data, target), got {type(ul_batch).__name__}."
            )
        reference = self.plan().reference
        check_data_matches(ul_batch[0], reference, "ul_batch data")
        check_data_matches(ul_batch[1], reference, "ul_batch target")
        return super().start(data, target, graph_from_start, observer, ul_batch, copy)

    def step_map(self, model: nn.Module, ul_batch: tuple[Any, Any] | None) -> BDAStep:
        """The aggregated step map on the patched ``model``, ``F`` on ``ul_batch``."""
        if ul_batch is None:
            raise ValueError(NEEDS_UL_BATCH)
        index = self.plan().index
        ul_state = make_state(ul_batch[0], ul_batch[1], self.ul_model, model)
        return BDAStep(
            self.ll_objective,
            self.ul_objective,
            ul_state,
            self._alpha,
            self._alpha_decay,
            self._ul_scale,
            self.rule,
            lambda g: self._check_reached(g, index),
        )

    def _check_reached(self, grads: tuple, index: list[int]) -> None:
        """Refuse a trainable LL parameter that neither objective depends on."""
        unused = [i for i, g in zip(index, grads, strict=True) if g is None]
        if not unused:
            return
        params = list(self.ll_model.parameters())
        names = parameter_names(self.ll_model, [params[i] for i in unused])
        if self._alpha == 0.0:
            self.check_used(grads, index)  # alpha = 0 is GradientDescent: its message
        raise ValueError(
            f"neither ll_objective nor ul_objective depends on ll_model parameter(s) {names}: "
            "they would never move. Use them in an objective or freeze them with "
            "requires_grad_(False)."
        )
