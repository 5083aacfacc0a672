"""The LL update rules and every form of their hyperparameters, across the hypergradient
methods, in float64, against a hand-written unroll.

Rules (``bilevel.ll.rules``): SGD (heavy ball, dampening, weight decay), Nesterov, Adam,
AdamW, RMSprop (with and without momentum), Adagrad (lr decay, initial accumulator), given
as rule objects or by name with GradientDescent's ``momentum`` / ``betas`` / ``eps``. Forms
of each hyperparameter: a number, a 0-d UL leaf (a learned step size, momentum, beta, eps,
weight decay, ...), a per-step schedule (a 1-d UL leaf of length ``iters``), a per-parameter
list (numbers and UL leaves mixed; a tensor without momentum beside one with), per-element
UL tensors shaped like their parameter (Meta-SGD), tensors that are no UL variable,
callables of the UL model (returning a number, a scalar, a schedule or per-element values);
also with the LL's initial weights as UL variables (MAML).

The reference is written here from the rules' standard definitions (the formulas of the
``torch.optim`` documentation; checked against ``torch.optim`` itself for numbers), unrolled
on plain tensors with ``torch.autograd``:

(a) ``Reverse``: the hypergradient in the L2 strength and in every hyperparameter that is a
    UL variable; also with BDA's aggregated steps;
(b) ``Forward`` equals the reference (tangents through momentum buffers, Adam moments, bias
    correction, eps);
(c) ``MemorySavingReverse`` equals it; ``Truncated(K)`` equals the hand truncation (the
    steps before the window, and the rule's state entering it, are constants); ``PTT``
    equals the hand pick of the worst iterate;
(d) ``OnlineHypergradient`` with ``Forward`` (RTHO) and ``Truncated`` against a hand-written
    online loop over three UL updates (the LL and its optimizer state continue across
    updates, the UL optimizer steps in between, hyperparameters are those of the current UL
    point);
(e) two consecutive UL steps through ``BilevelProblem.step``;
and ``Implicit`` behind non-SGD rules: exact at a converged LL; with an L2 weight decay in
the rule it must take the decay into account or refuse. Hyperparameter tensors of another
dtype than the LL model's are refused (they would run rounded).

Reference for RTHO: Franceschi, Donini, Frasconi & Pontil (2017), "Forward and Reverse
Gradient-Based Hyperparameter Optimization", ICML."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import BDA, GradientDescent, rules
from bilevel.online import OnlineHypergradient
from bilevel.ul import PTT, Forward, Implicit, MemorySavingReverse, Reverse, Truncated

DTYPE = torch.float64
T = 6  # LL steps; not 2 or 3: a (2,)-shaped value would also read as a per-step schedule
K = 2  # Truncated's window
UL_LR = 0.01  # small enough that learned eps and step sizes stay in range
RTOL = 1e-10
BDA_OPTIONS = {"alpha": 0.5, "alpha_decay": 0.7, "ul_scale": 1.5}
Tensors = list[torch.Tensor]

_gen = torch.Generator().manual_seed(20)
X = torch.randn(12, 3, generator=_gen, dtype=DTYPE)
Y = (torch.rand(12, 2, generator=_gen, dtype=DTYPE) > 0.5).to(DTYPE)
XV = torch.randn(9, 3, generator=_gen, dtype=DTYPE)
YV = (torch.rand(9, 2, generator=_gen, dtype=DTYPE) > 0.5).to(DTYPE)
W0 = 0.5 * torch.randn(3, 2, generator=_gen, dtype=DTYPE)
B0 = 0.2 * torch.randn(2, generator=_gen, dtype=DTYPE)
TRAIN, VAL = (X, Y), (XV, YV)
SHAPES = [W0.shape, B0.shape]


# ------------------------------------------------------------------------ models, objectives


class Net(nn.Module):
    """The LL model: ``x @ w + b`` (two parameter tensors of different shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(W0.clone())
        self.b = nn.Parameter(B0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class Hypers(nn.Module):
    """The UL model: an L2 strength on a log scale, and the hyperparameters that are UL
    variables (in ``h``, in the order the case declares them)."""

    def __init__(self, values: dict[str, torch.Tensor], net: Net | None = None) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))
        # pairs, not a dict: ParameterDict sorts a dict's keys
        self.h = nn.ParameterDict([(k, nn.Parameter(v.clone())) for k, v in values.items()])
        if net is not None:  # MAML: the LL's initial weights are UL variables too
            self.net = net


def bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, y)


def ll_objective(state: dict) -> torch.Tensor:
    m, u = state["ll_model"], state["ul_model"]
    return bce(m(state["data"]), state["target"]) + 0.5 * u.log_l2.exp() * (m.w * m.w).sum()


def ul_objective(state: dict) -> torch.Tensor:
    return bce(state["ll_model"](state["data"]), state["target"])


