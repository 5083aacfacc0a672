"""MINRES, CG on the normal equations, operators and their transpose, and solvers as values."""

from __future__ import annotations

import pytest
import torch

from bilevel import linalg

DTYPE = torch.float64


def orthogonal(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    return q


def symmetric(eig, seed=0):
    q = orthogonal(len(eig), seed)
    return q @ torch.diag(torch.as_tensor(eig, dtype=DTYPE)) @ q.T


def spd(scale=1.0, seed=0):
    """Eigenvalues from ``scale`` to ``5 * scale``."""
    return symmetric(torch.linspace(1.0, 5.0, 8, dtype=DTYPE) * scale, seed)


def indefinite(seed=0):
    return symmetric([-3.0, -1.5, -0.5, 0.7, 1.0, 2.0, 4.0, 6.0], seed)


def nonsymmetric(seed=0):
    """A well-conditioned non-symmetric matrix (singular values 1 to 4), neither symmetric nor
    definite."""
    sv = torch.linspace(1.0, 4.0, 8, dtype=DTYPE)
    return orthogonal(8, seed) @ torch.diag(sv) @ orthogonal(8, seed + 100).T


def as_matvec(a):
    """A matrix split over two tensors, as the solvers see model parameters."""

    def matvec(v):
        out = a @ flat(v)
        return [out[:3], out[3:].reshape(5, 1)]

    return matvec


def split(x):
    return [x[:3], x[3:].reshape(5, 1)]


def flat(v):
    return torch.cat([t.reshape(-1) for t in v])


def rhs(seed=0):
    return torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def relative_error(x, exact):
    return float((flat(x) - exact).norm() / exact.norm())


# ---- MINRES ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_minres_solves_symmetric_indefinite_system(seed):
    a, b = indefinite(seed), rhs(seed)
    x, info = linalg.minres(as_matvec(a), split(b), iters=50, tolerance=1e-12)
    assert relative_error(x, torch.linalg.solve(a, b)) < 1e-10
    assert info.method == "minres" and info.converged and not info.diverged
    assert info.iterations <= 8 + 4  # d in exact arithmetic, plus round-off
    true = (b - a @ flat(x)).norm()
    assert info.residual_norm == pytest.approx(float(true), rel=1e-3, abs=1e-13)


def test_minres_solves_the_saddle_that_stops_cg():
    a = torch.diag(torch.tensor([-1.0, 3.0], dtype=DTYPE))
    ones = torch.ones(2, dtype=DTYPE)
    x, info = linalg.minres(lambda v: [a @ v[0]], [ones], iters=10)
    torch.testing.assert_close(x[0], torch.tensor([-1.0, 1 / 3], dtype=DTYPE))
    assert info.converged and info.iterations == 2


def test_minres_warm_start_and_early_stop():
    a, b = indefinite(), rhs()
    exact = torch.linalg.solve(a, b)
    calls = []

    def matvec(v):
        calls.append(1)
        return as_matvec(a)(v)

    x, info = linalg.minres(matvec, split(b), iters=30, x0=split(exact))
    assert info.converged and info.iterations == 0
    assert len(calls) == 1  # the starting residual
    assert relative_error(x, exact) < 1e-12


def test_minres_reports_nonconvergence_after_iters():
    a, b = indefinite(), rhs()
    x, info = linalg.minres(as_matvec(a), split(b), iters=3)
    assert info.iterations == 3 and not info.converged and not info.diverged
    true = float((b - a @ flat(x)).norm())
    assert info.residual_norm == pytest.approx(true, rel=1e-8)


# ---- CG on the normal equations and the transpose ------------------------------------------------


@pytest.mark.parametrize("seed", range(2))
def test_normal_cg_with_explicit_rmatvec(seed):
    a, b = nonsymmetric(seed), rhs(seed)
    x, info = linalg.normal_cg(
        as_matvec(a), split(b), iters=100, tolerance=1e-12, rmatvec=as_matvec(a.T)
    )
    assert relative_error(x, torch.linalg.solve(a, b)) < 1e-10
    assert info.method == "normal_cg" and info.converged and not info.diverged
    true = (b - a @ flat(x)).norm()  # the residual of A x = b, not of the normal equations
    assert info.residual_norm == pytest.approx(float(true), rel=1e-3, abs=1e-13)


def test_normal_cg_with_the_autograd_transpose():
    a, b = nonsymmetric(), rhs()
    x, info = linalg.normal_cg(as_matvec(a), split(b), iters=100, tolerance=1e-12)
    assert relative_error(x, torch.linalg.solve(a, b)) < 1e-10
    assert info.converged


def test_normal_cg_solves_symmetric_indefinite_system():
    a, b = indefinite(), rhs()
    operator = linalg.Operator(as_matvec(a), symmetric=True)
    x, info = linalg.normal_cg(operator, split(b), iters=100, tolerance=1e-12)
    assert relative_error(x, torch.linalg.solve(a, b)) < 1e-10
    assert info.converged and info.residual_norm <= 1e-12 * info.rhs_norm


def test_normal_cg_reports_the_original_residual_when_stopped_early():
    a, b = nonsymmetric(), rhs()
    x, info = linalg.normal_cg(as_matvec(a), split(b), iters=3, rmatvec=as_matvec(a.T))
    assert info.iterations == 3 and not info.converged
    assert info.residual_norm == pytest.approx(float((b - a @ flat(x)).norm()), rel=1e-8)


def test_transpose_of_an_operator():
    a = nonsymmetric()
    plain = as_matvec(a)
    symmetric_op = linalg.Operator(plain, symmetric=True)
    assert linalg.transpose(symmetric_op, split(rhs())) is symmetric_op
    rmatvec = as_matvec(a.T)
    assert linalg.transpose(linalg.Operator(plain, rmatvec=rmatvec), split(rhs())) is rmatvec


@pytest.mark.parametrize("wrap", [False, True], ids=["function", "operator"])
def test_autograd_transpose_equals_the_matrix_transpose(wrap):
    a = nonsymmetric()
    matvec = linalg.Operator(as_matvec(a)) if wrap else as_matvec(a)
    rmatvec = linalg.transpose(matvec, split(rhs()))
    for seed in range(3):
        u = rhs(seed + 10)
        torch.testing.assert_close(flat(rmatvec(split(u))), a.T @ u, rtol=1e-13, atol=1e-13)


def test_autograd_transpose_with_an_unused_block():
    """An output block that does not depend on the input contributes nothing."""
    a = nonsymmetric()[:3, :3]

    def matvec(v):
        return [a @ v[0], torch.zeros(2, dtype=DTYPE)]

    rmatvec = linalg.transpose(matvec, [torch.zeros(3, dtype=DTYPE), torch.zeros(2, dtype=DTYPE)])
    u = [torch.ones(3, dtype=DTYPE), torch.ones(2, dtype=DTYPE)]
    out = rmatvec(u)
    torch.testing.assert_close(out[0], a.T @ u[0])
    torch.testing.assert_close(out[1], torch.zeros(2, dtype=DTYPE))


def test_transpose_of_a_non_differentiable_matvec_says_what_to_pass():
    a = nonsymmetric()

    def detached(v):
        return as_matvec(a)([t.detach() for t in v])

    with pytest.raises(TypeError, match=r"rmatvec=.*Operator\(matvec, symmetric=True\)"):
        linalg.transpose(detached, split(rhs()))
    with pytest.raises(TypeError, match="rmatvec="):
        linalg.normal_cg(detached, split(rhs()), iters=5)


def test_operator_is_a_matvec_and_checks_its_arguments():
    a = spd()
    operator = linalg.Operator(as_matvec(a), symmetric=True)
    torch.testing.assert_close(flat(operator(split(rhs()))), a @ rhs())
    x, info = linalg.cg(operator, split(rhs()), iters=30)
    assert info.converged and relative_error(x, torch.linalg.solve(a, rhs())) < 1e-9
    with pytest.raises(TypeError, match="matvec"):
        linalg.Operator(a)
    with pytest.raises(TypeError, match="rmatvec"):
        linalg.Operator(as_matvec(a), rmatvec=a)
    with pytest.raises(TypeError, match="symmetric"):
        linalg.Operator(as_matvec(a), symmetric=1)


# ---- solvers as values -------------------------------------------------------------------------


def dense_solve(matvec, b):
    """A user's solver: the matrix, column by column from matvec, then a dense solve."""
    n = sum(t.numel() for t in b)
    columns = []
    for j in range(n):
        e = torch.zeros(n, dtype=b[0].dtype)
        e[j] = 1.0
        columns.append(flat(matvec(split(e))))
    return split(torch.linalg.solve(torch.stack(columns, dim=1), flat(b)))


def test_as_solver_wraps_a_user_solve_with_diagnostics():
    a, b = nonsymmetric(), rhs()
    solver = linalg.as_solver(dense_solve, tolerance=1e-12)
    assert isinstance(solver, linalg.Solver) and solver.name == "dense_solve"
    x, info = solver.run(as_matvec(a), split(b))
    assert relative_error(x, torch.linalg.solve(a, b)) < 1e-13
    assert info.method == "dense_solve" and info.iterations == 8  # the products it made
    assert info.converged and not info.diverged
    assert info.residual_norm == pytest.approx(float((b - a @ flat(x)).norm()), abs=1e-15)
    assert info.rhs_norm == pytest.approx(float(b.norm()))
    torch.testing.assert_close(flat(solver(as_matvec(a), split(b))), flat(x))


def test_as_solver_flags_a_nonfinite_answer_and_reports_nonconvergence():
    b = split(rhs())
    _, info = linalg.as_solver(lambda m, b: [t * float("nan") for t in b]).run(as_matvec(spd()), b)
    assert info.diverged and not info.converged
    _, info = linalg.as_solver(lambda m, b: [t * 0.5 for t in b]).run(as_matvec(spd()), b)
    assert not info.diverged and not info.converged


def test_as_solver_keeps_an_operator_for_the_user():
    a = indefinite()
    seen = []

    def solve(matvec, b):
        seen.append(matvec)
        return linalg.minres(matvec, b, 50, 1e-12)[0]

    operator = linalg.Operator(as_matvec(a), symmetric=True)
    x, info = linalg.as_solver(solve).run(operator, split(rhs()))
    assert relative_error(x, torch.linalg.solve(a, rhs())) < 1e-10
    assert isinstance(seen[0], linalg.Operator) and seen[0].symmetric
    assert info.converged and info.iterations > 0


def test_as_solver_returns_a_solver_unchanged():
    solver = linalg.make_solver("cg", 10)
    assert linalg.as_solver(solver) is solver


MALFORMED = {
    "a tensor": (lambda m, b: flat(b), TypeError, "list or tuple"),
    "(x, info)": (lambda m, b: linalg.cg(m, b, 5), TypeError, r"not \(x, info\)"),
    "too few": (lambda m, b: b[:1], ValueError, "1 tensors; b has 2"),
    "a number": (lambda m, b: [b[0], 1.0], TypeError, r"x\[1\]"),
    "wrong shape": (lambda m, b: [b[0], b[1].reshape(-1)], ValueError, r"x\[1\] of shape \(5,\)"),
    "wrong dtype": (lambda m, b: [b[0].float(), b[1]], ValueError, "torch.float32"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_as_solver_refuses_malformed_output(case):
    solve, error, message = case
    with pytest.raises(error, match=message):
        linalg.as_solver(solve).run(as_matvec(spd()), split(rhs()))


def test_as_solver_checks_its_arguments():
    with pytest.raises(TypeError, match="callable"):
        linalg.as_solver("cg")
    with pytest.raises(TypeError, match="tolerance"):
        linalg.as_solver(dense_solve, tolerance=True)


def test_solver_names():
    assert linalg.SOLVERS == ("cg", "neumann", "fixed_point", "minres", "normal_cg")


@pytest.mark.parametrize("name", linalg.SOLVERS)
def test_make_solver_solves_spd_system(name):
    a, b = spd(), rhs()
    alpha = 1.0 / 5.0 if name in ("neumann", "fixed_point") else None
    solver = linalg.make_solver(name, 300, tolerance=1e-12, alpha=alpha)
    assert solver.name == name
    x, info = solver.run(as_matvec(a), split(b))
    assert relative_error(x, torch.linalg.solve(a, b)) < 1e-10
    assert info.method == name and info.converged and not info.diverged
    assert info.alpha == alpha
    torch.testing.assert_close(flat(solver(as_matvec(a), split(b))), flat(x))


BAD_SETTINGS = {
    "unknown name": (("gmres", 10), {}, ValueError, "name must be one of"),
    "series without alpha": (("neumann", 10), {}, ValueError, "alpha is required"),
    "alpha for cg": (("cg", 10), {"alpha": 0.1}, ValueError, "alpha"),
    "bool iters": (("cg", True), {}, TypeError, "iters"),
    "float iters": (("cg", 10.0), {}, TypeError, "iters"),
    "negative iters": (("cg", -1), {}, ValueError, "iters"),
    "bool tolerance": (("cg", 10), {"tolerance": False}, TypeError, "tolerance"),
    "negative tolerance": (("cg", 10), {"tolerance": -1e-3}, ValueError, "tolerance"),
    "bool alpha": (("neumann", 10), {"alpha": True}, TypeError, "alpha"),
    "zero alpha": (("fixed_point", 10), {"alpha": 0.0}, ValueError, "alpha"),
    "nan alpha": (("fixed_point", 10), {"alpha": float("nan")}, ValueError, "alpha"),
    "other string": (("neumann", 10), {"alpha": "fast"}, ValueError, "'auto'"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_make_solver_refuses_bad_settings_naming_them(case):
    args, kwargs, error, message = case
    with pytest.raises(error, match=message):
        linalg.make_solver(*args, **kwargs)


@pytest.mark.parametrize("name", ["neumann", "fixed_point"])
def test_auto_alpha_makes_a_divergent_series_converge(name):
    a, b = spd(scale=10.0), rhs()  # lambda_max = 50: alpha = 0.1 diverges
    _, info = linalg.make_solver(name, 200, alpha=0.1).run(as_matvec(a), split(b))
    assert info.diverged
    solver = linalg.auto_alpha(lambda step: linalg.make_solver(name, 200, alpha=step))
    assert solver.name == name
    x, info = solver.run(as_matvec(a), split(b))
    assert relative_error(x, torch.linalg.solve(a, b)) < 1e-10
    assert info.converged and not info.diverged
    assert info.lambda_max == pytest.approx(50.0, rel=0.05) and info.lambda_max <= 50.0 + 1e-9
    assert info.alpha == pytest.approx(1.0 / info.lambda_max)


def test_make_solver_with_alpha_auto():
    a, b = spd(scale=10.0), rhs()
    x, info = linalg.make_solver("fixed_point", 200, alpha="auto").run(as_matvec(a), split(b))
    assert info.converged and info.lambda_max == pytest.approx(50.0, rel=0.05)
    assert relative_error(x, torch.linalg.solve(a, b)) < 1e-10


def test_auto_alpha_refuses_an_operator_without_positive_curvature():
    solver = linalg.auto_alpha(lambda step: linalg.make_solver("neumann", 10, alpha=step))
    with pytest.raises(ValueError, match=r"no positive curvature.*L2 regularization"):
        solver.run(as_matvec(-spd()), split(rhs()))


def test_auto_alpha_checks_its_arguments():
    with pytest.raises(TypeError, match="must return a Solver"):
        linalg.auto_alpha(lambda step: linalg.neumann)
    with pytest.raises(TypeError, match="power_iters"):
        linalg.auto_alpha(lambda step: linalg.make_solver("neumann", 10, alpha=step), True)
    with pytest.raises(ValueError, match="power_iters"):
        linalg.auto_alpha(lambda step: linalg.make_solver("neumann", 10, alpha=step), 0)


def _float32_system() -> tuple[torch.Tensor, torch.Tensor]:
    """An SPD float32 system of condition number 100 (eigenvalues 0.1 to 10)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(20, 20, generator=generator, dtype=DTYPE))[0]
    a = q @ torch.diag(torch.logspace(-1, 1, 20, dtype=DTYPE)) @ q.T
    return ((a + a.T) / 2).float(), torch.randn(20, generator=generator).float()


@pytest.mark.parametrize("host_checks", [True, False])
@pytest.mark.parametrize("tolerance", [1e-10, 1e-5])
def test_cg_claims_convergence_only_where_the_true_residual_meets_the_tolerance(
    host_checks, tolerance
):
    """The recurrence's residual drifts below the true one: in float32 it passed 1e-10
    (5e-11 relative) where the true residual was 2e-6, and CG stopped reporting
    ``converged=True``. Where it reports convergence the true residual (in float64, of the
    float32 solution) meets the tolerance, and the reported residual is that one to its
    float32 round-off; the reachable tolerance 1e-5 is still met."""
    a, b = _float32_system()
    (x,), info = linalg.cg(lambda v: [a @ v[0]], [b], 50, tolerance, host_checks=host_checks)
    true = float((b.double() - a.double() @ x.double()).norm() / b.double().norm())
    assert info.converged is (tolerance == 1e-5)
    if info.converged:  # (the reported residual is evaluated in float32: 1e-7 of round-off)
        assert true <= 1.1 * tolerance
        assert info.residual_norm / info.rhs_norm == pytest.approx(true, abs=1e-6)
    else:
        assert true > tolerance
