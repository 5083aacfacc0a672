"""One lower-level run: a loop over an explicit step map, and the value it returns.

The step map is ``step_map(weights, opt_state, hyper, state, step, create_graph) ->
(weights, opt_state, loss, direction)`` (``GradientStep``): the LL gradient at ``weights``
(evaluated through the patched model, so that objectives see ``state["ll_model"]`` as usual)
fed to a pure update rule. :class:`Unroll` runs it, with or without a graph per step, and
hands each step to an optional observer (forward-mode tangents live with the UL method that
needs them, in ``bilevel.ul.forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bilevel.ll.hyper import Schedule
from bilevel.ll.patched import fast_weights, install, refuse_broken_weight_norm
from bilevel.ll.rules import UpdateRule
from bilevel.second_derivatives import gradient_to_differentiate, refuse_once_differentiable
from bilevel.state import Objective, check_objective_result, has_none

#: who differentiates the gradient taken at an LL step with a graph
THROUGH_STEPS = (
    "Back-propagation through the LL steps (Reverse, Truncated, Forward, MemorySavingReverse, "
    "PTT; also with learned step sizes)"
)
#: who differentiates the stationarity residual
RESIDUAL = "The implicit function theorem (Implicit)"
#: a run's detached LL losses are stacked into one tensor every this many steps: each 0-d
#: tensor costs about a kilobyte of host memory, and a run without a graph (Implicit,
#: Truncated's first steps) held one per step, 6 MB at 1000 steps (and fragmented the heap)
PACK = 64


def pack(losses: list[torch.Tensor]) -> None:
    """Stack the 0-d losses at the end of ``losses`` (which follow its 1-d packs) into one
    1-d tensor, in place."""
    start = len(losses)
    while start and not losses[start - 1].dim():
        start -= 1
    if start < len(losses):
        losses[start:] = [torch.stack(losses[start:])]


Tensors = list[torch.Tensor]


@dataclass
class Trajectory:
    """What an LL run recorded: the value an LL optimizer hands to the UL method.

    Attributes:
        iters: LL steps taken.
        differentiable_steps: how many of the last steps carry an autograd graph (``iters``:
            all, as ``Reverse`` needs; ``K``: the last K, as ``Truncated`` needs; ``0``: none,
            as ``Implicit`` and ``FirstOrder`` need).
        losses: the LL loss before each step (a detached tensor of length ``iters``).
        trainable: for each fast weight, whether it was optimized (``requires_grad``).
        model: the patched model holding the final fast weights (the auxiliary model).
        weights: the fast weights after the last step (one per LL parameter).
        step_sizes: the LL step size of the last step, one per trainable parameter tensor
            (detached); :attr:`step_size` is their common value.
        observed: what the run's observer returned (forward-mode tangents), or ``None``.
        step_map: the step map of the run (its ``residual`` is what ``Implicit`` solves).
        initial_grads: the LL gradient at the first step (detached), for
            :attr:`initial_grad_norm`.
        last_grads: the LL gradient at the start of the last step (detached).
        plain_sgd: every step was ``w - lr * g`` with constant numbers ``lr``.
        differentiated: a hypergradient was back-propagated through the recorded steps
            (``compute_gradients``), which frees their graph.
        run_by: the LL optimizer that ran it, as a weak reference (``None``: another run),
            which ``compute_gradients`` checks the method against.
    """

    iters: int
    differentiable_steps: int
    losses: torch.Tensor
    trainable: list[bool]
    model: torch.nn.Module
    weights: Tensors
    step_sizes: list[Any] | None = None
    observed: Any = None
    step_map: Any = None
    initial_grads: Tensors | None = None
    last_grads: Tensors | None = None
    plain_sgd: bool = False
    differentiated: bool = False
    run_by: Any = None

    @property
    def initial_grad_norm(self) -> torch.Tensor | None:
        """The norm of the LL gradient at the first step (a 0-d tensor; taken when asked,
        since only ``Implicit`` and ``IGA`` ask)."""
        return _norm(self.initial_grads)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The norm of the LL gradient at the start of the last step (a 0-d tensor)."""
        return _norm(self.last_grads)

    @property
    def step_size(self) -> float | None:
        """The LL step size when it is one number for every parameter and the last steps (the
        default step of the Neumann and fixed-point solvers), else ``None``."""
        values = self.step_sizes
        if not values or any(isinstance(v, torch.Tensor) and v.numel() != 1 for v in values):
            return None
        numbers = torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in values])
        first = float(numbers[0])
        return first if bool((numbers == first).all()) else None


