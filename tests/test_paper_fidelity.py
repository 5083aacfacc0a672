"""Paper fidelity: each first-order, penalty, value-function and stochastic method against its
paper's update, written here independently of the library and of its other tests.

How these references differ from ``test_first_order_methods.py``, ``test_stochastic_methods.py``
and ``test_iga_dm.py``:

- every gradient is taken by ``torch.autograd`` on plain functions ``f(x, y)`` and
  ``F(x, y)`` (no hand-derived gradients, no library code), so the references carry only the
  papers' update equations;
- the problem is NOT quadratic: the LL Hessian depends on ``y`` (a quartic term) and on ``x``
  (an ``|x|^2 |y|^2`` coupling), and ``F`` couples ``x`` and ``y``, so evaluating a gradient or
  a Hessian at the wrong iterate (``y_k`` instead of ``y_{k+1}``, ``x_k`` instead of
  ``x_{k+1}``, ``z_k`` instead of ``z_{k+1}``) changes the result beyond round-off;
- the stochastic methods run with a scripted sampler (one sample per batch, batches chosen in
  advance) on per-sample objectives that differ from sample to sample, so the tests pin which
  minibatch feeds which term (the papers' independent batches), not only the full-batch
  updates.

Where the library deliberately parametrizes a step differently from the paper (PBGD's
``lr / gamma``, F2SA's ``lr_y / (1 + lambda)``, BOME's ``lr_y``), the reference writes the
paper's form and maps the constants, so the mapping itself is pinned. Sources (update
equations): the papers cited in each test; where a public reference implementation exists it
was read for the equations (benchopt's ``benchmark_bilevel`` solvers, the authors' code of
StocBiO, AmIGO, V-PBGD, BiC-GAFFA and sl-BAMM, BOAT 1.1.1); no code was copied.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import (
    BOME,
    BVFIM,
    DM,
    F2SA,
    GAFFO,
    IGA,
    MESO,
    PBGD,
    SABA,
    SOBA,
    Alternating,
    AmIGO,
    Sampler,
    StocBiO,
)
from bilevel.ul.sampling import Minibatch

DTYPE = torch.float64
TOL = {"rtol": 1e-11, "atol": 1e-13}  # a few steps of O(1) arithmetic in float64
NO_DATA = (torch.zeros(1, dtype=DTYPE), None)  # the deterministic objectives close over data


class Vec(nn.Module):
    """One parameter vector ``v``."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.v = nn.Parameter(value.clone())


# --- the problem: non-quadratic, x- and y-dependent LL Hessian -------------------------------

DX, DY = 2, 3
_g = torch.Generator().manual_seed(11)
_Q = torch.linalg.qr(torch.randn(DY, DY, generator=_g, dtype=DTYPE))[0]
A = _Q @ torch.diag(torch.tensor([1.0, 1.5, 2.2], dtype=DTYPE)) @ _Q.T
B = torch.randn(DY, DX, generator=_g, dtype=DTYPE)
C = torch.randn(DY, generator=_g, dtype=DTYPE)
D = torch.randn(DY, DX, generator=_g, dtype=DTYPE)
MU, KAPPA = 0.4, 0.3
X0 = torch.tensor([0.3, -0.2], dtype=DTYPE)
Y0 = torch.tensor([0.1, 0.4, -0.3], dtype=DTYPE)


