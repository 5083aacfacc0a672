"""Benchopt-style convergence curves for the bilevel methods (issue 15).

Suboptimality of the upper-level (UL) value function ``h(x) = F(y*(x), x)`` against wall time
and against the number of oracle calls (gradients and Hessian-vector products, counted as
full-data equivalents), for the stochastic methods (SOBA, SABA, StocBiO, AmIGO), the
first-order ones (BOME, PBGD, BVFIM, MESO, GAFFO, Alternating, F2SA) and the classical ones
(Implicit with CG, Reverse, Truncated) on three problems:

1. ``quadratic``: benchopt's quadratic setting (per-sample rank-one quadratics at both levels,
   float64), with the closed-form ``x*`` and ``h(x) - h(x*) = (x - x*)' P (x - x*) / 2``.
2. ``logreg``: per-feature L2 regularization selection for logistic regression on a
   GENERATED data set of ijcnn1's shape (49,990 x 22 train, as many validation rows), with
   ``h`` evaluated at an exact (Newton) LL solution and the reference ``h*`` from L-BFGS on
   the exact value function (dense implicit gradient), or the best value any method reached.
3. ``cleaning``: MNIST data hyper-cleaning (benchopt's corruption: each train label replaced
   with probability 0.5 by a uniform random class), a subset, with test accuracy.

Counting: ``torch.autograd.grad`` is wrapped; every call counts as one oracle call, weighted
by the batch fraction that the last objective evaluation saw (a minibatch of 64 of 1,024
samples counts 1/16). Reverse-mode back-propagation through ``K`` differentiable LL steps
is one call that costs ``K`` Hessian-vector products: the runner adds ``K`` per UL step.
Wall time counts the UL steps only (the evaluations run with the clock stopped, as
benchopt's callbacks do).

Usage::

    python3 benchmarks/bilevel_curves.py --max-minutes 12 \
        --out benchmarks/results/bilevel_curves.json
    python3 benchmarks/bilevel_curves_report.py benchmarks/results/bilevel_curves.json

References: Dagreou, Moreau, Vaiter & Ablin (2022), "A framework for bilevel optimization that
enables stochastic and global variance reduction algorithms", NeurIPS (benchopt's bilevel
benchmark); Moreau et al. (2022), "Benchopt: Reproducible, efficient and collaborative
optimization benchmarks", NeurIPS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import torch
from argtypes import count, names, positive
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import (
    BOME,
    BVFIM,
    F2SA,
    GAFFO,
    MESO,
    PBGD,
    SABA,
    SOBA,
    Alternating,
    AmIGO,
    Implicit,
    Reverse,
    StocBiO,
    Truncated,
)

DTYPE = torch.float64
MNIST_TRAIN = 60_000  # MNIST's training images
CLEANING_VAL = 1000  # of them, the hyper-cleaning problem's validation images
ALL_METHODS = [
    "SOBA",
    "SABA",
    "StocBiO",
    "AmIGO",
    "BOME",
    "PBGD",
    "BVFIM",
    "MESO",
    "GAFFO",
    "Alternating",
    "F2SA",
    "Implicit",
    "Reverse",
    "Truncated",
]
CLASSES = {
    "SOBA": SOBA,
    "SABA": SABA,
    "StocBiO": StocBiO,
    "AmIGO": AmIGO,
    "BOME": BOME,
    "PBGD": PBGD,
    "BVFIM": BVFIM,
    "MESO": MESO,
    "GAFFO": GAFFO,
    "Alternating": Alternating,
    "F2SA": F2SA,
    "Implicit": Implicit,
    "Reverse": Reverse,
    "Truncated": Truncated,
}
STOCHASTIC = {"SOBA", "SABA", "StocBiO", "AmIGO"}
CLASSICAL = {"Implicit", "Reverse", "Truncated"}

# --- counting oracle calls ---------------------------------------------------------------------

COUNT = {"calls": 0.0, "weight": 1.0}
_AUTOGRAD_GRAD = torch.autograd.grad


def _counting_grad(*args: Any, **kwargs: Any) -> Any:
    COUNT["calls"] += COUNT["weight"]
    return _AUTOGRAD_GRAD(*args, **kwargs)


def _rows(data: Any) -> int:
    if isinstance(data, dict):
        return len(next(iter(data.values())))
    if isinstance(data, tuple):
        return _rows(data[0])
    return len(data)


def counted(objective: Callable[[dict], torch.Tensor], full: int) -> Callable[[dict], torch.Tensor]:
    """``objective`` that records the batch fraction it sees (the weight of the next call)."""

    def wrapped(state: dict) -> torch.Tensor:
        COUNT["weight"] = _rows(state["data"]) / full
        return objective(state)

    return wrapped


class Vector(nn.Module):
    """One parameter vector named ``name``."""

    def __init__(self, value: torch.Tensor, name: str) -> None:
        super().__init__()
        self.register_parameter(name, nn.Parameter(value.clone()))


# --- problem settings -----------------------------------------------------------------------------


@dataclass
class Setting:
    """One problem: data, objectives, models, the metric, and each method's configuration."""

    name: str
    train: tuple
    val: tuple
    n_train: int
    n_val: int
    ll_objective: Callable
    ul_objective: Callable
    make_models: Callable[[], tuple[nn.Module, nn.Module]]
    suboptimality: Callable[[nn.Module, dict], dict]
    configs: dict[str, dict]
    stop: float = 1e-10
    info: dict = field(default_factory=dict)