def _norm(grads: Tensors | None) -> torch.Tensor | None:
    """The Euclidean norm of a list of gradients (``None`` for none recorded)."""
    if grads is None:
        return None
    return torch.stack([g.norm() for g in grads]).norm()


class Observer(Protocol):
    """Sees every LL step with its graph: the inputs and outputs of the step map.

    With ``detach_inputs`` each step's graph starts at its inputs (forward mode: tangents
    carry the past); otherwise the steps keep the graph the run was asked for.

    An optional method ``before_step(weights, model)`` is called with the step's input
    weights and the patched model before the step map runs (an observer that must replay the
    step's random draws, or evaluate again from the model's buffers as the step saw them,
    captures the generators or the buffers there).

    Two optional attributes make an observer cheaper to run (both absent: every step is
    observed with its graph, as forward-mode tangents need):

    - ``needs_graph = False``: :meth:`propagate` only reads values (the weights before a
      step), so steps that keep no graph take their gradient without one, and the UL
      parameters are frozen during them as without an observer;
    - ``last_step_only = True``: only the last step of a run matters to it, so in a run of
      known length (``GradientDescent.run``) the earlier steps without a graph are taken in
      place and not shown to it. Steps taken one by one (online methods) are all shown.
    """

    detach_inputs: bool

    def propagate(
        self, weights: Tensors, opt_state: dict, new: Tensors, new_state: dict
    ) -> None: ...

    def result(self) -> Any: ...


def needs_graph(observer: Observer | None) -> bool:
    """Whether ``observer`` needs the graph of every LL step (``False`` without one)."""
    return observer is not None and getattr(observer, "needs_graph", True)


def last_step_only(observer: Observer | None) -> bool:
    """Whether ``observer`` looks at the last LL step of a run only."""
    return observer is not None and getattr(observer, "last_step_only", False)


class GradientStep:
    """The step map of gradient-based LL dynamics, ``w <- rule(w, grad_w f(w, lambda))``.

    Subclasses change the direction (BDA aggregates the UL gradient into it).

    Args:
        objective: the LL objective, ``state -> scalar``.
        rule: the update rule.
        on_first_grads: called with the gradients of the first step (to refuse parameters the
            objective does not use).
    """

    def __init__(
        self, objective: Objective, rule: UpdateRule, on_first_grads: Callable[[tuple], None]
    ) -> None:
        self.objective = objective
        self.rule = rule
        self.on_first_grads = on_first_grads

    #: whether the Jacobian of :meth:`residual` in the weights is symmetric (a Hessian)
    symmetric = True

    def residual(self, weights: Tensors, state: dict) -> list[torch.Tensor | None]:
        """The LL stationarity residual ``g(w, lambda)`` at ``weights`` (installed in the
        model), with its graph: here the gradient of the LL objective (``None`` where a
        weight has no path), whose zero the implicit function theorem differentiates."""
        loss = check_objective_result(self.objective(state), "ll_objective")
        return gradient_to_differentiate(loss, weights, state["ll_model"], RESIDUAL)

    def direction(
        self, weights: Tensors, state: dict, step: int, create_graph: bool
    ) -> tuple[torch.Tensor, Tensors]:
        """The loss and the update direction at ``weights`` (installed in the model). A
        graph through a weight-normalized model is refused by the run, once
        (``Unroll._check_graph``)."""
        loss = check_objective_result(self.objective(state), "ll_objective")
        try:
            grads = torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True)
        except RuntimeError:
            # torch.compile's backward, compiled without a graph by the run's earlier steps
            # ("donated buffers"), refuses one: the refusal that names it and the cures
            if create_graph:
                refuse_once_differentiable(loss, weights, THROUGH_STEPS)
            raise
        if step == 0:
            self.on_first_grads(grads)
        if has_none(grads):  # conditional computation: a weight that this
            # step's loss does not read (it was read at the first step) has a zero gradient
            return loss, [
                torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads, strict=True)
            ]
        return loss, list(grads)

    def __call__(
        self,
        weights: Tensors,
        opt_state: dict,
        hyper: dict[str, list[Any]],
        state: dict,
        step: int,
        create_graph: bool,
    ) -> tuple[Tensors, dict, torch.Tensor, Tensors]:
        """One step: ``(new weights, new optimizer state, loss, direction)``."""
        loss, grads = self.direction(weights, state, step, create_graph)
        new, new_state = self.rule.update(weights, grads, opt_state, hyper, step)
        return new, new_state, loss, grads


