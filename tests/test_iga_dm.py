"""IGA and DM in float64: each against its update written by hand, and where each is (or is
not) the hypergradient."""

from __future__ import annotations

import pytest
import torch
from problems import (
    DTYPE,
    relative_error,
    ridge,
    ridge_exact_hypergradient,
    ridge_hessian,
    ridge_ll,
    ridge_solution,
    ridge_ul,
)
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import DM, IGA


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def ridge_descent(p, lr: float, iters: int) -> torch.Tensor:
    """The ridge LL unrolled by hand from w = 0."""
    (x, y), w = p.train, torch.zeros(p.train[0].shape[1], dtype=DTYPE)
    for _ in range(iters):
        w = w - lr * (x.T @ (x @ w - y) / len(x) + p.l2 * w)
    return w


# --------------------------------------------------------------------------------------------
# IGA


def test_iga_is_its_formula_written_by_hand_on_ridge():
    """grad_lambda F - c grad_lambda f, c = <grad_w F, grad_w f> / ||grad_w f||^2."""
    p = ridge(seed=1)
    lr, iters = 0.3, 5
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=iters)
    iga = IGA(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    (grad,) = BilevelProblem(ll, iga).hypergradient(p.train, p.val)
    w = ridge_descent(p, lr, iters)
    (x, y), (xv, yv) = p.train, p.val
    f_w = x.T @ (x @ w - y) / len(x) + p.l2 * w
    big_f_w = xv.T @ (xv @ w - yv) / len(xv)
    c = (big_f_w @ f_w) / (f_w @ f_w)
    expected = -c * (0.5 * p.l2 * w * w)  # ridge_ul has no direct lambda term
    assert relative_error(grad, expected) < 1e-12
    torch.testing.assert_close(iga.diagnostics["iga_multiplier"], c, rtol=1e-12, atol=0)


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.y = nn.Parameter(torch.tensor(value, dtype=DTYPE))


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor([0.7, -0.4], dtype=DTYPE))

    def target(self) -> torch.Tensor:  # a(lambda)
        return torch.sin(self.lam[0]) + self.lam[1] ** 2

    def curvature(self) -> torch.Tensor:  # h(lambda) > 0
        return torch.exp(self.lam[1])


def scalar_ll(state: dict) -> torch.Tensor:
    """f = h(lambda) (y - a(lambda))^2 / 2: one-dimensional, optimal value 0 for every lambda."""
    ul = state["ul_model"]
    return 0.5 * ul.curvature() * (state["ll_model"].y - ul.target()) ** 2


def scalar_ul(state: dict) -> torch.Tensor:
    return 0.5 * (state["ll_model"].y - 1.0) ** 2 + 0.1 * (state["ul_model"].lam ** 2).sum()


def test_iga_tends_to_the_hypergradient_for_a_scalar_ll_with_constant_optimal_value():
    """There c grad_lambda f -> -a'(lambda) grad_y F, the exact correction (the error is
    O(|y - y*|)); IGA's one well-posed case."""
    ul, net = Pair(), Scalar(3.0)
    data = (torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))
    lam = ul.lam.detach()
    a, h = float(torch.sin(lam[0]) + lam[1] ** 2), float(torch.exp(lam[1]))
    lr = 0.3 / h  # contraction 0.7 per step
    errors = []
    for iters in (20, 40):
        ll = GradientDescent(scalar_ll, net, ul, lr=lr, iters=iters)
        iga = IGA(scalar_ul, ul, scalar_ll, net, converged_warning=None)  # the case it exempts
        (grad,) = BilevelProblem(ll, iga).hypergradient(data, data)
        # y*(lambda) = a(lambda): dF/dlambda = 0.2 lambda + (a - 1) grad a
        exact = 0.2 * lam + (a - 1.0) * torch.stack([torch.cos(lam[0]), 2 * lam[1]])
        errors.append(relative_error(grad, exact))
    assert errors[1] < 1e-4
    assert errors[1] < 1e-2 * errors[0]  # O(0.7^T): the error is the LL's, not a bias