def quadratic_setting(p: int = 50, d: int = 10, n: int = 1024, seed: int = 0) -> Setting:
    """Benchopt's quadratic setting: ``G(y, x) = mean_i [(u_i.y)^2/2 + (c_i.x)(w_i.y) + a_i.y]
    + mu |y|^2/2``, ``F(y, x) = mean_j [(s_j.y)^2/2 + (r_j.x)^2/2 + (k_j.x)(l_j.y) + f_j.y
    + h_j.x] + nu |x|^2/2`` (rank-one per-sample Hessians, a spread spectrum), float64."""
    mu, nu = 0.1, 0.1
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    def around(k: int, dim: int) -> torch.Tensor:
        return normal(1, dim) + 0.3 * normal(k, dim)

    spectrum = torch.logspace(0, -2, p, dtype=DTYPE)  # LL curvature from 1 down to 0.01 (+ mu)
    train = {
        "u": normal(n, p) * spectrum.sqrt(),
        "c": around(n, d) / d**0.5,
        "w": 0.5 * around(n, p) / p**0.5,
        "a": around(n, p) / p**0.5,
    }
    val = {
        "s": normal(n, p) / p**0.5,
        "r": normal(n, d) / d**0.5,
        "k": 0.5 * around(n, d) / d**0.5,
        "l": 0.5 * around(n, p) / p**0.5,
        "f": around(n, p) / p**0.5,
        "h": around(n, d) / d**0.5,
    }
    eye_p, eye_d = torch.eye(p, dtype=DTYPE), torch.eye(d, dtype=DTYPE)
    A = train["u"].T @ train["u"] / n + mu * eye_p
    C = train["c"].T @ train["w"] / n
    a = train["a"].mean(0)
    Fm = val["s"].T @ val["s"] / n
    H = val["r"].T @ val["r"] / n + nu * eye_d
    K = val["k"].T @ val["l"] / n
    f, h = val["f"].mean(0), val["h"].mean(0)
    M = -torch.linalg.solve(A, C.T)
    c0 = -torch.linalg.solve(A, a)
    P = M.T @ Fm @ M + H + K @ M + M.T @ K.T
    P = 0.5 * (P + P.T)
    q = M.T @ Fm @ c0 + K @ c0 + M.T @ f + h
    x_star = -torch.linalg.solve(P, q)

    def ll_objective(state: dict) -> torch.Tensor:
        dd, y, x = state["data"], state["ll_model"].y, state["ul_model"].x
        per = 0.5 * (dd["u"] @ y) ** 2 + (dd["c"] @ x) * (dd["w"] @ y) + dd["a"] @ y
        return per.mean() + 0.5 * mu * (y @ y)

    def ul_objective(state: dict) -> torch.Tensor:
        dd, y, x = state["data"], state["ll_model"].y, state["ul_model"].x
        per = (
            0.5 * (dd["s"] @ y) ** 2
            + 0.5 * (dd["r"] @ x) ** 2
            + (dd["k"] @ x) * (dd["l"] @ y)
            + dd["f"] @ y
            + dd["h"] @ x
        )
        return per.mean() + 0.5 * nu * (x @ x)

    def make_models() -> tuple[nn.Module, nn.Module]:
        return Vector(torch.zeros(p, dtype=DTYPE), "y"), Vector(torch.zeros(d, dtype=DTYPE), "x")

    def suboptimality(ul_model: nn.Module, cache: dict) -> dict:
        e = ul_model.x.detach() - x_star
        return {
            "subopt": float(0.5 * e @ P @ e),
            "distance": float(e.norm() / x_star.norm()),
        }

    eig_a = torch.linalg.eigvalsh(A)
    lip = float(eig_a[-1])
    # the largest curvature of a minibatch of 64 (rank-one terms): measured on a few batches
    gb = torch.Generator().manual_seed(1)
    batch_lip = max(
        float(torch.linalg.eigvalsh(train["u"][idx].T @ train["u"][idx] / 64)[-1]) + mu
        for idx in (torch.randperm(n, generator=gb)[:64] for _ in range(8))
    )
    eig_p = torch.linalg.eigvalsh(P)
    lr = 1.0 / lip
    slr = 0.5 / batch_lip
    ul_lr = 1.0 / float(eig_p[-1])
    configs = {
        "SOBA": {"lr": slr, "ul_lr": 0.5 * ul_lr, "options": {"batch_size": 64}},
        "SABA": {"lr": slr, "ul_lr": 0.5 * ul_lr, "options": {"batch_size": 64}},
        "StocBiO": {
            "lr": slr,
            "iters": 10,
            "ul_lr": 0.5 * ul_lr,
            "options": {"batch_size": 64, "neumann_steps": 10, "neumann_lr": lr},
        },
        "AmIGO": {"lr": slr, "iters": 10, "ul_lr": 0.5 * ul_lr, "options": {"batch_size": 64}},
        "BOME": {"lr": lr, "iters": 10, "ul_lr": 0.5 * ul_lr, "options": {}},
        "PBGD": {"lr": lr, "iters": 10, "ul_lr": 0.1 * ul_lr, "options": {"gamma": 10.0}},
        "BVFIM": {"lr": lr, "iters": 10, "ul_lr": 0.1 * ul_lr, "options": {}},
        "MESO": {"lr": lr, "iters": 1, "ul_lr": 0.5 * ul_lr, "options": {}},
        "GAFFO": {"lr": lr, "iters": 1, "ul_lr": 0.5 * ul_lr, "options": {}},
        "Alternating": {"lr": lr, "iters": 10, "ul_lr": ul_lr, "options": {}},
        "F2SA": {"lr": lr, "iters": 10, "ul_lr": 0.2 * ul_lr, "options": {"lam": 10.0}},
        "Implicit": {
            "lr": lr,
            "iters": 20,
            "ul_lr": ul_lr,
            "options": {"k": 50, "method": "cg"},
            "warm": True,
        },
        "Reverse": {"lr": lr, "iters": 50, "ul_lr": ul_lr, "options": {}, "warm": True},
        "Truncated": {
            "lr": lr,
            "iters": 50,
            "ul_lr": ul_lr,
            "options": {"truncate_iter": 10},
            "warm": True,
        },
    }
    return Setting(
        name="quadratic",
        train=(train, None),
        val=(val, None),
        n_train=n,
        n_val=n,
        ll_objective=ll_objective,
        ul_objective=ul_objective,
        make_models=make_models,
        suboptimality=suboptimality,
        configs=configs,
        stop=1e-12,
        info={
            "dims": {"y": p, "x": d, "n_train": n, "n_val": n},
            "ll_condition_number": float(eig_a[-1] / eig_a[0]),
            "value_function_condition_number": float(eig_p[-1] / eig_p[0]),
            "h_star_relative_to_h0": float(0.5 * x_star @ P @ x_star),
        },
    )


