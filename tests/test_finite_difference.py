"""FiniteDifference (DARTS) in float64: exact to O(r^2) for one LL step, and what it is for more."""

from __future__ import annotations

import gc
import itertools
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from problems import (
    DTYPE,
    Linear,
    logistic,
    logistic_ul,
    relative_error,
    ridge,
    ridge_ll,
    ridge_truncated_hypergradient,
    ridge_ul,
)
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference, Reverse


class SampleWeights(nn.Module):
    """UL variables that enter the LL objective non-quadratically in the LL weights: one
    weight ``sigmoid(logit)`` per training sample, and a per-feature L2 ``exp(log_l2)``."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.logits = nn.Parameter(torch.randn(n, generator=g, dtype=DTYPE))
        self.log_l2 = nn.Parameter(torch.full((d,), -1.0, dtype=DTYPE))


def weighted_logistic_ll(state: dict) -> torch.Tensor:
    model, ul = state["ll_model"], state["ul_model"]
    losses = F.binary_cross_entropy_with_logits(
        model(state["data"]), state["target"], reduction="none"
    )
    return (torch.sigmoid(ul.logits) * losses).mean() + 0.5 * (ul.log_l2.exp() * model.w**2).sum()


def start(d: int) -> Linear:
    """An LL model away from 0 (at w = 0 the L2 term's mixed derivative vanishes)."""
    return Linear(d, torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=DTYPE))


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def one_step_problem():
    p = logistic()
    ul, net = SampleWeights(len(p.train[0]), 4), start(4)
    ll = GradientDescent(weighted_logistic_ll, net, ul, lr=1.0, iters=1)
    reverse = Reverse(logistic_ul, ul, weighted_logistic_ll, net)
    exact = flat(BilevelProblem(ll, reverse).hypergradient(p.train, p.val))
    return p, ul, net, ll, exact


def test_one_ll_step_matches_reverse_with_error_shrinking_as_r_squared():
    """One LL step: Reverse is the exact answer; the central difference errs by O(r^2)."""
    p, ul, net, ll, exact = one_step_problem()

    def error(r: float) -> float:
        fd = FiniteDifference(logistic_ul, ul, weighted_logistic_ll, net, r=r)
        return float((flat(BilevelProblem(ll, fd).hypergradient(p.train, p.val)) - exact).norm())

    errors = [error(r) for r in (0.2, 0.1, 0.05, 0.025)]
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    # 4 for O(r^2): measured 3.977, 3.994, 3.999 (the O(r^4) term fades)
    assert all(3.9 <= q <= 4.05 for q in ratios), (errors, ratios)
    assert errors[0] > 1e3 * 1e-16 * float(exact.norm())  # the errors measured are not noise
    # DARTS' radius: truncation error r^2 ~ 1e-4 relative to the O(1) third derivatives
    assert error(1e-3) / float(exact.norm()) < 1e-7


def test_one_step_initial_weights_get_the_curvature_term():
    """UL parameters that are the LL's initial weights (one-step MAML): (I - lr H) v, with H v
    taken by the same finite difference, matches Reverse."""
    p = logistic()
    net = start(4)

    def task(state: dict) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(state["ll_model"](state["data"]), state["target"])

    ll = GradientDescent(task, net, net, lr=1.0, iters=1)
    (exact,) = BilevelProblem(ll, Reverse(task, net, task, net)).hypergradient(p.train, p.val)
    (fd,) = BilevelProblem(ll, FiniteDifference(task, net, task, net, r=1e-3)).hypergradient(
        p.train, p.val
    )
    assert relative_error(fd, exact) < 1e-6
    (darts,) = BilevelProblem(ll, FiniteDifference(task, net, task, net)).hypergradient(
        p.train, p.val
    )
    assert relative_error(darts, exact) < 1e-3  # DARTS' r = 1e-2: still O(r^2)


def test_many_ll_steps_give_the_one_step_gradient_at_the_last_step_and_warn_once():
    """T > 1: the last step differentiated alone. At a converged ridge LL that is K = 1
    truncated back-propagation, -lr (dg/dlambda)^T v (the ridge LL is quadratic in w, so the
    central difference is exact up to round-off)."""
    p = ridge(seed=2)
    lr, iters = 0.5, 200
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=iters)
    fd = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    problem = BilevelProblem(ll, fd)
    with pytest.warns(RuntimeWarning, match="only the last of the 200 LL steps"):
        (grad,) = problem.hypergradient(p.train, p.val)
    assert relative_error(grad, ridge_truncated_hypergradient(p, lr, 1)) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per calculator
        problem.hypergradient(p.train, p.val)


