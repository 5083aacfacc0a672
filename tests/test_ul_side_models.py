"""The UL side: UL variables that are the LL's initial weights (MAML-style), UL models with
submodules, hooks and tied parameters, task batches, and the methods beyond ``Reverse``
(``Truncated``, ``FirstOrder``, ``FiniteDifference``, ``PTT``, ``BDA``, ``Implicit``).

Each test compares the library in float64 with the same computation written by hand on
plain tensors (``torch.autograd`` through an explicit unroll, or a closed form), over several
consecutive UL steps: the patched LL model is reused from run to run, and the UL variables
move between runs, so anything kept from an earlier run shows up in a later one."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import BDA, GradientDescent
from bilevel.ul import (
    PTT,
    FiniteDifference,
    FirstOrder,
    Forward,
    Implicit,
    Reverse,
    Truncated,
)

DTYPE = torch.float64
LR = 0.3
STEPS = 4
RUNS = 3
UL_LR = 0.05
Tensors = list[torch.Tensor]


def data(seed: int, n: int = 8, d: int = 3, tasks: int | None = None) -> tuple:
    """``((x, y), (xv, yv))``, with a leading task dimension when ``tasks`` is given."""
    g = torch.Generator().manual_seed(seed)
    lead = () if tasks is None else (tasks,)
    x = torch.randn(*lead, n, d, generator=g, dtype=DTYPE)
    y = torch.randn(*lead, n, 1, generator=g, dtype=DTYPE)
    xv = torch.randn(*lead, n, d, generator=g, dtype=DTYPE)
    yv = torch.randn(*lead, n, 1, generator=g, dtype=DTYPE)
    return (x, y), (xv, yv)


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)


def forward(w: Tensors, x: torch.Tensor) -> torch.Tensor:
    """The MLP on plain tensors ``w = [W1, b1, W2, b2]``."""
    return torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).mean()


def task_loss(state: dict) -> torch.Tensor:
    return mse(state["ll_model"](state["data"]), state["target"])


def leaves(module: nn.Module) -> Tensors:
    return [p.detach().clone().requires_grad_() for p in module.parameters()]


def unroll(w: Tensors, loss_fn, steps: int, graph) -> list[Tensors]:
    """Plain gradient steps ``w - LR * grad loss_fn(w, k)``; ``graph(k)``: keep step k's
    graph (otherwise the step's result is cut from the past). Returns ``w_1 .. w_T``."""
    iterates = []
    for k in range(steps):
        keep = graph(k)
        if not keep:
            w = [p.detach().requires_grad_() for p in w]
        g = torch.autograd.grad(loss_fn(w, k), w, create_graph=keep)
        w = [p - LR * gi for p, gi in zip(w, g, strict=True)]
        if not keep:
            w = [p.detach().requires_grad_() for p in w]
        iterates.append(w)
    return iterates


def close(got: Tensors, expected: Tensors, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def consecutive(problem: BilevelProblem, train, val, by_hand, rtol=1e-10, atol=1e-12) -> None:
    """``RUNS`` UL steps in a row: each hypergradient (and what ``step`` applies) against
    ``by_hand()`` at the current UL variables; the UL variables move between runs."""
    params = problem.ul_params
    for _ in range(RUNS):
        expected = by_hand()
        assert any(float(e.abs().max()) > 1e-6 for e in expected)  # not a vacuous zero
        close(problem.hypergradient(train, val), expected, rtol, atol)
        before = [p.detach().clone() for p in params]
        problem.step(train, val)
        moved = [b - UL_LR * e for b, e in zip(before, expected, strict=True)]
        close([p.detach() for p in params], moved, rtol, atol)


# ---------------------------------------------------------------- 1. MAML-style UL variables


def maml_by_hand(net: nn.Module, train, val, method: str, k: int | None = None) -> Tensors:
    (x, y), (xv, yv) = train, val
    theta = leaves(net)

    def f(w, _):
        return mse(forward(w, x), y)

    if method == "first_order":
        (w,) = unroll(theta, f, STEPS, lambda _: False)[-1:]
        grads = torch.autograd.grad(mse(forward(w, xv), yv), w)
        return list(grads)
    if method == "ptt":
        iterates = unroll(theta, f, STEPS, lambda _: True)
        losses = [mse(forward(w, xv), yv) for w in iterates]
        chosen = int(torch.stack([v.detach() for v in losses]).argmax())
        return list(torch.autograd.grad(losses[chosen], theta))
    steps = STEPS if k is None else k
    w = unroll(theta, f, steps, lambda _: True)[-1]
    return list(torch.autograd.grad(mse(forward(w, xv), yv), theta))


def maml_problem(net: nn.Module, ul) -> BilevelProblem:
    ll = GradientDescent(task_loss, net, net, lr=LR, iters=STEPS)
    optimizer = torch.optim.SGD(net.parameters(), lr=UL_LR)
    return BilevelProblem(ll, ul, optimizer)


@pytest.mark.parametrize("method", ["reverse", "forward", "first_order", "truncated_all"])
def test_maml_reverse_forward_first_order_and_full_truncation(method):
    net = mlp(0)
    train, val = data(1)
    if method == "reverse":
        ul = Reverse(task_loss, net, task_loss, net)
    elif method == "forward":
        ul = Forward(task_loss, net, task_loss, net)
    elif method == "first_order":
        ul = FirstOrder(task_loss, net, task_loss, net)
    else:
        ul = Truncated(task_loss, net, task_loss, net, truncate_iter=STEPS)
    hand = "first_order" if method == "first_order" else "reverse"
    consecutive(maml_problem(net, ul), train, val, lambda: maml_by_hand(net, train, val, hand))


def test_maml_truncated_refuses_initial_weights_it_cannot_reach():
    """With K < T steps differentiated, no path reaches the initial weights: an error, not a
    silently zero hypergradient."""
    net = mlp(0)
    train, val = data(1)
    problem = maml_problem(net, Truncated(task_loss, net, task_loss, net, truncate_iter=2))
    with pytest.raises(ValueError, match="no hypergradient"):
        problem.hypergradient(train, val)


def test_maml_ptt_back_propagates_from_the_worst_iterate():
    net = mlp(2)
    train, val = data(3)
    val = (val[0], val[1] + 3.0)  # far from what the LL fits: the UL loss moves with k
    ul = PTT(task_loss, net, task_loss, net)
    problem = maml_problem(net, ul)
    problem.hypergradient(train, val)
    assert ul.diagnostics["ptt_step"] < STEPS  # not the last iterate: not Reverse's answer
    consecutive(problem, train, val, lambda: maml_by_hand(net, train, val, "ptt"))


def test_maml_hypergradient_leaves_the_ll_models_grad_alone():
    """The UL parameters are the LL model's own: ``hypergradient`` must not touch their
    ``.grad`` (nor their values), and ``step`` must replace, not add to, an old ``.grad``."""
    net = mlp(0)
    train, val = data(1)
    problem = maml_problem(net, Reverse(task_loss, net, task_loss, net))
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    values = [p.detach().clone() for p in net.parameters()]
    expected = maml_by_hand(net, train, val, "reverse")
    close(problem.hypergradient(train, val), expected)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in net.parameters())
    assert all(torch.equal(p, v) for p, v in zip(net.parameters(), values, strict=True))
    problem.step(train, val)
    moved = [v - UL_LR * e for v, e in zip(values, expected, strict=True)]
    close([p.detach() for p in net.parameters()], moved)


def test_maml_finite_difference_one_step_is_the_one_step_unrolled_hypergradient():
    net = mlp(4)
    train, val = data(5)
    ll = GradientDescent(task_loss, net, net, lr=LR, iters=1)
    ul = FiniteDifference(task_loss, net, task_loss, net, r=1e-5)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(net.parameters(), lr=UL_LR))
    # O(r^2) truncation (r = 1e-5) and round-off ~ 1e-16 / r
    consecutive(
        problem, train, val, lambda: maml_by_hand(net, train, val, "reverse", k=1), 1e-7, 1e-9
    )


