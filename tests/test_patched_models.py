"""The patched LL model computes the user's module at the fast weights, however an objective
reaches it: tied weights, frozen parameters, batch norm's running statistics, penalties over
``parameters()``, recurrent layers' flat weights, direct calls of submodules beside calls of
the whole model, a submodule used twice, hooks (pruning masks), plain attributes, compiled
modules, parametrizations, attention, parameter containers, submodules replaced between runs.

Each test compares the library (``BilevelProblem`` with ``GradientDescent`` and a UL method)
in float64 with the same computation written with plain tensors (or ``functional_call``, which
owes nothing to ``higher``), over several consecutive runs: the patched model is reused from
run to run, so anything it keeps from an earlier run shows up in a later one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations, prune

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ll.patched import (
    ModelChanged,
    _weight_norm_second_derivatives_right,
    patch,
    sync_from,
)
from bilevel.ul import FiniteDifference, FirstOrder, Implicit, Reverse

DTYPE = torch.float64
LR = 0.2
RUNS = 3
Tensors = list[torch.Tensor]
#: ``loss(w, u, x, y)``: ``w`` in ``ll_model.parameters()`` order, ``u`` the UL parameters
Loss = Callable[[Tensors, Tensors, torch.Tensor, torch.Tensor], torch.Tensor]


class Hyper(nn.Module):
    """UL variables: a penalty strength on a log scale, and a shift of the LL targets."""

    def __init__(self) -> None:
        super().__init__()
        self.log_c = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))
        self.shift = nn.Parameter(torch.tensor(0.3, dtype=DTYPE))


def by_hand(
    model: nn.Module,
    hyper: nn.Module,
    ll_loss: Loss,
    ul_loss: Loss,
    train: tuple,
    val: tuple,
    steps: int,
    method: str = "reverse",
) -> tuple[Tensors, Tensors]:
    """The LL run and the hypergradient on plain tensors: ``(final weights, hypergradient)``.

    ``method``: ``"reverse"`` (back-propagation through every step), ``"first_order"``
    (the direct gradient at the final weights) or ``"implicit"`` (the implicit function
    theorem at the final weights, with the exact Hessian)."""
    start = [(p, p.detach().clone()) for p in model.parameters()]
    u = [p.detach().clone().requires_grad_() for p in hyper.parameters()]
    trainable = [p.requires_grad for p in model.parameters()]
    w = [
        p.detach().clone().requires_grad_(t)
        for p, t in zip(model.parameters(), trainable, strict=True)
    ]
    for _ in range(steps):
        active = [p for p in w if p.requires_grad]
        loss = ll_loss(w, u, *train)
        grads = iter(torch.autograd.grad(loss, active, create_graph=method == "reverse"))
        w = [p - LR * next(grads) if t else p for p, t in zip(w, trainable, strict=True)]
    if method != "reverse":
        w = [p.detach().requires_grad_(t) for p, t in zip(w, trainable, strict=True)]
    loss = ul_loss(w, u, *val)
    grads = list(torch.autograd.grad(loss, u, retain_graph=True, allow_unused=True))
    if method == "implicit":  # dF/du = grad_u F - (d g / d u)^T H^-1 grad_w F
        active = [p for p in w if p.requires_grad]
        v = torch.autograd.grad(loss, active, allow_unused=True)
        v = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(active, v, strict=True)
            ]
        )
        g = torch.autograd.grad(ll_loss(w, u, *train), active, create_graph=True)
        flat = torch.cat([t.reshape(-1) for t in g])
        rows = [torch.autograd.grad(flat[i], active, retain_graph=True) for i in range(len(flat))]
        hessian = torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])
        q = torch.linalg.solve(hessian, v)
        mixed = torch.autograd.grad(flat @ q, u, allow_unused=True)
        grads = [
            a if b is None else (0 if a is None else a) - b
            for a, b in zip(grads, mixed, strict=True)
        ]
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(u, grads, strict=True)]
    for (p, value), q in zip(start, model.parameters(), strict=True):  # the reference's own
        assert p is q and torch.equal(p, value), "the reference changed the user's module"
    return [p.detach() for p in w], grads


def check_runs(
    problem: BilevelProblem,
    train: tuple,
    val: tuple,
    weights: Tensors,
    grads: Tensors,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> None:
    """``RUNS`` hypergradients and LL runs in a row (one patched model, reused) against the
    hand-written weights and hypergradient."""
    ll = problem.ll
    for _ in range(RUNS):
        got = problem.hypergradient(train, val)
        for a, b in zip(got, grads, strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        trajectory = ll.run(*train, differentiable_steps=0)
        for a, b in zip(trajectory.weights, weights, strict=True):
            torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
        ll.release(trajectory.model)


def regression_data(features: int, n: int = 24, seed: int = 1) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, features, generator=g, dtype=DTYPE)
    y = torch.randn(2 * n, generator=g, dtype=DTYPE)
    return (x[:n], y[:n]), (x[n:], y[n:])


def ul_mse(state: dict) -> torch.Tensor:
    return F.mse_loss(state["ll_model"](state["data"]), state["target"])


# 1. tied weights ------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """An embedding and an output layer that share one weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 3).to(DTYPE)
        self.mid = nn.Linear(3, 3).to(DTYPE)
        self.out = nn.Linear(3, 5).to(DTYPE)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(tokens))))


