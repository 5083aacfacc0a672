"""Scale audit: the library's numerical checks decide alike at every scale of the objectives.

Objectives come in any scale: a sum over 60,000 examples instead of a mean, losses of 1e-20
near a perfect fit, weights of 1e8, a UL objective multiplied by 1e-8. Each check below is run
with the LL objective, the UL objective, the data or the weights rescaled by 10^k where the
right decision does not change (the LL step size rescaled with the LL objective, so that the
iterates are the same), and the hypergradient is checked to scale as the maths says.

Found and fixed (the tests marked so fail before the fix):

1. The LL growth check (``LowerLevelDivergenceError``) added an absolute ``eps`` to its
   relative tolerance: it missed every divergence whose loss stayed below about 1e-13 (a
   fixed-point iteration of spectral radius 1.3 at weights of 1e-8: 20 runs of 20 missed; a
   step 2.5 / L near a perfect fit with targets of 1e-6), and took round-off for growth where
   the losses are differences of terms far above ``eps`` (a perfect fit with targets of 1e12:
   4 of 20 runs at the solution refused; a fixed-point map at its fixed point with weights of
   1e8: 1 of 20). Now every term is relative to the losses, and a run whose weights stayed
   within round-off of their start is not a divergence.
2. ``Implicit``'s stationarity warning divided by ``max(first, 1e-30)``: with an LL objective
   of scale 1e-32 (gradients below 1e-30) every ratio came out small and an LL stopped after
   two steps went without the warning.

Guards (scale-invariant before and after): the series' divergence certificate and
``alpha="auto"``, the other solvers' stopping and breakdown tests, PTT's ties, IGA's and BOME's
floors, the multiplier step of DM, StocBiO's series check, StochasticImplicit's split and
divergence checks, BVFIM's descent checks, FiniteDifference under rescaled objectives (its
radius is in the weights' units, as DARTS has it: documented), the finite checks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from problems import (
    DTYPE,
    FeatureL2,
    Linear,
    Problem,
    logistic,
    logistic_ll,
    logistic_ul,
    relative_error,
    ridge,
    ridge_exact_hypergradient,
    ridge_hessian,
    ridge_ll,
    ridge_solution,
    ridge_ul,
)
from torch import nn

from bilevel import BilevelProblem, linalg
from bilevel.ll import FixedPointMap, GradientDescent, LowerLevelDivergenceError
from bilevel.ul import (
    BOME,
    BVFIM,
    DM,
    IGA,
    PTT,
    FiniteDifference,
    Forward,
    HypergradientDivergenceError,
    Implicit,
    Reverse,
    StocBiO,
    StochasticImplicit,
)

SCALES = [10.0**k for k in (-12, -6, 6, 12)]
LR = 0.5


def scaled(objective, c: float):
    """``objective`` times ``c``."""
    return lambda state: c * objective(state)


def lambda_max(p: Problem) -> float:
    return float(torch.linalg.eigvalsh(ridge_hessian(p))[-1])


# --- 1. the LL growth check ------------------------------------------------------------------


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=DTYPE))


@pytest.mark.parametrize("k", [-40, -24, -18, -15, -12, -6, 0, 6, 12, 18, 24, 50])
@pytest.mark.parametrize(("growth", "diverges"), [(5e-4, False), (2e-3, True)])
def test_the_growth_tolerance_is_relative_at_every_loss_scale(k, growth, diverges):
    """Two steps of ``w <- (1 - lr c) w`` on ``c w^2 / 2`` with ``|1 - lr c| = sqrt(1 +
    growth)``: the loss grows by ``1 + growth`` whatever ``c``. Before: below a loss of about
    1e-13 the absolute ``eps`` hid a growth of 2e-3 (k <= -15); and a step size given as a
    number was range-checked in float32, so ``lr`` of 2e-50 (k = 50) read as 0 and 2e40
    (k = -40) as inf, and both were refused."""
    c = 10.0**k

    def objective(state):
        return 0.5 * c * (state["ll_model"].w ** 2).sum()

    lr = (1 + (1 + growth) ** 0.5) / c
    ll = GradientDescent(objective, Scalar(), Scalar(), lr=lr, iters=2)
    if diverges:
        with pytest.raises(LowerLevelDivergenceError):
            ll.optimize(None, None)
    else:
        ll.optimize(None, None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_divergence_whose_last_weights_overflow_a_square_is_caught(dtype):
    """``w <- -1000 w`` on ``w^2 / 2`` from 1: the run stops just before its loss overflows,
    and its last weights (1e156; 1e21 in float32) have a square that does: the 'weights did
    not move' exemption took ``inf > inf`` for a run that stood still. Fails before."""
    iters = 52 if dtype == torch.float64 else 7  # last loss 5e305 (5e35 in float32)
    ll_model = Scalar().to(dtype)

    def objective(state):
        return 0.5 * (state["ll_model"].w ** 2).sum()

    ll = GradientDescent(objective, ll_model, Scalar().to(dtype), lr=1001.0, iters=iters)
    with pytest.raises(LowerLevelDivergenceError):
        ll.optimize(None, None)


