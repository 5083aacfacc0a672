"""BDA (Liu et al. 2020) and dynamic initialization (the LL's initial weights as UL variables).

Float64 throughout. BDA's step is ``y <- y - lr ((1 - a_k) grad f + a_k s grad F)``, ``a_k =
alpha * alpha_decay**k``; the checks: ``alpha = 0`` is GradientDescent bit for bit; the
weights and the Reverse / Truncated / Forward hypergradients equal autograd through a
hand-written unroll; the paper's non-singleton counter-example goes to x = e where gradient
descent stops at e/2.
"""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, relative_error, ridge, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import BDA, GradientDescent
from bilevel.ul import Forward, Implicit, Reverse, Truncated

LR, ITERS, ALPHA, DECAY, SCALE = 0.1, 8, 0.6, 0.8, 1.5


def bda(p, alpha=ALPHA, **kwargs):
    options = {"ul_objective": ridge_ul, "alpha": alpha, "alpha_decay": DECAY, **kwargs}
    return BDA(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS, **options)


# --- the hand-written unroll of the aggregated steps (closed-form gradients) ----------------


def grad_f(p, w, log_l2):
    x, y = p.train
    return x.T @ (x @ w - y) / len(x) + log_l2.exp() * w


def grad_F(p, w):
    xv, yv = p.val
    return xv.T @ (xv @ w - yv) / len(xv)


def loss_F(p, w):
    xv, yv = p.val
    return 0.5 * ((xv @ w - yv) ** 2).mean()


def hand_unroll(p, momentum=0.0, scale=1.0, detach_before=0):
    """BDA's weights after ITERS steps and ``d F(w_T) / d log_l2`` by autograd; the steps
    before ``detach_before`` keep no graph (Truncated)."""
    log_l2 = p.ul_model.log_l2.detach().clone().requires_grad_()
    w = p.ll_model.w.detach().clone()
    buffer = None
    for k in range(ITERS):
        if k == detach_before:
            w = w.detach()
            buffer = None if buffer is None else buffer.detach()
        a = ALPHA * DECAY**k
        d = (1 - a) * grad_f(p, w, log_l2) + a * scale * grad_F(p, w)
        buffer = d if buffer is None else momentum * buffer + d
        w = w - LR * buffer
    (hyper,) = torch.autograd.grad(loss_F(p, w), log_l2)
    return w.detach(), hyper


# --- BDA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [{}, {"optimizer": "adam"}, {"momentum": 0.9}])
def test_alpha_zero_is_gradient_descent_bit_for_bit(rule):
    p = ridge(seed=1)
    gd = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS, **rule)
    zero = bda(p, alpha=0.0, **rule)
    a = gd.run(*p.train, ul_batch=p.val)
    b = zero.run(*p.train, ul_batch=p.val)
    assert all(torch.equal(u, v) for u, v in zip(a.weights, b.weights, strict=True))
    assert torch.equal(a.losses, b.losses)
    reverse = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    (h_gd,) = BilevelProblem(gd, reverse).hypergradient(p.train, p.val)
    (h_bda,) = BilevelProblem(zero, reverse).hypergradient(p.train, p.val)
    assert torch.equal(h_gd, h_bda)
    assert h_gd.abs().min() > 0  # a hypergradient that could have differed


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_weights_and_reverse_equal_the_hand_unroll(momentum):
    p = ridge(seed=2)
    extra = {"momentum": momentum} if momentum else {}
    ll = bda(p, ul_scale=SCALE, **extra)
    w_hand, h_hand = hand_unroll(p, momentum=momentum, scale=SCALE)
    trajectory = ll.run(*p.train, ul_batch=p.val)
    assert relative_error(trajectory.weights[0].detach(), w_hand) < 1e-13
    reverse = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    (h,) = BilevelProblem(ll, reverse).hypergradient(p.train, p.val)
    assert relative_error(h, h_hand) < 1e-12
    # the UL term matters: plain gradient descent moves elsewhere
    w_gd = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS, **extra).run(
        *p.train
    )
    assert relative_error(w_gd.weights[0].detach(), w_hand) > 1e-3


