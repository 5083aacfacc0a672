"""Audit of every ``bilevel.ul`` method at degenerate points, in float64: where a quantity
computed as a ratio or a normalisation becomes 0/0, or round-off over round-off.

Points checked: the LL started exactly at its solution (ridge in closed form, or logistic by
Newton), where the LL gradient and the value-function gap are round-off; a UL objective that
does not read the LL variables (``grad_y F = 0``), or reads them only at a minimum
(``grad_y F`` round-off); the UL variables where the hypergradient is exactly zero; a zero LL
step size (refused when the LL is built or run: ``test_bad_input*``). Each result must be
exact to round-off, or a clear warning or error with the cure; never a silently huge, NaN
or noise-picked value, nor a warning caused by round-off. Tests marked FOUND failed before
the fix (what happened); the others guard the points that were already right.

FOUND:

1. ``IGA`` at the LL's solution: ``c = <grad_w F, grad_w f> / ||grad_w f||^2`` is round-off
   over round-off squared, and the "converged" check compared the final LL gradient with the
   first one, both round-off (ratio about 1): the hypergradient came out 1e15 times the
   exact one (2.3e15 and 2.0e15 on seeds 0 and 1), silently; with ``grad_w F`` round-off too
   (a UL objective at its minimum there, exact hypergradient 0) it was 0.4 to 0.8 times
   ``||grad_lambda f||``; where the hypergradient is exactly 0, after an LL run that
   converged to round-off, 0.036 (against terms of size 2.7). Now ``c = 0`` below
   ``ROUNDOFF * eps * ||H w||`` (the size of the terms that cancel in the LL gradient, as
   ``Implicit``'s stationarity check takes it), and a warning says the result is
   ``grad_lambda F`` alone.
2. ``BOME`` at the LL's solution (``y_hat = y``): ``lambda = max(phi - <grad F, grad q>, 0) /
   ||grad q||^2`` with ``grad q`` round-off gave ``lambda`` 7.6e13 to 3.7e14 and a direction
   that removed a noise-picked component of ``grad F`` (``d_x`` 3% to 20% of the
   hypergradient's size where BOME's own value is 0; on seed 2 the noise's sign clamped
   ``lambda`` to 0). Now ``lambda = 0`` where ``y_hat - y`` is round-off (of ``||y||``).
3. ``PTT`` at the LL's solution: the T iterates are equal, and ``argmax`` of their UL losses
   picked ``k*`` by round-off (step 1 on seeds 0, 1, 2, 5, step 3 on seed 3, step 10 on seed
   4): the hypergradient through 1 step instead of 10, 70% off Reverse's. Ties to round-off
   now go to the latest iterate (Reverse's hypergradient).
4. ``F2SA`` and ``BVFIM`` refused a UL objective that does not read the LL variables with
   "ul_objective returned a tensor with no path to any parameter ... compute it from
   state['ll_model'] and/or state['ul_model']", though it is computed from ``ul_model``: their
   inner loops on ``F + lambda f`` evaluated ``F`` with the UL variables frozen. Now
   accepted (``grad_y F = 0``), with the result of a UL objective that reads ``y`` with
   weight 0.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from problems import (
    DTYPE,
    logistic,
    logistic_ll,
    logistic_ul,
    relative_error,
    ridge,
    ridge_exact_hypergradient,
    ridge_hessian,
    ridge_ll,
    ridge_solution,
    ridge_truncated_hypergradient,
    ridge_ul,
    ridge_ul_grad_w,
)
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
    PTT,
    AmIGO,
    FiniteDifference,
    Forward,
    Implicit,
    MemorySavingReverse,
    Reverse,
    StocBiO,
    StochasticImplicit,
    Truncated,
)

LR, ITERS = 0.3, 10
SEEDS = (0, 1, 2)


def at_solution(seed: int):
    """Ridge with the LL weights set to the closed-form LL solution."""
    p = ridge(seed=seed)
    with torch.no_grad():
        p.ll_model.w.copy_(ridge_solution(p))
    return p


def newton_solution(p) -> torch.Tensor:
    """The logistic LL's solution (Newton's method, to round-off)."""
    (x, y), w = p.train, torch.zeros(p.train[0].shape[1], dtype=DTYPE)
    for _ in range(50):
        s = torch.sigmoid(x @ w)
        grad = x.T @ (s - y) / len(x) + p.l2 * w
        h = x.T @ (x * (s * (1 - s))[:, None]) / len(x) + torch.diag(p.l2)
        w = w - torch.linalg.solve(h, grad)
    return w


def hypergradient(p, method, ll_objective=ridge_ll, iters=ITERS, lr=LR) -> torch.Tensor:
    ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=lr, iters=iters)
    (grad,) = BilevelProblem(ll, method).hypergradient(p.train, p.val)
    return grad


def with_direct_term(state: dict) -> torch.Tensor:
    """ridge_ul plus a direct UL term: grad_lambda F = log_l2."""
    return ridge_ul(state) + 0.5 * (state["ul_model"].log_l2 ** 2).sum()


# --- 1. IGA --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_iga_at_the_ll_solution_takes_a_zero_multiplier_and_says_so(seed):
    """FOUND: 2.3e15 / 2.0e15 times the exact hypergradient, no warning. Now ``c = 0`` (the
    pseudo-inverse of a zero rank-one model): the result is ``grad_lambda F`` exactly, and a
    warning names the cure."""
    p = at_solution(seed)
    iga = IGA(with_direct_term, p.ul_model, ridge_ll, p.ll_model)
    with pytest.warns(RuntimeWarning, match=r"(?s)at round-off.*0 / 0.*Use Implicit"):
        grad = hypergradient(p, iga)
    torch.testing.assert_close(grad, p.ul_model.log_l2.detach(), rtol=1e-14, atol=0)
    assert float(iga.diagnostics["iga_multiplier"]) == 0.0
    assert iga.diagnostics["ll_grad_norm"] < 1e-13 * iga.diagnostics["ll_grad_scale"]


def test_iga_at_the_logistic_ll_solution_is_not_huge():
    """FOUND on ridge (the same arithmetic); here a non-quadratic LL at its Newton solution."""
    p = logistic(seed=0)
    with torch.no_grad():
        p.ll_model.w.copy_(newton_solution(p))
    iga = IGA(logistic_ul, p.ul_model, logistic_ll, p.ll_model)
    with pytest.warns(RuntimeWarning, match="at round-off"):
        grad = hypergradient(p, iga, ll_objective=logistic_ll)
    assert float(grad.abs().max()) == 0.0  # logistic_ul has no direct term


def test_iga_with_a_ul_objective_at_its_minimum_is_zero():
    """``F = ||w - w*||^2 / 2`` with ``w*`` rounded another way: ``grad_w F`` and ``grad_w f``
    are both round-off and the exact hypergradient is 0. FOUND: ``c`` of order 1 (round-off
    over round-off), a result 0.4 to 0.8 times ``||grad_lambda f||``."""
    p = at_solution(1)
    w = p.ll_model.w.detach()
    # 2 eps off in every entry, alternately up and down (a Cholesky solve here was 1 ulp off
    # in one entry on one CPU: another CPU's rounding may make it the same point)
    signs = torch.tensor([(-1.0) ** i for i in range(len(w))], dtype=DTYPE)
    target = w * (1 + 2 * torch.finfo(DTYPE).eps * signs)
    gap = float((target - w).abs().max())
    assert 0 < gap < 1e-14  # the same point, rounded another way

    def at_minimum(state: dict) -> torch.Tensor:
        return 0.5 * ((state["ll_model"].w - target) ** 2).sum()

    iga = IGA(at_minimum, p.ul_model, ridge_ll, p.ll_model)
    with pytest.warns(RuntimeWarning, match="at round-off"):
        grad = hypergradient(p, iga)
    assert float(grad.abs().max()) == 0.0


def test_iga_with_a_ul_objective_flat_in_the_ll_weights_is_exact_without_warning():
    """Guard: ``grad_w F = 0`` makes ``c = 0`` exact; the round-off warning must not fire."""
    p = at_solution(0)

    def ul_only(state: dict) -> torch.Tensor:
        return 0.5 * ((state["ul_model"].log_l2 - 1.0) ** 2).sum()

    iga = IGA(ul_only, p.ul_model, ridge_ll, p.ll_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad = hypergradient(p, iga)
    torch.testing.assert_close(grad, p.ul_model.log_l2.detach() - 1.0, rtol=1e-14, atol=0)


# --- 2. BOME --------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", ["grad_norm", "value"])
@pytest.mark.parametrize("seed", SEEDS)
def test_bome_at_the_ll_solution_takes_a_zero_multiplier(seed, phi):
    """At ``y = y*`` the value-function constraint is inactive: ``grad q = 0``, ``lambda = 0``,
    ``d = grad F``. FOUND (seeds 0 and 1): ``lambda`` 7.6e13 to 3.7e14 (round-off over
    round-off squared), and ``d_x`` off by 3% to 20% of the hypergradient's size, picked by
    noise."""
    p = at_solution(seed)
    bome = BOME(with_direct_term, p.ul_model, ridge_ll, p.ll_model, phi=phi)
    grad = hypergradient(p, bome)
    assert float(bome.diagnostics["lambda"]) == 0.0
    torch.testing.assert_close(grad, p.ul_model.log_l2.detach(), rtol=1e-14, atol=0)


# --- 3. PTT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_ptt_at_the_ll_solution_is_reverse(seed):
    """The T iterates are one point: every UL loss ties, to round-off, and the tie goes to the
    latest iterate. FOUND: ``k* = 1`` picked by round-off, 63% to 74% off Reverse's."""
    p = at_solution(seed)
    ptt = PTT(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    grad = hypergradient(p, ptt)
    assert ptt.diagnostics["ptt_step"] == ITERS
    assert relative_error(grad, ridge_truncated_hypergradient(p, LR, ITERS)) < 1e-12


# --- 4. a UL objective that does not read the LL variables -----------------------------------


def ul_only(state: dict) -> torch.Tensor:
    return 0.5 * ((state["ul_model"].log_l2 - 1.0) ** 2).sum()


def ul_only_reading_y(state: dict) -> torch.Tensor:
    """The same value, reading ``y`` with weight 0 (a path to it, gradient 0)."""
    return ul_only(state) + 0.0 * state["ll_model"](state["data"]).sum()


@pytest.mark.parametrize("start", ["zero", "solution"])
@pytest.mark.parametrize("method", [F2SA, BVFIM])
def test_value_function_methods_accept_a_ul_objective_without_the_ll_variables(method, start):
    """FOUND: ValueError "no path to any parameter ... compute it from state['ll_model'] and/or
    state['ul_model']" for an objective computed from ``ul_model``."""
    results = []
    for objective in (ul_only, ul_only_reading_y):
        p = at_solution(0) if start == "solution" else ridge(seed=0)
        results.append(hypergradient(p, method(objective, p.ul_model, ridge_ll, p.ll_model)))
    torch.testing.assert_close(results[0], results[1], rtol=1e-13, atol=0)
    if method is F2SA and start == "solution":  # y = z = y*: d_x = grad_x F
        p = at_solution(0)
        torch.testing.assert_close(results[0], p.ul_model.log_l2.detach() - 1.0)


# --- guards: every method at the LL's solution ----------------------------------------------


def dm_first_step(p) -> torch.Tensor:
    """DM's first step from ``z = 0``, ``eta = ||v||^2 / v^T H v``: ``-(dg/dlambda)^T eta v``."""
    w = ridge_solution(p)
    v = ridge_ul_grad_w(p, w)
    eta = (v @ v) / (v @ ridge_hessian(p) @ v)
    return -(p.l2 * w) * (eta * v)


EXACT = ridge_exact_hypergradient
AT_SOLUTION = {
    "Reverse": (lambda p: Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model), ITERS),
    "Forward": (lambda p: Forward(ridge_ul, p.ul_model, ridge_ll, p.ll_model), ITERS),
    "MemorySavingReverse": (
        lambda p: MemorySavingReverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model),
        ITERS,
    ),
    "Truncated": (lambda p: Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 3), 3),
    "FiniteDifference": (
        lambda p: FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model),
        1,
    ),
    "StocBiO": (
        lambda p: StocBiO(ridge_ul, p.ul_model, ridge_ll, p.ll_model, batch_size=None),
        11,  # Q = 10 products: 11 terms
    ),
    "AmIGO": (lambda p: AmIGO(ridge_ul, p.ul_model, ridge_ll, p.ll_model, batch_size=None), 10),
    **{
        f"Implicit-{m}": (
            lambda p, m=m: Implicit(
                ridge_ul,
                p.ul_model,
                ridge_ll,
                p.ll_model,
                method=m,
                k=50,
                alpha="auto" if m in ("neumann", "fixed_point") else None,
            ),
            EXACT,
        )
        for m in ("cg", "neumann", "fixed_point", "normal_cg", "minres")
    },
    "StochasticImplicit": (
        lambda p: StochasticImplicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, steps=200),
        EXACT,
    ),
    "DM": (lambda p: DM(ridge_ul, p.ul_model, ridge_ll, p.ll_model), dm_first_step),
}