def perfect_fit(scale: float, seed: int = 0) -> tuple[Problem, torch.Tensor]:
    """A ridge LL with no noise and no penalty to speak of (l2 = 1e-200), targets ``scale``
    times ``x w``, condition number 1e4: its minimum loss is 0, reached at ``scale * w``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 5, generator=g, dtype=DTYPE) * torch.logspace(0, -2, 5, dtype=DTYPE)
    w = scale * torch.randn(5, generator=g, dtype=DTYPE)
    data = (x, x @ w)
    return Problem(Linear(5), FeatureL2(5, 1e-200), data, data), w


@pytest.mark.parametrize("k", [-12, -6, 0, 6, 12])
def test_a_diverging_ll_near_a_perfect_fit_is_caught_at_every_scale(k):
    """Started 0.1% off the exact fit, a step 2.5 / L diverges and 1 / L converges, at every
    scale of the targets (first losses from 3e-32 to 3e16). Before: missed for targets of 1e-6
    and below (first losses of 3e-20 and below: 1500 times that stays under eps)."""
    for factor, diverges in ((2.5, True), (1.0, False)):
        p, w = perfect_fit(10.0**k)
        with torch.no_grad():
            p.ll_model.w.copy_(w * (1 + 1e-3 * torch.linspace(-1, 1, 5, dtype=DTYPE)))
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=factor / lambda_max(p), iters=10)
        if diverges:
            with pytest.raises(LowerLevelDivergenceError):
                ll.run(*p.train)
        else:
            ll.run(*p.train)


@pytest.mark.parametrize("k", [-12, 0, 12])
def test_round_off_at_a_perfect_fit_is_never_growth(k):
    """At the exact fit the losses are round-off of the residuals (1e-32 times the targets'
    square) and move up or down from step to step: no run is refused at any scale. Before:
    with targets of 1e12 the absolute ``eps`` was below that round-off, and runs were refused
    (4 of 20 seeds here)."""
    for seed in range(20):
        p, _ = perfect_fit(10.0**k, seed)
        with torch.no_grad():
            p.ll_model.w.copy_(torch.linalg.lstsq(p.train[0], p.train[1][:, None]).solution[:, 0])
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=1.0 / lambda_max(p), iters=20)
        ll.run(*p.train)


class Vector(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.v = nn.Parameter(value.clone())


def affine_map(seed: int, scale: float, radius: float, perturb: float) -> FixedPointMap:
    """``w <- M w + c``, ``M`` symmetric with eigenvalues in ``[-radius, radius / 2]``, ``c``
    of size ``scale``; started at the fixed point times ``1 + perturb``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DTYPE))[0]
    m = q @ torch.diag(torch.linspace(-radius, radius / 2, 6, dtype=DTYPE)) @ q.T
    c = scale * torch.randn(6, generator=g, dtype=DTYPE)
    fixed = torch.linalg.solve(torch.eye(6, dtype=DTYPE) - m, c)
    ll_model, ul_model = Vector(fixed * (1 + perturb)), Vector(c)

    def fixed_point_map(state):
        return [m @ state["ll_model"].v + state["ul_model"].v]

    return FixedPointMap(fixed_point_map, ll_model, ul_model, iters=30)


