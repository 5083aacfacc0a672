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
    # masked: exits at the check after 5 products; on the host: as soon as it has converged;
    # either way one more product checks the recurrence's residual against the true one
    assert len(calls) == (info.iterations if host else 5) + 1
    torch.testing.assert_close(x[0], torch.linalg.solve(a, b), rtol=1e-10, atol=0)


@HOST
def test_cg_flags_indefinite_matrix(host):
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=DTYPE))
    ones = torch.ones(3, dtype=DTYPE)
    _, info = linalg.cg(lambda v: [a @ v[0]], [ones], iters=10, host_checks=host)
    assert info.diverged


@HOST
def test_cg_stops_at_negative_curvature_with_its_smallest_residual_iterate(host):
    """A saddle: the first direction b has curvature 2 (step to [1, 1], residual [2, -2]); the
    second, r + 4 p = [6, 2], has curvature -24. Truncated CG stops there and returns the
    iterate of smallest residual: x0 = 0 (residual ||b|| = sqrt 2 < ||[2, -2]||)."""
    a = torch.diag(torch.tensor([-1.0, 3.0], dtype=DTYPE))
    ones = torch.ones(2, dtype=DTYPE)
    x, info = linalg.cg(lambda v: [a @ v[0]], [ones], iters=10, host_checks=host)
    torch.testing.assert_close(x[0], torch.zeros(2, dtype=DTYPE), rtol=0, atol=0)
    assert info.diverged and info.iterations == 1
    assert info.residual_norm == pytest.approx(2**0.5, rel=1e-12)


@HOST
def test_cg_breakdown_returns_the_iterate_with_the_smallest_residual(host):
    """A = [[2, 1, 0], [1, 1/2 + eps, 1], [0, 1, 0]] (indefinite: det = -2), b = e1. By hand:
    x1 = (1/2, 0, 0) with residual (0, -1/2, 0); the next direction (1/4, -1/2, 0) has
    curvature eps/4 > 0, so x2 = x1 + p1 / eps with residual (0, 0, 1/(2 eps)); the third
    direction has negative curvature. CG returns x1, not x2 (which has a norm of 1/(2 eps):
    on few-shot Omniglot, iMAML's such iterates were up to 4,700 times the right-hand side)."""
    eps = 1e-6
    a = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.5 + eps, 1.0], [0.0, 1.0, 0.0]], dtype=DTYPE)
    b = [torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)]
    x, info = linalg.cg(lambda v: [a @ v[0]], b, 10, host_checks=host)
    assert info.diverged and not info.converged and info.iterations == 2
    assert torch.equal(x[0], torch.tensor([0.5, 0.0, 0.0], dtype=DTYPE))
    assert info.residual_norm == pytest.approx(0.5, rel=1e-12)


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


# ---- divergence of the series: no false alarm at round-off, no miss at small k ----------------


def noisy(a, seed, relative=1e-16):
    """``a @ v`` with a seeded relative perturbation of ``relative`` on each output: another
    CPU's rounding (a different summation order or FMA), deterministic."""
    generator = torch.Generator().manual_seed(10_000 + seed)

    def matvec(v):
        out = a @ flat(v)
        out = out + relative * out * torch.randn(out.shape, generator=generator, dtype=out.dtype)
        return split(out)

    return matvec


SERIES = pytest.mark.parametrize("solver", [linalg.neumann, linalg.fixed_point])


@SERIES
def test_series_do_not_flag_jitter_at_roundoff(solver):
    """The residual reaches round-off (~1e-16) long before 200 steps and then jitters; on
    another CPU's rounding, the old last-step growth test flagged 14 of these 20 fixed-point
    solves as diverged although they had converged."""
    for seed in range(20):
        a = spd(cond=5.0, seed=seed)
        b = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        x, info = solver(noisy(a, seed), split(b), 1.0 / 5.0, 200, tolerance=1e-10)
        assert info.converged and not info.diverged, (seed, info)
        torch.testing.assert_close(flat(x), torch.linalg.solve(a, b), rtol=1e-12, atol=0)