def test_truncated_and_forward_equal_the_hand_unroll():
    p = ridge(seed=3)
    ll = bda(p)
    _, h_truncated = hand_unroll(p, detach_before=ITERS - 3)
    truncated = Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=3)
    (h,) = BilevelProblem(ll, truncated).hypergradient(p.train, p.val)
    assert relative_error(h, h_truncated) < 1e-12
    _, h_full = hand_unroll(p)
    forward = Forward(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    (h,) = BilevelProblem(ll, forward).hypergradient(p.train, p.val)
    assert relative_error(h, h_full) < 1e-12
    assert relative_error(h_truncated, h_full) > 1e-6  # the two answers differ


def test_alpha_schedule():
    p = ridge()
    ll = bda(p)
    assert ll.alphas() == [ALPHA * DECAY**k for k in range(ITERS)]
    assert not ll.solves_ll_objective
    assert bda(p, alpha=0.0).solves_ll_objective


# --- the paper's non-singleton counter-example -------------------------------------------------

N = 5
E = torch.ones(N, dtype=DTYPE)


class Pair(nn.Module):
    """The LL variable y = (y1, y2), both starting at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.y1 = nn.Parameter(torch.zeros(N, dtype=DTYPE))
        self.y2 = nn.Parameter(torch.zeros(N, dtype=DTYPE))


class Point(nn.Module):
    """The UL variable x, starting at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(N, dtype=DTYPE))


def counter_f(state):
    """f(x, y) = 1/2 ||y1||^2 - x^T y1: S(x) = {(x, y2)}, any y2 (not a singleton)."""
    y, x = state["ll_model"], state["ul_model"].x
    return 0.5 * (y.y1**2).sum() - (x * y.y1).sum()


def counter_F(state):
    """F(x, y) = 1/2 ||x - y2||^2 + 1/2 ||y1 - e||^2: the optimistic solution is x = e."""
    y, x = state["ll_model"], state["ul_model"].x
    return 0.5 * ((x - y.y2) ** 2).sum() + 0.5 * ((y.y1 - E) ** 2).sum()


NO_DATA = (torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))  # the objectives use none


def solve_counter_example(make_ll, ul_lr, ul_steps=40):
    ll_model, ul_model = Pair(), Point()
    ll = make_ll(ll_model, ul_model)
    reverse = Reverse(counter_F, ul_model, counter_f, ll_model)
    problem = BilevelProblem(ll, reverse, torch.optim.SGD(ul_model.parameters(), lr=ul_lr))
    for _ in range(ul_steps):
        problem.step(NO_DATA, NO_DATA)
    return ul_model.x.detach(), ll_model


def unrolled_minimizer(alphas, lr):
    """The minimizer of x -> F(x, y_K(x)) for the unrolled LL of the counter-example, by hand:
    every coordinate is the same scalar problem, and y_K is affine in x (y1 = a1 x + b1,
    y2 = a2 x from y = 0), so F = 1/2 (1 - a2)^2 x^2 + 1/2 (a1 x + b1 - 1)^2."""
    a1 = b1 = a2 = 0.0
    for a in alphas:  # y1 <- y1 - lr ((1 - a)(y1 - x) + a (y1 - 1)); y2 <- y2 - lr a (y2 - x)
        a1, b1 = a1 - lr * ((1 - a) * (a1 - 1) + a * a1), b1 - lr * ((1 - a) * b1 + a * (b1 - 1))
        a2 = a2 - lr * a * (a2 - 1)
    return a1 * (1 - b1) / ((1 - a2) ** 2 + a1**2)


def test_counter_example_bda_reaches_e_where_gradient_descent_stops_at_half_e():
    """LL: 30 steps of size 0.5 from y = 0 (BDA: alpha = 0.8, alpha_decay = 0.95). UL: 40 SGD
    steps on Reverse hypergradients from x = 0, of size 1.0 (BDA) and 0.5 (GD). BDA moves y2
    (only F depends on it) to within c = prod_k (1 - 0.5 alpha_k) ~ 7e-4 of x, so x ends
    within ~c^2 of e (1 - x = 7.52459e-7, the unrolled problem's exact minimizer); gradient
    descent never moves y2 from 0 and minimizes 1/2 ||x||^2 + 1/2 ||x - e||^2: x = e/2."""

    def make_bda(ll_model, ul_model):
        options = {"ul_objective": counter_F, "alpha": 0.8, "alpha_decay": 0.95}
        return BDA(counter_f, ll_model, ul_model, lr=0.5, iters=30, **options)

    def make_gd(ll_model, ul_model):
        ll_model.y2.requires_grad_(False)  # f does not move it (GradientDescent refuses it)
        return GradientDescent(counter_f, ll_model, ul_model, lr=0.5, iters=30)

    x_bda, ll_model = solve_counter_example(make_bda, ul_lr=1.0)
    assert (x_bda - E).abs().max() < 1e-5
    exact = unrolled_minimizer([0.8 * 0.95**k for k in range(30)], lr=0.5)
    assert (x_bda - exact).abs().max() < 1e-12
    assert torch.equal(ll_model.y2.detach(), torch.zeros(N, dtype=DTYPE))  # init untouched
    x_gd, _ = solve_counter_example(make_gd, ul_lr=0.5)
    assert (x_gd - E / 2).abs().max() < 1e-8
    assert (x_gd - unrolled_minimizer([0.0] * 30, lr=0.5)).abs().max() < 1e-12


