"""Meta-SGD: per-element learned step sizes, against a hand-written unroll (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from problems import DTYPE, Linear
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent, PerElement, PerStep
from bilevel.ul import Reverse


class MetaSGD(nn.Module):
    """The initialization and one learned step size per weight (Li et al. 2017)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.log_lr = nn.Parameter(torch.full_like(net.w.detach(), -2.0))


def task_loss(state):
    return 0.5 * (state["ll_model"](state["data"]) - state["target"]).pow(2).mean()


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, xv = (torch.randn(12, 4, generator=g, dtype=DTYPE) for _ in range(2))
    y, yv = (torch.randn(12, generator=g, dtype=DTYPE) for _ in range(2))
    return (x, y), (xv, yv)


@pytest.mark.parametrize("given_as", ["callable", "tensor"])
def test_meta_sgd_per_element_step_sizes_match_a_hand_written_unroll(given_as):
    torch.manual_seed(0)
    net = Linear(4, torch.randn(4, dtype=DTYPE))
    meta = MetaSGD(net)
    (x, y), (xv, yv) = data()
    iters = 5  # not 4: a (4,) tensor would also read as a per-step schedule
    # by hand: w <- w - exp(log_lr) * grad, elementwise, from the learned initialization
    w0 = net.w.detach().clone().requires_grad_()
    log_lr = meta.log_lr.detach().clone().requires_grad_()
    w = w0
    for _ in range(iters):
        w = w - log_lr.exp() * (x.T @ (x @ w - y) / len(x))
    expected = torch.autograd.grad(0.5 * (xv @ w - yv).pow(2).mean(), [w0, log_lr])
    if given_as == "callable":
        lr = [lambda ul: ul.log_lr.exp()]
    else:
        lr = [meta.log_lr]  # a leaf tensor shaped like the weight: the step size itself
        expected = (expected[0], expected[1] / log_lr.exp())  # d/d(lr) = d/d(log lr) / lr
        with torch.no_grad():
            meta.log_lr.copy_(log_lr.exp())
    ll = GradientDescent(task_loss, net, meta, lr=lr, iters=iters)
    problem = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net))
    grads = problem.hypergradient((x, y), (xv, yv))
    named = dict(zip([n for n, _ in meta.named_parameters()], grads, strict=True))
    torch.testing.assert_close(named["net.w"], expected[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(named["log_lr"], expected[1], rtol=1e-12, atol=1e-15)


def test_a_per_element_value_of_the_wrong_shape_names_the_shapes():
    net = Linear(4)
    meta = MetaSGD(net)
    with pytest.raises(ValueError, match=r"its parameter's shape \(4,\)"):
        GradientDescent(task_loss, net, meta, lr=[torch.ones(3, dtype=DTYPE)], iters=2)
    with pytest.raises(ValueError, match="both a per-step schedule of 4 steps"):
        GradientDescent(task_loss, net, meta, lr=[torch.ones(4, dtype=DTYPE)], iters=4)


@pytest.mark.parametrize("given_as", ["callable", "tensor"])
def test_learned_per_element_step_sizes_may_turn_negative_said_once(given_as):
    """Meta-SGD's step sizes set each weight's direction as well as its step (Li et al.
    2017): an entry the UL steps drive below zero is Meta-SGD's choice. The run goes on with
    the exact hypergradient (against the hand-written unroll, negative entry included), and
    a warning says it once. (A range check at every run ended the Omniglot Meta-SGD run at
    meta-step ~300, with a ValueError that printed all 32,000 step sizes.)"""
    torch.manual_seed(0)
    net = Linear(4, torch.randn(4, dtype=DTYPE))
    step_sizes = torch.tensor([0.1, -0.05, 0.2, 0.15], dtype=DTYPE)
    meta = nn.Module()
    meta.net = net
    meta.lrs = nn.Parameter(step_sizes.clone())
    (x, y), (xv, yv) = data()
    iters = 5
    w0 = net.w.detach().clone().requires_grad_()
    lrs = step_sizes.clone().requires_grad_()
    w = w0
    for _ in range(iters):
        w = w - lrs * (x.T @ (x @ w - y) / len(x))
    expected = torch.autograd.grad(0.5 * (xv @ w - yv).pow(2).mean(), [w0, lrs])
    lr = [meta.lrs] if given_as == "tensor" else [lambda ul: ul.lrs]
    # constructed with positive entries, then moved below zero as a UL step would
    with torch.no_grad():
        meta.lrs.fill_(0.1)
    ll = GradientDescent(task_loss, net, meta, lr=lr, iters=iters, on_growth="ignore")
    problem = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net))
    with torch.no_grad():
        meta.lrs.copy_(step_sizes)
    with pytest.warns(RuntimeWarning, match=r"lr .*outside \(0\.0, inf\).*Meta-SGD allows it"):
        grads = problem.hypergradient((x, y), (xv, yv))
    named = dict(zip([n for n, _ in meta.named_parameters()], grads, strict=True))
    torch.testing.assert_close(named["net.w"], expected[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(named["lrs"], expected[1], rtol=1e-12, atol=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next runs are quiet
        problem.hypergradient((x, y), (xv, yv))
    with torch.no_grad():
        meta.lrs[1] = float("nan")
    with pytest.raises(ValueError, match="must lie in"):
        problem.hypergradient((x, y), (xv, yv))


def test_learned_step_sizes_below_zero_at_construction_are_accepted():
    """BUG (before the fix): the construction check refused a learned per-element step size
    below zero, which every run accepts with a warning: a trained Meta-SGD model, loaded
    before its LL optimizer is built, could not be evaluated. A fixed one (no grad) is still
    refused, and a learned NaN too."""
    torch.manual_seed(0)
    net = Linear(4, torch.randn(4, dtype=DTYPE))
    meta = nn.Module()
    meta.net = net
    meta.lrs = nn.Parameter(torch.tensor([0.1, -0.05, 0.2, 0.15], dtype=DTYPE))
    (x, y), (xv, yv) = data()
    ll = GradientDescent(task_loss, net, meta, lr=[meta.lrs], iters=5, on_growth="ignore")
    problem = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net))
    with pytest.warns(RuntimeWarning, match="Meta-SGD allows it"):
        problem.hypergradient((x, y), (xv, yv))
    fixed = meta.lrs.detach().clone()
    with pytest.raises(ValueError, match=r"lr must lie in \(0\.0, inf\)"):
        GradientDescent(task_loss, net, meta, lr=[fixed], iters=5)
    with torch.no_grad():
        meta.lrs[1] = float("nan")
    with pytest.raises(ValueError, match="learned per-element step sizes"):
        GradientDescent(task_loss, net, meta, lr=[meta.lrs], iters=5)


def test_a_refusal_of_many_step_sizes_summarizes_them():
    """A refused per-element value is summarized, not printed whole."""
    torch.manual_seed(0)
    net = Linear(40, torch.randn(40, dtype=DTYPE))
    meta = nn.Module()
    meta.net = net
    meta.lrs = nn.Parameter(torch.full((40,), 0.1, dtype=DTYPE))
    ll = GradientDescent(task_loss, net, meta, lr=[meta.lrs], iters=5)
    problem = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net))
    with torch.no_grad():
        meta.lrs[3] = float("inf")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 40, generator=g, dtype=DTYPE), torch.randn(12, generator=g, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"1 of 40 values outside it \(from inf to inf\)"):
        problem.hypergradient((x, y), (x, y))


