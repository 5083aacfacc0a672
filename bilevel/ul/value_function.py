"""What the first-order (Hessian-free) bilevel methods share.

BOME, PBGD, BVFIM, MESO, GAFFO, Alternating and F2SA do not differentiate through the LL:
they replace the bilevel problem by a single-level surrogate built from the LL's value
function (``min_y f(x, y)``), a penalty or a gap function, and take plain gradient steps on
the UL variables ``x`` and on the LL variables ``y`` together. The LL variables (and the
auxiliary ones: a second LL copy ``z``, a proximal point ``theta``, multipliers) are kept
across UL steps, so every method here is a state machine driven by
:class:`bilevel.BilevelProblem` through :meth:`FirstOrderMethod.task_gradients`.

Where the state lives:

- ``y`` is ``ll_model``'s own trainable parameters: they are updated in place at every UL
  step, warm-start every inner loop, and are what the user reads after training. They are
  checkpointed with ``ll_model``.
- The auxiliary variables and the step counter are the method's :meth:`state_dict`.

Conventions: ``F`` is the UL objective on the UL batch (``val``), ``f`` the LL objective on
the LL batch (``train``); ``ll.lr`` (``alpha``) and ``ll.iters`` (``T``) are the step size and
the number of steps of the plain gradient-descent inner loops; ``lr_y`` is the step size of a
method's own update of ``y`` (``ll.lr`` unless given). The UL step is taken by the runner's UL
optimizer on the direction the method adds to ``.grad``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bilevel import distributed, linalg
from bilevel.ll import LowerLevelDivergenceError, evaluate_at
from bilevel.settings import Setting
from bilevel.state import (
    Objective,
    all_finite,
    check_objective_result,
    make_state,
    parameter_names,
)
from bilevel.ul.base import (
    HypergradientCalculator,
    check_ll_parameters,
    put_back_buffers,
    refuse_other_dynamics,
)
from bilevel.ul.ll_growth import FACTOR, WINDOW, RisingLoss
from bilevel.user_warnings import warn_user

Tensors = list[torch.Tensor]
Batch = tuple[Any, Any]
Grads = list[torch.Tensor | None]


# --- argument checks -----------------------------------------------------------------------


def check_number(
    value: Any, name: str, low: float = 0.0, closed: bool = False, high: float = math.inf
) -> float:
    """``value`` as a float after checking it is a real number in ``(low, high]`` (``[low,
    high]`` with ``closed``); a bool is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    above = value >= low if closed else value > low
    if not (above and value <= high and math.isfinite(value)):
        interval = f"{'[' if closed else '('}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
    return value


def check_optional_number(value: Any, name: str, **bounds: Any) -> float | None:
    """``None``, or a number checked by :func:`check_number`."""
    return None if value is None else check_number(value, name, **bounds)


def start_and_cap(start: str, cap: str) -> tuple[Setting, Setting]:
    """The settings of a multiplier that grows from ``start`` (a number > 0) up to ``cap``
    (``None``, or a number at least ``start``): each checked against the other whichever is
    set (F2SA's ``lam`` and ``lam_max``, PBGD's ``gamma`` and ``gamma_max``)."""

    def check_cap(value: Any, low: float) -> float | None:
        return check_optional_number(value, cap, low=low, closed=True)

    def check_start_value(obj: Any, value: Any) -> float:
        checked = check_number(value, start)
        check_cap(obj.__dict__.get(f"_{cap}"), checked)  # (not yet set: the constructor's)
        return checked

    def check_cap_value(obj: Any, value: Any) -> float | None:
        return check_cap(value, obj.__dict__[f"_{start}"])

    return (
        Setting(check_start_value, reads_object=True),
        Setting(check_cap_value, reads_object=True),
    )