def tied_logits(w: Tensors, tokens: torch.Tensor) -> torch.Tensor:
    """``w`` = emb.weight (= out.weight), mid.weight, mid.bias, out.bias."""
    return F.linear(torch.tanh(F.linear(w[0][tokens], w[1], w[2])), w[0], w[3])


def tied_objective(direct: bool) -> Callable[[dict], torch.Tensor]:
    def objective(state: dict) -> torch.Tensor:
        model, u = state["ll_model"], state["ul_model"]
        if direct:  # the three layers called one by one
            logits = model.out(torch.tanh(model.mid(model.emb(state["data"]))))
        else:
            logits = model(state["data"])
        penalty = u.log_c.exp() * (model.out.weight**2).sum()  # the shared weight, via out
        return F.cross_entropy(logits + u.shift, state["target"]) + penalty

    return objective


def tied_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(tied_logits(w, x) + u[1], y) + u[0].exp() * (w[0] ** 2).sum()


def token_data() -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 5, (40,), generator=g), torch.randint(0, 5, (40,), generator=g)
    return (x[:20], y[:20]), (x[20:], y[20:])


@pytest.mark.parametrize("direct", [False, True], ids=["whole", "direct"])
@pytest.mark.parametrize("method", ["reverse", "finite_difference"])
def test_tied_weights_move_as_one(direct, method):
    """The shared weight is one fast weight: both layers read it, and each step moves it by
    the sum of both layers' gradients (a copy per layer would move each by its own)."""
    model, hyper = TiedLM(), Hyper()
    assert len(list(model.parameters())) == 4
    objective = tied_objective(direct)
    train, val = token_data()
    check_method(method, objective, model, hyper, (tied_loss, tied_loss), train, val)


# 2. a frozen parameter between trainable ones -----------------------------------------------


class Split(nn.Module):
    """A model linear in its trainable weights ``a``, ``b``, ``c``, with a frozen feature scale
    ``s`` between them (a ridge LL: convex, so ``Implicit`` applies exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -0.2], dtype=DTYPE))
        self.s = nn.Parameter(torch.tensor([0.8, -0.6], dtype=DTYPE), requires_grad=False)
        self.b = nn.Parameter(torch.tensor([0.1, 0.4], dtype=DTYPE))
        self.c = nn.Parameter(torch.tensor(0.05, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] @ self.a + (x[:, 2:] * self.s) @ self.b + self.c


def split_objective(state: dict) -> torch.Tensor:
    model, u = state["ll_model"], state["ul_model"]
    fit = F.mse_loss(model(state["data"]), state["target"] + u.shift)
    return fit + u.log_c.exp() * ((model.a**2).sum() + (model.b**2).sum())


def split_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = x[:, :2] @ w[0] + (x[:, 2:] * w[1]) @ w[2] + w[3]
    return F.mse_loss(out, y + u[1]) + u[0].exp() * ((w[0] ** 2).sum() + (w[2] ** 2).sum())


def split_ul_objective(state: dict) -> torch.Tensor:
    """The UL loss depends on the UL variables directly too (so that ``FirstOrder`` has a
    gradient to give)."""
    model, u = state["ll_model"], state["ul_model"]
    fit = F.mse_loss(model(state["data"]), state["target"] + 0.5 * u.shift)
    return fit + 0.1 * u.log_c.exp() * (model.b**2).sum()


def split_ul(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fit = F.mse_loss(x[:, :2] @ w[0] + (x[:, 2:] * w[1]) @ w[2] + w[3], y + 0.5 * u[1])
    return fit + 0.1 * u[0].exp() * (w[2] ** 2).sum()


@pytest.mark.parametrize("method", ["reverse", "implicit", "first_order"])
def test_a_frozen_parameter_stays_put_and_the_others_line_up(method):
    model, hyper = Split(), Hyper()
    frozen = model.s.detach().clone()
    train, val = regression_data(4)
    steps = {"reverse": 4, "implicit": 30, "first_order": 4}[method]
    ll = GradientDescent(split_objective, model, hyper, lr=LR, iters=steps)
    tol = {}
    if method == "reverse":
        ul = Reverse(split_ul_objective, hyper, split_objective, model)
    elif method == "implicit":
        ul = Implicit(
            split_ul_objective, hyper, split_objective, model, LR, k=20, stationarity_warning=None
        )
        tol = {"rtol": 1e-8, "atol": 1e-10}
    else:
        ul = FirstOrder(split_ul_objective, hyper, split_objective, model)
    weights, grads = by_hand(model, hyper, split_loss, split_ul, train, val, steps, method)
    assert all(bool(g.ne(0)) for g in grads)
    check_runs(BilevelProblem(ll, ul), train, val, weights, grads, **tol)
    torch.testing.assert_close(weights[1], frozen, rtol=0, atol=0)
    torch.testing.assert_close(model.s, frozen, rtol=0, atol=0)


# 3. batch norm with running statistics ------------------------------------------------------


def bn_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)


def bn_objective(state: dict) -> torch.Tensor:
    model, u = state["ll_model"], state["ul_model"]
    fit = F.mse_loss(model(state["data"]).squeeze(-1), state["target"] + u.shift)
    return fit + u.log_c.exp() * (model[0].weight ** 2).sum()


def bn_forward(w: Tensors, x: torch.Tensor, stats: tuple | None = None) -> torch.Tensor:
    """By hand; ``stats``: the running mean and variance (eval mode), ``None``: the batch's."""
    h = F.linear(x, w[0], w[1])
    mean, var = (None, None) if stats is None else stats
    h = F.batch_norm(h, mean, var, w[2], w[3], training=stats is None, eps=1e-5)
    return F.linear(torch.tanh(h), w[4], w[5]).squeeze(-1)