def test_fixed_point_warm_started_at_the_answer_is_not_flagged():
    """The residual starts at round-off: growth from there is noise, not divergence."""
    for seed in range(10):
        a = spd(cond=5.0, seed=seed)
        b = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        exact = split(torch.linalg.solve(a, b))
        _, info = linalg.fixed_point(noisy(a, seed), split(b), 0.2, 50, x0=exact)
        assert info.converged and not info.diverged


@SERIES
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", range(5, 11))
def test_series_flag_a_step_slightly_too_large_within_few_steps(solver, seed, k):
    """alpha = 1.02 * 2 / lambda_max: the top eigen-component grows by 4% a step, but after
    5 to 10 steps it has not overtaken the decaying ones, so the residual still shrinks while
    x is several percent wrong. The Rayleigh–Ritz values of the residuals certify it."""
    a = spd(cond=5.0, seed=seed)
    b = torch.ones(8, dtype=DTYPE)
    alpha = 1.02 * 2 / 5.0
    x, info = solver(as_matvec(a), split(b), alpha, k)
    exact = torch.linalg.solve(a, b)
    assert float((flat(x) - exact).norm() / exact.norm()) > 0.02
    assert info.residual_norm < info.rhs_norm  # no growth to see
    assert info.diverged and not info.converged
    assert 4.5 <= info.curvature_max <= 5.0 * (1 + 1e-9)  # a lower bound of lambda_max = 5


@SERIES
@pytest.mark.parametrize("k", range(6, 11))
def test_series_flag_a_step_too_large_while_the_residual_still_shrinks(solver, k):
    """Here the residual shrinks at every step, so no growth test can see the divergence,
    yet the growing component already puts a 3.5-4.5% error into x."""
    a = spd(cond=3.0, seed=1)
    b = torch.ones(8, dtype=DTYPE)
    alpha = 1.02 * 2 / 3.0
    residuals = [b]
    for _ in range(k + 1):
        residuals.append(residuals[-1] - alpha * a @ residuals[-1])
    norms = torch.stack([r.norm() for r in residuals])
    assert (norms[1:] < norms[:-1]).all()
    x, info = solver(as_matvec(a), split(b), alpha, k)
    exact = torch.linalg.solve(a, b)
    assert float((flat(x) - exact).norm() / exact.norm()) > 0.03
    assert info.diverged


@SERIES
@pytest.mark.parametrize("seed", [0, 1])
def test_series_with_a_step_just_below_the_limit_are_not_flagged(solver, seed):
    a = spd(cond=5.0, seed=seed)
    b = torch.ones(8, dtype=DTYPE)
    alpha = 0.98 * 2 / 5.0
    for k in (*range(1, 11), 50):
        _, info = solver(as_matvec(a), split(b), alpha, k)
        assert not info.diverged, k
    x, info = solver(as_matvec(a), split(b), alpha, 900)
    assert info.converged and not info.diverged
    torch.testing.assert_close(flat(x), torch.linalg.solve(a, b), rtol=1e-10, atol=0)


@SERIES
def test_series_flag_negative_curvature(solver):
    """A has a negative eigenvalue: alpha is small, the residual shrinks at first (its other
    components decay faster than the negative one grows), and the quotient < 0 flags it."""
    a = torch.diag(torch.tensor([-0.05, 1.0, 2.0, 3.0], dtype=DTYPE))
    b = torch.tensor([0.1, 1.0, 1.0, 1.0], dtype=DTYPE)
    _, info = solver(lambda v: [a @ v[0]], [b], 0.3, 5)
    assert info.residual_norm < info.rhs_norm
    assert info.diverged


@SERIES
def test_series_certificate_costs_no_extra_product(solver):
    a = spd(cond=5.0)
    calls = []

    def matvec(v):
        calls.append(1)
        return as_matvec(a)(v)

    _, info = solver(matvec, split(torch.ones(8, dtype=DTYPE)), 0.2, 7)
    assert len(calls) == (8 if solver is linalg.neumann else 7) == info.iterations
    assert 1.0 <= info.curvature_max <= 5.0 * (1 + 1e-9) and info.alpha == 0.2


