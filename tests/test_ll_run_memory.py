"""An LL run's host memory does not grow with its steps where it keeps no graph: a run of
Implicit, of Truncated's first steps or of DARTS' many steps held one 0-d loss tensor per
step (about a kilobyte each, and a fragmented heap: 12 MB instead of 7 at 1000 steps on the
benchmark's ridge_large, 16-26 MB at 3000). The losses the run records stay exact."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference, Forward, Implicit, Truncated

LR = 0.3
EARLY, LATE = 100, 1100  # LL steps at which the live tensors are counted


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize("name", ["implicit", "truncated", "finite_difference", "forward"])
def test_the_live_tensors_of_an_ll_run_without_a_graph_do_not_grow_with_its_steps(name):
    """The LL objective counts the live tensors at step 100 and at step 1,100: the thousand
    steps between them, none of which keeps a graph, leave fewer than 100 more (one per
    step before)."""
    p = ridge()
    counts: dict[int, int] = {}
    calls = 0

    def counting_ll(state):
        nonlocal calls
        calls += 1
        if calls in (EARLY, LATE):
            counts[calls] = live_tensors()
        return ridge_ll(state)

    ll = GradientDescent(counting_ll, p.ll_model, p.ul_model, lr=LR, iters=LATE + 10)
    args = (ridge_ul, p.ul_model, counting_ll, p.ll_model)
    ul = {
        "implicit": lambda: Implicit(*args, LR, 10, method="cg"),
        "truncated": lambda: Truncated(*args, truncate_iter=5),
        "finite_difference": lambda: FiniteDifference(*args, r=1e-3),
        "forward": lambda: Forward(*args),
    }[name]()
    with warnings.catch_warnings():  # DARTS' warning that many LL steps make it approximate
        warnings.simplefilter("ignore" if name == "finite_difference" else "error")
        BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    assert counts[LATE] - counts[EARLY] < 100, counts


@pytest.mark.parametrize("iters", [1, 2, 63, 64, 65, 127, 128, 129, 300])
@pytest.mark.parametrize("graph_steps", [0, 1, 70, None])
def test_the_recorded_losses_are_every_steps_loss_in_order(iters, graph_steps):
    """Trajectory.losses holds the LL loss before each step, in order, whatever the split
    between steps without a graph (stacked as the run goes) and steps with one: equal to
    the losses of the same steps written by hand (float64)."""
    p = ridge()
    x, y = p.train
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=iters)
    trajectory = ll.run(x, y, differentiable_steps=graph_steps)
    w = p.ll_model.w.detach().clone()
    l2 = p.l2
    expected = []
    for _ in range(iters):
        w = w.requires_grad_()
        loss = 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (l2 * w**2).sum()
        (g,) = torch.autograd.grad(loss, w)
        expected.append(loss.detach())
        w = (w - LR * g).detach()
    assert trajectory.losses.shape == (iters,)
    torch.testing.assert_close(trajectory.losses, torch.stack(expected), rtol=1e-12, atol=0)