def bn_loss(stats: tuple | None) -> Loss:
    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fit = F.mse_loss(bn_forward(w, x, stats), y + u[1])
        return fit + u[0].exp() * (w[0] ** 2).sum()

    return loss


def bn_ul(stats: tuple | None) -> Loss:
    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(bn_forward(w, x, stats), y)

    return loss


def bn_ul_objective(state: dict) -> torch.Tensor:
    return F.mse_loss(state["ll_model"](state["data"]).squeeze(-1), state["target"])


def buffers(model: nn.Module) -> Tensors:
    return [b.clone() for b in model.buffers()]


def check_reverse(objective, ul_objective, model, hyper, by_hand_losses, train, val) -> None:
    """``Reverse`` through 3 LL steps against the hand-written unroll of ``(ll, ul)`` losses,
    over consecutive runs."""
    weights, grads = by_hand(model, hyper, *by_hand_losses, train, val, 3)
    ll = GradientDescent(objective, model, hyper, lr=LR, iters=3)
    check_runs(
        BilevelProblem(ll, Reverse(ul_objective, hyper, objective, model)),
        train,
        val,
        weights,
        grads,
    )


def check_method(method: str, objective, model, hyper, by_hand_losses, train, val) -> None:
    """``Reverse`` through 3 LL steps, or DARTS' finite difference through 1, against the
    hand-written unroll of the losses ``(ll, ul)``, over consecutive runs."""
    steps = 3 if method == "reverse" else 1
    ll = GradientDescent(objective, model, hyper, lr=LR, iters=steps)
    if method == "reverse":
        ul, tol = Reverse(objective, hyper, objective, model), {}
    else:
        # O(r^2) truncation, and round-off of about eps / r in the difference quotient (terms
        # of order 1): the tied model's shift hypergradient is exactly 0 and came out 0.07 to
        # 0.12 eps / r, depending on the CPU's kernels, so atol is 10 eps / r, not 1e-12
        r = 1e-4
        ul = FiniteDifference(objective, hyper, objective, model, r=r)
        tol = {"rtol": 1e-6, "atol": 10 * torch.finfo(DTYPE).eps / r}
    weights, grads = by_hand(model, hyper, *by_hand_losses, train, val, steps)
    check_runs(BilevelProblem(ll, ul), train, val, weights, grads, **tol)


def fit_and_penalty(
    out: Callable[[Tensors, torch.Tensor], torch.Tensor],
) -> tuple[Callable, Callable]:
    """By hand, for a network ``out(w, x)``: ``fit_objective`` (the LL) and
    ``ul_fit_and_penalty`` (the UL) as functions of the weights ``w`` and UL tensors ``u``."""

    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out(w, x), y + u[1]) + u[0].exp() * sum((p**2).sum() for p in w)

    def ul_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fit = F.mse_loss(out(w, x), y + 0.5 * u[1])
        return fit + 0.1 * u[0].exp() * sum((p**2).sum() for p in w)

    return loss, ul_loss


