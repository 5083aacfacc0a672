"""The open seams: pluggable linear solvers, hyperparameters computed from the UL model, the
patched model synced at every run, each input given once (float64, exact answers)."""

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
from bilevel.ul import Forward, Implicit, Reverse

CONVERGED = 400
LR = 0.5


def dense_solve(matvec, b):
    """A user's solver: build the matrix column by column, then a dense solve."""
    sizes = [t.numel() for t in b]
    n = sum(sizes)
    columns = []
    for j in range(n):
        e = torch.zeros(n, dtype=b[0].dtype)
        e[j] = 1.0
        parts = list(e.split(sizes))
        columns.append(torch.cat([t.reshape(-1) for t in matvec(parts)]))
    a = torch.stack(columns, dim=1)
    x = torch.linalg.solve(a, torch.cat([t.reshape(-1) for t in b]))
    return [part.reshape(t.shape) for part, t in zip(x.split(sizes), b, strict=True)]


def test_implicit_with_a_users_dense_solve_is_exact_on_ridge():
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=CONVERGED)
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, method=dense_solve)
    (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    assert relative_error(grad, ridge_exact_hypergradient(p)) < 1e-10
    assert ul.diagnostics["converged"] and not ul.diagnostics["diverged"]


class Saddle(nn.Module):
    """``f(w, lam) = 1/2 w^T A w - (B lam)^T w`` with A symmetric indefinite: the LL
    stationary point ``w* = A^{-1} B lam`` is a saddle."""

    def __init__(self, d: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
        eig = torch.tensor([3.0, 2.0, 1.5, -1.0, -2.0, 0.7], dtype=DTYPE)[:d]
        self.a = q @ torch.diag(eig) @ q.T
        self.b = torch.randn(d, 3, generator=g, dtype=DTYPE)
        self.c = torch.randn(d, generator=g, dtype=DTYPE)
        self.lam = nn.Parameter(torch.randn(3, generator=g, dtype=DTYPE))

    def stationary(self) -> torch.Tensor:
        return torch.linalg.solve(self.a, self.b @ self.lam.detach())

    def exact(self) -> torch.Tensor:
        """``dF/dlam = B^T A^{-1} (w* - c)`` for ``F = 1/2 ||w* - c||^2``."""
        return self.b.T @ torch.linalg.solve(self.a, self.stationary() - self.c)


def saddle_problem(method):
    ul_model = Saddle()
    ll_model = Linear(6, ul_model.stationary())  # the LL sits at its stationary point

    def ll_objective(state):
        w, ul = state["ll_model"].w, state["ul_model"]
        return 0.5 * w @ ul.a @ w - (ul.b @ ul.lam) @ w

    def ul_objective(state):
        return 0.5 * (state["ll_model"].w - state["ul_model"].c).pow(2).sum()

    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=1e-3, iters=1)
    ul = Implicit(ul_objective, ul_model, ll_objective, ll_model, k=60, method=method)
    return BilevelProblem(ll, ul), ul_model


@pytest.mark.parametrize("method", ["minres", "normal_cg"])
def test_indefinite_solvers_give_the_ift_hypergradient_at_a_saddle(method):
    problem, ul_model = saddle_problem(method)
    (grad,) = problem.hypergradient(((), ()), ((), ()))
    assert relative_error(grad, ul_model.exact()) < 1e-8


def test_cg_at_a_saddle_is_exact_or_refuses_loudly():
    problem, ul_model = saddle_problem("cg")
    try:
        (grad,) = problem.hypergradient(((), ()), ((), ()))
    except FloatingPointError as error:
        assert "minres" in str(error)  # the message points to the cure
    else:
        assert relative_error(grad, ul_model.exact()) < 1e-8


class StepSize(nn.Module):
    """The LL step size as ``exp(log_lr)``: the usual way to keep it positive."""

    def __init__(self, value: float = 0.3) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(value, dtype=DTYPE).log())


def unrolled_ul_loss(p, log_lr: float, iters: int) -> float:
    """The UL loss after ``iters`` plain GD steps with step ``exp(log_lr)`` (by hand)."""
    (x, y), (xv, yv) = p.train, p.val
    w = torch.zeros(x.shape[1], dtype=DTYPE)
    lr = torch.tensor(log_lr, dtype=DTYPE).exp()
    for _ in range(iters):
        w = w - lr * (x.T @ (x @ w - y) / len(x))
    return float(0.5 * ((xv @ w - yv) ** 2).mean())


