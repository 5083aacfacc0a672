"""AmIGO: amortized implicit gradient optimization (Arbel & Mairal, 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.sampling import SAME, Sampler
from bilevel.ul.stocbio import check_lr, check_steps
from bilevel.ul.stochastic import StochasticMethod


def _check_v_iters(value: Any, name: str) -> int | None:
    """``None`` (``ll.iters``), or an integer >= 1."""
    return None if value is None else check_steps(value, name, 1)


class AmIGO(StochasticMethod):
    """AmIGO: per UL step, ``T = ll.iters`` warm-started SGD steps on the LL, then ``M``
    warm-started SGD steps on the linear system's quadratic ``1/2 v^T H v + v^T grad_y F``
    (a new train minibatch for each step, ``grad_y F`` from one validation minibatch), and
    the hypergradient estimate at the new point::

        y <- y - alpha grad_y G_{S_t}(y, x)                         (t = 1..T; alpha = ll.lr)
        v <- v - beta (grad_yy G_{B_m}(y, x) v + grad_y F_D(y, x))   (m = 1..M)
        d_x = grad_x F_D(y, x) + grad_xy G_{D_G}(y, x) v

    ``v`` tracks ``-H^{-1} grad_y F`` and, like ``y``, is kept across UL steps (warm start:
    the amortization that gives AmIGO its name); the UL optimizer
    ``torch.optim.SGD(lr=gamma)`` takes ``x <- x - gamma d_x``. The SGD on ``v`` converges for
    ``0 < beta < 2 / L`` (``L``: the largest curvature of the LL loss); default ``beta =
    ll.lr`` and ``M = ll.iters`` (as benchopt; the paper's experiments take ``T = M = 10``).

    The paper shows that with warm starts the errors of ``y`` and ``v`` need not be driven to
    zero at each UL step: with constant steps the method converges at the rate of SGD on the
    UL problem (linearly, up to a noise level set by the step sizes and batch sizes, when the
    value function is strongly convex; ``O(1/K)`` to stationarity in the non-convex case with
    batches growing as the accuracy demands).

    Cost per UL step: ``T`` LL gradients, ``M`` Hessian-vector products, one cross product,
    one UL gradient. Memory: ``y``, ``v``, one minibatch's graph.

    Reference: Arbel & Mairal (2022), "Amortized Implicit Differentiation for Stochastic
    Bilevel Optimization", ICLR.

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F`` (a mean over its batch).
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL loss ``G`` (a mean over its batch).
        ll_model: the LL module; its trainable parameters are ``y``.
        v_iters: ``M``, SGD steps on ``v`` per UL step (``None``: ``ll.iters``).
        v_lr: ``beta`` (``None``: ``ll.lr``).
        batch_size: samples per train minibatch (see
            :class:`~bilevel.ul.stochastic.StochasticMethod`).
        val_batch_size: samples per validation minibatch (``"same"``: ``batch_size``).
        seed: seeds the default sampler's generator.
        sampler: a sampler to use instead.
    """

    name = "amigo"
    inner_loop = True

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        v_iters: int | None = None,
        v_lr: float | None = None,
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
        self.v_iters = v_iters
        self.v_lr = v_lr

    # may be set between UL steps, checked as at construction
    v_iters = Setting(_check_v_iters)
    v_lr = Setting(check_lr)

    def settings(self) -> dict[str, Any]:
        """The linear-system SGD settings and the sampler's settings."""
        return {"v_iters": self.v_iters, "v_lr": self.v_lr, **super().settings()}

    def task_gradients(
        self, ll: Any, train: tuple[Any, Any], val: tuple[Any, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One AmIGO UL step on minibatches of the full ``train`` and ``val`` data: moves
        ``y`` and ``v`` by their SGD steps, adds the hypergradient estimate to ``.grad``;
        returns the minibatch UL loss after the LL steps and the last LL step's loss
        (detached)."""
        alpha = self.ll_lr(ll)
        beta = alpha if self._v_lr is None else self._v_lr
        steps = ll.iters if self._v_iters is None else self._v_iters
        model = ll.patched_model(graph_from_start=False)
        try:
            y, losses = self.inner_sgd(model, self.leaves(), train, ll.iters, alpha)
            mb, batch = self.draw("val", val)
            ul_loss, fy, fx = self.ul_gradients(model, y, mb, batch)
            fy = [f.detach() for f in fy]
            v = self.initial_v()
            for _ in range(steps):
                mb, batch = self.draw("train", train)
                hv = self.hvp(model, y, mb, batch, v)
                with torch.no_grad():
                    v = [u - beta * (h + f) for u, h, f in zip(v, hv, fy, strict=True)]
            mb, batch = self.draw("train", train)
            cv = self.cross(model, y, mb, batch, v)
            direction = self.direction(fx, cv, 1.0)
        finally:
            ll.release(model)
        self.diagnostics.update(ll_lr=alpha)
        return self.finish(losses[-1], ul_loss, direction, y, v, losses=losses)
