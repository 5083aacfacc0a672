"""First-order (Hessian-free) methods that keep LL variables across UL steps: BOME, PBGD,
BVFIM, MESO, GAFFO, Alternating, F2SA.

Every update rule is pinned by a hand-written dense implementation of its paper's formulas
(three UL steps, to round-off); convergence is checked on benchopt's strongly convex
quadratic problem (closed-form ``x*``, and closed-form minimizers of the penalized
problems that the penalty methods solve at a fixed penalty), on the BDA counter-example
whose LL is convex but not strongly convex (solution set not a singleton), and on an LL with
an inequality constraint (GAFFO). Checkpoints resume bitwise.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul.alternating import Alternating
from bilevel.ul.bome import BOME
from bilevel.ul.bvfim import BVFIM
from bilevel.ul.f2sa import F2SA
from bilevel.ul.gaffo import GAFFO
from bilevel.ul.meso import MESO
from bilevel.ul.pbgd import PBGD

DTYPE = torch.float64
NO_DATA = (torch.zeros(1, dtype=DTYPE), None)  # the objectives close over their matrices


class Vector(nn.Module):
    """One parameter vector ``v``."""

    def __init__(self, n: int, value: float | torch.Tensor = 0.0) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(n, dtype=DTYPE) + value)


# --- benchopt's quadratic problem ----------------------------------------------------------
# f(x, y) = 1/2 y^T A y - y^T B x,  F(x, y) = 1/2 ||y - c||^2 + mu/2 ||x||^2
# y*(x) = A^-1 B x;  x* solves (mu I + B^T A^-2 B) x = B^T A^-1 c.

DX, DY = 3, 4
_g = torch.Generator().manual_seed(0)
_Q = torch.linalg.qr(torch.randn(DY, DY, generator=_g, dtype=DTYPE))[0]
A = _Q @ torch.diag(torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=DTYPE)) @ _Q.T
B = torch.randn(DY, DX, generator=_g, dtype=DTYPE)
C = torch.randn(DY, generator=_g, dtype=DTYPE)
MU = 0.5
A_INV = torch.linalg.inv(A)
X_STAR = torch.linalg.solve(
    MU * torch.eye(DX, dtype=DTYPE) + B.T @ A_INV @ A_INV @ B, B.T @ A_INV @ C
)


def f_quad(state: dict) -> torch.Tensor:
    y, x = state["ll_model"].v, state["ul_model"].v
    return 0.5 * y @ A @ y - y @ (B @ x)


def F_quad(state: dict) -> torch.Tensor:
    y, x = state["ll_model"].v, state["ul_model"].v
    return 0.5 * ((y - C) ** 2).sum() + 0.5 * MU * (x**2).sum()


# gradients, by hand
def gyf(x, y):
    return A @ y - B @ x


def gxf(x, y):
    return -B.T @ y


def gyF(x, y):
    return y - C


def gxF(x, y):
    return MU * x


def fval(x, y):
    return 0.5 * y @ A @ y - y @ (B @ x)


def penalized_solution(M: torch.Tensor, weight: float) -> torch.Tensor:
    """argmin_x min_y F(x, y) + weight/2 (y - y*(x))^T M (y - y*(x)), by a dense solve."""
    P = A_INV @ B
    H = torch.zeros(DX + DY, DX + DY, dtype=DTYPE)
    H[:DX, :DX] = MU * torch.eye(DX, dtype=DTYPE) + weight * P.T @ M @ P
    H[:DX, DX:] = -weight * P.T @ M
    H[DX:, :DX] = -weight * M @ P
    H[DX:, DX:] = torch.eye(DY, dtype=DTYPE) + weight * M
    r = torch.cat([torch.zeros(DX, dtype=DTYPE), C])
    return torch.linalg.solve(H, r)[:DX]


def moreau_matrix(gamma: float) -> torch.Tensor:
    """f - v_gamma = 1/2 e^T M e with e = y - y*(x), M = A - (A^-1 + gamma I)^-1."""
    return A - torch.linalg.inv(A_INV + gamma * torch.eye(DY, dtype=DTYPE))


def quadratic(method, *, lr=0.3, iters=5, ul_lr=0.3, x0=0.0, y0=0.0, **kwargs):
    """(problem, method, ul_model, ll_model) on the quadratic, with SGD on the UL."""
    ul, llm = Vector(DX, x0), Vector(DY, y0)
    ll = GradientDescent(f_quad, llm, ul, lr=lr, iters=iters)
    m = method(F_quad, ul, f_quad, llm, **kwargs)
    return BilevelProblem(ll, m, torch.optim.SGD(ul.parameters(), lr=ul_lr)), m, ul, llm


def run(problem, steps):
    for _ in range(steps):
        problem.step(NO_DATA, NO_DATA)


# --- the papers' updates, written by hand on the dense problem -----------------------------


def gd(x, w, steps, lr, grad):
    for _ in range(steps):
        w = w - lr * grad(x, w)
    return w


def ref_bome(x, y, k, s, lr, iters, ul_lr, eta=0.5, phi="grad_norm", lr_y=None):
    y_hat = gd(x, y, iters, lr, gyf)
    qx, qy = gxf(x, y) - gxf(x, y_hat), gyf(x, y)
    n2 = qx @ qx + qy @ qy
    inner = gxF(x, y) @ qx + gyF(x, y) @ qy
    barrier = eta * (n2 if phi == "grad_norm" else fval(x, y) - fval(x, y_hat))
    lam = torch.clamp_min(barrier - inner, 0.0) / n2.clamp_min(1e-300)  # 0 where grad q = 0
    lr_y = lr if lr_y is None else lr_y
    return x - ul_lr * (gxF(x, y) + lam * qx), y - lr_y * (gyF(x, y) + lam * qy), s


def ref_pbgd(x, y, k, s, lr, iters, ul_lr, gamma=10.0, gamma_growth=0.0, penalty="value"):
    g = gamma + gamma_growth * k
    if penalty == "value":
        y_hat = gd(x, s.get("y_hat", y), iters, lr, gyf)
        s = {"y_hat": y_hat}
        px, py = gxf(x, y) - gxf(x, y_hat), gyf(x, y)
    else:  # p = ||A y - B x||^2
        r = A @ y - B @ x
        px, py = -2 * B.T @ r, 2 * A @ r
    return x - ul_lr * (gxF(x, y) / g + px), y - lr * (gyF(x, y) / g + py), s


def ref_f2sa(x, y, k, s, lr, iters, ul_lr, lam=1.0, lam_growth=0.1):
    lam_k = lam + lam_growth * k
    z = gd(x, s.get("z", y), iters, lr, gyf)
    y = gd(x, y, iters, lr / (1 + lam_k), lambda x, w: gyF(x, w) + lam_k * gyf(x, w))
    d = gxF(x, y) + lam_k * (gxf(x, y) - gxf(x, z))
    return x - ul_lr * d, y, {"z": z}


def ref_meso(x, y, k, s, lr, iters, ul_lr, gamma=10.0, c0=1.0, p=0.25):
    theta = s.get("theta", y)
    if k > 0:  # the previous step's y update, at the current x (Gauss-Seidel order)
        c_prev = c0 * k**p
        y = y - lr * (gyF(x, y) / c_prev + gyf(x, y) - (y - theta) / gamma)
    theta = theta - lr * (gyf(x, theta) + (theta - y) / gamma)
    ck = c0 * (k + 1) ** p
    d = gxF(x, y) / ck + gxf(x, y) - gxf(x, theta)
    return x - ul_lr * d, y, {"theta": theta}


def ref_gaffo(x, y, k, s, lr, iters, ul_lr, gamma1=10.0, c0=1.0, p=0.25):
    theta = s.get("theta", y)
    theta = theta - lr * (gyf(x, theta) + (theta - y) / gamma1)
    ck = c0 * (k + 1) ** p
    dx = gxF(x, y) / ck + gxf(x, y) - gxf(x, theta)
    dy = gyF(x, y) / ck + gyf(x, y) - (y - theta) / gamma1
    return x - ul_lr * dx, y - lr * dy, {"theta": theta}


def ref_bvfim(
    x, y, k, s, lr, iters, ul_lr, mu=0.01, theta=0.01, sigma=0.01, slack="barrier", floor=0.3
):
    m, t, g = mu / (k + 1) ** 1.1, theta / (k + 1) ** 1.1, sigma / (k + 1) ** 0.5
    z = gd(x, s.get("z", y), iters, lr, lambda x, w: gyf(x, w) + m * w)
    reg = 0.5 * m * (z @ z)
    if slack == "barrier":  # the paper's slack phi_mu(x) - f(x, y) at the kept y, floored
        slack_value = torch.clamp_min(fval(x, z) + reg - fval(x, y), floor * reg)
    else:
        slack_value = reg
    rho = g / slack_value
    y = gd(x, y, iters, lr / (1 + rho), lambda x, w: gyF(x, w) + t * w + rho * gyf(x, w))
    d = gxF(x, y) + rho * (gxf(x, y) - gxf(x, z))
    return x - ul_lr * d, y, {"z": z}


def ref_alternating(x, y, k, s, lr, iters, ul_lr):
    y = gd(x, y, iters, lr, gyf)
    return x - ul_lr * gxF(x, y), y, s


CASES = {
    "bome": (BOME, ref_bome, {"eta": 0.7}),
    "bome_value": (BOME, ref_bome, {"phi": "value", "lr_y": 0.2}),
    "pbgd": (PBGD, ref_pbgd, {"gamma": 5.0, "gamma_growth": 2.0}),
    "pbgd_gradient": (PBGD, ref_pbgd, {"gamma": 5.0, "penalty": "gradient"}),
    "f2sa": (F2SA, ref_f2sa, {"lam": 2.0, "lam_growth": 1.5}),
    "meso": (MESO, ref_meso, {"gamma": 2.0, "c0": 3.0, "p": 0.4}),
    "gaffo": (GAFFO, ref_gaffo, {"gamma1": 2.0, "c0": 3.0, "p": 0.4}),
    "bvfim": (BVFIM, ref_bvfim, {"mu": 0.1, "theta": 0.05, "sigma": 0.02}),
    "bvfim_regularized": (
        BVFIM,
        ref_bvfim,
        {"mu": 0.1, "theta": 0.05, "sigma": 0.02, "slack": "regularized"},
    ),
    "alternating": (Alternating, ref_alternating, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_update_rule_matches_hand_written(case):
    """Three UL steps from a generic point equal the paper's formulas written by hand."""
    method, reference, kwargs = CASES[case]
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(DX, generator=g, dtype=DTYPE)
    y0 = torch.randn(DY, generator=g, dtype=DTYPE)
    lr, iters, ul_lr = 0.2, 3, 0.1
    problem, m, ul, llm = quadratic(method, lr=lr, iters=iters, ul_lr=ul_lr, **kwargs)
    with torch.no_grad():
        ul.v.copy_(x0)
        llm.v.copy_(y0)
    x, y, state = x0, y0, {}
    for k in range(3):
        problem.step(NO_DATA, NO_DATA)
        x, y, state = reference(x, y, k, state, lr, iters, ul_lr, **kwargs)
        torch.testing.assert_close(ul.v.detach(), x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(llm.v.detach(), y, rtol=1e-10, atol=1e-12)
        for key, value in state.items():
            torch.testing.assert_close(m.auxiliary[key][0], value, rtol=1e-10, atol=1e-12)
    assert m.steps_taken == 3


# --- convergence on the quadratic ----------------------------------------------------------


def test_penalized_solutions_approach_x_star_at_rate_one_over_penalty():
    """What the penalty methods (PBGD, F2SA; MESO, GAFFO with fixed c) converge to at a fixed
    penalty is O(1/penalty) from x*: the error times the penalty stays bounded (dense
    solves; this is the property their papers' guarantees rest on)."""
    for M in (A, moreau_matrix(1.0)):
        scaled = [w * (penalized_solution(M, w) - X_STAR).norm() for w in (10.0, 100.0, 1000.0)]
        assert max(scaled) < 1.2 * min(scaled)
        assert (penalized_solution(M, 1e6) - X_STAR).norm() < 1e-5


def test_pbgd_reaches_its_penalized_solution():
    """V-PBGD at fixed gamma converges (linearly) to the minimizer of F + gamma (f - f*),
    which is O(1/gamma) from x* (see the test above)."""
    problem, _m, ul, _ = quadratic(PBGD, gamma=3.0, iters=3, ul_lr=0.3)
    run(problem, 300)
    assert (ul.v.detach() - penalized_solution(A, 3.0)).norm() < 1e-8


def test_f2sa_reaches_its_penalized_solution_and_x_star_as_lambda_grows():
    """F2SA at fixed lambda solves the same penalized problem as V-PBGD; with lambda growing
    (10, 20, ..., 500 over 50 steps) it reaches x* to O(1/lambda)."""
    problem, _, ul, _ = quadratic(F2SA, lam=10.0, lam_growth=0.0, iters=3, ul_lr=0.5)
    run(problem, 60)
    assert (ul.v.detach() - penalized_solution(A, 10.0)).norm() < 1e-8
    problem, _m, ul, _ = quadratic(F2SA, lam=10.0, lam_growth=10.0, iters=5)
    run(problem, 50)
    assert (ul.v.detach() - X_STAR).norm() < 1e-3


@pytest.mark.parametrize("method", [MESO, GAFFO])
def test_moreau_methods_reach_their_penalized_solution(method):
    """MESO and GAFFO (unconstrained: the same gap f - v_gamma, different update orders) at a
    fixed c (p = 0) converge to the minimizer of F / c + f - v_gamma."""
    kwargs = {"gamma": 1.0} if method is MESO else {"gamma1": 1.0}
    problem, _m, ul, _ = quadratic(method, c0=3.0, p=0.0, ul_lr=0.5, **kwargs)
    run(problem, 250)
    assert (ul.v.detach() - penalized_solution(moreau_matrix(1.0), 3.0)).norm() < 1e-8


def test_bome_reaches_x_star_with_decreasing_steps():
    """BOME has no fixed point at a constant step (the barrier keeps moving y): at xi = 0.1
    its iterate stays about 0.095 from x* on this problem. With the step decreasing like
    1/k on both x and y the error keeps falling, slowly (0.046 after 150 steps, 0.033 after
    300, 0.028 after 600; with 3 inner steps instead of 5 the inexact y_hat leaves 0.089)."""
    schedule = lambda k: 1.0 / (1.0 + k / 10.0)  # noqa: E731
    problem, _m, ul, _ = quadratic(BOME, ul_lr=0.2, lr_y=lambda k: 0.2 * schedule(k))
    scheduler = torch.optim.lr_scheduler.LambdaLR(problem.ul_optimizer, schedule)
    errors = []
    for k in range(300):
        problem.step(NO_DATA, NO_DATA)
        scheduler.step()
        if k + 1 in (150, 300):
            errors.append(float((ul.v.detach() - X_STAR).norm()))
    assert errors[1] < 0.04 and errors[1] < errors[0] - 0.008


def test_bvfim_reaches_x_star():
    """BVFIM with its default schedules (sigma decaying more slowly than mu) and the paper's
    slack at the kept y: the barrier's weight grows and x approaches x*. (Start away from
    x = 0, where y*(x) = 0 leaves the value-function constraint without interior.)"""
    problem, m, ul, _ = quadratic(BVFIM, iters=3, x0=0.1)
    run(problem, 200)
    assert (ul.v.detach() - X_STAR).norm() < 6e-3
    assert m.diagnostics["rho"] > 30


def _indefinite_ul(slack):
    """x, y scalars: f = (y - x - 2)^2 / 2, F = 5x^2/2 - 2xy + y^2/4: F(x, y*(x)) is strongly
    convex (x* = 2) but F is indefinite in (x, y), so F + rho (f - f*) is unbounded below for
    rho < 1 (its Hessian's determinant is 1.5 (rho - 1))."""

    def f(state):
        return 0.5 * ((state["ll_model"].v - state["ul_model"].v - 2.0) ** 2).sum()

    def F(state):
        x, y = state["ul_model"].v, state["ll_model"].v
        return (2.5 * x**2 - 2.0 * x * y + 0.25 * y**2).sum()

    ul, llm = Vector(1), Vector(1)
    ll = GradientDescent(f, llm, ul, lr=0.5, iters=5)
    m = BVFIM(F, ul, f, llm) if slack is None else BVFIM(F, ul, f, llm, slack=slack)
    return BilevelProblem(ll, m, torch.optim.SGD(ul.parameters(), lr=0.1)), m, ul


def test_bvfim_default_slack_keeps_the_penalized_problem_bounded():
    """The authors' code uses a slack that does not look at y, so the barrier's weight
    rho = sigma / slack stays what the schedules make it (0.02 to 0.06 here, below the 1 that
    this problem needs) and x runs away (the old default, slack='regularized'). The paper's
    slack phi_mu(x) - f(x, y) at the kept y (the default) shrinks when y leaves the LL's
    level set, which raises rho: x converges, O(1/rho) from x* = 2."""
    problem, _m, ul = _indefinite_ul("regularized")
    run(problem, 200)
    assert not abs(float(ul.v.detach())) < 1e6  # diverged (or NaN)
    problem, m, ul = _indefinite_ul(None)
    run(problem, 200)
    assert abs(float(ul.v.detach()) - 2.0) < 0.35
    assert 4 < m.diagnostics["rho"] < 20


def test_bvfim_says_which_step_size_to_lower():
    """An inner loop whose step is above 2 / curvature increases its objective: BVFIM refuses
    the step and names the step size (ll.lr for the z loop, lr_y for the y loop)."""
    problem, m, _ul, _llm = quadratic(BVFIM, lr=1.0, x0=0.1)  # A's largest eigenvalue is 3
    with pytest.raises(FloatingPointError, match=r"Lower ll\.lr"):
        problem.step(NO_DATA, NO_DATA)
    assert m.steps_taken == 0
    problem, m, _ul, _llm = quadratic(BVFIM, lr=0.3, x0=0.1, lr_y=1e3)
    with pytest.raises(FloatingPointError, match="Lower lr_y"):
        problem.step(NO_DATA, NO_DATA)
    assert m.steps_taken == 0


def test_alternating_converges_to_its_own_stationary_point_not_x_star():
    """Alternating drops the implicit term: it converges to where grad_x F(x, y*(x)) = mu x
    vanishes, x = 0, which is not x* (documented bias)."""
    problem, _m, ul, _ = quadratic(Alternating, x0=1.0)
    run(problem, 100)
    assert ul.v.detach().norm() < 1e-6
    assert X_STAR.norm() > 0.5


def test_f2sa_direction_tends_to_the_exact_hypergradient():
    """On ridge regression with per-feature L2 (the UL variables enter the LL objective
    only, the UL loss depends on them only through y), F2SA's UL direction after converged
    inner loops is the gradient of L_lambda, whose distance to the exact (implicit)
    hypergradient falls like 1/lambda."""
    from problems import relative_error, ridge, ridge_exact_hypergradient, ridge_ll, ridge_ul

    errors = []
    for lam in (100.0, 1000.0):
        p = ridge()
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=300)
        m = F2SA(ridge_ul, p.ul_model, ridge_ll, p.ll_model, lam=lam, lam_growth=0.0)
        m.task_gradients(ll, p.train, p.val)
        errors.append(relative_error(p.ul_model.log_l2.grad, ridge_exact_hypergradient(p)))
    assert errors[1] < 2e-3
    assert 8 < errors[0] / errors[1] < 12  # O(1/lambda)