def f_hand(W: Tensors, U: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """``ll_objective`` on plain tensors."""
    return bce(x @ W[0] + W[1], y) + 0.5 * U["log_l2"].exp() * (W[0] * W[0]).sum()


def F_hand(W: Tensors, U: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """``ul_objective`` on plain tensors."""
    return bce(x @ W[0] + W[1], y)


# ------------------------------------------------------------------- hyperparameter forms


class Form:
    """One hyperparameter as the user gives it (``lib``) and as the reference reads it
    (``resolve``: once per run, on the UL leaves ``U``; then ``(step, parameter) -> value``)."""

    def ul_values(self) -> dict[str, torch.Tensor]:
        return {}

    def lib(self, ul: Hypers) -> Any:
        raise NotImplementedError

    def resolve(self, U: dict[str, torch.Tensor]) -> Callable[[int, int], Any]:
        raise NotImplementedError


@dataclass
class Num(Form):
    value: float

    def lib(self, ul: Hypers) -> Any:
        return self.value

    def resolve(self, U):
        return lambda t, i: self.value


@dataclass
class Leaf(Form):
    """A UL parameter used as the hyperparameter itself (0-d), or per element (shaped like
    its LL parameter) inside a per-parameter list."""

    name: str
    value: Any

    def ul_values(self):
        return {self.name: torch.as_tensor(self.value, dtype=DTYPE).clone()}

    def lib(self, ul: Hypers) -> Any:
        return ul.h[self.name]

    def resolve(self, U):
        return lambda t, i: U[self.name]


@dataclass
class Sched(Form):
    """A per-step schedule: a 1-d UL parameter of length ``T``."""

    name: str
    values: list[float]

    def ul_values(self):
        assert len(self.values) == T
        return {self.name: torch.tensor(self.values, dtype=DTYPE)}

    def lib(self, ul: Hypers) -> Any:
        return ul.h[self.name]

    def resolve(self, U):
        return lambda t, i: U[self.name][t]


@dataclass
class Call(Form):
    """A callable of the UL model, ``fn(raw UL parameter)``, evaluated once per run."""

    name: str
    value: Any
    fn: Callable[[torch.Tensor], torch.Tensor]

    def ul_values(self):
        return {self.name: torch.as_tensor(self.value, dtype=DTYPE).clone()}

    def lib(self, ul: Hypers) -> Any:
        return lambda u: self.fn(u.h[self.name])

    def resolve(self, U):
        value = self.fn(U[self.name])
        if value.ndim == 1 and value.shape == (T,):
            return lambda t, i: value[t]
        return lambda t, i: value


@dataclass
class PerParam(Form):
    """One form per LL parameter tensor (``w``, then ``b``)."""

    items: list[Form]

    def ul_values(self):
        out = {}
        for item in self.items:
            out.update(item.ul_values())
        return out

    def lib(self, ul: Hypers) -> Any:
        return [item.lib(ul) for item in self.items]

    def resolve(self, U):
        parts = [item.resolve(U) for item in self.items]
        return lambda t, i: parts[i](t, i)


@dataclass
class Fixed(Form):
    """A tensor that is no UL variable (no grad): a number, a schedule or per-element values.
    A tensor coefficient is always applied, whatever its value (the rules' documented
    convention; a zero tensor momentum still applies its dampening)."""

    value: Any

    def lib(self, ul: Hypers) -> Any:
        return torch.as_tensor(self.value, dtype=DTYPE).clone()

    def resolve(self, U):
        value = torch.as_tensor(self.value, dtype=DTYPE)
        if value.shape == (T,):
            return lambda t, i: value[t]
        return lambda t, i: value


@dataclass
class ConstCall(Form):
    """A callable of the UL model that returns a Python number (a number, evaluated per run:
    a zero skips its term as a number does)."""

    value: float

    def lib(self, ul: Hypers) -> Any:
        return lambda u: self.value

    def resolve(self, U):
        return lambda t, i: float(self.value)


def exp(x: torch.Tensor) -> torch.Tensor:
    return x.exp()


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def elem(name: str, index: int, low: float, high: float) -> Leaf:
    """A per-element UL tensor shaped like LL parameter ``index``, values in ``[low, high]``."""
    n = math.prod(SHAPES[index])
    return Leaf(name, torch.linspace(low, high, n, dtype=DTYPE).reshape(SHAPES[index]))


def sched(name: str, first: float, last: float) -> Sched:
    return Sched(name, torch.linspace(first, last, T, dtype=DTYPE).tolist())


DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"momentum": 0.0, "weight_decay": 0.0, "dampening": 0.0},
    "nesterov": {"momentum": 0.9, "weight_decay": 0.0},
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2},
    "rmsprop": {"alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0},
    "adagrad": {
        "lr_decay": 0.0,
        "eps": 1e-10,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
    },
}


@dataclass
class Case:
    """An update rule with its hyperparameters (``lr`` included), each in some form.

    ``keywords``: the rule by name, with ``momentum`` / ``betas`` / ``eps`` given as
    GradientDescent's keywords (otherwise a rule object of ``bilevel.ll.rules``); ``maml``:
    the UL model holds the LL model, whose initial weights are then UL variables too."""

    id: str
    rule: str
    forms: dict[str, Form]
    keywords: bool = False
    maml: bool = False
    ul_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        values: dict[str, torch.Tensor] = {}
        for form in self.forms.values():
            values.update(form.ul_values())
        self.values = values
        self.ul_names = ["log_l2", *values] + (["net.w", "net.b"] if self.maml else [])

    def models(self) -> tuple[Net, Hypers]:
        net = Net()
        return net, Hypers(self.values, net if self.maml else None)

    def given(self, ul: Hypers) -> dict[str, Any]:
        """The rule's hyperparameters as the user passes them (``betas`` as a pair)."""
        given = {k: v.lib(ul) for k, v in self.forms.items() if k != "lr"}
        if "beta1" in given or "beta2" in given:
            defaults = DEFAULTS[self.rule]
            given["betas"] = (
                given.pop("beta1", defaults["beta1"]),
                given.pop("beta2", defaults["beta2"]),
            )
        return given

    def ll(self, net: Net, ul: Hypers, bda: bool = False, iters: int = T) -> GradientDescent:
        lr, given = self.forms["lr"].lib(ul), self.given(ul)
        options = given if self.keywords else {}
        optimizer = self.rule if self.keywords else rules.RULES[self.rule](**given)
        if bda:
            return BDA(
                ll_objective,
                net,
                ul,
                lr,
                iters,
                ul_objective=ul_objective,
                optimizer=optimizer,
                **options,
                **BDA_OPTIONS,
            )
        return GradientDescent(ll_objective, net, ul, lr, iters, optimizer=optimizer, **options)

    def resolve(self, U: dict[str, torch.Tensor]) -> dict[str, Callable[[int, int], Any]]:
        out = {k: Num(v).resolve(U) for k, v in DEFAULTS[self.rule].items()}
        out.update({k: form.resolve(U) for k, form in self.forms.items()})
        return out


