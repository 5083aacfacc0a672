"""SOBA: the stochastic single-loop bilevel algorithm of Dagréou et al. (2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.sampling import SAME, Sampler
from bilevel.ul.stochastic import LLStep, StochasticMethod


def check_decay(value: Any, name: str) -> float:
    """A step-size decay exponent: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number >= 0, got {value!r}.")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0: constant steps), got {value}.")
    return float(value)


class SOBA(StochasticMethod):
    """SOBA (StOchastic Bilevel Algorithm): the LL variable ``y``, the linear-system variable
    ``v`` and the UL variable ``x`` take one stochastic step each per iteration, all three
    directions evaluated at the same point ``(y_t, v_t, x_t)`` on one train minibatch ``i`` and
    one validation minibatch ``j``::

        y <- y - rho_t grad_y G_i(y, x)
        v <- v - rho_t (grad_yy G_i(y, x) v + grad_y F_j(y, x))
        x <- x - gamma_t (grad_xy G_i(y, x) v + grad_x F_j(y, x))

    ``v`` tracks ``-H^{-1} grad_y F``, so the last line is a stochastic step along the
    hypergradient. ``rho_t = ll.lr * (t + 1) ** -ll_decay`` (the LL step size comes from the
    LL optimizer ``ll``, which must be ``GradientDescent(..., iters=1)`` with plain SGD) and the
    UL direction written into ``.grad`` is scaled by ``(t + 1) ** -ul_decay``, so that the UL
    optimizer ``torch.optim.SGD(lr=gamma)`` takes the paper's ``gamma_t = gamma (t + 1) **
    -ul_decay`` (with an adaptive optimizer such as Adam, set ``ul_decay=0`` and use a
    learning-rate scheduler instead). The defaults 2/5 and 3/5 are the decreasing steps of the
    paper's convergence theorem (``O(log T / T^(2/5))`` for the mean squared hypergradient
    norm); ``ll_decay = ul_decay = 0`` gives constant steps (benchopt uses 1/2 and 1/2).

    Cost per iteration: one LL gradient, one Hessian-vector product and one cross product
    (together: one backward pass through the LL gradient), one UL gradient. Memory: ``y``,
    ``v`` and one minibatch's graph.

    Reference: Dagréou, Ablin, Vaiter & Moreau (2022), "A framework for bilevel optimization
    that enables stochastic and global variance reduction algorithms", NeurIPS.

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F`` (a mean over its batch).
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL loss ``G`` (a mean over its batch).
        ll_model: the LL module; its trainable parameters are ``y``.
        ll_decay: exponent of the LL (and ``v``) step-size decay.
        ul_decay: exponent of the UL step-size decay (applied to the direction).
        batch_size: samples per train minibatch (see
            :class:`~bilevel.ul.stochastic.StochasticMethod`).
        val_batch_size: samples per validation minibatch (``"same"``: ``batch_size``).
        seed: seeds the default sampler's generator.
        sampler: a sampler to use instead.
    """

    name = "soba"

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        ll_decay: float = 0.4,
        ul_decay: float = 0.6,
        batch_size: int | None = 64,
        val_batch_size: int | str | None = SAME,
        seed: int = 0,
        sampler: Sampler | None = None,
    ) -> None:
        super().__init__(
            ul_objective,
            ul_model,
            ll_objective,
            ll_model,
            batch_size,
            val_batch_size,
            seed,
            sampler,
        )
        self.ll_decay = ll_decay
        self.ul_decay = ul_decay

    # may be set between UL steps, checked as at construction
    ll_decay = Setting(check_decay)
    ul_decay = Setting(check_decay)

    def settings(self) -> dict[str, Any]:
        """Step-size decays and the sampler's settings."""
        return {"ll_decay": self.ll_decay, "ul_decay": self.ul_decay, **super().settings()}

    def step_sizes(self, ll: Any) -> tuple[float, float]:
        """``(rho_t, ul_scale_t)`` for the current step."""
        t = self.t + 1
        rho = self.ll_lr(ll) * (t**-self._ll_decay if self._ll_decay else 1.0)
        return rho, (t**-self._ul_decay if self._ul_decay else 1.0)

    def task_gradients(
        self, ll: Any, train: tuple[Any, Any], val: tuple[Any, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One SOBA iteration on minibatches of the full ``train`` and ``val`` data: moves
        ``y`` and ``v``, adds the scaled UL direction to ``.grad``; returns the minibatch UL
        and LL losses at the point before the step (detached)."""
        rho, scale = self.step_sizes(ll)
        model = ll.patched_model(graph_from_start=False)
        try:
            y = self.leaves()
            v = self.initial_v()
            mb_in, batch_in = self.draw("train", train)
            mb_out, batch_out = self.draw("val", val)
            ll_loss, gy, hv, cv = self.ll_products(model, y, mb_in, batch_in, v)
            ul_loss, fy, fx = self.ul_gradients(model, y, mb_out, batch_out)
            direction = self.direction(fx, cv, 1.0)
            with torch.no_grad():
                new_y = [w - rho * g for w, g in zip(y, gy, strict=True)]
                new_v = [u - rho * (h + f) for u, h, f in zip(v, hv, fy, strict=True)]
        finally:
            ll.release(model)
        self.diagnostics.update(ll_lr=rho, ul_scale=scale)
        step = LLStep(ll, y, mb_in, batch_in, rho)
        return self.finish(ll_loss, ul_loss, direction, new_y, new_v, scale, step=step)
