"""What every upper-level calculator shares: argument checks, the auxiliary-model check,
evaluation of the objectives, and accumulation of the hypergradient into ``.grad``."""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.ll import Trajectory
from bilevel.ll.patched import is_released, parameter_list
from bilevel.ll.unroll import Observer
from bilevel.settings import Fixed
from bilevel.state import (
    Objective,
    check_data_matches,
    check_finite,
    check_hypergradient,
    check_objective_result,
    check_same_device_and_dtype,
    has_none,
    make_state,
    modes_kept,
    parameter_names,
    requires_grad,
    trainable_parameters,
)

Grads = list[torch.Tensor | None]
#: the cure of a change of what a method was built on
REBUILD = (
    "Build the LL optimizer, the method and the BilevelProblem again on the new value (to "
    "change a parameter's values, assign in place: with torch.no_grad(): p.copy_(value))."
)
#: why the problem's objectives and models are fixed
PROBLEM = (
    "it defines the problem, which BilevelProblem checked against the LL optimizer when it "
    "was built (both must be built on the same models and ll_objective), and the method's "
    "parameter lists and state were taken from it"
)
#: why the parameter lists are fixed
TAKEN = (
    "it was taken from the models at construction (the parameters that required grad then; "
    "one frozen, unfrozen or replaced since is refused at the next step, saying so)"
)
#: a UL step's changes of a method's state, held until the runner applies them
Commits = list[Callable[[], None]]


def gradient_scale(
    hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    w: list[torch.Tensor],
    g: list[torch.Tensor],
) -> torch.Tensor:
    """The size of the terms that cancel in the LL gradient ``g`` at the weights ``w``, which
    sets its round-off (a detached 0-d tensor; three products ``hvp(v) = H v``): the largest
    of ``||H w||`` (for a quadratic ``H w - b`` both terms have that norm at the solution),
    ``||w|| ||H g|| / ||g||`` and ``||H (w * r)||`` with ``r`` a fixed pattern unrelated to
    the problem (``generic_weights``): lower bounds of ``||H|| ||w||``, the size of the
    products whose sums make ``H w``. Their round-off, about ``eps ||H|| ||w||``, is far above
    ``eps ||H w||`` where ``w`` lies along directions of small curvature (nearly collinear
    features: a ridge LL of condition number 5e6 had, at its solution, gradients of 800 eps
    ``||H w||``, and ``||H w||`` alone let IGA's multiplier reach 1e11). A backward-stable
    solve leaves its residual of ``eps ||H|| ||w||`` along the flattest direction too, where
    ``H g`` is small and LL steps do not remove it: ``w * r``, with ``w``'s entries
    reweighted, has a part of the size of ``w`` along the steep directions (without it,
    gradients of 100 to 160 eps times the first two bounds, by the CPU's rounding)."""
    point = [x.detach() for x in w]
    direction = [x.detach() for x in g]
    size = linalg.norm(direction)
    size = size.clamp_min(torch.finfo(size.dtype).tiny)  # |g / size| <= 1; g = 0 gives 0
    along = [d / size * linalg.norm(point) for d in direction]  # g with the norm of w
    reweighted = [x * generic_weights(x) for x in point]
    sizes = [linalg.norm(hvp(v)) for v in (point, along, reweighted)]
    return torch.stack(sizes).max().detach()


def generic_weights(x: torch.Tensor) -> torch.Tensor:
    """``cos(1 + 2.4 i)`` over the entries ``i`` of ``x`` (real, in ``[-1, 1]``, on its device,
    in its precision): a fixed pattern, neighbours unlike, unrelated to any problem
    (golden-angle steps), drawn from no random generator."""
    real = x.real.dtype if x.is_complex() else x.dtype
    wide = torch.promote_types(real, torch.float32)  # float16 has no index above 65504
    index = torch.arange(x.numel(), device=x.device, dtype=wide)
    return torch.cos(1.0 + 2.399963229728653 * index).to(real).reshape(x.shape)


