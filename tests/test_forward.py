"""Forward-mode hypergradients equal Reverse to float64 round-off, and the IFT answer at a
converged LL; optimizer hyperparameters (step size, momentum, Adam's betas) as UL variables."""

from __future__ import annotations

import pytest
import torch
from problems import (
    DTYPE,
    Linear,
    relative_error,
    ridge,
    ridge_exact_hypergradient,
    ridge_ll,
    ridge_ul,
)
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Forward, Reverse

OPTIMIZERS = [("sgd", {}), ("sgd", {"momentum": 0.8}), ("adam", {"betas": (0.8, 0.9)})]


def both(p, ul_model, iters, **ll_kwargs):
    """Reverse and Forward hypergradients of the same problem."""
    out = []
    for cls in (Reverse, Forward):
        ll = GradientDescent(ridge_ll, p.ll_model, ul_model, iters=iters, **ll_kwargs)
        ul = cls(ridge_ul, ul_model, ridge_ll, p.ll_model)
        out.append(BilevelProblem(ll, ul).hypergradient(p.train, p.val))
    return out


@pytest.mark.parametrize(("optimizer", "kwargs"), OPTIMIZERS)
def test_forward_equals_reverse_for_l2_penalties(optimizer, kwargs):
    p = ridge(d=4)
    rev, fwd = both(p, p.ul_model, iters=12, lr=0.1, optimizer=optimizer, **kwargs)
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-16)


class OptimizerHyper(nn.Module):
    """UL model: the LL's step size, momentum or Adam betas, and one L2 penalty."""

    def __init__(self, lr, momentum=None, betas=None, schedule=None):
        super().__init__()
        self.lr = nn.Parameter(
            torch.tensor(lr, dtype=DTYPE)
            if schedule is None
            else torch.full((schedule,), lr, dtype=DTYPE)
        )
        self.momentum = (
            None if momentum is None else nn.Parameter(torch.tensor(momentum, dtype=DTYPE))
        )
        self.beta1 = None if betas is None else nn.Parameter(torch.tensor(betas[0], dtype=DTYPE))
        self.beta2 = None if betas is None else nn.Parameter(torch.tensor(betas[1], dtype=DTYPE))
        self.log_l2 = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))

    def penalty(self, ll_model):
        w = next(iter(ll_model.parameters()))
        return 0.5 * self.log_l2.exp() * (w * w).sum()


@pytest.mark.parametrize(
    ("hyper", "ll_kwargs"),
    [
        ({"lr": 0.2}, {}),
        ({"lr": 0.1, "momentum": 0.7}, {"optimizer": "sgd"}),
        ({"lr": 0.05, "betas": (0.85, 0.95)}, {"optimizer": "adam"}),
        ({"lr": 0.15, "schedule": 9}, {}),
    ],
    ids=["lr", "lr+momentum", "adam-lr+betas", "lr-schedule"],
)
def test_forward_equals_reverse_for_optimizer_hyperparameters(hyper, ll_kwargs):
    p = ridge(d=3)
    with torch.no_grad():
        p.ll_model.w.copy_(torch.tensor([0.4, -0.3, 0.2], dtype=DTYPE))
    ul_model = OptimizerHyper(**hyper)
    kwargs = dict(ll_kwargs, lr=ul_model.lr)
    if ul_model.momentum is not None:
        kwargs["momentum"] = ul_model.momentum
    if ul_model.beta1 is not None:
        kwargs["betas"] = (ul_model.beta1, ul_model.beta2)
    rev, fwd = both(p, ul_model, iters=9, **kwargs)
    assert all(g.abs().sum() > 0 for g in rev)  # every hyperparameter has a real gradient
    torch.testing.assert_close(fwd, rev, rtol=1e-11, atol=1e-15)


def test_forward_reverse_and_ift_agree_at_a_converged_ll():
    p = ridge()
    rev, fwd = both(p, p.ul_model, iters=300, lr=0.5)
    exact = ridge_exact_hypergradient(p)
    assert relative_error(fwd[0], exact) < 1e-9
    assert relative_error(rev[0], exact) < 1e-9


def test_forward_with_the_initial_weights_as_ul_variables_matches_reverse():
    """MAML-style: Z_0 is the identity."""
    p = ridge(d=3)
    net = Linear(3, torch.tensor([0.3, -0.1, 0.2], dtype=DTYPE))

    def loss(state):
        return ridge_ul(state)

    grads = []
    for cls in (Reverse, Forward):
        ll = GradientDescent(loss, net, net, lr=0.2, iters=5, momentum=0.5)
        grads.append(BilevelProblem(ll, cls(loss, net, loss, net)).hypergradient(p.train, p.val))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-16)


def test_forward_keeps_no_graph_across_steps():
    p = ridge(d=4)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=20)
    trajectory = Forward(ridge_ul, p.ul_model, ridge_ll, p.ll_model).run_ll(ll, *p.train)
    assert trajectory.differentiable_steps == 0
    assert all(w.grad_fn is None for w in trajectory.weights)
    assert all(z.grad_fn is None and z.shape == (4, 4) for z in trajectory.observed.tangents)


def test_forward_refuses_an_auxiliary_model_without_tangents():
    p = ridge(d=4)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3)
    aux = ll.optimize(*p.train)
    forward = Forward(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(ValueError, match="tangents"):
        forward.compute_gradients(*p.val, aux, *p.train)


def test_forward_refuses_an_unused_ul_parameter():
    p = ridge(d=4)
    p.ul_model.spare = nn.Parameter(torch.zeros(2, dtype=DTYPE))
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3)
    problem = BilevelProblem(ll, Forward(ridge_ul, p.ul_model, ridge_ll, p.ll_model))
    with pytest.raises(ValueError, match=r"\['spare'\]"):
        problem.hypergradient(p.train, p.val)