def test_meta_step_with_one_task_is_step():
    """A task batch of one task takes the same step as step(train, val)."""
    one = (torch.zeros(1, 1, dtype=DTYPE), torch.zeros(1, 1, dtype=DTYPE))
    results = []
    for meta in (False, True):
        problem, _m, ul, llm = quadratic(MESO, x0=0.2)
        for _ in range(3):
            if meta:
                problem.meta_step({"train": one, "test": one})
            else:
                problem.step(NO_DATA, NO_DATA)
        results.append((ul.v.detach().clone(), llm.v.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# --- an LL that is convex but not strongly convex (BDA's counter-example) ------------------
# F = 1/2 ||x - y2||^2 + 1/2 ||y1 - e||^2,  f = 1/2 ||y1||^2 - x^T y1 (y2 free in the LL):
# the LL solution set is {(x, y2)}; the optimistic solution is x = y1 = y2 = e, F = 0.

N = 2
E = torch.ones(N, dtype=DTYPE)


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.y1 = nn.Parameter(torch.zeros(N, dtype=DTYPE))
        self.y2 = nn.Parameter(torch.zeros(N, dtype=DTYPE))


def f_bda(state: dict) -> torch.Tensor:
    m, x = state["ll_model"], state["ul_model"].v
    return 0.5 * (m.y1**2).sum() - x @ m.y1


def F_bda(state: dict) -> torch.Tensor:
    m, x = state["ll_model"], state["ul_model"].v
    return 0.5 * ((x - m.y2) ** 2).sum() + 0.5 * ((m.y1 - E) ** 2).sum()


BDA_CASES = {  # method, kwargs, UL steps, tolerance on |x - e|
    "bome": (BOME, {"lr_y": 0.3}, 200, 1e-6),
    "pbgd": (PBGD, {"gamma": 10.0}, 200, 0.15),
    "bvfim": (BVFIM, {}, 100, 0.01),
    "meso": (MESO, {"gamma": 1.0, "c0": 10.0, "p": 0.0}, 200, 0.06),
    "gaffo": (GAFFO, {"gamma1": 1.0, "c0": 10.0, "p": 0.0}, 200, 0.1),
}


@pytest.mark.parametrize("case", sorted(BDA_CASES))
def test_non_strongly_convex_ll_reaches_the_optimistic_solution(case):
    """BOME, V-PBGD, BVFIM, MESO and GAFFO (made for LLs without a unique solution) move x
    to the optimistic solution e: BOME to round-off; the penalty methods at the rate their
    penalty allows (the penalized problem's solution is exactly e here)."""
    method, kwargs, steps, tolerance = BDA_CASES[case]
    ul, llm = Vector(N, 0.5), TwoBlocks()
    ll = GradientDescent(f_bda, llm, ul, lr=0.5, iters=5)
    m = method(F_bda, ul, f_bda, llm, **kwargs)
    problem = BilevelProblem(ll, m, torch.optim.SGD(ul.parameters(), lr=0.3))
    run(problem, steps)
    assert (ul.v.detach() - E).norm() < tolerance
    assert problem.ul.diagnostics["ul_loss"] < 0.05


def test_non_strongly_convex_ll_alternating_and_f2sa():
    """Alternating never moves y2 (f does not depend on it), so x converges to y2's initial
    value 0 and F stays at N/2. F2SA (analysed for strongly convex LLs) still improves, but
    slowly: y2 moves only by F's gradient with F2SA's step lr / (1 + lambda)."""
    ul, llm = Vector(N, 0.5), TwoBlocks()
    ll = GradientDescent(f_bda, llm, ul, lr=0.5, iters=5)
    problem = BilevelProblem(
        ll, Alternating(F_bda, ul, f_bda, llm), torch.optim.SGD(ul.parameters(), lr=0.3)
    )
    run(problem, 100)
    assert ul.v.detach().norm() < 1e-6 and math.isclose(
        float(problem.ul.diagnostics["ul_loss"]), N / 2
    )
    ul, llm = Vector(N, 0.5), TwoBlocks()
    ll = GradientDescent(f_bda, llm, ul, lr=0.5, iters=5)
    m = F2SA(F_bda, ul, f_bda, llm, lam=1.0, lam_growth=3.0)
    problem = BilevelProblem(ll, m, torch.optim.SGD(ul.parameters(), lr=0.3))
    run(problem, 100)
    error = (ul.v.detach() - E).norm()
    assert 0.02 < error < 0.5


# --- an LL with an inequality constraint (GAFFO) -------------------------------------------
# f = 1/2 ||y - x||^2 s.t. y <= b;  F = 1/2 ||y - c||^2 + 1/2 ||x - x0||^2.
# x* = (1.5, 0.15): the first constraint is active there (y1 = b1 = 0.5, multiplier 1).

B_CON = torch.tensor([0.5, 2.0], dtype=DTYPE)
C_CON = torch.tensor([1.0, 0.3], dtype=DTYPE)
X0_CON = torch.tensor([1.5, 0.0], dtype=DTYPE)


def f_con(state: dict) -> torch.Tensor:
    return 0.5 * ((state["ll_model"].v - state["ul_model"].v) ** 2).sum()


def F_con(state: dict) -> torch.Tensor:
    y, x = state["ll_model"].v, state["ul_model"].v
    return 0.5 * ((y - C_CON) ** 2).sum() + 0.5 * ((x - X0_CON) ** 2).sum()


def test_gaffo_with_an_active_ll_constraint():
    """GAFFO handles the LL constraint y <= b through its multipliers: x approaches
    x* = (1.5, 0.15) (O(1/c) bias at c = 10) and the multiplier of the active constraint
    approaches its KKT value 1, the inactive one stays 0."""
    ul, llm = Vector(2), Vector(2)
    ll = GradientDescent(f_con, llm, ul, lr=0.5, iters=1)
    m = GAFFO(
        F_con,
        ul,
        f_con,
        llm,
        ll_constraints=lambda s: s["ll_model"].v - B_CON,
        c0=10.0,
        p=0.0,
        gamma1=1.0,
    )
    problem = BilevelProblem(ll, m, torch.optim.SGD(ul.parameters(), lr=0.5))
    run(problem, 300)
    assert (ul.v.detach() - torch.tensor([1.5, 0.15], dtype=DTYPE)).norm() < 0.03
    z = m.auxiliary["z"][0]
    assert abs(float(z[0]) - 1.0) < 0.1 and float(z[1]) == 0.0


def test_gaffo_constrained_step_matches_hand_written():
    """Three steps with an LL constraint, from a generic point with nonzero multipliers,
    equal the authors' update written by hand (BiC-GAFFA: theta step on L(x, theta, z) +
    |theta - y|^2 / (2 gamma1), lam = max(0, z + gamma2 g(x, y)), the x and y directions at
    (x_k, y_k), then z projected on [0, z_max])."""
    g0 = torch.Generator().manual_seed(3)
    x = torch.randn(2, generator=g0, dtype=DTYPE)
    y = torch.randn(2, generator=g0, dtype=DTYPE)
    gamma1, gamma2, c0, p, lr, eta, lr_z, ul_lr, z_max = 2.0, 0.5, 3.0, 0.3, 0.2, 0.4, 0.3, 0.1, 0.8
    ul, llm = Vector(2, x), Vector(2, y)
    ll = GradientDescent(f_con, llm, ul, lr=lr, iters=1)
    settings = {"gamma1": gamma1, "gamma2": gamma2, "c0": c0, "p": p, "eta": eta}
    m = GAFFO(
        F_con,
        ul,
        f_con,
        llm,
        ll_constraints=lambda s: s["ll_model"].v - B_CON,
        lr_z=lr_z,
        z_max=z_max,
        **settings,
    )
    m.auxiliary = {"theta": None, "z": [torch.tensor([0.7, 0.0], dtype=DTYPE)]}
    problem = BilevelProblem(ll, m, torch.optim.SGD(ul.parameters(), lr=ul_lr))
    theta, z = y.clone(), torch.tensor([0.7, 0.0], dtype=DTYPE)
    for k in range(3):
        problem.step(NO_DATA, NO_DATA)
        # f = |y - x|^2 / 2, g = y - b (grad_y g = I, grad_x g = 0), F as in F_con
        theta = theta - eta * ((theta - x) + z + (theta - y) / gamma1)
        lam = torch.clamp_min(z + gamma2 * (y - B_CON), 0.0)
        ck = c0 * (k + 1) ** p
        dx = (x - X0_CON) / ck + (x - y) - (x - theta)
        dy = (y - C_CON) / ck + (y - x) + lam + (theta - y) / gamma1
        dz = -(theta - B_CON) + (lam - z) / gamma2
        x, y = x - ul_lr * dx, y - lr * dy
        z = torch.clamp(z - lr_z * dz, 0.0, z_max)
        torch.testing.assert_close(ul.v.detach(), x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(llm.v.detach(), y, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.auxiliary["theta"][0], theta, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.auxiliary["z"][0], z, rtol=1e-10, atol=1e-12)


def test_gaffo_reaches_x_star_as_c_grows():
    """With c_k = c0 (k + 1)^p growing, GAFFO's x approaches x* on the strongly convex
    quadratic: the error at step k stays within a constant over c_k (its O(1/c) bias) and
    falls as c grows."""
    problem, m, ul, _ = quadratic(GAFFO, gamma1=1.0, c0=3.0, p=0.4, ul_lr=0.5)
    errors = {}
    for k in range(1, 1601):
        problem.step(NO_DATA, NO_DATA)
        if k in (100, 400, 1600):
            errors[k] = float((ul.v.detach() - X_STAR).norm()) * m.c_at(k - 1)
    # measured: error * c_k = 1.26, 0.45, 0.41 (error 0.067, 0.014, 0.0071)
    assert errors[400] < 0.6 and errors[1600] < 0.6
    assert errors[1600] / m.c_at(1599) < 0.01


# --- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [MESO, F2SA, PBGD, BVFIM])
def test_checkpoint_resumes_bitwise(tmp_path, method):
    """A run interrupted after 3 UL steps and resumed from its checkpoint (new objects, the
    method's auxiliary variables and step counter loaded with weights_only) ends bitwise
    where an uninterrupted run of 6 steps ends."""
    kwargs = {"x0": 0.1}

    def fresh():
        return quadratic(method, **kwargs)

    problem, m, ul, llm = fresh()
    records = []
    problem.run(lambda i: (NO_DATA, NO_DATA), 6, progress=False, log=records.append, log_every=3)
    assert len(records) == 2 and all(math.isfinite(r["ul_loss"]) for r in records)
    expected = (ul.v.detach().clone(), llm.v.detach().clone(), m.state_dict())

    path = tmp_path / "run.pt"
    problem, m, ul, llm = fresh()
    problem.run(lambda i: (NO_DATA, NO_DATA), 3, checkpoint=path, progress=False)
    problem, m, ul, llm = fresh()
    problem.run(lambda i: (NO_DATA, NO_DATA), 6, checkpoint=path, progress=False)
    assert torch.equal(ul.v.detach(), expected[0])
    assert torch.equal(llm.v.detach(), expected[1])
    state = m.state_dict()
    assert state["steps_taken"] == expected[2]["steps_taken"] == 6
    for key, values in expected[2]["auxiliary"].items():
        assert all(torch.equal(a, b) for a, b in zip(state["auxiliary"][key], values, strict=True))


# --- bad input ---------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_cure():
    ul, llm = Vector(DX), Vector(DY)
    with pytest.raises(TypeError, match="eta must be a number"):
        BOME(F_quad, ul, f_quad, llm, eta=True)
    with pytest.raises(ValueError, match="gamma must lie in"):
        PBGD(F_quad, ul, f_quad, llm, gamma=-1.0)
    with pytest.raises(ValueError, match="penalty must be one of"):
        PBGD(F_quad, ul, f_quad, llm, penalty="hessian")
    with pytest.raises(ValueError, match="also parameters of ll_model"):
        Alternating(F_quad, llm, f_quad, llm)
    adam = GradientDescent(f_quad, llm, ul, lr=0.1, iters=2, optimizer="adam")
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        BilevelProblem(adam, F2SA(F_quad, ul, f_quad, llm))
    callable_lr = GradientDescent(
        f_quad, llm, ul, lr=lambda u: torch.tensor(0.1, dtype=DTYPE), iters=2
    )
    with pytest.raises(TypeError, match=r"ll\.lr to be a number"):
        BilevelProblem(callable_lr, MESO(F_quad, ul, f_quad, llm))
    from problems import ridge, ridge_ll, ridge_ul

    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=2)
    alternating = Alternating(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(ValueError, match="only the partial gradient"):
        alternating.task_gradients(ll, p.train, p.val)
    m = MESO(F_quad, ul, f_quad, llm)
    with pytest.raises(TypeError, match="BilevelProblem"):
        m.compute_gradients(None, None, llm, None, None)
    with pytest.raises(ValueError, match="saved by 'f2sa'"):
        m.load_state_dict(F2SA(F_quad, ul, f_quad, llm).state_dict())


def test_nonfinite_step_changes_nothing():
    """A step whose result is NaN raises FloatingPointError and leaves x, y and the method's
    state as they were (so on_nonfinite='skip' skips it cleanly)."""
    problem, m, ul, llm = quadratic(F2SA, lr=1e3, iters=100)  # the inner loops overflow
    before = (ul.v.detach().clone(), llm.v.detach().clone())
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        problem.step(NO_DATA, NO_DATA)
    assert torch.equal(ul.v.detach(), before[0]) and torch.equal(llm.v.detach(), before[1])
    assert m.steps_taken == 0 and m.auxiliary["z"] is None


def test_bvfim_refuses_an_empty_interior():
    """At x = 0 the regularized LL solution is z = 0: the value-function constraint has no
    interior, and BVFIM says so instead of dividing by zero."""
    problem, m, _ul, _llm = quadratic(BVFIM)
    with pytest.raises(FloatingPointError, match="no interior"):
        problem.step(NO_DATA, NO_DATA)
    assert m.steps_taken == 0


@pytest.mark.parametrize("method", [MESO, F2SA])
def test_hypergradient_leaves_a_stateful_methods_state_as_it_was(method):
    """``hypergradient`` is a question, not a step: the method's state and the LL weights it
    keeps come back as they were, so two calls agree and the next step is unchanged."""
    problem, m, _, llm = quadratic(method)
    run(problem, 3)
    state, weights = copy.deepcopy(m.state_dict()), llm.v.detach().clone()
    first = problem.hypergradient(NO_DATA, NO_DATA)
    second = problem.hypergradient(NO_DATA, NO_DATA)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(llm.v.detach(), weights)
    assert str(m.state_dict()) == str(state)


def test_a_batch_of_several_tasks_is_refused_for_a_method_with_one_ll_state():
    """One LL state would be moved once per task within one UL step."""
    two = (torch.zeros(2, 1, 1, dtype=DTYPE), torch.zeros(2, 1, 1, dtype=DTYPE))
    problem, *_ = quadratic(MESO)
    with pytest.raises(ValueError, match=r"keeps one LL state .* batch of 2 tasks"):
        problem.meta_step({"train": two, "test": two})
