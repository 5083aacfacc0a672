"""Pessimistic trajectory truncation: back-propagate from the LL iterate with the largest UL
loss (IAPTT-GM)."""

from __future__ import annotations

from typing import Any

import torch

from bilevel import linalg
from bilevel.ll import evaluate_at
from bilevel.ll.patched import install
from bilevel.roundoff import batch_terms, roundoff_floor
from bilevel.state import (
    Draws,
    buffer_copies,
    capture_draws,
    check_objective_result,
    modes_kept,
    put_back,
    replay_draws,
)
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    kept_buffers,
    put_back_buffers,
)

Tensors = list[torch.Tensor]


class Iterates:
    """An LL-step observer that keeps every iterate (with its graph): ``w_1 .. w_T``."""

    detach_inputs = False

    def __init__(self) -> None:
        self.iterates: list[Tensors] = []

    def propagate(self, weights: Tensors, opt_state: dict, new: Tensors, new_state: dict) -> None:
        """Keep the weights after the step."""
        self.iterates.append(new)

    def result(self) -> list[Tensors]:
        """The iterates, one list of trainable weights per step."""
        return self.iterates


def step_lengths(iterates: list[Tensors], block: int = 1 << 22) -> torch.Tensor:
    """``||w_{k+1} - w_k||`` for each pair of consecutive iterates (a 1-d tensor, real). The
    iterates are flattened and stacked a block of at most about ``block`` elements at a
    time: a few operations for the small models of hyperparameter optimization rather than
    a few per step (PTT's Python work per LL step is what keeps it over its hand-written
    loop: ``docs/method_families.md``), and a bounded copy for large ones."""
    size = sum(w.numel() for w in iterates[0])
    rows = max(2, block // max(size, 1))
    lengths = []
    for start in range(0, len(iterates) - 1, rows - 1):
        flat = [
            ws[0].reshape(-1) if len(ws) == 1 else torch.cat([w.reshape(-1) for w in ws])
            for ws in iterates[start : start + rows]
        ]
        lengths.append(torch.linalg.vector_norm(torch.stack(flat).diff(dim=0), dim=1))
    return lengths[0] if len(lengths) == 1 else torch.cat(lengths)


class PTT(HypergradientCalculator):
    """Pessimistic trajectory truncation: the UL loss is taken at the LL iterate where it is
    largest, ``k* = argmax_{1 <= k <= T} L_ul(w_k, lambda)``, and the hypergradient is that of
    ``L_ul(w_{k*}(lambda), lambda)`` back-propagated through the first ``k*`` LL steps. Losses
    within round-off of the largest (``ROUNDOFF * eps * max_k |L_ul(w_k)|``) are ties, and so
    is the last iterate's where each LL step after the latest tied iterate moved by round-off
    alone (``||w_{j+1} - w_j|| <= ROUNDOFF * eps * ||w_T||``); both floors grow as
    ``sqrt(n / 100)`` for sums over ``n > 100`` examples (``bilevel.roundoff.roundoff_floor``).
    Ties go to the latest iterate: an LL that does not move (started at its solution) gives
    ``Reverse``'s hypergradient, not one truncated at a step picked by round-off.

    Truncating at the worst iterate rather than the last one makes the UL step pessimistic
    about where the LL dynamics pass, which is what lets IAPTT-GM handle non-convex LL
    problems whose solution set is not a singleton. Cost: one UL forward pass per LL step
    (without a graph) to choose ``k*``, then one more at ``k*`` with its graph and one
    backward pass through its ``k*`` steps; memory as ``Reverse`` (all steps keep their
    graph). A UL objective that draws at random (dropout) draws anew at each iterate; the
    loss differentiated at ``k*`` replays the draws it was compared with (it is the largest
    of the losses compared; one that draws at later iterates but not at the first is
    compared twice, to record them), and every UL loss, compared or differentiated, is
    evaluated from the LL model's buffers as the LL run left them (a forward that moves
    them, as spectral norm's power iteration does, moves them for its own evaluation
    only).

    Reference: Liu, Liu, Zeng & Zhang (2021), "Towards Gradient-based Bilevel
    Optimization with Non-convex Followers and Beyond" (IAPTT-GM), NeurIPS.

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss.
        ll_model: the LL module.
    """

    name = "ptt"

    def differentiable_steps(self, iters: int) -> int:
        """All of them."""
        return iters

    def observer(self, ll: Any) -> Iterates:
        """Keep every iterate."""
        return Iterates()

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        iterates = call.trajectory.observed
        if not isinstance(iterates, list) or len(iterates) != call.trajectory.iters:
            raise ValueError(
                "PTT needs an LL run that kept every iterate: run the LL with "
                "ul.run_ll(ll, data, target) and pass its .model, or let BilevelProblem(ll, ul) "
                "drive it."
            )
        # the patched model's buffers as the LL run left them: every UL loss compared, and
        # the one differentiated, is evaluated from them (a forward that moves its buffers,
        # as spectral norm's power iteration does, would otherwise see T more of its moves)
        after_run = buffer_copies(call.auxiliary_model)
        chosen, draws = self._worst(call, iterates, after_run)
        self.diagnostics["ptt_step"] = chosen + 1
        # the loss compared at k*, with its draws (the global RNG is left where it is)
        weights = self._weights(call, iterates[chosen])
        put_back(after_run)
        with replay_draws(draws), evaluate_at(call.auxiliary_model, weights):
            loss = self.ul_loss(call)
        grads = torch.autograd.grad(loss, self.ul_params, allow_unused=True)
        return list(grads), loss

    def _weights(self, call: Call, trainable: Tensors) -> Tensors:
        """All the LL weights at one iterate (frozen ones as they are)."""
        weights = list(call.trajectory.weights)
        index = [i for i, t in enumerate(call.trajectory.trainable) if t]
        for i, w in zip(index, trainable, strict=True):
            weights[i] = w
        return weights

    def _worst(
        self, call: Call, iterates: list[Tensors], after_run: list[tuple[Any, str, torch.Tensor]]
    ) -> tuple[int, Draws]:
        """The index of the iterate with the largest UL loss (one host sync), and the
        generators' state before its evaluation (to replay its random draws); each loss is
        evaluated from the patched model's buffers ``after_run`` (:func:`buffer_copies`)."""
        # the comparisons only choose k*: the UL model's buffers (batch-norm running
        # statistics) move once per UL step, in the evaluation that is differentiated
        buffers = [(b, b.detach().clone()) for b in self.ul_model.buffers()]
        device = iterates[0][0].device
        start = capture_draws(device)
        with kept_buffers(buffers):
            losses, draws = self._compare(call, iterates, after_run, start, device, False)
            if draws is None:  # a UL objective that drew at some iterates only: again, from
                # where the comparisons started, with the generators' state before each
                replay_draws(start).rewind()
                put_back_buffers(buffers)
                losses, draws = self._compare(call, iterates, after_run, start, device, True)
        values = torch.stack(losses)  # (checked: 0-d)
        # losses within round-off of the largest (of the terms that cancel in their
        # difference: the losses themselves) are ties, and go to the latest iterate: an LL at
        # its solution has T equal iterates, and argmax would pick among them by noise
        top = values.abs().max()
        tied = values >= values.max() - roundoff_floor(top, batch_terms(call.validate_data))
        steps = torch.arange(len(values), device=values.device)
        latest = torch.where(tied, steps, -1).max()
        first = values.argmax()
        latest, first = torch.stack([latest, first]).tolist()  # one host sync
        # ... and so are the losses of weights equal to round-off: they differ by about
        # eps ||grad F|| ||w||, far above eps |F| where F is small (a UL loss near its
        # minimum), so the last iterate ties with the latest tied one when every LL step
        # between them moved by round-off alone (validation losses of 8e-5 to 7e-13 at the
        # LL's solution: k* was picked by noise, 42% to 77% off Reverse's); the steps'
        # lengths, only where they decide
        final = len(values) - 1
        if 0 <= latest < final:
            with torch.no_grad():
                # a step on round-off gradients moves at most about the floor of ||w|| (lr g,
                # with lr ||H|| < 2 and g at the floor of ||H|| ||w||): an LL started at its
                # solution on 2e5 uncentered examples drifted 400 to 800 eps ||w|| in 20
                # steps, and k* went from 1 to T with torch's thread count. Each step against
                # the floor, not their sum against T floors: in float32 a floor is 1e-5 ||w||,
                # and a fast-converging LL travels less than T of them after genuine first
                # steps (k* = 1 went to T, the hypergradient 30x off)
                moves = step_lengths(iterates[latest:])
                floor = roundoff_floor(linalg.norm(iterates[-1]), batch_terms(call.train_data))
                if bool(moves.max() <= floor):
                    latest = final
        chosen = latest if latest >= 0 else first  # none tied: a NaN loss, which argmax takes
        return chosen, draws[chosen]

    def _compare(
        self,
        call: Call,
        iterates: list[Tensors],
        after_run: list[tuple[Any, str, torch.Tensor]],
        start: Draws,
        device: torch.device,
        every: bool,
    ) -> tuple[list[torch.Tensor], list[Draws] | None]:
        """The UL loss at every iterate (no graph), from the generators' state ``start``, and
        the state before each evaluation. ``every=False``: that state is captured only once
        the first evaluation is seen to draw (capturing 5 KB of generator state at each of
        T iterates is most of PTT's own cost per LL step); if the generators moved later
        although the first evaluation drew nothing, the states are unknown: ``None``."""
        model = call.auxiliary_model
        weights = list(call.trajectory.weights)  # frozen ones as they are
        index = [i for i, t in enumerate(call.trajectory.trainable) if t]
        state = self.states(model, *call.val)  # one state, as the LL steps share theirs
        losses: list[torch.Tensor] = []
        draws = [start]
        objective, kept = self.ul_objective, modes_kept(model)  # (one context, entered T times)
        with torch.no_grad(), evaluate_at(model, weights):
            every_weight = len(index) == len(weights)  # (the usual case: no list to fill)
            for k, trainable in enumerate(iterates):
                if every_weight:
                    install(model, trainable)
                else:
                    for i, w in zip(index, trainable, strict=True):
                        weights[i] = w
                    install(model, weights)
                if after_run:
                    put_back(after_run)
                if k > 0 and every:
                    now = capture_draws(device)
                    draws.append(draws[-1] if draws[-1].same_as(now) else now)
                with kept:
                    losses.append(check_objective_result(objective(state), "ul_objective", False))
                if k == 0 and not every:
                    every = not capture_draws(device).same_as(start)
        if len(draws) == len(iterates):
            return losses, draws
        if capture_draws(device).same_as(start):  # nothing drew: one state for all
            return losses, [start] * len(iterates)
        return losses, None