def test_step_sizes_per_parameter_enter_the_direction():
    """A per-element LL step size: the one-step answer is still Reverse's."""
    p, ul, net, _, _ = one_step_problem()
    lr = torch.linspace(0.5, 1.5, 4, dtype=DTYPE)
    ll = GradientDescent(weighted_logistic_ll, net, ul, lr=[lr], iters=1)
    exact = BilevelProblem(ll, Reverse(logistic_ul, ul, weighted_logistic_ll, net))
    fd = FiniteDifference(logistic_ul, ul, weighted_logistic_ll, net, r=1e-3)
    got = flat(BilevelProblem(ll, fd).hypergradient(p.train, p.val))
    assert relative_error(got, flat(exact.hypergradient(p.train, p.val))) < 1e-6


def test_refuses_bad_radius_and_other_dynamics():
    p = ridge()
    args = (ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(TypeError, match="r must be a number"):
        FiniteDifference(*args, r=True)
    for bad in (0.0, -1e-2, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="r must be a finite number > 0"):
            FiniteDifference(*args, r=bad)
    for options in ({"optimizer": "adam"}, {"momentum": 0.9}):
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=1, **options)
        with pytest.raises(ValueError, match="one plain gradient step"):
            BilevelProblem(ll, FiniteDifference(*args))


def test_seed_flow_without_the_recorded_weights_is_refused():
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=1, differentiable_steps=0)
    fd = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    aux = ll.optimize(*p.train)
    with pytest.raises(ValueError, match="weights before its last step"):
        fd.compute_gradients(*p.val, aux, *p.train)
    assert fd.settings() == {"r": 1e-2}


@pytest.mark.parametrize("lr", [0.3, [0.3, 0.1]])
def test_initial_weights_of_several_tensors_with_a_step_size_other_than_one(lr):
    """MAML through one step of a two-tensor LL (weight and bias) with one step size (or one
    per tensor): (I - lr H) v matches Reverse, so the step size enters the curvature term."""
    p = logistic()
    torch.manual_seed(3)
    net = nn.Linear(4, 1).to(DTYPE)

    def task(state: dict) -> torch.Tensor:
        logits = state["ll_model"](state["data"]).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, state["target"])

    ll = GradientDescent(task, net, net, lr=lr, iters=1)
    exact = flat(BilevelProblem(ll, Reverse(task, net, task, net)).hypergradient(p.train, p.val))
    fd = FiniteDifference(task, net, task, net, r=1e-3)
    assert relative_error(flat(BilevelProblem(ll, fd).hypergradient(p.train, p.val)), exact) < 1e-6


def test_a_ul_loss_flat_in_the_weights_gives_the_direct_gradient_in_float32_at_a_large_radius():
    """u = 0: w+- = w, the finite difference is exactly 0 and the hypergradient is the direct
    one. The radius divided by a zero norm must stay finite (it overflowed to inf in float32
    for r >= 4, and 0 * inf made the hypergradient NaN)."""
    p = ridge()
    train = tuple(t.float() for t in p.train)
    ll_model, ul_model = Linear(5).float(), p.ul_model.float()

    def ul_only(state: dict) -> torch.Tensor:  # no path to the LL weights
        return (state["ul_model"].log_l2 ** 2).sum()

    ll = GradientDescent(ridge_ll, ll_model, ul_model, lr=0.1, iters=1)
    fd = FiniteDifference(ul_only, ul_model, ridge_ll, ll_model, r=8.0)
    (grad,) = BilevelProblem(ll, fd).hypergradient(train, train)
    assert torch.equal(grad, 2 * ul_model.log_l2.detach())


def test_a_dropped_ll_optimizer_is_not_kept_alive_by_the_method():
    """The method remembers which LL optimizer's dynamics it checked, by a weak reference: an
    LL optimizer dropped by the user (with its patched copy of the model) is freed, and one
    that lives is checked once, not at every UL step."""
    p = ridge(seed=1)
    ul = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=1)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    problem.step(p.train, p.val)
    checked = ul._checked_ll
    problem.step(p.train, p.val)
    assert ul._checked_ll is checked
    dropped = weakref.ref(ll)
    del problem, ll
    gc.collect()
    assert dropped() is None
