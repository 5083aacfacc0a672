"""The benchmark problems: data, objectives as plain functions of tensors, exact answers.

Every implementation (ours, the bare ``torch.func`` floor, BOAT, TorchOpt) evaluates the same
objective functions defined here on the same data, so that only the machinery around them
differs. This module imports torch only (and the library's network from its file): the peers'
virtual environments import it too.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------- regression


@dataclass
class Regression:
    """A linear LL model ``w`` with L2 penalties ``exp(log_l2)`` on groups of features.

    ``group[i]`` is the penalty of feature ``i`` (one per feature: ``arange(d)``).
    ``kind`` is ``"ridge"`` (squared loss) or ``"logistic"`` (labels in {0, 1}).
    """

    kind: str
    x: Tensor
    y: Tensor
    xv: Tensor
    yv: Tensor
    group: Tensor
    log_l2: Tensor
    lr: float
    scale: float

    @property
    def d(self) -> int:
        return self.x.shape[1]

    def w0(self) -> Tensor:
        """The LL starting point (zeros)."""
        return torch.zeros(self.d, dtype=self.x.dtype, device=self.x.device)


def penalty(w: Tensor, log_l2: Tensor, group: Tensor) -> Tensor:
    """``0.5 * sum_i exp(log_l2[group[i]]) * w_i^2``."""
    return 0.5 * (log_l2.exp()[group] * w * w).sum()


def data_loss(kind: str, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error / 2 (ridge) or mean logistic loss (logistic) of ``x @ w``."""
    z = x @ w
    if kind == "ridge":
        return 0.5 * ((z - y) ** 2).mean()
    return F.binary_cross_entropy_with_logits(z, y)


def regression_ll(p: Regression, w: Tensor, log_l2: Tensor) -> Tensor:
    """LL objective: training loss plus the penalties."""
    return data_loss(p.kind, w, p.x, p.y) + penalty(w, log_l2, p.group)


def regression_ul(p: Regression, w: Tensor) -> Tensor:
    """UL objective: validation loss."""
    return data_loss(p.kind, w, p.xv, p.yv)


def regression(
    kind: str,
    n: int,
    d: int,
    groups: int | None = None,
    l2: float = 0.1,
    lr: float = 0.3,
    dtype: str = "float64",
    seed: int = 0,
) -> Regression:
    """Generate a regression problem with train and validation sets of ``n`` rows each.

    Features are standard normal, divided by ``1 + sqrt(d / n)`` when ``d > n / 10`` so that
    the largest eigenvalue of ``X^T X / n`` stays near 1 (Marchenko-Pastur) and the LL step
    ``lr`` converges; ``scale`` records the factor.
    """
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    scale = 1.0 / (1.0 + math.sqrt(d / n)) if d > n / 10 else 1.0
    x = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    xv = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64) * (torch.rand(d, generator=g) < 0.5)
    if kind == "ridge":
        y = x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        yv = xv @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    else:
        y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w_true)).double()
        yv = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(xv @ w_true)).double()
    m = d if groups is None else groups
    group = torch.arange(d) * m // d
    log_l2 = torch.full((m,), math.log(l2), dtype=dt)
    return Regression(kind, x.to(dt), y.to(dt), xv.to(dt), yv.to(dt), group, log_l2, lr, scale)


def _data_hessian(kind: str, x: Tensor, w: Tensor) -> Tensor:
    """Hessian of ``data_loss(kind, ., x, y)`` at ``w`` (it does not depend on ``y``)."""
    if kind == "ridge":
        return x.T @ x / len(x)
    s = torch.sigmoid(x @ w)
    return x.T @ (x * (s * (1 - s))[:, None]) / len(x)


def _hessian(p: Regression, w: Tensor, l2: Tensor) -> Tensor:
    return _data_hessian(p.kind, p.x, w) + torch.diag(l2[p.group])


def _fit(kind: str, x: Tensor, y: Tensor, l2: Tensor) -> Tensor:
    """``argmin_w data_loss(kind, w, x, y) + 0.5 sum_i l2_i w_i^2`` (``l2`` per feature): a
    dense solve (ridge) or Newton's method from zero (logistic), in the dtype of ``x``."""
    w = torch.zeros(x.shape[1], dtype=x.dtype)
    if kind == "ridge":
        return torch.linalg.solve(_data_hessian(kind, x, w) + torch.diag(l2), x.T @ y / len(x))
    for _ in range(100):
        grad = x.T @ (torch.sigmoid(x @ w) - y) / len(x) + l2 * w
        step = torch.linalg.solve(_data_hessian(kind, x, w) + torch.diag(l2), grad)
        w = w - step
        if float(step.norm()) < 1e-15 * (1 + float(w.norm())):
            break
    return w