def test_maml_finite_difference_is_exact_on_a_quadratic_ll():
    """A linear model with a squared loss: the LL gradient is linear in the weights, so the
    central difference is exact up to round-off, whatever r."""
    torch.manual_seed(6)
    net = nn.Linear(3, 1).to(DTYPE)
    train, val = data(7)
    (x, y), (xv, yv) = train, val

    def by_hand():
        theta = leaves(net)
        (w,) = unroll(theta, lambda w, _: mse(x @ w[0].T + w[1], y), 1, lambda _: True)
        return list(torch.autograd.grad(mse(xv @ w[0].T + w[1], yv), theta))

    ll = GradientDescent(task_loss, net, net, lr=LR, iters=1)
    ul = FiniteDifference(task_loss, net, task_loss, net, r=0.5)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(net.parameters(), lr=UL_LR))
    consecutive(problem, train, val, by_hand, 1e-9, 1e-11)


BDA_ALPHA, BDA_DECAY, BDA_SCALE = 0.5, 0.8, 1.5


def test_maml_bda_reverse_differentiates_the_aggregated_steps():
    net = mlp(8)
    train, val = data(9)
    (x, y), (xv, yv) = train, val

    def by_hand():
        theta = leaves(net)

        def direction(w, k):
            a = BDA_ALPHA * BDA_DECAY**k
            return (1 - a) * mse(forward(w, x), y) + a * BDA_SCALE * mse(forward(w, xv), yv)

        w = unroll(theta, direction, STEPS, lambda _: True)[-1]
        return list(torch.autograd.grad(mse(forward(w, xv), yv), theta))

    ll = BDA(
        task_loss,
        net,
        net,
        lr=LR,
        iters=STEPS,
        ul_objective=task_loss,
        alpha=BDA_ALPHA,
        alpha_decay=BDA_DECAY,
        ul_scale=BDA_SCALE,
    )
    ul = Reverse(task_loss, net, task_loss, net)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(net.parameters(), lr=UL_LR))
    consecutive(problem, train, val, by_hand)


