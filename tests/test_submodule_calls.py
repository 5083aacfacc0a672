"""Objectives that call submodules of the patched LL model directly (``state["ll_model"].a(x)``,
as a DARTS cell mixes its candidate operations) see the current fast weights. ``higher``
fills a box with the weights at the first such call and keeps it until the whole model is
called, so later direct calls read the weights of an earlier step, or of an earlier run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference, Reverse

DTYPE = torch.float64
LR = 0.3


class TwoOps(nn.Module):
    """Two candidate operations, called one by one by the objective."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 3).to(DTYPE)
        self.b = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


class Mix(nn.Module):
    """UL variables: a scale per operation."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([0.3, -0.2], dtype=DTYPE))


def logits(w: list[torch.Tensor], alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The cell by hand: ``w`` = a.weight, a.bias, b.0.weight, b.0.bias, b.2.weight, b.2.bias."""
    a = F.linear(x, w[0], w[1])
    b = F.linear(torch.tanh(F.linear(x, w[2], w[3])), w[4], w[5])
    return alpha.exp()[0] * a + alpha.exp()[1] * b


def objective(state: dict) -> torch.Tensor:
    model, alpha, x = state["ll_model"], state["ul_model"].alpha, state["data"]
    mixed = alpha.exp()[0] * model.a(x) + alpha.exp()[1] * model.b(x)  # direct calls
    return F.cross_entropy(mixed, state["target"])


def unrolled(cell: TwoOps, mix: Mix, train, val, steps: int) -> torch.Tensor:
    """Reverse mode through ``steps`` GD steps, by hand (no patched model)."""
    alpha = mix.alpha.detach().clone().requires_grad_()
    w = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    for _ in range(steps):
        loss = F.cross_entropy(logits(w, alpha, train[0]), train[1])
        grads = torch.autograd.grad(loss, w, create_graph=True)
        w = [t - LR * g for t, g in zip(w, grads, strict=True)]
    (grad,) = torch.autograd.grad(F.cross_entropy(logits(w, alpha, val[0]), val[1]), alpha)
    return grad


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (40,), generator=g)
    return (x[:20], y[:20]), (x[20:], y[20:])


@pytest.mark.parametrize("steps", [1, 3])
def test_reverse_sees_every_step_and_every_run(batches, steps):
    train, val = batches
    cell, mix = TwoOps(), Mix()
    ll = GradientDescent(objective, cell, mix, lr=LR, iters=steps)
    problem = BilevelProblem(ll, Reverse(objective, mix, objective, cell))
    exact = unrolled(cell, mix, train, val, steps)
    for _ in range(3):  # the patched model is reused from run to run
        (grad,) = problem.hypergradient(train, val)
        torch.testing.assert_close(grad, exact, rtol=1e-10, atol=1e-12)


def test_finite_differences_see_the_moved_weights(batches):
    """DARTS evaluates the objectives at three other weights after the LL step: with stale
    weights its finite difference was 0 and its answer the direct gradient alone."""
    train, val = batches
    cell, mix = TwoOps(), Mix()
    ll = GradientDescent(objective, cell, mix, lr=LR, iters=1)
    problem = BilevelProblem(ll, FiniteDifference(objective, mix, objective, cell, r=1e-4))
    exact = unrolled(cell, mix, train, val, 1)
    for _ in range(3):
        (grad,) = problem.hypergradient(train, val)
        torch.testing.assert_close(grad, exact, rtol=1e-6, atol=1e-9)