def exact_solution(p: Regression) -> Tensor:
    """The LL minimizer ``w*(lambda)`` in float64: closed form (ridge) or Newton (logistic)."""
    q = _float64(p)
    return _fit(q.kind, q.x, q.y, q.log_l2.exp()[q.group])


def ul_minimizer(p: Regression) -> Tensor:
    """The minimizer of the UL objective (the validation loss, no penalty) in float64: least
    squares (ridge) or Newton's method (logistic). It does not depend on the penalties."""
    q = _float64(p)
    return _fit(q.kind, q.xv, q.yv, torch.zeros(q.d, dtype=torch.float64))


def exact_hypergradient(p: Regression) -> Tensor:
    """Implicit-function-theorem hypergradient at the exact LL minimizer, in float64:
    ``-(dg/dlambda)^T H^{-1} grad_w L_ul`` with ``dg_i/dlambda_{group[i]} = l2 w_i``."""
    q = _float64(p)
    w = exact_solution(p)
    v = torch.autograd.functional.jacobian(lambda u: regression_ul(q, u), w)
    h = _hessian(q, w, q.log_l2.exp())
    sol = torch.linalg.solve(h, v)
    per_feature = -(q.log_l2.exp()[q.group] * w) * sol
    return torch.zeros_like(q.log_l2).index_add_(0, q.group, per_feature)


def exact_unrolled_hypergradient(p: Regression, steps: int) -> Tensor:
    """Ridge only: the exact gradient of ``lambda -> L_ul(w_T(lambda))`` for ``T`` GD steps
    from zero, from the closed form ``w_T = H^{-1} (I - (I - lr H)^T) b`` (dense, float64,
    differentiated by autograd)."""
    if p.kind != "ridge":
        raise ValueError("the unrolled closed form exists for ridge only")
    q = _float64(p)
    b = q.x.T @ q.y / len(q.x)
    eye = torch.eye(q.d, dtype=torch.float64)

    def ul_of(log_l2: Tensor) -> Tensor:
        h = q.x.T @ q.x / len(q.x) + torch.diag(log_l2.exp()[q.group])
        power = torch.linalg.matrix_power(eye - q.lr * h, steps)
        w_t = torch.linalg.solve(h, (eye - power) @ b)
        return regression_ul(q, w_t)

    return torch.autograd.functional.jacobian(ul_of, q.log_l2)


def _float64(p: Regression) -> Regression:
    f = {k: getattr(p, k).double() for k in ("x", "y", "xv", "yv", "log_l2")}
    return Regression(p.kind, group=p.group, lr=p.lr, scale=p.scale, **f)


