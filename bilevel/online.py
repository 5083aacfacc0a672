"""Online hypergradient descent: UL updates every few LL steps, without restarting the LL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from bilevel.ll import GradientDescent
from bilevel.problem import Pair
from bilevel.state import check_finite
from bilevel.ul import Forward, Truncated


class OnlineHypergradient:
    """Update the UL variables every ``hyper_every`` LL steps of one continuing LL run.

    With :class:`bilevel.ul.Forward` this is Real-Time Hyperparameter Optimization (RTHO):
    the tangents ``Z_t`` keep accumulating across UL updates. With
    :class:`bilevel.ul.Truncated` (``truncate_iter = hyper_every``) it is online truncated
    reverse: back-propagation through the LL steps since the last update.

    The online hypergradient is **biased**: ``Z_t`` mixes derivatives taken at earlier values
    of the UL variables (Forward), or ignores the steps before the window (Truncated), and the
    LL never reaches the solution for the current UL variables. It pays when an LL run is
    expensive and the UL variables need many updates: many UL updates per LL run instead of
    one.

    Reference: Franceschi, Donini, Frasconi & Pontil (2017), "Forward and Reverse
    Gradient-Based Hyperparameter Optimization", ICML (RTHO); Shaban et al. (2019).

    Args:
        ll: the LL optimizer (its ``iters`` is not used: ``run`` says how many steps).
        ul: a ``Forward`` or ``Truncated`` calculator on the same models.
        ul_optimizer: the ``torch.optim`` optimizer of the UL parameters.
        hyper_every: LL steps between UL updates (for ``Truncated``, its ``truncate_iter``).
    """

    def __init__(
        self,
        ll: GradientDescent,
        ul: Forward | Truncated,
        ul_optimizer: torch.optim.Optimizer,
        hyper_every: int,
    ) -> None:
        if not isinstance(ul, Forward | Truncated):
            raise TypeError(
                f"online hypergradients need Forward or Truncated, got {type(ul).__name__}."
            )
        if isinstance(hyper_every, bool) or not isinstance(hyper_every, int) or hyper_every < 1:
            raise ValueError(f"hyper_every must be an integer >= 1, got {hyper_every!r}.")
        if isinstance(ul, Truncated) and ul.truncate_iter != hyper_every:
            raise ValueError(
                f"Truncated online needs truncate_iter == hyper_every ({hyper_every}), got "
                f"{ul.truncate_iter}: it back-propagates through the steps since the last update."
            )
        ul.check_against(ll)
        if not isinstance(ul_optimizer, torch.optim.Optimizer):
            raise TypeError("ul_optimizer must be a torch.optim.Optimizer.")
        self.ll, self.ul, self.ul_optimizer = ll, ul, ul_optimizer
        self.hyper_every = hyper_every

    def run(
        self,
        train: Pair | Callable[[int], Pair],
        val: Pair | Callable[[int], Pair],
        ll_steps: int,
        log: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True,
    ) -> torch.nn.Module:
        """Run ``ll_steps`` LL steps, with a UL update after every ``hyper_every`` of them.

        Each call is one LL run from ``ll_model``'s weights, which it leaves as they are (the
        trained LL model is returned): a second call starts the LL again from them, while the
        UL variables and ``ul_optimizer`` carry on. The run's LL state lives inside the call
        and is not checkpointed: an interrupted online run starts over.

        Args:
            train: the LL batch, or a function ``LL step -> batch``.
            val: the UL batch, or a function ``UL update -> batch``.
            ll_steps: total LL steps.
            log: called after each UL update with step numbers, UL loss and LL loss.
            progress: show a tqdm progress bar.

        Returns:
            The LL model (patched) after the last step.
        """
        batch = train if callable(train) else (lambda step: train)
        val_batch = val if callable(val) else (lambda update: val)
        graph = isinstance(self.ul, Truncated)
        first = batch(0)  # asked once: a batch function may read the next batch of a loader
        unroll = self.ll.start(*first, observer=self.ul.observer(self.ll))
        if not unroll.schedule.constant and ll_steps > self.ll.iters:
            raise ValueError(
                f"a hyperparameter of the LL is a per-step schedule of ll.iters = {self.ll.iters} "
                f"steps, but the online run takes ll_steps = {ll_steps}: build the LL with "
                "iters >= ll_steps, or give that hyperparameter as one value."
            )
        ll_losses = []
        updates = 0
        for step in tqdm(range(ll_steps), disable=not progress, desc=f"online {self.ul.name}"):
            data, target = first if step == 0 else batch(step)
            unroll.set_batch(data, target)
            ll_losses.append(unroll.step(graph=graph))
            if (step + 1) % self.hyper_every:
                continue
            losses = torch.stack(ll_losses)
            check_finite(losses, f"the LL loss before LL step {step + 1}")
            trajectory = unroll.record(losses, len(ll_losses) if graph else 0)
            self.ul_optimizer.zero_grad(set_to_none=True)
            ul_loss = self.ul.accumulate(trajectory, val_batch(updates), (data, target))
            grads = [p.grad for p in self.ul.ul_params if p.grad is not None]
            check_finite(
                torch.stack([g.sum() for g in grads]),
                f"the online {self.ul.name} hypergradient at LL step {step + 1}",
            )
            self.ul_optimizer.step()
            updates += 1
            # hyperparameters computed from the UL model (callables): at the new UL point, with
            # a fresh graph (the old one would be stale, and freed by Truncated's backward)
            unroll.schedule = self.ll.schedule()
            if graph:
                unroll.cut()
            if log is not None:
                log(
                    {
                        "ll_step": step + 1,
                        "ul_step": updates,
                        "ul_loss": float(ul_loss),
                        "ll_loss": float(losses[-1]),
                    }
                )
            ll_losses = []
        return unroll.model
