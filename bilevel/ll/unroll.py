"""One lower-level optimization in progress, stepped one LL step at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bilevel.state import check_objective_result, make_state

if TYPE_CHECKING:
    from bilevel.ll.gradient_descent import GradientDescent

Tensors = list[torch.Tensor]


@dataclass
class Trajectory:
    """What an LL run recorded (:meth:`GradientDescent.optimize`, or a stretch of an online run).

    Attributes:
        iters: LL steps taken.
        differentiable_steps: how many of the last steps carry an autograd graph (``iters``:
            all, as ``Reverse`` needs; ``K``: the last K, as ``Truncated`` needs; ``0``: none,
            as ``Implicit`` and ``FirstOrder`` need).
        losses: the LL loss before each step (a detached tensor of length ``iters``).
        trainable: for each fast weight, whether it was optimized (``requires_grad``).
        tangents: in forward mode, ``d w_T / d lambda`` for each trainable fast weight, with a
            leading dimension over the scalars of ``tangent_variables``.
        tangent_variables: the UL tensors of the tangents.
        tangents_reached: for each of them, whether it has any path to the LL weights.
        initial_grads: the LL gradient at the first step (detached), for
            :attr:`initial_grad_norm`.
    """

    iters: int
    differentiable_steps: int
    losses: torch.Tensor
    trainable: list[bool]
    tangents: list[torch.Tensor] | None = None
    tangent_variables: list[torch.Tensor] | None = None
    tangents_reached: list[bool] | None = None
    initial_grads: list[torch.Tensor] | None = None

    @property
    def initial_grad_norm(self) -> torch.Tensor | None:
        """The norm of the LL gradient at the first step (a 0-d tensor; taken when asked,
        since only ``Implicit`` asks)."""
        if self.initial_grads is None:
            return None
        return torch.stack([g.norm() for g in self.initial_grads]).norm()


def _parameter_slots(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """Where a patched model's fast weights live, ``(submodule, name)``, in the order of
    ``higher``'s expanded parameter list (a module's own, then its children's)."""
    slots = [(module, name) for name in module._param_names]
    for child in module._modules.values():
        if child is not None:
            slots += _parameter_slots(child)
    return slots


def install(model: torch.nn.Module, params: Tensors) -> None:
    """Give a patched model the fast weights ``params``: what ``higher``'s ``update_params``
    does, without its per-call walk over the modules (this runs at every LL step that keeps a
    graph), and without its history of the weights of every earlier step (kept when it tracks
    higher-order gradients): the autograd graph keeps what a hypergradient needs, and holding
    the history measured 10-23% slower per step. The model holds the latest weights only."""
    slots = model.__dict__.get("_bilevel_slots")
    if slots is None:  # (submodule, name, index into params), once per model
        mapping = model._param_mapping  # a shared weight fills several slots
        places = zip(_parameter_slots(model), mapping, strict=True)
        slots = [(m, name, i) for (m, name), i in places]
        model._bilevel_slots = slots
    model.__dict__["_fast_params"] = [list(params)]  # what higher's fast_params reads
    for module, name, index in slots:
        module._parameters[name] = params[index]


def _flatten(state: dict[str, Tensors]) -> Tensors:
    return [t for key in sorted(state) for t in state[key]]


def _unflatten(flat: Tensors, like: dict[str, Tensors]) -> dict[str, Tensors]:
    out, i = {}, 0
    for key in sorted(like):
        out[key] = flat[i : i + len(like[key])]
        i += len(like[key])
    return out