CASES = [
    Case("sgd-plain", "sgd", {"lr": Num(0.5)}),
    Case("sgd-plain-leaf-lr", "sgd", {"lr": Leaf("lr", 0.5)}),
    Case(  # plain SGD with one number per tensor: the w - lr * g shortcut
        "sgd-plain-per-parameter",
        "sgd",
        {"lr": PerParam([Num(0.5), Num(0.3)]), "weight_decay": PerParam([Num(0.0), Num(0.0)])},
    ),
    Case(
        "sgd-numbers",
        "sgd",
        {"lr": Num(0.4), "momentum": Num(0.7), "weight_decay": Num(0.03), "dampening": Num(0.2)},
    ),
    Case(
        "sgd-leaves",
        "sgd",
        {
            "lr": Leaf("lr", 0.4),
            "momentum": Leaf("mu", 0.6),
            "weight_decay": Leaf("wd", 0.05),
            "dampening": Leaf("damp", 0.3),
        },
    ),
    Case(
        "sgd-schedules",
        "sgd",
        {
            "lr": sched("lr", 0.6, 0.2),
            "momentum": sched("mu", 0.3, 0.8),
            "weight_decay": sched("wd", 0.01, 0.08),
            "dampening": Num(0.1),
        },
    ),
    Case(
        "sgd-per-parameter",
        "sgd",
        {
            "lr": PerParam([Leaf("lr_w", 0.5), Num(0.3)]),
            "momentum": PerParam([Num(0.0), Leaf("mu_b", 0.6)]),  # one tensor has no buffer
            "weight_decay": PerParam([Leaf("wd_w", 0.04), Num(0.0)]),
        },
    ),
    Case(
        "sgd-per-element",
        "sgd",
        {
            "lr": PerParam([elem("lr_w", 0, 0.2, 0.7), elem("lr_b", 1, 0.3, 0.5)]),
            "momentum": PerParam([elem("mu_w", 0, 0.2, 0.8), Num(0.5)]),
        },
    ),
    Case(
        "sgd-callables",
        "sgd",
        {
            "lr": Call("log_lr", math.log(0.4), exp),
            "momentum": Call("mu_logit", logit(0.6), sigmoid),
            "weight_decay": Call("log_wd", math.log(0.05), exp),
            "dampening": Call("damp_logit", logit(0.2), sigmoid),
        },
    ),
    Case(
        "nesterov-leaves-callable",
        "nesterov",
        {
            "lr": Leaf("lr", 0.3),
            "momentum": Call("mu_logit", logit(0.7), sigmoid),
            "weight_decay": Leaf("wd", 0.04),
        },
    ),
    Case(
        "nesterov-schedule-per-element",
        "nesterov",
        {"lr": sched("lr", 0.4, 0.1), "momentum": PerParam([elem("mu_w", 0, 0.3, 0.8), Num(0.6)])},
    ),
    Case(
        "adam-numbers",
        "adam",
        {
            "lr": Num(0.05),
            "beta1": Num(0.8),
            "beta2": Num(0.9),
            "eps": Num(1e-3),
            "weight_decay": Num(0.02),
        },
    ),
    Case(
        "adam-leaves",
        "adam",
        {
            "lr": Leaf("lr", 0.05),
            "beta1": Leaf("b1", 0.8),
            "beta2": Leaf("b2", 0.95),
            "eps": Leaf("eps", 1e-2),
            "weight_decay": Leaf("wd", 0.03),
        },
    ),
    Case(
        "adam-schedules",
        "adam",
        {
            "lr": sched("lr", 0.08, 0.02),
            "beta1": sched("b1", 0.6, 0.9),
            "beta2": Num(0.95),
            "eps": sched("eps", 5e-2, 1e-2),  # learned: far enough from 0 for two UL steps
        },
    ),
    Case(
        "adam-mixed",
        "adam",
        {
            "lr": PerParam([elem("lr_w", 0, 0.02, 0.08), Call("log_lr_b", math.log(0.05), exp)]),
            "beta1": Call("b1_logit", logit(0.85), sigmoid),
            "beta2": PerParam([Num(0.99), Leaf("b2_b", 0.9)]),
            "eps": Call("log_eps", math.log(3e-3), exp),
        },
    ),
    Case("adam-defaults", "adam", {"lr": Leaf("lr", 0.05)}),
    Case(
        "adamw-leaves",
        "adamw",
        {
            "lr": Leaf("lr", 0.05),
            "beta1": Num(0.8),
            "eps": Leaf("eps", 1e-2),
            "weight_decay": Leaf("wd", 0.2),
        },
    ),
    Case(
        "adamw-schedules",
        "adamw",
        {"lr": sched("lr", 0.08, 0.03), "weight_decay": sched("wd", 0.1, 0.3), "eps": Num(1e-3)},
    ),
    Case(
        "rmsprop-leaves",
        "rmsprop",
        {
            "lr": Leaf("lr", 0.02),
            "alpha": Leaf("alpha", 0.9),
            "eps": Leaf("eps", 1e-2),
            "momentum": Leaf("mu", 0.5),
            "weight_decay": Leaf("wd", 0.03),
        },
    ),
    Case(
        "rmsprop-no-momentum",
        "rmsprop",
        {
            "lr": Call("log_lr", math.log(0.02), exp),
            "alpha": sched("alpha", 0.8, 0.95),
            "eps": Num(1e-3),
        },
    ),
    Case(
        "rmsprop-per-parameter",
        "rmsprop",
        {
            "lr": Num(0.02),
            "momentum": PerParam([Num(0.0), Leaf("mu_b", 0.6)]),
            "eps": PerParam([elem("eps_w", 0, 1e-2, 5e-2), Num(1e-3)]),  # learned: away from 0
            "alpha": Num(0.9),
        },
    ),
    Case(
        "adagrad-leaves",
        "adagrad",
        {
            "lr": Leaf("lr", 0.2),
            "lr_decay": Leaf("decay", 0.1),
            "eps": Leaf("eps", 1e-2),
            "weight_decay": Leaf("wd", 0.03),
            "initial_accumulator_value": Leaf("init", 0.1),
        },
    ),
    Case(
        "adagrad-mixed",
        "adagrad",
        {
            "lr": sched("lr", 0.3, 0.1),
            "lr_decay": Call("log_decay", math.log(0.2), exp),
            "initial_accumulator_value": PerParam([elem("init_w", 0, 0.05, 0.2), Num(0.1)]),
        },
    ),
]
DECAY = torch.linspace(1.0, 0.4, T, dtype=DTYPE)
SHIFT = torch.linspace(-0.5, 0.5, T, dtype=DTYPE)


def decayed(log_lr: torch.Tensor) -> torch.Tensor:
    """A per-step schedule computed from one UL scalar."""
    return log_lr.exp() * DECAY