@pytest.mark.parametrize("k", [-12, -8, 0, 8, 12])
def test_fixed_point_iterations_are_judged_alike_at_every_weight_scale(k):
    """A map of spectral radius 1.3 started 1e-6 off its fixed point diverges: caught at every
    scale of the weights (before: missed at 1e-8 and below, where ``||Phi(w) - w||^2`` stays
    under 1e-16). A contraction started at its fixed point is never refused (before: 1 of 20
    seeds at weights of 1e8 and above, its residual's round-off above ``eps``)."""
    for seed in range(20):
        with pytest.raises(LowerLevelDivergenceError):
            affine_map(seed, 10.0**k, 1.3, 1e-6).run(None, None)
        affine_map(seed, 10.0**k, 0.5, 0.0).run(None, None)


# --- 2. Implicit's stationarity warning and the solvers ---------------------------------------


def implicit_run(p, c_ll=1.0, c_ul=1.0, iters=300, lr=LR, momentum=None, **kwargs):
    ll_objective = scaled(ridge_ll, c_ll)
    ll = GradientDescent(
        ll_objective, p.ll_model, p.ul_model, lr=lr / c_ll, iters=iters, momentum=momentum
    )
    ul = Implicit(scaled(ridge_ul, c_ul), p.ul_model, ll_objective, p.ll_model, **kwargs)
    (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    return grad, ul


@pytest.mark.parametrize("k", [-36, -32, -12, 0, 12])
def test_the_stationarity_warning_does_not_depend_on_the_ll_scale(k):
    """Two heavy-ball steps leave the LL gradient at 73% of its first norm at every scale of
    the LL objective: warned. Before: below a scale of 1e-31 the first gradient fell under the
    1e-30 floor of the ratio and the warning was lost."""
    p = ridge()
    with pytest.warns(RuntimeWarning, match="not stationary"):
        implicit_run(p, c_ll=10.0**k, iters=2, lr=0.1, momentum=0.5)


@pytest.mark.parametrize("c", SCALES)
def test_implicit_decides_and_scales_alike(c):
    """Converged, or started at its solution: no warning, and the exact hypergradient, at every
    scale of the LL objective; times ``c`` for the UL objective times ``c``."""
    exact = ridge_exact_hypergradient(ridge())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("cg", "minres", "normal_cg"):
            grad, _ = implicit_run(ridge(), c_ll=c, method=method, k=20)
            assert relative_error(grad, exact) < 1e-10
            grad, _ = implicit_run(ridge(), c_ul=c, method=method, k=20)
            assert relative_error(grad / c, exact) < 1e-10
        p = ridge()
        with torch.no_grad():
            p.ll_model.w.copy_(ridge_solution(p))
        grad, _ = implicit_run(p, c_ll=c, c_ul=c, iters=5, method="neumann", k=200, alpha="auto")
        assert relative_error(grad / c, exact) < 1e-10


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_the_series_divergence_certificate_is_scale_free(c, method):
    """A step 2.05 / lambda_max diverges at every scale of either objective (its step rescaled
    with the LL objective); 1.9 / lambda_max converges."""
    top = lambda_max(ridge())
    for c_ll, c_ul in ((c, 1.0), (1.0, c)):
        with pytest.raises(HypergradientDivergenceError):
            implicit_run(ridge(), c_ll, c_ul, method=method, k=10, alpha=2.05 / top / c_ll)
        _, ul = implicit_run(ridge(), c_ll, c_ul, method=method, k=10, alpha=1.9 / top / c_ll)
        assert not ul.diagnostics["diverged"]


def spd(eigenvalues: list[float]) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)).double())[0]
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)) @ q.T


