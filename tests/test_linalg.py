"""The matrix-free solvers on explicit matrices."""

from __future__ import annotations

import pytest
import torch

from bilevel import linalg

DTYPE = torch.float64


def spd(d=8, cond=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=DTYPE)
    return q @ torch.diag(eig) @ q.T


def as_matvec(a):
    """A matrix split over two tensors, as the solvers see model parameters."""

    def matvec(v):
        flat = torch.cat([t.reshape(-1) for t in v])
        out = a @ flat
        return [out[:3].reshape(3), out[3:].reshape(-1)]

    return matvec


def split(x):
    return [x[:3], x[3:]]


def flat(v):
    return torch.cat([t.reshape(-1) for t in v])


HOST = pytest.mark.parametrize("host", [True, False], ids=["host-checks", "masked"])


@HOST
def test_cg_solves_spd_system(host):
    a = spd()
    b = torch.arange(1.0, 9.0, dtype=DTYPE)
    x, info = linalg.cg(as_matvec(a), split(b), iters=50, tolerance=1e-12, host_checks=host)
    torch.testing.assert_close(flat(x), torch.linalg.solve(a, b), rtol=1e-10, atol=0)
    assert info.converged and not info.diverged
    assert info.iterations <= 8 + 1  # at most d iterations in exact arithmetic, plus round-off
    assert info.residual_norm <= 1e-12 * info.rhs_norm


@HOST
@pytest.mark.parametrize("iters", [1, 5])
def test_cg_one_iteration_returns_the_updated_iterate(iters, host):
    """H = c I: one CG step is exact; the answer is that iterate, not the one before it."""
    c = 4.0
    b = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=DTYPE)
    x, info = linalg.cg(
        lambda v: [c * t for t in v], [b], iters=iters, tolerance=1e-12, host_checks=host
    )
    torch.testing.assert_close(x[0], b / c, rtol=1e-15, atol=0)
    assert info.iterations == 1 and info.converged


@HOST
def test_cg_stops_and_freezes_after_convergence(host):
    a = spd(d=4, cond=3.0)
    b = torch.ones(4, dtype=DTYPE)
    calls = []

    def matvec(v):
        calls.append(1)
        return [a @ v[0]]

    x, info = linalg.cg(matvec, [b], iters=100, tolerance=1e-10, check_every=5, host_checks=host)
    assert info.iterations <= 4 and info.converged
    # masked: exits at the check after 5 products; on the host: as soon as it has converged
    assert len(calls) == (info.iterations if host else 5)
    torch.testing.assert_close(x[0], torch.linalg.solve(a, b), rtol=1e-10, atol=0)


@HOST
def test_cg_flags_indefinite_matrix(host):
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=DTYPE))
    ones = torch.ones(3, dtype=DTYPE)
    _, info = linalg.cg(lambda v: [a @ v[0]], [ones], iters=10, host_checks=host)
    assert info.diverged


@HOST
def test_cg_stops_at_the_last_iterate_before_negative_curvature(host):
    """A saddle: the first direction b has curvature 2 (step to [1, 1]); the second,
    r + 4 p = [6, 2], has curvature -24. Truncated CG returns [1, 1] and stops there."""
    a = torch.diag(torch.tensor([-1.0, 3.0], dtype=DTYPE))
    ones = torch.ones(2, dtype=DTYPE)
    x, info = linalg.cg(lambda v: [a @ v[0]], [ones], iters=10, host_checks=host)
    torch.testing.assert_close(x[0], ones, rtol=0, atol=0)
    assert info.diverged and info.iterations == 1


def test_neumann_and_fixed_point_converge_for_small_alpha():
    a = spd(cond=5.0)
    b = torch.linspace(-1, 1, 8, dtype=DTYPE)
    exact = torch.linalg.solve(a, b)
    alpha = 1.0 / 5.0
    xn, info_n = linalg.neumann(as_matvec(a), split(b), alpha, terms=300)
    xf, info_f = linalg.fixed_point(as_matvec(a), split(b), alpha, iters=300)
    for x, info in ((xn, info_n), (xf, info_f)):
        torch.testing.assert_close(flat(x), exact, rtol=1e-10, atol=0)
        assert info.converged and not info.diverged
        # the reported residual is the true residual of the returned x
        true = (b - a @ flat(x)).norm()
        assert info.residual_norm == pytest.approx(float(true), rel=1e-3, abs=1e-14)


def test_neumann_partial_sum_is_the_series():
    a = spd(d=3, cond=2.0)
    b = torch.tensor([1.0, 2.0, -1.0], dtype=DTYPE)
    alpha, k = 0.3, 4
    m = torch.eye(3, dtype=DTYPE) - alpha * a
    series = alpha * sum(torch.linalg.matrix_power(m, j) @ b for j in range(k + 1))
    x, info = linalg.neumann(lambda v: [a @ v[0]], [b], alpha, terms=k)
    torch.testing.assert_close(x[0], series, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        torch.tensor(info.residual_norm, dtype=DTYPE), (b - a @ x[0]).norm(), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("solver", [linalg.neumann, linalg.fixed_point])
def test_series_divergence_is_flagged(solver):
    a = spd(cond=5.0) * 10.0  # lambda_max = 50
    b = torch.ones(8, dtype=DTYPE)
    _, info = solver(as_matvec(a), split(b), 0.1, 10)  # alpha * lambda_max = 5 > 2
    assert info.diverged and not info.converged


def test_fixed_point_warm_start():
    a = spd(cond=5.0)
    b = torch.ones(8, dtype=DTYPE)
    exact = torch.linalg.solve(a, b)
    x, info = linalg.fixed_point(as_matvec(a), split(b), 0.2, iters=1, x0=split(exact))
    torch.testing.assert_close(flat(x), exact, rtol=1e-12, atol=0)
    assert info.converged


def test_power_iteration_estimates_lambda_max():
    a = spd(cond=30.0)
    estimate = linalg.power_iteration(as_matvec(a), split(torch.zeros(8, dtype=DTYPE)), iters=200)
    assert float(estimate) == pytest.approx(30.0, rel=1e-6)
    rng_before = torch.get_rng_state()
    linalg.power_iteration(as_matvec(a), split(torch.zeros(8, dtype=DTYPE)), iters=3)
    assert torch.equal(rng_before, torch.get_rng_state())  # the global RNG is untouched


@pytest.mark.parametrize("iters", [1, 3, 8, 30])
def test_cg_host_checks_and_masked_loop_agree(iters):
    """The two loops of cg are one algorithm: same iterate and diagnostics at every length."""
    a = spd(cond=50.0)
    b = split(torch.linspace(-1, 2, 8, dtype=DTYPE))
    host, info_h = linalg.cg(as_matvec(a), b, iters, tolerance=1e-9, host_checks=True)
    masked, info_m = linalg.cg(as_matvec(a), b, iters, tolerance=1e-9, host_checks=False)
    torch.testing.assert_close(flat(host), flat(masked), rtol=1e-12, atol=1e-14)
    assert info_h.iterations == info_m.iterations
    assert info_h.converged == info_m.converged and not info_h.diverged
    assert info_h.residual_norm == pytest.approx(info_m.residual_norm, rel=1e-9, abs=1e-15)