# A (5,) parameter with 5 LL steps: a (5,) value is both per-element and a per-step schedule
# (a 5-way head's bias with 5 inner steps); PerElement and PerStep say which is meant.
STEP_SIZES = [0.1, 0.2, 0.05, 0.15, 0.12]


def _ambiguous_problem():
    torch.manual_seed(0)
    net = Linear(5, torch.randn(5, dtype=DTYPE))
    meta = nn.Module()
    meta.net = net
    meta.lrs = nn.Parameter(torch.tensor(STEP_SIZES, dtype=DTYPE))
    g = torch.Generator().manual_seed(2)
    x, xv = (torch.randn(12, 5, generator=g, dtype=DTYPE) for _ in range(2))
    y, yv = (torch.randn(12, generator=g, dtype=DTYPE) for _ in range(2))
    return net, meta, (x, y), (xv, yv)


def _by_hand(net, meta, x, y, xv, yv, per_element):
    """The hypergradient (initialization, step sizes) of 5 hand-written steps
    ``w <- w - lrs * grad`` (per element) or ``w <- w - lrs[t] * grad`` (per step)."""
    w0 = net.w.detach().clone().requires_grad_()
    lrs = meta.lrs.detach().clone().requires_grad_()
    w = w0
    for t in range(5):
        w = w - (lrs if per_element else lrs[t]) * (x.T @ (x @ w - y) / len(x))
    return torch.autograd.grad(0.5 * (xv @ w - yv).pow(2).mean(), [w0, lrs])