def shifted_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """A per-step schedule in (0, 1) computed from one UL scalar."""
    return torch.sigmoid(x + SHIFT)


CASES += [
    Case(
        "sgd-fixed-tensors",
        "sgd",
        {
            "lr": Fixed(torch.linspace(0.5, 0.3, T, dtype=DTYPE)),
            "momentum": Fixed(0.0),
            "dampening": Num(0.3),
            "weight_decay": PerParam([Fixed(elem("x", 0, 0.01, 0.05).value), ConstCall(0.0)]),
        },
    ),
    Case(
        "sgd-callable-schedule",
        "sgd",
        {"lr": Call("log_lr", math.log(0.5), decayed), "momentum": ConstCall(0.5)},
    ),
    Case(
        "rmsprop-callable-forms",
        "rmsprop",
        {
            "lr": PerParam(
                [Call("log_lr_w", elem("x", 0, 0.01, 0.03).value.log(), exp), Num(0.02)]
            ),
            "alpha": Call("alpha_logit", logit(0.9), shifted_sigmoid),
            "momentum": ConstCall(0.3),
            "eps": Num(1e-3),
        },
    ),
    Case(
        "sgd-keywords",
        "sgd",
        {"lr": Call("log_lr", math.log(0.4), exp), "momentum": Leaf("mu", 0.6)},
        keywords=True,
    ),
    Case(
        "nesterov-keywords",
        "nesterov",
        {"lr": Num(0.3), "momentum": sched("mu", 0.5, 0.8)},
        keywords=True,
    ),
    Case(
        "adam-keywords",
        "adam",
        {
            "lr": Leaf("lr", 0.05),
            "beta1": Call("b1_logit", logit(0.8), sigmoid),
            "beta2": Leaf("b2", 0.95),
            "eps": Leaf("eps", 1e-2),
        },
        keywords=True,
    ),
    Case(
        "adamw-keywords",
        "adamw",
        {"lr": Leaf("lr", 0.05), "beta2": sched("b2", 0.9, 0.99), "eps": Num(1e-3)},
        keywords=True,
    ),
    Case(
        "rmsprop-keywords",
        "rmsprop",
        {
            "lr": Leaf("lr", 0.02),
            "momentum": Leaf("mu", 0.5),
            "eps": Call("log_eps", math.log(1e-2), exp),
        },
        keywords=True,
    ),
    Case(
        "adagrad-keywords",
        "adagrad",
        {"lr": Leaf("lr", 0.2), "eps": Leaf("eps", 1e-2)},
        keywords=True,
    ),
    Case(
        "maml-sgd-momentum",
        "sgd",
        {"lr": Leaf("lr", 0.4), "momentum": Leaf("mu", 0.6)},
        maml=True,
    ),
    Case(
        "maml-adam",
        "adam",
        {"lr": Call("log_lr", math.log(0.05), exp), "beta1": Leaf("b1", 0.8), "eps": Num(1e-3)},
        maml=True,
    ),
    Case(
        "maml-rmsprop",
        "rmsprop",
        {
            "lr": Leaf("lr", 0.02),
            "alpha": Leaf("alpha", 0.9),
            "momentum": Leaf("mu", 0.5),
            "eps": Num(1e-3),
        },
        maml=True,
    ),
    Case(
        "maml-adagrad-per-element",
        "adagrad",
        {"lr": PerParam([elem("lr_w", 0, 0.1, 0.3), Leaf("lr_b", 0.2)]), "eps": Num(1e-3)},
        maml=True,
    ),
]
BY_ID = {case.id: case for case in CASES}


# --------------------------------------------------------------------------- the reference


def hand_update(
    rule: str, P: Tensors, G: Tensors, S: dict[str, Tensors], h: Callable[[str, int], Any], t: int
) -> tuple[Tensors, dict[str, Tensors]]:
    """One step of ``rule`` at the 0-based step ``t``, from the formulas of the torch.optim
    documentation (``h(name, i)``: the hyperparameter's value for parameter ``i``)."""
    new: Tensors = []
    out: dict[str, Tensors] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        out.setdefault(key, []).append(value)

    for i, (p, g) in enumerate(zip(P, G, strict=True)):

        def v(name: str, i: int = i) -> Any:
            return h(name, i)

        lr = v("lr")
        if rule in ("sgd", "nesterov"):
            mu, g = v("momentum"), g + v("weight_decay") * p
            damp = 0.0 if rule == "nesterov" else v("dampening")
            if isinstance(mu, float) and mu == 0.0:
                keep("buf", p.new_zeros(0))
            else:
                b = g if t == 0 else mu * S["buf"][i] + (1 - damp) * g
                keep("buf", b)
                g = g + mu * b if rule == "nesterov" else b
            new.append(p - lr * g)
        elif rule in ("adam", "adamw"):
            b1, b2, eps, wd = v("beta1"), v("beta2"), v("eps"), v("weight_decay")
            if rule == "adamw":
                p = p - lr * wd * p
            else:
                g = g + wd * p
            m = (1 - b1) * g if t == 0 else b1 * S["m"][i] + (1 - b1) * g
            s = (1 - b2) * g * g if t == 0 else b2 * S["v"][i] + (1 - b2) * g * g
            keep("m", m)
            keep("v", s)
            m_hat, v_hat = m / (1 - b1 ** (t + 1)), s / (1 - b2 ** (t + 1))
            new.append(p - lr * m_hat / (v_hat.sqrt() + eps))
        elif rule == "rmsprop":
            alpha, eps, mu, g = v("alpha"), v("eps"), v("momentum"), g + v("weight_decay") * p
            s = (1 - alpha) * g * g if t == 0 else alpha * S["v"][i] + (1 - alpha) * g * g
            keep("v", s)
            scaled = g / (s.sqrt() + eps)
            if isinstance(mu, float) and mu == 0.0:
                keep("buf", p.new_zeros(0))
                new.append(p - lr * scaled)
            else:
                b = scaled if t == 0 else mu * S["buf"][i] + scaled  # the buffer starts at 0
                keep("buf", b)
                new.append(p - lr * b)
        elif rule == "adagrad":
            g = g + v("weight_decay") * p
            start = S["sum"][i] if t > 0 else torch.zeros_like(p) + v("initial_accumulator_value")
            total = start + g * g
            keep("sum", total)
            clr = lr / (1 + t * v("lr_decay"))
            new.append(p - clr * g / (total.sqrt() + v("eps")))
        else:
            raise AssertionError(rule)
    return new, out