def test_iga_at_a_converged_ll_is_not_the_hypergradient_and_says_so():
    """As grad_w f -> 0, c ~ 1 / ||grad_w f||: the result turns to +-grad_lambda f(w*) and
    grows without bound until the LL gradient is round-off (40 steps leave it at 2.6e-9; at
    100 it is round-off, where c is taken as 0: test_degenerate_points_audit.py). (This is
    BOAT's measured cosine -0.90: the method, not its code.)"""
    p = ridge(seed=0)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=40)
    iga = IGA(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.warns(RuntimeWarning, match="IGA at a converged LL"):
        (grad,) = BilevelProblem(ll, iga).hypergradient(p.train, p.val)
    w = ridge_solution(p)
    along = 0.5 * p.l2 * w * w  # grad_lambda f at the LL solution
    exact = ridge_exact_hypergradient(p)
    assert abs(cosine(grad, along)) > 0.999
    assert grad.norm() > 1e6 * exact.norm()
    assert abs(cosine(grad, exact)) == pytest.approx(cosine(along, exact), abs=1e-3)


def test_iga_refuses_a_bad_warning_threshold():
    p = ridge()
    args = (ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(TypeError, match="converged_warning"):
        IGA(*args, converged_warning=True)
    for bad in (0, 1, -0.5, float("nan")):
        with pytest.raises(ValueError, match="converged_warning must lie in"):
            IGA(*args, converged_warning=bad)
    assert IGA(*args, converged_warning=None).settings() == {}


# --------------------------------------------------------------------------------------------
# DM


@pytest.mark.parametrize("eta", [0.2, "auto"])
def test_dm_is_its_update_written_by_hand(eta):
    """y, z and the UL variables over four UL steps, against the recurrences by hand."""
    p = ridge(seed=3, d=4)
    lr, ul_lr, steps = 0.3, 0.5, 4
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=1)
    dm = DM(ridge_ul, p.ul_model, ridge_ll, p.ll_model, eta=eta)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=ul_lr)
    problem = BilevelProblem(ll, dm, optimizer)
    (x, t), (xv, tv) = p.train, p.val
    log_l2 = p.ul_model.log_l2.detach().clone()
    y, z = torch.zeros(4, dtype=DTYPE), torch.zeros(4, dtype=DTYPE)
    for _ in range(steps):
        problem.step(p.train, p.val)
        l2 = log_l2.exp()
        y = y - lr * (x.T @ (x @ y - t) / len(x) + l2 * y)
        big_f_y = xv.T @ (xv @ y - tv) / len(xv)
        h = x.T @ x / len(x) + torch.diag(l2)
        r = h @ z - big_f_y
        step = (r @ r) / (r @ h @ r) if eta == "auto" else eta
        z = z - step * r
        log_l2 = log_l2 - ul_lr * (-(l2 * y * z))  # d = grad_x F - d/dx <grad_y f, z>
        torch.testing.assert_close(p.ll_model.w.detach(), y, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dm.multiplier[0], z, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p.ul_model.log_l2.detach(), log_l2, rtol=1e-12, atol=1e-14)
        # the step taken, in the models' dtype (a number gave a float32 CPU tensor: 0.2 read
        # 0.20000000298023224)
        taken = dm.diagnostics["eta"]
        assert taken.dtype == DTYPE and taken.device == z.device
        torch.testing.assert_close(taken, torch.as_tensor(step, dtype=DTYPE), rtol=1e-12, atol=0)
    assert dm.steps == steps


class Vector(nn.Module):
    def __init__(self, name: str, n: int) -> None:
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.zeros(n, dtype=DTYPE)))