SYSTEMS = {
    "cg": (spd([1, 2, 3, 5, 8, 13, 21, 50]), lambda m, b, a: linalg.cg(m, b, 50)),
    "cg-indefinite": (spd([-3, -1, 1, 2, 3, 5, 8, 13]), lambda m, b, a: linalg.cg(m, b, 50)),
    "minres": (spd([-3, -1, 1, 2, 3, 5, 8, 13]), lambda m, b, a: linalg.minres(m, b, 50)),
    "minres-singular": (spd([0, 0, 1, 2, 3, 5, 8, 13]), lambda m, b, a: linalg.minres(m, b, 50)),
    "normal_cg": (spd([-3, -1, 1, 2, 3, 5, 8, 13]), lambda m, b, a: linalg.normal_cg(m, b, 50)),
    "neumann-diverging": (
        spd([1, 2, 3, 5, 8, 13, 21, 50]),
        lambda m, b, a: linalg.neumann(m, b, 2.02 / (50 * a), 10),
    ),
    "fixed_point-diverging": (
        spd([1, 2, 3, 5, 8, 13, 21, 50]),
        lambda m, b, a: linalg.fixed_point(m, b, 2.02 / (50 * a), 10),
    ),
}


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_solver_decisions_do_not_depend_on_the_scales_of_a_and_b(name):
    """Iterations (to one, at a threshold crossed by round-off), ``converged`` and ``diverged``
    are those of ``A x = b`` for ``(a A) x = b_scale b``, a and b_scale from 1e-12 to 1e12."""
    matrix, solve = SYSTEMS[name]
    b = [torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=DTYPE)]

    def decision(a: float, scale: float):
        _, info = solve(lambda v: [(a * matrix) @ v[0]], [scale * b[0]], a)
        return info.iterations, info.converged, info.diverged

    base = decision(1.0, 1.0)
    for a in (1e-12, 1e-4, 1e4, 1e12):
        for scale in (1e-12, 1.0, 1e12):
            iterations, converged, diverged = decision(a, scale)
            assert abs(iterations - base[0]) <= 1 and (converged, diverged) == base[1:]


# --- 3. the other methods' floors and checks --------------------------------------------------


@pytest.mark.parametrize("c", SCALES)
def test_ptt_picks_the_same_step_at_every_scale(c):
    """k* inside the run (the LL starts at the UL minimizer, heavy-ball steps): 4 at every
    scale of either objective; an LL started at its solution: the last step. The hypergradient
    is that of the unscaled problem (times ``c`` for the UL objective)."""
    xv, yv = ridge().val
    at_ul_minimum = torch.linalg.solve(xv.T @ xv, xv.T @ yv)

    def run(start, c_ll, c_ul, momentum):
        p = ridge()
        with torch.no_grad():
            p.ll_model.w.copy_(start)
        ll_objective = scaled(ridge_ll, c_ll)
        ll = GradientDescent(
            ll_objective, p.ll_model, p.ul_model, lr=LR / c_ll, iters=12, momentum=momentum
        )
        ul = PTT(scaled(ridge_ul, c_ul), p.ul_model, ll_objective, p.ll_model)
        (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
        return ul.diagnostics["ptt_step"], grad / c_ul

    for start, momentum in ((at_ul_minimum, 0.8), (ridge_solution(ridge()), None)):
        step, reference = run(start, 1.0, 1.0, momentum)
        for c_ll, c_ul in ((c, 1.0), (1.0, c), (c, c)):
            chosen, grad = run(start, c_ll, c_ul, momentum)
            assert chosen == step and relative_error(grad, reference) < 1e-12
    assert run(at_ul_minimum, 1.0, 1.0, 0.8)[0] == 4


@pytest.mark.parametrize("c", SCALES)
def test_iga_floor_and_multiplier_scale_alike(c):
    """At the LL's solution the multiplier is floored to 0 at every scale; after 3 steps it is
    ``c_ul / c_ll`` times the unscaled one and the hypergradient ``c_ul`` times it."""

    def run(c_ll, c_ul, at_solution):
        p = ridge()
        if at_solution:
            with torch.no_grad():
                p.ll_model.w.copy_(ridge_solution(p))
        ll_objective = scaled(ridge_ll, c_ll)
        ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=LR / c_ll, iters=3)
        ul = IGA(scaled(ridge_ul, c_ul), p.ul_model, ll_objective, p.ll_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the warnings at a converged LL: said)
            (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
        return float(ul.diagnostics["iga_multiplier"]), grad

    multiplier, grad = run(1.0, 1.0, False)
    for c_ll, c_ul in ((c, 1.0), (1.0, c)):
        assert run(c_ll, c_ul, True)[0] == 0.0
        scaled_multiplier, scaled_grad = run(c_ll, c_ul, False)
        assert scaled_multiplier == pytest.approx(multiplier * c_ul / c_ll, rel=1e-12)
        assert relative_error(scaled_grad / c_ul, grad) < 1e-12


@pytest.mark.parametrize("c", SCALES)
def test_bome_floor_at_the_solution_is_scale_free(c):
    """``y`` at the LL's solution: the barrier's multiplier is 0 at every scale of either
    objective (``y_hat = y`` to round-off of ``||y||``)."""
    for c_ll, c_ul in ((c, 1.0), (1.0, c), (c, c)):
        p = ridge()
        with torch.no_grad():
            p.ll_model.w.copy_(ridge_solution(p))
        ll_objective = scaled(ridge_ll, c_ll)
        ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=LR / c_ll, iters=5)
        ul = BOME(scaled(ridge_ul, c_ul), p.ul_model, ll_objective, p.ll_model)
        optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=1e-3)
        BilevelProblem(ll, ul, optimizer).step(p.train, p.val)
        assert float(ul.diagnostics["lambda"]) == 0.0