@pytest.mark.parametrize("cls", [Reverse, Forward])
def test_step_size_computed_from_the_ul_model_is_fresh_at_every_call(cls):
    """``lr=lambda ul: ul.log_lr.exp()``: the hypergradient equals finite differences of the
    hand-written unroll, two calls agree, and after the UL parameter moves the next call is
    taken at its new value (not a stale one)."""
    p = ridge(d=4)
    ul_model = StepSize()

    def ll_objective(state):
        residual = state["ll_model"](state["data"]) - state["target"]
        return 0.5 * (residual**2).mean()

    iters = 8
    ll = GradientDescent(
        ll_objective, p.ll_model, ul_model, lr=lambda ul: ul.log_lr.exp(), iters=iters
    )
    problem = BilevelProblem(ll, cls(ridge_ul, ul_model, ll_objective, p.ll_model))
    for value in (0.3, 0.1):
        with torch.no_grad():
            ul_model.log_lr.fill_(torch.tensor(value, dtype=DTYPE).log())
        first = problem.hypergradient(p.train, p.val)[0]
        second = problem.hypergradient(p.train, p.val)[0]
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        h, at = 1e-5, float(ul_model.log_lr.detach())
        fd = (unrolled_ul_loss(p, at + h, iters) - unrolled_ul_loss(p, at - h, iters)) / (2 * h)
        assert abs(float(first) - fd) <= 1e-7 * max(abs(fd), 1e-12)


def test_a_step_size_tensor_with_a_graph_is_refused_with_the_callable_form():
    p = ridge(d=4)
    ul_model = StepSize()
    with pytest.raises(TypeError, match=r"lr=lambda ul: ul\.log_lr\.exp\(\)"):
        GradientDescent(ridge_ll, p.ll_model, ul_model, lr=ul_model.log_lr.exp(), iters=3)


class Penalty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.tensor(-2.0, dtype=DTYPE))


def test_a_ul_objective_that_switches_the_patched_model_to_eval_does_not_leak():
    """The patched copy is reused between calls; its training flags (and buffers) come from
    the user's module at every run, so a UL objective that calls ``.eval()`` on it does not
    change the next call (batch norm would switch to its running statistics)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    decay = Penalty()
    x, y = torch.randn(32, 3, dtype=DTYPE), torch.randn(32, 1, dtype=DTYPE)
    xv, yv = torch.randn(32, 3, dtype=DTYPE), torch.randn(32, 1, dtype=DTYPE)

    def ll_objective(state):
        model = state["ll_model"]
        weights = sum(w.pow(2).sum() for w in model.parameters())
        fit = (model(state["data"]) - state["target"]).pow(2).mean()
        return fit + state["ul_model"].log_decay.exp() * weights

    def ul_objective(state):
        state["ll_model"].eval()  # evaluate as at test time
        return (state["ll_model"](state["data"]) - state["target"]).pow(2).mean()

    ll = GradientDescent(ll_objective, net, decay, lr=0.05, iters=5)
    problem = BilevelProblem(ll, Reverse(ul_objective, decay, ll_objective, net))
    first = problem.hypergradient((x, y), (xv, yv))
    second = problem.hypergradient((x, y), (xv, yv))
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert net.training  # the user's module is untouched


def test_the_ll_step_size_is_given_once():
    """Implicit reads the series step from the LL run; a second, disagreeing value is
    refused; another LL objective is refused."""
    p, q = ridge(), ridge()
    grads = []
    for given in (None, LR):
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=CONVERGED)
        ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, given, k=300, method="neumann")
        grads.append(BilevelProblem(ll, ul).hypergradient(p.train, p.val)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    ll = GradientDescent(ridge_ll, q.ll_model, q.ul_model, lr=LR, iters=10)
    disagreeing = Implicit(ridge_ul, q.ul_model, ridge_ll, q.ll_model, 0.2, 5, method="neumann")
    with pytest.raises(ValueError, match=r"ll_learning_rate=0\.2"):
        BilevelProblem(ll, disagreeing)
    other = Implicit(ridge_ul, q.ul_model, lambda s: ridge_ll(s), q.ll_model, k=5)
    with pytest.raises(ValueError, match="another ll_objective"):
        BilevelProblem(ll, other)
