"""Small float64 bilevel problems with closed-form answers, shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DTYPE = torch.float64


class Linear(nn.Module):
    """``x @ w``: the LL model."""

    def __init__(self, d: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=DTYPE) if init is None else init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class FeatureL2(nn.Module):
    """One L2 penalty per feature, ``exp(log_l2)``: the UL model."""

    def __init__(self, d: int, value: float = 0.3) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.full((d,), float(torch.tensor(value).log()), dtype=DTYPE))

    def penalty(self, ll_model: nn.Module) -> torch.Tensor:
        w = next(iter(ll_model.parameters()))
        return 0.5 * (self.log_l2.exp() * w * w).sum()


def ridge_ll(state: dict) -> torch.Tensor:
    """Mean squared error / 2 plus the per-feature penalty."""
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean() + state["ul_model"].penalty(state["ll_model"])


def ridge_ul(state: dict) -> torch.Tensor:
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean()


def logistic_ll(state: dict) -> torch.Tensor:
    logits = state["ll_model"](state["data"])
    loss = F.binary_cross_entropy_with_logits(logits, state["target"])
    return loss + state["ul_model"].penalty(state["ll_model"])


def logistic_ul(state: dict) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(state["ll_model"](state["data"]), state["target"])


@dataclass
class Problem:
    ll_model: Linear
    ul_model: FeatureL2
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]

    @property
    def l2(self) -> torch.Tensor:
        return self.ul_model.log_l2.detach().exp()


def ridge(n: int = 60, d: int = 5, seed: int = 0, scale: float = 1.0, l2: float = 0.3) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g, dtype=DTYPE)
    w_true = torch.randn(d, generator=g, dtype=DTYPE)
    y = x @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    xv = scale * torch.randn(n, d, generator=g, dtype=DTYPE)
    yv = xv @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    return Problem(Linear(d), FeatureL2(d, l2), (x, y), (xv, yv))


def ridge_hessian(p: Problem) -> torch.Tensor:
    x = p.train[0]
    return x.T @ x / len(x) + torch.diag(p.l2)


def ridge_solution(p: Problem) -> torch.Tensor:
    x, y = p.train
    return torch.linalg.solve(ridge_hessian(p), x.T @ y / len(x))


def ridge_ul_grad_w(p: Problem, w: torch.Tensor) -> torch.Tensor:
    xv, yv = p.val
    return xv.T @ (xv @ w - yv) / len(xv)


def ridge_exact_hypergradient(p: Problem) -> torch.Tensor:
    """IFT: -(dg/dlog_l2)^T H^{-1} v with dg_i/dlog_l2_i = exp(log_l2_i) w_i."""
    w = ridge_solution(p)
    q = torch.linalg.solve(ridge_hessian(p), ridge_ul_grad_w(p, w))
    return -(p.l2 * w) * q


def ridge_truncated_hypergradient(p: Problem, lr: float, k: int) -> torch.Tensor:
    """K-step reverse at the fixed point: -lr (dg/dlambda)^T sum_{j<K} (I - lr H)^j v."""
    w = ridge_solution(p)
    h = ridge_hessian(p)
    b = torch.eye(len(w), dtype=DTYPE) - lr * h
    term, total = ridge_ul_grad_w(p, w), torch.zeros_like(w)
    for _ in range(k):
        total = total + term
        term = b @ term
    return -lr * (p.l2 * w) * total


def logistic(n: int = 80, d: int = 4, seed: int = 0, l2: float = 0.5) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    w_true = 2 * torch.randn(d, generator=g, dtype=DTYPE)
    y = (torch.rand(n, generator=g, dtype=DTYPE) < torch.sigmoid(x @ w_true)).to(DTYPE)
    xv = torch.randn(n, d, generator=g, dtype=DTYPE)
    yv = (torch.rand(n, generator=g, dtype=DTYPE) < torch.sigmoid(xv @ w_true)).to(DTYPE)
    return Problem(Linear(d), FeatureL2(d, l2), (x, y), (xv, yv))


def logistic_exact_hypergradient(p: Problem) -> torch.Tensor:
    """Newton's method to the LL solution, then a dense Hessian solve."""
    x, y = p.train
    w = torch.zeros(x.shape[1], dtype=DTYPE)
    for _ in range(50):
        s = torch.sigmoid(x @ w)
        grad = x.T @ (s - y) / len(x) + p.l2 * w
        h = x.T @ (x * (s * (1 - s))[:, None]) / len(x) + torch.diag(p.l2)
        w = w - torch.linalg.solve(h, grad)
    xv, yv = p.val
    v = xv.T @ (torch.sigmoid(xv @ w) - yv) / len(xv)
    return -(p.l2 * w) * torch.linalg.solve(h, v)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