def test_batch_norm_in_train_mode_leaves_the_users_running_statistics_alone():
    """Train mode normalizes with the batch's statistics: the running statistics play no part,
    and the user's module's buffers are never touched by LL runs (the patched model takes a
    copy of them at every run)."""
    model, hyper = bn_net(), Hyper()
    before = buffers(model)
    train, val = regression_data(3)
    ll = GradientDescent(bn_objective, model, hyper, lr=LR, iters=3)
    problem = BilevelProblem(ll, Reverse(bn_ul_objective, hyper, bn_objective, model))
    weights, grads = by_hand(model, hyper, bn_loss(None), bn_ul(None), train, val, 3)
    check_runs(problem, train, val, weights, grads)
    for a, b in zip(buffers(model), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 0


def test_batch_norm_in_eval_mode_uses_the_users_running_statistics():
    model, hyper = bn_net(), Hyper()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.3, -0.5, 0.1, 0.8]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.7]))
    model.eval()
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    train, val = regression_data(3)
    ll = GradientDescent(bn_objective, model, hyper, lr=LR, iters=3)
    problem = BilevelProblem(ll, Reverse(bn_ul_objective, hyper, bn_objective, model))
    weights, grads = by_hand(model, hyper, bn_loss(stats), bn_ul(stats), train, val, 3)
    check_runs(problem, train, val, weights, grads)


def test_running_statistics_of_a_run_start_from_the_users_and_do_not_leak():
    """The LL steps (train mode) move the patched model's running statistics; a UL objective
    that switches it to eval mode sees the statistics of exactly this run's ``iters`` steps,
    starting from the user's module's, at every run (not those of the earlier runs)."""
    model, hyper = bn_net(), Hyper()
    steps = 3
    train, val = regression_data(3)

    def ul_objective(state: dict) -> torch.Tensor:
        state["ll_model"].eval()
        return bn_ul_objective(state)

    # the running statistics after the LL steps, by hand (momentum 0.1, unbiased variance)
    w = [p.detach().clone() for p in model.parameters()]
    u = [p.detach().clone().requires_grad_() for p in hyper.parameters()]
    mean, var = torch.zeros(4, dtype=DTYPE), torch.ones(4, dtype=DTYPE)
    for _ in range(steps):
        h = F.linear(train[0], w[0], w[1])
        mean, var = 0.9 * mean + 0.1 * h.mean(0), 0.9 * var + 0.1 * h.var(0, unbiased=True)
        w = [p.requires_grad_() for p in w]
        grads = torch.autograd.grad(bn_loss(None)(w, u, *train), w)
        w = [(p - LR * g).detach() for p, g in zip(w, grads, strict=True)]
    stats = (mean, var)
    weights, grads = by_hand(model, hyper, bn_loss(None), bn_ul(stats), train, val, steps)
    ll = GradientDescent(bn_objective, model, hyper, lr=LR, iters=steps)
    problem = BilevelProblem(ll, Reverse(ul_objective, hyper, bn_objective, model))
    check_runs(problem, train, val, weights, grads)
    assert model.training and model[1].training  # the user's module is not switched
    assert int(model[1].num_batches_tracked) == 0


# 4. penalties over parameters() / named_parameters() -----------------------------------------


class Gained(nn.Module):
    """A parameter of its own (``gain``) and a body of two layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.gain = nn.Parameter(torch.tensor(1.5, dtype=DTYPE))
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.body(x).squeeze(-1)


PENALTIES: dict[str, tuple[Callable[[nn.Module], list], list[int]]] = {
    # name: (the tensors an objective penalizes, their positions in parameters())
    "parameters": (lambda m: list(m.parameters()), [0, 1, 2, 3, 4]),
    "named_weights": (
        lambda m: [p for n, p in m.named_parameters() if n.endswith("weight")],
        [1, 3],
    ),
    "submodule_parameters": (lambda m: list(m.body[2].parameters()), [3, 4]),
    "submodule_named_biases": (
        lambda m: [p for n, p in m.body.named_parameters() if "bias" in n],
        [2, 4],
    ),
    "own_parameters": (lambda m: list(m.parameters(recurse=False)), [0]),
    "own_named": (lambda m: [p for _, p in m.named_parameters(recurse=False)], [0]),
}


@pytest.mark.parametrize("kind", PENALTIES)
def test_penalties_over_the_patched_models_parameters(kind):
    """``parameters()`` and ``named_parameters()`` of the patched model or of a submodule give
    the fast weights, and the same ones as the user's module (``recurse=False``: its own)."""
    select, index = PENALTIES[kind]
    model, hyper = Gained(), Hyper()
    assert [p for p in select(model)] == [list(model.parameters())[i] for i in index]

    def objective(state: dict) -> torch.Tensor:
        m, u = state["ll_model"], state["ul_model"]
        fit = F.mse_loss(m(state["data"]), state["target"] + u.shift)
        return fit + u.log_c.exp() * sum((p**2).sum() for p in select(m))

    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = w[0] * F.linear(torch.tanh(F.linear(x, w[1], w[2])), w[3], w[4]).squeeze(-1)
        return F.mse_loss(out, y + u[1]) + u[0].exp() * sum((w[i] ** 2).sum() for i in index)

    def ul_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = w[0] * F.linear(torch.tanh(F.linear(x, w[1], w[2])), w[3], w[4]).squeeze(-1)
        return F.mse_loss(out, y)

    train, val = regression_data(3)
    ll = GradientDescent(objective, model, hyper, lr=LR, iters=3)
    problem = BilevelProblem(ll, Reverse(ul_mse, hyper, objective, model))
    weights, grads = by_hand(model, hyper, loss, ul_loss, train, val, 3)
    check_runs(problem, train, val, weights, grads)


