"""Differentiable lower-level gradient descent: a loop over a step map with a pure update rule."""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.ll import hyper as hyperparameters
from bilevel.ll.hyper import PerElement, PerStep, Schedule
from bilevel.ll.patched import (
    ModelChanged,
    evaluate_at,
    fast_weights,
    install,
    parameter_list,
    patch,
    refuse_broken_weight_norm,
    release_weights,
    sync_from,
)
from bilevel.ll.rules import RULES, UpdateRule, make_rule
from bilevel.ll.unroll import (
    PACK,
    GradientStep,
    Observer,
    Trajectory,
    Unroll,
    last_step_only,
    needs_graph,
    pack,
)
from bilevel.roundoff import loss_grew, roundoff_floor
from bilevel.settings import Fixed, Setting, check_count, count_change
from bilevel.state import (
    LowerLevelDivergenceError,
    Objective,
    check_data_matches,
    check_same_device_and_dtype,
    draws_untouched,
    make_state,
    names_without_gradient,
    parameter_names,
    requires_grad,
    trainable_parameters,
)
from bilevel.user_warnings import warn_user

#: ``run``'s default: record as many graph steps as ``differentiable_steps`` says
AS_CONFIGURED: Any = object()
#: why what a run is made of is fixed at construction, and the cure
PLANNED = (
    "the runs' plans (their step map and schedule of hyperparameters) were made from it, "
    "BilevelProblem checked the UL method against it, and checkpoints record it"
)
REBUILD = (
    "To change it, build the LL optimizer again with the new value (a new model, objective, "
    "optimizer= or hyperparameter), and the UL method and BilevelProblem on it."
)


def _check_on_growth(value: Any, name: str) -> str:
    """``"raise"`` (also for ``None``, the default), ``"warn"`` or ``"ignore"``."""
    if value is None:
        return "raise"
    if value not in ("raise", "warn", "ignore"):
        raise ValueError(f"{name} must be 'raise', 'warn' or 'ignore', got {value!r}.")
    return value


