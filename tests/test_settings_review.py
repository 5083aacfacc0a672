"""Review of the settings set after construction (float64): a once-per-LL check that a
setting changed since, and a pair of settings that each set alone can never switch.

FOUND: ``FiniteDifference`` run by hand (``fd.run_ll``, as its messages advise) checks the LL
dynamics once per LL object, taking them as fixed at its construction; BDA's ``alpha`` may
now be set between runs, and ``alpha`` raised from 0 (plain gradient steps, which a fresh
``FiniteDifference`` takes) to 0.5 (which it refuses) ran on without a word. BVFIM's
``slack="lower_bound"`` needs ``ll_lower_bound`` and only there: set one at a time, neither
could switch it on or off, and each refusal named the other as what was missing, so a user
went round in circles. A sampler's ``seed`` set later was taken and reported by
``settings()`` while its generator stayed seeded with the old one; a ``problem.ll`` replaced
by an LL optimizer that the method refuses was never checked; ``FixedPointMap.lr`` set later
was told to give "lr as a callable", which a map does not take."""

from __future__ import annotations

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import BDA, FixedPointMap, GradientDescent
from bilevel.ul import BVFIM, SOBA, FiniteDifference, Sampler


def test_finite_difference_by_hand_checks_bda_alpha_set_since_as_a_fresh_one_does():
    p = ridge(seed=2)
    ll = BDA(
        ridge_ll, p.ll_model, p.ul_model, 0.3, 1, ul_objective=ridge_ul, alpha=0.0, alpha_decay=1.0
    )
    fd = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    ll.release(fd.run_ll(ll, *p.train, ul_batch=p.val).model)  # alpha = 0: plain steps
    ll.alpha = 0.5
    fresh = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(ValueError) as refused_fresh:
        fresh.run_ll(ll, *p.train, ul_batch=p.val)
    assert "the LL is BDA, whose step is not a plain gradient step" in str(refused_fresh.value)
    with pytest.raises(ValueError) as refused:
        fd.run_ll(ll, *p.train, ul_batch=p.val)
    assert str(refused.value) == str(refused_fresh.value)
    ll.alpha = 0.0  # plain steps again: runs
    ll.release(fd.run_ll(ll, *p.train, ul_batch=p.val).model)


@pytest.mark.parametrize(
    ("built", "name", "value"),
    [
        ({"slack": "barrier"}, "ll_lower_bound", 0.0),
        ({"slack": "regularized"}, "slack", "lower_bound"),
        ({"slack": "lower_bound", "ll_lower_bound": 0.0}, "ll_lower_bound", None),
        ({"slack": "lower_bound", "ll_lower_bound": 0.0}, "slack", "barrier"),
    ],
)
def test_bvfim_slack_and_its_bound_set_alone_are_refused_with_the_cure(built, name, value):
    p = ridge(seed=2)
    ul = BVFIM(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **built)
    before = ul.settings()
    with pytest.raises(ValueError) as refused:
        setattr(ul, name, value)
    message = str(refused.value)
    assert message.startswith("ll_lower_bound is needed with slack='lower_bound' and only there")
    assert message.endswith("build a new BVFIM with both.")
    assert ul.settings() == before
    with pytest.raises(ValueError) as at_construction:  # the constructor's words, no cure
        BVFIM(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **{**built, name: value})
    assert str(at_construction.value) in message
    assert "build a new BVFIM" not in str(at_construction.value)


@pytest.mark.parametrize(("name", "value"), [("seed", 5), ("order", "uniform")])
def test_a_sampler_s_seed_and_order_are_fixed_at_construction(name, value):
    sampler = Sampler(10, seed=1)
    before = sampler.settings()
    with pytest.raises(AttributeError, match=rf"Sampler\.{name} is fixed at construction"):
        setattr(sampler, name, value)
    assert sampler.settings() == before


def test_a_replaced_ll_optimizer_is_checked_against_the_method_as_at_construction():
    """SOBA takes one LL step per UL step and refuses an LL of 5 at construction; the same LL
    put in as ``problem.ll`` ran five."""
    p = ridge(seed=2)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=1)
    ul = SOBA(ridge_ul, p.ul_model, ridge_ll, p.ll_model, batch_size=10)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    problem.step(p.train, p.val)
    problem.ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=5)
    with pytest.raises(ValueError, match=r"one LL step per UL step .* ll\.iters = 5"):
        problem.step(p.train, p.val)
    problem.ll = ll
    problem.step(p.train, p.val)  # the one it was built with: runs


def test_fixed_point_map_lr_is_refused_with_the_map_s_cure():
    p = ridge(seed=2)

    def step(state):
        return [state["ll_model"].w * 0.5]

    ll = FixedPointMap(step, p.ll_model, p.ul_model, iters=3)
    with pytest.raises(AttributeError, match="a fixed-point map takes no step size") as refused:
        ll.lr = 0.1
    assert "callable" not in str(refused.value)
    assert ll.lr == 1.0