def test_the_patched_model_refuses_to_give_earlier_weights():
    """Only the latest fast weights are kept: ``parameters(time=0)`` (``higher``'s initial
    weights, as an iMAML-style proximal term might use them) refuses rather than returning
    the latest weights under another name."""
    model, hyper = Gained(), Hyper()
    train, _ = regression_data(3)

    def objective(state: dict) -> torch.Tensor:
        return F.mse_loss(state["ll_model"](state["data"]), state["target"] + hyper.shift)

    patched = GradientDescent(objective, model, hyper, lr=LR, iters=2).optimize(*train)
    latest = list(patched.parameters())
    assert all(p is q for p, q in zip(latest, patched.parameters(time=-1), strict=True))
    for time in (0, 1):
        with pytest.raises(ValueError, match="latest"):
            list(patched.parameters(time=time))


# 5. recurrent layers (flat weights) ---------------------------------------------------------


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.rnn = cell(3, 4, num_layers=2, batch_first=True).to(DTYPE)
        self.head = nn.Linear(4, 1).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


@pytest.mark.parametrize("direct", [False, True], ids=["whole", "direct"])
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM], ids=["gru", "lstm"])
def test_recurrent_layers_read_the_fast_weights(cell, direct):
    model, hyper = Recurrent(cell), Hyper()
    names = [n for n, _ in model.named_parameters()]

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if direct:
            out, _ = m.rnn(x)
            return m.head(out[:, -1]).squeeze(-1)
        return m(x)

    def objective(state: dict) -> torch.Tensor:
        m, u = state["ll_model"], state["ul_model"]
        fit = F.mse_loss(forward(m, state["data"]), state["target"] + u.shift)
        return fit + u.log_c.exp() * (m.rnn.weight_hh_l1**2).sum()

    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, w, strict=True)), (x,))
        hh = w[names.index("rnn.weight_hh_l1")]
        return F.mse_loss(out, y + u[1]) + u[0].exp() * (hh**2).sum()

    def ul_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(functional_call(model, dict(zip(names, w, strict=True)), (x,)), y)

    g = torch.Generator().manual_seed(6)
    x, y = (
        torch.randn(16, 5, 3, generator=g, dtype=DTYPE),
        torch.randn(16, generator=g, dtype=DTYPE),
    )
    train, val = (x[:8], y[:8]), (x[8:], y[8:])
    check_reverse(objective, ul_mse, model, hyper, (loss, ul_loss), train, val)


# 6. the whole model and a submodule in one objective ----------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.feat = nn.Linear(3, 4).to(DTYPE)
        self.head = nn.Linear(4, 1).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.feat(x))).squeeze(-1)


def net_out(w: Tensors, x: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.tanh(F.linear(x, w[0], w[1])), w[2], w[3]).squeeze(-1)


ORDERS = {
    "whole_then_sub": ("whole", "sub"),
    "sub_then_whole": ("sub", "whole"),
    "sub_whole_sub": ("sub", "whole", "sub"),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method", ["reverse", "finite_difference"])
def test_whole_model_and_submodule_calls_in_either_order(order, method):
    model, hyper = Net(), Hyper()
    calls = ORDERS[order]

    def objective(state: dict) -> torch.Tensor:
        m, u, x = state["ll_model"], state["ul_model"], state["data"]
        total = torch.zeros((), dtype=DTYPE)
        for call in calls:
            if call == "whole":
                total = total + F.mse_loss(m(x), state["target"] + u.shift)
            else:
                total = total + u.log_c.exp() * (m.feat(x) ** 2).mean()
        return total

    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=DTYPE)
        for call in calls:
            if call == "whole":
                total = total + F.mse_loss(net_out(w, x), y + u[1])
            else:
                total = total + u[0].exp() * (F.linear(x, w[0], w[1]) ** 2).mean()
        return total

    train, val = regression_data(3)
    check_method(method, objective, model, hyper, (loss, loss), train, val)