MARKED = {
    "PerElement item": lambda m: [PerElement(m.lrs)],
    "PerElement around a callable": lambda m: [PerElement(lambda ul: ul.lrs)],
    "PerElement returned": lambda m: [lambda ul: PerElement(ul.lrs)],
    "PerElement around the list": lambda m: PerElement([m.lrs]),
    "PerStep item": lambda m: [PerStep(m.lrs)],
    "PerStep whole value": lambda m: PerStep(m.lrs),
    "PerStep around a callable": lambda m: [PerStep(lambda ul: ul.lrs)],
    "PerStep returned, whole value": lambda m: lambda ul: PerStep(ul.lrs),
}


@pytest.mark.parametrize("form", list(MARKED))
def test_marked_values_of_an_ambiguous_shape_match_their_hand_written_unroll(form):
    net, meta, (x, y), (xv, yv) = _ambiguous_problem()
    per_element = form.startswith("PerElement")
    expected = _by_hand(net, meta, x, y, xv, yv, per_element)
    other = _by_hand(net, meta, x, y, xv, yv, not per_element)
    # the two readings differ: the test tells them apart
    assert (expected[1] - other[1]).abs().max() > 1e-3 * expected[1].abs().max()
    ll = GradientDescent(task_loss, net, meta, lr=MARKED[form](meta), iters=5)
    problem = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net))
    grads = problem.hypergradient((x, y), (xv, yv))
    named = dict(zip([n for n, _ in meta.named_parameters()], grads, strict=True))
    torch.testing.assert_close(named["net.w"], expected[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(named["lrs"], expected[1], rtol=1e-12, atol=1e-15)


def test_an_unmarked_ambiguous_value_is_refused_naming_the_markers():
    net, meta, (x, y), (xv, yv) = _ambiguous_problem()
    ambiguous = r"both a per-step schedule of 5 steps .*PerElement\(value\).*PerStep\(value\)"
    with pytest.raises(ValueError, match=ambiguous):
        GradientDescent(task_loss, net, meta, lr=[meta.lrs], iters=5)
    # a callable's value: refused at the run that evaluates it
    ll = GradientDescent(task_loss, net, meta, lr=[lambda ul: ul.lrs], iters=5)
    problem = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net))
    with pytest.raises(ValueError, match=ambiguous):
        problem.hypergradient((x, y), (xv, yv))


def test_markers_of_the_wrong_shape_or_form_are_refused():
    net, meta, (x, y), (xv, yv) = _ambiguous_problem()
    four = torch.full((4,), 0.1, dtype=DTYPE)

    def build(lr, iters=5):
        return GradientDescent(task_loss, net, meta, lr=lr, iters=iters)

    with pytest.raises(ValueError, match=r"marked PerElement but has shape \(4,\), not its para"):
        build([PerElement(four)])
    with pytest.raises(ValueError, match=r"marked PerStep but has shape \(4,\); .* \(5,\)"):
        build([PerStep(four)])
    with pytest.raises(ValueError, match=r"marked PerStep but has shape \(5,\); .* \(3,\)"):
        build(PerStep(meta.lrs), iters=3)
    with pytest.raises(ValueError, match="marked PerElement, but it is not given per parameter"):
        build(PerElement(meta.lrs))
    with pytest.raises(ValueError, match="marked PerElement, but it is not given per parameter"):
        build(PerElement(lambda ul: ul.lrs))
    with pytest.raises(TypeError, match="PerStep wraps a 1-d tensor of length iters"):
        PerStep(0.1)
    with pytest.raises(TypeError, match="PerElement wraps a tensor or a callable"):
        PerElement(PerStep(meta.lrs))
    with pytest.raises(TypeError, match="wraps a list only as the whole value"):
        build([PerElement([meta.lrs])])
    # values returned by callables: checked at every run
    for lr, error, match in [
        ([PerElement(lambda ul: ul.lrs[:4])], ValueError, r"returned\) is marked PerElement but"),
        ([lambda ul: PerStep(ul.lrs[:4])], ValueError, r"returned\) is marked PerStep but"),
        ([PerElement(lambda ul: 0.1)], TypeError, "must be a tensor of its parameter's shape"),
        ([PerElement(lambda ul: PerStep(ul.lrs))], ValueError, "mark it once"),
    ]:
        problem = BilevelProblem(build(lr), Reverse(task_loss, meta, task_loss, net))
        with pytest.raises(error, match=match):
            problem.hypergradient((x, y), (xv, yv))


