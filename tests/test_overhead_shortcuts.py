"""The per-UL-step shortcuts of issue 14 (observers that need no graph, a schedule built once,
one task without the sums of many, PTT's single swap of weights) give what the long way gives,
and keep every check they skip around."""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, ridge, ridge_ll, ridge_ul
from torch import nn

import bilevel.ll.gradient_descent as gd_module
from bilevel import BilevelProblem
from bilevel.ll import GradientDescent, LowerLevelDivergenceError
from bilevel.ll.patched import fast_weights
from bilevel.ul import PTT, FiniteDifference, Reverse

LR, ITERS = 0.3, 6


class Watcher:
    """An observer that records the input weights of the steps it saw, and whether each
    step's result has a graph to the UL variables ``lam``."""

    detach_inputs = False

    def __init__(
        self, lam: torch.Tensor, needs_graph: bool | None = None, last_step_only: bool | None = None
    ):
        if needs_graph is not None:
            self.needs_graph = needs_graph
        if last_step_only is not None:
            self.last_step_only = last_step_only
        self.lam = lam
        self.inputs: list[torch.Tensor] = []
        self.graphs: list[bool] = []

    def propagate(self, weights, opt_state, new, new_state) -> None:
        self.inputs.append(weights[0].detach().clone())
        linked = (  # a frozen UL (requires_grad off) has no graph to it
            self.lam.requires_grad
            and new[0].requires_grad
            and torch.autograd.grad(new[0].sum(), self.lam, retain_graph=True, allow_unused=True)[0]
            is not None
        )
        self.graphs.append(linked)

    def result(self) -> list[torch.Tensor]:
        return self.inputs


def plain_gd(p, iters: int) -> list[torch.Tensor]:
    """``w_0 .. w_iters`` of ``w - lr * grad`` written out, no graph to the UL."""
    lam = p.ul_model.log_l2.detach()
    w = p.ll_model.w.detach().clone()
    path = [w]
    x, y = p.train
    for _ in range(iters):
        w = w.detach().requires_grad_()
        loss = 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w * w).sum()
        (g,) = torch.autograd.grad(loss, w)
        w = (w - LR * g).detach()
        path.append(w)
    return path


def recording_ll(seen: list[bool]):
    """``ridge_ll`` that records whether the UL parameters required grad at each call."""

    def objective(state: dict) -> torch.Tensor:
        seen.append(state["ul_model"].log_l2.requires_grad)
        return ridge_ll(state)

    return objective