# 7. more: a submodule used twice, hooks, attributes, parametrizations, warm starts ----------


class Reused(nn.Module):
    """One layer called at two places of the network (its weights shared by both)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.layer = nn.Linear(3, 3).to(DTYPE)
        self.body = nn.Sequential(
            nn.Linear(3, 3), nn.Tanh(), self.layer, nn.Tanh(), nn.Linear(3, 1)
        ).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.tanh(self.layer(x))).squeeze(-1)


def fit_objective(state: dict) -> torch.Tensor:
    m, u = state["ll_model"], state["ul_model"]
    fit = F.mse_loss(m(state["data"]), state["target"] + u.shift)
    return fit + u.log_c.exp() * sum((p**2).sum() for p in m.parameters())


def functional_losses(model: nn.Module) -> tuple[Loss, Loss]:
    """The LL loss of :func:`fit_objective` and the UL MSE, through ``functional_call`` on the
    user's module (its hooks, attributes and shared layers as they are)."""
    names = [n for n, _ in model.named_parameters()]

    def out(w: Tensors, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, w, strict=True)), (x,))

    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out(w, x), y + u[1]) + u[0].exp() * sum((p**2).sum() for p in w)

    def ul_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out(w, x), y)

    return loss, ul_loss


def reused_out(w: Tensors, x: torch.Tensor) -> torch.Tensor:
    """``w`` = layer.weight, layer.bias, body.0.weight, body.0.bias, body.4.weight, body.4.bias."""
    h = torch.tanh(F.linear(x, w[0], w[1]))
    h = torch.tanh(F.linear(torch.tanh(F.linear(h, w[2], w[3])), w[0], w[1]))
    return F.linear(h, w[4], w[5]).squeeze(-1)


def test_a_submodule_used_at_two_places():
    """A layer registered twice (``self.layer`` and ``self.body[2]``) is one set of fast
    weights, and the patched model (which holds a copy per place) runs at all."""
    model, hyper = Reused(), Hyper()
    assert len(list(model.parameters())) == 6

    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(reused_out(w, x), y + u[1]) + u[0].exp() * sum((p**2).sum() for p in w)

    def ul_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(reused_out(w, x), y)

    train, val = regression_data(3)
    check_reverse(fit_objective, ul_mse, model, hyper, (loss, ul_loss), train, val)


def ul_fit_and_penalty(state: dict) -> torch.Tensor:
    """A UL loss with a direct path to both UL variables (so that no UL variable is left
    without a hypergradient, which the library would refuse loudly, whatever the LL does)."""
    m, u = state["ll_model"], state["ul_model"]
    fit = F.mse_loss(m(state["data"]), state["target"] + 0.5 * u.shift)
    return fit + 0.1 * u.log_c.exp() * sum((p**2).sum() for p in m.parameters())


def test_forward_hooks_of_the_users_module_run_on_the_patched_model():
    """A forward pre-hook that scales a layer's input and a forward hook that shifts the
    output: the patched model is the user's model, hooks included (``higher`` copies no
    hooks; without them the hypergradient came out with the wrong sign)."""
    model, hyper = Net(), Hyper()
    model.feat.register_forward_pre_hook(lambda m, args: (0.5 * args[0],))
    model.head.register_forward_hook(lambda m, args, out: out + 0.25)

    def out(w: Tensors, x: torch.Tensor) -> torch.Tensor:
        return (F.linear(torch.tanh(F.linear(0.5 * x, w[0], w[1])), w[2], w[3]) + 0.25).squeeze(-1)

    loss, ul_loss = fit_and_penalty(out)

    train, val = regression_data(3)
    check_reverse(fit_objective, ul_fit_and_penalty, model, hyper, (loss, ul_loss), train, val)


