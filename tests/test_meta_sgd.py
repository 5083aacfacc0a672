"""Meta-SGD: per-element learned step sizes, against a hand-written unroll (float64)."""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, Linear
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
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