def _logistic(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss of margins ``t z`` (labels ``t`` in {-1, 1})."""
    return nn.functional.softplus(-t * z).mean()


X0 = -4.0  # the logistic-regression start: per-feature L2 exp(-4) = 0.018


def logreg_setting(n: int = 49_990, d: int = 22, seed: int = 0) -> Setting:
    """Per-feature L2 selection for logistic regression, on generated data of ijcnn1's shape:
    ``G(w, x) = mean logistic(train) + sum_j exp(x_j) w_j^2 / 2``, ``F = mean logistic(val)``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=DTYPE) / d**0.5
    truth = torch.randn(d, generator=g, dtype=DTYPE) * (torch.rand(d, generator=g) < 0.5)

    def sample(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(torch.randn(k, d, generator=g, dtype=DTYPE) @ mix)  # in (-1, 1)
        score = z @ truth * 3.0 + torch.randn(k, generator=g, dtype=DTYPE)
        return z, torch.where(score > 0, 1.0, -1.0).to(DTYPE)

    x_tr, t_tr = sample(n)
    x_va, t_va = sample(n)

    def ll_objective(state: dict) -> torch.Tensor:
        z, t = state["data"], state["target"]
        w, lam = state["ll_model"].w, state["ul_model"].x
        return _logistic(z @ w, t) + 0.5 * (lam.exp() * w * w).sum()

    def ul_objective(state: dict) -> torch.Tensor:
        z, t = state["data"], state["target"]
        return _logistic(z @ state["ll_model"].w, t)

    def newton(lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        reg = lam.exp()
        for _ in range(30):
            m = x_tr @ w
            s = torch.sigmoid(-t_tr * m)
            grad = -(x_tr * (t_tr * s)[:, None]).mean(0) + reg * w
            hess = (x_tr * (s * (1 - s))[:, None]).T @ x_tr / n + torch.diag(reg)
            step = torch.linalg.solve(hess, grad)
            w = w - step
            if float(step.norm()) < 1e-13 * (1 + float(w.norm())):
                break
        return w, hess

    def value(lam: torch.Tensor, w0: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``h(lam)``, its exact gradient (implicit function theorem, dense), and ``y*``."""
        w, hess = newton(lam, w0)
        m = x_va @ w
        fv = _logistic(m, t_va)
        gw = -(x_va * (t_va * torch.sigmoid(-t_va * m))[:, None]).mean(0)
        v = torch.linalg.solve(hess, gw)
        return float(fv), -(lam.exp() * w) * v, w

    # reference: L-BFGS on the exact value function, from x = 0
    ref_x = torch.full((d,), X0, dtype=DTYPE, requires_grad=True)
    opt = torch.optim.LBFGS([ref_x], lr=1, max_iter=150, tolerance_grad=1e-10,
                            tolerance_change=1e-15, history_size=20,
                            line_search_fn="strong_wolfe")  # fmt: skip
    w_ref = torch.zeros(d, dtype=DTYPE)

    def closure() -> torch.Tensor:
        nonlocal w_ref
        val_, grad_, w_ref = value(ref_x.detach(), w_ref)
        ref_x.grad = grad_
        return torch.tensor(val_, dtype=DTYPE)

    t0 = time.perf_counter()
    opt.step(closure)
    h_ref, grad_ref, _ = value(ref_x.detach(), w_ref)
    ref_seconds = time.perf_counter() - t0

    def make_models() -> tuple[nn.Module, nn.Module]:
        return Vector(torch.zeros(d, dtype=DTYPE), "w"), Vector(
            X0 + torch.zeros(d, dtype=DTYPE), "x"
        )

    def suboptimality(ul_model: nn.Module, cache: dict) -> dict:
        hv, _, w = value(ul_model.x.detach(), cache.get("w", torch.zeros(d, dtype=DTYPE)))
        cache["w"] = w
        with torch.no_grad():
            acc = float(((x_va @ w) * t_va > 0).to(DTYPE).mean())
        return {"h": hv, "subopt": hv - h_ref, "val_accuracy": acc}

    # LL smoothness: 0.25 lambda_max(X'X/n) + max exp(x), at the start
    lip = 0.25 * float(torch.linalg.eigvalsh(x_tr.T @ x_tr / n)[-1]) + math.exp(X0)
    lr, ul_lr = 1.0 / lip, 2.0
    base = {"lr": lr, "ul_lr": ul_lr}
    configs = {
        "SOBA": {**base, "ul_lr": 0.5, "options": {"batch_size": 256}},
        "SABA": {**base, "ul_lr": 0.5, "options": {"batch_size": 256}},
        "StocBiO": {**base, "iters": 10, "options": {"batch_size": 256, "neumann_steps": 10}},
        "AmIGO": {**base, "iters": 10, "options": {"batch_size": 256}},
        "BOME": {**base, "iters": 10, "options": {}},
        "PBGD": {**base, "iters": 10, "ul_lr": 0.5, "options": {"gamma": 10.0}},
        "BVFIM": {**base, "iters": 10, "options": {}},
        "MESO": {**base, "iters": 1, "options": {}},
        "GAFFO": {**base, "iters": 1, "options": {}},
        "Alternating": {**base, "iters": 10, "options": {}},
        "F2SA": {**base, "iters": 10, "ul_lr": 0.5, "options": {"lam": 10.0}},
        "Implicit": {**base, "iters": 20, "options": {"k": 20, "method": "cg"}, "warm": True},
        "Reverse": {**base, "iters": 20, "options": {}, "warm": True},
        "Truncated": {**base, "iters": 20, "options": {"truncate_iter": 5}, "warm": True},
    }
    return Setting(
        name="logreg",
        train=(x_tr, t_tr),
        val=(x_va, t_va),
        n_train=n,
        n_val=n,
        ll_objective=ll_objective,
        ul_objective=ul_objective,
        make_models=make_models,
        suboptimality=suboptimality,
        configs=configs,
        stop=1e-10,
        info={
            "dims": {"x": d, "w": d, "n_train": n, "n_val": n},
            "data": "GENERATED, ijcnn1's shape (49,990 x 22 train; as many validation rows)",
            "h_reference": h_ref,
            "reference_gradient_norm": float(grad_ref.norm()),
            "reference_x": ref_x.detach().tolist(),
            "reference_seconds": ref_seconds,
        },
    )


def cleaning_setting(
    root: str | None,
    n_train: int = 4000,
    n_val: int = CLEANING_VAL,
    reg: float = 1e-3,
    seed: int = 0,
) -> Setting:
    """MNIST data hyper-cleaning: LL = weighted multinomial logistic regression (weights
    ``sigmoid(x_i)``, one per train example, labels corrupted with probability 0.5 by a uniform
    class, benchopt's rule) + ``reg |W|^2 / 2``; UL = unweighted validation loss."""
    from bilevel.data import load_mnist

    images, labels = load_mnist(root, split="train")
    test_images, test_labels = load_mnist(root, split="test")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    tr, va = order[:n_train], order[n_train : n_train + n_val]
    to_x = lambda im: im.reshape(len(im), -1).to(DTYPE) / 255.0  # noqa: E731
    x_tr, y_tr = to_x(images[tr]), labels[tr].long().clone()
    x_va, y_va = to_x(images[va]), labels[va].long()
    x_te, y_te = to_x(test_images), test_labels.long()
    corrupt = torch.rand(n_train, generator=g) < 0.5
    y_tr[corrupt] = torch.randint(0, 10, (int(corrupt.sum()),), generator=g)
    corrupted = corrupt & (y_tr != labels[tr].long())

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.zeros(784, 10, dtype=DTYPE))
            self.b = nn.Parameter(torch.zeros(10, dtype=DTYPE))

    class Weights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = nn.Parameter(torch.zeros(n_train, dtype=DTYPE))

    index = torch.arange(n_train)

    def ll_objective(state: dict) -> torch.Tensor:
        (z, idx), t = state["data"], state["target"]
        m = state["ll_model"]
        losses = nn.functional.cross_entropy(z @ m.W + m.b, t, reduction="none")
        weights = torch.sigmoid(state["ul_model"].x[idx])
        return (weights * losses).mean() + 0.5 * reg * (m.W * m.W).sum()

    def ul_objective(state: dict) -> torch.Tensor:
        z, t = state["data"], state["target"]
        m = state["ll_model"]
        return nn.functional.cross_entropy(z @ m.W + m.b, t)

    def make_models() -> tuple[nn.Module, nn.Module]:
        return Linear(), Weights()

    lr = 1.0  # 0.5 lambda_max of the softmax Hessian is below 0.5 |x|^2 / n ~ about 1
    eval_steps = 150

    def suboptimality(ul_model: nn.Module, cache: dict) -> dict:
        W = cache.get("W", torch.zeros(784, 10, dtype=DTYPE))
        b = cache.get("b", torch.zeros(10, dtype=DTYPE))
        weights = torch.sigmoid(ul_model.x.detach())
        W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
        for _ in range(eval_steps if "W" not in cache else eval_steps // 3):
            losses = nn.functional.cross_entropy(x_tr @ W + b, y_tr, reduction="none")
            loss = (weights * losses).mean() + 0.5 * reg * (W * W).sum()
            gW, gb = _AUTOGRAD_GRAD(loss, (W, b))
            with torch.no_grad():
                W -= 2.0 * gW
                b -= 2.0 * gb
        cache["W"], cache["b"] = W.detach(), b.detach()
        with torch.no_grad():
            hv = float(nn.functional.cross_entropy(x_va @ W + b, y_va))
            test = float(((x_te @ W + b).argmax(1) == y_te).to(DTYPE).mean())
            flagged = weights < 0.5
            tp = int((flagged & corrupted).sum())
            prec = tp / max(int(flagged.sum()), 1)
            rec = tp / max(int(corrupted.sum()), 1)
            f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
        return {"h": hv, "test_accuracy": test, "f1": f1}

    base = {"lr": lr, "ul_lr": 100.0}
    configs = {
        "SOBA": {**base, "options": {"batch_size": 64, "ll_decay": 0, "ul_decay": 0}},
        "SABA": {**base, "ul_lr": 20.0, "options": {"batch_size": 64}},
        "StocBiO": {**base, "iters": 10, "options": {"batch_size": 64, "neumann_steps": 10}},
        "AmIGO": {**base, "iters": 10, "options": {"batch_size": 64}},
        "BOME": {**base, "iters": 10, "options": {}},
        "PBGD": {**base, "iters": 10, "options": {"gamma": 10.0}},
        "BVFIM": {**base, "iters": 10, "options": {}},
        "MESO": {**base, "iters": 1, "options": {}},
        "GAFFO": {**base, "iters": 1, "options": {}},
        "Alternating": {**base, "iters": 10, "options": {}},
        "F2SA": {**base, "iters": 10, "options": {"lam": 10.0}},
        "Implicit": {**base, "iters": 20, "options": {"k": 20, "method": "cg"}, "warm": True},
        "Reverse": {**base, "iters": 20, "options": {}, "warm": True},
        "Truncated": {**base, "iters": 20, "options": {"truncate_iter": 5}, "warm": True},
    }
    return Setting(
        name="cleaning",
        train=((x_tr, index), y_tr),
        val=(x_va, y_va),
        n_train=n_train,
        n_val=n_val,
        ll_objective=ll_objective,
        ul_objective=ul_objective,
        make_models=make_models,
        suboptimality=suboptimality,
        configs=configs,
        stop=-math.inf,
        info={
            "dims": {"n_train": n_train, "n_val": n_val, "n_test": len(y_te), "x": n_train},
            "corruption_probability": 0.5,
            "labels_changed": int(corrupted.sum()),
            "l2": reg,
        },
    )


# --- the runner -------------------------------------------------------------------------------


def _select_rows(data: Any, idx: torch.Tensor) -> Any:
    if isinstance(data, dict):
        return {k: v[idx] for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(_select_rows(v, idx) for v in data)
    return data[idx]


def run_method(setting: Setting, name: str, budget_s: float, max_steps: int) -> dict:
    """One method on one setting: records ``(time, calls, metrics)`` at geometric step counts."""
    cfg = setting.configs[name]
    torch.manual_seed(0)
    ll_model, ul_model = setting.make_models()
    if "x0" in cfg:
        with torch.no_grad():
            for p in ul_model.parameters():
                p.fill_(cfg["x0"])
    ll_obj = counted(setting.ll_objective, setting.n_train)
    ul_obj = counted(setting.ul_objective, setting.n_val)
    ll = GradientDescent(ll_obj, ll_model, ul_model, lr=cfg["lr"], iters=cfg.get("iters", 1))
    ul = CLASSES[name](ul_obj, ul_model, ll_obj, ll_model, **cfg["options"])
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=cfg["ul_lr"]))
    extra_per_step = 0
    if name == "Reverse":
        extra_per_step = cfg.get("iters", 1)
    elif name == "Truncated":
        extra_per_step = cfg["options"]["truncate_iter"]
    captured: dict[str, Any] = {}
    if cfg.get("warm"):
        original = ll.run

        def run(*args: Any, **kwargs: Any) -> Any:
            trajectory = original(*args, **kwargs)
            captured["weights"] = trajectory.weights
            return trajectory

        ll.run = run
    cache: dict = {}
    records = [{"step": 0, "time": 0.0, "calls": 0.0, **setting.suboptimality(ul_model, cache)}]
    COUNT["calls"], elapsed, step, next_record = 0.0, 0.0, 0, 1
    status = "budget"
    while elapsed < budget_s and step < max_steps:
        start = time.perf_counter()
        try:
            problem.step(setting.train, setting.val)
        except (RuntimeError, ValueError, FloatingPointError) as error:
            status = f"stopped: {type(error).__name__}: {str(error)[:200]}"
            break
        if captured:
            with torch.no_grad():
                for p, w in zip(ll_model.parameters(), captured["weights"], strict=True):
                    p.copy_(w.detach())
        if extra_per_step:
            COUNT["calls"] += extra_per_step * COUNT["weight"]
        elapsed += time.perf_counter() - start
        step += 1
        if step >= next_record:
            metrics = setting.suboptimality(ul_model, cache)
            records.append({"step": step, "time": elapsed, "calls": COUNT["calls"], **metrics})
            next_record = max(step + 1, int(step * 1.2))
            value = metrics.get("subopt", metrics.get("h"))
            if not math.isfinite(value):
                status = "diverged (non-finite metric)"
                break
            if value < setting.stop:
                status = "reached stop"
                break
    if records[-1]["step"] != step:
        records.append(
            {
                "step": step,
                "time": elapsed,
                "calls": COUNT["calls"],
                **setting.suboptimality(ul_model, cache),
            }
        )
    return {
        "method": name,
        "config": {k: v for k, v in cfg.items()},
        "status": status,
        "steps": step,
        "records": records,
    }


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--problems",
        type=names(SHARES),
        default="quadratic,logreg,cleaning",
        help="comma-separated problems among quadratic, logreg, cleaning (default: all three)",
    )
    parser.add_argument(
        "--methods",
        type=names(ALL_METHODS),
        default=",".join(ALL_METHODS),
        help="comma-separated methods (default: all fourteen)",
    )
    parser.add_argument(
        "--max-minutes",
        type=positive,
        default=15.0,
        help="total time budget; each problem gets a share (quadratic 15%%, logreg 30%%, "
        "cleaning 45%%; the rest covers setup and evaluations), split evenly among methods",
    )
    parser.add_argument(
        "--max-steps", type=count, default=100_000, help="most UL steps per method (default 1e5)"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding MNIST/ (default: $BILEVEL_DATA)",
    )
    parser.add_argument(
        "--cleaning-train",
        type=count,
        default=4000,
        help="MNIST train examples for hyper-cleaning (default 4000)",
    )
    parser.add_argument(
        "--threads", type=count, default=1, help="torch intra-op threads (default 1)"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace only the --methods runs in --out (same per-method budget: --max-minutes "
        "scaled by the number of methods), recording the update",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/bilevel_curves.json",
        help="JSON file written (default benchmarks/results/bilevel_curves.json)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = make_parser()
    args = parser.parse_args(argv)
    most = MNIST_TRAIN - CLEANING_VAL
    if args.cleaning_train > most:
        parser.error(
            f"--cleaning-train {args.cleaning_train}: at most {most} (MNIST's {MNIST_TRAIN} "
            f"training images, less {CLEANING_VAL} for validation)"
        )
    if args.update and not Path(args.out).is_file():
        parser.error(f"--update replaces runs in --out, and there is no file {args.out}")
    return args


SHARES = {"quadratic": 0.15, "logreg": 0.30, "cleaning": 0.45}


def updated(path: Path, new: dict, methods: list[str]) -> dict:
    """The results in ``path`` with the runs of ``methods`` replaced by those of ``new``
    (each problem's per-method budget must be the same), the update recorded."""
    if not path.exists():
        raise SystemExit(f"--update: {path} does not exist; run without --update first.")
    old = json.loads(path.read_text())
    for pname, problem in new["problems"].items():
        if pname not in old["problems"]:
            raise SystemExit(f"--update: {path} has no problem {pname!r}.")
        kept = old["problems"][pname]
        if abs(kept["budget_per_method_s"] - problem["budget_per_method_s"]) > 1e-6 * max(
            1.0, kept["budget_per_method_s"]
        ):
            raise SystemExit(
                f"--update: {pname}: {problem['budget_per_method_s']:.2f} s per method, but "
                f"{path} gave {kept['budget_per_method_s']:.2f} s; choose --max-minutes so "
                "that they agree."
            )
        fresh = {run["method"]: run for run in problem["runs"]}
        kept["runs"] = [fresh.get(run["method"], run) for run in kept["runs"]]
    old.setdefault("updates", []).append(
        {k: new[k] for k in ("command", "date", "git", "machine", "wall_seconds")}
        | {"methods": methods}
    )
    return old


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    problems = [p for p in args.problems.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    root = args.data_root  # (None: BILEVEL_DATA, or the loader's message naming both)
    torch.autograd.grad = _counting_grad
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": common.command_line(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git": common.git_revision(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "max_minutes": args.max_minutes,
        "problems": {},
    }
    for pname in problems:
        t0 = time.perf_counter()
        if pname == "quadratic":
            setting = quadratic_setting()
        elif pname == "logreg":
            setting = logreg_setting()
        elif pname == "cleaning":
            setting = cleaning_setting(root, n_train=args.cleaning_train)
        else:
            raise ValueError(f"--problems: unknown problem {pname!r}.")
        setup = time.perf_counter() - t0
        budget = SHARES[pname] * args.max_minutes * 60 / len(methods)
        print(f"[{pname}] setup {setup:.1f}s, {budget:.1f}s per method", flush=True)
        runs = []
        for m in methods:
            out = run_method(setting, m, budget, args.max_steps)
            last = out["records"][-1]
            shown = {k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()}
            print(f"  {m:12s} {out['status'][:60]:60s} {shown}", flush=True)
            runs.append(out)
        result["problems"][pname] = {
            "info": setting.info,
            "setup_seconds": setup,
            "budget_per_method_s": budget,
            "runs": runs,
        }
    result["wall_seconds"] = time.perf_counter() - started
    if args.update:
        result = updated(Path(args.out), result, methods)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} in {result['wall_seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
