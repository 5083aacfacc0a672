"""Every hypergradient method against closed-form answers, in float64."""

from __future__ import annotations

import pytest
import torch
from problems import (
    DTYPE,
    Linear,
    logistic,
    logistic_exact_hypergradient,
    logistic_ll,
    logistic_ul,
    relative_error,
    ridge,
    ridge_exact_hypergradient,
    ridge_hessian,
    ridge_ll,
    ridge_solution,
    ridge_truncated_hypergradient,
    ridge_ul,
    ridge_ul_grad_w,
)
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FirstOrder, Implicit, Reverse, Truncated

LR = 0.5
CONVERGED = 300  # LL steps: the ridge LL is converged to float64 round-off


def hypergradient(p, ul, iters=CONVERGED, lr=LR, ll_objective=ridge_ll, **ll_kwargs):
    ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=lr, iters=iters, **ll_kwargs)
    (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    return grad


def implicit(p, method, k, ll_objective=ridge_ll, ul_objective=ridge_ul, **kwargs):
    return Implicit(
        ul_objective, p.ul_model, ll_objective, p.ll_model, LR, k, method=method, **kwargs
    )


@pytest.mark.parametrize(
    ("method", "k", "kwargs"),
    [
        ("cg", 10, {}),
        ("neumann", 200, {}),
        ("fixed_point", 200, {}),
        ("neumann", 400, {"alpha": "auto"}),
    ],
)
def test_implicit_matches_ridge_closed_form(method, k, kwargs):
    p = ridge()
    ul = implicit(p, method, k, **kwargs)
    grad = hypergradient(p, ul)
    assert relative_error(grad, ridge_exact_hypergradient(p)) < 1e-9
    assert ul.diagnostics["converged"]
    assert ul.diagnostics["residual_norm"] <= 1e-10 * ul.diagnostics["rhs_norm"]


def test_reverse_at_converged_ll_matches_implicit_and_closed_form():
    p = ridge()
    rev = hypergradient(p, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model))
    imp = hypergradient(p, implicit(p, "cg", 10))
    exact = ridge_exact_hypergradient(p)
    assert relative_error(rev, exact) < 1e-9
    assert relative_error(rev, imp) < 1e-9


@pytest.mark.parametrize("k", [1, 3, 10])
def test_truncated_matches_k_step_formula_at_fixed_point(k):
    p = ridge()
    ul = Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=k)
    grad = hypergradient(p, ul)
    assert relative_error(grad, ridge_truncated_hypergradient(p, LR, k)) < 1e-9
    # and it is the Neumann series with K - 1 terms after the first, step = LL learning rate
    if k > 1:
        neu = hypergradient(p, implicit(p, "neumann", k - 1))
        assert relative_error(grad, neu) < 1e-9


def test_truncated_differs_from_exact_when_short():
    p = ridge()
    grad = hypergradient(p, Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=1))
    assert relative_error(grad, ridge_exact_hypergradient(p)) > 1e-3


def test_truncated_with_all_steps_equals_reverse_unconverged():
    p = ridge()
    rev = hypergradient(p, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model), iters=7)
    tru = hypergradient(
        p, Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=7), iters=7
    )
    longer = hypergradient(
        p, Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=50), iters=7
    )
    torch.testing.assert_close(tru, rev, rtol=1e-13, atol=0)
    torch.testing.assert_close(longer, rev, rtol=1e-13, atol=0)


def unrolled_ul_loss(p, log_l2, iters, lr, optimizer="sgd", **kwargs):
    """The unrolled map lambda -> L_ul(w_T(lambda)), by torch.optim on a copy."""
    model = Linear(p.ll_model.w.shape[0], p.ll_model.w.detach())
    ul = type(p.ul_model)(len(log_l2))
    with torch.no_grad():
        ul.log_l2.copy_(log_l2)
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = opt_cls(model.parameters(), lr=lr, **kwargs)
    for _ in range(iters):
        opt.zero_grad()
        ridge_ll(
            {"data": p.train[0], "target": p.train[1], "ll_model": model, "ul_model": ul}
        ).backward()
        opt.step()
    with torch.no_grad():
        return ridge_ul({"data": p.val[0], "target": p.val[1], "ll_model": model, "ul_model": ul})


@pytest.mark.parametrize(
    ("optimizer", "kwargs"),
    [("sgd", {}), ("sgd", {"momentum": 0.8}), ("adam", {"betas": (0.8, 0.9)})],
)
def test_reverse_few_steps_matches_finite_differences(optimizer, kwargs):
    p = ridge(d=4)
    with torch.no_grad():
        p.ll_model.w.copy_(torch.tensor([0.5, -0.2, 0.1, 0.3], dtype=DTYPE))
    lr = 0.1 if optimizer == "adam" else 0.3
    iters = 6
    grad = hypergradient(
        p,
        Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model),
        iters=iters,
        lr=lr,
        optimizer=optimizer,
        **kwargs,
    )
    base = p.ul_model.log_l2.detach().clone()
    # Central differences err by h^2 (truncation) plus eps * |F| / h (round-off). With
    # h = 1e-6, Adam's round-off alone (|F| = 0.76, |grad| = 0.006) was 1e-8 to 2e-8 relative,
    # and moved with the CPU's kernels; h = 1e-5 balances the two, at a few 1e-9.
    h = 1e-5
    fd = torch.zeros_like(base)
    for i in range(len(base)):
        e = torch.zeros_like(base)
        e[i] = h
        plus = unrolled_ul_loss(p, base + e, iters, lr, optimizer, **kwargs)
        minus = unrolled_ul_loss(p, base - e, iters, lr, optimizer, **kwargs)
        fd[i] = (plus - minus) / (2 * h)
    assert relative_error(grad, fd) < 1e-7