class WithInitialization(nn.Module):
    """UL variables: a log-scale L2 strength and the LL module itself (its weights are the
    LL's learned starting point)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))
        self.net = net


def l2_loss(state: dict) -> torch.Tensor:
    penalty = sum((p**2).sum() for p in state["ll_model"].parameters())
    return task_loss(state) + 0.5 * state["ul_model"].log_l2.exp() * penalty


def with_init_by_hand(
    outer: WithInitialization, train, val, k: int, steps: int = STEPS, ptt: bool = False
) -> Tensors:
    """``[d/d log_l2, d/d W1, ...]`` through the last ``k`` of ``steps`` steps (``ptt``: from
    the iterate with the largest UL loss)."""
    (x, y), (xv, yv) = train, val
    log_l2 = outer.log_l2.detach().clone().requires_grad_()
    theta = leaves(outer.net)

    def f(w, _):
        return mse(forward(w, x), y) + 0.5 * log_l2.exp() * sum((p**2).sum() for p in w)

    iterates = unroll(theta, f, steps, lambda step: step >= steps - k)
    losses = [mse(forward(w, xv), yv) for w in iterates]
    chosen = int(torch.stack([v.detach() for v in losses]).argmax()) if ptt else -1
    grads = torch.autograd.grad(losses[chosen], [log_l2, *theta], allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else g
        for p, g in zip([log_l2, *theta], grads, strict=True)
    ]


def with_init_problem(ul_cls, iters: int = STEPS, **options):
    net = mlp(10)
    outer = WithInitialization(net)
    assert next(n for n, _ in outer.named_parameters()) == "log_l2"
    ll = GradientDescent(l2_loss, net, outer, lr=LR, iters=iters)
    ul = ul_cls(task_loss, outer, l2_loss, net, **options)
    return outer, BilevelProblem(ll, ul, torch.optim.SGD(outer.parameters(), lr=UL_LR))


@pytest.mark.parametrize("method", ["reverse", "forward", "ptt", "finite_difference"])
def test_initial_weights_and_a_hyperparameter_together(method):
    train, val = data(11)
    if method == "finite_difference":  # T = 1: DARTS' step, exact up to O(r^2)
        outer, problem = with_init_problem(FiniteDifference, iters=1, r=1e-5)
        consecutive(
            problem, train, val, lambda: with_init_by_hand(outer, train, val, 1, 1), 1e-7, 1e-9
        )
        return
    cls = {"reverse": Reverse, "forward": Forward, "ptt": PTT}[method]
    outer, problem = with_init_problem(cls)
    ptt = method == "ptt"
    consecutive(problem, train, val, lambda: with_init_by_hand(outer, train, val, STEPS, ptt=ptt))


def test_initial_weights_and_a_hyperparameter_together_ptt_and_first_order_refusals():
    """FirstOrder: the UL loss does not read log_l2, so it gets no path (refused, not zero);
    Truncated K < T: the initial weights get none."""
    train, val = data(11)
    for cls, options in ((FirstOrder, {}), (Truncated, {"truncate_iter": 2})):
        _, problem = with_init_problem(cls, **options)
        with pytest.raises(ValueError, match="no hypergradient"):
            problem.hypergradient(train, val)


# -------------------------------------------- 2. UL models with submodules, hooks, tied weights


class Trunk(nn.Module):
    """A hyper-representation: a feature extractor whose output the LL head reads, and a
    scale that a forward hook applies to its output (optional)."""

    def __init__(self, hook: bool = False, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.trunk = nn.Linear(3, 4).to(DTYPE)
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=DTYPE))
        self.tied = tied
        if hook:
            self.trunk.register_forward_hook(lambda mod, args, out: out * self.scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if self.tied:  # the trunk's weight read a second time, outside the submodule call
            h = h + 0.5 * torch.tanh(x @ self.trunk.weight.T)
        return h


def trunk_by_hand(ul: Trunk, head: nn.Module, train, val, hook: bool, tied: bool) -> Tensors:
    (x, y), (xv, yv) = train, val
    weight, bias, scale = (
        p.detach().clone().requires_grad_() for p in (ul.trunk.weight, ul.trunk.bias, ul.scale)
    )

    def features(x):
        z = x @ weight.T + bias
        if hook:
            z = z * scale
        h = torch.tanh(z)
        if tied:
            h = h + 0.5 * torch.tanh(x @ weight.T)
        return h

    def loss(w, x, y):
        h = features(x)
        out = h @ w[0].T + w[1]
        return mse(out, y) + (0.1 * scale**2 if not hook else 0.0)

    w = unroll(leaves(head), lambda w, _: loss(w, x, y), STEPS, lambda _: True)[-1]
    ul_params = [scale, weight, bias]  # parameters(): own first, then submodules'
    grads = torch.autograd.grad(loss(w, xv, yv), ul_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(ul_params, grads, strict=True)]


def head_loss(state: dict) -> torch.Tensor:
    ul = state["ul_model"]
    out = state["ll_model"](ul.features(state["data"]))
    extra = 0.0 if ul.trunk._forward_hooks else 0.1 * ul.scale**2  # scale used elsewhere
    return mse(out, state["target"]) + extra


@pytest.mark.parametrize(
    "hook,tied", [(False, False), (True, False), (False, True)], ids=["plain", "hook", "tied"]
)
def test_ul_submodule_as_hyper_representation(hook, tied):
    ul_model = Trunk(hook=hook, tied=tied)
    torch.manual_seed(13)
    head = nn.Linear(4, 1).to(DTYPE)
    train, val = data(14)
    ll = GradientDescent(head_loss, head, ul_model, lr=LR, iters=STEPS)
    problem = BilevelProblem(
        ll,
        Reverse(head_loss, ul_model, head_loss, head),
        torch.optim.SGD(ul_model.parameters(), lr=UL_LR),
    )
    consecutive(problem, train, val, lambda: trunk_by_hand(ul_model, head, train, val, hook, tied))


class TiedParameter(nn.Module):
    """One parameter registered under two names (``parameters()`` lists it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False).to(DTYPE)
        self.b = nn.Linear(1, 1, bias=False).to(DTYPE)
        self.b.weight = self.a.weight
        with torch.no_grad():
            self.a.weight.fill_(0.4)