def leaves(ul: Hypers) -> dict[str, torch.Tensor]:
    """New leaves at the UL model's current values, by name."""
    out = {"log_l2": ul.log_l2.detach().clone().requires_grad_()}
    out.update({k: p.detach().clone().requires_grad_() for k, p in ul.h.items()})
    if hasattr(ul, "net"):
        out.update(
            {f"net.{k}": p.detach().clone().requires_grad_() for k, p in ul.net.named_parameters()}
        )
    return out


def start_weights(net: Net, U: dict[str, torch.Tensor] | None = None) -> Tensors:
    """The LL's starting weights: clones of the UL leaves when they are UL variables (a
    step's gradient in a weight must not see the leaf's own uses), else new leaves."""
    if U is not None and "net.w" in U:
        return [U["net.w"].clone(), U["net.b"].clone()]
    return [p.detach().clone().requires_grad_() for p in net.parameters()]


def qualified(name: str) -> str:
    """The name the library gives a UL parameter in its messages."""
    return name if name == "log_l2" or name.startswith("net.") else f"h.{name}"


def hand_steps(
    case: Case,
    U: dict[str, torch.Tensor],
    W: Tensors,
    S: dict[str, Tensors],
    t0: int,
    steps: int,
    graph: Callable[[int], bool] = lambda t: True,
    bda: bool = False,
) -> tuple[list[Tensors], dict[str, Tensors]]:
    """``steps`` steps from the global step ``t0``; a step without ``graph(t)`` sees the UL
    variables, its weights and the rule's state as constants. Returns the iterates after
    each step and the final state."""
    live = case.resolve(U)
    cut = case.resolve({k: u.detach() for k, u in U.items()})
    iterates = []
    for t in range(t0, t0 + steps):
        on = graph(t)
        Ut = U if on else {k: u.detach() for k, u in U.items()}
        if not on:
            W = [w.detach().requires_grad_() for w in W]
            S = {k: [s.detach() for s in v] for k, v in S.items()}
        table = live if on else cut
        loss = f_hand(W, Ut, *TRAIN)
        if bda:
            a = BDA_OPTIONS["alpha"] * BDA_OPTIONS["alpha_decay"] ** t
            loss = (1 - a) * loss + a * BDA_OPTIONS["ul_scale"] * F_hand(W, Ut, *VAL)
        G = list(torch.autograd.grad(loss, W, create_graph=on))
        W, S = hand_update(case.rule, W, G, S, lambda name, i, at=table, t=t: at[name](t, i), t)
        if not on:
            W = [w.detach().requires_grad_() for w in W]
            S = {k: [s.detach() for s in v] for k, v in S.items()}
        iterates.append(W)
    return iterates, S


def grads_in(loss: torch.Tensor, U: dict[str, torch.Tensor], names: list[str]) -> list:
    """The gradients in ``U[name]`` for each name; ``None`` where there is no path."""
    return list(torch.autograd.grad(loss, [U[n] for n in names], allow_unused=True))


def hand_hypergradient(
    case: Case,
    net: Net,
    ul: Hypers,
    keep_last: int | None = None,
    worst: bool = False,
    bda: bool = False,
    F: Callable[..., torch.Tensor] = F_hand,
) -> tuple[list, int]:
    """Back-propagation through the hand unroll at the UL model's current point
    (``keep_last``: only the last K steps; ``worst``: from the iterate with the largest UL
    loss ``F``). Returns the gradients in the order of ``ul_names`` (``None`` where there is
    no path) and the iterate used (1-based)."""
    U = leaves(ul)
    graph = (lambda t: True) if keep_last is None else (lambda t: t >= T - keep_last)
    iterates, _ = hand_steps(case, U, start_weights(net, U), {}, 0, T, graph, bda)
    losses = [F(w, U, *VAL) for w in iterates]
    chosen = T - 1
    if worst:
        values = torch.stack([v.detach() for v in losses])
        chosen = int(values.argmax())
        top = values.sort(descending=True).values
        assert float(top[0] - top[1]) > 1e-6 * float(top.abs().max())  # not a round-off pick
    return grads_in(losses[chosen], U, case.ul_names), chosen + 1


def ptt_objectives(case: Case, net: Net, ul: Hypers) -> tuple[Callable, Callable]:
    """A UL loss whose largest value along the LL run is at an iterate in the middle:
    ``-||w - c||^2``, with ``c`` a little past the third iterate (not on it, where its
    gradient would vanish). For the library and by hand."""
    U = {k: u.detach() for k, u in leaves(ul).items()}
    its, _ = hand_steps(case, U, start_weights(net, U), {}, 0, T, graph=lambda t: False)
    c = [(a + 0.3 * (a - b)).detach() for a, b in zip(its[2], its[1], strict=True)]

    def library(state: dict) -> torch.Tensor:
        m = state["ll_model"]
        return -((m.w - c[0]) ** 2).sum() - ((m.b - c[1]) ** 2).sum()

    def hand(W: Tensors, U: dict, x: Any, y: Any) -> torch.Tensor:
        return -sum(((w - ci) ** 2).sum() for w, ci in zip(W, c, strict=True))

    return library, hand


# ---------------------------------------------------------------------- running the library


