"""The hypergradient methods of the method-families issue on LL / UL models of unusual but
legitimate structure, in float64, against hand-written references.

Structures: (a) a frozen LL parameter beside trainable ones, and parameters frozen or
unfrozen between consecutive runs; (b) ``ll_model is ul_model`` (MAML: the initial weights
are the UL variables); (c) a UL model that holds the LL model as a submodule (a learned
initialization beside a hyperparameter), and UL models that share only some tensors with the
LL model; (d) parameters of several shapes and layouts (0-d, matrix, a transposed view
registered as a parameter, a channels-last convolution weight); (e) consecutive UL steps
through ``BilevelProblem.step`` with a UL optimizer in between, so that whatever the library
keeps from run to run (plans, spare patched models, method state) is exercised.

Methods: BDA with Reverse / Truncated, PTT, FiniteDifference (one step: Reverse's answer to
O(r^2)), IGA, DM, MemorySavingReverse (Reverse to round-off), Reptile, Meta-SGD step sizes,
StochasticImplicit (full batch: a truncated series, exactly), FixedPointMap with Implicit and
Reverse, Implicit with damping.

References are written on plain tensors with ``torch.autograd`` (an explicit unroll, dense
Hessians and solves); approximations are pinned by the property that defines them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import BDA, FixedPointMap, GradientDescent
from bilevel.ul import (
    DM,
    IGA,
    PTT,
    FiniteDifference,
    Implicit,
    MemorySavingReverse,
    Reptile,
    Reverse,
    StochasticImplicit,
    Truncated,
)

DTYPE = torch.float64
LR = 0.25
UL_LR = 0.05
T = 5  # not 3 or 4: a (3,) or (4,) step size would also read as a per-step schedule
Tensors = list[torch.Tensor]
#: ``loss(W, U, x, y)``: ``W`` the LL weights in ``ll_model.parameters()`` order, ``U`` the UL
#: parameters in the order of the method's ``ul_params``
Loss = Callable[[Tensors, Tensors, Any, Any], torch.Tensor]
BDA_OPTIONS = {"alpha": 0.5, "alpha_decay": 0.7, "ul_scale": 1.5}


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).mean()


def regression(seed: int, n: int = 10, d: int = 3) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    x, xv = (torch.randn(n, d, generator=g, dtype=DTYPE) for _ in range(2))
    y, yv = (torch.randn(n, generator=g, dtype=DTYPE) for _ in range(2))
    return (x, y), (xv, yv)


@dataclass
class Case:
    """One structure: the user's modules and objectives, and the same objectives written on
    plain tensors (``f`` for the LL, ``F`` for the UL)."""

    ll_model: nn.Module
    ul_model: nn.Module
    ll_objective: Callable[[dict], torch.Tensor]
    ul_objective: Callable[[dict], torch.Tensor]
    f: Loss
    F: Loss
    train: tuple
    val: tuple
    #: the ``lr`` given to the LL optimizer
    lr: Any = LR
    #: by hand: ``U -> {id(LL parameter): step size}`` (default: ``LR`` for all)
    hand_lr: Callable[[Tensors], dict[int, Any]] | None = None

    def ll(self, iters: int = T, bda: bool = False, **options: Any) -> GradientDescent:
        """The LL optimizer: plain gradient descent, or BDA with ``BDA_OPTIONS``."""
        if bda:
            return BDA(
                self.ll_objective,
                self.ll_model,
                self.ul_model,
                lr=self.lr,
                iters=iters,
                ul_objective=self.ul_objective,
                **BDA_OPTIONS,
                **options,
            )
        return GradientDescent(
            self.ll_objective, self.ll_model, self.ul_model, lr=self.lr, iters=iters, **options
        )

    def method(self, cls: type, **options: Any) -> Any:
        """A UL method on this structure."""
        return cls(self.ul_objective, self.ul_model, self.ll_objective, self.ll_model, **options)

    def problem(self, cls: type, iters: int = T, bda: bool = False, **options: Any):
        """The runner, with SGD (``UL_LR``) over the method's UL parameters."""
        ul = self.method(cls, **options)
        optimizer = torch.optim.SGD(ul.ul_params, lr=UL_LR)
        return BilevelProblem(self.ll(iters, bda), ul, optimizer)


# ------------------------------------------------------------------------ the references


def start(case: Case, ul_params: list[nn.Parameter]) -> tuple[Tensors, Tensors, list[bool]]:
    """Leaves ``U`` at the UL parameters' values, and the LL's starting weights ``W``: a
    clone of the ``U`` leaf where a UL parameter IS the (trainable) LL parameter (an
    initialization)."""
    U = [p.detach().clone().requires_grad_() for p in ul_params]
    position = {id(p): i for i, p in enumerate(ul_params)}
    W, trainable = [], []
    for p in case.ll_model.parameters():
        trainable.append(p.requires_grad)
        if id(p) in position and p.requires_grad:  # a clone: a step's gradient in the
            W.append(U[position[id(p)]].clone())  # weight must not see U's own uses
        else:
            W.append(p.detach().clone().requires_grad_(p.requires_grad))
    return U, W, trainable


def step_sizes(case: Case, U: Tensors) -> list[Any]:
    """One step size per LL parameter (by identity, whatever is trainable now)."""
    table = {} if case.hand_lr is None else case.hand_lr(U)
    return [table.get(id(p), LR) for p in case.ll_model.parameters()]


def unroll(
    case: Case,
    U: Tensors,
    W: Tensors,
    trainable: list[bool],
    iters: int,
    graph: Callable[[int], bool] = lambda k: True,
    bda: bool = False,
) -> list[Tensors]:
    """``iters`` gradient steps ``w - lr * grad``; a step without ``graph(k)`` sees the UL
    variables and its input as constants (as the library's steps without a graph do).
    BDA: the direction is that of ``(1 - a_k) f + a_k * s * F`` (``F`` on the UL batch).
    Returns the iterates ``W_1 .. W_iters``."""
    iterates = []
    for k in range(iters):
        keep = graph(k)
        Uk = U if keep else [u.detach() for u in U]
        if not keep:
            W = [w.detach().requires_grad_(t) for w, t in zip(W, trainable, strict=True)]
        lrs = step_sizes(case, Uk)
        if not keep:
            lrs = [lr.detach() if isinstance(lr, torch.Tensor) else lr for lr in lrs]
        loss = case.f(W, Uk, *case.train)
        if bda:
            a = BDA_OPTIONS["alpha"] * BDA_OPTIONS["alpha_decay"] ** k
            loss = (1 - a) * loss + a * BDA_OPTIONS["ul_scale"] * case.F(W, Uk, *case.val)
        active = [w for w, t in zip(W, trainable, strict=True) if t]
        grads = iter(torch.autograd.grad(loss, active, create_graph=keep))
        W = [w - lr * next(grads) if t else w for w, t, lr in zip(W, trainable, lrs, strict=True)]
        if not keep:
            W = [w.detach().requires_grad_(t) for w, t in zip(W, trainable, strict=True)]
        iterates.append(W)
    return iterates