@SERIES
def test_series_curvature_max_approaches_lambda_max(solver):
    a = spd(cond=30.0)
    b = split(torch.linspace(-1, 2, 8, dtype=DTYPE))
    _, info = solver(as_matvec(a), b, 1.9 / 30.0, 60)
    assert info.curvature_max == pytest.approx(30.0, rel=1e-3)
    assert info.curvature_max <= 30.0 * (1 + 1e-9)


@SERIES
def test_series_in_float32_do_not_flag_roundoff(solver):
    for seed in range(10):
        a = spd(cond=5.0, seed=seed).float()
        b = torch.randn(8, generator=torch.Generator().manual_seed(seed)).float()
        _, info = solver(noisy(a, seed, relative=1e-7), split(b), 0.2, 300, tolerance=1e-5)
        assert info.converged and not info.diverged, (seed, info)


@SERIES
def test_series_nonfinite_residual_is_flagged(solver):
    a = spd(cond=5.0) * 1e200
    _, info = solver(as_matvec(a), split(torch.ones(8, dtype=DTYPE)), 1.0, 5)
    assert info.diverged and not info.converged


def test_solver_info_stays_backward_compatible():
    info = linalg.SolverInfo("cg", 3, 1e-12, 1.0, True)
    assert not info.diverged and info.curvature_max is None
    assert info.alpha is None and info.lambda_max is None
    assert set(info.as_dict()) >= {"method", "iterations", "residual_norm", "converged"}
    _, cg_info = linalg.cg(as_matvec(spd()), split(torch.ones(8, dtype=DTYPE)), 20)
    assert cg_info.curvature_max is None and cg_info.alpha is None


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records the torch functions called, to find reads of device values on the host."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@SERIES
@pytest.mark.parametrize("terms", [30, 300], ids=["not-converged", "converged"])
def test_series_read_the_device_once(solver, terms):
    """No host sync in the loop: the one transfer (``to``) comes before any read of a value;
    after it, Neumann reads ``b - A x`` once more where it meets the tolerance."""
    a = spd(cond=5.0)
    b = split(torch.ones(8, dtype=DTYPE))
    with _HostReads() as log:
        _, info = solver(as_matvec(a), b, torch.tensor(0.2, dtype=DTYPE), terms)
    assert info.converged == (terms == 300)
    reads = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"}
    transfer = log.names.index("to")
    assert not reads & set(log.names[:transfer])
    assert log.names.count("to") + log.names.count("cpu") == 1
    after = [name for name in log.names[transfer + 1 :] if name in reads]
    checked = solver is linalg.neumann and info.converged
    assert after == (["numpy", "__float__"] if checked else ["numpy"])


def test_neumann_claims_convergence_only_when_the_true_residual_meets_the_tolerance():
    """BUG (before the fix): in float32 at condition number 100 the series' recurrence
    reported 3e-18 (8e-19 relative) and Neumann ``converged=True`` at a tolerance of 1e-5,
    where ``b - A x`` was 8.9e-5 (2.4e-5 relative; this machine). A claim now holds for the
    residual computed afresh; the reported residual is that one."""
    a = (spd(d=12, cond=100.0, seed=0) / 100.0).float()  # eigenvalues in [0.01, 1]
    b = torch.linspace(-1.0, 2.0, 12)
    tolerance = 1e-5

    def matvec(v):
        return [a @ v[0]]

    x, info = linalg.neumann(matvec, [b], 1.0, 4000, tolerance=tolerance)
    true = float(torch.linalg.vector_norm(b.double() - a.double() @ x[0].double()))
    assert not info.diverged
    # (the library's float32 b - A x is within ~1e-6 of the float64 one here: the bounds below
    # leave the tolerance, 3.7e-5, for it)
    if info.converged:
        assert true <= 2 * tolerance * info.rhs_norm
        assert abs(info.residual_norm - true) <= tolerance * info.rhs_norm


