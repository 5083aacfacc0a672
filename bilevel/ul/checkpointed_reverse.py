"""Reverse-mode hypergradients that store the LL iterates instead of the LL graph, and
recompute one step's graph at a time on the way back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bilevel.ll import Trajectory, evaluate_at, fast_weights
from bilevel.ll.hyper import Schedule
from bilevel.ll.unroll import THROUGH_STEPS
from bilevel.second_derivatives import refuse_once_differentiable
from bilevel.state import Draws, buffer_copies, capture_draws, put_back, replay_draws
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    add,
    detached_weights,
)

Tensors = list[torch.Tensor]
State = dict[str, Tensors]


@dataclass
class StoredIterates:
    """What :class:`MemorySavingReverse` keeps of an LL run: the iterates and the optimizer
    state before every step (detached), and what it needs to redo a step with a graph.

    Attributes:
        weights: ``weights[t]``: the trainable LL weights before step ``t`` (``w_0 .. w_{T-1}``).
        states: ``states[t]``: the update rule's state before step ``t`` (momentum buffers, ...).
        draws: ``draws[t]``: torch's generators before step ``t``, so that the recomputed
            step makes the random draws (dropout masks, noise) the step made (one object for
            consecutive steps that drew nothing).
        buffers: ``buffers[t]``: the patched model's buffers before step ``t`` (batch-norm
            statistics, spectral norm's vectors), which the step's forward may move, so that
            the recomputed step sees what the step saw (empty for a model without buffers).
        schedule: the run's hyperparameters (callables already evaluated, with their graph to
            the UL parameters), so that the recomputed steps use the same values.
        step_map: the run's step map.
        state: the state dict the LL objective saw (its ``ll_model`` is the patched model).
    """

    weights: list[Tensors]
    states: list[State]
    draws: list[Draws]
    buffers: list[list]
    schedule: Schedule
    step_map: Any
    state: dict

    @property
    def stored_bytes(self) -> int:
        """Memory held by the stored iterates and optimizer states, in bytes."""
        tensors = [t for ws in self.weights for t in ws]
        tensors += [t for s in self.states for ts in s.values() for t in ts]
        return sum(t.numel() * t.element_size() for t in tensors)


def _flatten(state: State) -> Tensors:
    return [t for key in sorted(state) for t in state[key]]


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off on ``model``'s parameters while LL steps run without a graph (the
    LL objective then records no graph to them), restored on exit, also on error."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class MemorySavingReverse(HypergradientCalculator):
    """Reverse-mode hypergradient (RHG) with stored iterates instead of a stored graph.

    The LL runs without any graph; the iterates ``w_0 .. w_{T-1}`` and the update rule's state
    before each step (momentum buffers, Adam moments) are kept as detached copies. Going
    back, each step ``s_{t+1} = Phi_t(s_t, lambda)`` (``s = (w, optimizer state)``) is
    recomputed at the stored ``s_t`` with a graph of that one step, and the adjoint is
    carried back from ``alpha_T = grad_w L_ul(w_T)``::

        grad_lambda += (dPhi_t/dlambda)^T alpha_{t+1},    alpha_t = (dPhi_t/ds_t)^T alpha_{t+1}

    for ``t = T-1 .. 0``, plus the UL objective's direct gradient; UL parameters that are the
    LL's initial weights (MAML) receive ``alpha_0``. The result is the hypergradient of
    :class:`~bilevel.ul.Reverse` (the same unrolled map, to round-off), for any update rule
    and hyperparameter form of :class:`bilevel.ll.GradientDescent`; the recomputed steps use
    the hyperparameter values of the run (callables are evaluated once per run) and replay
    the random draws of the run's steps (dropout, noise drawn in the objective: torch's
    generator state before each step is kept), without moving the global RNG.

    Cost: the LL run without a graph, then per step one more LL gradient with a graph and
    one backward pass through it (about one Hessian-vector product): about the time of
    ``Reverse`` plus one LL run without a graph. Memory: ``T`` copies of the LL weights (and
    of the optimizer state) plus the graph of one step, instead of the graph of ``T`` steps:
    the saving is the ratio of a step's graph (activations, the double-backward graph) to
    the weights. An objective that draws at random adds torch's generator state per step
    (5 kB for the CPU generator); one that draws nothing adds none.

    References: Franceschi, Donini, Frasconi & Pontil (2017), "Forward and Reverse
    Gradient-Based Hyperparameter Optimization", ICML (reverse mode over stored iterates);
    Maclaurin, Duvenaud & Adams (2015), "Gradient-based Hyperparameter Optimization through
    Reversible Learning", ICML.

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss.
        ll_model: the LL module.
    """

    name = "memory_saving_reverse"
    splits_ul_batch = True  # linear in the UL objective

    def differentiable_steps(self, iters: int) -> int:
        """None: the steps are recomputed with a graph one at a time."""
        return 0

    def check_against(self, ll: Any) -> None:
        """Also: the LL optimizer can be stepped by hand (``ll.start``), as
        :class:`bilevel.ll.GradientDescent` and its subclasses can."""
        super().check_against(ll)
        if not callable(getattr(ll, "start", None)) or not hasattr(ll, "_check_losses"):
            raise TypeError(
                "MemorySavingReverse steps the LL itself and needs an LL optimizer with "
                f"start(data, target) (bilevel.ll.GradientDescent), got {type(ll).__name__}."
            )

    def run_ll(
        self, ll: Any, data: Any, target: Any, ul_batch: tuple[Any, Any] | None = None
    ) -> Trajectory:
        """One LL run without a graph that stores each iterate and optimizer state (detached).

        Raises:
            FloatingPointError: the LL loss became NaN or inf (the message names the step); the
                LL optimizer's growth policy applies as in ``ll.run``.
        """
        self.check_against_once(ll)
        unroll = ll.start(data, target, graph_from_start=False, ul_batch=ul_batch)
        weights: list[Tensors] = []
        states: list[State] = []
        draws: list[Draws] = []
        buffers: list[list] = []
        losses = None
        with _frozen(self.ul_model):
            for t in range(ll.iters):
                # the steps may overwrite the weights in place: store copies
                weights.append([w.detach().clone() for w in self._active(unroll.model, unroll)])
                states.append({k: [s.detach() for s in v] for k, v in unroll.opt_state.items()})
                now = capture_draws(weights[-1][0].device)
                draws.append(draws[-1] if draws and draws[-1].same_as(now) else now)
                buffers.append(buffer_copies(unroll.model))
                loss = unroll.step(graph=False)
                if losses is None:
                    losses = loss.new_empty(ll.iters)
                losses[t] = loss
        # the LL optimizer's own policy: NaN, and growth (raise / warn / ignore)
        ll._check_losses(losses, unroll)
        trajectory = unroll.record(losses, 0)
        trajectory.observed = StoredIterates(
            weights, states, draws, buffers, unroll.schedule, unroll.step_map, unroll.state
        )
        return trajectory

    @staticmethod
    def _active(model: nn.Module, unroll: Any) -> Tensors:
        params = fast_weights(model)
        return [params[i] for i in unroll.index]

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        stored = call.trajectory.observed
        if not isinstance(stored, StoredIterates) or len(stored.weights) != call.trajectory.iters:
            raise ValueError(
                "MemorySavingReverse needs an LL run that stored every iterate: run the LL with "
                "ul.run_ll(ll, data, target) (not ll.optimize / ll.run) and pass its .model, "
                "or let BilevelProblem(ll, ul) drive it."
            )
        model = call.auxiliary_model
        weights, active = detached_weights(call.trajectory)
        n = len(self.ul_params)
        with evaluate_at(model, weights):
            loss = self.ul_loss(call)
            grads = torch.autograd.grad(
                loss, [*self.ul_params, *(weights[i] for i in active)], allow_unused=True
            )
        result: Grads = list(grads[:n])
        alpha_w: list[torch.Tensor | None] = list(grads[n:])
        alpha_s: State = {}
        after_run = buffer_copies(model)  # put back once the steps are recomputed
        try:
            for t in reversed(range(call.trajectory.iters)):
                step_grads, alpha_w, alpha_s = self._step_back(
                    stored, t, model, weights, active, alpha_w, alpha_s
                )
                result = [add(r, g) for r, g in zip(result, step_grads, strict=True)]
        finally:
            put_back(after_run)
        position = {index: k for k, index in enumerate(active)}
        for i, index in enumerate(self.initial_weight_of):  # MAML: the LL's initial weights
            if index is not None and index in position:
                result[i] = add(result[i], alpha_w[position[index]])
        self.diagnostics["stored_bytes"] = stored.stored_bytes
        return result, loss

    def _step_back(
        self,
        stored: StoredIterates,
        t: int,
        model: nn.Module,
        weights: Tensors,
        active: list[int],
        alpha_w: list[torch.Tensor | None],
        alpha_s: State,
    ) -> tuple[Grads, list[torch.Tensor | None], State]:
        """Recompute step ``t`` with a graph and pull the adjoint back through it."""
        w_t = [w.detach().requires_grad_() for w in stored.weights[t]]
        s_t = {
            k: [s.detach().requires_grad_(s.is_floating_point() or s.is_complex()) for s in v]
            for k, v in stored.states[t].items()
        }
        at = list(weights)
        for i, w in zip(active, w_t, strict=True):
            at[i] = w
        hyper = stored.schedule.at(t, detach=False)
        put_back(stored.buffers[t])  # the buffers as the step found them
        # the step's own random draws, replayed (the global RNG is left where the run left it)
        with replay_draws(stored.draws[t]), evaluate_at(model, at):
            new, new_state, loss, _ = stored.step_map(w_t, s_t, hyper, stored.state, t, True)
        if t == len(stored.weights) - 1:  # the first step recomputed (once per backward)
            refuse_once_differentiable(loss, w_t, THROUGH_STEPS)
        outputs, seeds = [], []
        pairs = list(zip(new, alpha_w, strict=True))
        for key in sorted(alpha_s):
            pairs += zip(new_state[key], alpha_s[key], strict=True)
        for out, seed in pairs:
            if seed is not None and out.requires_grad:
                outputs.append(out)
                seeds.append(seed)
        flat_s = _flatten(s_t)
        inputs = [*w_t, *flat_s, *self.ul_params]
        if not outputs:
            none: Grads = [None] * len(self.ul_params)
            return none, [None] * len(w_t), {}
        # retain_graph: hyperparameters evaluated once per run share their graph across steps
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs=seeds, allow_unused=True, retain_graph=True
        )
        k = len(w_t)
        new_alpha_w = list(grads[:k])
        new_alpha_s: State = {}
        offset = k
        for key in sorted(s_t):
            size = len(s_t[key])
            new_alpha_s[key] = list(grads[offset : offset + size])
            offset += size
        return list(grads[offset:]), new_alpha_w, new_alpha_s