def test_ul_parameter_registered_twice_gets_the_sum_of_both_uses():
    ul_model = TiedParameter()
    assert len(list(ul_model.parameters())) == 1
    torch.manual_seed(15)
    head = nn.Linear(3, 1).to(DTYPE)
    train, val = data(16)

    def ll_loss(state):
        ul = state["ul_model"]
        w = state["ll_model"].weight
        one = torch.ones(1, 1, dtype=DTYPE)
        return task_loss(state) + 0.5 * (ul.a(one) * ul.b(one)).squeeze() * (w**2).sum()

    def by_hand():
        (x, y), (xv, yv) = train, val
        c = ul_model.a.weight.detach().clone().requires_grad_()

        def f(w, _):
            return mse(x @ w[0].T + w[1], y) + 0.5 * (c * c).squeeze() * (w[0] ** 2).sum()

        w = unroll(leaves(head), f, STEPS, lambda _: True)[-1]
        return list(torch.autograd.grad(mse(xv @ w[0].T + w[1], yv), [c]))

    ll = GradientDescent(ll_loss, head, ul_model, lr=LR, iters=STEPS)
    problem = BilevelProblem(
        ll,
        Reverse(task_loss, ul_model, ll_loss, head),
        torch.optim.SGD(ul_model.parameters(), lr=UL_LR),
    )
    consecutive(problem, train, val, by_hand)


