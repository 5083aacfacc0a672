"""AmIGO: amortized implicit gradient optimization (Arbel & Mairal, 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.implicit import HypergradientDivergenceError
from bilevel.ul.sampling import SAME, Sampler
from bilevel.ul.stocbio import check_lr, check_steps
from bilevel.ul.stochastic import StochasticMethod
from bilevel.ul.stochastic_implicit import DIVERGED


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

    def _check_v(self, residual: list[torch.Tensor], fy: list[torch.Tensor], beta: float) -> None:
        """Raise if ``v``'s quadratic diverged: its last step's residual ``H_B v + grad_y F``
        above ``DIVERGED`` (100) times that of ``v = 0``, ``||grad_y F||``. SGD on it with
        ``beta`` above ``2 / lambda_max`` of a minibatch's Hessian grows ``v`` geometrically
        (1.4x per step at 1.2 times the bound: the estimate 1e13 times off after 30 UL steps,
        silently); minibatch noise leaves it far below. One host sync per UL step."""
        last, start = torch.stack([linalg.norm(residual), linalg.norm(fy)]).tolist()
        if not math.isfinite(last) or last <= DIVERGED * start:
            return  # (finish() refuses a non-finite v, naming it)
        raise HypergradientDivergenceError(
            f"AmIGO step {self.t}: v diverged: the residual of its quadratic, "
            f"||H v + grad_y F|| = {last:.3g}, is over {DIVERGED:g} times that of v = 0 "
            f"({start:.3g}), so v_lr = {beta:g} is above 2 / the largest curvature of a "
            "minibatch's LL loss, and the hypergradient estimate would be wrong. Lower v_lr "
            "(default ll.lr), or use larger batches; the state was left as it was before this "
            "step."
        )

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
            y, losses, last = self.inner_sgd(ll, model, self.leaves(), train, alpha)
            mb, batch = self.draw("val", val)
            ul_loss, fy, fx = self.ul_gradients(model, y, mb, batch)
            fy = [f.detach() for f in fy]
            v = self.initial_v()
            for _ in range(steps):
                mb, batch = self.draw("train", train)
                hv = self.hvp(model, y, mb, batch, v)
                with torch.no_grad():
                    residual = [h + f for h, f in zip(hv, fy, strict=True)]
                    v = [u - beta * r for u, r in zip(v, residual, strict=True)]
            self._check_v(residual, fy, beta)
            mb, batch = self.draw("train", train)
            cv = self.cross(model, y, mb, batch, v)
            direction = self.direction(fx, cv, 1.0)
        finally:
            ll.release(model)
        self.diagnostics.update(ll_lr=alpha)
        return self.finish(losses[-1], ul_loss, direction, y, v, losses=losses, step=last)
