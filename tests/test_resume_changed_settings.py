"""A setting changed during a run is part of the run (float64): a resume continues with it.

FOUND: a checkpoint recorded the settings as they were when the problem was built. A script
that changes a setting once, mid-run (``if step == 2: ll.iters = 12``), and is interrupted
after that step, resumed with the value it was built with: the resumed run silently differed
from the uninterrupted one. A checkpoint now also holds the settings changed since
construction (those that are plain values), and loading it sets them again, checked as
any assignment is, as torch's optimizers restore their groups' hyperparameters; a script that
sets a setting at every step still resumes as before."""

from __future__ import annotations

import warnings

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import BVFIM, F2SA, Implicit, Reverse

LR = 0.3
STEPS = 5


def implicit_problem(p) -> BilevelProblem:
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=30)
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, k=3, stationarity_warning=None)
    return BilevelProblem(ll, ul, torch.optim.Adam(p.ul_model.parameters(), lr=0.05))


def reverse_problem(p) -> BilevelProblem:
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=4)
    ul = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    return BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.5))


def f2sa_problem(p) -> BilevelProblem:
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=3)
    ul = F2SA(ridge_ul, p.ul_model, ridge_ll, p.ll_model, lam=1.0, lam_growth=0.5, lam_max=2.0)
    return BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.05))


def one_shot_iters(problem: BilevelProblem, step: int) -> None:
    if step == 2:
        problem.ll.iters = 12


def one_shot_k(problem: BilevelProblem, step: int) -> None:
    if step == 1:
        problem.ul.k = 9
        problem.ll.on_growth = "warn"


def one_shot_pair(problem: BilevelProblem, step: int) -> None:
    if step == 2:  # both ends of a constrained pair, the cap first
        problem.ul.lam_max = 9.0
        problem.ul.lam = 6.0


def every_step(problem: BilevelProblem, step: int) -> None:
    problem.ll.iters = 4 + step % 3


def run(build, change, p, steps, problem=None) -> BilevelProblem:
    problem = problem or build(p)
    for step in range(problem.step_count, steps):
        change(problem, step)
        problem.step(p.train, p.val)
    return problem


CASES = [
    (reverse_problem, one_shot_iters),
    (implicit_problem, one_shot_k),
    (f2sa_problem, one_shot_pair),
    (reverse_problem, every_step),
]


@pytest.mark.parametrize(("build", "change"), CASES)
def test_a_resumed_run_is_the_uninterrupted_one_after_a_setting_changed(tmp_path, build, change):
    whole = run(build, change, ridge(seed=4), STEPS)
    for stop in (2, 3, 4):  # before, at and after the change
        p = ridge(seed=4)
        run(build, change, p, stop).save_checkpoint(tmp_path / "run.pt")
        q = ridge(seed=4)  # a new process: the script builds its problem again
        resumed = build(q)
        resumed.load_checkpoint(tmp_path / "run.pt")
        run(build, change, q, STEPS, resumed)
        for a, b in zip(whole.ul.ul_params, resumed.ul.ul_params, strict=True):
            assert torch.equal(a, b), (change.__name__, stop)
        assert resumed._changeable() == whole._changeable()  # every setting, as the run has it


def test_a_changed_setting_that_this_problem_refuses_is_refused_and_nothing_changes(tmp_path):
    p = ridge(seed=5)
    problem = run(implicit_problem, one_shot_k, p, 3)
    state = problem.state_dict()
    state["changed_settings"]["ul"]["k"] = -1  # a damaged or hand-made file
    q = ridge(seed=5)
    fresh = implicit_problem(q)
    fresh.ul.tolerance = 1e-12  # the user's own change, before the load
    before = [t.clone() for t in q.ul_model.parameters()]
    with pytest.raises(ValueError, match=r"ul\.k = -1.*k must be an integer >= 1"):
        fresh.load_state_dict(state)
    assert fresh.ul.k == 3 and fresh.ul.tolerance == 1e-12 and fresh.ll.on_growth == "raise"
    assert fresh.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, q.ul_model.parameters(), strict=True))
    state["changed_settings"]["ul"]["no_such_setting"] = 1.0
    del state["changed_settings"]["ul"]["k"]
    with pytest.raises(ValueError, match=r"ul\.no_such_setting"):
        fresh.load_state_dict(state)
    assert fresh.ll.on_growth == "raise"


def test_a_setting_the_run_left_alone_keeps_the_users_value(tmp_path):
    """Only what the checkpoint's run changed is set: a setting it kept at its built value
    stays what the resuming script set (as before)."""
    p = ridge(seed=6)
    run(implicit_problem, lambda problem, step: None, p, 2).save_checkpoint(tmp_path / "a.pt")
    q = ridge(seed=6)
    resumed = implicit_problem(q)
    resumed.ul.k = 7
    resumed.load_checkpoint(tmp_path / "a.pt")
    assert resumed.ul.k == 7


def test_a_changed_setting_a_file_cannot_hold_is_named_on_load(tmp_path):
    """A callable set mid-run cannot be written to a checkpoint: loading says which setting
    to set again, rather than resuming with the built value silently."""
    p = ridge(seed=7)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=3)
    ul = BVFIM(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.01))
    problem.step(p.train, p.val)
    ul.mu = lambda step: 0.5 / (step + 1)
    problem.step(p.train, p.val)
    problem.save_checkpoint(tmp_path / "b.pt")
    q = ridge(seed=7)
    ll = GradientDescent(ridge_ll, q.ll_model, q.ul_model, lr=LR, iters=3)
    ul = BVFIM(ridge_ul, q.ul_model, ridge_ll, q.ll_model)
    resumed = BilevelProblem(ll, ul, torch.optim.SGD(q.ul_model.parameters(), lr=0.01))
    with pytest.warns(RuntimeWarning, match=r"ul\.mu.*set it again after loading"):
        resumed.load_checkpoint(tmp_path / "b.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        implicit_problem(ridge()).load_state_dict(implicit_problem(ridge()).state_dict())