@pytest.mark.parametrize("name", list(AT_SOLUTION))
def test_every_hypergradient_at_the_ll_solution_is_its_exact_value(name):
    """Guard: the LL started at its solution, each method against its closed form (K-step
    reverse at the fixed point for K unrolled steps or series terms, the IFT for the solvers),
    with no warning (round-off is no reason for one)."""
    make, reference = AT_SOLUTION[name]
    p = at_solution(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "FiniteDifference differentiates only the last")
        grad = hypergradient(p, make(p))
    exact = (
        ridge_truncated_hypergradient(p, LR, reference)
        if isinstance(reference, int)
        else reference(p)
    )
    assert relative_error(grad, exact) < 1e-11


@pytest.mark.parametrize("method", [PBGD, MESO, GAFFO])
def test_penalty_methods_at_the_ll_solution_give_the_direct_gradient(method):
    """Guard: at ``y = y*`` the penalty's gradient in ``x`` is a difference of equal terms, so
    the UL direction is ``grad_x F`` (over ``c_k`` or ``gamma``: 1 at the first step, then
    ``1 / 10`` for PBGD) up to round-off."""
    p = at_solution(0)
    ul = method(with_direct_term, p.ul_model, ridge_ll, p.ll_model)
    grad = hypergradient(p, ul)
    scale = 0.1 if method is PBGD else 1.0
    torch.testing.assert_close(grad, scale * p.ul_model.log_l2.detach(), rtol=1e-12, atol=1e-15)