def grads_or_zeros(loss: torch.Tensor, inputs: Tensors, **options: Any) -> Tensors:
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, **options)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def hand_reverse(
    case: Case,
    ul_params: list[nn.Parameter],
    iters: int = T,
    keep_last: int | None = None,
    bda: bool = False,
    worst: bool = False,
) -> Tensors:
    """Back-propagation through the unroll (``keep_last``: only the last K steps; ``worst``:
    from the iterate with the largest UL loss, PTT)."""
    U, W, trainable = start(case, ul_params)
    graph = (lambda k: True) if keep_last is None else (lambda k: k >= iters - keep_last)
    iterates = unroll(case, U, W, trainable, iters, graph, bda)
    losses = [case.F(w, U, *case.val) for w in iterates]
    chosen = int(torch.stack([v.detach() for v in losses]).argmax()) if worst else -1
    return grads_or_zeros(losses[chosen], U)


def final_weights(case: Case, ul_params: list[nn.Parameter], iters: int = T, bda: bool = False):
    """``U``, the LL run's last weights as new leaves, and which are trainable."""
    U, W, trainable = start(case, ul_params)
    (W,) = unroll(case, U, W, trainable, iters, graph=lambda k: False, bda=bda)[-1:]
    W = [w.detach().requires_grad_(t) for w, t in zip(W, trainable, strict=True)]
    return U, W, trainable


def dense_hessian(g: Tensors, active: Tensors) -> torch.Tensor:
    flat = torch.cat([t.reshape(-1) for t in g])
    rows = [grads_or_zeros(flat[i], active, retain_graph=True) for i in range(len(flat))]
    return torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])


def flat(tensors: Tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: Tensors) -> Tensors:
    out, i = [], 0
    for x in like:
        out.append(vector[i : i + x.numel()].reshape(x.shape))
        i += x.numel()
    return out


def implicit_parts(case: Case, U: Tensors, W: Tensors, trainable: list[bool]):
    """At the weights ``W``: the UL loss's gradients in ``U`` and the active weights, the LL
    gradient ``g`` (with its graph) and the dense Hessian ``H``."""
    active = [w for w, t in zip(W, trainable, strict=True) if t]
    loss = case.F(W, U, *case.val)
    direct = grads_or_zeros(loss, U, retain_graph=True)
    v = flat(grads_or_zeros(loss, active))
    g = torch.autograd.grad(case.f(W, U, *case.train), active, create_graph=True)
    return direct, v, list(g), dense_hessian(list(g), active), active


def minus_cross(direct: Tensors, g: Tensors, q: torch.Tensor, U: Tensors) -> Tensors:
    """``direct - (dg/dU)^T q``."""
    cross = grads_or_zeros(flat(g) @ q, U, retain_graph=True)
    return [d - c for d, c in zip(direct, cross, strict=True)]


def hand_implicit(case: Case, ul_params, iters: int = T, damping: float = 0.0) -> Tensors:
    """``grad_U F - (dg/dU)^T (H + damping I)^-1 grad_w F`` at the LL run's last weights."""
    U, W, trainable = final_weights(case, ul_params, iters)
    direct, v, g, H, _ = implicit_parts(case, U, W, trainable)
    q = torch.linalg.solve(H + damping * torch.eye(len(v), dtype=DTYPE), v)
    return minus_cross(direct, g, q, U)


def hand_series(case: Case, ul_params, steps: int, alpha: float, iters: int = T) -> Tensors:
    """The implicit formula with ``q`` after ``steps`` steps of ``q <- q - alpha (H q - v)``
    from ``q = 0`` (SGD on the quadratic, full batch)."""
    U, W, trainable = final_weights(case, ul_params, iters)
    direct, v, g, H, _ = implicit_parts(case, U, W, trainable)
    q = torch.zeros_like(v)
    for _ in range(steps):
        q = q - alpha * (H @ q - v)
    return minus_cross(direct, g, q, U)


def hand_iga(case: Case, ul_params, iters: int = T) -> Tensors:
    """``grad_U F - c grad_U f``, ``c = <grad_w F, grad_w f> / ||grad_w f||^2``."""
    U, W, trainable = final_weights(case, ul_params, iters)
    active = [w for w, t in zip(W, trainable, strict=True) if t]
    ul = grads_or_zeros(case.F(W, U, *case.val), [*U, *active])
    ll = grads_or_zeros(case.f(W, U, *case.train), [*U, *active])
    n = len(U)
    c = flat(ul[n:]) @ flat(ll[n:]) / flat(ll[n:]).pow(2).sum()
    return [a - c * b for a, b in zip(ul[:n], ll[:n], strict=True)]


def hand_reptile(case: Case, ul_params, iters: int = T) -> Tensors:
    """``theta - w_T`` for the UL parameters (all of them LL weights)."""
    U, W, _ = final_weights(case, ul_params, iters)
    index = {id(p): i for i, p in enumerate(case.ll_model.parameters())}
    return [u.detach() - W[index[id(p)]].detach() for u, p in zip(U, ul_params, strict=True)]


# ---------------------------------------------------------------------- running the library