@pytest.mark.parametrize("c", SCALES)
def test_dm_step_and_hypergradient_scale_alike(c):
    """``eta="auto"`` picks ``1 / c`` times the unscaled step for the LL objective times ``c``,
    and five UL steps give the unscaled direction (times ``c`` for the UL objective)."""

    def run(c_ll, c_ul):
        p = ridge()
        ll_objective = scaled(ridge_ll, c_ll)
        ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=LR / c_ll, iters=1)
        ul = DM(scaled(ridge_ul, c_ul), p.ul_model, ll_objective, p.ll_model)
        optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=1e-3 / c_ul)  # (same moves)
        problem = BilevelProblem(ll, ul, optimizer)
        for _ in range(5):
            problem.step(p.train, p.val)
        return float(ul.diagnostics["eta"]), p.ul_model.log_l2.grad / c_ul

    eta, direction = run(1.0, 1.0)
    for c_ll, c_ul in ((c, 1.0), (1.0, c)):
        scaled_eta, scaled_direction = run(c_ll, c_ul)
        assert scaled_eta * c_ll == pytest.approx(eta, rel=1e-10)
        assert relative_error(scaled_direction, direction) < 1e-10


@pytest.mark.parametrize("c", SCALES)
def test_stocbio_refuses_a_diverging_series_at_every_scale(c):
    """``neumann_lr`` 3 / L grows the series at every scale of the LL objective (the step
    rescaled with it); 1 / L goes through."""
    top = lambda_max(ridge())
    for factor, diverges in ((3.0, True), (1.0, False)):
        p = ridge()
        ll_objective = scaled(ridge_ll, c)
        ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=LR / c, iters=50)
        ul = StocBiO(
            scaled(ridge_ul, c),
            p.ul_model,
            ll_objective,
            p.ll_model,
            batch_size=None,
            neumann_steps=10,
            neumann_lr=factor / top / c,
        )
        problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=1e-3))
        if diverges:
            with pytest.raises(HypergradientDivergenceError):
                problem.step(p.train, p.val)
        else:
            problem.step(p.train, p.val)


def split(with_penalty: bool, c: float):
    """``ll_outputs`` of the ridge LL times ``c``: the predictions, the loss of them, and the
    penalty (left out when ``with_penalty`` is false: a wrong split)."""

    def ll_outputs(state):
        def output_loss(out):
            return c * 0.5 * ((out - state["target"]) ** 2).mean()

        rest = c * state["ul_model"].penalty(state["ll_model"]) if with_penalty else 0.0
        return state["ll_model"](state["data"]), output_loss, rest

    return ll_outputs