@dataclass
class Call:
    """The arguments of one :meth:`HypergradientCalculator.compute_gradients` call."""

    validate_data: Any
    validate_target: Any
    auxiliary_model: nn.Module
    train_data: Any
    train_target: Any
    trajectory: Trajectory

    @property
    def val(self) -> tuple[Any, Any]:
        """The UL batch ``(data, target)``."""
        return self.validate_data, self.validate_target


class _LastCheck:
    """The LL optimizer a method was last checked against (a weak reference: the method does
    not keep it alive) and the settings changes of both then. Copies and pickles of the
    method hold none, so that a copy checks again at its first run."""

    __slots__ = ("changes", "ll")

    def __init__(self, ll: weakref.ref, changes: tuple[int, int]) -> None:
        self.ll, self.changes = ll, changes

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _nothing, ()


def _nothing() -> None:
    """``None`` (what an unpickled :class:`_LastCheck` becomes)."""


class HypergradientCalculator:
    """Base of the UL calculators.

    A calculator implements :meth:`differentiable_steps` (how much LL graph it needs), may
    give an :meth:`observer` of the LL steps, and implements ``_hypergradient`` (the method
    itself) on the :class:`~bilevel.ll.Trajectory` value that the LL run returns.
    :meth:`accumulate` runs the method, refuses UL parameters that receive no gradient at all
    (their hypergradient would be silently zero), and adds the result to ``.grad`` of the UL
    parameters, so that several tasks can be summed before the caller steps its optimizer.

    :meth:`task_gradients` is what :class:`bilevel.BilevelProblem` drives: one LL run that
    records exactly what the method needs, then :meth:`accumulate`. Methods that keep LL
    state across UL steps implement the same call their own way.

    A method's numeric and string settings may be set between UL steps (``ul.k = 20``):
    they are checked as the constructor checks them (:class:`bilevel.settings.Setting`), and
    the runner's next step checks the method against the LL optimizer again
    (:meth:`check_against`), as it did when it was built. What a change could not
    reach consistently (the objectives, the models and the parameter lists taken from them,
    seeds and samplers, what the method's state across UL steps was made for) is fixed at
    construction and refused with ``AttributeError`` (:class:`bilevel.settings.Fixed`).

    Attributes:
        diagnostics: what the last call measured (UL loss, solver diagnostics, ...).
    """

    name = "calculator"

    ul_objective = Fixed(PROBLEM, cure=REBUILD)
    ll_objective = Fixed(PROBLEM, cure=REBUILD)
    ul_model = Fixed(PROBLEM, cure=REBUILD)
    ll_model = Fixed(PROBLEM, cure=REBUILD)
    ul_params = Fixed(TAKEN, cure=REBUILD)
    ll_trainable = Fixed(TAKEN, cure=REBUILD)
    initial_weight_of = Fixed(TAKEN, cure=REBUILD)

    #: whether the hypergradient and the UL loss of one task are linear in the UL objective
    #: for a given LL run, so that a UL batch split by examples into shards weighted by their
    #: fractions sums to the whole batch's result (what ``torch.distributed`` does with a
    #: single task); ``False`` (the safe default) makes every process run the whole task
    splits_ul_batch = False
    #: whether the method keeps LL variables of its own across UL steps (DM, the stochastic
    #: and first-order methods): an auxiliary model from ``ll.optimize`` does not apply, so
    #: :meth:`compute_gradients` refuses it, and the runner refuses task batches
    keeps_ll_state = False
    #: whether :meth:`BilevelProblem.hypergradient <bilevel.BilevelProblem.hypergradient>`
    #: leaves the method's ``state_dict`` as it was (a query changes nothing); ``False`` for a
    #: state that is only the draws of the method's own generator, which a query advances as
    #: it advances the global RNG (consecutive queries see fresh minibatches)
    queries_keep_state = True
    #: where :meth:`commit_state` puts the changes while they are held (else ``None``)
    _held_commits: Commits | None = None
    #: settings changed after construction (:mod:`bilevel.settings` counts them)
    _settings_changes = 0

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
    ) -> None:
        for arg, value in (("ul_objective", ul_objective), ("ll_objective", ll_objective)):
            if not callable(value):
                raise TypeError(f"{arg} must be callable: state -> scalar tensor.")
        self.ul_objective = ul_objective
        self.ll_objective = ll_objective
        self.ul_model = ul_model
        self.ll_model = ll_model
        self.ul_params = trainable_parameters(ul_model, "ul_model")
        #: the LL parameters trainable at construction (the LL variable of the methods that
        #: keep it; for the others, what a refusal compares with)
        self.ll_trainable = trainable_parameters(ll_model, "ll_model")
        check_same_device_and_dtype(ll_model=ll_model, ul_model=ul_model)
        position = {id(p): i for i, p in enumerate(ll_model.parameters())}
        #: for each UL parameter, the index of the LL fast weight it initializes (or None)
        self.initial_weight_of = [position.get(id(p)) for p in self.ul_params]
        self.diagnostics: dict[str, Any] = {}

    def differentiable_steps(self, iters: int) -> int:
        """How many final LL steps must keep a graph, for an LL run of ``iters`` steps."""
        raise NotImplementedError

    def commit_state(self, change: Callable[[], None]) -> None:
        """Apply ``change``, a UL step's update of what the method keeps across UL steps (the
        LL variables in ``ll_model``, multipliers, tables, counters), once the step has been
        checked: at once, or, while they are held (:meth:`hold_state_changes`, which
        ``BilevelProblem.step`` calls), once the runner has taken the UL step, so that a step
        that raises (in ``before_ul_step``, in the UL optimizer) moves nothing."""
        if self._held_commits is None:
            change()
        else:
            self._held_commits.append(change)

    def hold_state_changes(self) -> tuple[Commits, Commits | None]:
        """Hold the changes given to :meth:`commit_state` from now on in the list returned
        (for the runner to apply once the UL step is taken, or to drop), until
        :meth:`stop_holding_state_changes` is given the second value returned: what was held
        before, so that a query made inside a step (``problem.hypergradient`` from
        ``before_ul_step``) holds its own changes apart from the step's."""
        outer, self._held_commits = self._held_commits, []
        return self._held_commits, outer

    def stop_holding_state_changes(self, outer: Commits | None = None) -> None:
        """Hold the changes as before :meth:`hold_state_changes` (``outer``, what it returned
        second): at once again, or in the enclosing step's list."""
        self._held_commits = outer

    def state_at_step_start(self) -> Any:
        """What ``BilevelProblem.step`` keeps at a UL step's start of a method with a
        ``state_dict``, to put back with ``load_state_dict`` if the step raises:
        ``state_dict()``, copies. A method whose tensors change only through
        :meth:`commit_state`, by being replaced rather than changed in place, returns them
        shared instead: no copy of LL-sized tensors at every UL step."""
        return self.state_dict()  # type: ignore[attr-defined]

    def settings(self) -> dict[str, Any]:
        """The method's settings that a checkpoint must agree on to be resumed."""
        return {}

    def observer(self, ll: Any) -> Observer | None:
        """What must watch every LL step (forward-mode tangents), or ``None``."""
        return None

    def check_against(self, ll: Any) -> None:
        """Raise if this calculator and the LL optimizer were given disagreeing inputs."""
        if ll.ll_model is not self.ll_model or ll.ul_model is not self.ul_model:
            raise ValueError("ll and ul must be built on the same ll_model and ul_model objects.")
        if ll.ll_objective != self.ll_objective:  # bound methods are new objects, but equal
            raise ValueError(
                f"{type(self).__name__} was given another ll_objective than the LL optimizer: "
                "the hypergradient would be taken for a problem the LL does not solve. Pass "
                "the same function to both."
            )
        ll_ul_objective = getattr(ll, "ul_objective", None)  # LL dynamics that look at F (BDA)
        if ll_ul_objective is not None and ll_ul_objective != self.ul_objective:
            raise ValueError(
                f"{type(ll).__name__} steers the LL with another ul_objective than "
                f"{type(self).__name__} differentiates: pass the same function to both."
            )

    def check_against_once(self, ll: Any) -> None:
        """:meth:`check_against` at the first run with ``ll`` (or with one that replaced it)
        and again after a setting of either changed: at every UL step of the runners, and of
        runs by hand."""
        last = self.__dict__.get("_last_check")
        changes = (getattr(ll, "_settings_changes", 0), getattr(self, "_settings_changes", 0))
        if last is None or last.ll() is not ll or last.changes != changes:
            self.check_against(ll)
            self._last_check = _LastCheck(weakref.ref(ll), changes)

    def run_ll(
        self, ll: Any, data: Any, target: Any, ul_batch: tuple[Any, Any] | None = None
    ) -> Trajectory:
        """One LL run on ``(data, target)`` that records exactly what this method needs
        (``ul_batch``: the UL batch, for LL dynamics that look at it, such as BDA).

        Checks this method against ``ll`` (:meth:`check_against`) at its first run with it,
        and again after a setting of either changed, as ``BilevelProblem`` does: a run by
        hand is checked too."""
        self.check_against_once(ll)
        steps = self.differentiable_steps(ll.iters)
        observer = self.observer(ll)
        try:
            return ll.run(
                data, target, differentiable_steps=steps, observer=observer, ul_batch=ul_batch
            )
        except ValueError as error:  # every LL parameter frozen since: say so
            changed = self._ll_changes()
            if changed is None or any(map(requires_grad, parameter_list(self.ll_model))):
                raise
            raise ValueError(
                f"ll_model has no parameters that require grad any more: its trainable "
                f"parameters changed after {type(self).__name__} was built ({changed}), and "
                "the LL has nothing left to optimize. Unfreeze the LL parameters to train "
                "(requires_grad_(True)); or build the LL optimizer, the method and the "
                "BilevelProblem again after changing the model."
            ) from error

    def task_gradients(
        self, ll: Any, train: tuple[Any, Any], val: tuple[Any, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one task's hypergradient to ``.grad``; return its UL loss and final LL loss
        (detached). The LL's patched model is handed back to ``ll`` when done."""
        trajectory = self.run_ll(ll, *train, ul_batch=val)
        try:
            loss = self.accumulate(trajectory, val, train)
        finally:
            ll.release(trajectory.model)  # frees the LL graph now; the next task reuses it
        return loss, trajectory.losses[-1]

    def _check_trajectory(self, auxiliary_model: nn.Module) -> Trajectory:
        trajectory = getattr(auxiliary_model, "trajectory", None)
        if trajectory is None and is_released(auxiliary_model):
            raise TypeError(
                "auxiliary_model was released (ll.release, which BilevelProblem calls after each "
                "task) and holds no weights: use the result of a new ll.optimize(data, target)."
            )
        if isinstance(auxiliary_model, Trajectory):  # what ul.run_ll and ll.run return
            raise TypeError(
                "auxiliary_model must be the module returned by ll.optimize(data, target), got "
                "a Trajectory (what ul.run_ll and ll.run return): pass its .model, or give the "
                "Trajectory to ul.accumulate(trajectory, (val_x, val_y), (train_x, train_y))."
            )
        if not isinstance(trajectory, Trajectory):
            raise TypeError(
                "auxiliary_model must be the module returned by ll.optimize(data, target) "
                f"(a bilevel.ll optimizer), got {type(auxiliary_model).__name__}."
            )
        return trajectory

    def _check_recorded(self, trajectory: Trajectory) -> None:
        needed = self.differentiable_steps(trajectory.iters)
        if needed and trajectory.differentiable_steps != needed:
            name = type(self).__name__
            # a method that also watches the steps (PTT's iterates) gets nothing of them from
            # ll.optimize, whatever its differentiable_steps
            watches = type(self).observer is not HypergradientCalculator.observer
            cure = (
                f"ll.optimize does not record the steps {name} watches either"
                if watches
                else f"Set ll.differentiable_steps = {needed} before ll.optimize"
            )
            raise ValueError(
                f"{name} needs the graph of the last {needed} of {trajectory.iters} LL steps, "
                f"but the auxiliary model recorded {trajectory.differentiable_steps}. {cure}; "
                "run the LL with ul.run_ll(ll, data, target) and pass its .model, or use "
                "BilevelProblem."
            )

    def states(self, auxiliary_model: nn.Module, data: Any, target: Any) -> dict[str, Any]:
        """The state dict for one level, with the auxiliary model as ``ll_model``."""
        return make_state(data, target, self.ul_model, auxiliary_model)

    def ul_loss(self, call: Call) -> torch.Tensor:
        """Evaluate and check the UL objective on the auxiliary model (a mode it switches the
        model to, ``.eval()``, holds for this evaluation only)."""
        state = self.states(call.auxiliary_model, call.validate_data, call.validate_target)
        with modes_kept(call.auxiliary_model):
            return check_objective_result(self.ul_objective(state), "ul_objective")

    def ll_loss(self, call: Call) -> torch.Tensor:
        """Evaluate and check the LL objective on the auxiliary model (a mode it switches the
        model to holds for this evaluation only)."""
        state = self.states(call.auxiliary_model, call.train_data, call.train_target)
        with modes_kept(call.auxiliary_model):
            return check_objective_result(self.ll_objective(state), "ll_objective")

    def compute_gradients(
        self,
        validate_data: Any,
        validate_target: Any,
        auxiliary_model: nn.Module,
        train_data: Any,
        train_target: Any,
    ) -> torch.Tensor:
        """Add the hypergradient to ``.grad`` of the UL parameters; return the UL loss.

        Args:
            validate_data: UL batch inputs.
            validate_target: UL batch targets.
            auxiliary_model: the result of ``ll.optimize(train_data, train_target)``.
            train_data: LL batch inputs (used by methods that revisit the LL objective).
            train_target: LL batch targets.

        Returns:
            The UL loss at the auxiliary model (detached).
        """
        if self.keeps_ll_state:
            raise TypeError(
                f"{type(self).__name__} keeps the LL weights (and its own state) across UL "
                "steps, so compute_gradients with an auxiliary_model from ll.optimize does not "
                "apply: drive it with "
                "BilevelProblem(ll, method, ul_optimizer).step(train, val), or "
                "method.task_gradients(ll, train, val)."
            )
        trajectory = self._check_trajectory(auxiliary_model)
        ll = None if trajectory.run_by is None else trajectory.run_by()
        if ll is not None:  # the LL optimizer that ran it: checked as BilevelProblem does
            self.check_against_once(ll)
        reference = self.ul_params[0]
        for name, value in (
            ("validate_data", validate_data),
            ("validate_target", validate_target),
            ("train_data", train_data),
            ("train_target", train_target),
        ):
            check_data_matches(value, reference, name)
        steps = self.differentiable_steps(trajectory.iters)  # those it back-propagates through
        if trajectory.differentiated and steps:
            raise TypeError(
                "auxiliary_model's LL steps were back-propagated through by an earlier "
                "compute_gradients, which frees their graph: run the LL again for another "
                "hypergradient, with method.run_ll(ll, data, target).model (what every method "
                "can use; ll.optimize(data, target) records too little for some) (for several "
                "validation batches, concatenate them, or sum their UL losses in one "
                "ul_objective)."
            )
        loss = self.accumulate(
            trajectory, (validate_data, validate_target), (train_data, train_target), True
        )
        trajectory.differentiated = trajectory.differentiated or bool(steps)
        return loss

    def accumulate(
        self,
        trajectory: Trajectory,
        val: tuple[Any, Any],
        train: tuple[Any, Any],
        refuse_nonfinite: bool = False,
    ) -> torch.Tensor:
        """Add the hypergradient at an LL run's result to ``.grad``; return the UL loss.

        Args:
            trajectory: what the LL run returned (``ll.run`` or :meth:`run_ll`).
            val: the UL batch ``(data, target)``.
            train: the LL batch ``(data, target)`` (for methods that revisit the LL objective).
            refuse_nonfinite: raise ``FloatingPointError`` on a NaN or inf hypergradient,
                leaving ``.grad`` as it was (for callers that step the UL optimizer
                themselves; ``BilevelProblem`` checks the summed ``.grad`` once).
        """
        self._check_recorded(trajectory)
        check_ul_parameters(self)
        call = Call(*val, trajectory.model, *train, trajectory)
        grads, loss = self._hypergradient(call)
        self._refuse_unused(grads)
        loss = loss.detach()
        if loss.numel() != 1 or not math.isfinite(loss.item()):  # one host sync
            check_finite(loss, "the UL loss")  # raises if not finite, with the values
        if refuse_nonfinite:
            check_hypergradient([g for g in grads if g is not None])
        for p, g in zip(self.ul_params, grads, strict=True):
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g.detach())
        self.diagnostics["ul_loss"] = loss
        return loss

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        """The method itself: the hypergradient (``None`` where no path) and the UL loss."""
        raise NotImplementedError

    def _refuse_unused(self, grads: Grads) -> None:
        if not has_none(grads):  # the usual case, in one pass
            return
        unused = [p for p, g in zip(self.ul_params, grads, strict=True) if g is None]
        if unused:
            names = parameter_names(self.ul_model, unused)
            self._refuse_after_ll_change(names)
            raise ValueError(
                f"UL parameter(s) {names} get no hypergradient from {type(self).__name__}: "
                "neither objective depends on them along the path this method differentiates, "
                "so their hypergradient would be silently zero. Use them in an objective, "
                "freeze them with requires_grad_(False), or pick a method that reaches them "
                "(e.g. Reverse for the LL's initial weights; Implicit needs a proximal term)."
            )

    def _ll_changes(self) -> str | None:
        """In words, the LL parameters trainable at construction that were frozen or left
        ``ll_model`` since; ``None`` where none did (for refusals only: not on the hot path)."""
        changes = parameter_changes(self.ll_model, self.ll_trainable)
        if changes is None or not (changes.frozen or changes.gone):
            return None
        described = []
        if changes.frozen:
            frozen = parameter_names(self.ll_model, changes.frozen)
            described.append(f"{frozen} frozen (requires_grad False)")
        if changes.gone:
            described.append(f"{changes.gone} no longer in ll_model (replaced or deleted)")
        return "; ".join(described)

    def _refuse_after_ll_change(self, names: list[str]) -> None:
        """For UL parameters ``names`` that get no hypergradient: raise, saying so, where LL
        parameters trainable at construction were frozen (or left ``ll_model``) since, which
        cut the UL parameters' path through the LL; on the refusal path only."""
        changed = self._ll_changes()
        if changed is None:
            return
        method = type(self).__name__
        raise ValueError(
            f"UL parameter(s) {names} get no hypergradient from {method}, and ll_model's "
            f"trainable parameters changed after {method} was built ({changed}). The LL "
            "parameter set changed after construction, and the UL parameters "
            "reached the objectives through LL parameters that no longer train. Unfreeze them "
            "(requires_grad_(True)); or, to train without them, build the LL optimizer, the "
            "method and the BilevelProblem again after changing the model (and freeze the UL "
            "parameters that then reach no objective)."
        )


def refuse_rule_weight_decay(rule: Any, method: str) -> None:
    """Refuse an LL update rule with a weight decay for a method that differentiates the
    stationarity of ``ll_objective``. An L2 decay added to the gradient (every rule but
    AdamW) makes the run end at a zero of ``grad ll_objective + wd w`` instead. AdamW's
    decoupled decay ``w <- w (1 - lr wd)`` (Loshchilov & Hutter, 2019) stops it where
    ``grad ll_objective = -wd w (sqrt(v) + eps)`` (Adam's moments ``v``): a zero of
    ``grad ll_objective`` only once ``v`` has decayed to round-off, long after the run, and
    never for a large ``eps`` or ``wd ||w||_inf >= 1``."""
    if rule is None or "weight_decay" not in rule.hyper:
        return
    value = rule.hyper["weight_decay"]
    items = value if isinstance(value, list | tuple) else [value]
    if all(isinstance(v, float) and v == 0.0 for v in items):
        return
    if rule.name == "adamw":
        raise ValueError(
            f"{method} differentiates the stationarity of ll_objective, but the LL update rule "
            "'adamw' shrinks the weights by (1 - lr * weight_decay) at every step outside the "
            "gradient (decoupled weight decay; its default is 1e-2): the run stops where "
            "grad ll_objective = -weight_decay * w * (sqrt(v) + eps), not at a stationary point "
            "of ll_objective, and the hypergradient would be silently off. Use optimizer="
            "'adam' (or rules.adamw(weight_decay=0.0)) and put the penalty in ll_objective "
            "(0.5 * wd * ||w||^2), or use Reverse, Truncated or Forward."
        )
    raise ValueError(
        f"{method} differentiates the stationarity of ll_objective, but the LL update rule "
        f"{rule.name!r} adds an L2 weight_decay to every gradient: the run ends at a zero of "
        "grad ll_objective + weight_decay * w, and the hypergradient would be taken for another "
        "problem. Put the penalty in ll_objective (0.5 * wd * ||w||^2) with weight_decay=0, or "
        "use Reverse, Truncated or Forward."
    )


def refuse_fixed_point_map(ll: Any, method: str) -> None:
    """Refuse a :class:`~bilevel.ll.FixedPointMap` LL for a method that evaluates
    ``ll_objective`` as a scalar loss (its value, gradient or Hessian): a fixed-point map's
    ``ll_objective`` is the map itself, which returns the next iterate, not a loss."""
    if getattr(ll, "descends_objective", True):
        return
    raise ValueError(
        f"{method} evaluates ll_objective as a scalar loss (its gradient and curvature), but "
        f"the LL is a fixed-point map ({type(ll).__name__}), whose ll_objective is the map "
        "Phi: it returns the next iterate, not a loss. For a fixed-point LL use Reverse, "
        "Truncated, Forward, MemorySavingReverse or PTT (through the iterations), or "
        "Implicit(method='fixed_point') / Implicit(method='normal_cg') (at the fixed point)."
    )


def refuse_other_dynamics(ll: Any, method: str) -> None:
    """Refuse LL dynamics that a method which takes its own plain gradient steps on
    ``ll_objective`` (and reads only ``ll.lr`` and ``ll.iters``) would silently replace: a
    fixed-point map, and BDA with ``alpha > 0`` (its aggregation of the UL gradient)."""
    refuse_fixed_point_map(ll, method)
    if getattr(ll, "solves_ll_objective", True):
        return
    alpha = getattr(ll, "alpha", None)
    raise ValueError(
        f"{method} takes its own plain gradient steps on ll_objective (with ll.lr and "
        f"ll.iters) and never runs the LL's dynamics, but the LL is {type(ll).__name__}"
        + (f" with alpha={alpha:g}" if isinstance(alpha, float) else "")
        + ": its aggregation of the UL gradient into the LL steps would be silently ignored. "
        f"Use GradientDescent(..., optimizer='sgd') (or BDA with alpha=0) with {method}, or "
        "Reverse, Truncated, Forward or MemorySavingReverse to differentiate through BDA."
    )


def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of two optional gradients (``None`` means no path)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def detached_weights(trajectory: Trajectory) -> tuple[list[torch.Tensor], list[int]]:
    """An LL run's final weights cut from the LL graph, as new leaves, and the indices of the
    trainable ones (which require grad)."""
    weights = [
        w.detach().requires_grad_(t)
        for w, t in zip(trajectory.weights, trajectory.trainable, strict=True)
    ]
    return weights, [i for i, t in enumerate(trajectory.trainable) if t]


@dataclass
class ParameterChanges:
    """How a module's trainable parameters differ from those a method kept at construction:
    ``frozen`` (kept ones that no longer require grad), ``new`` (ones that require grad now
    and were not kept: unfrozen, or put in place of a kept one), ``gone`` (kept ones no
    longer in the module). All empty: only their order changed."""

    frozen: list[torch.Tensor]
    new: list[torch.Tensor]
    gone: int


def parameter_changes(model: nn.Module, kept: list[torch.Tensor]) -> ParameterChanges | None:
    """``None`` when the parameters of ``model`` that require grad are ``kept``, the same
    tensors in the same order (the usual case, in one pass); else what changed."""
    params = parameter_list(model)
    now = list(filter(requires_grad, params))
    if len(now) == len(kept) and all(map(operator.is_, now, kept)):
        return None
    current, known = {id(p) for p in params}, {id(p) for p in kept}
    return ParameterChanges(
        frozen=[p for p in kept if not p.requires_grad],
        new=[p for p in now if id(p) not in known],
        gone=sum(id(p) not in current for p in kept),
    )


def check_ul_parameters(method: Any) -> None:
    """Refuse UL parameters frozen or unfrozen since ``method`` was built: its UL parameters
    are those that required grad then. One unfrozen later would never receive a
    hypergradient (and never move, silently); one frozen later would fail inside autograd."""
    model = method.ul_model
    changes = parameter_changes(model, method.ul_params)
    if changes is None:
        return
    name = type(method).__name__
    described = []
    if changes.frozen:
        frozen = parameter_names(model, changes.frozen)
        described.append(f"UL parameter(s) {frozen} were frozen (requires_grad False)")
    if changes.new and changes.gone:  # new tensors where kept ones were: replaced
        new = parameter_names(model, changes.new)
        described.append(
            f"UL parameter(s) {new} were replaced by new tensors (an assignment such as "
            f"ul_model.{new[0]} = nn.Parameter(...))"
        )
    elif changes.new:
        described.append(f"UL parameter(s) {parameter_names(model, changes.new)} were unfrozen")
    elif changes.gone:
        described.append(
            f"{changes.gone} UL parameter(s) that {name} was built with are no longer in "
            "ul_model (replaced by a tensor that does not require grad, or deleted)"
        )
    if not described:  # only their order changed: the method holds the same tensors
        return
    replaced = " To change a value, assign in place: with torch.no_grad(): p.copy_(value)."
    raise ValueError(
        "; ".join(described)
        + f" after {name} was built: the UL parameter set changed after construction, and "
        f"{name} differentiates (the UL optimizer steps) the parameters that required grad "
        "when it was built. Build the method, the LL optimizer and the UL optimizer again "
        "after changing the model (a BilevelProblem too)." + (replaced if changes.gone else "")
    )


def check_ll_parameters(method: Any, kept: list[torch.Tensor]) -> None:
    """Refuse ``ll_model``'s trainable parameters changed since ``method`` was built, for a
    method that keeps the LL variable across UL steps as those tensors (``kept``): one frozen
    since would go on moving, one unfrozen (or a parameter replaced by a new tensor) would
    never move, and the method would go on stepping, and reading, the tensors it holds."""
    model = method.ll_model
    changes = parameter_changes(model, kept)
    if changes is None:
        return
    described = [
        f"{parameter_names(model, params)} {what}"
        for params, what in (
            (changes.frozen, "frozen (requires_grad False)"),
            (changes.new, "unfrozen or replaced by new tensors"),
        )
        if params
    ]
    if changes.gone:
        described.append(f"{changes.gone} of the parameters it holds no longer in ll_model")
    raise ValueError(
        f"ll_model's trainable parameters changed after {type(method).__name__} was built: "
        + "; ".join(described or ["their order changed"])
        + f". {type(method).__name__} keeps the LL variable (and its own state shaped like "
        "it) across UL steps as the parameters that were trainable then, so it would go on "
        "moving those and leave the others as they are. Build the method (and the "
        "BilevelProblem) again for the new set of LL parameters."
    )


@contextlib.contextmanager
def kept_buffers(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """On exit, put each buffer of ``saved`` (``(buffer, copy)`` pairs) back to its copy."""
    try:
        yield
    finally:
        put_back_buffers(saved)


def put_back_buffers(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each buffer of ``saved`` (``(buffer, copy)`` pairs) back from its copy, in place."""
    with torch.no_grad():
        for buffer, copy in saved:
            buffer.copy_(copy)
