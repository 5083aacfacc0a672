"""UL variables that are the LL's own initial weights: MAML, first-order MAML, iMAML."""

from __future__ import annotations

import torch
from problems import DTYPE, Linear, relative_error, ridge

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FirstOrder, Implicit, Reverse

LR, STEPS, REG = 0.2, 4, 2.0


def task_loss(state):
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean()


def proximal_loss(state):
    """iMAML's LL objective: task loss + reg/2 ||w - theta||^2, theta = the UL model."""
    (w,) = state["ll_model"].parameters()
    return task_loss(state) + 0.5 * REG * ((w - state["ul_model"].w) ** 2).sum()


def setup():
    p = ridge(d=4, seed=3)
    net = Linear(4, torch.tensor([0.3, -0.1, 0.2, 0.05], dtype=DTYPE))
    return p, net


def quadratic(p):
    x, y = p.train
    return x.T @ x / len(x), x.T @ y / len(x)


def test_maml_reverse_matches_closed_form():
    p, net = setup()
    a, b = quadratic(p)
    theta = net.w.detach()
    step = torch.eye(4, dtype=DTYPE) - LR * a
    w = theta
    for _ in range(STEPS):
        w = step @ w + LR * b
    xv, yv = p.val
    v = xv.T @ (xv @ w - yv) / len(xv)
    exact = torch.linalg.matrix_power(step, STEPS).T @ v
    ll = GradientDescent(task_loss, net, net, lr=LR, iters=STEPS)
    (grad,) = BilevelProblem(ll, Reverse(task_loss, net, task_loss, net)).hypergradient(
        p.train, p.val
    )
    assert relative_error(grad, exact) < 1e-12


def test_first_order_maml_is_the_gradient_at_the_adapted_weights():
    p, net = setup()
    a, b = quadratic(p)
    w = net.w.detach()
    for _ in range(STEPS):
        w = w - LR * (a @ w - b)
    xv, yv = p.val
    exact = xv.T @ (xv @ w - yv) / len(xv)
    ll = GradientDescent(task_loss, net, net, lr=LR, iters=STEPS)
    (grad,) = BilevelProblem(ll, FirstOrder(task_loss, net, task_loss, net)).hypergradient(
        p.train, p.val
    )
    assert relative_error(grad, exact) < 1e-12


def test_imaml_matches_closed_form():
    p, net = setup()
    a, b = quadratic(p)
    theta = net.w.detach()
    eye = torch.eye(4, dtype=DTYPE)
    w_star = torch.linalg.solve(a + REG * eye, b + REG * theta)
    xv, yv = p.val
    v = xv.T @ (xv @ w_star - yv) / len(xv)
    exact = torch.linalg.solve(eye + a / REG, v)  # (I + H_i / reg)^{-1} grad L_test(w*)
    ll = GradientDescent(proximal_loss, net, net, lr=0.3, iters=300)
    ul = Implicit(task_loss, net, proximal_loss, net, ll_learning_rate=0.3, k=10, method="cg")
    (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    assert relative_error(grad, exact) < 1e-9
    assert ul.run_ll(ll, *p.train).differentiable_steps == 0  # iMAML keeps no LL graph


def test_meta_batch_averages_task_hypergradients():
    _, net = setup()
    ll = GradientDescent(task_loss, net, net, lr=LR, iters=STEPS)
    problem = BilevelProblem(ll, Reverse(task_loss, net, task_loss, net))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 10, 4, generator=g, dtype=DTYPE)
    ys = torch.randn(3, 10, generator=g, dtype=DTYPE)
    xq = torch.randn(3, 6, 4, generator=g, dtype=DTYPE)
    yq = torch.randn(3, 6, generator=g, dtype=DTYPE)
    batch = {"train": (xs, ys), "test": (xq, yq)}
    (mean,) = problem.meta_hypergradient(batch)
    per_task = [problem.hypergradient((xs[i], ys[i]), (xq[i], yq[i]))[0] for i in range(3)]
    torch.testing.assert_close(mean, torch.stack(per_task).mean(0), rtol=1e-13, atol=1e-15)
