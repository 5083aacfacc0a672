"""What a user set stays what they set (float64): two values the library changed or let be
changed behind the user's back.

FOUND: ``Implicit`` kept "warn once" by setting ``stationarity_warning`` itself to ``None``
after its warning, so the attribute read ``None`` from then on (a script logging its
settings, or copying them into a new calculator, got warnings switched off). A
``Sampler``'s ``batch_sizes`` was a plain dict: an entry changed after the data were split
was taken without a word, and then disagreed with the split (``count`` and ``settings()``
reported the new size, the batches kept the old one)."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit, Sampler


def test_implicit_warns_once_and_keeps_the_users_stationarity_warning():
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=1)  # stopped early
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=10, stationarity_warning=0.2)
    problem = BilevelProblem(ll, ul)
    with pytest.warns(RuntimeWarning, match="the LL is not stationary"):
        problem.hypergradient(p.train, p.val)
    assert ul.stationarity_warning == 0.2
    assert ul.diagnostics["ll_grad_ratio"] > 0.2  # as far from stationary the second time:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        problem.hypergradient(p.train, p.val)  # but warned once per calculator
    assert ul.diagnostics["ll_grad_ratio"] > 0.2
    assert ul.stationarity_warning == 0.2


def test_a_samplers_batch_sizes_are_fixed_once_built():
    sampler = Sampler(batch_size=4, seed=3)
    first = sampler.draw("train", 10)
    with pytest.raises(TypeError, match=r"fixed at construction.*build a new Sampler"):
        sampler.batch_sizes["train"] = 3
    with pytest.raises(TypeError, match=r"fixed at construction.*build a new Sampler"):
        del sampler.batch_sizes["val"]
    with pytest.raises(AttributeError, match=r"Sampler\.batch_sizes is fixed at construction"):
        sampler.batch_sizes = {"train": 3, "val": 3}
    assert dict(sampler.batch_sizes) == {"train": 4, "val": 4}
    assert sampler.count("train", 10) == 3
    assert sampler.settings()["batch_size"] == 4
    assert sampler.batch_sizes.get("test", 1) == 1  # a Mapping's reads, as the methods use them
    for clone in (copy.deepcopy(sampler), pickle.loads(pickle.dumps(sampler))):
        assert dict(clone.batch_sizes) == {"train": 4, "val": 4}
    # the refusals changed nothing: the next draw is the one a sampler never touched takes
    fresh = Sampler(batch_size=4, seed=3)
    assert torch.equal(fresh.draw("train", 10).index, first.index)
    for _ in range(4):  # into the next epoch
        mine, theirs = sampler.draw("train", 10), fresh.draw("train", 10)
        assert torch.equal(mine.index, theirs.index) and mine.count == theirs.count == 3


def test_an_online_run_checks_a_setting_changed_from_its_log_at_the_next_update():
    """A setting changed inside one run (here from the ``log`` callback) was checked only at
    the next ``run``: online ``Truncated`` took ``truncate_iter = 3`` with ``hyper_every = 2``
    for the rest of the run without a word. The next UL update now refuses it, before
    computing a hypergradient with it."""
    from bilevel.online import OnlineHypergradient
    from bilevel.ul import Truncated

    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=8)
    ul = Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=2)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    runner = OnlineHypergradient(ll, ul, optimizer, hyper_every=2)
    seen: list[int] = []

    def log(record: dict) -> None:
        seen.append(record["ul_step"])
        ul.truncate_iter = 3

    with pytest.raises(ValueError, match=r"truncate_iter == hyper_every \(2\), got 3"):
        runner.run(p.train, p.val, 8, log=log, progress=False)
    assert seen == [1]


def test_a_run_by_hand_checks_the_method_against_the_ll_as_the_runner_does():
    """``ul.run_ll(ll, x, y)`` and ``ul.accumulate`` (the quickstart's run by hand) never
    checked the method against the LL optimizer: a method given another ``ll_objective``
    than the LL took the hypergradient of a problem the LL does not solve, silently, where
    ``BilevelProblem(ll, ul)`` refuses it. ``run_ll`` now checks at its first run with an LL
    optimizer, and again after a setting of either changed."""
    p = ridge()

    def other_ll(state: dict) -> torch.Tensor:
        return 2.0 * ridge_ll(state)

    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=5)
    wrong = Implicit(ridge_ul, p.ul_model, other_ll, p.ll_model, method="neumann")
    with pytest.raises(ValueError) as by_runner:
        BilevelProblem(ll, wrong)
    with pytest.raises(ValueError) as by_hand:
        wrong.run_ll(ll, *p.train)
    assert str(by_hand.value) == str(by_runner.value)
    assert "another ll_objective than the LL optimizer" in str(by_hand.value)

    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.3, method="neumann")
    ll.release(ul.run_ll(ll, *p.train).model)  # agreed: runs
    ul.ll_learning_rate = 0.2  # now disagrees with ll.lr = 0.3, which the series would use
    with pytest.raises(ValueError, match=r"ll_learning_rate=0\.2\) disagrees"):
        ul.run_ll(ll, *p.train)
    ul.ll_learning_rate = None  # read from the LL run: agreed again
    ll.release(ul.run_ll(ll, *p.train).model)
    # the check remembers the LL without keeping it: the method still copies and pickles
    for clone in (copy.deepcopy(ul), pickle.loads(pickle.dumps(ul))):
        assert clone.__dict__.get("_last_check") is None  # a copy checks again


def test_compute_gradients_refuses_an_auxiliary_model_of_another_ll_objective():
    """``ll.optimize`` then ``ul.compute_gradients`` (the other run by hand) took a run of
    another ``ll_objective`` than the method's without a word; the run now knows its LL
    optimizer, which the method is checked against as ``BilevelProblem`` checks it. BDA's run
    of another ``ul_objective`` likewise."""
    from bilevel.ll import BDA
    from bilevel.ul import Reverse

    p = ridge()

    def other_ll(state: dict) -> torch.Tensor:
        return 2.0 * ridge_ll(state)

    def other_ul(state: dict) -> torch.Tensor:
        return 2.0 * ridge_ul(state)

    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=5, differentiable_steps=0)
    wrong = Implicit(ridge_ul, p.ul_model, other_ll, p.ll_model, method="neumann")
    with pytest.raises(ValueError, match="another ll_objective than the LL optimizer"):
        wrong.compute_gradients(*p.val, ll.optimize(*p.train), *p.train)
    assert p.ul_model.log_l2.grad is None
    right = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.3, method="neumann", k=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (5 LL steps: not stationary)
        right.compute_gradients(*p.val, ll.optimize(*p.train), *p.train)
    assert p.ul_model.log_l2.grad is not None

    bda = BDA(
        ridge_ll, p.ll_model, p.ul_model, 0.3, 3, ul_objective=other_ul, alpha=0.5, alpha_decay=1.0
    )
    reverse = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(ValueError, match="BDA steers the LL with another ul_objective"):
        reverse.compute_gradients(*p.val, bda.run(*p.train, ul_batch=p.val).model, *p.train)


def test_compute_gradients_checks_the_method_against_the_ll_optimizer_that_ran():
    """Beyond the objectives: dynamics that the method cannot differentiate were taken by
    hand (Implicit on a BDA run with alpha > 0, which does not end at a stationary point of
    ``ll_objective``; IGA on an AdamW LL), where ``BilevelProblem`` refuses them. The run
    knows its LL optimizer (a weak reference), and ``compute_gradients`` checks against it
    as ``BilevelProblem`` does."""
    from bilevel.ll import BDA
    from bilevel.ul import IGA

    p = ridge()
    bda = BDA(
        ridge_ll, p.ll_model, p.ul_model, 0.3, 3, ul_objective=ridge_ul, alpha=0.5, alpha_decay=1.0
    )
    implicit = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, method="cg")
    with pytest.raises(ValueError) as by_runner:
        BilevelProblem(bda, implicit)
    with pytest.raises(ValueError) as by_hand:
        implicit.compute_gradients(*p.val, bda.run(*p.train, ul_batch=p.val).model, *p.train)
    assert str(by_hand.value) == str(by_runner.value)
    assert "implicit function theorem does not apply" in str(by_hand.value)

    adamw = GradientDescent(
        ridge_ll, p.ll_model, p.ul_model, lr=0.01, iters=3, optimizer="adamw",
        differentiable_steps=0,
    )  # fmt: skip
    iga = IGA(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(ValueError) as by_runner:
        BilevelProblem(adamw, iga)
    with pytest.raises(ValueError) as by_hand:
        iga.compute_gradients(*p.val, adamw.optimize(*p.train), *p.train)
    assert str(by_hand.value) == str(by_runner.value)
    assert p.ul_model.log_l2.grad is None