def _check_growth_tolerance(value: Any, name: str) -> float:
    """A finite number >= 0, as a float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value >= 0
        or value == float("inf")
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


#: runs up to this many steps read their losses back whole for the checks (cheaper than
#: reducing them on the device first)
SHORT_RUN = 4096


class RunPlan:
    """What every LL run reads from the LL model, worked out once and reused while the model's
    parameters stay the same tensors with the same ``requires_grad`` (checked at every run,
    :meth:`GradientDescent.plan`; any change builds a new plan).

    Attributes:
        params: ``ll_model``'s parameters, in ``parameters()`` order.
        trainable: whether each requires grad.
        index: the positions of the trainable ones.
        reference: the first trainable parameter (the device and dtype data must match).
        plain_sgd: the rule takes ``w - lr * g`` (see ``GradientDescent._plain_sgd``).
        step_map: the plain gradient step map, built once (``None`` for dynamics whose step
            map depends on the run, such as BDA's on the UL batch).
    """

    __slots__ = ("index", "params", "plain_sgd", "reference", "step_map", "trainable")

    def __init__(self, params: list[torch.Tensor], trainable: list[bool], plain_sgd: bool) -> None:
        self.params = params
        self.trainable = trainable
        self.index = [i for i, t in enumerate(trainable) if t]
        self.reference = params[self.index[0]] if self.index else None
        self.plain_sgd = plain_sgd
        self.step_map: GradientStep | None = None

    def matches(self, params: list[torch.Tensor]) -> bool:
        """Whether ``params`` are this plan's tensors, equally trainable."""
        return (
            len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and list(map(requires_grad, params)) == self.trainable
        )


class GradientDescent:
    """Differentiable lower-level optimizer: ``iters`` steps of a pure update rule.

    The steps run on a ``higher``-patched copy of ``ll_model`` whose fast weights start from
    ``ll_model``'s weights; buffers and training flags are copied from ``ll_model`` at every
    run. The update rule is SGD (with ``momentum``), Adam, or any rule of
    :mod:`bilevel.ll.rules` (Nesterov, AdamW, RMSprop, Adagrad). Every hyperparameter (the
    step size included) may be a number, a UL tensor (a leaf that receives a hypergradient),
    a per-step schedule of shape ``(iters,)``, one value per LL parameter tensor (Meta-SGD),
    or a callable ``ul_model -> tensor`` evaluated at every run
    (``lr=lambda ul: ul.log_lr.exp()``).

    How much of the trajectory keeps a graph is set per run (``run(...,
    differentiable_steps=)``, which :class:`bilevel.BilevelProblem` passes from the UL
    method), or by ``differentiable_steps`` for :meth:`optimize`: ``None`` (all steps; needed
    by ``Reverse``), ``K`` (the last K; ``Truncated``) or ``0`` (none: ``Implicit``,
    ``FirstOrder``; memory then does not grow with ``iters``).

    Steps that keep no graph are cheap: they update the fast weights in place, and while they
    run the UL model's parameters have ``requires_grad`` switched off (restored afterwards,
    also on error), so that the LL objective records no graph to them at every step. An LL
    objective therefore must not rely on ``requires_grad`` of the UL parameters.

    A trainable weight must be read by the LL objective at the first step (else it is
    refused: freeze it); one that a later step does not read (conditional computation) has
    a zero gradient there, so a rule with momentum or Adam's moments still moves it, where a
    ``torch.optim`` optimizer would skip a parameter whose ``.grad`` is ``None``.

    References: Maclaurin, Duvenaud & Adams (2015); Franceschi et al. (2017), "Forward and
    Reverse Gradient-Based Hyperparameter Optimization", ICML; Li et al. (2017), "Meta-SGD";
    Grefenstette et al. (2019), ``higher``.

    Args:
        ll_objective: ``state -> scalar`` lower-level loss.
        ll_model: the module whose weights the LL optimizes.
        ul_model: the module holding the UL variables (passed to objectives).
        lr: step size (> 0), in any of the forms above; fixed at construction (``ll.lr``
            cannot be reassigned: give a callable or a schedule to vary it).
        iters: number of steps (>= 1).
        optimizer: a rule name (``"sgd"``, ``"nesterov"``, ``"adam"``, ``"adamw"``,
            ``"rmsprop"``, ``"adagrad"``) or a rule made by :mod:`bilevel.ll.rules`.
        momentum: for a named rule that takes it (SGD's heavy-ball momentum, in [0, 1)).
        betas: for a named Adam-like rule, ``(beta1, beta2)``, each in [0, 1).
        eps: for a named rule that takes it (> 0).
        differentiable_steps: the graph :meth:`optimize` records (see above).
        on_growth: what a run whose LL loss grows does (see below): ``"raise"``
            :class:`~bilevel.ll.LowerLevelDivergenceError` (the default: the run's result
            never reaches the UL, and :class:`bilevel.BilevelProblem` skips the UL step under
            ``on_nonfinite="skip"``), ``"warn"`` (once per optimizer) or ``"ignore"``.
        growth_tolerance: relative growth allowed before a run counts as diverging (>= 0).
        warn_on_growth: deprecated: ``True`` is ``on_growth="warn"``, ``False`` is
            ``on_growth="ignore"``.

    The growth check: with ``first`` and ``last`` the LL loss before the first and before the
    last step, a run of two or more steps diverges when ``last > first + growth_tolerance *
    |first| + 100 eps max(|first|, |last|)`` (``eps`` of the loss's dtype) and its weights
    left round-off of their start (``||w_T - w_0|| > 100 eps max(||w_0||, ||w_T||)``: a run
    that did not move did not diverge, whatever the round-off of its losses). Every term is
    relative, so the decision is the same at any scale of the LL objective (a loss of 1e-20
    near a perfect fit, or one summed over a data set). The batch is fixed during a run, so the
    loss carries no minibatch noise; the default relative tolerance ``1e-3`` is far above
    round-off and below any real divergence, which grows geometrically. An LL objective that
    is noisy by design (dropout, sampling inside the objective) may need a larger
    ``growth_tolerance``. A diverging run raises with the growth, the LL Hessian's largest
    eigenvalue at the start weights (power iteration, on this failure path only) and a
    stable step size. The check costs no host sync beyond the NaN check's one per run.
    """

    #: every step applies the update rule to the gradient of ``ll_objective``, a scalar loss
    #: (``False`` for :class:`~bilevel.ll.FixedPointMap`, whose ``ll_objective`` is the map:
    #: UL methods that evaluate the LL loss or its derivatives refuse it)
    descends_objective = True

    def __init__(
        self,
        ll_objective: Objective,
        ll_model: nn.Module,
        ul_model: nn.Module,
        lr: Any,
        iters: int,
        optimizer: str | UpdateRule = "sgd",
        momentum: Any = None,
        betas: Any = None,
        eps: Any = None,
        differentiable_steps: int | None = None,
        warn_on_growth: bool | None = None,
        on_growth: str | None = None,
        growth_tolerance: float = 1e-3,
    ) -> None:
        if not callable(ll_objective):
            raise TypeError("ll_objective must be callable: state -> scalar tensor.")
        params = trainable_parameters(ll_model, "ll_model")
        trainable_parameters(ul_model, "ul_model")
        check_same_device_and_dtype(ll_model=ll_model, ul_model=ul_model)
        self.ll_objective = ll_objective
        self.ll_model = ll_model
        self.ul_model = ul_model
        self.iters = iters
        self.lr = lr
        self.rule = self._make_rule(optimizer, momentum=momentum, betas=betas, eps=eps)
        self.optimizer = self.rule.name
        given = {"lr": lr, **self.rule.hyper}
        shapes = [p.shape for p in params]
        #: the trainable parameters that per-parameter hyperparameters were given for
        self._hyper_params = list(params)
        bounds = {"lr": hyperparameters.LR_BOUND, **self.rule.bounds}
        self.hyper = {
            name: hyperparameters.check(value, name, bounds[name], iters, shapes)
            for name, value in given.items()
        }
        ul_params = {id(t) for t in ul_model.parameters()}
        for checked in self.hyper.values():
            hyperparameters.check_device(checked, params[0])
            for item in checked.items:
                if isinstance(item, torch.Tensor) and item.requires_grad:
                    if id(item) not in ul_params:
                        raise ValueError(
                            f"{checked.name} is a tensor that requires grad but is not a "
                            "parameter of ul_model: it would receive no hypergradient and "
                            "never move. Make it one (ul_model.log_lr = nn.Parameter(...), "
                            f"then {checked.name}=lambda ul: ul.log_lr.exp()), or pass it "
                            "detached, or as a number."
                        )
        self.differentiable_steps = differentiable_steps
        self._spare: nn.Module | None = None  # a patched model handed back by release()
        self.on_growth = _growth_policy(on_growth, warn_on_growth)
        self.growth_tolerance = growth_tolerance
        self._warned_growth = False

    ll_objective = Fixed(PLANNED, cure=REBUILD)
    ll_model = Fixed(PLANNED, cure=REBUILD)
    ul_model = Fixed(PLANNED, cure=REBUILD)
    rule = Fixed(PLANNED, cure=REBUILD)
    optimizer = Fixed(PLANNED, cure=REBUILD)
    hyper = Fixed(PLANNED, cure=REBUILD)
    lr = Fixed(
        "every run uses the value checked then, and checkpoints record it",
        cure="To change the LL step size across UL steps, give lr as a callable of the UL "
        "model (evaluated at every run) or a per-step schedule, or build a new LL optimizer "
        "(and BilevelProblem).",
    )
    # may be set between runs, checked as at construction
    on_growth = Setting(_check_on_growth)
    growth_tolerance = Setting(_check_growth_tolerance)

    @staticmethod
    def _make_rule(optimizer: str | UpdateRule, **options: Any) -> UpdateRule:
        given = {k: v for k, v in options.items() if v is not None}
        if isinstance(optimizer, UpdateRule):
            if given:
                raise TypeError(
                    f"{sorted(given)} given beside a rule object: set them in the rule, e.g. "
                    f"bilevel.ll.rules.{optimizer.name}(...)."
                )
            return optimizer
        if not isinstance(optimizer, str):
            raise TypeError(
                f"optimizer must be a rule name or a bilevel.ll.rules rule, got {optimizer!r}."
            )
        return make_rule(optimizer, **given)

    def settings(self) -> dict[str, Any]:
        """The update rule's hyperparameters (``lr`` excluded) that differ from the defaults of
        the named rule of :mod:`bilevel.ll.rules`, by name: what a checkpoint must agree on
        besides the rule's name, ``lr`` and ``iters``. A default is left out, so that
        checkpoints written before these settings were recorded still resume; a rule object
        whose update is not its named rule's records all its hyperparameters."""
        factory = RULES.get(self.rule.name)
        defaults = factory() if factory is not None else None
        if defaults is None or defaults.update is not self.rule.update:
            return dict(self.rule.hyper)
        return {
            name: value
            for name, value in self.rule.hyper.items()
            if not (isinstance(value, float) and value == defaults.hyper.get(name))
        }

    def _plain_sgd(self) -> bool:
        """SGD with no momentum and no weight decay: steps then take ``w - lr * g`` directly."""
        terms = [self.hyper[name] for name in ("momentum", "weight_decay") if name in self.hyper]
        return self.rule.name == "sgd" and all(
            isinstance(v, float) and v == 0.0 for h in terms for v in h.items
        )

    @property
    def iters(self) -> int:
        """LL steps per run; may be set between runs, checked as at construction."""
        return self._iters

    @iters.setter
    def iters(self, value: int) -> None:
        check_count(value, "iters")
        scheduled = [
            name
            for name, h in self.__dict__.get("hyper", {}).items()
            if hyperparameters.SCHEDULE in h.kinds
        ]
        if scheduled and value != self._iters:
            raise ValueError(
                f"{', '.join(scheduled)} is a per-step schedule of {self._iters} steps, so iters "
                f"cannot become {value}: build a new GradientDescent with a schedule of {value} "
                "steps (and a new BilevelProblem)."
            )
        if value != self.__dict__.get("_iters", value):  # a change after construction
            count_change(self)
        self._iters = value

    @property
    def differentiable_steps(self) -> int | None:
        """Steps at the end of the trajectory that keep a graph in :meth:`optimize` (``None``:
        all)."""
        return self._differentiable_steps

    @differentiable_steps.setter
    def differentiable_steps(self, value: int | None) -> None:
        value = _check_steps(value)
        if value != self.__dict__.get("_differentiable_steps", value):
            count_change(self)
        self._differentiable_steps = value

    def schedule(self, plan: RunPlan | None = None) -> Schedule:
        """The hyperparameters of a run: callables evaluated now, on the UL model; one value
        per parameter trainable in ``plan`` (by default :meth:`plan`), matched to its
        parameter by identity.

        When every hyperparameter is a plain number the schedule is the same at every run: it
        is built once per plan (per set of trainable parameters) and reused.
        """
        plan = self.plan() if plan is None else plan
        cached = self.__dict__.get("_constant_schedule")
        if cached is not None and cached[0] is plan:
            return cached[1]
        now = [plan.params[i] for i in plan.index]
        order = self._per_parameter_order(now)
        values = {}
        for name, h in self.hyper.items():
            items = h.resolve(self.ul_model, self._iters, plan.reference)
            values[name] = (
                [items[j] for j in order] if h.per_parameter else items,
                h.per_parameter,
            )
        schedule = Schedule(values, len(now))
        if all(isinstance(v, float) for h in self.hyper.values() for v in h.items):
            self._constant_schedule = (plan, schedule)  # numbers only: nothing to evaluate per run
        return schedule

    def _per_parameter_order(self, now: list[torch.Tensor]) -> list[int]:
        """For each parameter trainable now, the index of its per-parameter hyperparameter
        values (given for the parameters trainable at construction)."""
        position = {id(p): i for i, p in enumerate(self._hyper_params)}
        missing = [p for p in now if id(p) not in position]
        if missing and any(h.per_parameter for h in self.hyper.values()):
            names = parameter_names(self.ll_model, missing)
            raise ValueError(
                f"ll_model parameter(s) {names} became trainable after the LL optimizer was "
                "built, and its per-parameter hyperparameters (lr, ...) have no value for "
                "them: build the LL optimizer again, with one value per trainable parameter."
            )
        return [position.get(id(p), 0) for p in now]

    def plan(self) -> RunPlan:
        """The ``RunPlan`` of the next run: the last one while ``ll_model``'s parameters
        are the same tensors, equally trainable; a new one otherwise."""
        params = parameter_list(self.ll_model)
        plan = self.__dict__.get("_run_plan")
        if plan is None or not plan.matches(params):
            trainable = [p.requires_grad for p in params]
            if not any(trainable):  # the construction checked; all frozen since
                trainable_parameters(self.ll_model, "ll_model")  # raises, saying so
            plan = RunPlan(params, trainable, self._plain_sgd())
            self._run_plan = plan
            self._spare = None  # other parameter tensors (tied otherwise?): a new patched copy
        return plan

    def patched_model(
        self,
        graph_from_start: bool,
        params: Sequence[torch.Tensor] | None = None,
        copy: bool = True,
    ) -> nn.Module:
        """A ``higher``-patched copy of ``ll_model`` with fast weights at its weights, and its
        buffers and training flags.

        With ``graph_from_start`` the fast weights keep a graph to ``ll_model``'s weights (so
        that they can be UL variables, as in MAML); otherwise they are detached copies.
        Patching creates new classes and costs milliseconds, so a model handed back with
        :meth:`release` is reused. ``params``: ``ll_model``'s parameters, when the caller has
        them at hand. ``copy=False`` (without ``graph_from_start``): the fast weights are
        detached aliases of the weights, for runs that never overwrite them in place.
        """
        model, self._spare = self._spare, None
        if model is not None:
            try:
                sync_from(self.ll_model, model)
            except ModelChanged:  # the user's module changed its structure: patch it again
                model = None
        if model is None:
            model = patch(self.ll_model)
            sync_from(self.ll_model, model)
        if params is None:
            params = list(self.ll_model.parameters())
        if graph_from_start:
            weights = [p.clone() for p in params]
        elif copy:
            weights = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
        else:
            weights = [p.detach().requires_grad_(p.requires_grad) for p in params]
        install(model, weights)
        return model

    def release(self, auxiliary_model: nn.Module) -> None:
        """Hand back an auxiliary model that is no longer needed.

        Its weights and graph are freed at once, and the next :meth:`optimize` reuses it
        instead of patching ``ll_model`` again. Using it afterwards raises an error.
        """
        # plain attributes, set in the instance dict (past the patched module's __setattr__)
        auxiliary_model.__dict__["_fast_params"] = None  # higher's list of the fast weights
        auxiliary_model.__dict__["trajectory"] = None
        release_weights(auxiliary_model)  # the slots held the last weights, and their graph
        self._spare = auxiliary_model

    def step_map(self, model: nn.Module, ul_batch: tuple[Any, Any] | None) -> GradientStep:
        """The map ``(weights, opt_state, hyper, state) -> (weights, opt_state, loss)`` of a
        run on the patched ``model``. Plain gradient descent does not look at the UL batch;
        dynamics that do (BDA) override this."""
        index = self.plan().index
        return GradientStep(self.ll_objective, self.rule, lambda g: self.check_used(g, index))

    def start(
        self,
        data: Any,
        target: Any,
        graph_from_start: bool = False,
        observer: Observer | None = None,
        ul_batch: tuple[Any, Any] | None = None,
        copy: bool = True,
    ) -> Unroll:
        """Begin an LL run on ``(data, target)``, to be stepped by hand (online methods).

        ``copy=False``: the run starts from aliases of the weights and takes no step in place
        (for runs whose steps all keep a graph or are shown to an observer, on a model whose
        forward does not edit its weights in place: it would edit ``ll_model``'s; :meth:`run`
        always copies)."""
        plan = self.plan()
        check_data_matches(data, plan.reference, "data")
        check_data_matches(target, plan.reference, "target")
        # before any freezing: callables see live UL parameters
        schedule = self.schedule(plan)
        model = self.patched_model(graph_from_start, plan.params, copy)
        if type(self).step_map is GradientDescent.step_map:  # the same map at every run
            if plan.step_map is None:
                plan.step_map = self.step_map(model, ul_batch)
            step_map = plan.step_map
        else:
            step_map = self.step_map(model, ul_batch)
        return Unroll(
            model,
            step_map,
            schedule,
            make_state(data, target, self.ul_model, model),
            plan.trainable,
            plain_sgd=plan.plain_sgd,
            observer=observer,
            in_place=not graph_from_start and copy,
            index=plan.index,
        )

    def run(
        self,
        data: Any,
        target: Any,
        differentiable_steps: int | None = AS_CONFIGURED,
        observer: Observer | None = None,
        ul_batch: tuple[Any, Any] | None = None,
    ) -> Trajectory:
        """Run the LL steps on ``(data, target)`` and return what they recorded.

        Args:
            data: LL batch inputs.
            target: LL batch targets.
            differentiable_steps: steps at the end that keep a graph (``None``: all); by
                default the optimizer's ``differentiable_steps``.
            observer: sees every step with its graph (forward-mode tangents).
            ul_batch: the UL batch ``(data, target)``, for LL dynamics that look at the UL
                objective (BDA); plain gradient descent ignores it.

        Returns:
            The :class:`Trajectory`; the patched model holding the final fast weights is
            ``trajectory``'s auxiliary model, :meth:`optimize`'s return value.

        Raises:
            FloatingPointError: the LL loss became NaN or inf (the message names the step).
        """
        steps = self.differentiable_steps
        if differentiable_steps is not AS_CONFIGURED:
            steps = _check_steps(differentiable_steps)
        iters = self._iters
        tracked = iters if steps is None else min(steps, iters)
        untracked = iters - tracked
        shown = 0 if observer is None else untracked  # steps without a graph it sees
        if last_step_only(observer):  # the last step: one of these, or a graph step
            shown = 1 if tracked == 0 else 0
        # steps that no observer sees overwrite the weights in place; the run starts from a
        # copy whatever it does (a forward may edit its weights in place, as a max-norm
        # constraint does: from aliases, Forward's runs edited the user's ll_model)
        overwritten = untracked - shown
        unroll = self.start(data, target, tracked == iters, observer, ul_batch)
        recorded: list[torch.Tensor] = []  # the LL loss before each step (detached)
        with self._ul_frozen(untracked > 0 and not needs_graph(observer)):
            if unroll.in_place and overwritten:
                recorded = unroll.run_in_place(overwritten)
            for _ in range(unroll.steps, untracked):
                recorded.append(unroll.step(graph=False))
                if len(recorded) % PACK == 0:
                    pack(recorded)
        recorded += unroll.run_with_graph(iters - untracked)
        if len(recorded) > 1:  # 1-d packs of the earlier losses, then the last ones
            pack(recorded)
        losses = recorded[0].reshape(-1) if len(recorded) == 1 else torch.cat(recorded)
        self._check_losses(losses, unroll)
        trajectory = unroll.record(losses, tracked)
        trajectory.run_by = weakref.ref(self)  # (compute_gradients checks the method against it)
        return trajectory

    def optimize(self, data: Any, target: Any) -> nn.Module:
        """Run the LL steps on ``(data, target)`` and return the auxiliary model.

        The auxiliary model is the patched module after the last step; its
        ``trajectory`` attribute (a :class:`Trajectory`) says what was recorded.

        Raises:
            FloatingPointError: the LL loss became NaN or inf (the message names the step).
        """
        return self.run(data, target).model

    def _ul_frozen(self, freeze: bool) -> contextlib.AbstractContextManager[None]:
        """Turn ``requires_grad`` off on the UL model's parameters while LL steps run without a
        graph, so that the LL objective records no autograd graph to them at every step; they
        are restored on exit, also on error."""
        return _Frozen(list(filter(requires_grad, parameter_list(self.ul_model))) if freeze else [])

    def check_used(self, grads: Sequence[torch.Tensor | None], index: Sequence[int]) -> None:
        """Raise if ``ll_objective`` gave no gradient to a trainable LL parameter.

        ``grads`` are those of the parameters at positions ``index`` of ``ll_model``.
        """
        names = names_without_gradient(self.ll_model, grads, index)
        if not names:
            return
        ul_params = set(map(id, self.ul_model.parameters()))
        named = self.ll_model.named_parameters()
        shared = [n for n, t in named if n in names and id(t) in ul_params]
        holds_ul = any(m is self.ul_model for m in self.ll_model.modules())
        if shared and holds_ul and self.ll_model is not self.ul_model:
            raise ValueError(
                f"ll_model holds parameters of ul_model ({shared}), which the LL would "
                "optimize as LL weights, and ll_objective reads them from state['ul_model']: "
                "keep the UL model out of the LL model (do not register it as a submodule of "
                "ll_model; objectives reach it as state['ul_model'])."
            )
        raise ValueError(
            f"ll_objective does not depend on ll_model parameter(s) {names}: they would "
            "never move. Use them in ll_objective or freeze them with requires_grad_(False)."
        )

    def _check_losses(self, losses: torch.Tensor, unroll: Unroll | None = None) -> None:
        """Raise if the LL loss of a run became NaN or inf, or grew (``on_growth``): one host
        sync per run. ``unroll`` (the run) lets a diverging run measure the curvature at its
        start weights for the message."""
        count = losses.shape[0]
        if count <= SHORT_RUN:  # the values themselves: one transfer, few small ops
            values = losses.tolist()
            total, first, last = sum(values), values[0], values[-1]
        else:
            total, first, last = torch.stack([losses.sum(), losses[0], losses[-1]]).tolist()
        if not math.isfinite(total) and not bool(torch.isfinite(losses).all()):
            bad = int(torch.nonzero(~torch.isfinite(losses))[0])
            raise FloatingPointError(
                f"The LL loss became {losses[bad].item()} at LL step {bad} of {self.iters} "
                f"({self._run_settings(rule=False)}). {self._nonfinite_advice()}"
            )
        if self._on_growth == "ignore" or count < 2:
            return
        if not loss_grew(first, last, self._growth_tolerance, losses.dtype):
            return
        if unroll is not None and not self._moved(unroll):
            return  # weights at round-off of their start: the losses' changes are noise
        if self._on_growth == "warn" and self._warned_growth:
            return  # once per optimizer
        lambda_max, safe_lr, advice = self._stable_step(unroll)
        ratio = f" (x{last / first:.3g})" if first > 0 else ""
        message = (
            f"The LL loss grew from {first:.4g} to {last:.4g}{ratio} over {len(losses)} LL steps "
            f"({self._run_settings(rule=True)}), beyond the tolerance "
            f"last <= first + {self._growth_tolerance:g}*|first|: the LL is diverging. {advice}"
        )
        if self._on_growth == "warn":
            self._warned_growth = True
            warn_user(message, RuntimeWarning)
            return
        raise LowerLevelDivergenceError(
            message + " Its result is not used (on_growth='warn' or 'ignore' would let it "
            "through).",
            first=first,
            last=last,
            iters=len(losses),
            lambda_max=lambda_max,
            safe_lr=safe_lr,
        )

    def _moved(self, unroll: Unroll) -> bool:
        """Whether the run's trainable weights left round-off of their start (``ll_model``'s),
        ``||w_T - w_0|| > ROUNDOFF * eps * max(||w_0||, ||w_T||)``; on the growth path only. A
        run that did not move has not diverged, whatever its losses say: where they are
        differences of terms that cancel (a perfect fit, ``||y||`` of 1e8 with residuals at
        round-off; a fixed point's ``||Phi(w) - w||^2``) their round-off is far above
        ``eps`` times their value, and its result is its start, to round-off. The weights are
        divided by their largest entry first: a diverging run's last weights (1e155 in
        float64, 1e20 in float32) overflow a sum of squares, and ``inf > inf`` would have
        called the run still; weights that became inf or NaN moved."""
        params = list(self.ll_model.parameters())
        end = fast_weights(unroll.model)
        start = [params[i].detach() for i in unroll.index if params[i].numel()]
        end = [end[i].detach() for i in unroll.index if params[i].numel()]
        if not start:
            return False  # (no entries to move)
        top = torch.stack([t.abs().max() for t in (*start, *end)]).max()
        if not torch.isfinite(top):
            return True
        if not top > 0:
            return False  # zeros at the start and the end
        start, end = [t / top for t in start], [t / top for t in end]
        apart = linalg.norm([b - a for a, b in zip(start, end, strict=True)])
        size = torch.maximum(linalg.norm(start), linalg.norm(end))
        return bool(apart > roundoff_floor(size))

    def _run_settings(self, rule: bool) -> str:
        """The settings a failed run's message quotes: the step size (and the rule)."""
        settings = f"lr={self._describe(self.lr)}"
        return f"{settings}, rule {self.rule.name}" if rule else settings

    def _nonfinite_advice(self) -> str:
        """The cure a run whose LL loss became NaN or inf is told."""
        return (
            "Lower the LL learning rate, or check the data and the objective for NaN, log(0) "
            "or division by zero."
        )

    def _stable_step(self, unroll: Unroll | None) -> tuple[float | None, float | None, str]:
        """The LL Hessian's largest eigenvalue at the run's start weights (power iteration over
        products with the Jacobian of the step map's direction, which is the Hessian of
        ``ll_objective`` for gradient descent; on this failure path only), a step size that
        plain gradient descent is stable with, and advice in words."""
        halve = (
            "Halve the LL learning rate until the LL loss decreases over the run (the stable "
            f"step of the {self.rule.name} rule also depends on its other settings)."
        )
        if unroll is None:
            return None, None, "Lower the LL learning rate: halve it until the loss decreases."
        iters = 20
        try:
            start = [
                p.detach().clone().requires_grad_(p.requires_grad)
                for p in self.ll_model.parameters()
            ]
            active = [start[i] for i in unroll.index]
            # a message must not change the run: the evaluation's random draws (dropout,
            # noise) leave the global RNG where it was
            untouched = draws_untouched(start[0].device)
            refuse_broken_weight_norm(unroll.model)  # (its curvature would be wrong)
            with untouched, torch.enable_grad(), evaluate_at(unroll.model, start):
                # the step map's direction (the LL gradient for gradient descent; a later
                # step's index, so that no first-step hook runs again)
                _, grads = unroll.step_map.direction(active, unroll.state, unroll.steps, True)
                linked = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]

                def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
                    if not linked:
                        return [torch.zeros_like(w) for w in active]
                    out = torch.autograd.grad(
                        [g for g, _ in linked],
                        active,
                        grad_outputs=[v[i] for _, i in linked],
                        retain_graph=True,
                        allow_unused=True,
                    )
                    return [
                        torch.zeros_like(w) if h is None else h
                        for w, h in zip(active, out, strict=True)
                    ]

                lambda_max = float(linalg.power_iteration(hvp, active, iters))
        except Exception as error:  # only a message is at stake: never hide the divergence
            return None, None, f"{halve} (The curvature could not be measured: {error}.)"
        measured = (
            f"The LL Hessian's largest eigenvalue at the start weights is at least about "
            f"{lambda_max:.4g} ({iters} power iterations, which approach it from below; local "
            "for a non-quadratic LL)"
        )
        if not lambda_max > 0 or not math.isfinite(lambda_max):
            return lambda_max, None, f"{measured}, with no positive curvature: {halve}"
        if not self._plain_sgd():
            return lambda_max, None, f"{measured}. {halve}"
        safe = 1.0 / lambda_max
        lr = self.lr if isinstance(self.lr, float) else None
        low = (
            f" (the lr that diverged, {lr:.3g}, is below that bound: the estimate is low, or "
            "the curvature grew along the run)"
            if lr is not None and lr < 2 * safe
            else ""
        )
        return (
            lambda_max,
            safe,
            f"{measured}, so gradient descent is stable only for lr < 2/lambda_max = "
            f"{2 * safe:.3g}{low}: use lr={safe:.3g} (1/lambda_max) or less.",
        )

    @property
    def warn_on_growth(self) -> bool:
        """Deprecated: whether ``on_growth`` is not ``"ignore"``."""
        return self._on_growth != "ignore"

    @warn_on_growth.setter
    def warn_on_growth(self, value: bool) -> None:
        self.on_growth = _growth_policy(None, value)

    @staticmethod
    def _describe(value: Any) -> str:
        if isinstance(value, PerElement | PerStep):
            return f"{type(value).__name__}({GradientDescent._describe(value.value)})"
        if isinstance(value, torch.Tensor):
            return str(value.detach().cpu().tolist())
        if callable(value):
            return "a callable of the UL model"
        if isinstance(value, list):
            return "[" + ", ".join(GradientDescent._describe(v) for v in value) + "]"
        return f"{value:g}"


