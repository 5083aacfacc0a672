"""Review of the checks of runs by hand and of settings changed inside an online run
(float64).

FOUND: an online run checked a setting changed from its ``log`` at the next UL update, but
``log`` runs before the update's checkpoint is written: the checkpoint held the refused
setting (``Truncated``'s ``truncate_iter`` other than ``hyper_every``), and loading it sets
the run's changed settings again, so every resume from that file, also by the script fixed
since, was refused at its first UL update (delete the file and lose the run). The runner's
state now refuses such a setting (``state_dict``, ``save_checkpoint``): the file keeps the
last update that can be resumed.

FOUND: ``MemorySavingReverse`` overrides ``run_ll`` without the check of the method against
the LL optimizer that ``HypergradientCalculator.run_ll`` makes, so a run by hand with another
``ll_objective``, or with a ``BDA`` steered by another ``ul_objective`` (whose hypergradient
it then took silently), was accepted; ``BilevelProblem`` refuses both. Both ``run_ll`` now
call ``check_against_once``.

FOUND: ``BilevelProblem.run`` has the online run's order too: ``log`` before the step's
checkpoint. A ``log`` that set a setting the method refuses against the LL optimizer
(``Implicit``'s ``ll_learning_rate`` other than ``ll.lr``) had it written into the
checkpoint, and every resume from that file was refused at its first step. ``state_dict``
now refuses such a setting first."""

from __future__ import annotations

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import BDA, GradientDescent
from bilevel.online import OnlineHypergradient
from bilevel.ul import MemorySavingReverse, Reverse, Truncated

REFUSED = r"truncate_iter == hyper_every \(2\), got 3"


def online_truncated() -> tuple[torch.nn.Module, Truncated, OnlineHypergradient, tuple]:
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=8)
    ul = Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=2)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    return p.ul_model, ul, OnlineHypergradient(ll, ul, optimizer, hyper_every=2), (p.train, p.val)


def test_an_online_checkpoint_never_holds_a_setting_the_run_refuses(tmp_path):
    """A ``log`` that sets ``truncate_iter = 3`` at the second UL update: the run is refused,
    and its checkpoint keeps the first update, which the fixed script resumes to the end of
    the uninterrupted run (it was written with ``truncate_iter = 3``, and every resume from
    it was refused at its first UL update)."""
    model, _, runner, data = online_truncated()
    runner.run(*data, 8, progress=False)
    uninterrupted = [t.detach().clone() for t in model.parameters()]

    path = tmp_path / "online.pt"
    model, ul, runner, data = online_truncated()

    def log(record: dict) -> None:
        if record["ul_step"] == 2:
            ul.truncate_iter = 3

    with pytest.raises(ValueError, match=REFUSED):
        runner.run(*data, 8, log=log, progress=False, checkpoint=path, checkpoint_every=1)
    with pytest.raises(ValueError, match=REFUSED):
        runner.state_dict()
    ul.truncate_iter = 2  # set back: the state may be taken again
    assert runner.state_dict()["changed_settings"]["ul"] == {}

    model, _, runner, data = online_truncated()  # the script, fixed
    runner.run(*data, 8, progress=False, checkpoint=path)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), uninterrupted, strict=True))


def test_memory_saving_reverse_by_hand_is_checked_as_reverse_is():
    p = ridge()

    def other_ul(state: dict) -> torch.Tensor:
        return 2.0 * ridge_ul(state)

    bda = BDA(
        ridge_ll, p.ll_model, p.ul_model, 0.3, 3, ul_objective=other_ul, alpha=0.5, alpha_decay=1.0
    )
    for method in (Reverse, MemorySavingReverse):
        ul = method(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
        with pytest.raises(ValueError) as by_runner:
            BilevelProblem(bda, ul)
        with pytest.raises(ValueError) as by_hand:
            ul.run_ll(bda, *p.train, ul_batch=p.val)
        assert str(by_hand.value) == str(by_runner.value)


def test_a_checkpoint_of_a_run_never_holds_a_setting_the_method_refuses(tmp_path):
    """``BilevelProblem.run`` with a ``log`` that sets ``Implicit``'s ``ll_learning_rate`` to
    0.2 against ``ll.lr = 0.3`` after step 2: the run is refused at that step's checkpoint,
    which keeps step 1, and the fixed script resumes it to the uninterrupted run's end (the
    file held 0.2, and every resume from it was refused at its first step)."""
    from bilevel.ul import Implicit

    def build():
        p = ridge()
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=20)
        ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.3, method="neumann")
        ul.stationarity_warning = None
        optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
        return BilevelProblem(ll, ul, optimizer), p

    def data(p):
        return lambda step: (p.train, p.val)

    whole, p = build()
    whole.run(data(p), 4, progress=False)

    path = tmp_path / "run.pt"
    problem, p = build()

    def log(record: dict) -> None:
        if record["step"] == 2:
            problem.ul.ll_learning_rate = 0.2

    with pytest.raises(ValueError, match=r"ll_learning_rate=0\.2\) disagrees"):
        problem.run(data(p), 4, checkpoint=path, checkpoint_every=1, log=log, log_every=1)
    with pytest.raises(ValueError, match=r"ll_learning_rate=0\.2\) disagrees"):
        problem.state_dict()
    resumed, q = build()  # the script, fixed
    resumed.run(data(q), 4, checkpoint=path, progress=False)
    assert resumed.step_count == 4
    for a, b in zip(whole.ul.ul_params, resumed.ul.ul_params, strict=True):
        assert torch.equal(a, b)