@pytest.mark.parametrize("tracked", [0, 2])
def test_a_last_step_observer_sees_the_last_step_with_the_weights_before_it(tracked):
    """``last_step_only`` and ``needs_graph = False``: the earlier steps run in place with the
    UL frozen and unseen; the observer gets ``w_{T-1}`` exactly as plain GD computes it; with a
    graph at the end (``tracked`` steps) it sees those steps, with their graph."""
    p = ridge(seed=3)
    seen: list[bool] = []
    ll = GradientDescent(recording_ll(seen), p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    watcher = Watcher(p.ul_model.log_l2, needs_graph=False, last_step_only=True)
    trajectory = ll.run(*p.train, differentiable_steps=tracked, observer=watcher)
    path = plain_gd(p, ITERS)
    shown = max(tracked, 1)
    assert len(watcher.inputs) == shown
    assert torch.equal(watcher.inputs[-1], path[ITERS - 1])  # bit for bit
    assert torch.equal(trajectory.weights[0].detach(), path[ITERS])
    assert watcher.graphs == ([True] * tracked if tracked else [False])
    # frozen in every step without a graph, live in the graph steps, restored afterwards
    assert seen == [False] * (ITERS - tracked) + [True] * tracked
    assert p.ul_model.log_l2.requires_grad


def test_observers_without_the_attributes_see_every_step_with_its_graph():
    """The default (forward-mode tangents): every step shown, with a graph, UL not frozen."""
    p = ridge(seed=3)
    seen: list[bool] = []
    ll = GradientDescent(recording_ll(seen), p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    watcher = Watcher(p.ul_model.log_l2)
    ll.run(*p.train, differentiable_steps=0, observer=watcher)
    path = plain_gd(p, ITERS)
    assert len(watcher.inputs) == ITERS and all(watcher.graphs)
    assert all(torch.equal(a, b) for a, b in zip(watcher.inputs, path, strict=False))
    assert seen == [True] * ITERS


def test_steps_taken_by_hand_are_all_shown_to_a_last_step_observer():
    """Online methods step one at a time (the run's length is unknown): every step is shown,
    and none of them overwrites the weights the observer holds."""
    p = ridge(seed=3)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    watcher = Watcher(p.ul_model.log_l2, needs_graph=False, last_step_only=True)
    unroll = ll.start(*p.train, observer=watcher)
    for _ in range(3):
        unroll.step(graph=False)
    path = plain_gd(p, 3)
    assert len(watcher.inputs) == 3
    assert all(torch.equal(a, b) for a, b in zip(watcher.inputs, path, strict=False))
    assert torch.equal(fast_weights(unroll.model)[0].detach(), path[3])


def test_finite_difference_with_many_steps_is_the_one_step_answer_from_plain_gd():
    """DARTS after T steps run in place: the exact one-step hypergradient from ``w_{T-1}``
    (Reverse on a one-step LL started there), to O(r^2) with r = 1e-3."""
    p = ridge(seed=4)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    fd = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model, r=1e-3)
    with pytest.warns(RuntimeWarning, match="only the last"):
        (got,) = BilevelProblem(ll, fd).hypergradient(p.train, p.val)
    start = Linear(len(p.ll_model.w), plain_gd(p, ITERS)[ITERS - 1])
    one = GradientDescent(ridge_ll, start, p.ul_model, lr=LR, iters=1)
    (exact,) = BilevelProblem(one, Reverse(ridge_ul, p.ul_model, ridge_ll, start)).hypergradient(
        p.train, p.val
    )
    assert float((got - exact).norm() / exact.norm()) < 1e-9  # ridge: f is quadratic in w


def test_a_constant_schedule_is_built_once_and_callables_at_every_run():
    """Numbers only: the same schedule object at every run, rebuilt when the set of trainable
    LL parameters changes. A callable step size is evaluated at every run."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.ones(2, dtype=DTYPE))
            self.b = nn.Parameter(torch.ones(2, dtype=DTYPE))

    net, ul = Two(), FeatureL2(2)

    def objective(state: dict) -> torch.Tensor:
        m = state["ll_model"]
        return ((m.a - 1.5) ** 2).sum() + ((m.b + 0.5) ** 2).sum() + ul.penalty(m)

    ll = GradientDescent(objective, net, ul, lr=[0.1, 0.2], iters=2)
    first = ll.schedule()
    assert ll.schedule() is first and first.n == 2
    net.b.requires_grad_(False)
    frozen = ll.schedule()
    assert frozen is not first and frozen.n == 1 and frozen.at(0, True)["lr"] == [0.1]
    net.b.requires_grad_(True)
    assert ll.schedule().n == 2

    log_lr = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))
    ul.register_parameter("log_lr", log_lr)
    varying = GradientDescent(objective, net, ul, lr=lambda m: m.log_lr.exp(), iters=2)
    assert varying.schedule() is not varying.schedule()
    with torch.no_grad():
        log_lr.fill_(-2.0)
    lrs = varying.schedule().at(0, True)["lr"]  # one per trainable tensor
    assert all(float(lr) == float(torch.tensor(-2.0, dtype=DTYPE).exp()) for lr in lrs)


def test_one_task_gives_what_the_task_average_gives():
    """The runner's one-task path (no sums over tasks): the same hypergradient, UL loss and
    last LL loss, bit for bit, as a batch of two copies of the task (g + g = 2g and 2g / 2 = g
    are exact)."""
    p = ridge(seed=5)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    problem = BilevelProblem(ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model))
    (one,) = problem.hypergradient(p.train, p.val)
    pair = {key: tuple(torch.stack([t, t]) for t in pair) for key, pair in
            (("train", p.train), ("test", p.val))}  # fmt: skip
    (two,) = problem.meta_hypergradient(pair)
    assert torch.equal(one, two)
    opt = torch.optim.SGD(p.ul_model.parameters(), lr=0.0)
    stepped = BilevelProblem(ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model), opt)
    loss_one = stepped.step(p.train, p.val)
    ll_one = stepped.last_ll_loss
    loss_two = stepped.meta_step(pair)
    assert loss_one.shape == () and stepped.last_ll_loss.shape == ()
    assert torch.equal(loss_one, loss_two) and torch.equal(ll_one, stepped.last_ll_loss)


def test_ptt_leaves_the_auxiliary_model_at_the_final_weights():
    """PTT evaluates the UL loss at every iterate through one swap of weights; afterwards the
    auxiliary model holds the run's final weights again."""
    p = ridge(seed=6)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    ptt = PTT(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    trajectory = ptt.run_ll(ll, *p.train)
    final = fast_weights(trajectory.model)
    ptt.accumulate(trajectory, p.val, p.train)
    assert all(a is b for a, b in zip(fast_weights(trajectory.model), final, strict=True))
    assert 1 <= ptt.diagnostics["ptt_step"] <= ITERS


@pytest.mark.parametrize("short", [True, False])
def test_the_loss_checks_hold_on_both_paths(short, monkeypatch):
    """Short runs read the losses back whole, long ones reduce them first: both refuse NaN
    (naming the step) and a growing loss."""
    if not short:
        monkeypatch.setattr(gd_module, "SHORT_RUN", 0)
    p = ridge(seed=7)
    grows = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=10.0, iters=ITERS)
    with pytest.raises(LowerLevelDivergenceError, match="grew"):
        grows.run(*p.train)
    x, y = p.train
    x = x.clone()
    x[0, 0] = float("nan")
    finite = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    with pytest.raises(FloatingPointError, match="at LL step 0 of"):
        finite.run(x, y)


def test_a_non_finite_ul_loss_is_refused():
    """The UL loss is still checked (one sync per task)."""
    p = ridge(seed=8)

    def nan_ul(state: dict) -> torch.Tensor:
        return ridge_ul(state) * float("nan")

    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=2)
    problem = BilevelProblem(ll, Reverse(nan_ul, p.ul_model, ridge_ll, p.ll_model))
    with pytest.raises(FloatingPointError, match="UL loss is not finite"):
        problem.hypergradient(p.train, p.val)