def relative_error(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- hyper-cleaning


@dataclass
class Cleaning:
    """Data hyper-cleaning: one weight ``sigmoid(lambda_i)`` per training example of a linear
    softmax classifier (Franceschi et al. 2017). Random MNIST-shaped data."""

    x: Tensor
    y: Tensor
    xv: Tensor
    yv: Tensor
    lam: Tensor
    lr: float
    reg: float
    classes: int


def cleaning(
    n: int = 5000, n_val: int = 5000, d: int = 784, classes: int = 10, dtype: str = "float32"
) -> Cleaning:
    """Random inputs, labels from a random linear teacher, 30% of training labels flipped."""
    g = torch.Generator().manual_seed(1)
    dt = DTYPES[dtype]
    teacher = torch.randn(d, classes, generator=g)
    x = torch.randn(n, d, generator=g) / math.sqrt(d)
    xv = torch.randn(n_val, d, generator=g) / math.sqrt(d)
    y = (x @ teacher).argmax(1)
    yv = (xv @ teacher).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.3
    y[noisy] = torch.randint(classes, (int(noisy.sum()),), generator=g)
    lam = torch.zeros(n, dtype=dt)
    return Cleaning(x.to(dt), y, xv.to(dt), yv, lam, lr=0.5, reg=1e-3, classes=classes)


def cleaning_ll(c: Cleaning, weight: Tensor, bias: Tensor, lam: Tensor) -> Tensor:
    """Example-weighted cross-entropy plus a small L2 on the weights."""
    losses = F.cross_entropy(c.x @ weight + bias, c.y, reduction="none")
    return (torch.sigmoid(lam) * losses).mean() + 0.5 * c.reg * (weight * weight).sum()


def cleaning_ul(c: Cleaning, weight: Tensor, bias: Tensor) -> Tensor:
    """Validation cross-entropy."""
    return F.cross_entropy(c.xv @ weight + bias, c.yv)


# --------------------------------------------------------------------------- meta-learning


def _library_conv() -> ModuleType:
    """``bilevel/models/conv.py`` loaded from its file, so that every implementation runs the
    library's own network: the peers' environments cannot import the ``bilevel`` package (its
    ``__init__`` needs ``higher`` and ``tqdm``), and this file needs torch only."""
    path = Path(__file__).resolve().parent.parent / "bilevel" / "models" / "conv.py"
    spec = importlib.util.spec_from_file_location("benchmark_conv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FewShotNet = _library_conv().FewShotNet


@dataclass
class Meta:
    """An Omniglot-shaped meta-batch of random tasks (N-way K-shot, Q queries per class)."""

    xs: Tensor  # [B, N*K, 1, 28, 28]
    ys: Tensor  # [B, N*K]
    xq: Tensor  # [B, N*Q, 1, 28, 28]
    yq: Tensor  # [B, N*Q]
    ways: int
    lr: float
    steps: int
    reg: float
    cg_iters: int

    @property
    def batch(self) -> int:
        return self.xs.shape[0]


def meta(batch: int, ways: int = 5, shots: int = 1, queries: int = 15, steps: int = 5) -> Meta:
    """Random tensors of the shapes of an Omniglot meta-batch. Inner lr 0.1 (MAML's 0.4 makes
    the LL diverge on random inputs); iMAML proximal strength 2 and 5 CG iterations."""
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(batch, ways * shots, 1, 28, 28, generator=g)
    xq = torch.randn(batch, ways * queries, 1, 28, 28, generator=g)
    ys = torch.arange(ways).repeat_interleave(shots).expand(batch, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(batch, -1).contiguous()
    return Meta(xs, ys, xq, yq, ways, lr=0.1, steps=steps, reg=2.0, cg_iters=5)


def meta_network(m: Meta) -> nn.Module:
    """``bilevel.models.FewShotNet`` with a fixed initialization (the same for every
    implementation)."""
    torch.manual_seed(3)
    return FewShotNet(m.ways).to(m.xs.device)


def proximal(params: list[Tensor], anchor: list[Tensor], reg: float) -> Tensor:
    """iMAML's proximal term ``reg/2 * ||w - theta||^2``."""
    return 0.5 * reg * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))


# --------------------------------------------------------------------------- configurations


def to_device(problem: Any, device: str) -> Any:
    """The problem with every tensor field moved to ``device``."""
    for name, value in vars(problem).items():
        if isinstance(value, Tensor):
            setattr(problem, name, value.to(device))
    return problem


def build(config: dict[str, Any]) -> Any:
    """The problem object of a configuration, on ``config["device"]`` (CPU by default)."""
    return to_device(_build(config), config.get("device", "cpu"))


def _build(config: dict[str, Any]) -> Any:
    name = config["problem"]
    if name == "ridge":
        return regression("ridge", 200, 20, lr=0.3, dtype=config.get("dtype", "float64"))
    if name == "ridge_large":
        return regression(
            "ridge", 1000, 2000, groups=20, lr=0.3, dtype=config.get("dtype", "float32")
        )
    if name == "logistic":
        return regression("logistic", 1000, 100, lr=1.0, dtype=config.get("dtype", "float64"))
    if name == "cleaning":
        return cleaning(dtype=config.get("dtype", "float32"))
    if name == "meta":
        return meta(config["batch"])
    raise ValueError(f"unknown problem {name!r}")


@dataclass
class Spec:
    """A problem as functions of lists of tensors: ``ll(ws, lams)``, ``ul(ws, lams)``, the LL
    start ``w0``, the UL variables ``lam0`` and the LL step ``lr``."""

    ll: Any
    ul: Any
    w0: list[Tensor]
    lam0: list[Tensor]
    lr: float
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]


def spec(problem: Regression | Cleaning) -> Spec:
    """The functional form of a regression or hyper-cleaning problem."""
    if isinstance(problem, Regression):
        p = problem
        return Spec(
            lambda ws, lams: regression_ll(p, ws[0], lams[0]),
            lambda ws, lams: regression_ul(p, ws[0]),
            [p.w0()],
            [p.log_l2],
            p.lr,
            (p.x, p.y),
            (p.xv, p.yv),
        )
    c = problem
    zeros = c.x.new_zeros
    return Spec(
        lambda ws, lams: cleaning_ll(c, ws[0], ws[1], lams[0]),
        lambda ws, lams: cleaning_ul(c, ws[0], ws[1]),
        [zeros(c.x.shape[1], c.classes), zeros(c.classes)],
        [c.lam],
        c.lr,
        (c.x, c.y),
        (c.xv, c.yv),
    )