def close(got: Tensors, expected: Tensors, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def consecutive(
    problem: BilevelProblem,
    case: Case,
    reference: Callable[[], Tensors],
    runs: int = 2,
    between: Callable[[int], None] | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> None:
    """``runs`` UL steps: each hypergradient against ``reference()`` at the current UL point,
    and what ``step`` (SGD) applies; ``between(run)`` may change the models before a run."""
    params = problem.ul_params
    for run in range(runs):
        if between is not None:
            between(run)
        expected = reference()
        assert any(float(e.abs().max()) > 1e-6 for e in expected)  # not a vacuous zero
        close(problem.hypergradient(case.train, case.val), expected, rtol, atol)
        before = [p.detach().clone() for p in params]
        problem.step(case.train, case.val)
        moved = [b - UL_LR * e for b, e in zip(before, expected, strict=True)]
        close([p.detach() for p in params], moved, rtol, atol)


def refused(case: Case, build: Callable[[], BilevelProblem], match: str) -> None:
    """The structure is refused with a clear error, when the problem is built or at its
    first hypergradient (never a number)."""
    with pytest.raises(ValueError, match=match):
        build().hypergradient(case.train, case.val)


# ---------------------------------------------------------------------------- the structures


class Hyper(nn.Module):
    """UL variables: a penalty strength on a log scale and a shift of the LL targets."""

    def __init__(self, log_c: float = -0.5) -> None:
        super().__init__()
        self.log_c = nn.Parameter(torch.tensor(log_c, dtype=DTYPE))
        self.shift = nn.Parameter(torch.tensor(0.3, dtype=DTYPE))


def penalized(out: Callable[[Tensors, Any], torch.Tensor], ul_weight: int) -> tuple[Loss, Loss]:
    """By hand: the LL loss ``mse(out, y + shift) + exp(log_c) sum ||w||^2`` and the UL loss
    ``mse(out, y) + 0.1 exp(log_c) ||w[ul_weight]||^2``."""

    def f(W: Tensors, U: Tensors, x: Any, y: torch.Tensor) -> torch.Tensor:
        return mse(out(W, x), y + U[1]) + U[0].exp() * sum(w.pow(2).sum() for w in W)

    def F_(W: Tensors, U: Tensors, x: Any, y: torch.Tensor) -> torch.Tensor:
        return mse(out(W, x), y) + 0.1 * U[0].exp() * W[ul_weight].pow(2).sum()

    return f, F_


def penalized_objectives(names: list[str], ul_weight: str) -> tuple[Callable, Callable]:
    """The same objectives for the library, reading the weights as attributes of the model."""

    def weight(model: nn.Module, name: str) -> torch.Tensor:
        for part in name.split("."):
            model = getattr(model, part)
        return model

    def ll_objective(state: dict) -> torch.Tensor:
        m, u = state["ll_model"], state["ul_model"]
        penalty = sum(weight(m, n).pow(2).sum() for n in names)
        return mse(m(state["data"]), state["target"] + u.shift) + u.log_c.exp() * penalty

    def ul_objective(state: dict) -> torch.Tensor:
        m, u = state["ll_model"], state["ul_model"]
        fit = mse(m(state["data"]), state["target"])
        return fit + 0.1 * u.log_c.exp() * weight(m, ul_weight).pow(2).sum()

    return ll_objective, ul_objective


class FrozenNet(nn.Module):
    """(a) Trainable ``a``, ``b`` and a 0-d ``c``, with a frozen feature scale ``s`` between
    them (registered in the order a, s, b, c)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -0.2, 0.3], dtype=DTYPE))
        self.s = nn.Parameter(torch.tensor([0.8, -0.6, 1.1], dtype=DTYPE), requires_grad=False)
        self.b = nn.Parameter(torch.tensor([0.1, 0.4, -0.3], dtype=DTYPE))
        self.c = nn.Parameter(torch.tensor(0.05, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_out([self.a, self.s, self.b, self.c], x)


def frozen_out(W: Tensors, x: torch.Tensor) -> torch.Tensor:
    a, s, b, c = W
    return torch.tanh(x @ a) + torch.tanh(x * s) @ b + c


def frozen_case(lr: Any = LR, hand_lr: Any = None) -> Case:
    model, hyper = FrozenNet(), Hyper()
    ll_objective, ul_objective = penalized_objectives(["a", "s", "b", "c"], "b")
    f, F_ = penalized(frozen_out, 2)
    return Case(model, hyper, ll_objective, ul_objective, f, F_, *regression(1), lr, hand_lr)


def toggle_frozen(case: Case) -> Callable[[int], None]:
    """Between runs: run 0 as built (``s`` frozen); run 1 ``b`` frozen too; run 2 ``s``
    trainable and ``b`` frozen (the trainable set changes at every run)."""
    model = case.ll_model

    def between(run: int) -> None:
        if run == 1:
            model.b.requires_grad_(False)
        elif run == 2:
            model.s.requires_grad_(True)

    return between


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)


def mlp_out(W: Tensors, x: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x @ W[0].T + W[1]) @ W[2].T + W[3]).squeeze(-1)


def fit(state: dict) -> torch.Tensor:
    return mse(state["ll_model"](state["data"]).squeeze(-1), state["target"])


def mlp_fit(W: Tensors, U: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return mse(mlp_out(W, x), y)


def maml_case(freeze_bias: bool = False) -> Case:
    """(b) ``ll_model is ul_model``; ``freeze_bias``: the first layer's bias frozen (neither
    a UL variable nor trained)."""
    net = mlp(2)
    if freeze_bias:
        net[0].bias.requires_grad_(False)
    return Case(net, net, fit, fit, mlp_fit, mlp_fit, *regression(3))


class WithInit(nn.Module):
    """(c) A log-scale L2 strength and the LL module itself (its start is learned)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))
        self.net = net


def init_case() -> Case:
    net = mlp(4)
    outer = WithInit(net)

    def ll_objective(state: dict) -> torch.Tensor:
        penalty = sum(p.pow(2).sum() for p in state["ll_model"].parameters())
        return fit(state) + 0.5 * state["ul_model"].log_l2.exp() * penalty

    def f(W: Tensors, U: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse(mlp_out(W, x), y) + 0.5 * U[0].exp() * sum(w.pow(2).sum() for w in W)

    return Case(net, outer, ll_objective, fit, f, mlp_fit, *regression(5))


class Partial(nn.Module):
    """(c) A UL model sharing SOME tensors with the LL: the first layer of the LL network (a
    learned start for it; the head starts from its own weights) and a penalty strength."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.log_c = nn.Parameter(torch.tensor(-1.5, dtype=DTYPE))
        self.trunk = trunk


def partial_case() -> Case:
    """Both objectives also read the shared first-layer weight directly (the LL pulls the
    fast weight towards it; the UL penalizes it): its hypergradient has a path through the
    start and paths through the objectives, which must add up."""
    net = mlp(6)
    outer = Partial(net[0])

    def ll_objective(state: dict) -> torch.Tensor:
        m, u = state["ll_model"], state["ul_model"]
        pull = (m[0].weight - u.trunk.weight).pow(2).sum()
        return fit(state) + u.log_c.exp() * (m[2].weight.pow(2).sum() + pull)

    def ul_objective(state: dict) -> torch.Tensor:
        return fit(state) + 0.05 * state["ul_model"].trunk.weight.pow(2).sum()

    def f(W: Tensors, U: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pull = (W[0] - U[1]).pow(2).sum()
        return mse(mlp_out(W, x), y) + U[0].exp() * (W[2].pow(2).sum() + pull)

    def F_(W: Tensors, U: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse(mlp_out(W, x), y) + 0.05 * U[1].pow(2).sum()

    return Case(net, outer, ll_objective, ul_objective, f, F_, *regression(7))


def sub_ul_case() -> Case:
    """(c) The UL model is a submodule of the LL model (its first layer): the head is not a
    UL variable."""
    net = mlp(8)
    return Case(net, net[0], fit, fit, mlp_fit, mlp_fit, *regression(9))


class Shapes(nn.Module):
    """(d) A 0-d gain, a matrix, a transposed view registered as a parameter (not
    contiguous), and a convolution whose weight is channels-last."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.gain = nn.Parameter(torch.tensor(0.9, dtype=DTYPE))
        self.mix = nn.Parameter(0.5 * torch.randn(3, 3, generator=g, dtype=DTYPE))
        self.proj = nn.Parameter(0.5 * torch.randn(2, 3, generator=g, dtype=DTYPE).t())
        torch.manual_seed(11)
        self.conv = nn.Conv2d(2, 3, 2).to(DTYPE).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).mean((2, 3))
        return self.gain * (torch.tanh(h @ self.mix) @ self.proj).sum(-1)