def test_a_hook_that_keeps_features_for_the_objective():
    """Features kept by a forward hook are those of the objective's own call of the patched
    model, not those of the user's last call of the module."""
    model, hyper = Net(), Hyper()
    kept: dict[str, torch.Tensor] = {}
    model.feat.register_forward_hook(lambda m, args, out: kept.__setitem__("feat", out))

    def objective(state: dict) -> torch.Tensor:
        m, u = state["ll_model"], state["ul_model"]
        fit = F.mse_loss(m(state["data"]), state["target"] + u.shift)
        return fit + u.log_c.exp() * (kept["feat"] ** 2).mean()  # from this call's hook

    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feat = F.linear(x, w[0], w[1])
        return F.mse_loss(net_out(w, x), y + u[1]) + u[0].exp() * (feat**2).mean()

    def ul_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(net_out(w, x), y)

    train, val = regression_data(3)
    model(train[0])  # the user looked at the model once: the hook kept the user's features
    check_reverse(objective, ul_mse, model, hyper, (loss, ul_loss), train, val)


def test_a_compiled_module_runs_at_the_fast_weights():
    """``module.compile()`` keeps a compiled call of the user's module in the module: copied
    into the patched model (as ``higher`` copies every attribute) it would run the user's
    weights. The patched model runs uncompiled."""
    model, hyper = Net(), Hyper()
    model.compile(backend="eager")  # (never traced here: the patched model does not call it)

    loss, ul_loss = fit_and_penalty(net_out)

    train, val = regression_data(3)
    check_reverse(fit_objective, ul_fit_and_penalty, model, hyper, (loss, ul_loss), train, val)


def test_pruned_layers_read_the_fast_weights_through_their_mask():
    """``torch.nn.utils.prune`` computes ``weight = weight_orig * mask`` in a forward pre-hook:
    on the patched model too, from the fast ``weight_orig``."""
    model, hyper = Net(), Hyper()
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=DTYPE)
    prune.custom_from_mask(model.feat, "weight", mask)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["feat.bias", "feat.weight_orig", "head.weight", "head.bias"]

    def out(w: Tensors, x: torch.Tensor) -> torch.Tensor:
        return net_out([w[1] * mask, w[0], w[2], w[3]], x)

    def loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out(w, x), y + u[1]) + u[0].exp() * sum((p**2).sum() for p in w)

    def ul_loss(w: Tensors, u: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out(w, x), y)

    train, val = regression_data(3)
    check_reverse(fit_objective, ul_mse, model, hyper, (loss, ul_loss), train, val)


class Tempered(Net):
    """A plain attribute (not a parameter or buffer) that the forward reads."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.feat(x) / self.temperature)).squeeze(-1)


def test_attributes_changed_between_runs_reach_the_patched_model():
    """A temperature annealed between runs (or a dropout rate, a slope): each run sees the
    user's module as it is, as a freshly patched copy would."""
    model, hyper = Tempered(), Hyper()
    train, val = regression_data(3)
    ll = GradientDescent(fit_objective, model, hyper, lr=LR, iters=3)
    problem = BilevelProblem(ll, Reverse(ul_mse, hyper, fit_objective, model))
    for temperature in (1.0, 0.5, 2.0):
        model.temperature = temperature
        loss, ul_loss = functional_losses(model)
        weights, grads = by_hand(model, hyper, loss, ul_loss, train, val, 3)
        check_runs(problem, train, val, weights, grads)


def test_weight_normalized_layers_through_parametrizations():
    """``torch.nn.utils.parametrizations.weight_norm``: the fast weights are the magnitude and
    direction, and the layer's weight is computed from them at every call. Where this
    PyTorch's ``torch._weight_norm`` has wrong second derivatives (2.13 on CPU: it fails
    gradgradcheck), Reverse, which differentiates the LL gradient, refuses the model: the
    reference below goes through the same kernel, so it would agree with a wrong answer."""
    model, hyper = Net(), Hyper()
    parametrizations.weight_norm(model.feat)
    train, val = regression_data(3)
    loss, ul_loss = functional_losses(model)
    if _weight_norm_second_derivatives_right():
        check_reverse(fit_objective, ul_mse, model, hyper, (loss, ul_loss), train, val)
    else:
        with pytest.raises(ValueError, match="uses weight_norm, whose second derivatives"):
            check_reverse(fit_objective, ul_mse, model, hyper, (loss, ul_loss), train, val)


class Attention(nn.Module):
    """Multi-head attention reads its output projection's weights without calling it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True).to(DTYPE)
        self.head = nn.Linear(4, 1).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0].mean(1)).squeeze(-1)


class Containers(nn.Module):
    """Weights in a ``ParameterList`` and a ``ParameterDict``, read by index and key."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.ws = nn.ParameterList(
            [nn.Parameter(0.5 * torch.randn(3, 3, dtype=DTYPE)), nn.Parameter(torch.ones(1, 3))]
        )
        self.bs = nn.ParameterDict(
            {"a": nn.Parameter(torch.zeros(3, dtype=DTYPE)), "b": nn.Parameter(torch.zeros(1))}
        )
        self.to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, self.ws[0], self.bs["a"]))
        return F.linear(h, self.ws[1], self.bs["b"]).squeeze(-1)