def test_parameter_list_is_parameters_in_order():
    """The direct walk gives ``list(module.parameters())``: same tensors, same order, shared
    modules and parameters once, ``None`` slots skipped, an override of ``parameters`` asked."""
    from bilevel.ll.patched import parameter_list

    shared = nn.Linear(3, 3)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(shared, nn.Tanh()))
    net.add_module("again", shared)
    net.extra = nn.Parameter(torch.zeros(2))
    net[0].register_parameter("bias", None)

    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.ones(1))

        def parameters(self, recurse: bool = True):
            return iter([self.b, self.a])

    for module in (net, nn.GRU(2, 3, num_layers=2), Reordered()):
        expected = list(module.parameters())
        got = parameter_list(module)
        assert len(got) == len(expected)
        assert all(a is b for a, b in zip(got, expected, strict=True))


def test_the_run_plan_follows_replaced_and_frozen_parameters():
    """The plan kept across runs is rebuilt when a parameter is replaced or frozen: each run
    gives what a newly built LL gives on the models as they are then."""
    p = ridge(seed=9)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    problem = BilevelProblem(ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model))
    problem.hypergradient(p.train, p.val)
    plan = ll.plan()
    assert ll.plan() is plan  # nothing changed: reused
    p.ll_model.w = nn.Parameter(torch.randn(len(p.ll_model.w), dtype=DTYPE))
    (got,) = problem.hypergradient(p.train, p.val)
    assert ll.plan() is not plan and ll.plan().params[0] is p.ll_model.w
    fresh = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    (exact,) = BilevelProblem(
        fresh, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    ).hypergradient(p.train, p.val)
    assert torch.equal(got, exact)  # the same arithmetic on the new start
    p.ll_model.w.requires_grad_(False)  # nothing left to optimize: refused as at construction
    with pytest.raises(ValueError, match="no parameters that require grad"):
        problem.hypergradient(p.train, p.val)


def test_one_step_darts_reads_the_weights_without_moving_them():
    """One-step DARTS starts from aliases of the LL weights (no copy): the user's weights are
    bitwise unchanged by the run, and the answer is the copied run's."""
    p = ridge(seed=10)
    before = p.ll_model.w.detach().clone()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=1)
    fd = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model, r=1e-3)
    (got,) = BilevelProblem(ll, fd).hypergradient(p.train, p.val)
    assert torch.equal(p.ll_model.w.detach(), before)
    original = gd_module.GradientDescent.start

    def copying(self, *args, **kwargs):
        return original(self, *args[:5], copy=True)

    gd_module.GradientDescent.start = copying
    try:
        (copied,) = BilevelProblem(ll, fd).hypergradient(p.train, p.val)
    finally:
        gd_module.GradientDescent.start = original
    assert torch.equal(got, copied)