def shapes_out(W: Tensors, x: torch.Tensor) -> torch.Tensor:
    gain, mix, proj, weight, bias = W
    h = torch.tanh(F.conv2d(x, weight, bias)).mean((2, 3))
    return gain * (torch.tanh(h @ mix) @ proj).sum(-1)


def images(seed: int, n: int = 8) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    x, xv = (torch.randn(n, 2, 4, 4, generator=g, dtype=DTYPE) for _ in range(2))
    y, yv = (torch.randn(n, generator=g, dtype=DTYPE) for _ in range(2))
    return (x, y), (xv, yv)


def shapes_case(ul_model: nn.Module | None = None, **options: Any) -> Case:
    model = Shapes()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["gain", "mix", "proj", "conv.weight", "conv.bias"]
    assert model.gain.ndim == 0 and not model.proj.is_contiguous()
    weight = model.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    ll_objective, ul_objective = penalized_objectives(names, "mix")
    f, F_ = penalized(shapes_out, 1)
    hyper = Hyper(log_c=-0.7) if ul_model is None else ul_model
    return Case(model, hyper, ll_objective, ul_objective, f, F_, *images(12), **options)


class MetaSGD(nn.Module):
    """Meta-SGD: the initialization (the LL network) and a per-element log step size for each
    of its weights."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.log_lr = nn.ParameterList(
            [
                nn.Parameter(torch.full_like(p.detach(), -1.5) + 0.1 * p.detach())
                for p in net.parameters()
            ]
        )


def meta_sgd_case() -> Case:
    """(b)+(c) Meta-SGD on the MLP: lr is a list of callables of the UL model."""
    net = mlp(13)
    meta = MetaSGD(net)
    names = [n for n, _ in meta.named_parameters()]
    assert names[:4] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    lr = [lambda ul, i=i: ul.log_lr[i].exp() for i in range(4)]

    def hand_lr(U: Tensors) -> dict[int, Any]:
        return {id(p): U[4 + i].exp() for i, p in enumerate(net.parameters())}

    return Case(net, meta, fit, fit, mlp_fit, mlp_fit, *regression(14), lr, hand_lr)


class ShapesHyper(Hyper):
    """The penalty and shift, and one per-element step size per weight of :class:`Shapes`
    (UL leaves given to the LL as they are), in the weights' own layouts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(log_c=-0.7)
        self.lrs = nn.ParameterList(
            [
                nn.Parameter(torch.empty_like(p, memory_format=torch.preserve_format).fill_(0.2))
                for p in model.parameters()
            ]
        )
        with torch.no_grad():
            for i, lr in enumerate(self.lrs):
                lr.add_(0.01 * torch.arange(lr.numel(), dtype=DTYPE).reshape(lr.shape) / (i + 1))


def shapes_lr_case() -> Case:
    """(d) Per-element step sizes that are UL leaves, shaped (and laid out) as the weights."""
    case = shapes_case()
    hyper = ShapesHyper(case.ll_model)
    assert not hyper.lrs[2].is_contiguous() and not hyper.lrs[3].is_contiguous()
    params = list(case.ll_model.parameters())

    def hand_lr(U: Tensors) -> dict[int, Any]:
        return {id(p): U[2 + i] for i, p in enumerate(params)}

    case.ul_model, case.lr, case.hand_lr = hyper, list(hyper.lrs), hand_lr
    return case


