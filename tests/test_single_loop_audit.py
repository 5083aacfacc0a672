"""Audit of the methods that keep LL state across UL steps (SOBA, SABA, StocBiO, AmIGO and the
value-function methods BOME, PBGD, F2SA, MESO, BVFIM, GAFFO, Alternating) for silent wrong
results, in float64. Each test failed before its fix (FOUND: what happened).

1. ``ll_model``'s trainable parameters changed after the method was built (one frozen, one
   unfrozen, one replaced by a new ``nn.Parameter``): the methods hold the tensors that were
   trainable then, so a frozen one went on moving, and an unfrozen or new one never moved
   while the method kept stepping (and reading) the tensor it held. Now refused.
2. Data of another size: SABA, given train data that fit in one batch when its memory was
   made and that no longer do, took unweighted steps without variance reduction (SOBA's);
   the sampler, after splitting a data set, took a smaller one whole. Now refused.
3. StocBiO's Neumann series with ``eta`` above ``2 / lambda_max``: a finite estimate 500
   times the hypergradient's size off, with no sign of it. Now it raises, as ``Implicit``'s
   series does.
"""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, ridge, ridge_exact_hypergradient, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import SABA, SOBA, AmIGO, StocBiO
from bilevel.ul.alternating import Alternating
from bilevel.ul.bome import BOME
from bilevel.ul.bvfim import BVFIM
from bilevel.ul.f2sa import F2SA
from bilevel.ul.gaffo import GAFFO
from bilevel.ul.implicit import HypergradientDivergenceError
from bilevel.ul.meso import MESO
from bilevel.ul.pbgd import PBGD

NO_DATA = (torch.zeros(1, dtype=DTYPE), None)  # the objectives below read no data


# --- 1. the LL parameters a method keeps ---------------------------------------------------


class TwoBlocks(nn.Module):
    """LL weights ``a`` (3) and ``b`` (2); ``b`` frozen with ``frozen_b``."""

    def __init__(self, frozen_b: bool = False) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-1.0, 1.0, 3, dtype=DTYPE))
        self.b = nn.Parameter(torch.tensor([0.5, -0.5], dtype=DTYPE))
        self.b.requires_grad_(not frozen_b)


class Shift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([1.0, -0.5, 0.25], dtype=DTYPE))


def two_blocks_ll(state: dict) -> torch.Tensor:
    m, x = state["ll_model"], state["ul_model"].x
    return 0.5 * ((m.a - x) ** 2).sum() + 0.5 * ((m.b - 1.0) ** 2).sum() + 0.1 * (m.a @ x)


def two_blocks_ul(state: dict) -> torch.Tensor:
    m, x = state["ll_model"], state["ul_model"].x
    return 0.5 * (m.a**2).sum() + 0.5 * ((m.b + x[:2]) ** 2).sum() + 0.5 * ((x - 0.5) ** 2).sum()


KEEPERS = [
    (SOBA, {"batch_size": None}, 1),
    (SABA, {"batch_size": None}, 1),
    (StocBiO, {"batch_size": None, "neumann_steps": 2}, 2),
    (AmIGO, {"batch_size": None}, 2),
    (BOME, {}, 2),
    (PBGD, {}, 2),
    (F2SA, {}, 2),
    (MESO, {}, 2),
    (BVFIM, {}, 2),
    (GAFFO, {}, 2),
    (Alternating, {}, 2),
]


def counter(method) -> int:
    return method.t if hasattr(method, "t") else method.steps_taken


@pytest.mark.parametrize("change", ["freeze", "unfreeze", "replace"])
@pytest.mark.parametrize(("method", "options", "iters"), KEEPERS, ids=[k[0].name for k in KEEPERS])
def test_ll_parameters_changed_after_the_method_was_built_are_refused(
    method, options, iters, change
):
    """Two UL steps, then ``b`` frozen (``freeze``), ``b`` (frozen at construction)
    unfrozen (``unfreeze``), or ``a`` replaced by a new parameter (``replace``): the next
    step is refused and changes nothing. FOUND: ``freeze``: ``b`` went on moving;
    ``unfreeze``: ``b`` never moved (value-function methods; a bare ``StopIteration`` from
    the stochastic ones); ``replace``: the new ``a`` never moved while the method went on
    stepping, and evaluating the objectives at, the old tensor."""
    ll_model, ul_model = TwoBlocks(frozen_b=change == "unfreeze"), Shift()
    ll = GradientDescent(two_blocks_ll, ll_model, ul_model, lr=0.2, iters=iters)
    ul = method(two_blocks_ul, ul_model, two_blocks_ll, ll_model, **options)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=0.1))
    for _ in range(2):
        problem.step(NO_DATA, NO_DATA)
    if change == "freeze":
        ll_model.b.requires_grad_(False)
    elif change == "unfreeze":
        ll_model.b.requires_grad_(True)
    else:
        ll_model.a = nn.Parameter(torch.full((3,), 2.0, dtype=DTYPE))
    before = [p.detach().clone() for p in (*ll_model.parameters(), ul_model.x)]
    words = {"freeze": r"\['b'\] frozen", "unfreeze": r"\['b'\] unfrozen", "replace": r"\['a'\]"}
    with pytest.raises(ValueError, match=rf"(?s)changed after {method.__name__}.*{words[change]}"):
        problem.step(NO_DATA, NO_DATA)
    after = [p.detach() for p in (*ll_model.parameters(), ul_model.x)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert counter(ul) == 2


# --- 2. data of another size ---------------------------------------------------------------


def stochastic(method, p, **options):
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=1)
    ul = method(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **options)
    return BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1)), ul


