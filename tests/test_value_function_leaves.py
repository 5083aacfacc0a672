"""The first-order methods evaluate the objectives with the trainable LL weights requiring
grad in every evaluation, as the LL run does (float64).

An LL objective may pick the weights it penalizes by ``p.requires_grad`` (a common way to
write an L2 term over the trainable parameters). The first-order methods evaluated ``f`` at
points held fixed (PBGD's and BOME's ``y_hat``, F2SA's ``z``) and reported values with
weights that did not require grad: there the penalty vanished, silently, and its gradient
in the UL parameter with it (PBGD 2.5 where the formula gives 2.2328, F2SA 0 where it gives
0.6571). The same objective written without the idiom must give the same UL steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import BOME, BVFIM, F2SA, GAFFO, MESO, PBGD, Alternating

DTYPE = torch.float64
C = torch.tensor([0.5, 1.5], dtype=DTYPE)
LR, ITERS = 0.3, 4
NO_DATA = (torch.zeros(1, dtype=DTYPE), None)


class Weights(nn.Module):
    """The LL weights ``w`` and a frozen offset that the penalty must leave out."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=DTYPE))
        self.offset = nn.Parameter(torch.tensor([0.2, 0.1], dtype=DTYPE), requires_grad=False)


class Decay(nn.Module):
    """The UL variable: the log of the weight decay."""

    def __init__(self) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.tensor(0.0, dtype=DTYPE))


def fit(state: dict) -> torch.Tensor:
    m = state["ll_model"]
    return 0.5 * ((m.w + m.offset - C) ** 2).sum()


def ll_by_requires_grad(state: dict) -> torch.Tensor:
    """The L2 term over the parameters that require grad."""
    m = state["ll_model"]
    l2 = sum((p**2).sum() for p in m.parameters() if p.requires_grad)
    return fit(state) + 0.5 * state["ul_model"].log_decay.exp() * l2


def ll_by_name(state: dict) -> torch.Tensor:
    """The same function, the L2 term over ``w`` by name."""
    m = state["ll_model"]
    return fit(state) + 0.5 * state["ul_model"].log_decay.exp() * (m.w**2).sum()


def ul_objective(state: dict) -> torch.Tensor:
    """A fit of ``w`` and a small direct term (Alternating follows only the direct one)."""
    direct = 0.01 * state["ul_model"].log_decay ** 2
    return 0.5 * ((state["ll_model"].w - 2 * C) ** 2).sum() + direct


def run(method, ll_objective, options: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Three UL steps; the UL variable, the LL weights and the UL and LL losses reported."""
    ll_model, ul_model = Weights(), Decay()
    problem = BilevelProblem(
        GradientDescent(ll_objective, ll_model, ul_model, lr=LR, iters=ITERS),
        method(ul_objective, ul_model, ll_objective, ll_model, **options),
        torch.optim.SGD(ul_model.parameters(), lr=0.1),
    )
    losses = []
    for _ in range(3):
        losses += [problem.step(NO_DATA, NO_DATA), problem.last_ll_loss]
    return ul_model.log_decay.detach(), ll_model.w.detach(), losses


@pytest.mark.parametrize(
    ("method", "options"),
    [
        (PBGD, {"gamma": 10.0}),
        (F2SA, {"lam": 2.0}),
        (BOME, {}),
        (BVFIM, {}),
        (GAFFO, {}),
        (MESO, {}),
        (Alternating, {}),
    ],
)
def test_an_objective_that_selects_weights_by_requires_grad_gives_the_same_steps(method, options):
    expected = run(method, ll_by_name, options)
    got = run(method, ll_by_requires_grad, options)
    for a, b in zip(got[:2], expected[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.stack(got[2]), torch.stack(expected[2]), rtol=1e-13, atol=0)


def test_pbgd_hypergradient_is_the_formula_with_the_penalty_at_y_hat():
    """PBGD's first direction by hand: ``grad_x F / gamma`` (0 at ``log_decay = 0``) plus
    the penalty's ``grad_x f(x, y) - grad_x f(x, y_hat)``, ``y_hat`` after T LL steps from
    ``y``."""
    ll_model, ul_model = Weights(), Decay()
    gamma = 10.0
    problem = BilevelProblem(
        GradientDescent(ll_by_requires_grad, ll_model, ul_model, lr=LR, iters=ITERS),
        PBGD(ul_objective, ul_model, ll_by_requires_grad, ll_model, gamma=gamma),
    )
    (got,) = problem.hypergradient(NO_DATA, NO_DATA)
    y, offset = ll_model.w.detach(), ll_model.offset.detach()
    decay = ul_model.log_decay.detach().exp()
    y_hat = y.clone()
    for _ in range(ITERS):
        y_hat = y_hat - LR * ((y_hat + offset - C) + decay * y_hat)
    expected = 0.5 * decay * ((y**2).sum() - (y_hat**2).sum())
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