def imaml_case() -> Case:
    """(a)+(b) iMAML with ``ll_model is ul_model``: the LL objective pulls the fast weights
    towards the module's own (the UL variables); the first layer's bias is frozen."""
    net = mlp(15)
    net[0].bias.requires_grad_(False)
    reg = 2.0

    def ll_objective(state: dict) -> torch.Tensor:
        fast, slow = state["ll_model"].parameters(), state["ul_model"].parameters()
        pull = sum((p - q).pow(2).sum() for p, q in zip(fast, slow, strict=True))
        return fit(state) + 0.5 * reg * pull

    def f(W: Tensors, U: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        active = [W[0], W[2], W[3]]  # the frozen bias W[1] has no UL variable (and no pull)
        pull = sum((w - u).pow(2).sum() for w, u in zip(active, U, strict=True))
        return mse(mlp_out(W, x), y) + 0.5 * reg * pull

    return Case(net, net, ll_objective, fit, f, mlp_fit, *regression(16))


def shapes_fit(state: dict) -> torch.Tensor:
    m = state["ll_model"]
    return mse(m(state["data"]), state["target"]) + 0.1 * m.mix.pow(2).sum()


def shapes_fit_by_hand(W: Tensors, U: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return mse(shapes_out(W, x), y) + 0.1 * W[1].pow(2).sum()


def shapes_maml_case() -> Case:
    """(b)+(d) MAML on the odd-shaped model: the 0-d, matrix, transposed-view and
    channels-last weights are all initial weights."""
    model = shapes_case().ll_model
    f = shapes_fit_by_hand
    return Case(model, model, shapes_fit, shapes_fit, f, f, *images(18))


def shapes_meta_sgd_case() -> Case:
    """(b)+(c)+(d) Meta-SGD on the odd-shaped model: per-element log step sizes laid out
    as their weights (``full_like`` keeps the layout), given as callables."""
    case = shapes_maml_case()
    net = case.ll_model
    meta = MetaSGD(net)
    assert meta.log_lr[3].is_contiguous(memory_format=torch.channels_last)
    assert not meta.log_lr[2].is_contiguous()
    lr = [lambda ul, i=i: ul.log_lr[i].exp() for i in range(5)]

    def hand_lr(U: Tensors) -> dict[int, Any]:
        return {id(p): U[5 + i].exp() for i, p in enumerate(net.parameters())}

    case.ul_model, case.lr, case.hand_lr = meta, lr, hand_lr
    return case


CASES = {
    "frozen": frozen_case,
    "maml": maml_case,
    "maml_frozen": lambda: maml_case(freeze_bias=True),
    "init": init_case,
    "partial": partial_case,
    "sub_ul": sub_ul_case,
    "shapes": shapes_case,
    "meta_sgd": meta_sgd_case,
    "shapes_lr": shapes_lr_case,
    "shapes_maml": shapes_maml_case,
    "shapes_meta_sgd": shapes_meta_sgd_case,
    "imaml": imaml_case,
}
#: structures whose UL variables include the LL's initial weights
INITIAL = {
    "maml",
    "maml_frozen",
    "init",
    "partial",
    "sub_ul",
    "meta_sgd",
    "shapes_maml",
    "shapes_meta_sgd",
    "imaml",
}
#: ... where some of them are reached only through the LL's start (no objective reads them)
START_ONLY = INITIAL - {"imaml"}


# ----------------------------------------------- 1. Reverse-mode methods and BDA dynamics

K = 2  # Truncated: the last K of T steps
REVERSE_FAMILY = {
    # name: (method class, options, BDA dynamics, reference options)
    "reverse": (Reverse, {}, False, {}),
    "truncated": (Truncated, {"truncate_iter": K}, False, {"keep_last": K}),
    "ptt": (PTT, {}, False, {"worst": True}),
    "memory_saving": (MemorySavingReverse, {}, False, {}),
    "bda_reverse": (Reverse, {}, True, {"bda": True}),
    "bda_truncated": (Truncated, {"truncate_iter": K}, True, {"keep_last": K, "bda": True}),
    "bda_memory_saving": (MemorySavingReverse, {}, True, {"bda": True}),
}


@pytest.mark.parametrize("structure", list(CASES))
@pytest.mark.parametrize("method", list(REVERSE_FAMILY))
def test_reverse_family_against_the_hand_written_unroll(method, structure):
    """Each method's hypergradient over consecutive UL steps, against back-propagation
    through the same steps written by hand; Truncated with K < T refuses UL variables that
    are initial weights (no path reaches them) instead of returning zero for them."""
    case = CASES[structure]()
    cls, options, bda, reference = REVERSE_FAMILY[method]
    if "keep_last" in reference and structure in START_ONLY:
        refused(case, lambda: case.problem(cls, bda=bda, **options), "no hypergradient")
        return
    problem = case.problem(cls, bda=bda, **options)
    between = toggle_frozen(case) if structure == "frozen" else None
    consecutive(
        problem,
        case,
        lambda: hand_reverse(case, problem.ul_params, **reference),
        runs=3 if structure == "frozen" else 2,
        between=between,
    )


# ------------------------------------------------------------------ 2. FiniteDifference (DARTS)

FD_STRUCTURES = [
    "frozen",
    "maml",
    "maml_frozen",
    "init",
    "partial",
    "sub_ul",
    "shapes",
    "shapes_maml",
    "imaml",
]


@pytest.mark.parametrize("structure", FD_STRUCTURES)
def test_finite_difference_one_step_is_reverse_through_the_step(structure):
    """T = 1: the exact one-step unrolled hypergradient up to O(r^2) (r = 1e-4) and
    round-off (~1e-16 / r), over consecutive UL steps."""
    case = CASES[structure]()
    problem = case.problem(FiniteDifference, iters=1, r=1e-4)
    consecutive(
        problem,
        case,
        lambda: hand_reverse(case, problem.ul_params, iters=1),
        runs=3 if structure == "frozen" else 2,
        between=toggle_frozen(case) if structure == "frozen" else None,
        rtol=1e-6,
        atol=1e-9,
    )


@pytest.mark.parametrize("structure", FD_STRUCTURES)
def test_finite_difference_error_is_second_order_in_the_radius(structure):
    """Halving r divides the error against the exact one-step hypergradient by ~4 (the
    central difference's r^2 term; the initial weights' curvature term included)."""
    case = CASES[structure]()
    exact = flat(hand_reverse(case, case.method(Reverse).ul_params, iters=1))
    errors = []
    for r in (0.2, 0.1):
        problem = BilevelProblem(case.ll(iters=1), case.method(FiniteDifference, r=r))
        got = flat(problem.hypergradient(case.train, case.val))
        errors.append(float((got - exact).norm()))
    assert errors[1] > 1e-9 * float(exact.norm())  # far above round-off: the r^2 term shows
    assert 3.8 < errors[0] / errors[1] < 4.2, errors  # measured 3.97-3.99


@pytest.mark.parametrize("structure", ["meta_sgd", "shapes_lr"])
def test_finite_difference_refuses_step_sizes_that_are_only_ul_variables(structure):
    """Step sizes that are UL variables reached through the step size alone: DARTS' formula
    has no term for them, and they are refused (not given a zero): as UL variables without a
    hypergradient, as step sizes that are UL variables, or (Meta-SGD's (1,) bias step size
    with one LL step) as a step size that also reads as a one-step schedule."""
    case = CASES[structure]()
    match = "no hypergradient|step size lr is a UL variable|both a per-step schedule"
    refused(case, lambda: case.problem(FiniteDifference, iters=1), match)


def test_finite_difference_with_a_step_size_computed_from_a_ul_variable():
    """The LL step size computed from the penalty strength that the objectives also read
    (``lr = 1 / (1 + 2 exp(log_c))``, the step that the penalty's curvature allows). The
    one-step hypergradient then has a term through the step size: it must be in the result
    (Reverse and MemorySavingReverse have it), or the method must refuse such a step size.
    FOUND: FiniteDifference returns the hypergradient without that term, silently."""

    def lr(ul: nn.Module) -> torch.Tensor:
        return 1.0 / (1.0 + 2.0 * ul.log_c.exp())

    case = frozen_case(lr=lr)
    case.hand_lr = lambda U: {
        id(p): 1.0 / (1.0 + 2.0 * U[0].exp()) for p in case.ll_model.parameters()
    }
    ul_params = case.method(Reverse).ul_params
    exact = hand_reverse(case, ul_params, iters=1)
    for cls in (Reverse, MemorySavingReverse):
        close(
            BilevelProblem(case.ll(iters=1), case.method(cls)).hypergradient(case.train, case.val),
            exact,
        )
    try:
        problem = BilevelProblem(case.ll(iters=1), case.method(FiniteDifference, r=1e-4))
        got = problem.hypergradient(case.train, case.val)
    except ValueError as error:  # a refusal that names the step size is the other way out
        assert "step size" in str(error) or "lr" in str(error)
        return
    close(got, exact, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------ 3. IGA


@pytest.mark.parametrize(
    "structure", ["frozen", "shapes", "imaml", "maml", "init", "partial", "sub_ul", "shapes_maml"]
)
def test_iga_is_the_rank_one_formula_at_the_last_iterate(structure):
    """``grad_U F - c grad_U f`` at the last LL iterate, over the trainable weights only;
    initial weights as UL variables get no path, and are refused."""
    case = CASES[structure]()
    if structure in START_ONLY:
        refused(case, lambda: case.problem(IGA), "no hypergradient")
        return
    problem = case.problem(IGA)
    frozen = structure == "frozen"
    consecutive(
        problem,
        case,
        lambda: hand_iga(case, problem.ul_params),
        runs=3 if frozen else 2,
        between=toggle_frozen(case) if frozen else None,
    )


# ------------------------------------------------------------------------------------- 4. DM


def hand_dm(
    case: Case,
    ul_params: list[nn.Parameter],
    z: dict[int, torch.Tensor],
    iters: int,
    eta: float | str,
    bda: bool = False,
) -> tuple[Tensors, dict[int, torch.Tensor], Tensors]:
    """One DM step from the LL model's weights and the multiplier ``z`` (by LL parameter;
    zero where it has none): ``(d, z_new, y_new)``."""
    U, W, trainable = final_weights(case, ul_params, iters, bda)
    direct, v, g, H, active = implicit_parts(case, U, W, trainable)
    params = [p for p, t in zip(case.ll_model.parameters(), trainable, strict=True) if t]
    z0 = flat([z.get(id(p), torch.zeros_like(w)) for p, w in zip(params, active, strict=True)])
    r = H @ z0 - v
    step = (r @ r) / (r @ H @ r) if eta == "auto" else eta
    z1 = z0 - step * r
    new = {id(p): t.detach() for p, t in zip(params, unflat(z1, active), strict=True)}
    return minus_cross(direct, g, z1, U), new, [w.detach() for w in W]


def dm_steps(case: Case, problem: BilevelProblem, eta: float | str, bda: bool, runs: int):
    """``runs`` DM steps, each against :func:`hand_dm` from the state it left (the
    hypergradient leaves the state alone; the step advances the LL weights and ``z``)."""
    z: dict[int, torch.Tensor] = {}
    params = problem.ul_params
    for _ in range(runs):
        expected, z, y = hand_dm(case, params, z, problem.ll.iters, eta, bda)
        close(problem.hypergradient(case.train, case.val), expected)
        before = [p.detach().clone() for p in params]
        problem.step(case.train, case.val)
        close(
            [p.detach() for p in params],
            [b - UL_LR * e for b, e in zip(before, expected, strict=True)],
        )
        close([p.detach() for p in case.ll_model.parameters()], y)
        trainable = [p for p in case.ll_model.parameters() if p.requires_grad]
        close(problem.ul.multiplier, [z[id(p)] for p in trainable])


@pytest.mark.parametrize("eta", ["auto", 0.3])
@pytest.mark.parametrize("structure", ["frozen", "shapes", "bda"])
def test_dm_steps_carry_the_ll_weights_and_the_multiplier(structure, eta):
    """Three UL steps: the LL weights written back into the (frozen-parameter, odd-layout)
    LL model, the multiplier, and the direction, each against the recursion by hand."""
    bda = structure == "bda"
    case = frozen_case() if bda else CASES[structure]()
    problem = case.problem(DM, iters=2, bda=bda, eta=eta)
    dm_steps(case, problem, eta, bda, runs=3)


@pytest.mark.parametrize("structure", ["maml", "init", "partial", "sub_ul", "imaml", "shapes_maml"])
def test_dm_refuses_initial_weights_as_ul_variables(structure):
    case = CASES[structure]()
    refused(case, lambda: case.problem(DM), "cannot also be LL weights")


@pytest.mark.parametrize("change", ["swap", "freeze"])
def test_dm_multiplier_when_the_trainable_parameters_change(change):
    """Two DM steps with ``a, b, c`` trainable, then the trainable set changes. ``swap``:
    ``a`` frozen and ``s`` unfrozen (same count and shapes); ``freeze``: ``b`` frozen. The
    multiplier is one tensor per trainable parameter: a parameter that newly trains starts
    at z = 0 and the others keep theirs, or the change is refused with a clear error.
    FOUND (swap): the multiplier of ``a`` is used for ``s``, silently. (freeze): a raw
    autograd error ("Boolean value of Tensor with more than one value is ambiguous")."""
    case = frozen_case()
    problem = case.problem(DM, iters=2, eta=0.3)
    z: dict[int, torch.Tensor] = {}
    for _ in range(2):
        _, z, _ = hand_dm(case, problem.ul_params, z, 2, 0.3)
        problem.step(case.train, case.val)
    model = case.ll_model
    if change == "swap":
        model.a.requires_grad_(False)
        model.s.requires_grad_(True)
    else:
        model.b.requires_grad_(False)
    expected, _, _ = hand_dm(case, problem.ul_params, z, 2, 0.3)
    before = [p.detach().clone() for p in problem.ul_params]
    try:
        problem.step(case.train, case.val)
    except ValueError as error:
        assert "trainable" in str(error) and "multiplier" in str(error)
        return
    moved = [b - UL_LR * e for b, e in zip(before, expected, strict=True)]
    close([p.detach() for p in problem.ul_params], moved)


# -------------------------------------------------------------------------------- 5. Reptile


@pytest.mark.parametrize(
    "structure", ["maml", "maml_frozen", "sub_ul", "shapes_maml", "imaml", "init", "frozen"]
)
def test_reptile_is_the_displacement_of_the_shared_weights(structure):
    """``theta - w_T`` for the UL variables that are LL weights (all of them, a frozen one
    left out, or only a submodule's); UL variables that are not LL weights are refused."""
    case = CASES[structure]()
    if structure in ("init", "frozen"):
        refused(case, lambda: case.problem(Reptile), "no hypergradient")
        return
    problem = case.problem(Reptile)
    consecutive(problem, case, lambda: hand_reptile(case, problem.ul_params))


# ------------------------------------------ 6. StochasticImplicit (full batch), Implicit + damping

SOLVER_STEPS = 40


@pytest.mark.parametrize("structure", ["frozen", "shapes", "imaml", "maml", "init"])
def test_stochastic_implicit_on_the_full_batch_is_the_truncated_series(structure):
    """Full batch, SGD on the quadratic with the LL step size: ``q`` after ``steps`` steps of
    ``q <- q - alpha (H q - v)`` from 0, exactly (the mixed term on the full batch)."""
    case = CASES[structure]()
    options = {"steps": SOLVER_STEPS, "batches": None, "cross": "full"}
    if structure in START_ONLY:
        refused(case, lambda: case.problem(StochasticImplicit, **options), "no hypergradient")
        return
    problem = case.problem(StochasticImplicit, **options)
    frozen = structure == "frozen"
    consecutive(
        problem,
        case,
        lambda: hand_series(case, problem.ul_params, SOLVER_STEPS, LR),
        runs=3 if frozen else 2,
        between=toggle_frozen(case) if frozen else None,
    )


@pytest.mark.parametrize("damping", [0.0, 0.5])
@pytest.mark.parametrize("structure", ["frozen", "shapes", "imaml"])
def test_implicit_cg_with_damping_is_the_dense_damped_solve(structure, damping):
    """``grad_U F - (dg/dU)^T (H + damping I)^-1 v`` at the LL run's last weights (CG with
    more iterations than unknowns); iMAML's pull gives the initial weights their path."""
    case = CASES[structure]()
    problem = case.problem(
        Implicit, k=80, tolerance=1e-14, damping=damping, stationarity_warning=None
    )
    frozen = structure == "frozen"
    consecutive(
        problem,
        case,
        lambda: hand_implicit(case, problem.ul_params, damping=damping),
        runs=3 if frozen else 2,
        between=toggle_frozen(case) if frozen else None,
        rtol=1e-9,
        atol=1e-11,
    )


# ------------------------------------------------- 7. MemorySavingReverse equals Reverse


# (Adam at this step size raises the iMAML LL loss: only the two methods' agreement matters)
@pytest.mark.parametrize("rule", [{"momentum": 0.8}, {"optimizer": "adam", "on_growth": "ignore"}])
@pytest.mark.parametrize("structure", list(CASES))
def test_memory_saving_reverse_is_reverse_to_round_off_for_other_rules(structure, rule):
    """Heavy ball and Adam (optimizer state carried back through the stored states) on every
    structure: the two methods agree to 1e-12 relative, over consecutive UL steps (each
    method steps its own copy of the structure)."""
    cases = [CASES[structure](), CASES[structure]()]
    problems = []
    for case, cls in zip(cases, (Reverse, MemorySavingReverse), strict=True):
        ul = case.method(cls)
        problems.append(BilevelProblem(case.ll(**rule), ul, torch.optim.SGD(ul.ul_params, UL_LR)))
    for _ in range(2):
        got = [p.hypergradient(c.train, c.val) for p, c in zip(problems, cases, strict=True)]
        scale = float(flat(got[0]).abs().max())
        assert scale > 1e-6
        close(got[1], got[0], rtol=1e-12, atol=1e-12 * scale)
        for p, c in zip(problems, cases, strict=True):
            p.step(c.train, c.val)


# ----------------------------------------- 8. Meta-SGD step sizes when the trainable set changes


@pytest.mark.parametrize("kind", ["floats", "tensors"])
def test_per_parameter_step_sizes_follow_their_parameter_when_another_is_frozen(kind):
    """One step size per trainable LL parameter, given at construction: floats for ``a``,
    ``b``, ``c``, or per-element tensors for ``a`` and ``b`` (one shape; ``c`` frozen). The
    trainable set then changes between runs; each parameter must keep its own step size (or
    the change be refused). FOUND: the step sizes are taken by position among the parameters
    trainable NOW, so a parameter steps with another's step size, silently."""
    case = frozen_case()
    model = case.ll_model
    if kind == "floats":
        params, lrs = [model.a, model.b, model.c], [0.2, 0.25, 0.3]
    else:
        model.c.requires_grad_(False)
        params = [model.a, model.b]
        lrs = [torch.tensor([0.2, 0.21, 0.22], dtype=DTYPE), torch.full((3,), 0.3, dtype=DTYPE)]
    table = {id(p): lr for p, lr in zip(params, lrs, strict=True)}
    case.lr, case.hand_lr = lrs, lambda U: table
    problem = case.problem(Reverse)

    def between(run: int) -> None:  # floats: b frozen, then a; tensors: a frozen, then b
        first, second = (model.b, model.a) if kind == "floats" else (model.a, model.b)
        if run == 1:
            first.requires_grad_(False)
        elif run == 2:
            first.requires_grad_(True)
            second.requires_grad_(False)

    try:
        consecutive(problem, case, lambda: hand_reverse(case, problem.ul_params), 3, between)
    except ValueError as error:  # a clear refusal is acceptable
        assert "lr" in str(error) and "trainable" in str(error)


# ------------------------------------------------------- 9. FixedPointMap: Implicit and Reverse

FP_ITERS = 30


class Equilibrium(nn.Module):
    """The LL iterate: a (3, 2) matrix registered as a transposed view, a frozen (2,) scale
    between, and a 0-d scalar."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(17)
        self.P = nn.Parameter(0.3 * torch.randn(2, 3, generator=g, dtype=DTYPE).t())
        self.s = nn.Parameter(torch.tensor([0.7, -0.4], dtype=DTYPE), requires_grad=False)
        self.c = nn.Parameter(torch.tensor(0.2, dtype=DTYPE))


class Lam(nn.Module):
    def __init__(self, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor([0.4, -0.3, 0.2], dtype=DTYPE))
        if inner is not None:
            self.inner = inner  # (c): the LL's start is a UL variable too


def phi(W: Tensors, lam: torch.Tensor) -> Tensors:
    """A contraction with a non-symmetric Jacobian; images of the trainable ``P`` and ``c``."""
    P, s, c = W
    new_p = 0.5 * torch.tanh(torch.outer(lam, s) + 0.3 * c * P.flip(0))
    new_c = 0.5 * torch.tanh(0.2 * (P @ s).sum() + lam.sum())
    return [new_p, new_c]


def fixed_point_map(state: dict) -> Tensors:
    m = state["ll_model"]
    return phi([m.P, m.s, m.c], state["ul_model"].lam)


def fp_ul(state: dict) -> torch.Tensor:
    m = state["ll_model"]
    return (
        0.5 * (m.P - 0.1).pow(2).sum()
        + 0.5 * (m.c - 0.3).pow(2)
        + 0.1 * state["ul_model"].lam.pow(2).sum()
    )


def fp_F(W: Tensors, U: Tensors) -> torch.Tensor:
    return 0.5 * (W[0] - 0.1).pow(2).sum() + 0.5 * (W[2] - 0.3).pow(2) + 0.1 * U[0].pow(2).sum()


def fp_hand(model: nn.Module, ul_params: list[nn.Parameter], method: str) -> Tensors:
    """Reverse: back-propagation through ``FP_ITERS`` iterations of ``phi``; implicit: the
    IFT at the last iterate, ``grad_U F + (dphi/dU)^T (I - dphi/dw)^-T grad_w F``."""
    U = [p.detach().clone().requires_grad_() for p in ul_params]
    position = {id(p): i for i, p in enumerate(ul_params)}
    W = [
        U[position[id(p)]].clone() if id(p) in position else p.detach().clone()
        for p in model.parameters()
    ]
    implicit = method != "reverse"
    if implicit:
        W = [w.detach() for w in W]
    for _ in range(FP_ITERS):
        new_p, new_c = phi(W, U[0])
        W = [new_p, W[1], new_c]
        if implicit:
            W = [w.detach() for w in W]
    if not implicit:
        return grads_or_zeros(fp_F(W, U), U)
    active = [W[0].requires_grad_(), W[2].requires_grad_()]
    loss = fp_F(W, U)
    direct = grads_or_zeros(loss, U, retain_graph=True)
    v = flat(grads_or_zeros(loss, active))
    image = flat(phi(W, U[0]))
    jacobian = dense_hessian(list(image), active)  # rows: d image_i / d w
    q = torch.linalg.solve((torch.eye(len(v), dtype=DTYPE) - jacobian).T, v)
    cross = grads_or_zeros(image @ q, U)
    return [d + c for d, c in zip(direct, cross, strict=True)]


FP_METHODS = {
    "reverse": (Reverse, {}),
    "memory_saving": (MemorySavingReverse, {}),
    "fixed_point": (Implicit, {"method": "fixed_point", "k": 200, "tolerance": 1e-15}),
    "normal_cg": (Implicit, {"method": "normal_cg", "k": 40, "tolerance": 1e-15}),
}


@pytest.mark.parametrize("init", [False, True], ids=["lam", "lam_and_start"])
@pytest.mark.parametrize("method", list(FP_METHODS))
def test_fixed_point_map_with_odd_shapes_a_frozen_parameter_and_a_learned_start(method, init):
    """A fixed-point LL over a transposed-view matrix, a frozen vector and a 0-d scalar; the
    UL model holds ``lam`` (and, with ``lam_and_start``, the LL module: its start is a UL
    variable, which the implicit methods cannot reach and refuse)."""
    model = Equilibrium()
    assert not model.P.is_contiguous()
    ul_model = Lam(model if init else None)
    cls, options = FP_METHODS[method]
    ll = FixedPointMap(fixed_point_map, model, ul_model, iters=FP_ITERS)
    ul = cls(fp_ul, ul_model, fixed_point_map, model, **options)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul.ul_params, lr=UL_LR))
    case = Case(model, ul_model, fixed_point_map, fp_ul, None, None, ((), ()), ((), ()))
    if init and cls is Implicit:
        with pytest.raises(ValueError, match="no hypergradient"):
            problem.hypergradient(case.train, case.val)
        return
    hand = "reverse" if cls is not Implicit else "implicit"
    consecutive(
        problem, case, lambda: fp_hand(model, problem.ul_params, hand), rtol=1e-9, atol=1e-12
    )


# ------------------------------------------- 10. MAML with a weight frozen after construction

AFTER_CONSTRUCTION = {
    "reverse": (Reverse, T),
    "memory_saving": (MemorySavingReverse, T),
    "ptt": (PTT, T),
    "finite_difference": (FiniteDifference, 1),
    "reptile": (Reptile, T),
}


@pytest.mark.parametrize("method", list(AFTER_CONSTRUCTION))
def test_maml_weight_frozen_after_one_ul_step(method):
    """(a)+(b)+(e) ``ll_model is ul_model``; after one UL step the first layer's bias is
    frozen (``requires_grad_(False)``: it stops training). The method's UL parameters were
    fixed at its construction, so the next hypergradient must either be refused with an
    error that names the parameter, or leave that (now constant) weight a zero and give the
    others theirs. FOUND: all but Reptile raise autograd's bare "One of the differentiated
    Tensors does not require grad" (no name, no cure)."""
    case = maml_case()
    cls, iters = AFTER_CONSTRUCTION[method]
    options = {"r": 1e-4} if cls is FiniteDifference else {}
    problem = case.problem(cls, iters=iters, **options)
    problem.step(case.train, case.val)
    case.ll_model[0].bias.requires_grad_(False)
    try:
        got = problem.hypergradient(case.train, case.val)
    except ValueError as error:
        assert "0.bias" in str(error)
        return
    if cls is Reptile:
        expected = hand_reptile(case, problem.ul_params, iters)
    else:
        expected = hand_reverse(case, problem.ul_params, iters, worst=cls is PTT)
    tol = {"rtol": 1e-6, "atol": 1e-9} if cls is FiniteDifference else {}
    close(got, expected, **tol)
    assert float(got[1].abs().max()) == 0.0


def test_finite_difference_refuses_bda_dynamics():
    """DARTS differentiates one plain gradient step: BDA's aggregated step is refused."""
    case = frozen_case()
    with pytest.raises(ValueError, match="one plain gradient step"):
        case.problem(FiniteDifference, iters=1, bda=True)


def test_a_failed_hypergradient_keeps_its_error_when_the_state_cannot_be_put_back():
    """``BilevelProblem.hypergradient`` puts a stateful method's state back afterwards; when
    the hypergradient itself failed (DM refusing a changed trainable set) and putting the
    state back fails too, the first error is raised, with the second noted on it (it used to
    be replaced by the second, which named neither the cause nor the cure)."""
    case = frozen_case()
    problem = case.problem(DM, iters=2, eta=0.3)
    for _ in range(2):
        problem.step(case.train, case.val)
    case.ll_model.b.requires_grad_(False)
    with pytest.raises(ValueError, match="multiplier was built for") as raised:
        problem.hypergradient(case.train, case.val)
    assert any("could not be put back" in note for note in raised.value.__notes__)
