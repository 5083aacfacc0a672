"""Settings of the UL methods set after construction are checked as the constructor checks
them, as ``ll.iters`` is (float64). FOUND: ``ul.k = 0`` on ``Implicit`` ran a solver of no
iterations and returned a zero hypergradient, silently; ``Truncated``'s
``truncate_iter = 0`` was refused as "get no hypergradient ... use them in an objective";
``FiniteDifference``'s ``r = 0`` raised a bare ZeroDivisionError; ``Implicit``'s
``damping = -1`` was taken as given (a system shifted the wrong way). A legitimate change takes
effect: the next step equals, bitwise, that of a method built with the new value."""

from __future__ import annotations

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference, Implicit, Truncated

LR, ITERS = 0.3, 20


def implicit(p, **options):
    return Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, LR, **options)


def truncated(p, **options):
    return Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **options)


def finite_difference(p, **options):
    return FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **options)


CASES = [  # (method, built with, set to a bad value, message; set to a good value)
    (implicit, {"k": 10}, ("k", 0), "k must be an integer >= 1", ("k", 3)),
    (implicit, {"k": 10}, ("k", 2.5), "k must be an integer >= 1", ("k", 3)),
    (
        implicit,
        {"damping": 0.0},
        ("damping", -1.0),
        "damping must be a finite number >= 0",
        ("damping", 0.5),
    ),
    (
        truncated,
        {"truncate_iter": 5},
        ("truncate_iter", 0),
        "truncate_iter must be >= 1",
        ("truncate_iter", 2),
    ),
    (finite_difference, {"r": 1e-2}, ("r", 0.0), "r must be a finite number > 0", ("r", 1e-3)),
    (
        finite_difference,
        {"r": 1e-2},
        ("r", float("nan")),
        "r must be a finite number > 0",
        ("r", 1e-3),
    ),
]


def hypergradient(p, method) -> torch.Tensor:
    iters = 1 if isinstance(method, FiniteDifference) else ITERS
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=iters)
    (grad,) = BilevelProblem(ll, method).hypergradient(p.train, p.val)
    return grad


@pytest.mark.parametrize(("make", "built", "bad", "message", "good"), CASES)
def test_a_setting_set_after_construction_is_checked_as_at_construction(
    make, built, bad, message, good
):
    p = ridge(seed=2)
    method = make(p, **built)
    name, value = bad
    with pytest.raises((ValueError, TypeError), match=message):
        setattr(method, name, value)
    with pytest.raises((ValueError, TypeError), match=message):
        make(p, **{**built, name: value})  # the constructor's own refusal, the same words
    assert getattr(method, name) == built[name]  # left as it was
    name, value = good
    setattr(method, name, value)
    q = ridge(seed=2)
    fresh = make(q, **{**built, name: value})
    assert torch.equal(hypergradient(p, method), hypergradient(q, fresh))