class Unroll:
    """A lower-level run on one task: the ``higher``-patched model holding the fast weights,
    the optimizer state, the step counter and, in forward mode, the tangents.

    In forward mode (``tangent_variables`` given) each step also carries
    ``Z = d(state)/d(lambda)`` for every scalar of the variables, ``Z_{t+1} = A_t Z_t + B_t``,
    with ``A_t Z`` and ``B_t`` taken as Jacobian-vector products of the step map through a
    double vector-Jacobian product, batched over the scalars. Only one step's graph lives at a
    time, so memory does not grow with the number of steps.

    Reference: Franceschi, Donini, Frasconi & Pontil (2017), "Forward and Reverse
    Gradient-Based Hyperparameter Optimization", ICML (forward mode, RTHO).
    """

    def __init__(
        self,
        optimizer: GradientDescent,
        data: Any,
        target: Any,
        graph_from_start: bool,
        tangent_variables: Tensors | None = None,
    ) -> None:
        self.optimizer = optimizer
        ll_model = optimizer.ll_model
        self.model = optimizer.patched_model(graph_from_start)
        self.trainable = [p.requires_grad for p in ll_model.parameters()]
        self.index = [i for i, t in enumerate(self.trainable) if t]
        self.opt_state: dict[str, Tensors] = {}
        self.steps = 0
        # the fast weights are fresh leaves that no graph has seen: steps without a graph may
        # update them in place (no new tensors, no re-patching) until a step keeps a graph
        self.in_place = not graph_from_start and tangent_variables is None
        self._hyper = optimizer.constant_hyper(len(self.index))
        self.plain_lrs = self._plain_sgd_lrs()  # steps then skip the rule's generality
        self.state = make_state(data, target, optimizer.ul_model, self.model)
        self.variables = tangent_variables
        if tangent_variables is not None:
            self._init_tangents(ll_model, tangent_variables)

    def cut(self) -> None:
        """Cut the graph: continue from detached copies of the current weights and optimizer
        state (online methods, which would otherwise hold every step in memory)."""
        params = [p.detach().requires_grad_(p.requires_grad) for p in self.model.fast_params]
        self.in_place = False  # the detached weights share storage with the graph just cut
        self.opt_state = {k: [t.detach() for t in v] for k, v in self.opt_state.items()}
        install(self.model, params)

    def record(self, losses: torch.Tensor, differentiable_steps: int) -> torch.nn.Module:
        """Attach what this run recorded to its model, as the auxiliary model's
        ``trajectory``, and return the model.

        Args:
            losses: the LL losses of the steps recorded (their number is ``iters``).
            differentiable_steps: how many of the last of them kept a graph.
        """
        forward = self.variables is not None
        self.model.trajectory = Trajectory(
            iters=len(losses),
            differentiable_steps=differentiable_steps,
            losses=losses,
            trainable=self.trainable,
            tangents=self.tangents if forward else None,
            tangent_variables=self.variables,
            tangents_reached=self.reached if forward else None,
            initial_grads=self.initial_grads,
        )
        return self.model

    def set_batch(self, data: Any, target: Any) -> None:
        """Use another batch for the next steps (online mode)."""
        self.state["data"], self.state["target"] = data, target

    def _init_tangents(self, ll_model: torch.nn.Module, variables: Tensors) -> None:
        sizes = [v.numel() for v in variables]
        self.n = sum(sizes)
        self.identity: Tensors = []
        offset = 0
        for v, size in zip(variables, sizes, strict=True):
            eye = torch.zeros(self.n, size, dtype=v.dtype, device=v.device)
            eye[offset : offset + size] = torch.eye(size, dtype=v.dtype, device=v.device)
            self.identity.append(eye.reshape(self.n, *v.shape))
            offset += size
        which = {id(v): k for k, v in enumerate(variables)}
        params = list(ll_model.parameters())
        self.tangents = [  # the LL's initial weights may themselves be variables (MAML)
            self.identity[which[id(params[i])]].clone()
            if id(params[i]) in which
            else params[i].new_zeros(self.n, *params[i].shape)
            for i in self.index
        ]
        self.state_tangents: dict[str, Tensors] = {}
        # whether a variable has a path to the LL state yet: as an initial weight, from the start
        self.reached = [any(p is v for p in params) for v in variables]

    def hyper(self, detach: bool) -> dict[str, list[Any]]:
        """The hyperparameters of the current step (computed once per run when constant)."""
        if self._hyper is not None:
            return self._hyper[detach]
        return self.optimizer.hyper_at(self.steps, detach, len(self.index))

    def step(self, graph: bool) -> torch.Tensor:
        """Take one LL step; keep its graph if ``graph``. Returns the LL loss (detached)."""
        if not graph and self.in_place:
            return self._step_in_place()
        self.in_place = False
        gd = self.optimizer
        forward = self.variables is not None
        params = list(self.model.fast_params)
        active = [params[i] for i in self.index]
        if forward:
            active = [p.detach().requires_grad_() for p in active]
            self.opt_state = {
                k: [t.detach().requires_grad_() for t in v] for k, v in self.opt_state.items()
            }
            for i, p in zip(self.index, active, strict=True):
                params[i] = p
            install(self.model, params)
        loss = check_objective_result(gd.ll_objective(self.state), "ll_objective")
        keep = graph or forward
        grads = self._grads(loss, active, create_graph=keep)
        new, new_state = self._update(active, grads, detach=not keep)
        if forward:
            self._propagate(active, new, new_state)
        if not graph:
            new = [p.detach().requires_grad_() for p in new]
            new_state = {k: [t.detach() for t in v] for k, v in new_state.items()}
        self.opt_state = new_state
        for i, p in zip(self.index, new, strict=True):
            params[i] = p
        install(self.model, params)
        self.steps += 1
        return loss.detach()

    def _grads(self, loss: torch.Tensor, active: Tensors, create_graph: bool) -> Tensors:
        grads = torch.autograd.grad(loss, active, create_graph=create_graph, allow_unused=True)
        if self.steps == 0:
            self.optimizer.check_used(grads, self.index)
            self.initial_grads = [g.detach() for g in grads]
        return list(grads)

    def _step_in_place(self) -> torch.Tensor:
        """One step of :meth:`run_in_place` (online runners step one at a time)."""
        loss = self.model.fast_params[self.index[0]].new_empty(1)
        self.run_in_place(1, loss)
        return loss[0]

    def run_in_place(self, steps: int, losses: torch.Tensor) -> None:
        """``steps`` steps without a graph that overwrite the fast weights; the loss before
        step ``t`` of the run goes to ``losses[t]``. The patched model keeps its tensors, so it
        need not be re-patched, and the updates record no graph. Only while ``in_place``."""
        objective, state, plain_lrs = self.optimizer.ll_objective, self.state, self.plain_lrs
        active = [self.model.fast_params[i] for i in self.index]
        for t in range(steps):
            loss = check_objective_result(objective(state), "ll_objective")
            grads = self._grads(loss, active, create_graph=False)
            if plain_lrs is not None:  # w -= lr * g on an alias: no new weight, no graph
                for weight, grad, lr in zip(active, grads, plain_lrs, strict=True):
                    weight.detach().sub_(lr * grad)  # rounded as the rule's w - lr * g
            else:
                with torch.no_grad():
                    new, self.opt_state = self._update(active, grads, detach=True)
                    for weight, value in zip(active, new, strict=True):
                        weight.copy_(value)
            losses[t] = loss.detach()
            self.steps += 1

    def _update(self, active: Tensors, grads: Tensors, detach: bool) -> tuple[Tensors, dict]:
        """The update rule's new weights and state (plain SGD with float steps: directly)."""
        if self.plain_lrs is not None:
            new = [p - lr * g for p, g, lr in zip(active, grads, self.plain_lrs, strict=True)]
            return new, self.opt_state
        rule = self.optimizer.rule
        return rule(active, grads, self.opt_state, self.hyper(detach), self.steps)

    def _plain_sgd_lrs(self) -> list[float] | None:
        """The step sizes, when the rule is plain SGD with constant float hyperparameters."""
        if self.optimizer.optimizer != "sgd" or self._hyper is None:
            return None
        hyper = self._hyper[True]
        numbers = [*hyper["lr"], *hyper["momentum"]]
        if not all(isinstance(v, float) for v in numbers) or any(hyper["momentum"]):
            return None
        return hyper["lr"]

    def _propagate(self, active: Tensors, new: Tensors, new_state: dict[str, Tensors]) -> None:
        """``Z_{t+1} = (d step / d state) Z_t + d step / d lambda``, batched over scalars."""
        inputs = [*active, *_flatten(self.opt_state), *self.variables]
        tangents = [*self.tangents, *_flatten(self.state_tangents), *self.identity]
        outputs = [*new, *_flatten(new_state)]
        live = [i for i, o in enumerate(outputs) if o.requires_grad]
        dummies = [torch.zeros_like(outputs[i], requires_grad=True) for i in live]
        vjps = torch.autograd.grad(
            [outputs[i] for i in live],
            inputs,
            grad_outputs=dummies,
            create_graph=True,
            allow_unused=True,
        )
        n_state = len(inputs) - len(self.variables)
        for k, vjp in enumerate(vjps[n_state:]):
            self.reached[k] = self.reached[k] or vjp is not None
        pairs = [(v, t) for v, t in zip(vjps, tangents, strict=True) if v is not None]
        jvps: tuple = (None,) * len(dummies)
        if pairs:
            jvps = torch.autograd.grad(
                [v for v, _ in pairs],
                dummies,
                grad_outputs=[t for _, t in pairs],
                is_grads_batched=True,
                allow_unused=True,
            )
        out = [o.new_zeros(self.n, *o.shape) for o in outputs]
        for i, j in zip(live, jvps, strict=True):
            if j is not None:
                out[i] = j.detach()
        self.tangents = out[: len(new)]
        self.state_tangents = _unflatten(out[len(new) :], new_state)
