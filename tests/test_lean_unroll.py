"""LL steps with a graph in one loop (``Unroll.run_with_graph``): the plain SGD steps of an
unrolled run carry their weights from step to step, and record what ``Unroll.step`` records.
Pinned against the step-by-step path (an observer that looks before each step takes it), in
float64: losses, final weights, the first and last gradients, the iterates an observer saw,
and a hypergradient through the run, bitwise; with frozen weights, steps before the graph,
and a step that fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel.ll import GradientDescent
from bilevel.ul.ptt import Iterates

DTYPE = torch.float64
LR, ITERS = 0.2, 6


class Model(nn.Module):
    """Two trainable weights and a frozen offset."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, generator=g, dtype=DTYPE))
        self.v = nn.Parameter(torch.randn(4, generator=g, dtype=DTYPE))
        self.offset = nn.Parameter(torch.randn(4, generator=g, dtype=DTYPE), requires_grad=False)


class Hyper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.tensor([-1.0, 0.5], dtype=DTYPE))


def ll_objective(state: dict) -> torch.Tensor:
    m, h = state["ll_model"], state["ul_model"]
    x, y = state["data"], state["target"]
    fit = 0.5 * ((x @ (m.w + m.offset) + torch.tanh(x @ m.v) - y) ** 2).mean()
    if not torch.isfinite(m.w).all():
        raise FloatingPointError("a step that fails")
    l2 = h.log_l2.exp()
    return fit + 0.5 * (l2[0] * (m.w**2).sum() + l2[1] * (m.v**2).sum())


class LooksBefore(Iterates):
    """``Iterates`` with a ``before_step``: its steps take ``Unroll.step``'s general path."""

    def before_step(self, weights: list[torch.Tensor], model: nn.Module) -> None:
        pass


def run(observer_cls, graph_steps: int | None, freeze_v: bool = False):
    model, hyper = Model(), Hyper()
    model.v.requires_grad_(not freeze_v)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g, dtype=DTYPE), torch.randn(20, generator=g, dtype=DTYPE)
    ll = GradientDescent(ll_objective, model, hyper, lr=LR, iters=ITERS)
    observer = observer_cls()
    trajectory = ll.run(x, y, differentiable_steps=graph_steps, observer=observer)
    final = [w for w, t in zip(trajectory.weights, trajectory.trainable, strict=True) if t]
    target = sum((w**3).sum() for w in final)
    (hypergradient,) = torch.autograd.grad(target, [hyper.log_l2])
    return {
        "losses": [trajectory.losses],
        "weights": [w.detach() for w in trajectory.weights],
        "initial_grads": trajectory.initial_grads,
        "last_grads": trajectory.last_grads,
        "iterates": [w.detach() for step in trajectory.observed for w in step],
        "hypergradient": [hypergradient],
    }


@pytest.mark.parametrize("freeze_v", [False, True], ids=["all trainable", "one frozen"])
@pytest.mark.parametrize("graph_steps", [None, 2], ids=["every step", "the last 2 steps"])
def test_one_loop_records_what_the_steps_record(graph_steps, freeze_v):
    lean = run(Iterates, graph_steps, freeze_v)
    general = run(LooksBefore, graph_steps, freeze_v)
    assert lean.keys() == general.keys()
    for key in lean:
        assert len(lean[key]) == len(general[key]) > 0, key
        for a, b in zip(lean[key], general[key], strict=True):
            assert not a.requires_grad and torch.equal(a, b), key


class FailsAtThirdStep(Iterates):
    """``Iterates`` whose third step fails once its gradients are taken."""

    def propagate(self, weights, opt_state, new, new_state) -> None:
        if len(self.iterates) == 2:
            raise RuntimeError("the third step fails")
        super().propagate(weights, opt_state, new, new_state)


class FailsAtThirdStepLooksBefore(FailsAtThirdStep, LooksBefore):
    pass


def test_a_failing_step_keeps_the_gradients_of_the_steps_taken():
    """A step that fails after its gradients are taken: the latest gradients recorded are
    those of the last step taken, and so is the step count, as step by step."""
    model, hyper = Model(), Hyper()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g, dtype=DTYPE), torch.randn(20, generator=g, dtype=DTYPE)
    ll = GradientDescent(ll_objective, model, hyper, lr=LR, iters=ITERS)
    runs = []
    for observer in (FailsAtThirdStep(), FailsAtThirdStepLooksBefore()):
        unroll = ll.start(x, y, graph_from_start=True, observer=observer, copy=False)
        with pytest.raises(RuntimeError, match="the third step fails"):
            unroll.run_with_graph(ITERS)
        runs.append((unroll.steps, unroll.last_grads))
    (steps_a, grads_a), (steps_b, grads_b) = runs
    assert steps_a == steps_b == 2
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
