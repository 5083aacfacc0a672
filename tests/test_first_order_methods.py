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


def ref_bvfim(x, y, k, s, lr, iters, ul_lr, mu=0.01, theta=0.01, sigma=0.01):
    m, t, g = mu / (k + 1) ** 1.1, theta / (k + 1) ** 1.1, sigma / (k + 1) ** 0.5
    z = gd(x, s.get("z", y), iters, lr, lambda x, w: gyf(x, w) + m * w)
    rho = g / (0.5 * m * (z @ z))
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
    """BVFIM with sigma decaying more slowly than mu (the default schedules): the barrier's
    weight grows and x approaches x*. (Start away from x = 0, where y*(x) = 0 leaves the
    value-function constraint without interior.)"""
    problem, m, ul, _ = quadratic(BVFIM, iters=3, x0=0.1)
    run(problem, 100)
    assert (ul.v.detach() - X_STAR).norm() < 5e-3
    assert m.diagnostics["rho"] > 30


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