# --------------------------------------------------------------------------- 3. task batches

TASKS = 3


@pytest.mark.parametrize("method", ["reverse", "first_order", "ptt"])
def test_meta_batch_is_the_mean_of_per_task_hypergradients(method):
    net = mlp(17)
    train, val = data(18, tasks=TASKS)
    val = (val[0], val[1] + 2.0)
    batch = {"train": train, "test": val}
    cls = {"reverse": Reverse, "first_order": FirstOrder, "ptt": PTT}[method]
    problem = maml_problem(net, cls(task_loss, net, task_loss, net))
    for _ in range(RUNS):
        per_task = [
            maml_by_hand(net, (train[0][i], train[1][i]), (val[0][i], val[1][i]), method)
            for i in range(TASKS)
        ]
        expected = [torch.stack(g).mean(0) for g in zip(*per_task, strict=True)]
        assert not torch.allclose(per_task[0][0], per_task[1][0])  # tasks differ
        close(problem.meta_hypergradient(batch), expected)
        before = [p.detach().clone() for p in net.parameters()]
        problem.meta_step(batch)
        moved = [b - UL_LR * e for b, e in zip(before, expected, strict=True)]
        close([p.detach() for p in net.parameters()], moved)


def test_meta_batch_with_a_ul_submodule_model():
    """Hyper-representation over a task batch: the patched head is reused across tasks."""
    ul_model = Trunk(hook=True)
    torch.manual_seed(19)
    head = nn.Linear(4, 1).to(DTYPE)
    train, val = data(20, tasks=TASKS)
    ll = GradientDescent(head_loss, head, ul_model, lr=LR, iters=STEPS)
    problem = BilevelProblem(ll, Reverse(head_loss, ul_model, head_loss, head))
    for _ in range(2):
        per_task = [
            trunk_by_hand(
                ul_model, head, (train[0][i], train[1][i]), (val[0][i], val[1][i]), True, False
            )
            for i in range(TASKS)
        ]
        expected = [torch.stack(g).mean(0) for g in zip(*per_task, strict=True)]
        close(problem.meta_hypergradient({"train": train, "test": val}), expected)


# ------------------------------------------------- 4. Implicit on ridge with a submodule UL model