@pytest.mark.parametrize("kind", ["attention", "containers"])
def test_weights_read_without_a_call(kind):
    """Layers that read a child's weights as attributes (``out_proj`` of attention) and
    parameter containers see the fast weights."""
    model, hyper = (Attention() if kind == "attention" else Containers()), Hyper()
    if kind == "attention":
        g = torch.Generator().manual_seed(6)
        x = torch.randn(16, 5, 4, generator=g, dtype=DTYPE)
        y = torch.randn(16, generator=g, dtype=DTYPE)
        train, val = (x[:8], y[:8]), (x[8:], y[8:])
    else:
        train, val = regression_data(3)
    loss, ul_loss = functional_losses(model)
    check_reverse(fit_objective, ul_mse, model, hyper, (loss, ul_loss), train, val)


def test_warm_starts_from_weights_written_into_the_users_module():
    """Copying each run's LL result into the user's module (a warm start): every run starts
    from the module's current weights."""
    model, hyper = Net(), Hyper()
    train, val = regression_data(3)
    ll = GradientDescent(fit_objective, model, hyper, lr=LR, iters=2)
    problem = BilevelProblem(ll, Reverse(ul_mse, hyper, fit_objective, model))
    loss, ul_loss = functional_losses(model)
    for _ in range(RUNS):
        weights, grads = by_hand(model, hyper, loss, ul_loss, train, val, 2)
        (grad_c, grad_shift) = problem.hypergradient(train, val)
        torch.testing.assert_close(grad_c, grads[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_shift, grads[1], rtol=1e-10, atol=1e-12)
        trajectory = ll.run(*train, differentiable_steps=0)
        with torch.no_grad():
            for p, w in zip(model.parameters(), trajectory.weights, strict=True):
                p.copy_(w)
        ll.release(trajectory.model)
        for p, w in zip(model.parameters(), weights, strict=True):
            torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


class Activated(Net):
    """A network whose activation is a submodule (that a user may swap)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.feat(x))).squeeze(-1)


def test_a_submodule_replaced_by_a_new_one_of_the_same_kind():
    """A head replaced by a fresh layer between runs (a new head per task): each run starts
    from the new layer's weights."""
    model, hyper = Activated(), Hyper()
    train, val = regression_data(3)
    ll = GradientDescent(fit_objective, model, hyper, lr=LR, iters=3)
    problem = BilevelProblem(ll, Reverse(ul_mse, hyper, fit_objective, model))
    for seed in range(RUNS):
        torch.manual_seed(seed)
        model.head = nn.Linear(4, 1).to(DTYPE)
        loss, ul_loss = functional_losses(model)
        weights, grads = by_hand(model, hyper, loss, ul_loss, train, val, 3)
        check_runs(problem, train, val, weights, grads)


def test_a_submodule_replaced_by_another_kind_is_patched_again():
    """The patched copy keeps the classes it was made with: a swapped activation would be
    run as the old one (silently, in an earlier version); the LL optimizer now sees the
    change and patches the model again."""
    model, hyper = Activated(), Hyper()
    train, val = regression_data(3)
    ll = GradientDescent(fit_objective, model, hyper, lr=LR, iters=3)
    problem = BilevelProblem(ll, Reverse(ul_mse, hyper, fit_objective, model))
    problem.hypergradient(train, val)
    model.act = nn.Softsign()
    loss, ul_loss = functional_losses(model)
    weights, grads = by_hand(model, hyper, loss, ul_loss, train, val, 3)
    check_runs(problem, train, val, weights, grads)


def test_sync_from_refuses_a_copy_of_another_structure():
    """What makes the LL optimizer patch again: the copy's classes and parameter names are
    checked against the user's module at every run."""
    model = Activated()
    copy = patch(model)
    model.act = nn.Softsign()
    with pytest.raises(ModelChanged, match="changed since the LL optimizer patched it"):
        sync_from(model, copy)


def test_calling_the_patched_model_with_params_is_refused():
    """``higher``'s ``fmodel(x, params=...)`` would replace the LL run's fast weights with the
    caller's, silently: the objective is refused with the cure."""
    model, hyper = Net(), Hyper()
    train, _ = regression_data(3)

    def objective(state: dict) -> torch.Tensor:
        m = state["ll_model"]
        other = [2 * w for w in m.parameters()]
        return F.mse_loss(m(state["data"], params=other).squeeze(-1), state["target"])

    ll = GradientDescent(objective, model, hyper, lr=LR, iters=2)
    with pytest.raises(TypeError, match="that would replace the fast weights"):
        ll.optimize(*train)
