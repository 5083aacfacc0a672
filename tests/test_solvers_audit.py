"""Audit of the linear solvers against dense float64 solves: what MINRES reports and returns on
ill-conditioned, zero and singular systems."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel import linalg

DTYPE = torch.float64


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]


def matvec(a: torch.Tensor):
    return lambda v: [a @ v[0]]


def true_residual(a: torch.Tensor, x: list[torch.Tensor], b: torch.Tensor) -> float:
    return float((b - a @ x[0]).norm())


@pytest.mark.parametrize("cond", [1e6, 1e8])
def test_minres_reports_the_true_residual_on_an_ill_conditioned_system(cond):
    # SPD, eigenvalues log-spaced from 1 to cond: the rotations' residual drifts below the true
    # one (measured: a claimed relative residual below 1e-10, a true one of 1e-4 at 1e8)
    q = orthogonal(30, 0)
    eigenvalues = torch.logspace(0, math.log10(cond), 30, dtype=DTYPE)
    a = q @ torch.diag(eigenvalues) @ q.T
    b = torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    x, info = linalg.minres(matvec(a), [b], iters=2000, tolerance=1e-10)
    true = true_residual(a, x, b)
    assert info.residual_norm == pytest.approx(true, rel=1e-6)
    assert info.converged == (true <= 1e-10 * float(b.norm()))
    assert not info.diverged


def test_minres_on_a_zero_operator_claims_no_convergence():
    b = torch.ones(4, dtype=DTYPE)
    x, info = linalg.minres(matvec(torch.zeros(4, 4, dtype=DTYPE)), [b], iters=10)
    torch.testing.assert_close(x[0], torch.zeros(4, dtype=DTYPE))
    assert info.residual_norm == pytest.approx(2.0)
    assert not info.converged


def singular_system(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A symmetric PSD matrix with a two-dimensional null space, a consistent right-hand side
    and an inconsistent one (0.3 along a null vector)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DTYPE))[0]
    a = q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, 0.0], dtype=DTYPE)) @ q.T
    consistent = a @ torch.randn(6, generator=g, dtype=DTYPE)
    return a, consistent, consistent + 0.3 * q[:, 4]


def test_minres_on_a_singular_consistent_system_gives_the_minimum_norm_solution():
    a, b, _ = singular_system()
    x, info = linalg.minres(matvec(a), [b], iters=20, tolerance=1e-10)
    torch.testing.assert_close(x[0], torch.linalg.pinv(a) @ b, rtol=0, atol=1e-10)
    assert info.converged and not info.diverged


@pytest.mark.parametrize("iters", [5, 8, 20])
def test_minres_on_a_singular_inconsistent_system_stops_at_a_least_squares_solution(iters):
    # an LL with a flat direction that the UL sees: no solution; the next step after the
    # least-squares solution divided by a round-off pivot (||x|| near 1e13)
    a, _, b = singular_system()
    x, info = linalg.minres(matvec(a), [b], iters=iters, tolerance=1e-10)
    minimum_norm = torch.linalg.pinv(a) @ b
    residual = b - a @ x[0]
    assert float(residual.norm()) == pytest.approx(0.3, rel=1e-8)  # the least-squares residual
    assert float((a @ residual).norm()) < 1e-8  # the normal equations hold
    assert float(x[0].norm()) < 2 * float(minimum_norm.norm())
    assert info.residual_norm == pytest.approx(0.3, rel=1e-8)
    assert not info.converged and not info.diverged


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_minres_least_squares_test_is_scale_free(scale):
    """The least-squares stopping test compares ``||A r||`` with ``||A|| ||r||``: the same
    system scaled by ``1e-12`` (a loss of tiny curvature) or ``1e12`` is solved as the
    unscaled one. (An estimate of ``||A||`` that took ``||b||`` in stopped it before its first
    step at ``1e-12``, returning ``x = 0``.)"""
    q = orthogonal(8, seed=5)
    a = scale * (q @ torch.diag(torch.linspace(1.0, 10.0, 8, dtype=torch.float64)) @ q.T)
    b = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    x, info = linalg.minres(matvec(a), [b], iters=20, tolerance=1e-10)
    exact = torch.linalg.solve(a, b)
    assert info.converged and not info.diverged
    assert float((x[0] - exact).norm() / exact.norm()) < 1e-8


@pytest.mark.parametrize("tolerance", [1e-4, 1e-6])
@pytest.mark.parametrize("n, smallest", [(2, 1e-5), (4, 1e-7), (8, 1e-7)])
def test_minres_solves_an_ill_conditioned_nonsingular_system_at_a_loose_tolerance(
    tolerance, n, smallest
):
    # diag(1 .. smallest), b = ones: Krylov's space is the whole space after n steps, and the
    # solution's largest component, 1 / smallest, lies in the last direction resolved
    a = torch.diag(torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), n, dtype=DTYPE))
    b = torch.ones(n, dtype=DTYPE)
    x, info = linalg.minres(lambda v: [a @ v[0]], [b], iters=4 * n, tolerance=tolerance)
    exact = torch.linalg.solve(a, b)
    assert info.converged and not info.diverged
    assert float((b - a @ x[0]).norm()) <= tolerance * float(b.norm())
    assert float((x[0] - exact).norm() / exact.norm()) < 1e-2