class _Frozen:
    """The context of :meth:`GradientDescent._ul_frozen` (a class: it is entered at every LL
    run, and a generator-based context manager costs twice as much)."""

    __slots__ = ("params",)

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p in self.params:
            p.requires_grad_(True)


def _check_steps(value: int | None) -> int | None:
    if value is None or (type(value) is int and value >= 0):  # the usual case, in one test
        return value
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"differentiable_steps must be an int or None, got {value!r}.")
    if value is not None and value < 0:
        raise ValueError(f"differentiable_steps must be >= 0 or None, got {value}.")
    return value


def _growth_policy(on_growth: str | None, warn_on_growth: bool | None) -> str | None:
    """``on_growth`` from the arguments, with the deprecated ``warn_on_growth`` mapped onto it
    (checked by the setting, :func:`_check_on_growth`)."""
    if warn_on_growth is not None:
        if not isinstance(warn_on_growth, bool):
            raise TypeError(f"warn_on_growth must be a bool, got {warn_on_growth!r}.")
        mapped = "warn" if warn_on_growth else "ignore"
        if on_growth is not None and on_growth != mapped:
            raise TypeError(
                f"warn_on_growth={warn_on_growth} contradicts on_growth={on_growth!r}: give "
                "on_growth only (warn_on_growth is deprecated)."
            )
        warn_user(
            f"warn_on_growth is deprecated: use on_growth={mapped!r}. The default, "
            "on_growth='raise', refuses a diverging LL run (the UL step is skipped under "
            "BilevelProblem(on_nonfinite='skip')).",
            DeprecationWarning,
        )
        on_growth = mapped
    return on_growth
