"""Our library on the method-families benchmark (``method_families.py``): every UL method and
LL dynamics of ``bilevel``, through the public API, on the problems of that benchmark.

The methods the existing benchmark already builds (reverse, truncated, the implicit solvers
``cg``/``neumann``/``fixed_point``, forward) come from ``impl_bilevel.calculator``; the
meta-learning runners from ``impl_bilevel``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import impl_bilevel
import problems as P
import torch
from common import NotSupported
from impl_bilevel import MetaRunner, Runner, Weights, version  # noqa: F401  (version: the worker)
from torch import nn

import bilevel.ul as U
from bilevel import BilevelProblem
from bilevel.ll import BDA, FixedPointMap, GradientDescent

NAME = "bilevel"
Tensors = list[torch.Tensor]

# stateful methods: the LL variables (and auxiliary ones) live on across UL steps
STATEFUL = {"dm", "bome", "pbgd", "bvfim", "meso", "gaffo", "f2sa", "soba", "saba", "stocbio"}
STATEFUL |= {"amigo"}


class WithInitialization(nn.Module):
    """The UL variables ``lam0`` together with the LL model, whose weights are then the LL's
    learned starting point (dynamic initialization, IAPTT-GM's DI)."""

    def __init__(self, lam0: torch.Tensor, ll_model: nn.Module) -> None:
        super().__init__()
        self.lam0 = nn.Parameter(lam0.detach().clone())
        self.ll = ll_model


def objectives(problem: Any) -> tuple[Callable, Callable]:
    """``(ll, ul)`` objectives of a state. Regression: on the state's data, so that the
    minibatch methods see minibatches; hyper-cleaning: the data from the problem (one weight
    per training example)."""
    if isinstance(problem, P.Regression):
        p = problem

        def ll(state: dict) -> torch.Tensor:
            w = state["ll_model"].w0
            loss = P.data_loss(p.kind, w, state["data"], state["target"])
            return loss + P.penalty(w, state["ul_model"].lam0, p.group)

        def ul(state: dict) -> torch.Tensor:
            return P.data_loss(p.kind, state["ll_model"].w0, state["data"], state["target"])

        return ll, ul
    s = P.spec(problem)

    def ll_c(state: dict) -> torch.Tensor:
        model = state["ll_model"]
        return s.ll([model.w0, model.w1], [state["ul_model"].lam0])

    def ul_c(state: dict) -> torch.Tensor:
        model = state["ll_model"]
        return s.ul([model.w0, model.w1], [state["ul_model"].lam0])

    return ll_c, ul_c


def closed_form_step(problem: Any, lr: float) -> Callable[[dict], Tensors]:
    """The LL's gradient step ``w - lr grad_w f`` of a regression problem in closed form, as a
    fixed-point map (a map may not call autograd: the LL runs without a graph)."""
    if not isinstance(problem, P.Regression):
        raise NotSupported("the fixed-point map is written for ridge and logistic regression")
    p = problem

    def step(state: dict) -> Tensors:
        w, x, y = state["ll_model"].w0, state["data"], state["target"]
        z = x @ w
        residual = z - y if p.kind == "ridge" else torch.sigmoid(z) - y
        l2 = state["ul_model"].lam0.exp()[p.group]
        return [w - lr * (x.T @ residual / len(x) + l2 * w)]

    return step


def calculator(config: dict[str, Any], args: tuple, lr: float) -> Any:
    """The UL method of ``config["method"]`` on ``args = (ul, ul_model, ll, ll_model)``."""
    method, k = config["method"], config.get("k", 10)
    minibatch = config.get("minibatch")
    table: dict[str, Callable[[], Any]] = {
        "first_order": lambda: U.FirstOrder(*args),
        "ptt": lambda: U.PTT(*args),
        "ptt_interior": lambda: U.PTT(*args),
        "fd": lambda: U.FiniteDifference(*args, r=config.get("r", 1e-2)),
        "iga": lambda: U.IGA(*args, converged_warning=None),
        "dm": lambda: U.DM(*args, eta="auto"),
        "memory_saving_reverse": lambda: U.MemorySavingReverse(*args),
        "stochastic_implicit": lambda: U.StochasticImplicit(*args, steps=k, batches=minibatch),
        "minres": lambda: U.Implicit(*args, lr, k, tolerance=1e-10, method="minres"),
        "normal_cg": lambda: U.Implicit(*args, lr, k, tolerance=1e-10, method="normal_cg"),
        "fixed_point_map": lambda: U.Implicit(*args, k=k, tolerance=1e-10, method="fixed_point"),
        "bda": lambda: U.Reverse(*args),
        "reverse_di": lambda: U.Reverse(*args),
        "reptile": lambda: U.Reptile(*args),
        "bome": lambda: U.BOME(*args),
        "pbgd": lambda: U.PBGD(*args),
        "bvfim": lambda: U.BVFIM(*args),
        "meso": lambda: U.MESO(*args),
        "gaffo": lambda: U.GAFFO(*args),
        "f2sa": lambda: U.F2SA(*args),
        "soba": lambda: U.SOBA(*args, batch_size=minibatch),
        "saba": lambda: U.SABA(*args, batch_size=minibatch),
        "stocbio": lambda: U.StocBiO(*args, neumann_steps=k, batch_size=minibatch),
        "amigo": lambda: U.AmIGO(*args, batch_size=minibatch),
    }
    if method in table:
        return table[method]()
    return impl_bilevel.calculator({**config, "lr": lr}, *args)


def lower_level(config: dict[str, Any], problem: Any, objectives: tuple, models: tuple, lr):
    """The LL dynamics: ``GradientDescent`` (heavy-ball with ``config["momentum"]``), ``BDA``
    (method ``bda``) or ``FixedPointMap`` (the gradient step written as a map, method
    ``fixed_point_map``)."""
    ll_obj, ul_obj = objectives
    ll_model, ul_model = models
    steps = config["T"]
    if config["method"] == "bda":
        alpha, decay = config["alpha"], config["decay"]
        return BDA(
            ll_obj,
            ll_model,
            ul_model,
            lr,
            steps,
            ul_objective=ul_obj,
            alpha=alpha,
            alpha_decay=decay,
        )
    if config["method"] == "fixed_point_map":
        gradient_step = closed_form_step(problem, lr)
        return FixedPointMap(gradient_step, ll_model, ul_model, iters=steps), gradient_step
    momentum = config.get("momentum")
    return GradientDescent(ll_obj, ll_model, ul_model, lr=lr, iters=steps, momentum=momentum)


class UnscaledRunner(Runner):
    """``impl_bilevel.Runner`` whose hypergradient is the method's estimate itself: SOBA and
    SABA scale theirs by their decaying UL step factor (``diagnostics["ul_scale"]``)."""

    def hypergradient(self) -> Tensors:
        grads = super().hypergradient()
        scale = self.problem.ul.diagnostics.get("ul_scale", 1.0)
        return [g / scale for g in grads]


def regression(config: dict[str, Any], problem: Any) -> Runner:
    """Ridge, logistic or MNIST hyper-cleaning with any method; the UL optimizer is
    ``SGD(lr=0)`` (timing, errors) or Adam with ``config["ul_lr"]`` (training)."""
    s = P.spec(problem)
    ll_model = Weights(**{f"w{i}": w for i, w in enumerate(s.w0)})
    ul_model: nn.Module = Weights(lam0=s.lam0[0])
    if config["method"] == "reverse_di":
        ul_model = WithInitialization(s.lam0[0], ll_model)
    ll_obj, ul_obj = objectives(problem)
    ll = lower_level(config, problem, (ll_obj, ul_obj), (ll_model, ul_model), s.lr)
    if isinstance(ll, tuple):  # a fixed-point map: Implicit takes the map as the LL objective
        ll, ll_obj = ll
    ul = calculator(config, (ul_obj, ul_model, ll_obj, ll_model), s.lr)
    params = list(ul_model.parameters())
    ul_lr = config.get("ul_lr")
    opt = torch.optim.Adam(params, lr=ul_lr) if ul_lr else torch.optim.SGD(params, lr=0.0)
    return UnscaledRunner(BilevelProblem(ll, ul, opt), s.train, s.val)


META_BASE = {"reverse": "maml", "first_order": "fomaml"}
META_METHODS = {
    "ptt": U.PTT,
    "memory_saving_reverse": U.MemorySavingReverse,
    "reptile": U.Reptile,
    "fd": U.FiniteDifference,
}


def meta(config: dict[str, Any], m: P.Meta) -> MetaRunner:
    """A meta-step of an Omniglot-shaped task batch on ``FewShotNet``: MAML (``reverse``) and
    first-order MAML from ``impl_bilevel``; PTT, memory-saving reverse, Reptile and DARTS'
    finite differences with the network's initial weights as the UL variables."""
    method = config["method"]
    if method in META_BASE:
        return impl_bilevel.meta({**config, "method": META_BASE[method]}, m)
    if method not in META_METHODS:
        raise NotSupported(f"no meta-learning form of {method!r} here")
    net, loss = P.meta_network(m), impl_bilevel._ce
    ll = GradientDescent(loss, net, net, lr=m.lr, iters=m.steps)
    ul = META_METHODS[method](loss, net, loss, net)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(net.parameters(), lr=0.0))
    return MetaRunner(problem, {"train": (m.xs, m.ys), "test": (m.xq, m.yq)})


def ptt_step(runner: Runner) -> int:
    """The LL iterate ``k*`` (1-based) that ``PTT`` back-propagated from at the last UL step."""
    return int(runner.problem.ul.diagnostics["ptt_step"])


def ul_tensors(runner: Any) -> Tensors:
    """The runner's UL variables (read after training)."""
    return [p.detach() for p in runner.problem.ul_params]


def build(config: dict[str, Any], problem: Any) -> Any:
    """The runner of a configuration."""
    if isinstance(problem, P.Meta):
        return meta(config, problem)
    return regression(config, problem)