def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LL: strongly convex in y; Hessian A + |x|^2/2 I + KAPPA diag(y^2)."""
    return 0.5 * y @ A @ y - y @ (B @ x) + 0.25 * (x @ x) * (y @ y) + KAPPA / 12 * (y**4).sum()


def F(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """UL: depends on x directly and through a cross term."""
    return 0.5 * ((y - C) ** 2).sum() + 0.5 * MU * (x @ x) + 0.3 * y @ (D @ x)


def ll_objective(state: dict) -> torch.Tensor:
    return f(state["ul_model"].v, state["ll_model"].v)


def ul_objective(state: dict) -> torch.Tensor:
    return F(state["ul_model"].v, state["ll_model"].v)


# --- derivatives by autograd on plain tensors (independent of the library) -------------------


def grad(fun, x, y):
    """``(grad_x fun, grad_y fun)`` at ``(x, y)``."""
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    gx, gy = torch.autograd.grad(fun(x, y), (x, y), allow_unused=True)
    return (torch.zeros_like(x) if gx is None else gx), gy


def gx(fun, x, y):
    return grad(fun, x, y)[0]


def gy(fun, x, y):
    return grad(fun, x, y)[1]


def second(fun, x, y, v):
    """``(grad2_xy fun v, grad2_yy fun v)``: derivatives of ``<grad_y fun, v>``."""
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    (g,) = torch.autograd.grad(fun(x, y), y, create_graph=True)
    cross, hess = torch.autograd.grad(g @ v, (x, y), allow_unused=True)
    return (torch.zeros_like(x) if cross is None else cross), hess


def descend(fun, x, y, steps, lr):
    """``steps`` gradient steps on ``fun(x, .)`` from ``y``."""
    for _ in range(steps):
        y = y - lr * gy(fun, x, y)
    return y


def setup(method, *, lr=0.2, iters=3, ul_lr=0.1, y0=Y0, **options):
    """(problem, method, ul_model, ll_model) from (X0, y0) with SGD on the UL."""
    ul, ll_model = Vec(X0), Vec(y0)
    ll = GradientDescent(ll_objective, ll_model, ul, lr=lr, iters=iters)
    m = method(ul_objective, ul, ll_objective, ll_model, **options)
    return BilevelProblem(ll, m, torch.optim.SGD(ul.parameters(), lr=ul_lr)), m, ul, ll_model


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach(), expected, **TOL)


def test_the_problem_distinguishes_iterates():
    """The premise of the tests below: the LL Hessian moves with y and x, and F's gradients
    with both, by far more than round-off."""
    v = torch.tensor([1.0, -0.5, 0.25], dtype=DTYPE)
    y1 = descend(f, X0, Y0, 1, 0.2)
    _, h0 = second(f, X0, Y0, v)
    _, h1 = second(f, X0, y1, v)
    _, h2 = second(f, X0 + 0.1, Y0, v)
    assert (h0 - h1).norm() > 1e-3 and (h0 - h2).norm() > 1e-3
    assert (gx(f, X0, Y0) - gx(f, X0, y1)).norm() > 1e-2


# --- BOME ----------------------------------------------------------------------------------


Y_ALIGNED = -C  # a start where <grad F, grad q> exceeds phi: lambda is clamped to 0


@pytest.mark.parametrize("y0", [Y0, Y_ALIGNED], ids=["barrier-active", "clamped"])
@pytest.mark.parametrize("phi", ["grad_norm", "value"])
def test_bome_is_its_algorithm_1(phi, y0):
    """Liu, Ye, Wright, Stone & Liu (2022), Algorithm 1: y_hat = T GD steps on f(x_k, .) from
    y_k; q = f(x, y) - f(x, y_hat) (y_hat fixed); phi = eta |grad q|^2 (or eta q);
    lambda = max(phi - <grad F, grad q>, 0) / |grad q|^2; (x, y) -= xi (grad F + lambda grad q)
    at (x_k, y_k) (same as benchopt's solver). The paper's single xi is the UL lr and lr_y."""
    alpha, T, xi, eta = 0.2, 3, 0.1, 0.5
    problem, _, ul, llm = setup(BOME, lr=alpha, iters=T, ul_lr=xi, y0=y0, eta=eta, phi=phi, lr_y=xi)
    x, y = X0, y0
    signs = set()
    for _ in range(3):
        problem.step(NO_DATA, NO_DATA)
        y_hat = descend(f, x, y, T, alpha)
        big_x, big_y = grad(F, x, y)
        fx, fy = grad(f, x, y)
        qx, qy = fx - gx(f, x, y_hat), fy
        n2 = qx @ qx + qy @ qy
        barrier = eta * (n2 if phi == "grad_norm" else f(x, y) - f(x, y_hat))
        excess = barrier - (big_x @ qx + big_y @ qy)
        signs.add(bool(excess > 0))
        lam = torch.clamp_min(excess, 0.0) / n2
        x, y = x - xi * (big_x + lam * qx), y - xi * (big_y + lam * qy)
        assert_close(ul.v, x)
        assert_close(llm.v, y)
    assert signs == {y0 is Y0}  # the branch named by the id was taken at every step


# --- PBGD ----------------------------------------------------------------------------------


def test_v_pbgd_is_its_algorithm_with_the_documented_step_mapping():
    """Shen & Chen (2023), V-PBGD: y_hat = T GD steps on f(x_k, .), warm-started from the last
    y_hat (as the authors' hyper-cleaning code does); (x, y) -= a (grad F + gamma grad p),
    grad p = (grad_x f(x, y) - grad_x f(x, y_hat), grad_y f(x, y)), all at (x_k, y_k). The
    library's step is lr * (grad F / gamma + grad p): the paper's a = lr / gamma. gamma grows
    by gamma_growth per step (the authors' code grows it linearly to gamma_max)."""
    alpha, T, xi, gamma, growth = 0.2, 3, 0.15, 2.0, 1.5
    problem, _, ul, llm = setup(
        PBGD, lr=alpha, iters=T, ul_lr=xi, gamma=gamma, gamma_growth=growth, lr_y=xi
    )
    x, y, y_hat = X0, Y0, Y0
    for k in range(3):
        problem.step(NO_DATA, NO_DATA)
        g_k = gamma + growth * k
        y_hat = descend(f, x, y_hat, T, alpha)
        big_x, big_y = grad(F, x, y)
        fx, fy = grad(f, x, y)
        a = xi / g_k
        x, y = x - a * (big_x + g_k * (fx - gx(f, x, y_hat))), y - a * (big_y + g_k * fy)
        assert_close(ul.v, x)
        assert_close(llm.v, y)


def test_g_pbgd_penalizes_the_squared_ll_gradient():
    """Shen & Chen (2023), G-PBGD: p = |grad_y f|^2, grad p = 2 (grad2_xy f, grad2_yy f)
    grad_y f; the same joint step as V-PBGD (no inner loop)."""
    xi, gamma = 0.05, 3.0
    problem, _, ul, llm = setup(PBGD, lr=0.2, iters=1, ul_lr=xi, gamma=gamma, penalty="gradient")
    x, y = X0, Y0
    for _ in range(2):
        problem.step(NO_DATA, NO_DATA)
        big_x, big_y = grad(F, x, y)
        px, py = second(f, x, y, 2.0 * gy(f, x, y))
        a = xi / gamma
        x, y = x - a * (big_x + gamma * px), y - 0.2 / gamma * (big_y + gamma * py)
        assert_close(ul.v, x)
        assert_close(llm.v, y)


# --- F2SA ----------------------------------------------------------------------------------


def test_f2sa_is_its_algorithm_1():
    """Kwon, Kwon, Wright & Nowak (2023), Algorithm 1 (deterministic oracles): T steps
    z -= gamma grad_y f(x_k, z) and y -= alpha_k (grad_y F(x_k, y) + lambda_k grad_y f(x_k, y)),
    both warm-started (z_0 = y_0, as benchopt); then x -= xi (grad_x F(x_k, y_{k+1}) +
    lambda_k (grad_x f(x_k, y_{k+1}) - grad_x f(x_k, z_{k+1}))); lambda += delta. The library's
    alpha_k is lr_y / (1 + lambda_k) (documented)."""
    alpha, T, xi, lam0, delta, lr_y = 0.2, 3, 0.1, 2.0, 1.0, 0.45
    problem, _, ul, llm = setup(
        F2SA, lr=alpha, iters=T, ul_lr=xi, lam=lam0, lam_growth=delta, lr_y=lr_y
    )
    x, y, z, lam = X0, Y0, Y0, lam0
    for _ in range(3):
        problem.step(NO_DATA, NO_DATA)
        z = descend(f, x, z, T, alpha)
        a_k = lr_y / (1.0 + lam)
        y = descend(lambda u, w, lam=lam: F(u, w) + lam * f(u, w), x, y, T, a_k)
        x = x - xi * (gx(F, x, y) + lam * (gx(f, x, y) - gx(f, x, z)))
        lam = lam + delta
        assert_close(ul.v, x)
        assert_close(llm.v, y)


# --- MESO (MEHA) ----------------------------------------------------------------------------


def test_meso_is_meha_algorithm_1_with_y_at_the_new_x():
    """Liu, Liu, Yao, Zeng & Zhang (2024), MEHA, Algorithm 1 (smooth LL, no constraint set):
    theta_{k+1} = theta_k - eta (grad_y f(x_k, theta_k) + (theta_k - y_k) / gamma);
    x_{k+1} = x_k - alpha d_x, d_x = grad_x F(x_k, y_k)/c_k + grad_x f(x_k, y_k)
    - grad_x f(x_k, theta_{k+1}); y_{k+1} = y_k - beta d_y,
    d_y = grad_y F(x_{k+1}, y_k)/c_k + grad_y f(x_{k+1}, y_k) - (y_k - theta_{k+1}) / gamma,
    c_k = c0 (k + 1)^p. The library takes the y step at the start of the next UL step, so after
    K UL steps ll_model holds y_{K-1} (documented)."""
    alpha, beta, eta, gamma, c0, p = 0.1, 0.15, 0.2, 2.0, 1.5, 0.3
    problem, m, ul, llm = setup(
        MESO, lr=0.3, iters=1, ul_lr=alpha, gamma=gamma, c0=c0, p=p, eta=eta, lr_y=beta
    )
    x, y, theta, gap = X0, Y0, Y0, 0.0
    for k in range(4):
        problem.step(NO_DATA, NO_DATA)
        assert_close(llm.v, y)  # y_k: the step to y_{k+1} is taken at the next UL step
        c = c0 * (k + 1) ** p
        theta = theta - eta * (gy(f, x, theta) + (theta - y) / gamma)
        x_new = x - alpha * (gx(F, x, y) / c + gx(f, x, y) - gx(f, x, theta))
        y_at_old_x = y - beta * (gy(F, x, y) / c + gy(f, x, y) - (y - theta) / gamma)
        y = y - beta * (gy(F, x_new, y) / c + gy(f, x_new, y) - (y - theta) / gamma)
        gap = max(gap, float((y - y_at_old_x).norm()))
        x = x_new
        assert_close(ul.v, x)
        assert_close(m.auxiliary["theta"][0], theta)
    assert gap > 1e-4  # a y step at x_k (Jacobi order) would have failed this test


# --- GAFFO (BiC-GAFFA) ---------------------------------------------------------------------


def constraints_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g(x, y) <= 0: a linear constraint that the LL solution violates (it becomes active),
    and a constraint convex in y that stays inactive."""
    return torch.stack([-y[0] - 0.2 + 0.5 * x[0], y[2] ** 2 + x[1] ** 2 - 0.5])


def lagrangian(multipliers: torch.Tensor):
    """The LL Lagrangian ``L(x, y, z) = f + <z, g>`` at fixed multipliers, as ``(x, y) -> .``."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f(x, y) + multipliers @ constraints_fn(x, y)

    return loss


def ll_constraints(state: dict) -> torch.Tensor:
    return constraints_fn(state["ul_model"].v, state["ll_model"].v)


def test_gaffo_is_bic_gaffa_algorithm_1():
    """Yao, Yin, Zeng & Zhang (2025), BiC-GAFFA (as in the authors' Toy/Toy.py), with the
    Lagrangian L(x, y, z) = f + <z, g>, all at (x_k, y_k, z_k):
    lam = max(0, z_k + gamma2 g(x_k, y_k));
    theta_{k+1} = theta_k - eta (grad_y L(x_k, theta_k, z_k) + (theta_k - y_k) / gamma1);
    d_x = grad_x F/c_k + grad_x L(x_k, y_k, lam) - grad_x L(x_k, theta_{k+1}, z_k);
    d_y = grad_y F/c_k + grad_y L(x_k, y_k, lam) - (y_k - theta_{k+1}) / gamma1;
    d_z = -g(x_k, theta_{k+1}) + (lam - z_k) / gamma2; z_{k+1} = clip(z_k - beta_z d_z, 0, R)."""
    alpha, beta, eta, beta_z, g1, g2, c0, p, r = 0.1, 0.12, 0.2, 0.3, 2.0, 0.8, 1.5, 0.3, 0.12
    problem, m, ul, llm = setup(
        GAFFO,
        lr=0.3,
        iters=1,
        ul_lr=alpha,
        ll_constraints=ll_constraints,
        gamma1=g1,
        gamma2=g2,
        c0=c0,
        p=p,
        eta=eta,
        lr_y=beta,
        lr_z=beta_z,
        z_max=r,
    )
    x, y, theta, z = X0, Y0, Y0, torch.zeros(2, dtype=DTYPE)
    branches = set()
    for k in range(5):
        problem.step(NO_DATA, NO_DATA)
        c = c0 * (k + 1) ** p
        lam = torch.clamp_min(z + g2 * constraints_fn(x, y), 0.0)
        branches |= {"lam > 0"} if bool((lam > 0).any()) else set()
        theta = theta - eta * (gy(lagrangian(z), x, theta) + (theta - y) / g1)
        lag_x, lag_y = grad(lagrangian(lam), x, y)
        big_x, big_y = grad(F, x, y)
        d_x = big_x / c + lag_x - gx(lagrangian(z), x, theta)
        d_y = big_y / c + lag_y - (y - theta) / g1
        d_z = -constraints_fn(x, theta) + (lam - z) / g2
        x, y = x - alpha * d_x, y - beta * d_y
        unclipped = z - beta_z * d_z
        z = torch.clamp(unclipped, 0.0, r)
        branches |= {"z at 0"} if bool((unclipped < 0).any()) else set()
        branches |= {"z at R"} if bool((unclipped > r).any()) else set()
        branches |= {"z inside"} if bool(((unclipped > 0) & (unclipped < r)).any()) else set()
        assert_close(ul.v, x)
        assert_close(llm.v, y)
        assert_close(m.auxiliary["theta"][0], theta)
        assert_close(m.auxiliary["z"][0], z)
    assert branches == {"lam > 0", "z at 0", "z at R", "z inside"}  # every branch was taken


# --- BVFIM: the documented rule (the paper's barrier taken as a frozen-weight penalty) -------


def test_bvfim_follows_its_documented_barrier_gradient():
    """Liu, Liu, Yuan, Zeng & Zhang (2021), with the library's documented choices: z runs T GD
    steps on f + mu_k/2 |z|^2 (warm-started), phi = f(x_k, z) + mu_k/2 |z|^2 (Danskin:
    grad phi = grad_x f(x_k, z)); rho = sigma_k / s, s = max(phi - f(x_k, y_k),
    floor * mu_k/2 |z|^2); y runs y_iters GD steps of size lr_y / (1 + rho) on
    F + theta_k/2 |y|^2 + rho f; x moves along grad_x F(x_k, y) + rho (grad_x f(x_k, y) -
    grad_x f(x_k, z)), the x-gradient of -sigma ln(phi_mu(x) - f(x, y)) at the frozen
    weight. mu_k = mu/(k+1)^1.1, theta_k = theta/(k+1)^1.1, sigma_k = sigma/(k+1)^0.5. The
    start (y_0 = the LL solution at x_0) makes the paper's slack the larger one at the first
    step and the floor the larger one later: both branches are taken."""
    alpha, T, xi, mu, th, sigma, y_iters, lr_y, floor = 0.2, 3, 0.1, 1.0, 0.05, 1.0, 2, 0.3, 0.1
    y_ll = descend(f, X0, Y0, 300, 0.3)  # the LL solution at x_0, to round-off
    problem, m, ul, llm = setup(
        BVFIM,
        lr=alpha,
        iters=T,
        ul_lr=xi,
        y0=y_ll,
        mu=mu,
        theta=th,
        sigma=sigma,
        y_iters=y_iters,
        lr_y=lr_y,
        slack_floor=floor,
    )
    x, y, z = X0, y_ll, y_ll
    floored = []
    for k in range(3):
        problem.step(NO_DATA, NO_DATA)
        mu_k, th_k, sg_k = mu / (k + 1) ** 1.1, th / (k + 1) ** 1.1, sigma / (k + 1) ** 0.5
        z = descend(lambda u, w, mu_k=mu_k: f(u, w) + 0.5 * mu_k * (w @ w), x, z, T, alpha)
        reg = 0.5 * mu_k * (z @ z)
        gap = f(x, z) + reg - f(x, y)
        floored.append(bool(gap < floor * reg))
        rho = sg_k / torch.maximum(gap, floor * reg)

        def barrier(u, w, rho=rho, th_k=th_k):
            return F(u, w) + 0.5 * th_k * (w @ w) + rho * f(u, w)

        y = descend(barrier, x, y, y_iters, lr_y / (1.0 + rho))
        x = x - xi * (gx(F, x, y) + rho * (gx(f, x, y) - gx(f, x, z)))
        assert_close(ul.v, x)
        assert_close(llm.v, y)
        assert_close(m.auxiliary["z"][0], z)
    assert floored == [False, True, True]


# --- Alternating ---------------------------------------------------------------------------


def test_alternating_takes_the_partial_gradient_after_the_ll_steps():
    """BOAT's ALTO for T = 1: T GD steps on f(x_k, .) from y_k, then x -= xi grad_x F(x_k,
    y_{k+1})."""
    alpha, T, xi = 0.2, 2, 0.1
    problem, _, ul, llm = setup(Alternating, lr=alpha, iters=T, ul_lr=xi)
    x, y = X0, Y0
    for _ in range(3):
        problem.step(NO_DATA, NO_DATA)
        y = descend(f, x, y, T, alpha)
        x = x - xi * gx(F, x, y)
        assert_close(ul.v, x)
        assert_close(llm.v, y)


# --- DM (sl-BAMM) and IGA (LwCL) -----------------------------------------------------------


@pytest.mark.parametrize("eta", [0.3, "auto"])
def test_dm_is_sl_bamm_with_derivatives_at_the_new_y_and_the_new_multiplier(eta):
    """Liu, Liu, Yao, Zeng & Zhang (2023), sl-BAMM without averaging (the authors'
    ``Darts_W_RHG`` / ``Darts_W_CG``): y_{k+1} = y_k - beta grad_y f(x_k, y_k);
    z_{k+1} = z_k - eta (grad2_yy f(x_k, y_{k+1}) z_k - grad_y F(x_k, y_{k+1}));
    x_{k+1} = x_k - alpha (grad_x F(x_k, y_{k+1}) - grad2_xy f(x_k, y_{k+1}) z_{k+1});
    eta="auto": eta_k = |r|^2 / r^T H r, r = H z_k - grad_y F."""
    beta, xi = 0.3, 0.1
    problem, m, ul, llm = setup(DM, lr=beta, iters=1, ul_lr=xi, eta=eta)
    x, y, z, gap = X0, Y0, torch.zeros(DY, dtype=DTYPE), 0.0
    for _ in range(4):
        problem.step(NO_DATA, NO_DATA)
        y = y - beta * gy(f, x, y)
        big_x, big_y = grad(F, x, y)
        _, hz = second(f, x, y, z)
        r = hz - big_y
        step = eta if eta != "auto" else (r @ r) / (r @ second(f, x, y, r)[1])
        z_old, z = z, z - step * r
        x_old_z = x - xi * (big_x - second(f, x, y, z_old)[0])
        x = x - xi * (big_x - second(f, x, y, z)[0])
        gap = max(gap, float((x - x_old_z).norm()))
        assert_close(llm.v, y)
        assert_close(m.multiplier[0], z)
        assert_close(ul.v, x)
    assert gap > 1e-4  # z_k instead of z_{k+1} in the direction would have failed


def test_iga_is_the_rank_one_gauss_newton_implicit_formula_at_the_last_iterate():
    """Liu, Gao, Liu & Fan (2024), LwCL's implicit gradient approximation (the authors' and
    BOAT's GN form): at y_T (T GD steps from y_0), grad_x F - c grad_x f with
    c = <grad_y F, grad_y f> / |grad_y f|^2."""
    alpha, T = 0.2, 4
    ul, llm = Vec(X0), Vec(Y0)
    ll = GradientDescent(ll_objective, llm, ul, lr=alpha, iters=T)
    iga = IGA(ul_objective, ul, ll_objective, llm, converged_warning=None)
    (hypergradient,) = BilevelProblem(ll, iga).hypergradient(NO_DATA, NO_DATA)
    y = descend(f, X0, Y0, T, alpha)
    big_x, big_y = grad(F, X0, y)
    fx, fy = grad(f, X0, y)
    assert_close(hypergradient, big_x - (big_y @ fy) / (fy @ fy) * fx)


# --- stochastic methods: per-sample objectives and a scripted sampler -----------------------

NT, NV = 4, 3
_s = torch.Generator().manual_seed(5)
A_I = []
for _ in range(NT):
    _q = torch.linalg.qr(torch.randn(DY, DY, generator=_s, dtype=DTYPE))[0]
    _e = 0.8 + 1.2 * torch.rand(DY, generator=_s, dtype=DTYPE)
    A_I.append(_q @ torch.diag(_e) @ _q.T)
B_I = [torch.randn(DY, DX, generator=_s, dtype=DTYPE) for _ in range(NT)]
S_I = [0.2 + 0.6 * float(torch.rand(1, generator=_s, dtype=DTYPE)) for _ in range(NT)]
C_J = [torch.randn(DY, generator=_s, dtype=DTYPE) for _ in range(NV)]
D_J = [torch.randn(DY, DX, generator=_s, dtype=DTYPE) for _ in range(NV)]
TRAIN = (torch.arange(NT), None)
VAL = (torch.arange(NV), None)


def g_i(i: int):
    """The LL loss of train sample i: its Hessian depends on i, x and y."""

    def loss(x, y):
        return (
            0.5 * y @ A_I[i] @ y
            - y @ (B_I[i] @ x)
            + 0.25 * S_I[i] * (x @ x) * (y @ y)
            + KAPPA / 12 * (y**4).sum()
        )

    return loss


def f_j(j: int):
    """The UL loss of validation sample j."""

    def loss(x, y):
        return 0.5 * ((y - C_J[j]) ** 2).sum() + 0.5 * MU * (x @ x) + 0.3 * y @ (D_J[j] @ x)

    return loss


def stochastic_ll(state: dict) -> torch.Tensor:
    x, y = state["ul_model"].v, state["ll_model"].v
    return torch.stack([g_i(int(i))(x, y) for i in state["data"]]).mean()


def stochastic_ul(state: dict) -> torch.Tensor:
    x, y = state["ul_model"].v, state["ll_model"].v
    return torch.stack([f_j(int(j))(x, y) for j in state["data"]]).mean()


class Scripted(Sampler):
    """One sample per batch, batch b = sample b, drawn in the order of a script; logs draws."""

    def __init__(self, train: list[int], val: list[int]) -> None:
        super().__init__(1, 1, seed=0)
        self.script = {"train": list(train), "val": list(val)}
        self.drawn: list[tuple[str, int]] = []

    def draw(self, level: str, n: int) -> Minibatch:
        self.split(level, n)
        b = self.script[level].pop(0)
        self.drawn.append((level, b))
        return self.batch(level, b)

    def batch(self, level: str, batch: int) -> Minibatch:
        count = NT if level == "train" else NV
        return Minibatch(torch.tensor([batch]), batch, count, 1.0)


def stochastic_setup(method, sampler, *, lr, iters, ul_lr, **options):
    ul, llm = Vec(X0), Vec(Y0)
    ll = GradientDescent(stochastic_ll, llm, ul, lr=lr, iters=iters)
    m = method(stochastic_ul, ul, stochastic_ll, llm, sampler=sampler, **options)
    return BilevelProblem(ll, m, torch.optim.SGD(ul.parameters(), lr=ul_lr)), m, ul, llm


def test_soba_directions_share_one_train_and_one_val_sample_at_the_same_point():
    """Dagreou, Ablin, Vaiter & Moreau (2022), SOBA (Algorithm 1; benchopt's solver): draw i
    (train) and j (val); at (y_t, v_t, x_t): y -= rho_t grad_y g_i, v -= rho_t (grad2_yy g_i v
    + grad_y F_j), x -= gamma_t (grad2_xy g_i v + grad_x F_j); rho_t = rho t^-2/5,
    gamma_t = gamma t^-3/5 (the rates of the paper's theorem), t = 1, 2, ..."""
    train, val = [2, 0, 3, 1], [1, 2, 0, 1]
    sampler = Scripted(train, val)
    rho, gamma = 0.3, 0.2
    problem, m, ul, llm = stochastic_setup(SOBA, sampler, lr=rho, iters=1, ul_lr=gamma)
    x, y, v = X0, Y0, torch.zeros(DY, dtype=DTYPE)
    for t, (i, j) in enumerate(zip(train, val, strict=True), start=1):
        problem.step(TRAIN, VAL)
        r_t, g_t = rho * t**-0.4, gamma * t**-0.6
        cross, hv = second(g_i(i), x, y, v)
        big_x, big_y = grad(f_j(j), x, y)
        y, v, x = (
            y - r_t * gy(g_i(i), x, y),
            v - r_t * (hv + big_y),
            x - g_t * (cross + big_x),
        )
        assert_close(llm.v, y)
        assert_close(m.v[0], v)
        assert_close(ul.v, x)
    expected = [("train", 2), ("val", 1), ("train", 0), ("val", 2)]
    expected += [("train", 3), ("val", 0), ("train", 1), ("val", 1)]
    assert sampler.drawn == expected  # one train and one val draw per step, in this order


def test_saba_is_saga_on_each_of_sobas_five_terms():
    """Dagreou et al. (2022), SABA (Algorithm 2): memories of the five terms per sample,
    filled at the initial point; each step, S[term] = term_i(now) - memory_i + mean(memory),
    then memory_i = term_i(now); SOBA's update with S[.] and constant steps."""
    train, val = [2, 0, 2, 1], [1, 2, 1, 0]
    sampler = Scripted(train, val)
    rho, gamma = 0.3, 0.2
    problem, m, ul, llm = stochastic_setup(SABA, sampler, lr=rho, iters=1, ul_lr=gamma)
    x, y, v = X0, Y0, torch.zeros(DY, dtype=DTYPE)

    def train_terms(i):
        cross, hv = second(g_i(i), x, y, v)
        return [gy(g_i(i), x, y), hv, cross]

    def val_terms(j):
        big_x, big_y = grad(f_j(j), x, y)
        return [big_y, big_x]

    memory_train = {i: train_terms(i) for i in range(NT)}
    memory_val = {j: val_terms(j) for j in range(NV)}
    for i, j in zip(train, val, strict=True):
        problem.step(TRAIN, VAL)
        new_train, new_val = train_terms(i), val_terms(j)
        mean_train = [sum(memory_train[b][n] for b in range(NT)) / NT for n in range(3)]
        mean_val = [sum(memory_val[b][n] for b in range(NV)) / NV for n in range(2)]
        s_g, s_h, s_c = [new_train[n] - memory_train[i][n] + mean_train[n] for n in range(3)]
        s_fy, s_fx = [new_val[n] - memory_val[j][n] + mean_val[n] for n in range(2)]
        memory_train[i], memory_val[j] = new_train, new_val
        y, v, x = y - rho * s_g, v - rho * (s_h + s_fy), x - gamma * (s_c + s_fx)
        assert_close(llm.v, y)
        assert_close(m.v[0], v)
        assert_close(ul.v, x)


def test_stocbio_draws_independent_batches_for_each_term():
    """Ji, Yang & Liang (2021), StocBiO (Algorithms 2 and 3): T warm-started SGD steps on
    batches S_t; D_F (val) for grad_x F and v_0 = grad_y F; Q Hessian batches B_q for
    v_Q = eta sum_{q=0..Q} prod_{j<=q} (I - eta grad2_yy g_{B_j}) v_0; a separate batch D_G for
    the cross term: d = grad_x F - grad2_xy g_{D_G} v_Q (a batch per Hessian product, as
    benchopt's solver draws them)."""
    T, Q, alpha, eta, beta = 2, 3, 0.3, 0.2, 0.15
    train = [0, 3, 1, 2, 0, 3, 1, 1, 2, 0, 3, 2]
    val = [2, 0]
    sampler = Scripted(train, val)
    problem, _, ul, llm = stochastic_setup(
        StocBiO, sampler, lr=alpha, iters=T, ul_lr=beta, neumann_steps=Q, neumann_lr=eta
    )
    x, y = X0, Y0
    draws = iter(train)
    for j in val:
        problem.step(TRAIN, VAL)
        for _ in range(T):
            y = y - alpha * gy(g_i(next(draws)), x, y)
        big_x, big_y = grad(f_j(j), x, y)
        r, s = big_y, big_y
        for _ in range(Q):
            r = r - eta * second(g_i(next(draws)), x, y, r)[1]
            s = s + r
        x = x - beta * (big_x - second(g_i(next(draws)), x, y, eta * s)[0])
        assert_close(llm.v, y)
        assert_close(ul.v, x)
    kinds = [level for level, _ in sampler.drawn[: T + 1 + Q + 1]]
    assert kinds == ["train"] * T + ["val"] + ["train"] * (Q + 1)


def test_amigo_warm_starts_y_and_v_and_draws_a_new_batch_per_step():
    """Arbel & Mairal (2022), AmIGO (Algorithms 1-3; the authors' code with the quadratic
    solver): y <- T SGD steps (warm start); grad_y F, grad_x F on one val batch; v <- M SGD
    steps v -= beta (grad2_yy g_{B_m} v + grad_y F) (warm start, a new train batch each);
    d = grad_x F + grad2_xy g_{D_G} v on a new train batch."""
    T, M, alpha, beta_v, gamma = 2, 3, 0.3, 0.25, 0.15
    train = [0, 3, 1, 2, 0, 3, 1, 1, 2, 0, 3, 2]
    val = [2, 0]
    sampler = Scripted(train, val)
    problem, m, ul, llm = stochastic_setup(
        AmIGO, sampler, lr=alpha, iters=T, ul_lr=gamma, v_iters=M, v_lr=beta_v
    )
    x, y, v = X0, Y0, torch.zeros(DY, dtype=DTYPE)
    draws = iter(train)
    for j in val:
        problem.step(TRAIN, VAL)
        for _ in range(T):
            y = y - alpha * gy(g_i(next(draws)), x, y)
        big_x, big_y = grad(f_j(j), x, y)
        for _ in range(M):
            v = v - beta_v * (second(g_i(next(draws)), x, y, v)[1] + big_y)
        x = x - gamma * (big_x + second(g_i(next(draws)), x, y, v)[0])
        assert_close(llm.v, y)
        assert_close(m.v[0], v)
        assert_close(ul.v, x)