def quadratic_problem():
    """f = y^T A y / 2 - x^T B y (A SPD), F = ||y - c||^2 / 2 + rho ||x||^2 / 2: y*(x) =
    A^{-1} B^T x =: M x and x* = (M^T M + rho I)^{-1} M^T c."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DTYPE))[0]
    a = q @ torch.diag(torch.tensor([1.0, 1.3, 1.6, 2.0], dtype=DTYPE)) @ q.T
    b = torch.randn(3, 4, generator=g, dtype=DTYPE)
    c = torch.randn(4, generator=g, dtype=DTYPE)
    rho = 0.5

    def ll_objective(state: dict) -> torch.Tensor:
        y, x = state["ll_model"].y, state["ul_model"].x
        return 0.5 * y @ a @ y - x @ b @ y

    def ul_objective(state: dict) -> torch.Tensor:
        y, x = state["ll_model"].y, state["ul_model"].x
        return 0.5 * (y - c).pow(2).sum() + 0.5 * rho * x.pow(2).sum()

    m = torch.linalg.solve(a, b.T)
    x_star = torch.linalg.solve(m.T @ m + rho * torch.eye(3, dtype=DTYPE), m.T @ c)
    return ll_objective, ul_objective, a, c, m, x_star


@pytest.mark.parametrize("eta", [0.4, "auto"])
def test_dm_converges_to_the_solution_of_a_strongly_convex_quadratic_bilevel_problem(eta):
    """Single loop (one LL step per UL step) to x* with y -> y*(x*) and z -> A^{-1} grad_y F:
    linear convergence, to 1e-9 relative in 120 UL steps (about 1e-11 measured)."""
    ll_objective, ul_objective, a, c, m, x_star = quadratic_problem()
    ll_model, ul_model = Vector("y", 4), Vector("x", 3)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.5, iters=1)
    dm = DM(ul_objective, ul_model, ll_objective, ll_model, eta=eta)
    problem = BilevelProblem(ll, dm, torch.optim.SGD(ul_model.parameters(), lr=0.3))
    data = (torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))
    for _ in range(120):
        problem.step(data, data)
    x = ul_model.x.detach()
    assert relative_error(x, x_star) < 1e-9
    y_star = m @ x_star
    assert relative_error(ll_model.y.detach(), y_star) < 1e-9
    assert relative_error(dm.multiplier[0], torch.linalg.solve(a, y_star - c)) < 1e-9


def test_dm_at_its_fixed_point_gives_the_implicit_hypergradient_on_ridge():
    """With many LL steps per UL step and the multiplier converged (UL held fixed), d is the
    implicit hypergradient."""
    p = ridge(seed=4)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=200)
    frozen = torch.optim.SGD(p.ul_model.parameters(), lr=0.0)  # lambda held fixed
    problem = BilevelProblem(ll, DM(ridge_ul, p.ul_model, ridge_ll, p.ll_model), frozen)
    for _ in range(60):  # each step advances y and z
        problem.step(p.train, p.val)
    (grad,) = problem.hypergradient(p.train, p.val)  # a question: y and z stay
    assert relative_error(grad, ridge_exact_hypergradient(p)) < 1e-9
    assert (
        relative_error(
            problem.ul.multiplier[0], torch.linalg.solve(ridge_hessian(p), ridge_ul_grad(p))
        )
        < 1e-9
    )


def ridge_ul_grad(p) -> torch.Tensor:
    xv, yv = p.val
    return xv.T @ (xv @ ridge_solution(p) - yv) / len(xv)


def test_dm_state_survives_a_checkpoint(tmp_path):
    """Resuming from a checkpoint continues the same iterates (y in ll_model, z in the
    method's state)."""

    def make():
        p = ridge(seed=5, d=4)
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=2)
        dm = DM(ridge_ul, p.ul_model, ridge_ll, p.ll_model, eta=0.3)
        opt = torch.optim.SGD(p.ul_model.parameters(), lr=0.5)
        return p, BilevelProblem(ll, dm, opt)

    p, problem = make()
    for _ in range(3):
        problem.step(p.train, p.val)
    problem.save_checkpoint(tmp_path / "dm.pt")
    for _ in range(2):
        problem.step(p.train, p.val)
    q, resumed = make()
    resumed.load_checkpoint(tmp_path / "dm.pt")
    assert resumed.ul.steps == 3
    for _ in range(2):
        resumed.step(q.train, q.val)
    torch.testing.assert_close(q.ul_model.log_l2, p.ul_model.log_l2, rtol=0, atol=0)
    torch.testing.assert_close(resumed.ul.multiplier[0], problem.ul.multiplier[0], rtol=0, atol=0)
    torch.testing.assert_close(q.ll_model.w, p.ll_model.w, rtol=0, atol=0)


def test_dm_refuses_bad_input():
    p = ridge()
    args = (ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(TypeError, match="eta must be a number"):
        DM(*args, eta=True)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eta must be a finite number > 0"):
            DM(*args, eta=bad)
    net = p.ll_model
    with pytest.raises(ValueError, match="cannot also be LL weights"):
        DM(ridge_ul, net, ridge_ll, net)
    dm = DM(*args)
    with pytest.raises(ValueError, match="saved for another model"):
        dm.load_state_dict({"multiplier": [torch.zeros(7, dtype=DTYPE)], "steps": 1})
    with pytest.raises(ValueError, match="'steps' must be an integer"):
        dm.load_state_dict({"multiplier": None, "steps": -1})
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=1, differentiable_steps=0)
    with pytest.raises(TypeError, match="keeps the LL weights"):
        dm.compute_gradients(*p.val, ll.optimize(*p.train), *p.train)
    assert dm.settings() == {"eta": "auto"}
