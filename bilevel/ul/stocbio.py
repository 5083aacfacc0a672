"""StocBiO: stochastic bilevel optimizer with a Neumann-series hypergradient (Ji, Yang &
Liang, 2021)."""

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
from bilevel.ul.stochastic import StochasticMethod


def check_steps(value: Any, name: str, minimum: int) -> int:
    """An integer number of steps >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_lr(value: Any, name: str) -> float | None:
    """A positive finite step size, or ``None`` (take the LL's)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number > 0 or None, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return float(value)


class StocBiO(StochasticMethod):
    """StocBiO: per UL step, ``T = ll.iters`` warm-started SGD steps on the LL (a new train
    minibatch each), then a stochastic Neumann-series estimate of ``H^{-1} grad_y F`` with
    ``Q = neumann_steps`` Hessian-vector products on new train minibatches, and the
    hypergradient estimate::

        y <- y - alpha grad_y G_{S_t}(y, x)                       (t = 1..T; alpha = ll.lr)
        r_0 = s_0 = grad_y F_D(y, x)
        r_q = (I - eta grad_yy G_{B_q}(y, x)) r_{q-1},  s_q = s_{q-1} + r_q   (q = 1..Q)
        d_x = grad_x F_D(y, x) - grad_xy G_{D_G}(y, x) (eta s_Q)

    ``eta s_Q = eta sum_{q=0..Q} prod (I - eta H_B) grad_y F`` is the truncated Neumann series
    of ``H^{-1} grad_y F``; it converges (as ``Q`` grows) only for ``0 < eta < 2 / L`` with
    ``L`` the largest curvature of the LL loss, so ``eta`` must be a valid LL step size
    (default: ``ll.lr``, as benchopt; the authors' code takes it apart, ``eta=0.5``); a term
    that grows proves it is not (for that minibatch's Hessian) and raises
    :class:`~bilevel.ul.implicit.HypergradientDivergenceError` (one host sync per UL step;
    the runner's ``on_nonfinite="skip"`` skips such a step). The UL
    optimizer ``torch.optim.SGD(lr=beta)`` takes ``x <- x - beta d_x``. ``v`` is not kept
    across UL steps; ``y`` is (warm start). Each Hessian product takes its own batch, as in
    benchopt's solver; the authors' released code takes one batch for all ``Q`` products and
    applies ``eta`` to the last term only.

    The paper shows an ``O(1/K)`` rate for the mean squared hypergradient norm over ``K`` UL
    steps with batch sizes of order ``1/epsilon`` and ``Q`` of order ``kappa log(1/epsilon)``;
    with fixed batches it reaches a neighbourhood of a stationary point (the Neumann series is
    biased by its truncation, the estimate noisy by the batches).

    Cost per UL step: ``T`` LL gradients, ``Q`` Hessian-vector products (each a gradient with
    its graph and one backward pass), one cross product, one UL gradient. Memory: ``y``, two
    vectors of its size, one minibatch's graph.

    Reference: Ji, Yang & Liang (2021), "Bilevel Optimization: Convergence Analysis and
    Enhanced Design", ICML.

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F`` (a mean over its batch).
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL loss ``G`` (a mean over its batch).
        ll_model: the LL module; its trainable parameters are ``y``.
        neumann_steps: ``Q``, Hessian-vector products of the Neumann series (paper's code
            and benchopt: 10).
        neumann_lr: ``eta`` (``None``: ``ll.lr``).
        batch_size: samples per train minibatch (see
            :class:`~bilevel.ul.stochastic.StochasticMethod`).
        val_batch_size: samples per validation minibatch (``"same"``: ``batch_size``).
        seed: seeds the default sampler's generator.
        sampler: a sampler to use instead.
    """

    name = "stocbio"
    inner_loop = True

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        neumann_steps: int = 10,
        neumann_lr: float | None = None,
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
        self.neumann_steps = neumann_steps
        self.neumann_lr = neumann_lr

    # may be set between UL steps, checked as at construction
    neumann_steps = Setting(check_steps, 0)
    neumann_lr = Setting(check_lr)

    def settings(self) -> dict[str, Any]:
        """Neumann-series settings and the sampler's settings."""
        return {
            "neumann_steps": self.neumann_steps,
            "neumann_lr": self.neumann_lr,
            **super().settings(),
        }

    def _check_series(self, norms: list[torch.Tensor], eta: float) -> None:
        """Raise if a term of the Neumann series is larger than its first one:
        ``r_q = (I - eta H_q) r_{q-1}`` with a symmetric minibatch Hessian ``H_q`` has
        ``||r_q|| <= ||r_0||`` whenever ``0 <= eta H_q <= 2 I``; a term above the first means
        ``eta >= 2 / lambda_max(H_q)`` (or strongly negative curvature), a series that has
        grown past its start and whose sum is no estimate of ``H^{-1} grad_y F``. A slow
        growth along mild negative curvature (a neural-network LL) that stays below the first
        term goes through. One host sync per UL step."""
        if len(norms) < 2:
            return
        values = torch.stack(norms).tolist()
        first = values[0]
        for q, value in enumerate(values[1:], start=1):
            if not math.isfinite(value):
                return  # finish() refuses the step, naming the non-finite value
            if value > first * (1.0 + 1e-6):
                raise HypergradientDivergenceError(
                    f"StocBiO step {self.t}: the Neumann series diverged: its term {q} has norm "
                    f"{value:.3g}, above the first term's {first:.3g}, so eta = {eta:g} is "
                    "above 2 / the largest curvature of a minibatch's LL loss (or the LL loss "
                    "is far from convex there), and the hypergradient estimate would be wrong. "
                    "Lower neumann_lr (default ll.lr), or use larger batches; the state was "
                    "left as it was before this step."
                )

    def task_gradients(
        self, ll: Any, train: tuple[Any, Any], val: tuple[Any, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One StocBiO UL step on minibatches of the full ``train`` and ``val`` data: moves
        ``y`` by ``ll.iters`` SGD steps, adds the hypergradient estimate to ``.grad``; returns
        the minibatch UL loss after the LL steps and the last LL step's loss (detached)."""
        alpha = self.ll_lr(ll)
        eta = alpha if self._neumann_lr is None else self._neumann_lr
        model = ll.patched_model(graph_from_start=False)
        try:
            y, losses, last = self.inner_sgd(ll, model, self.leaves(), train, alpha)
            mb, batch = self.draw("val", val)
            ul_loss, fy, fx = self.ul_gradients(model, y, mb, batch)
            term = [f.detach() for f in fy]
            total = [f.clone() for f in term]
            norms = [linalg.norm(term)]
            for _ in range(self._neumann_steps):
                mb, batch = self.draw("train", train)
                hv = self.hvp(model, y, mb, batch, term)
                with torch.no_grad():
                    term = [r - eta * h for r, h in zip(term, hv, strict=True)]
                    for s, r in zip(total, term, strict=True):
                        s.add_(r)
                norms.append(linalg.norm(term))
            self._check_series(norms, eta)
            q = [eta * s for s in total]
            mb, batch = self.draw("train", train)
            cv = self.cross(model, y, mb, batch, q)
            direction = self.direction(fx, cv, -1.0)
        finally:
            ll.release(model)
        self.diagnostics.update(ll_lr=alpha)
        return self.finish(losses[-1], ul_loss, direction, y, None, losses=losses, step=last)