# --- guard: the UL variables where the hypergradient is exactly zero -------------------------


class Shift(nn.Module):
    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x.clone())


class Point(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.y = nn.Parameter(torch.zeros(d, dtype=DTYPE))


G = torch.Generator().manual_seed(3)
A = torch.randn(6, 2, generator=G, dtype=DTYPE)
B = torch.randn(6, generator=G, dtype=DTYPE)


def tracking_ll(state: dict) -> torch.Tensor:
    """``y* = A x``."""
    return ((state["ll_model"].y - A @ state["ul_model"].x) ** 2).sum()


def tracking_ul(state: dict) -> torch.Tensor:
    """``dF/dx = A^T (A x - b)``: zero at the least-squares ``x``, while ``grad_y F`` is not."""
    return 0.5 * ((state["ll_model"].y - B) ** 2).sum()


ZERO_AT = [
    lambda x, y: Reverse(tracking_ul, x, tracking_ll, y),
    lambda x, y: Forward(tracking_ul, x, tracking_ll, y),
    lambda x, y: Implicit(tracking_ul, x, tracking_ll, y, method="neumann", alpha="auto"),
    lambda x, y: Implicit(tracking_ul, x, tracking_ll, y, method="minres"),
    lambda x, y: IGA(tracking_ul, x, tracking_ll, y, converged_warning=None),
    lambda x, y: DM(tracking_ul, x, tracking_ll, y),
    lambda x, y: FiniteDifference(tracking_ul, x, tracking_ll, y),
    lambda x, y: StocBiO(tracking_ul, x, tracking_ll, y, batch_size=None),
]


@pytest.mark.parametrize("index", range(len(ZERO_AT)))
def test_a_zero_hypergradient_is_zero_to_round_off(index):
    """At the least-squares ``x`` (exact hypergradient 0), a converged LL run (80 steps
    contracting by 0.6) gives round-off, relative to ``|A|^T |A x - b|``. FOUND (IGA, whose LL
    gradient is round-off after 80 steps; the others are guards): 0.036."""
    x_star = torch.linalg.lstsq(A, B[:, None]).solution[:, 0]
    ul_model, ll_model = Shift(x_star), Point(6)
    ll = GradientDescent(tracking_ll, ll_model, ul_model, lr=0.2, iters=80)
    method = ZERO_AT[index](ul_model, ll_model)
    batch = (torch.zeros(1, dtype=DTYPE), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FiniteDifference's one-step note
        (grad,) = BilevelProblem(ll, method).hypergradient(batch, batch)
    pieces = float((A.abs().T @ (A @ x_star - B).abs()).norm())
    assert float(grad.norm()) < 1e-13 * pieces