def grown(start: float, growth: float, cap: float | None, step: int) -> float:
    """The multiplier of UL step ``step`` that :func:`start_and_cap`'s pair sets:
    ``start + growth * step``, capped at ``cap`` (``None``: no cap)."""
    return min(start + growth * step, math.inf if cap is None else cap)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def check_schedule(value: Any, name: str) -> float | Callable[[int], float]:
    """A positive number, or a callable ``step -> positive number`` (checked when called)."""
    if callable(value) and not isinstance(value, torch.Tensor):
        return value
    return check_number(value, name)


def check_optional_schedule(value: Any, name: str) -> float | Callable[[int], float] | None:
    """``None``, or a number-or-schedule checked by :func:`check_schedule`."""
    return None if value is None else check_schedule(value, name)


def evaluate_schedule(value: float | Callable[[int], float], name: str, step: int) -> float:
    """The value of a number-or-schedule at UL step ``step`` (checked)."""
    if callable(value):
        return check_number(value(step), f"{name}({step})")
    return value


# --- vector arithmetic on lists of tensors -------------------------------------------------


def dot(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``sum_i <a_i, b_i>`` over the pairs where both are given (a real 0-d tensor; for
    complex tensors the real inner product of :func:`bilevel.linalg.dot`)."""
    pairs = [(u, v) for u, v in zip(a, b, strict=True) if u is not None and v is not None]
    if not pairs:
        raise ValueError("dot of two empty lists")
    return linalg.dot([u for u, _ in pairs], [v for _, v in pairs])


def add_scaled(a: Tensors, b: Tensors, scale: float | torch.Tensor) -> Tensors:
    """``a + scale * b``, elementwise over the lists."""
    return [u + scale * v for u, v in zip(a, b, strict=True)]


def combine(*terms: tuple[float | torch.Tensor, Grads]) -> Grads:
    """``sum_j scale_j * g_j`` per entry, skipping ``None`` (no path); ``None`` where every
    term is ``None``."""
    result: Grads = []
    for entries in zip(*(g for _, g in terms), strict=True):
        total = None
        for (scale, _), g in zip(terms, entries, strict=True):
            if g is None:
                continue
            term = g if isinstance(scale, float) and scale == 1.0 else scale * g
            total = term if total is None else total + term
        result.append(total)
    return result


#: updates of a first-order method that confirm a suspected LL divergence (:meth:`_growth`)
CONFIRM_STEPS = 10

# --- one UL step's work --------------------------------------------------------------------


@dataclass
class Update:
    """What a method computed in one UL step; committed only if every entry is finite.

    Attributes:
        ul_loss: the UL loss reported for this step (detached).
        ll_loss: the LL loss reported for this step (detached).
        x_direction: the UL direction, one entry per UL parameter (``None``: no path).
        y: the new LL variables (one tensor per trainable LL parameter).
        auxiliary: new values of the method's auxiliary variables.
        diagnostics: what the step measured (0-d tensors or numbers).
    """

    ul_loss: torch.Tensor
    ll_loss: torch.Tensor
    x_direction: Grads
    y: Tensors
    auxiliary: dict[str, Tensors] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """The inputs of one UL step: the batches and the inner-loop settings from ``ll``."""

    train: Batch
    val: Batch
    lr: float  # ll.lr: the inner loops' step size (alpha)
    iters: int  # ll.iters: the inner loops' number of steps (T)
    step: int  # the UL step's index (for schedules)


class FirstOrderMethod(HypergradientCalculator):
    """Base of the first-order methods that keep LL (and auxiliary) variables across UL steps.

    A method implements :meth:`_update` (one UL step's arithmetic, on lists of tensors,
    returning an :class:`Update`), :meth:`settings` and, if it keeps auxiliary variables,
    lists their names in ``auxiliary_names``. This class evaluates the objectives at given LL
    weights, runs plain gradient-descent inner loops, checks everything for NaN/inf before it
    commits anything (so a refused step leaves the state as it was), writes ``y`` into
    ``ll_model``, adds the UL direction to ``.grad`` and checkpoints the state.

    The inner loops take plain gradient steps with ``ll.lr`` for ``ll.iters`` steps, as the
    papers do: ``ll`` must be ``GradientDescent(..., optimizer="sgd")`` without momentum or
    weight decay, with a constant step size (a number).

    One LL variable is kept: a task batch (``meta_step`` of several tasks) and
    ``torch.distributed`` are refused (each task, or each process, would move it). Every
    :meth:`task_gradients` call (every ``BilevelProblem.step``) advances the state;
    ``BilevelProblem.hypergradient`` is a query that puts it back, so a loop of
    ``hypergradient`` and ``ul_optimizer.step()`` would never move ``y``: to clip the
    direction, give ``BilevelProblem(..., before_ul_step=)``.
    """

    #: one LL state moves across UL steps: the runner refuses task batches and processes
    #: that would each move it
    keeps_ll_state = True

    name = "first_order_method"
    #: names of the auxiliary variables in the state (lists of tensors shaped like ``y``)
    auxiliary_names: tuple[str, ...] = ()
    #: auxiliary variables not shaped like ``y`` (multipliers of LL constraints)
    free_shape_auxiliary: tuple[str, ...] = ()

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        shared = [j is not None for j in self.initial_weight_of]
        if any(shared):
            names = parameter_names(
                ul_model, [p for p, s in zip(self.ul_params, shared, strict=True) if s]
            )
            raise ValueError(
                f"UL parameter(s) {names} are also parameters of ll_model. {type(self).__name__} "
                "keeps the LL variables as its own state and never differentiates through the "
                "LL, so it cannot learn the LL's initial weights: use Reverse, Implicit with a "
                "proximal term, FirstOrder or Reptile for meta-learning an initialization."
            )
        self._ll_params = [p for p in ll_model.parameters() if p.requires_grad]
        self._trainable = [p.requires_grad for p in ll_model.parameters()]
        self.steps_taken = 0
        self.auxiliary: dict[str, Tensors | None] = dict.fromkeys(self.auxiliary_names)
        self._model: nn.Module | None = None
        #: the LL loss across UL steps, followed for a diverging LL (:meth:`_growth`)
        self.rising = RisingLoss()
        self._warned_growth = False

    # --- the contract with the runner ------------------------------------------------------

    def differentiable_steps(self, iters: int) -> int:
        """None: these methods never differentiate through LL steps."""
        return 0

    def check_against(self, ll: Any) -> None:
        """Raise if ``ll`` was built on other models or objective, or is not the plain
        gradient descent with a constant step size that the inner loops take."""
        refuse_other_dynamics(ll, type(self).__name__)
        super().check_against(ll)
        self._inner_settings(ll)
        if distributed.active() and distributed.world_size() > 1:
            raise NotImplementedError(
                f"{type(self).__name__} keeps one copy of the LL variables and is not yet "
                "supported under torch.distributed (each process would update its own copy). "
                "Run it in one process."
            )

    def _inner_settings(self, ll: Any) -> tuple[float, int]:
        refuse_other_dynamics(ll, type(self).__name__)
        rule = getattr(ll, "rule", None)
        extra = {
            name: h.items
            for name, h in getattr(ll, "hyper", {}).items()
            if name != "lr" and any(not (isinstance(v, float) and v == 0.0) for v in h.items)
        }
        if getattr(rule, "name", None) != "sgd" or extra:
            raise ValueError(
                f"{type(self).__name__} runs its inner loops as plain gradient descent with "
                f"ll.lr, as its paper does; ll has rule {getattr(rule, 'name', None)!r}"
                + (f" with {sorted(extra)}" if extra else "")
                + ". Build ll = GradientDescent(..., lr=..., iters=..., optimizer='sgd') "
                "without momentum or weight decay."
            )
        lr = ll.lr
        if isinstance(lr, bool) or not isinstance(lr, int | float):
            raise TypeError(
                f"{type(self).__name__} needs ll.lr to be a number (the inner step size), got "
                f"{type(lr).__name__}: schedules, per-parameter and UL-dependent step sizes do "
                "not apply to value-function methods."
            )
        return float(lr), int(ll.iters)

    def task_gradients(
        self, ll: Any, train: tuple[Any, Any], val: tuple[Any, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One UL step of the method: update the LL (and auxiliary) variables, add the UL
        direction to ``.grad`` of the UL parameters, and return the UL and LL losses
        (detached). Nothing is changed if any result is NaN or inf (FloatingPointError).

        Args:
            ll: the ``GradientDescent`` that gives the inner step size ``ll.lr`` and number of
                inner steps ``ll.iters``.
            train: the LL batch ``(data, target)``.
            val: the UL batch ``(data, target)``.
        """
        if ll.ll_model is not self.ll_model:
            raise ValueError("ll and the method must be built on the same ll_model object.")
        check_ll_parameters(self, self._ll_params)
        lr, iters = self._inner_settings(ll)
        context = StepContext(tuple(train), tuple(val), lr, iters, self.steps_taken)
        self._model = ll.patched_model(graph_from_start=False)
        try:
            update = self._update(context)
            self._check_update(update)  # (its host sync lets the growth check read the loss)
            growth = self._growth(update, context, ll.on_growth)
        finally:
            ll.release(self._model)
            self._model = None
        self._commit(update, growth)
        return update.ul_loss, update.ll_loss

    def _update(self, context: StepContext) -> Update:
        """The method itself: one UL step's arithmetic."""
        raise NotImplementedError

    def _growth(
        self, update: Update, context: StepContext, policy: str
    ) -> tuple[float, bool] | None:
        """The step's LL loss and whether a suspected divergence was cleared, for
        :class:`~bilevel.ul.ll_growth.RisingLoss` (``None``: not followed). A step size of
        the LL updates above ``2 / L`` (``ll.lr``, ``lr_y``, ``eta``) grows the LL loss
        geometrically (the directions of PBGD, F2SA, MESO, GAFFO and Alternating reached
        1e8 to 1e108 in 30 UL steps, with only NaN or inf refused). A loss more than twice
        every one before the last ten UL steps is suspect; the suspicion is confirmed where
        ``CONFIRM_STEPS`` more of the method's updates at this UL point, not committed, keep
        raising it beyond twice (a stable one settles: the UL variables, fixed there, can no
        longer raise it) and then raises :class:`~bilevel.ll.LowerLevelDivergenceError`, or
        warns once, as ``on_growth`` says."""
        if policy == "ignore" or (policy == "warn" and self._warned_growth):
            return None
        value = float(update.ll_loss)  # (finite, and synchronized by the check before)
        if not self.rising.suspect(value):
            return value, False
        losses = self._dry_run(update, context)
        if not all(map(math.isfinite, losses)):
            losses.append(math.inf)
        if not (losses[-1] > (1 + FACTOR) * value and losses[-1] >= max(losses)):
            return value, True
        message = (
            f"{type(self).__name__} step {self.steps_taken}: the LL loss, {value:.4g}, is more "
            f"than {1 + FACTOR:g} times every LL loss before the last {WINDOW} UL steps (the "
            f"largest: {self.rising.peak:.4g}), and {CONFIRM_STEPS} more updates at this UL "
            f"point raise it to {losses[-1]:.4g}: the LL variables are diverging. Lower the "
            "step sizes of the LL updates (ll.lr, and the method's own: lr_y, eta) below "
            "2 / the LL's curvature; the state was left as it was before this step. "
            "(GradientDescent(..., on_growth='warn' or 'ignore') would let it through.)"
        )
        if policy == "warn":
            self._warned_growth = True
            warn_user(message, RuntimeWarning)
            return value, False
        raise LowerLevelDivergenceError(message, first=self.rising.peak or 0.0, last=value, iters=1)

    def _dry_run(self, update: Update, context: StepContext) -> list[float]:
        """The LL losses of ``CONFIRM_STEPS`` more updates from ``update`` at this UL point;
        the LL variables, the auxiliary ones and the models' buffers are put back."""
        weights = [p.detach().clone() for p in self._ll_params]
        auxiliary = dict(self.auxiliary)
        buffers = [
            (b, b.detach().clone()) for m in (self.ll_model, self.ul_model) for b in m.buffers()
        ]
        losses = []
        try:
            for _ in range(CONFIRM_STEPS):
                with torch.no_grad():
                    for p, w in zip(self._ll_params, update.y, strict=True):
                        p.copy_(w)
                self.auxiliary = {k: [v.detach() for v in vs] for k, vs in update.auxiliary.items()}
                update = self._update(context)
                losses.append(update.ll_loss.detach())
        finally:
            with torch.no_grad():
                for p, w in zip(self._ll_params, weights, strict=True):
                    p.copy_(w)
            self.auxiliary = auxiliary
            put_back_buffers(buffers)
        return torch.stack(losses).tolist()

    def _check_update(self, update: Update) -> None:
        """Refuse a step whose UL direction reaches no UL parameter, or whose results are not
        finite (one host sync)."""
        self._refuse_unused(update.x_direction)
        tensors = [update.ul_loss, update.ll_loss, *update.y]
        tensors += [g for g in update.x_direction if g is not None]
        for values in update.auxiliary.values():
            tensors += values
        if not all_finite([t.detach().reshape(-1) for t in tensors]):
            raise FloatingPointError(
                f"{type(self).__name__} step {self.steps_taken}: the UL direction, the losses or "
                "the LL variables became NaN or inf; nothing was updated. Check the data for "
                "NaN or inf and the objectives for log(0) or division by zero, or lower the "
                "step sizes (the UL optimizer's lr, ll.lr, lr_y) or the penalty."
            )

    def _commit(self, update: Update, growth: tuple[float, bool] | None = None) -> None:
        """Commit a checked step (:meth:`commit_state`) and add its direction to ``.grad``."""

        def change() -> None:
            if growth is not None:
                self.rising.record(*growth)
            with torch.no_grad():
                for p, w in zip(self._ll_params, update.y, strict=True):
                    p.copy_(w)
            for key, values in update.auxiliary.items():
                self.auxiliary[key] = [v.detach() for v in values]
            self.steps_taken += 1

        self.commit_state(change)
        for p, g in zip(self.ul_params, update.x_direction, strict=True):
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g.detach())
        self.diagnostics = {"ul_loss": update.ul_loss, **update.diagnostics}

    # --- evaluation at given LL weights ----------------------------------------------------

    def current_y(self) -> Tensors:
        """The LL variables now: detached copies of ``ll_model``'s trainable parameters."""
        return [p.detach().clone() for p in self._ll_params]

    def _full(self, weights: Tensors) -> Tensors:
        """All of ``ll_model``'s weights: ``weights`` for the trainable ones, the frozen ones
        as they are."""
        it = iter(weights)
        return [
            next(it) if t else p.detach()
            for p, t in zip(self.ll_model.parameters(), self._trainable, strict=True)
        ]

    def value(
        self,
        objective: Objective,
        name: str,
        weights: Tensors,
        batch: Batch,
        require_graph: bool = True,
    ) -> torch.Tensor:
        """``objective`` at the LL weights ``weights`` (trainable ones), on ``batch``; without
        ``require_graph`` a result with no path to any tensor that requires grad is accepted
        (a validation loss that depends on ``x`` only through ``y``, evaluated at a fixed
        ``y``)."""
        model = self._model
        if model is None:
            raise RuntimeError("value() is only available during task_gradients.")
        # trainable weights require grad in every evaluation, as in the LL run: an objective
        # may select them by it (an L2 term over `p.requires_grad` parameters), and would be
        # another function where they did not (a point held fixed, a reported value)
        weights = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
        with evaluate_at(model, self._full(weights)):
            result = objective(make_state(batch[0], batch[1], self.ul_model, model))
        if (
            not require_graph
            and isinstance(result, torch.Tensor)
            and not result.requires_grad
            and result.is_floating_point()
        ):
            return check_objective_result(result.detach().requires_grad_(), name).detach()
        return check_objective_result(result, name)

    def reported_value(
        self, objective: Objective, name: str, weights: Tensors, batch: Batch
    ) -> torch.Tensor:
        """``objective`` at ``weights`` on ``batch`` (detached), for a loss that is reported and
        not differentiated: evaluated without recording a graph (to the UL parameters, which
        an objective may read)."""
        with torch.no_grad():
            return self.value(objective, name, weights, batch, require_graph=False).detach()

    def grad(
        self,
        objective: Objective,
        name: str,
        weights: Tensors,
        batch: Batch,
        wrt_x: bool = False,
        wrt_y: bool = True,
    ) -> tuple[torch.Tensor, Tensors, Grads]:
        """``objective`` at ``weights`` and its gradients: with respect to the LL variables
        (zeros where it does not depend on one) and, with ``wrt_x``, to the UL parameters
        (``None`` where no path). Returns ``(value, grad_y, grad_x)``, all detached."""
        leaves = [w.detach().requires_grad_() for w in weights]  # (as value() gives them)
        with self._ul_frozen(not wrt_x):
            value = self.value(objective, name, leaves, batch, require_graph=wrt_y)
            inputs = (leaves if wrt_y else []) + (list(self.ul_params) if wrt_x else [])
            if inputs and value.requires_grad:
                grads = torch.autograd.grad(value, inputs, allow_unused=True)
            else:  # no path to x at a fixed y: no direction from this term
                grads = (None,) * len(inputs)
        n = len(leaves) if wrt_y else 0
        grad_y = [
            torch.zeros_like(w) if g is None else g
            for w, g in zip(leaves[:n], grads[:n], strict=True)
        ]
        grad_x: Grads = list(grads[n:]) if wrt_x else [None] * len(self.ul_params)
        return value.detach(), grad_y, grad_x

    def refuse_ul_without_graph(self, reads_y: Sequence[bool], ul_x: Grads) -> None:
        """Raise if ``ul_objective`` reads neither the LL variables (``reads_y``: whether each
        of its evaluations in an inner loop, with the UL parameters frozen, had a graph to
        them) nor the UL parameters (``ul_x``, its gradient in them: all ``None``). Either
        alone is a valid objective (a validation loss of ``y``; a penalty on ``x``); neither
        is one computed without a graph (``torch.no_grad``, ``.detach()``), whose value would
        silently steer nothing."""
        if not reads_y or any(reads_y) or any(g is not None for g in ul_x):
            return
        raise ValueError(
            "ul_objective returned a tensor with no path to the LL variables nor to the UL "
            "parameters (requires_grad=False): compute it from state['ll_model'] and/or "
            "state['ul_model'], without .detach(), .item() or torch.no_grad()."
        )

    def descend(
        self,
        loss: Callable[[Tensors], torch.Tensor],
        start: Tensors,
        steps: int,
        lr: float,
    ) -> Tensors:
        """``steps`` plain gradient steps ``w <- w - lr * grad loss(w)`` from ``start``;
        ``loss(w)`` evaluates the objective at the LL weights ``w`` (see :meth:`value`). The UL
        parameters record no graph meanwhile."""
        weights = [w.detach() for w in start]
        with self._ul_frozen(True):
            for _ in range(steps):
                leaves = [w.requires_grad_() for w in weights]
                grads = torch.autograd.grad(loss(leaves), leaves, allow_unused=True)
                with torch.no_grad():
                    weights = [
                        w if g is None else w - lr * g for w, g in zip(leaves, grads, strict=True)
                    ]
                weights = [w.detach() for w in weights]
        return weights

    def ll_descend(self, start: Tensors, steps: int, lr: float, batch: Batch) -> Tensors:
        """:meth:`descend` on the LL objective."""
        return self.descend(
            lambda w: self.value(self.ll_objective, "ll_objective", w, batch), start, steps, lr
        )

    @contextlib.contextmanager
    def _ul_frozen(self, freeze: bool) -> Iterator[None]:
        """Switch ``requires_grad`` off on the UL parameters (restored on exit, also on
        error), so that evaluations that need no UL gradient record no graph to them."""
        frozen = [p for p in self.ul_params if p.requires_grad] if freeze else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # --- state -----------------------------------------------------------------------------

    def _auxiliary_or(self, key: str, default: Tensors) -> Tensors:
        """An auxiliary variable, or ``default`` before it exists (the first step)."""
        value = self.auxiliary.get(key)
        return [v.clone() for v in default] if value is None else [v.clone() for v in value]

    def state_dict(self) -> dict[str, Any]:
        """What this method keeps across UL steps (tensors and plain values; ``y`` itself is
        ``ll_model``'s parameters, checkpointed with ``ll_model``)."""
        return self._state(
            {
                k: None if v is None else [t.detach().clone() for t in v]
                for k, v in self.auxiliary.items()
            }
        )

    def state_at_step_start(self) -> dict[str, Any]:
        """:meth:`state_dict` with the auxiliary variables shared: a step replaces them
        (:meth:`commit_state`)."""
        return self._state(dict(self.auxiliary))

    def _state(self, auxiliary: dict[str, Tensors | None]) -> dict[str, Any]:
        return {
            "method": self.name,
            "steps_taken": self.steps_taken,
            "auxiliary": auxiliary,
            "ll_growth": self.rising.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (tensors go to the LL model's device and
        dtype).

        Raises:
            ValueError: the state was saved by another method, or its variables do not match
                the LL model's trainable parameters.
        """
        if not isinstance(state, dict) or state.get("method") != self.name:
            found = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"this state was saved by {found!r}, not by {self.name!r}.")
        steps = state.get("steps_taken")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps_taken must be an integer >= 0, got {steps!r}.")
        saved = state.get("auxiliary", {})
        if set(saved) != set(self.auxiliary_names):
            raise ValueError(
                f"the state holds auxiliary variables {sorted(saved)}, {self.name} keeps "
                f"{sorted(self.auxiliary_names)}."
            )
        restored: dict[str, Tensors | None] = {}
        for key, values in saved.items():
            if values is None:
                restored[key] = None
                continue
            restored[key] = self._restore(key, values)
        self.steps_taken = steps
        self.auxiliary = restored
        self.rising.load(state.get("ll_growth"))  # (absent from older checkpoints: afresh)

    def _restore(self, key: str, values: Any) -> Tensors:
        """An auxiliary variable from a state dict, checked and moved to the LL model's device
        and dtype; shaped like ``y`` unless its name is in ``free_shape_auxiliary``."""
        if not isinstance(values, list | tuple) or not all(
            isinstance(v, torch.Tensor) for v in values
        ):
            raise ValueError(f"auxiliary variable {key!r} must be a list of tensors.")
        reference = self._ll_params[0]
        # a real variable of complex LL weights (GAFFO's constraint multiplier) stays real
        real = reference.dtype.to_real()
        restored = [
            v.detach().to(reference.device, reference.dtype if v.is_complex() else real).clone()
            for v in values
        ]
        shapes = [tuple(p.shape) for p in self._ll_params]
        if key not in self.free_shape_auxiliary and [tuple(v.shape) for v in restored] != shapes:
            raise ValueError(
                f"auxiliary variable {key!r} has shapes {[tuple(v.shape) for v in restored]}, "
                f"the LL model's trainable parameters have {shapes}."
            )
        return restored