@pytest.mark.parametrize("c", SCALES)
def test_stochastic_implicit_checks_are_scale_free(c):
    """At every scale of both objectives: the right split passes and gives the exact
    hypergradient (times ``c``), the split without the penalty is refused, and a solver step
    2.2 / L is refused as diverging."""
    top = lambda_max(ridge())
    exact = ridge_exact_hypergradient(ridge())

    def run(with_penalty, step):
        p = ridge()
        ll_objective = scaled(ridge_ll, c)
        ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=LR / c, iters=300)
        ul = StochasticImplicit(
            scaled(ridge_ul, c),
            p.ul_model,
            ll_objective,
            p.ll_model,
            steps=200,
            batches=None,
            curvature="gauss_newton",
            ll_outputs=split(with_penalty, c),
            solver_optimizer=lambda q: torch.optim.SGD(q, lr=step / c),
        )
        (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
        return grad / c

    assert relative_error(run(True, 1.0 / top), exact) < 1e-10
    with pytest.raises(ValueError, match="does not split"):
        run(False, 1.0 / top)
    with pytest.raises(HypergradientDivergenceError):
        run(True, 2.2 / top)


@pytest.mark.parametrize("c", SCALES)
def test_bvfim_descent_checks_are_scale_free(c):
    """BVFIM on ridge with both objectives and its parameters (mu, theta, sigma: units of the
    objectives) times ``c``, steps over ``c``: the same UL variables after 5 steps; an LL
    step 2.5 / L refused as an increase of the inner objective."""
    top = lambda_max(ridge())

    def run(c, lr):
        p = ridge()
        ll_objective = scaled(ridge_ll, c)
        ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=lr / c, iters=5)
        ul = BVFIM(
            scaled(ridge_ul, c), p.ul_model, ll_objective, p.ll_model, 0.01 * c, 0.01 * c, 0.01 * c
        )
        problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1 / c))
        for _ in range(5):
            problem.step(p.train, p.val)
        return p.ul_model.log_l2.detach()

    assert relative_error(run(c, LR), run(1.0, LR)) < 1e-10
    with pytest.raises(FloatingPointError, match=r"Lower ll\.lr"):
        run(c, 2.5 / top)


@pytest.mark.parametrize("c", SCALES)
def test_finite_difference_is_scale_free_in_the_objectives(c):
    """DARTS' perturbation ``r / ||v||`` along ``v`` has norm ``r`` whatever the scales of the
    objectives: one LL step, the same agreement with ``Reverse`` at every scale."""

    def run(method, c_ll, c_ul):
        p = logistic()
        with torch.no_grad():
            p.ll_model.w.fill_(0.3)
        ll_objective = scaled(logistic_ll, c_ll)
        ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=1.0 / c_ll, iters=1)
        ul = method(scaled(logistic_ul, c_ul), p.ul_model, ll_objective, p.ll_model)
        (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
        return grad / c_ul

    for c_ll, c_ul in ((c, 1.0), (1.0, c)):
        reference = run(Reverse, c_ll, c_ul)
        assert relative_error(run(FiniteDifference, c_ll, c_ul), reference) < 1e-12


def test_the_finite_checks_take_huge_finite_values_as_finite():
    """Hypergradients of 1e308 whose sum overflows are finite; one NaN is not."""
    from bilevel.state import all_finite, check_hypergradient

    huge = torch.tensor([1e308, 1e308, -1e308], dtype=DTYPE)
    assert all_finite([huge]) and all_finite([huge, huge])
    check_hypergradient([huge, -huge])
    assert not all_finite([huge, torch.tensor([float("nan")], dtype=DTYPE)])


def test_an_online_run_takes_a_huge_finite_hypergradient_as_finite():
    """The online runner checked the sums of the hypergradient's tensors: two entries of 1e308
    (a UL objective in units of 1e308) summed to inf and the run was refused as "not finite".
    It now checks as ``BilevelProblem.step`` does. Fails before."""
    from bilevel.online import OnlineHypergradient

    p = ridge(d=2)

    def ul_objective(state):
        lam = state["ul_model"].log_l2
        return ridge_ul(state) + 1e308 * (lam - lam.detach()).sum()  # value 0, gradient 1e308

    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=10)
    ul = Forward(ul_objective, p.ul_model, ridge_ll, p.ll_model)
    before = p.ul_model.log_l2.detach().clone()
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=1e-310)
    OnlineHypergradient(ll, ul, optimizer, hyper_every=5).run(p.train, p.val, 10, progress=False)
    moved = p.ul_model.log_l2.detach() - before
    assert ((moved < -1e-3) & (moved > -1e-1)).all()  # two steps of about 1e308 * 1e-310