def test_saba_refuses_train_data_that_no_longer_fit_in_one_batch():
    """SABA with batches of 64 on 60 samples keeps no train memory (one batch: SOBA's
    step there). Given 120 samples, the sampler splits them into two batches: SABA used them
    unweighted, with no table (no variance reduction), silently. FOUND: accepted."""
    p = ridge(n=60, d=4, seed=1)
    problem, ul = stochastic(SABA, p, batch_size=64)
    problem.step(p.train, p.val)
    assert ul.memory == {}
    doubled = tuple(torch.cat([t, t]) for t in p.train)
    with pytest.raises(ValueError, match="keeps no train memory"):
        problem.step(doubled, p.val)
    assert ul.t == 1


def test_sampler_refuses_a_smaller_data_set_after_a_split():
    """After splitting 60 samples into batches of 16, 40 samples are refused (the method
    draws its own minibatches from the full data) but 10 were taken whole. FOUND: accepted."""
    p = ridge(n=60, d=4, seed=1)
    problem, ul = stochastic(SOBA, p, batch_size=16)
    problem.step(p.train, p.val)
    for n in (40, 10):
        with pytest.raises(ValueError, match="same full train data set"):
            problem.step(tuple(t[:n] for t in p.train), p.val)
    assert ul.t == 1


# --- 3. StocBiO's Neumann series -----------------------------------------------------------


def stocbio_at_the_ll_solution(neumann_lr: float, neumann_steps: int = 10):
    """StocBiO on full-batch ridge, with 200 LL steps (converged) and the given series."""
    p = ridge(n=40, d=4, seed=2)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=200)
    ul = StocBiO(
        ridge_ul,
        p.ul_model,
        ridge_ll,
        p.ll_model,
        neumann_steps=neumann_steps,
        neumann_lr=neumann_lr,
        batch_size=None,
    )
    return p, BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1)), ul


def ridge_lambda_max(p) -> float:
    x = p.train[0]
    return float(torch.linalg.eigvalsh(x.T @ x / len(x) + torch.diag(p.l2)).max())


@pytest.mark.parametrize("factor", [1.5, 3.0])
def test_stocbio_refuses_a_diverging_neumann_series(factor):
    """``eta = factor * 2 / lambda_max(H)``: every term multiplies the top eigen-component by
    ``1 - eta lambda_max < -1``. FOUND: a finite hypergradient returned without a sign
    (relative error 490 at factor 1.5, 1.3e7 at factor 3), and the step taken."""
    eta = factor * 2 / ridge_lambda_max(ridge(n=40, d=4, seed=2))
    p, problem, ul = stocbio_at_the_ll_solution(eta)
    before = p.ll_model.w.detach().clone(), p.ul_model.log_l2.detach().clone()
    with pytest.raises(HypergradientDivergenceError, match="Neumann series diverged"):
        problem.step(p.train, p.val)
    assert torch.equal(p.ll_model.w.detach(), before[0]) and ul.t == 0
    assert torch.equal(p.ul_model.log_l2.detach(), before[1])


def test_stocbio_converging_series_to_round_off_is_not_flagged():
    """The control: ``eta`` below ``2 / lambda_max`` and 400 terms, so that the last ones are
    round-off: no false alarm, and the estimate is the exact hypergradient (IFT)."""
    eta = 1.0 / ridge_lambda_max(ridge(n=40, d=4, seed=2))
    p, problem, _ = stocbio_at_the_ll_solution(eta, neumann_steps=400)
    (grad,) = problem.hypergradient(p.train, p.val)
    torch.testing.assert_close(grad, ridge_exact_hypergradient(p), rtol=1e-9, atol=1e-12)


def test_stocbio_mild_negative_curvature_below_the_first_term_goes_through():
    """The check's line: a term above the first one. On a saddle with curvatures (4, -0.1)
    and ``eta = 0.2`` the factors are 0.2 and 1.02: the terms grow slowly from the third one
    on (a check on any growth would refuse) but stay below the first, and the estimate is
    the truncated series itself, ``eta * sum_q (I - eta H)^q r_0``."""
    curvature = torch.tensor([4.0, -0.1], dtype=DTYPE)

    class Vector(nn.Module):
        def __init__(self, value: torch.Tensor) -> None:
            super().__init__()
            self.v = nn.Parameter(value.clone())

    x0 = torch.tensor([1.0, 0.5], dtype=DTYPE)
    ll_model, ul_model = Vector(x0 / curvature), Vector(x0)  # LL at its stationary point
    target = x0 / curvature - torch.tensor([3.0, 1.0], dtype=DTYPE)  # grad_y F = (3, 1)

    def ll_obj(state):
        y, x = state["ll_model"].v, state["ul_model"].v
        return 0.5 * (curvature * y * y).sum() - (x * y).sum()

    def ul_obj(state):
        return 0.5 * ((state["ll_model"].v - target) ** 2).sum()

    eta, steps = 0.2, 10
    ll = GradientDescent(ll_obj, ll_model, ul_model, lr=0.01, iters=1)
    ul = StocBiO(ul_obj, ul_model, ll_obj, ll_model, neumann_steps=steps, neumann_lr=eta)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=0.0))
    (grad,) = problem.hypergradient(NO_DATA, NO_DATA)
    r0 = x0 / curvature - target
    factors = 1 - eta * curvature
    series = eta * sum(factors**q for q in range(steps + 1)) * r0
    # dF/dx = (d y*/dx)^T grad_y F = H^{-1} r0, estimated by the series (d^2 f / dx dy = -I)
    torch.testing.assert_close(grad, series, rtol=1e-12, atol=1e-14)
    terms = [float((factors**q * r0).norm()) for q in range(steps + 1)]
    grows = [q for q in range(1, steps) if terms[q + 1] > terms[q]]
    assert grows and max(terms[1:]) < terms[0]
