"""Review of the online runs' resume (``OnlineHypergradient`` checkpoints), each case against
the uninterrupted run bitwise (``torch.equal``), or a refusal before any change:

- a resume refused for too few ``ll_steps`` keeps the loaded state, so that the retry the
  message asks for continues it (it started a new LL run silently);
- a state taken from ``log`` is a snapshot of that UL update (kept in memory, its UL model and
  optimizer moved on with the run, and loading it mixed two moments);
- a saved LL run that does not fit this one (LL parameters trainable then and not now, or a
  run of another method loaded with ``strict=False``) is refused when loaded, with the cure,
  before anything changes (it was refused by ``run`` with a bare ``zip()`` error, after the
  UL model, optimizer and RNG had been loaded);
- a UL variable that reaches the LL only in the first LL steps keeps its tangent's part of
  the hypergradient after a resume (Forward's ``reached`` is restored);
- fixed batches, dropout and batch norm in train mode; a second call without a checkpoint
  starts a new LL run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, ridge, ridge_ll, ridge_ul
from test_online_resume import (
    EVERY,
    METHODS,
    STEPS,
    Hypers,
    Killed,
    Run,
    assert_bitwise,
    outcome,
    seed_all,
)
from torch import nn

from bilevel import checkpoint
from bilevel.ll import GradientDescent, fast_weights
from bilevel.online import OnlineHypergradient
from bilevel.ul import Forward, Truncated


def uninterrupted(method: str) -> dict:
    seed_all(0)
    run = Run(method)
    return outcome(run, run.run())


@pytest.mark.parametrize("method", METHODS)
def test_a_resume_refused_for_too_few_steps_keeps_the_loaded_state(method):
    """The state of a run saved at LL step 12, loaded and run with ``ll_steps = 10``, is
    refused ("give ll_steps >= that"); run again with 22 steps, it continues from LL step 12
    as the uninterrupted run of 22."""
    want = uninterrupted(method)
    seed_all(0)
    first = Run(method)
    first.run(steps=14)
    state = first.runner.state_dict()
    seed_all(1)
    second = Run(method)
    second.runner.load_state_dict(state)
    with pytest.raises(ValueError, match="give ll_steps >= that"):
        second.run(steps=10)
    assert not second.asked
    assert_bitwise(outcome(second, second.run()), want)
    assert second.asked == list(range(12, STEPS))


@pytest.mark.parametrize("method", METHODS)
def test_a_state_taken_from_log_is_a_snapshot_of_that_update(method):
    """``state_dict()`` called from ``log`` at the second UL update (LL step 8) and kept in
    memory while the run goes on resumes as that update, as the same state saved to a file
    does."""
    want = uninterrupted(method)
    seed_all(0)
    run = Run(method)
    kept = []

    def log(record: dict) -> None:
        if record["ul_step"] == 2:
            kept.append(run.runner.state_dict())

    run.runner.run(run.train, run.val, STEPS, log=log, progress=False)
    seed_all(1)
    resumed = Run(method)
    resumed.runner.load_state_dict(kept[0])
    assert_bitwise(outcome(resumed, resumed.run()), want)
    assert resumed.asked == list(range(8, STEPS))


class Biased(nn.Module):
    """``x @ w + b``: an LL model with a bias that may be frozen."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=DTYPE))
        self.b = nn.Parameter(torch.zeros((), dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


def biased_run(method: str, frozen: bool, momentum: float):
    p, net, ul = ridge(d=5), Biased(5), Hypers(5)
    ul.log_lr.requires_grad_(False)
    net.b.requires_grad_(not frozen)
    ll = GradientDescent(ridge_ll, net, ul, lr=0.1, iters=1, momentum=momentum)
    if method == "forward":
        calculator = Forward(ridge_ul, ul, ridge_ll, net)
    else:
        calculator = Truncated(ridge_ul, ul, ridge_ll, net, truncate_iter=4)
    optimizer = torch.optim.Adam([ul.log_l2], lr=0.05)
    return OnlineHypergradient(ll, calculator, optimizer, 4), p, ul


@pytest.mark.parametrize(
    ("method", "momentum"), [("forward", 0.0), ("forward", 0.5), ("truncated", 0.5)]
)
def test_a_saved_ll_run_with_other_trainable_parameters_is_refused_before_any_change(
    tmp_path, method, momentum
):
    """Saved with the LL bias frozen, resumed with it trainable: the momentum buffers and the
    tangents are one per trainable weight, so the saved run cannot continue. Refused at the
    load, naming the cure, with the UL model, its optimizer and the RNG as they were."""
    path = tmp_path / "online.pt"
    runner, p, _ = biased_run(method, frozen=True, momentum=momentum)
    runner.run(p.train, p.val, 8, progress=False, checkpoint=path)
    runner, p, ul = biased_run(method, frozen=False, momentum=momentum)
    before = (ul.log_l2.detach().clone(), torch.get_rng_state())
    for load in (runner.load_checkpoint, lambda f: runner.run(p.train, p.val, 12, checkpoint=f)):
        with pytest.raises(ValueError, match=r"trainable \(requires_grad\) as when it was saved"):
            load(path)
        assert torch.equal(ul.log_l2, before[0]) and torch.equal(torch.get_rng_state(), before[1])
        assert not runner.ul_optimizer.state


def test_a_run_of_another_method_loaded_non_strictly_is_refused_before_any_change(tmp_path):
    """``strict=False`` skips the settings check; the saved RTHO run (with tangents) still
    cannot continue as a truncated one, and is refused at the load, not by ``run``."""
    path = tmp_path / "online.pt"
    seed_all(0)
    Run("forward").run(steps=8, checkpoint=path)
    other = Run("truncated")
    before = [p.detach().clone() for p in other.ul.parameters()]
    with pytest.raises(ValueError, match="saved by a run of another method"):
        other.runner.load_checkpoint(path, strict=False)
    assert all(torch.equal(a, b) for a, b in zip(before, other.ul.parameters(), strict=True))
    other.run(steps=4)
    assert other.asked == [0, 1, 2, 3]  # no state was loaded: a new LL run


class Pull(nn.Module):
    """An L2 penalty and ``mu``, a linear pull ``mu * sum(w)`` on the LL weights that the LL
    objective has only while ``early`` (the first LL steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))
        self.mu = nn.Parameter(torch.tensor(0.5, dtype=DTYPE))
        self.early = True


def pull_ll(state: dict) -> torch.Tensor:
    ul, w = state["ul_model"], state["ll_model"].w
    loss = ridge_ul(state) + 0.5 * ul.log_l2.exp() * (w * w).sum()
    return loss + ul.mu * w.sum() if ul.early else loss


def pull_ul(state: dict) -> torch.Tensor:
    return ridge_ul(state) + 0.01 * state["ul_model"].mu ** 2


def pull_run():
    p, net, ul = ridge(d=5), Linear(5), Pull()
    ll = GradientDescent(pull_ll, net, ul, lr=0.1, iters=1)
    calculator = Forward(pull_ul, ul, pull_ll, net)
    runner = OnlineHypergradient(ll, calculator, torch.optim.SGD(ul.parameters(), lr=0.1), 4)

    def train(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ul.early = step < 4  # mu reaches the LL weights in the first window only
        return p.train

    return runner, ul, train, p.val


def test_a_ul_variable_that_reached_the_ll_only_before_the_resume_keeps_its_tangent(tmp_path):
    """After LL step 4, ``mu`` has no path into any step, but its tangent ``dw/dmu`` from the
    first four steps still carries its hypergradient. Resumed at LL step 8, its part is kept
    only if the saved ``reached`` flags are restored (recomputed from the steps after the
    resume they would say ``mu`` never reached the LL, and its update would lose the part)."""
    runner, ul, train, val = pull_run()
    model = runner.run(train, val, 12, progress=False)
    want = [t.detach().clone() for t in [*fast_weights(model), *ul.parameters()]]
    path = tmp_path / "online.pt"
    runner, ul, train, val = pull_run()
    runner.run(train, val, 8, progress=False, checkpoint=path)
    assert torch.load(path, weights_only=True)["online"]["run"]["observer"]["reached"] == [
        True,
        True,
    ]
    runner, ul, train, val = pull_run()
    model = runner.run(train, val, 12, progress=False, checkpoint=path)
    got = [t.detach().clone() for t in [*fast_weights(model), *ul.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


class Dropped(nn.Module):
    """``dropout(batchnorm(x)) @ w``: random draws inside every LL step, and buffers."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=DTYPE))
        self.bn = nn.BatchNorm1d(d, affine=False, dtype=DTYPE)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(x)) @ self.w


def dropout_run(method: str):
    p, net, ul = ridge(d=5), Dropped(5), Hypers(5)
    ll = GradientDescent(ridge_ll, net, ul, lr=lambda u: u.log_lr.exp(), iters=1, optimizer="adam")
    if method == "forward":
        calculator = Forward(ridge_ul, ul, ridge_ll, net)
    else:
        calculator = Truncated(ridge_ul, ul, ridge_ll, net, truncate_iter=3)
    optimizer = torch.optim.Adam(ul.parameters(), lr=0.05)
    return OnlineHypergradient(ll, calculator, optimizer, 3), p, ul


@pytest.mark.parametrize("method", METHODS)
def test_fixed_batches_with_dropout_resume_bitwise(tmp_path, method):
    """``train`` and ``val`` given as fixed batches (not functions); the LL steps draw
    dropout masks. Killed before LL step 8 of 11 (hyper_every 3), the run resumes from LL
    step 6 and redraws the masks of steps 6 and 7 as the uninterrupted run drew them."""
    torch.manual_seed(0)
    runner, p, ul = dropout_run(method)
    model = runner.run(p.train, p.val, 11, progress=False)
    want = [t.detach().clone() for t in [*fast_weights(model), *model.buffers(), *ul.parameters()]]
    path = tmp_path / "online.pt"
    torch.manual_seed(0)
    runner, p, ul = dropout_run(method)

    def killed(step: int):
        if step == 8:
            raise Killed
        return p.train

    with pytest.raises(Killed):
        runner.run(killed, p.val, 11, progress=False, checkpoint=path, checkpoint_every=1)
    torch.manual_seed(1)
    runner, p, ul = dropout_run(method)
    model = runner.run(p.train, p.val, 11, progress=False, checkpoint=path)
    got = [t.detach().clone() for t in [*fast_weights(model), *model.buffers(), *ul.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_a_second_call_without_checkpoint_starts_a_new_ll_run(method):
    """After a run of 10 LL steps (its last update at 8 kept for ``state_dict``), a call of 7
    steps starts the LL again from ``ll_model``'s weights, with the UL variables and optimizer
    carried on: as a new runner on copies of them does."""
    seed_all(0)
    run = Run(method)
    run.run(steps=10)
    ul_state = copy.deepcopy(run.ul.state_dict())
    optimizer_state = copy.deepcopy(run.optimizer.state_dict())
    rng = checkpoint.rng_state()
    second = outcome(run, run.run(steps=7))
    fresh = Run(method)
    fresh.ul.load_state_dict(ul_state)
    fresh.optimizer.load_state_dict(optimizer_state)
    checkpoint.set_rng_state(rng)
    assert run.asked[-7:] == list(range(7))
    assert_bitwise(outcome(fresh, fresh.run(steps=7)), second)


# --- an online run is one process's ---------------------------------------------------------


def _online_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    """Each process builds its own online runner from its own initial values."""
    import torch.distributed as dist
    from test_distributed import join_group

    join_group(rank, world, rendezvous)
    try:
        ul = FeatureL2(3, value=0.1 * (rank + 1))
        net = Linear(3, torch.full((3,), float(rank + 1), dtype=DTYPE))
        ll = GradientDescent(ridge_ll, net, ul, lr=0.1, iters=1)
        optimizer = torch.optim.SGD(ul.parameters(), lr=0.1)
        OnlineHypergradient(ll, Forward(ridge_ul, ul, ridge_ll, net), optimizer, 2)
        saved = {"ul": ul.log_l2.detach().clone(), "ll": net.w.detach().clone()}
        torch.save(saved, out + str(rank))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_building_an_online_runner_under_torch_distributed_keeps_each_process_s_models(tmp_path):
    """Building the runner broadcast rank 0's models to every process (its checkpoints come
    from BilevelProblem, which does so for the problems the processes compute together),
    overwriting the other processes' own initial values in a per-process sweep."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_online_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(out + str(rank), weights_only=True)
        assert torch.equal(got["ll"], torch.full((3,), float(rank + 1), dtype=DTYPE))
        want = FeatureL2(3, value=0.1 * (rank + 1)).log_l2.detach()
        assert torch.equal(got["ul"], want)


@pytest.mark.parametrize("method", METHODS)
def test_sigterm_before_the_first_update_does_not_claim_a_checkpoint(tmp_path, method, capsys):
    """A run shorter than hyper_every has no UL update, so nothing is saved: the message said
    "checkpoint saved to ..." and Interrupted named the file, which did not exist."""
    from bilevel.problem import Interrupted

    path = tmp_path / "online.pt"
    seed_all(0)
    run = Run(method)
    with pytest.raises(Interrupted) as stopped:
        run.run(steps=3, train=run.terminated_at(1), checkpoint=path)
    assert not path.exists()
    assert stopped.value.checkpoint is None
    message = capsys.readouterr().err
    assert "checkpoint saved" not in message and "nothing was saved" in message


# --- review 4 (a helper's findings, 2026-12-04) --------------------------------------------


@pytest.mark.parametrize("part", ["hyper_every", "ll", "ul", "ul_optimizer"])
def test_the_runners_parts_are_fixed_at_construction(part):
    """``runner.hyper_every = 4`` (built with 3) ran every 4 steps while its checkpoints
    recorded 3, then refused them as damaged; a replaced UL optimizer ran while the
    checkpoints saved the old one, never stepped (the resumed run lost its momentum); a
    replaced LL ran while they recorded the old one's settings."""
    run = Run("forward")
    before = getattr(run.runner, part)
    with pytest.raises(AttributeError, match=f"{part} is fixed at construction.*Build a new"):
        setattr(run.runner, part, before)
    assert getattr(run.runner, part) is before


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_between_updates_is_refused(method):
    """Taken from a batch function between two UL updates, the state held the moved UL
    variables with the LL run of no update (LL step 0): resumed, it restarted the LL from
    ll_model's weights, 0.04 off the uninterrupted run, silently. From log it is the update's."""
    seed_all(0)
    run = Run(method)
    taken: list = []

    def train(step: int):
        if step == EVERY + 1:  # between the first two UL updates
            with pytest.raises(RuntimeError, match="call it from log"):
                run.runner.state_dict()
            taken.append(step)
        return run.train(step)

    run.run(train=train)
    assert taken == [EVERY + 1]
    held = run.runner.state_dict()["online"]["ll_step"]  # after the run: its last update's
    assert held == STEPS - STEPS % EVERY