def nonsymmetric(d: int, cond: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``U diag(s) V^T`` with singular values from 1 to ``cond``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    s = torch.logspace(0, float(torch.tensor(cond).log10()), d, dtype=DTYPE)
    return (u @ torch.diag(s) @ v.T).to(dtype)


def relative_residual(a: torch.Tensor, x: list, b: torch.Tensor) -> float:
    """``||b - A x|| / ||b||`` of the solver's answer, in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(b - a @ flat(x).double()) / b.norm())


@pytest.mark.parametrize(
    ("dtype", "cond", "tolerance"),
    [(torch.float32, 10.0, 1e-10), (torch.float32, 100.0, 1e-10), (torch.float64, 1e4, 1e-14)],
)
def test_normal_cg_claims_convergence_only_when_the_true_residual_meets_it(dtype, cond, tolerance):
    """BUG (before the fix): CG on the normal equations reported its recurrence's residual
    and converged=True on it: float32 at condition number 100, 2e-12 relative claimed where
    b - A x was 3e-7; float64 at 1e4, 1e-15 where it was 1e-13."""
    a = nonsymmetric(8, cond, 0, dtype)
    b = torch.randn(8, generator=torch.Generator().manual_seed(7), dtype=DTYPE).to(dtype)
    x, info = linalg.normal_cg(as_matvec(a), split(b), iters=400, tolerance=tolerance)
    true = relative_residual(a, x, b)
    assert not info.diverged
    if dtype == torch.float32:  # 1e-10 is below what float32's b - A x can resolve (~1e-7)
        assert not info.converged
    elif info.converged:  # (the solver's own b - A x is within a few eps of this one)
        assert true <= tolerance + 64 * torch.finfo(dtype).eps


def test_cg_on_an_accelerator_restarts_where_its_recurrence_passes_but_b_minus_ax_does_not():
    """BUG (before the fix): the masked loop (the accelerator's) stopped at the first check
    where its recurrence had passed the tolerance and reported converged=False with most of
    its iterations unused (float32, condition number 100: 11 of 200, 21 products), where the
    host loop restarts from the true residual and converges. Either loop now converges (its
    b - A x meets the tolerance) or spends its iterations: the tolerance is near float32's
    floor here, so which one depends on the CPU's rounding."""
    a = spd(d=8, cond=100.0).float()
    b = torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=DTYPE).float()
    calls = []

    def matvec(v):
        calls.append(1)
        return as_matvec(a)(v)

    for host in (True, False):
        calls.clear()
        x, info = linalg.cg(matvec, split(b), 200, tolerance=1e-6, host_checks=host)
        assert info.converged or len(calls) >= 200, (host, len(calls))
        if info.converged:
            assert relative_residual(a, x, b) <= 1e-6 + 64 * torch.finfo(torch.float32).eps


@HOST
def test_cg_after_a_breakdown_reports_the_residual_of_what_it_returns(host):
    """BUG (before the fix): at a direction of non-positive curvature CG returned the iterate
    with the smallest recurrence residual and reported that residual: 0.044 of ||b||, where
    b - A x of that iterate was 1.04 ||b||, worse than x0 = 0 (float32, one eigenvalue
    -1e-9). Now b - A x is computed for it, and x0 kept where it is better."""
    d = 20
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    eig = torch.logspace(0, 2, d, dtype=DTYPE)
    eig[0] = -1e-9
    a = (q @ torch.diag(eig) @ q.T).float()
    b = torch.randn(d, generator=g, dtype=DTYPE).float()
    x, info = linalg.cg(as_matvec(a), split(b), 300, 1e-14, host_checks=host)
    assert info.diverged
    # b - A x as the solver computes it (float32, the same products): the same rounding
    computed = float((b - a @ flat(x)).norm() / b.norm())
    assert computed <= 1.0 + 1e-5  # no worse than x0 = 0
    assert info.residual_norm / info.rhs_norm == pytest.approx(computed, rel=1e-5)