class RidgeHyper(nn.Module):
    """UL variables in two submodules: a feature map and per-feature log L2 strengths."""

    def __init__(self, d: int) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.features = nn.Linear(d, d, bias=False).to(DTYPE)
        with torch.no_grad():
            self.features.weight.mul_(0.3).add_(torch.eye(d, dtype=DTYPE))
        self.reg = nn.Module()
        self.reg.log_l2 = nn.Parameter(torch.linspace(-0.5, 0.3, d, dtype=DTYPE))


def ridge_ll(state: dict) -> torch.Tensor:
    ul, w = state["ul_model"], state["ll_model"].weight
    out = state["ll_model"](ul.features(state["data"]))
    return mse(out, state["target"]) + 0.5 * (ul.reg.log_l2.exp() * w.squeeze(0) ** 2).sum()


def ridge_ul(state: dict) -> torch.Tensor:
    out = state["ll_model"](state["ul_model"].features(state["data"]))
    return mse(out, state["target"])


def ridge_closed_form(ul: RidgeHyper, train, val) -> Tensors:
    """``F(w*(u))`` with ``w* = (Z^T Z / n + diag(l2))^-1 Z^T y / n``, ``Z = x Phi^T``,
    differentiated through the linear solve."""
    (x, y), (xv, yv) = train, val
    phi = ul.features.weight.detach().clone().requires_grad_()
    log_l2 = ul.reg.log_l2.detach().clone().requires_grad_()
    z = x @ phi.T
    n = len(x)
    w = torch.linalg.solve(z.T @ z / n + torch.diag(log_l2.exp()), z.T @ y / n)
    return list(torch.autograd.grad(mse(xv @ phi.T @ w, yv), [phi, log_l2]))


def test_implicit_cg_on_ridge_with_a_submodule_ul_model():
    d = 3
    ul_model = RidgeHyper(d)
    head = nn.Linear(d, 1, bias=False).to(DTYPE)
    nn.init.zeros_(head.weight)
    train, val = data(22, n=20, d=d)
    ll = GradientDescent(ridge_ll, head, ul_model, lr=0.2, iters=300)
    ul = Implicit(ridge_ul, ul_model, ridge_ll, head, ll_learning_rate=0.2, method="cg", k=50)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=UL_LR))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        consecutive(problem, train, val, lambda: ridge_closed_form(ul_model, train, val), 1e-8)


class ProximalInit(nn.Module):
    """iMAML with a learned proximal strength: the LL's initial weights (also the proximal
    centre) and ``log_reg``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.log_reg = nn.Parameter(torch.tensor(0.5, dtype=DTYPE))
        self.net = net


def proximal_loss(state: dict) -> torch.Tensor:
    ul, w = state["ul_model"], state["ll_model"].weight
    return task_loss(state) + 0.5 * ul.log_reg.exp() * ((w - ul.net.weight) ** 2).sum()


def test_implicit_cg_imaml_with_initial_weights_and_a_proximal_strength():
    """``w* = (A + reg I)^-1 (b + reg theta)``, differentiated through the solve."""
    torch.manual_seed(23)
    net = nn.Linear(3, 1, bias=False).to(DTYPE)
    outer = ProximalInit(net)
    train, val = data(24, n=20)
    (x, y), (xv, yv) = train, val

    def closed_form():
        log_reg = outer.log_reg.detach().clone().requires_grad_()
        theta = net.weight.detach().clone().requires_grad_()
        a, b, reg = x.T @ x / len(x), x.T @ y / len(x), log_reg.exp()
        w = torch.linalg.solve(a + reg * torch.eye(3, dtype=DTYPE), b + reg * theta.T)
        return list(torch.autograd.grad(mse(xv @ w, yv), [log_reg, theta]))

    ll = GradientDescent(proximal_loss, net, outer, lr=0.3, iters=300)
    ul = Implicit(task_loss, outer, proximal_loss, net, ll_learning_rate=0.3, method="cg", k=50)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(outer.parameters(), lr=UL_LR))
    consecutive(problem, train, val, closed_form, 1e-8)
