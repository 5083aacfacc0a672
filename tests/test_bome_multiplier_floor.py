"""BOME's multiplier is set to 0 only where the LL weights solve the LL to round-off, not
wherever the inner loop's travel is below ``T`` per-step round-off floors.

Near (not at) the LL solution, in float32 with ``T = 100`` inner steps: the LL gradient is
5.6e3 times its round-off and the first inner step moves 50 floors of ``||y||`` (more than a
step on round-off gradients can), yet ``||y_hat - y||`` is 0.93 of ``T`` floors. lambda was
set to 0 where the paper's formula gives 1333, and ``d`` became ``grad F`` alone (found by a
review helper). At the LL solution the multiplier must stay 0 (``test_degenerate_points_audit``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import BOME

D, ETA, LR, ITERS = 4, 0.5, 0.3, 100
generator = torch.Generator().manual_seed(0)
Q = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=torch.float64))[0]
A = Q @ torch.diag(torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=torch.float64)) @ Q.T
B = torch.randn(D, 2, generator=generator, dtype=torch.float64)
C = torch.randn(D, generator=generator, dtype=torch.float64)
X0 = torch.tensor([0.3, -0.2], dtype=torch.float64)


class Vector(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.v = nn.Parameter(value.clone())


def ll_objective(state: dict) -> torch.Tensor:
    y, x = state["ll_model"].v, state["ul_model"].v
    a, b = A.to(y.dtype), B.to(y.dtype)
    return 0.5 * y @ a @ y - y @ (b @ x)


def ul_objective(state: dict) -> torch.Tensor:
    y = state["ll_model"].v
    return 0.5 * ((y - C.to(y.dtype)) ** 2).sum()


def paper_lambda(x: torch.Tensor, y: torch.Tensor) -> float:
    """The barrier's multiplier of the docstring (phi = eta ||grad q||^2), in float64."""
    y_hat = y.clone()
    for _ in range(ITERS):
        y_hat = y_hat - LR * (A @ y_hat - B @ x)
    q_x, q_y = -B.T @ y + B.T @ y_hat, A @ y - B @ x
    squared = q_x @ q_x + q_y @ q_y
    return float((ETA * squared - (y - C) @ q_y).clamp_min(0) / squared)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bome_near_the_ll_solution_takes_the_papers_multiplier(dtype):
    y_star = torch.linalg.solve(A, B @ X0)
    away = torch.linalg.solve(A, C - y_star)  # the LL gradient A (y - y*) against grad_y F
    y0 = y_star + away / (A @ away).norm() * 2e-3 * y_star.norm()
    ll_model, ul_model = Vector(y0.to(dtype)), Vector(X0.to(dtype))
    x, y = ul_model.v.detach().double(), ll_model.v.detach().double()  # as stored
    gradient = (A @ y - B @ x).norm()
    assert gradient > 1e3 * torch.finfo(dtype).eps * torch.linalg.matrix_norm(A, 2) * y.norm()
    expected = paper_lambda(x, y)
    assert expected > 100
    bome = BOME(ul_objective, ul_model, ll_objective, ll_model, eta=ETA)
    problem = BilevelProblem(GradientDescent(ll_objective, ll_model, ul_model, LR, ITERS), bome)
    no_data = (torch.zeros(1, dtype=dtype), None)
    problem.hypergradient(no_data, no_data)
    got = float(bome.diagnostics["lambda"])
    assert got == pytest.approx(expected, rel=1e-2 if dtype == torch.float32 else 1e-9)