def close(got: Tensors, expected: Tensors, rtol: float = RTOL) -> None:
    """Each tensor to ``rtol`` of the largest entry of the hypergradient (its entries of very
    different sizes, e.g. in eps and in a step size, each carry round-off of that size)."""
    assert len(got) == len(expected)
    scale = max(float(e.abs().max()) for e in expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def non_vacuous(expected: Tensors, names: list[str]) -> None:
    """Every UL variable has a real hypergradient (not a zero that anything would match)."""
    for g, n in zip(expected, names, strict=True):
        assert float(g.abs().max()) > 1e-7, n


def check(compute: Callable[[], Tensors], expected: list, names: list[str]) -> bool:
    """``compute()`` equals ``expected``; where the reference has no path to a UL variable
    (a hyperparameter used only before Truncated's window), the library must refuse it by
    name rather than return a zero. Returns whether numbers were compared."""
    missing = [n for n, e in zip(names, expected, strict=True) if e is None]
    if missing:
        with pytest.raises(ValueError, match="get no hypergradient") as info:
            compute()
        assert all(f"'{qualified(n)}'" in str(info.value) for n in missing), str(info.value)
        return False
    non_vacuous(expected, names)
    close(compute(), expected)
    return True


METHODS: dict[str, type] = {
    "reverse": Reverse,
    "forward": Forward,
    "memory_saving": MemorySavingReverse,
    "truncated": Truncated,
    "ptt": PTT,
}


def setup(case: Case, method: str, bda: bool = False, ul_optimizer: bool = False):
    """The library's problem and the matching reference (a function of the current point)."""
    net, ul = case.models()
    lib_F, hand_F = ul_objective, F_hand
    if method == "ptt":
        lib_F, hand_F = ptt_objectives(case, net, ul)
    options = {"truncate_iter": K} if method == "truncated" else {}
    calculator = METHODS[method](lib_F, ul, ll_objective, net, **options)
    optimizer = torch.optim.SGD(calculator.ul_params, lr=UL_LR) if ul_optimizer else None
    problem = BilevelProblem(case.ll(net, ul, bda=bda), calculator, optimizer)

    def reference() -> tuple[list, int]:
        keep = K if method == "truncated" else None
        return hand_hypergradient(case, net, ul, keep, method == "ptt", bda, hand_F)

    return problem, reference


def test_the_reference_rules_are_torch_optim() -> None:
    """The hand rules, with numbers, give torch.optim's iterates (foreach=False)."""
    torch_rules = {
        "sgd": (torch.optim.SGD, {}),
        "nesterov": (torch.optim.SGD, {"nesterov": True}),
        "adam": (torch.optim.Adam, {}),
        "adamw": (torch.optim.AdamW, {}),
        "rmsprop": (torch.optim.RMSprop, {}),
        "adagrad": (torch.optim.Adagrad, {}),
    }
    settings = {
        "sgd": {"lr": 0.4, "momentum": 0.7, "weight_decay": 0.03, "dampening": 0.2},
        "nesterov": {"lr": 0.3, "momentum": 0.7, "weight_decay": 0.04},
        "adam": {"lr": 0.05, "beta1": 0.8, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.02},
        "adamw": {"lr": 0.05, "beta1": 0.8, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.2},
        "rmsprop": {"lr": 0.02, "alpha": 0.9, "eps": 1e-2, "momentum": 0.5, "weight_decay": 0.03},
        "adagrad": {
            "lr": 0.2,
            "lr_decay": 0.1,
            "eps": 1e-2,
            "weight_decay": 0.03,
            "initial_accumulator_value": 0.1,
        },
    }
    U = {"log_l2": torch.tensor(-1.0, dtype=DTYPE)}
    for name, values in settings.items():
        case = Case(f"torch-{name}", name, {k: Num(v) for k, v in values.items()})
        iterates, _ = hand_steps(case, U, start_weights(Net()), {}, 0, T)
        cls, extra = torch_rules[name]
        options = {k: v for k, v in values.items() if k not in ("beta1", "beta2")}
        if "beta1" in values:
            options["betas"] = (values["beta1"], values["beta2"])
        net = Net()
        opt = cls(net.parameters(), foreach=False, **options, **extra)
        for _ in range(T):
            opt.zero_grad()
            f_hand(list(net.parameters()), U, *TRAIN).backward()
            opt.step()
        # two implementations of one rule: round-off apart (margin for any x86 CPU)
        for mine, theirs in zip(iterates[-1], net.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs.detach(), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hypergradient_matches_the_hand_unroll(case: Case, method: str) -> None:
    """(a)-(c): Reverse, Forward, MemorySavingReverse, Truncated(K) and PTT against the
    reference, in the L2 strength and in every hyperparameter that is a UL variable."""
    problem, reference = setup(case, method)
    expected, chosen = reference()
    if (
        check(lambda: problem.hypergradient(TRAIN, VAL), expected, case.ul_names)
        and method == "ptt"
    ):
        assert 1 < chosen < T  # a pick inside the run: the truncation is exercised
        assert problem.ul.diagnostics["ptt_step"] == chosen


BDA_CASES = ["sgd-leaves", "adam-mixed", "rmsprop-leaves", "adagrad-mixed", "sgd-callables"]


@pytest.mark.parametrize("method", ["reverse", "forward", "memory_saving", "truncated"])
@pytest.mark.parametrize("case_id", BDA_CASES)
def test_bda_rules_match_the_hand_unroll(case_id: str, method: str) -> None:
    """BDA: the rule applied to the aggregated direction (with its state and every form)."""
    case = BY_ID[case_id]
    problem, reference = setup(case, method, bda=True)
    check(lambda: problem.hypergradient(TRAIN, VAL), reference()[0], case.ul_names)


STEP_CASES = [
    "sgd-leaves",
    "sgd-per-element",
    "sgd-callable-schedule",
    "adam-mixed",
    "adam-schedules",
    "rmsprop-per-parameter",
    "adagrad-mixed",
    "maml-adam",
]


STEP_METHODS = [(m, False) for m in METHODS] + [(m, True) for m in METHODS if m != "ptt"]


@pytest.mark.parametrize(
    ("method", "bda"), STEP_METHODS, ids=[m + ("-bda" if b else "") for m, b in STEP_METHODS]
)
@pytest.mark.parametrize("case_id", STEP_CASES)
def test_two_ul_steps_match_the_hand_unroll_at_each_point(
    case_id: str, method: str, bda: bool
) -> None:
    """(e): ``step`` twice (SGD on the UL, cached plans and schedules reused): each step
    applies the reference hypergradient at the current UL point (BDA: its own UL
    objective steers the LL, so PTT's is not combined with it)."""
    case = BY_ID[case_id]
    problem, reference = setup(case, method, bda=bda, ul_optimizer=True)
    params = problem.ul_params
    for _ in range(2):
        expected, _ = reference()
        before = [p.detach().clone() for p in params]

        def moved(before: Tensors = before) -> Tensors:
            problem.step(TRAIN, VAL)
            return [(b - p.detach()) / UL_LR for b, p in zip(before, params, strict=True)]

        if not check(moved, expected, case.ul_names):
            return


# -------------------------------------------------------------------------------- online


class Recording(torch.optim.SGD):
    """SGD that keeps the gradient it applied at every step."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.applied: list[Tensors] = []

    def step(self, closure: Any = None) -> Any:
        self.applied.append([p.grad.detach().clone() for p in self.param_groups[0]["params"]])
        return super().step(closure)


def hand_online(case: Case, net: Net, ul: Hypers, every: int, updates: int, forward: bool):
    """The online loop by hand: one LL run that continues (weights, rule state, step count)
    across UL updates; between updates the UL point moves by SGD, and the next LL steps use
    the hyperparameters at the new point. RTHO (``forward``): the tangent ``Z`` sums the
    derivatives through every step so far, each taken at the UL point of its window, which is
    back-propagation with one copy of the UL leaves per window, summed. Truncated: through
    the steps of the window only. Returns the hypergradient of every update."""
    W, S = start_weights(net), {}
    point = {k: u.detach() for k, u in leaves(ul).items()}
    copies: list[dict[str, torch.Tensor]] = []
    applied = []
    for k in range(updates):
        U = {n: u.clone().requires_grad_() for n, u in point.items()}
        copies.append(U)
        if not forward:
            W = [w.detach().requires_grad_() for w in W]
            S = {key: [s.detach() for s in v] for key, v in S.items()}
        iterates, S = hand_steps(case, U, W, S, k * every, every)
        W = iterates[-1]
        loss = F_hand(W, U, *VAL)
        used = copies if forward else [U]
        inputs = [C[n] for C in used for n in case.ul_names]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=forward)
        n = len(case.ul_names)
        total = []
        for j in range(n):
            paths = [grads[j + n * c] for c in range(len(used)) if grads[j + n * c] is not None]
            total.append(sum(paths) if paths else None)  # None: no path at all
        applied.append(total)
        if any(g is None for g in total):
            break  # the library refuses this update
        point = {n: point[n] - UL_LR * g for n, g in zip(case.ul_names, total, strict=True)}
    return applied


ONLINE_CASES = ["sgd-leaves", "adam-leaves", "rmsprop-leaves", "adagrad-leaves", "sgd-per-element"]
ONLINE_CALLABLES = ["sgd-callables", "adam-mixed", "rmsprop-no-momentum"]


def run_online(case: Case, method: str, every: int, updates: int) -> list[Tensors]:
    """The library's online run; the hypergradient applied at each update."""
    net, ul = case.models()
    ll = case.ll(net, ul, iters=every)
    if method == "forward":
        calculator = Forward(ul_objective, ul, ll_objective, net)
    else:
        calculator = Truncated(ul_objective, ul, ll_objective, net, truncate_iter=every)
    optimizer = Recording(calculator.ul_params, UL_LR)
    OnlineHypergradient(ll, calculator, optimizer, every).run(
        TRAIN, VAL, ll_steps=every * updates, progress=False
    )
    return optimizer.applied


def schedule_free(case: Case) -> Case:
    """The case with its per-step schedules replaced by their first value (an online run has
    no fixed length for a schedule to cover)."""
    forms = {
        k: (Leaf(f.name, f.values[0]) if isinstance(f, Sched) else f) for k, f in case.forms.items()
    }
    return Case(case.id, case.rule, forms)


@pytest.mark.parametrize("method", ["forward", "truncated"])
@pytest.mark.parametrize("case_id", ONLINE_CASES + ONLINE_CALLABLES)
def test_online_matches_the_hand_online_loop(case_id: str, method: str) -> None:
    """(d): three UL updates, every 3 LL steps: the hypergradient of each update, and the
    UL point after them. With a callable hyperparameter (``lr=lambda ul: ...``) the LL steps
    after an update must use its value at the new UL point."""
    case = schedule_free(BY_ID[case_id])
    every, updates = 3, 3  # every != 2: b's per-element values would read as a schedule
    net, start = case.models()
    expected = hand_online(case, net, start, every, updates, forward=method == "forward")
    if any(g is None for g in expected[-1]):  # unused in a window: refused by name
        check(lambda: run_online(case, method, every, updates), expected[-1], case.ul_names)
        return
    applied = run_online(case, method, every, updates)
    assert len(applied) == updates
    for got, want in zip(applied, expected, strict=True):
        non_vacuous(want, case.ul_names)
        close(got, want)


def test_online_refuses_a_schedule_shorter_than_the_run() -> None:
    """A per-step schedule covers ``ll.iters`` steps; an online run of more LL steps has no
    value for the later ones: a clear refusal, before any step (not an IndexError)."""
    case = BY_ID["sgd-schedules"]
    net, ul = case.models()
    calculator = Forward(ul_objective, ul, ll_objective, net)
    runner = OnlineHypergradient(case.ll(net, ul), calculator, Recording(ul.parameters(), UL_LR), 3)
    with pytest.raises(ValueError, match="schedule"):
        runner.run(TRAIN, VAL, ll_steps=2 * T, progress=False)
    assert runner.ul_optimizer.applied == []


# ------------------------------------------------------------------------------ Implicit


def hand_implicit(case: Case, net: Net, ul: Hypers, iters: int, l2_decay: float = 0.0):
    """``grad_U F - (dg/dU)^T H^-1 grad_w F`` at the hand run's last weights, for the problem
    the LL dynamics solve: ``ll_objective + (l2_decay / 2) ||w||^2`` (an L2 weight decay in
    the rule adds it to every gradient)."""
    U = leaves(ul)
    iterates, _ = hand_steps(case, U, start_weights(net), {}, 0, iters, graph=lambda t: False)
    W = [w.detach().requires_grad_() for w in iterates[-1]]
    loss = F_hand(W, U, *VAL)
    direct = grads_in(loss, U, case.ul_names)
    v = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, W)])
    decayed = f_hand(W, U, *TRAIN) + 0.5 * l2_decay * sum((w * w).sum() for w in W)
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(decayed, W, create_graph=True)])
    rows = [
        torch.cat([r.reshape(-1) for r in torch.autograd.grad(g[j], W, retain_graph=True)])
        for j in range(len(g))
    ]
    q = torch.linalg.solve(torch.stack(rows), v)
    cross = grads_in(g @ q, U, case.ul_names)
    zero = torch.zeros(())
    return [
        (zero if d is None else d) - (zero if c is None else c)
        for d, c in zip(direct, cross, strict=True)
    ]