def test_parameter_moved_only_by_the_ul_term_is_accepted():
    ll_model, ul_model = Pair(), Point()
    with torch.no_grad():
        ul_model.x.fill_(2.0)
    options = {"ul_objective": counter_F, "alpha": 0.5, "alpha_decay": 1.0}
    ll = BDA(counter_f, ll_model, ul_model, lr=0.5, iters=3, **options)
    _, y2 = ll.run(*NO_DATA, ul_batch=NO_DATA).weights
    # y2 <- y2 - 0.5 * 0.5 * (y2 - x), three times, from 0
    assert torch.allclose(y2, 2.0 * (1 - 0.75**3) * E, rtol=1e-15, atol=0)
    gd = GradientDescent(counter_f, ll_model, ul_model, lr=0.5, iters=3)
    with pytest.raises(ValueError, match=r"ll_objective does not depend on .*y2"):
        gd.run(*NO_DATA)


def test_parameter_used_by_neither_objective_is_refused():
    ll_model, ul_model = Pair(), Point()
    ll_model.z = nn.Parameter(torch.zeros(2, dtype=DTYPE))
    options = {"ul_objective": counter_F, "alpha": 0.5, "alpha_decay": 0.9}
    ll = BDA(counter_f, ll_model, ul_model, lr=0.5, iters=3, **options)
    with pytest.raises(ValueError, match=r"neither ll_objective nor ul_objective .*'z'"):
        ll.run(*NO_DATA, ul_batch=NO_DATA)


# --- refusals ---------------------------------------------------------------------------------


def test_a_run_without_the_ul_batch_is_refused():
    p = ridge()
    ll = bda(p)
    with pytest.raises(ValueError, match=r"BilevelProblem.*run_ll\(ll, x, y, ul_batch"):
        ll.optimize(*p.train)
    with pytest.raises(ValueError, match="needs the UL batch"):
        ll.run(*p.train)
    with pytest.raises(TypeError, match="ul_batch must be a pair"):
        ll.run(*p.train, ul_batch=p.val[0])
    with pytest.raises(ValueError, match="ul_batch data has dtype"):
        ll.run(*p.train, ul_batch=(p.val[0].float(), p.val[1]))


def test_implicit_differentiation_is_refused_by_the_step_map():
    p = ridge()
    trajectory = bda(p).run(*p.train, ul_batch=p.val)
    state = {"data": p.train[0], "target": p.train[1], "ul_model": p.ul_model}
    with pytest.raises(ValueError, match="implicit function theorem does not apply"):
        trajectory.step_map.residual(trajectory.weights, {**state, "ll_model": trajectory.model})


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("alpha", -0.1, ValueError, r"alpha must lie in \[0, 1\]"),
        ("alpha", 1.5, ValueError, r"alpha must lie in \[0, 1\]"),
        ("alpha", True, TypeError, "alpha must be a real number"),
        ("alpha", float("nan"), ValueError, "alpha must be a number, got NaN"),
        ("alpha", torch.tensor(0.5), TypeError, "alpha must be a real number"),
        ("alpha_decay", 0.0, ValueError, r"alpha_decay must lie in \(0, 1\]"),
        ("alpha_decay", 1.1, ValueError, r"alpha_decay must lie in \(0, 1\]"),
        ("alpha_decay", False, TypeError, "alpha_decay must be a real number"),
        ("ul_scale", 0.0, ValueError, "ul_scale must be a finite number > 0"),
        ("ul_scale", float("inf"), ValueError, "ul_scale must be a finite number > 0"),
        ("ul_objective", "F", TypeError, "ul_objective must be callable"),
    ],
)
def test_bad_arguments_are_refused(name, value, error, message):
    p = ridge()
    with pytest.raises(error, match=message):
        bda(p, **{name: value})


def test_ul_objective_and_alpha_are_required():
    p = ridge()
    with pytest.raises(TypeError):
        BDA(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)  # no ul_objective, alpha


# --- dynamic initialization: the LL's initial weights are UL variables -----------------------

D, H, DI_LR, DI_ITERS, REG = 6, 3, 0.3, 5, 0.1