def test_marking_an_unambiguous_value_changes_nothing():
    """A (4,) parameter with 5 steps: a (4,) value is per-element, marked or not; a (5,) value
    is a schedule. Same hypergradient, same checkpoint settings."""
    (x, y), (xv, yv) = data()
    for unmarked, marker, values in [
        (lambda ul: ul.log_lr.exp(), PerElement, [-2.0] * 4),  # a callable, per element
        (None, PerStep, STEP_SIZES),  # a UL tensor, a schedule
    ]:
        results = []
        for marked in (False, True):
            torch.manual_seed(0)
            net = Linear(4, torch.randn(4, dtype=DTYPE))
            meta = nn.Module()
            meta.net = net
            meta.log_lr = nn.Parameter(torch.tensor(values, dtype=DTYPE))
            lr = meta.log_lr if unmarked is None else unmarked
            ll = GradientDescent(task_loss, net, meta, lr=[marker(lr) if marked else lr], iters=5)
            problem = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net))
            results.append((problem.hypergradient((x, y), (xv, yv)), problem.settings))
        (plain_grads, plain_settings), (marked_grads, marked_settings) = results
        assert all(g.abs().sum() > 0 for g in plain_grads)
        for a, b in zip(plain_grads, marked_grads, strict=True):
            assert torch.equal(a, b)
        assert plain_settings == marked_settings


def test_the_cure_that_the_negative_step_size_warning_gives_runs_as_written():
    """The warning about a per-element step size below zero says how to keep them positive:
    that expression, evaluated as written (``n`` LL parameters, ``log_lrs`` in the UL model),
    runs, and takes the steps of a hand-written unroll with ``exp(log_lrs)`` (before, it
    gave ``lr=lambda ul: [...]``, which a run refuses)."""
    torch.manual_seed(0)

    class TwoPart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, dtype=DTYPE))
            self.b = nn.Parameter(torch.zeros(1, dtype=DTYPE))

        def forward(self, x):
            return x @ self.w + self.b

    net, meta = TwoPart(), nn.Module()
    meta.lrs = nn.ParameterList(
        [nn.Parameter(torch.full_like(p.detach(), 0.1)) for p in net.parameters()]
    )
    (x, y), (xv, yv) = data()
    x, xv = x[:, :3], xv[:, :3]
    ll = GradientDescent(task_loss, net, meta, lr=list(meta.lrs), iters=4)
    problem = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net))
    with torch.no_grad():
        meta.lrs[0][1] = -1e-3
    with pytest.warns(RuntimeWarning, match="learn their logarithm") as caught:
        problem.hypergradient((x, y), (xv, yv))
    cure = str(caught[0].message).split("learn their logarithm")[1]
    expression = cure[cure.index("lr=") + 3 : cure.index(". (Said once.)")]

    meta.log_lrs = nn.ParameterList(
        [nn.Parameter(torch.full_like(p.detach(), -2.0)) for p in net.parameters()]
    )
    meta.lrs.requires_grad_(False)
    lr = eval(expression, {"n": len(meta.log_lrs)})  # the message's own words
    ll = GradientDescent(task_loss, net, meta, lr=lr, iters=4)
    got = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net)).hypergradient(
        (x, y), (xv, yv)
    )
    w, b = (p.detach().clone().requires_grad_() for p in net.parameters())
    logs = [t.detach().clone().requires_grad_() for t in meta.log_lrs]
    fw, fb = w, b
    for _ in range(4):
        gw, gb = torch.autograd.grad(
            0.5 * (x @ fw + fb - y).pow(2).mean(), [fw, fb], create_graph=True
        )
        fw, fb = fw - logs[0].exp() * gw, fb - logs[1].exp() * gb
    expected = torch.autograd.grad(0.5 * (xv @ fw + fb - yv).pow(2).mean(), logs)
    learned = [n for n, p in meta.named_parameters() if p.requires_grad]
    named = dict(zip(learned, got, strict=True))
    for i in range(2):
        torch.testing.assert_close(named[f"log_lrs.{i}"], expected[i], rtol=1e-12, atol=1e-15)