IMPLICIT_RULES = [
    Case("sgd-momentum", "sgd", {"lr": Num(1.0), "momentum": Num(0.5)}),
    Case("nesterov", "nesterov", {"lr": Num(0.8), "momentum": Num(0.5)}),
    Case("adagrad", "adagrad", {"lr": Num(1.0)}),
]


@pytest.mark.parametrize("case", IMPLICIT_RULES, ids=[c.id for c in IMPLICIT_RULES])
def test_implicit_behind_stateful_rules_at_a_converged_ll(case: Case) -> None:
    """The implicit hypergradient does not depend on how the LL reached its minimum."""
    iters = 400
    net, ul = case.models()
    ll = case.ll(net, ul, iters=iters)
    problem = BilevelProblem(ll, Implicit(ul_objective, ul, ll_objective, net, k=50))
    got = problem.hypergradient(TRAIN, VAL)
    assert problem.ul.diagnostics["ll_grad_ratio"] < 1e-7  # converged
    close(got, hand_implicit(case, net, ul, iters), rtol=1e-8)


WEIGHT_DECAY = [
    Case("sgd", "sgd", {"lr": Num(1.0), "momentum": Num(0.5), "weight_decay": Num(0.05)}),
    Case("nesterov", "nesterov", {"lr": Num(0.8), "momentum": Num(0.5), "weight_decay": Num(0.05)}),
    Case("adagrad", "adagrad", {"lr": Num(1.0), "weight_decay": Num(0.05)}),
]


