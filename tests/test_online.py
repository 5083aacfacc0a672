"""Online hypergradients (RTHO and online truncated reverse)."""

from __future__ import annotations

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.online import OnlineHypergradient
from bilevel.ul import Forward, Implicit, Truncated


def online(p, cls, hyper_every, lr=0.5, **kwargs):
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=1)
    ul = cls(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **kwargs)
    opt = torch.optim.SGD(p.ul_model.parameters(), lr=0.5)
    return OnlineHypergradient(ll, ul, opt, hyper_every)


def offline_step(p, cls, iters, **kwargs):
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=iters)
    ul = cls(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **kwargs)
    BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.5)).step(p.train, p.val)


@pytest.mark.parametrize(("cls", "kwargs"), [(Forward, {}), (Truncated, {"truncate_iter": 15})])
def test_one_update_at_the_end_equals_the_offline_step(cls, kwargs):
    p, q = ridge(), ridge()
    online(p, cls, 15, **kwargs).run(p.train, p.val, ll_steps=15, progress=False)
    offline_step(q, cls, 15, **kwargs)
    torch.testing.assert_close(p.ul_model.log_l2, q.ul_model.log_l2, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("cls", "kwargs"), [(Forward, {}), (Truncated, {"truncate_iter": 10})])
def test_online_updates_lower_the_validation_loss(cls, kwargs):
    p = ridge(d=5)
    records = []
    online(p, cls, 10, **kwargs).run(
        p.train, p.val, ll_steps=400, log=records.append, progress=False
    )
    assert len(records) == 40 and records[-1]["ll_step"] == 400
    assert records[-1]["ul_loss"] < records[0]["ul_loss"] - 1e-3


def test_online_truncated_memory_does_not_grow():
    """The graph is cut after each update, and higher's history of weights is dropped."""
    p = ridge()
    runner = online(p, Truncated, 5, truncate_iter=5)
    model = runner.run(p.train, p.val, ll_steps=50, progress=False)
    assert len(model._fast_params) <= 6


def test_online_refuses_other_calculators_and_mismatched_windows():
    p = ridge()
    with pytest.raises(TypeError, match="Forward or Truncated"):
        online(p, Implicit, 5, ll_learning_rate=0.5, k=3)
    with pytest.raises(ValueError, match="truncate_iter == hyper_every"):
        online(p, Truncated, 5, truncate_iter=3)
    with pytest.raises(ValueError, match="hyper_every must be an integer >= 1"):
        online(p, Forward, 0)