def test_ll_rules_follow_torch_optim():
    p = ridge(d=4)
    for optimizer, kwargs in [("sgd", {"momentum": 0.7}), ("adam", {"betas": (0.8, 0.95)})]:
        ll = GradientDescent(
            ridge_ll, p.ll_model, p.ul_model, lr=0.05, iters=9, optimizer=optimizer, **kwargs
        )
        aux = ll.optimize(*p.train)
        model = Linear(4, p.ll_model.w.detach())
        opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer](
            model.parameters(), lr=0.05, **kwargs
        )
        for _ in range(9):
            opt.zero_grad()
            ridge_ll(
                {
                    "data": p.train[0],
                    "target": p.train[1],
                    "ll_model": model,
                    "ul_model": p.ul_model,
                }
            ).backward()
            opt.step()
        torch.testing.assert_close(aux.fast_params[0], model.w, rtol=1e-12, atol=1e-14)


class StepSize(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.lr = nn.Parameter(torch.tensor(value, dtype=DTYPE))
        self.log_l2 = nn.Parameter(torch.tensor([-1.0, -1.0, -1.0], dtype=DTYPE))

    def penalty(self, ll_model):
        (w,) = ll_model.parameters()
        return 0.5 * (self.log_l2.exp() * w * w).sum()


def test_learning_rate_as_ul_variable_matches_finite_differences():
    p = ridge(d=3)
    ul_model = StepSize(0.2)
    iters = 5

    def ul_loss_at(lr_value):
        ll = GradientDescent(ridge_ll, p.ll_model, ul_model, lr=float(lr_value), iters=iters)
        aux = ll.optimize(*p.train)
        return ridge_ul({"data": p.val[0], "target": p.val[1], "ll_model": aux}).detach()

    ll = GradientDescent(ridge_ll, p.ll_model, ul_model, lr=ul_model.lr, iters=iters)
    ul = Reverse(ridge_ul, ul_model, ridge_ll, p.ll_model)
    lr_grad, _ = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    eps = 1e-6
    fd = (ul_loss_at(0.2 + eps) - ul_loss_at(0.2 - eps)) / (2 * eps)
    torch.testing.assert_close(lr_grad, fd, rtol=1e-7, atol=1e-12)


def test_implicit_and_reverse_match_logistic_dense_solve():
    p = logistic()
    exact = logistic_exact_hypergradient(p)
    imp = hypergradient(
        p,
        implicit(p, "cg", 20, logistic_ll, logistic_ul),
        iters=400,
        lr=1.0,
        ll_objective=logistic_ll,
    )
    rev = hypergradient(
        p,
        Reverse(logistic_ul, p.ul_model, logistic_ll, p.ll_model),
        iters=400,
        lr=1.0,
        ll_objective=logistic_ll,
    )
    assert relative_error(imp, exact) < 1e-9
    assert relative_error(rev, exact) < 1e-9


def test_first_order_is_the_direct_gradient():
    p = ridge()

    def ul_objective(state):  # depends on lambda directly, too
        return ridge_ul(state) + 0.1 * (state["ul_model"].log_l2 ** 2).sum()

    grad = hypergradient(p, FirstOrder(ul_objective, p.ul_model, ridge_ll, p.ll_model))
    torch.testing.assert_close(grad, 0.2 * p.ul_model.log_l2.detach(), rtol=1e-14, atol=0)


def test_first_order_refuses_a_hyperparameter_it_cannot_reach():
    p = ridge()
    with pytest.raises(ValueError, match="log_l2"):
        hypergradient(p, FirstOrder(ridge_ul, p.ul_model, ridge_ll, p.ll_model))


def ridge_damped_hypergradient(p, damping):
    """The IFT formula with ``(H + damping I)`` in place of ``H``."""
    w = ridge_solution(p)
    h = ridge_hessian(p) + damping * torch.eye(len(w), dtype=DTYPE)
    return -(p.l2 * w) * torch.linalg.solve(h, ridge_ul_grad_w(p, w))


@pytest.mark.parametrize(
    ("method", "k", "kwargs"),
    [("cg", 10, {}), ("minres", 10, {}), ("fixed_point", 300, {"alpha": 0.3})],
)
def test_implicit_damping_solves_the_damped_system(method, k, kwargs):
    p = ridge()
    exact = ridge_exact_hypergradient(p)
    damped = ridge_damped_hypergradient(p, 0.7)
    assert relative_error(damped, exact) > 0.05  # the damping is visible at this size
    grad = hypergradient(p, implicit(p, method, k, damping=0.7, **kwargs))
    assert relative_error(grad, damped) < 1e-9


def test_implicit_zero_damping_is_exact_and_keeps_old_settings():
    p = ridge()
    ul = implicit(p, "cg", 10, damping=0.0)
    assert relative_error(hypergradient(p, ul), ridge_exact_hypergradient(p)) < 1e-9
    assert "damping" not in ul.settings()  # checkpoints written before damping still resume
    assert implicit(p, "cg", 10, damping=2.0).settings()["damping"] == 2.0


@pytest.mark.parametrize("damping", [-1.0, float("nan"), float("inf"), True, "1"])
def test_implicit_refuses_bad_damping(damping):
    p = ridge()
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        implicit(p, "cg", 10, damping=damping)