@pytest.mark.parametrize("case", WEIGHT_DECAY, ids=[c.id for c in WEIGHT_DECAY])
def test_implicit_accounts_for_or_refuses_an_l2_weight_decay_in_the_rule(case: Case) -> None:
    """An L2 weight decay in the rule moves the LL's fixed point to a zero of
    ``grad ll_objective + wd w``: the implicit hypergradient must be taken there (the
    Hessian plus ``wd I``), or refused with a message naming weight_decay; the plain
    formula on ``ll_objective`` alone is a wrong number (a few percent here), without a
    warning (the LL gradient at the fixed point is small next to the first step's)."""
    iters = 400
    net, ul = case.models()
    ll = case.ll(net, ul, iters=iters)
    try:
        problem = BilevelProblem(ll, Implicit(ul_objective, ul, ll_objective, net, k=50))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # whether it warns or not, the number must be right
            got = problem.hypergradient(TRAIN, VAL)
    except ValueError as error:
        assert "weight_decay" in str(error)
        return
    expected = hand_implicit(case, net, ul, iters, l2_decay=0.05)
    # the exact answer of the problem the LL solves: Reverse through the converged run
    reverse = BilevelProblem(
        case.ll(net, ul, iters=iters), Reverse(ul_objective, ul, ll_objective, net)
    )
    close(reverse.hypergradient(TRAIN, VAL), expected, rtol=1e-8)
    close(got, expected, rtol=1e-8)


def test_stochastic_implicit_refuses_an_l2_weight_decay_in_the_rule() -> None:
    """StochasticImplicit solves the same system as Implicit: an L2 weight decay in the rule
    is refused when the problem is built, naming weight_decay and the cure."""
    from bilevel.ul import StochasticImplicit

    case = WEIGHT_DECAY[0]
    net, ul = case.models()
    with pytest.raises(ValueError, match=r"weight_decay.*Put the penalty in ll_objective"):
        BilevelProblem(
            case.ll(net, ul, iters=50), StochasticImplicit(ul_objective, ul, ll_objective, net)
        )


def test_implicit_refuses_learned_optimizer_hyperparameters() -> None:
    """At a stationary LL the step size and the momentum have no effect: Implicit refuses
    them by name (their hypergradient would be a silent zero)."""
    case = Case("x", "sgd", {"lr": Leaf("lr", 1.0), "momentum": Leaf("mu", 0.5)})
    net, ul = case.models()
    problem = BilevelProblem(
        case.ll(net, ul, iters=50), Implicit(ul_objective, ul, ll_objective, net)
    )
    with pytest.raises(ValueError, match=r"\['h.lr', 'h.mu'\] get no hypergradient"):
        problem.hypergradient(TRAIN, VAL)


# ------------------------------------------------------------------------------- dtypes

OTHER_DTYPE: dict[str, Callable[[], dict[str, Any]]] = {
    "tensor-lr": lambda: {"lr": torch.tensor(0.1)},
    "per-element-lr": lambda: {"lr": [torch.full((3, 2), 0.1), 0.1]},
    "callable-lr": lambda: {"lr": lambda u: torch.tensor(0.1)},
    "momentum-in-rule": lambda: {"lr": 0.1, "optimizer": rules.sgd(momentum=torch.tensor(0.5))},
    "adam-betas": lambda: {"lr": 0.05, "optimizer": "adam", "betas": (torch.tensor(0.8), 0.9)},
}


@pytest.mark.parametrize("given", list(OTHER_DTYPE))
def test_hyperparameter_tensors_of_another_dtype_are_refused(given: str) -> None:
    """A float32 hyperparameter for a float64 LL (``lr=torch.tensor(0.1)`` has the default
    dtype) would run with its value rounded to float32: a hypergradient about 1e-8 off that
    of ``lr=0.1``, silently. Refused, as data of another dtype is, with the cure."""
    net, ul = Net(), Hypers({})
    with pytest.raises(ValueError, match=r"torch\.float32 but ll_model has torch\.float64"):
        ll = GradientDescent(ll_objective, net, ul, iters=T, **OTHER_DTYPE[given]())
        BilevelProblem(ll, Reverse(ul_objective, ul, ll_objective, net)).hypergradient(TRAIN, VAL)
