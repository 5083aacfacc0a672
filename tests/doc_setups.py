"""The names that the documentation's fragments leave to the reader (``<!-- test with NAME
-->`` in the pages and the README; ``tests/test_docs.py`` runs them): for each NAME, a
function returning a fresh namespace with those names (float64: the test sets it as the
default dtype), and ``check(namespace)``,
which looks at what the fragment built and fails if it does not work (a UL step that does
not move the UL variables, an LL run that does not lower its loss)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import BilevelProblem
from bilevel.ll import BDA, GradientDescent, rules
from bilevel.ul import Forward, Implicit, Reverse

DTYPE = torch.float64
FEATURES = 5


class Linear(nn.Module):
    """The LL model: linear regression weights."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(FEATURES, dtype=DTYPE))


class Hyper(nn.Module):
    """The UL model: per-feature log L2 penalties, and a log LL step size where it is
    learned (``learned_lr``)."""

    def __init__(self, learned_lr: bool = False) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.full((FEATURES,), -2.0, dtype=DTYPE))
        if learned_lr:
            self.log_lr = nn.Parameter(torch.tensor(-2.3, dtype=DTYPE))


def _regression_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, FEATURES, generator=generator, dtype=DTYPE)
    w = torch.linspace(-1.0, 1.0, FEATURES, dtype=DTYPE)
    return x, x @ w + 0.1 * torch.randn(n, generator=generator, dtype=DTYPE)


def ll_objective(state: dict) -> torch.Tensor:
    """Mean squared error plus the per-feature L2 penalty."""
    w, hyper = state["ll_model"].w, state["ul_model"]
    residual = state["data"] @ w - state["target"]
    return 0.5 * (residual**2).mean() + 0.5 * (hyper.log_l2.exp() * w**2).sum()


def ul_objective(state: dict) -> torch.Tensor:
    """Validation mean squared error."""
    residual = state["data"] @ state["ll_model"].w - state["target"]
    return 0.5 * (residual**2).mean()


def _ul_step_moves(namespace: dict) -> None:
    """The fragment's problem takes a UL step (unless it took one) that moves its UL
    variables, which stay finite."""
    problem = namespace["problem"]
    assert isinstance(problem, BilevelProblem)
    params = problem.ul_params
    before = namespace.get("_before")
    if before is None or all(torch.equal(a, b) for a, b in zip(before, params, strict=True)):
        before = [p.detach().clone() for p in params]
        problem.step(namespace["train"], namespace["val"])
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


def _ll_run_descends(namespace: dict) -> None:
    """The fragment's LL (or, where it built a problem, a UL step of it) works: the LL run
    lowers its loss."""
    if "problem" in namespace:
        _ul_step_moves(namespace)
        return
    trajectory = namespace["ll"].run(*namespace["train"])
    assert float(trajectory.losses[-1]) < float(trajectory.losses[0])


def regression(learned_lr: bool = False) -> dict[str, Any]:
    """Ridge regression with per-feature penalties: ``ll_objective``/``ll_loss``,
    ``ul_objective``/``ul_loss``, ``ll_model``, ``ul_model`` (``log_l2``; ``log_lr`` where
    ``learned_lr``), ``train``/``val`` (and their
    ``_x``/``_y``), ``ul_optimizer``, and ``ll``/``ul`` (GradientDescent, Reverse) for the
    fragments that change an existing problem."""
    generator = torch.Generator().manual_seed(0)
    train, val = _regression_data(40, generator), _regression_data(40, generator)
    ll_model, ul_model = Linear(), Hyper(learned_lr)
    ul_optimizer = torch.optim.Adam(ul_model.parameters(), lr=1e-2)
    namespace: dict[str, Any] = {
        "torch": torch,
        "nn": nn,
        "bilevel": bilevel,
        "BilevelProblem": BilevelProblem,
        "GradientDescent": GradientDescent,
        "BDA": BDA,
        "rules": rules,
        "Reverse": Reverse,
        "Implicit": Implicit,
        "Forward": Forward,
        "ll_objective": ll_objective,
        "ul_objective": ul_objective,
        "ll_loss": ll_objective,
        "ul_loss": ul_objective,
        "ll_model": ll_model,
        "ul_model": ul_model,
        "train": train,
        "val": val,
        "train_x": train[0],
        "train_y": train[1],
        "val_x": val[0],
        "val_y": val[1],
        "ul_optimizer": ul_optimizer,
        "ll": GradientDescent(ll_objective, ll_model, ul_model, lr=0.1, iters=20),
        "ul": Reverse(ul_objective, ul_model, ll_objective, ll_model),
        "check": _ll_run_descends,
    }
    return namespace


def hyper_representation() -> dict[str, Any]:
    """A 10-class head (``head``, the LL model) on a trunk that the fragment defines as
    ``ul_model.trunk``: ``ll_loss``/``ul_loss`` (cross-entropy of ``head(trunk(x))``),
    ``train``/``val`` with 784 features."""
    generator = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 784, generator=generator), torch.arange(n) % 10

    def loss(state: dict) -> torch.Tensor:
        features = state["ul_model"].trunk(state["data"])
        return F.cross_entropy(state["ll_model"](features), state["target"])

    namespace = regression()
    namespace.update(
        head=nn.Linear(64, 10),
        ll_loss=loss,
        ul_loss=loss,
        train=batch(20),
        val=batch(20),
        check=lambda namespace: _ul_step_moves({**namespace, "problem": _problem_of(namespace)}),
    )
    return namespace


def _problem_of(namespace: dict) -> BilevelProblem:
    """The problem a fragment built without naming it (``BilevelProblem(...).step(...)``):
    rebuilt from its parts."""
    ll, opt, ul_model = namespace["ll"], namespace["opt"], namespace["ul_model"]
    ul = Reverse(namespace["ul_loss"], ul_model, namespace["ll_loss"], namespace["head"])
    return BilevelProblem(ll, ul, opt)


def learned_step_size() -> dict[str, Any]:
    """:func:`regression` with ``ul_model.log_lr``, the LL step size's logarithm."""
    return regression(learned_lr=True)


SETUPS: dict[str, Callable[[], dict[str, Any]]] = {
    "regression": regression,
    "learned_step_size": learned_step_size,
    "hyper_representation": hyper_representation,
}
