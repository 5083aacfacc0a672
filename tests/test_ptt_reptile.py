"""PTT and Reptile against hand-written unrolls (float64): each method is one file."""

from __future__ import annotations

import torch
from problems import DTYPE, Linear, relative_error, ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import PTT, Reptile, Reverse


def hand_ptt(p, lr: float, iters: int) -> tuple[torch.Tensor, int]:
    """Unroll by hand, keep every iterate's UL loss, back-propagate from the largest."""
    (x, y), (xv, yv) = p.train, p.val
    log_l2 = p.ul_model.log_l2.detach().clone().requires_grad_()
    w = torch.zeros(x.shape[1], dtype=DTYPE)
    losses = []
    for _ in range(iters):
        grad = x.T @ (x @ w - y) / len(x) + log_l2.exp() * w
        w = w - lr * grad
        losses.append(0.5 * ((xv @ w - yv) ** 2).mean())
    chosen = int(torch.stack([v.detach() for v in losses]).argmax())
    (hypergradient,) = torch.autograd.grad(losses[chosen], log_l2)
    return hypergradient, chosen


def test_ptt_back_propagates_from_the_iterate_with_the_largest_ul_loss():
    p = ridge(d=4, seed=3, l2=0.3)
    p.val = (p.val[0], -p.val[1])  # the LL fit moves the UL loss up, then the steps overshoot
    lr, iters = 0.8, 12
    expected, chosen = hand_ptt(p, lr, iters)
    assert 0 < chosen < iters - 1  # an interior step: not what Reverse would use
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=iters)
    ptt = PTT(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    (grad,) = BilevelProblem(ll, ptt).hypergradient(p.train, p.val)
    assert ptt.diagnostics["ptt_step"] == chosen + 1
    assert relative_error(grad, expected) < 1e-12
    (reverse,) = BilevelProblem(
        ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    ).hypergradient(p.train, p.val)
    assert relative_error(reverse, expected) > 1e-5  # far above round-off: another answer


def test_reptile_meta_gradient_is_the_mean_displacement_of_the_adapted_weights():
    g = torch.Generator().manual_seed(0)
    net = Linear(3, torch.randn(3, generator=g, dtype=DTYPE))
    tasks = 2
    xs = torch.randn(tasks, 10, 3, generator=g, dtype=DTYPE)
    ys = torch.randn(tasks, 10, generator=g, dtype=DTYPE)

    def task_loss(state):
        return 0.5 * (state["ll_model"](state["data"]) - state["target"]).pow(2).mean()

    lr, iters = 0.1, 5
    expected = torch.zeros(3, dtype=DTYPE)
    for x, y in zip(xs, ys, strict=True):
        w = net.w.detach().clone()
        for _ in range(iters):
            w = w - lr * (x.T @ (x @ w - y) / len(x))
        expected += (net.w.detach() - w) / tasks
    ll = GradientDescent(task_loss, net, net, lr=lr, iters=iters)
    problem = BilevelProblem(ll, Reptile(task_loss, net, task_loss, net))
    (grad,) = problem.meta_hypergradient({"train": (xs, ys), "test": (xs, ys)})
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    # one Reptile step with SGD(lr=epsilon) moves theta towards the adapted weights
    before = net.w.detach().clone()
    BilevelProblem(
        ll, Reptile(task_loss, net, task_loss, net), torch.optim.SGD([net.w], lr=0.5)
    ).meta_step({"train": (xs, ys), "test": (xs, ys)})
    torch.testing.assert_close(net.w.detach(), before - 0.5 * expected, rtol=1e-12, atol=1e-15)