class Unroll:
    """An LL run on one task, stepped one LL step at a time.

    Args:
        model: the patched model, holding the starting fast weights.
        step_map: the step map.
        schedule: the hyperparameters of this run.
        state: the state dict the objectives receive (its ``ll_model`` is ``model``).
        trainable: whether each LL parameter is optimized.
        plain_sgd: the rule is SGD with no extra term, so steps with constant float step sizes
            take ``w - lr * g`` directly.
        observer: sees every step with its graph (forward mode), or ``None``.
        in_place: the starting weights are fresh leaves that no graph has seen, so steps
            without a graph may overwrite them (until a step keeps a graph, or an observer
            sees one: :meth:`step` with an observer never overwrites).
        index: the positions of the trainable weights (worked out from ``trainable`` when
            not given).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        step_map: GradientStep,
        schedule: Schedule,
        state: dict,
        trainable: list[bool],
        plain_sgd: bool,
        observer: Observer | None = None,
        in_place: bool = False,
        index: list[int] | None = None,
    ) -> None:
        self.model = model
        self.step_map = step_map
        self.schedule = schedule
        self.state = state
        self.trainable = trainable
        self.index = [i for i, t in enumerate(trainable) if t] if index is None else index
        #: every LL parameter is trainable: the trainable weights are all the weights
        self.all_trainable = len(self.index) == len(trainable)
        self.observer = observer
        #: whether the observer needs the graph of every step (see :class:`Observer`)
        self.observer_graph = needs_graph(observer)
        self.in_place = in_place
        self.plain_lrs = schedule.plain_sgd_lrs() if plain_sgd else None
        #: steps with a graph run in :meth:`run_with_graph`'s loop: plain SGD steps, and an
        #: observer (if any) that neither detaches their inputs nor looks before them
        self.lean_graph_steps = self.plain_lrs is not None and (
            observer is None
            or not (observer.detach_inputs or getattr(observer, "before_step", None) is not None)
        )
        self.opt_state: dict[str, Tensors] = {}
        self.steps = 0
        self.initial_grads: Tensors | None = None
        self.last_grads: Tensors | None = None
        #: whether a step with a graph was checked for once-differentiable Functions
        self.checked_graph = False

    def set_batch(self, data: Any, target: Any) -> None:
        """Use another batch for the next steps (online mode)."""
        self.state["data"], self.state["target"] = data, target

    def _record_grads(self, grads: Tensors, graph: bool = True) -> None:
        """Keep the step's gradients (detached where they may ``graph``): those of the first
        step and of the latest."""
        detached = [g.detach() for g in grads] if graph else grads
        if self.steps == 0:
            self.initial_grads = detached
        self.last_grads = detached

    def step(self, graph: bool) -> torch.Tensor:
        """Take one LL step; keep its graph if ``graph``. Returns the LL loss (detached)."""
        if not graph and self.in_place and self.observer is None:
            return self.run_in_place(1)[0]
        if graph and self.lean_graph_steps:
            return self.run_with_graph(1)[0]
        self.in_place = False
        params = fast_weights(self.model)
        active = params if self.all_trainable else [params[i] for i in self.index]
        observer = self.observer
        if observer is not None:
            if observer.detach_inputs:  # tangents carry the past
                active = [p.detach().requires_grad_() for p in active]
                self.opt_state = {
                    k: [t.detach().requires_grad_() for t in v] for k, v in self.opt_state.items()
                }
                self._install(params, active)
            before = getattr(observer, "before_step", None)
            if before is not None:
                before(active, self.model)
        new, new_state, loss, grads = self._apply(active, graph or self.observer_graph)
        if (graph or self.observer_graph) and not self.checked_graph:
            self._check_graph(loss, active)
        if observer is not None:
            observer.propagate(active, self.opt_state, new, new_state)
        if not graph:
            new = [p.detach().requires_grad_() for p in new]
            if new_state:
                new_state = {k: [t.detach() for t in v] for k, v in new_state.items()}
        self._record_grads(grads, graph or self.observer_graph)  # (detached if with a graph)
        self.opt_state = new_state
        self._install(params, new)
        self.steps += 1
        return loss.detach()

    def _check_graph(self, loss: torch.Tensor, active: Tensors) -> None:
        """At the first step with a graph of a run (callers test ``checked_graph``: the walk
        costs about as much as a small LL step's Python work): refuse a graph through a
        weight-normalized model or a once-differentiable Function, whose second derivatives
        PyTorch gets wrong or leaves out."""
        self.checked_graph = True
        refuse_broken_weight_norm(self.model)
        refuse_once_differentiable(loss, active, THROUGH_STEPS)

    def run_with_graph(self, steps: int) -> list[torch.Tensor]:
        """``steps`` steps that keep their graph; returns the LL loss before each (detached).
        For plain SGD steps (``lean_graph_steps``) one loop carries the trainable
        weights from step to step instead of reading them back from the model, and detaches
        the gradients of the first and the last step only (what :meth:`step` keeps): on the
        small problems of hyperparameter optimization a step's Python work is a tenth of it,
        and costs more between torch's operations than alone. Other steps: :meth:`step`."""
        if not self.lean_graph_steps:
            return [self.step(graph=True) for _ in range(steps)]
        self.in_place = False
        model, state, lrs = self.model, self.state, self.plain_lrs
        direction, index = self.step_map.direction, self.index
        propagate = None if self.observer is None else self.observer.propagate
        params = fast_weights(model)
        active = params if self.all_trainable else [params[i] for i in index]
        losses: list[torch.Tensor] = []
        done: Tensors | None = None  # the gradients of the latest step taken
        try:
            for _ in range(steps):
                loss, grads = direction(active, state, self.steps, True)
                new = [p - lr * g for p, g, lr in zip(active, grads, lrs, strict=True)]
                if not self.checked_graph:
                    self._check_graph(loss, active)
                if propagate is not None:
                    propagate(active, self.opt_state, new, self.opt_state)
                if self.steps == 0:
                    self.initial_grads = [g.detach() for g in grads]
                done = grads
                if self.all_trainable:
                    params = new
                else:
                    for i, w in zip(index, new, strict=True):
                        params[i] = w
                install(model, params)
                active = new
                self.steps += 1
                losses.append(loss.detach())
        finally:
            if done is not None:  # as step() keeps them
                self.last_grads = [g.detach() for g in done]
        return losses

    def _apply(self, active: Tensors, keep: bool) -> tuple[Tensors, dict, torch.Tensor, Tensors]:
        if self.plain_lrs is None:
            hyper = self.schedule.at(self.steps, detach=not keep)
            return self.step_map(active, self.opt_state, hyper, self.state, self.steps, keep)
        loss, grads = self.step_map.direction(active, self.state, self.steps, keep)
        new = [p - lr * g for p, g, lr in zip(active, grads, self.plain_lrs, strict=True)]
        return new, self.opt_state, loss, grads

    def _install(self, params: Tensors, active: Tensors) -> None:
        if self.all_trainable:
            install(self.model, active)
            return
        for i, p in zip(self.index, active, strict=True):
            params[i] = p
        install(self.model, params)

    def run_in_place(self, steps: int) -> Tensors:
        """``steps`` steps without a graph that overwrite the fast weights; returns the loss
        before each of them (detached; earlier ones stacked, see ``pack``). The patched
        model keeps its tensors, so it need not be re-patched, and the updates record no
        graph. Only while ``in_place``."""
        params = fast_weights(self.model)
        active = [params[i] for i in self.index]
        aliases = [w.detach() for w in active]  # the same storage, updated without a graph
        losses = []
        for _ in range(steps):
            if self.plain_lrs is not None:  # w -= lr * g on an alias: no new weight, no graph
                loss, grads = self.step_map.direction(active, self.state, self.steps, False)
                for weight, grad, lr in zip(aliases, grads, self.plain_lrs, strict=True):
                    weight.sub_(lr * grad)  # rounded as the rule's w - lr * g
            else:
                hyper = self.schedule.at(self.steps, detach=True)
                new, state, loss, grads = self.step_map(
                    active, self.opt_state, hyper, self.state, self.steps, False
                )
                with torch.no_grad():
                    for weight, value in zip(active, new, strict=True):
                        weight.copy_(value)
                self.opt_state = {k: [s.detach() for s in v] for k, v in state.items()}
            self._record_grads(grads, graph=False)  # taken without a graph
            losses.append(loss.detach())
            if len(losses) % PACK == 0:
                pack(losses)
            self.steps += 1
        return losses

    def state_dict(self) -> dict[str, Any]:
        """What continues this run bitwise from here, as detached copies of tensors and plain
        values (checkpoints of online runs, taken between steps where no graph is kept): the
        LL step count, the fast weights, the patched model's buffers (batch-norm statistics),
        the update rule's state (momentum, Adam moments) and the observer's state (forward-mode
        tangents), if it has a ``state_dict``."""
        observer = getattr(self.observer, "state_dict", None)
        return {
            "steps": self.steps,
            "weights": [w.detach().clone() for w in fast_weights(self.model)],
            "buffers": {k: b.detach().clone() for k, b in self.model.named_buffers()},
            "opt_state": {k: [t.detach().clone() for t in v] for k, v in self.opt_state.items()},
            "observer": None if observer is None else observer(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (saved by a run of the same models): the next step
        is the one that followed it. Tensors are cast to the dtype and device of the weights
        they replace."""
        restore_model(self.model, state)
        weights = fast_weights(self.model)
        active = [weights[i] for i in self.index]
        self.opt_state = {
            k: [t.to(w, copy=True) for t, w in zip(v, active, strict=True)]
            for k, v in state["opt_state"].items()
        }
        self.steps = int(state["steps"])
        self.in_place = False  # the weights came from elsewhere: never overwritten
        if (state.get("observer") is None) != (getattr(self.observer, "state_dict", None) is None):
            raise ValueError(
                "the saved LL run and this one disagree on carrying an observer's state "
                "(forward-mode tangents): it was saved by a run of another method. Resume with "
                "the method that saved it, or start a new run."
            )
        if state.get("observer") is not None:
            self.observer.load_state_dict(state["observer"])  # type: ignore[union-attr]

    def check_again(self) -> None:
        """Check the next step with a graph for once-differentiable Functions again (online
        runs: once per UL update window, as an offline run is checked once per run), and the
        observer's and step map's own checks (forward mode's, BDA's)."""
        self.checked_graph = False
        for part in (self.observer, self.step_map):
            if hasattr(part, "checked_graph"):
                part.checked_graph = False

    def cut(self) -> None:
        """Cut the graph: continue from detached copies of the current weights and optimizer
        state (online methods, which would otherwise hold every step in memory)."""
        params = [p.detach().requires_grad_(p.requires_grad) for p in fast_weights(self.model)]
        self.in_place = False  # the detached weights share storage with the graph just cut
        self.opt_state = {k: [t.detach() for t in v] for k, v in self.opt_state.items()}
        install(self.model, params)

    def record(self, losses: torch.Tensor, differentiable_steps: int) -> Trajectory:
        """The value this run hands to the UL method (also attached to the patched model as
        its ``trajectory``, for the seed flow ``ul.compute_gradients(..., aux, ...)``).

        Args:
            losses: the LL losses of the steps recorded (their number is ``iters``).
            differentiable_steps: how many of the last of them kept a graph.
        """
        trajectory = Trajectory(
            iters=losses.shape[0],
            differentiable_steps=differentiable_steps,
            losses=losses,
            trainable=self.trainable,
            model=self.model,
            weights=fast_weights(self.model),
            step_sizes=self.schedule.at(max(self.steps - 1, 0), detach=True).get("lr"),
            observed=None if self.observer is None else self.observer.result(),
            step_map=self.step_map,
            initial_grads=self.initial_grads,
            last_grads=self.last_grads,
            plain_sgd=self.plain_lrs is not None,
        )
        self.model.__dict__["trajectory"] = trajectory  # a plain attribute (no __setattr__)
        return trajectory


def restore_model(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Give a patched model the fast weights and buffers of :meth:`Unroll.state_dict` (cast to
    the dtype and device of those they replace, with their ``requires_grad``)."""
    now = fast_weights(model)
    saved = state["weights"]
    if len(saved) != len(now) or any(s.shape != w.shape for s, w in zip(saved, now, strict=False)):
        raise ValueError(
            "the saved LL run's weights do not fit this LL model (other number or shapes of "
            "parameters): it was saved by a run of another model. Resume with the model that "
            "saved it, or start a new run."
        )
    buffers = dict(model.named_buffers())
    if set(buffers) != set(state["buffers"]):
        raise ValueError(
            f"the saved LL run's buffers ({sorted(state['buffers'])}) are not this LL model's "
            f"({sorted(buffers)}): it was saved by a run of another model. Resume with the "
            "model that saved it, or start a new run."
        )
    copies = [
        s.to(w, copy=True).requires_grad_(w.requires_grad) for s, w in zip(saved, now, strict=True)
    ]
    install(model, copies)
    with torch.no_grad():
        for name, buffer in buffers.items():
            buffer.copy_(state["buffers"][name])