class HyperRepresentation(nn.Module):
    """The UL model: a linear trunk (features ``x @ trunk``) and the LL head, whose weights
    are the head's initialization (dynamic initialization)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.trunk = nn.Parameter(torch.randn(D, H, generator=g, dtype=DTYPE) / D**0.5)
        self.head = head  # the LL model itself: its weights are UL parameters too


def head_ll(state):
    features = state["data"] @ state["ul_model"].trunk
    (w,) = state["ll_model"].parameters()
    residual = state["ll_model"](features) - state["target"]
    return 0.5 * (residual**2).mean() + 0.5 * REG * (w**2).sum()


def head_ul(state):
    features = state["data"] @ state["ul_model"].trunk
    return 0.5 * ((state["ll_model"](features) - state["target"]) ** 2).mean()


@pytest.mark.parametrize("dynamics", ["gd", "bda"])
def test_dynamic_initialization_matches_the_hand_unroll(dynamics):
    """The head's initial weights and the trunk are UL variables of one problem (the UL
    model holds the LL model); Reverse gives both hypergradients, and one UL step with its
    own step size for the initialization (BOAT's ``DI.lr``) moves each by its own."""
    g = torch.Generator().manual_seed(4)
    x, xv = (torch.randn(20, D, generator=g, dtype=DTYPE) for _ in range(2))
    w_true = torch.randn(D, generator=g, dtype=DTYPE)
    y, yv = x @ w_true, xv @ w_true + 0.1 * torch.randn(20, generator=g, dtype=DTYPE)
    head = Linear(H, torch.tensor([0.2, -0.3, 0.1], dtype=DTYPE))
    ul_model = HyperRepresentation(head)
    alpha = 0.5 if dynamics == "bda" else 0.0
    if dynamics == "bda":
        options = {"ul_objective": head_ul, "alpha": alpha, "alpha_decay": 0.7}
        ll = BDA(head_ll, head, ul_model, lr=DI_LR, iters=DI_ITERS, **options)
    else:
        ll = GradientDescent(head_ll, head, ul_model, lr=DI_LR, iters=DI_ITERS)
    reverse = Reverse(head_ul, ul_model, head_ll, head)
    assert [id(q) for q in reverse.ul_params] == [id(ul_model.trunk), id(head.w)]
    groups = [{"params": [ul_model.trunk], "lr": 0.1}, {"params": head.parameters(), "lr": 0.3}]
    problem = BilevelProblem(ll, reverse, torch.optim.SGD(groups))
    h_trunk, h_init = problem.hypergradient((x, y), (xv, yv))

    trunk = ul_model.trunk.detach().clone().requires_grad_()
    w0 = head.w.detach().clone().requires_grad_()
    z, zv = x @ trunk, xv @ trunk
    w = w0
    for k in range(DI_ITERS):
        a = alpha * 0.7**k
        d_f = z.T @ (z @ w - y) / len(z) + REG * w
        d_F = zv.T @ (zv @ w - yv) / len(zv)
        w = w - DI_LR * ((1 - a) * d_f + a * d_F)
    exact_trunk, exact_init = torch.autograd.grad(0.5 * ((zv @ w - yv) ** 2).mean(), [trunk, w0])
    assert relative_error(h_trunk, exact_trunk) < 1e-12
    assert relative_error(h_init, exact_init) < 1e-12
    assert torch.equal(head.w.detach(), w0.detach())  # the hypergradient changed nothing

    problem.step((x, y), (xv, yv))
    assert relative_error(ul_model.trunk.detach(), trunk.detach() - 0.1 * exact_trunk) < 1e-14
    assert relative_error(head.w.detach(), w0.detach() - 0.3 * exact_init) < 1e-14


def test_implicit_and_a_disagreeing_ul_objective_are_refused_by_the_runner():
    """The IFT does not hold at the end of BDA's aggregated dynamics, and BDA must be steered
    by the UL objective the UL method differentiates."""
    torch.manual_seed(0)
    ll_model, ul_model = Linear(3), FeatureL2(3)

    def ll_objective(state):
        return ridge_ll(state)

    def ul_objective(state):
        return ridge_ul(state)

    ll = BDA(
        ll_objective,
        ll_model,
        ul_model,
        0.1,
        5,
        ul_objective=ul_objective,
        alpha=0.5,
        alpha_decay=0.9,
    )
    with pytest.raises(ValueError, match="implicit function theorem does not apply"):
        BilevelProblem(ll, Implicit(ul_objective, ul_model, ll_objective, ll_model, k=5))
    with pytest.raises(ValueError, match="another ul_objective"):
        BilevelProblem(ll, Reverse(lambda s: ul_objective(s), ul_model, ll_objective, ll_model))
