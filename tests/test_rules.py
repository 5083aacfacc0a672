"""The LL update rules of ``bilevel.ll.rules`` against ``torch.optim``, finite differences and
bad arguments (float64 throughout)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bilevel.ll.rules import (
    LR_BOUND,
    RULES,
    Bound,
    UpdateRule,
    adagrad,
    adam,
    adamw,
    make_rule,
    nesterov,
    rmsprop,
    sgd,
)

DTYPE = torch.float64
STEPS = 6
TIGHT = {"rtol": 1e-12, "atol": 1e-14}

_gen = torch.Generator().manual_seed(0)
X = torch.randn(10, 3, generator=_gen, dtype=DTYPE)
Y = (torch.rand(10, 2, generator=_gen, dtype=DTYPE) > 0.5).to(DTYPE)
X_VAL = torch.randn(7, 3, generator=_gen, dtype=DTYPE)
Y_VAL = (torch.rand(7, 2, generator=_gen, dtype=DTYPE) > 0.5).to(DTYPE)
W0 = 0.5 * torch.randn(3, 2, generator=_gen, dtype=DTYPE)
B0 = 0.1 * torch.randn(2, generator=_gen, dtype=DTYPE)

TORCH: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {}),
    "nesterov": (torch.optim.SGD, {"nesterov": True}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
}
LRS = {"sgd": 0.3, "nesterov": 0.2, "adam": 0.05, "adamw": 0.05, "rmsprop": 0.02, "adagrad": 0.2}


def loss_fn(params: list[torch.Tensor], x: torch.Tensor = X, y: torch.Tensor = Y) -> torch.Tensor:
    """Logistic loss of a linear model with a small quadratic penalty on the weights."""
    w, b = params
    logits = x @ w + b
    return F.binary_cross_entropy_with_logits(logits, y) + 0.05 * (w * w).sum()


def initial_params() -> list[torch.Tensor]:
    return [W0.clone().requires_grad_(), B0.clone().requires_grad_()]


def hyper_lists(per_param: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``{"lr": [...], key: [...]}`` from one dict of values per parameter tensor."""
    return {key: [d[key] for d in per_param] for key in per_param[0]}


def rule_values(name: str, settings: dict[str, Any], lr: float) -> dict[str, Any]:
    """The hyperparameters of ``make_rule(name, **settings)``, lr included."""
    return {"lr": lr, **make_rule(name, **settings).hyper}


def run_ours(
    name: str, per_step: Callable[[int], list[dict[str, Any]]], as_tensors: bool = False
) -> list[torch.Tensor]:
    rule = make_rule(name)
    params, state = initial_params(), {}
    for step in range(STEPS):
        per_param = per_step(step)
        if as_tensors:  # 0-d tensors that require grad, as UL variables
            per_param = [
                {k: torch.tensor(v, dtype=DTYPE, requires_grad=True) for k, v in d.items()}
                for d in per_param
            ]
        grads = torch.autograd.grad(loss_fn(params), params)
        params, state = rule.update(params, list(grads), state, hyper_lists(per_param), step)
        params = [p.detach().requires_grad_() for p in params]
    return [p.detach() for p in params]


def to_torch_group(values: dict[str, Any]) -> dict[str, Any]:
    group = {k: v for k, v in values.items() if k not in ("beta1", "beta2")}
    if "beta1" in values:
        group["betas"] = (values["beta1"], values["beta2"])
    return group


def run_torch(name: str, per_step: Callable[[int], list[dict[str, Any]]]) -> list[torch.Tensor]:
    cls, extra = TORCH[name]
    params = [p.detach().clone().requires_grad_() for p in initial_params()]
    first = [to_torch_group(v) for v in per_step(0)]
    groups = [{"params": [p], **g} for p, g in zip(params, first, strict=True)]
    opt = cls(groups, **first[0], foreach=False, **extra)
    if name == "adagrad":  # torch.optim.Adagrad fills every group's sum with the default's
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["sum"] = torch.full_like(p, group["initial_accumulator_value"])
    for step in range(STEPS):
        for group, values in zip(opt.param_groups, per_step(step), strict=True):
            group.update(to_torch_group(values))
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
    return [p.detach() for p in params]


# Per rule: settings for both parameter tensors, or a pair (one per tensor).
CASES: list[tuple[str, Any]] = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"weight_decay": 0.1}),
    ("sgd", {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
    ("sgd", ({"momentum": 0.8, "weight_decay": 0.05}, {})),
    ("nesterov", {}),
    ("nesterov", {"momentum": 0.5, "weight_decay": 0.1}),
    ("adam", {}),
    ("adam", {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    ("adam", ({"betas": (0.5, 0.9)}, {"betas": (0.9, 0.99), "weight_decay": 0.2})),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.0}),
    ("adamw", {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.3}),
    ("rmsprop", {}),
    ("rmsprop", {"momentum": 0.9}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-4, "momentum": 0.5, "weight_decay": 0.1}),
    ("rmsprop", ({"momentum": 0.9}, {"alpha": 0.5})),
    ("adagrad", {}),
    ("adagrad", {"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.5}),
    ("adagrad", ({"lr_decay": 0.3}, {"eps": 1e-3, "initial_accumulator_value": 0.2})),
]


def _case_id(case: tuple[str, Any]) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("as_tensors", [False, True], ids=["floats", "tensors"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_rule_matches_torch_optim(case: tuple[str, Any], as_tensors: bool) -> None:
    name, settings = case
    pair = settings if isinstance(settings, tuple) else (settings, settings)
    lrs = (LRS[name], 0.5 * LRS[name])
    per_param = [rule_values(name, s, lr) for s, lr in zip(pair, lrs, strict=True)]

    def per_step(step: int) -> list[dict[str, Any]]:
        return per_param

    ours = run_ours(name, per_step, as_tensors=as_tensors)
    reference = run_torch(name, per_step)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    assert not torch.equal(ours[0], W0)


def test_momentum_switched_on_and_off_matches_torch_optim() -> None:
    """A momentum of 0.0 skips the buffer as torch.optim does: SGD's starts as ``g`` at the
    first step with momentum, separately for each parameter tensor; RMSprop's is kept."""

    def sgd_step(step: int) -> list[dict[str, Any]]:
        return [
            {"lr": 0.2, "momentum": 0.9 if step >= 1 else 0.0, "weight_decay": 0.0,
             "dampening": 0.2},
            {"lr": 0.1, "momentum": 0.7 if step >= 3 else 0.0, "weight_decay": 0.1,
             "dampening": 0.0},
        ]  # fmt: skip

    def rmsprop_step(step: int) -> list[dict[str, Any]]:  # torch cannot switch it on later
        return [
            {"lr": 0.01, "alpha": 0.9, "eps": 1e-8, "momentum": 0.8 if step < 3 else 0.0,
             "weight_decay": 0.0},
            {"lr": 0.02, "alpha": 0.9, "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0},
        ]  # fmt: skip

    for name, per_step in [("sgd", sgd_step), ("rmsprop", rmsprop_step)]:
        for a, b in zip(run_ours(name, per_step), run_torch(name, per_step), strict=True):
            torch.testing.assert_close(a, b, **TIGHT)


def test_plain_sgd_is_exactly_p_minus_lr_g() -> None:
    rule = sgd()
    params = initial_params()
    grads = list(torch.autograd.grad(loss_fn(params), params))
    hyper = {"lr": [0.3, 0.1], "momentum": [0.0, 0.0], "weight_decay": [0.0, 0.0]}
    hyper["dampening"] = [0.0, 0.0]
    state: dict = {}
    new, new_state = rule.update(params, grads, state, hyper, 0)
    assert new_state == {}
    for p, g, lr, q in zip(params, grads, hyper["lr"], new, strict=True):
        assert torch.equal(q, p - lr * g)


def test_state_is_not_modified_and_stays_tensors() -> None:
    params = initial_params()
    grads = list(torch.autograd.grad(loss_fn(params), params))
    for name in RULES:
        rule = make_rule(name)
        hyper = {"lr": [0.1, 0.1], **{k: [v, v] for k, v in rule.hyper.items()}}
        _, state = rule.update(params, grads, {}, hyper, 0)
        snapshot = {k: [t.clone() for t in v] for k, v in state.items()}
        _, state2 = rule.update(params, grads, state, hyper, 1)
        for key, tensors in state.items():
            assert all(torch.equal(a, b) for a, b in zip(tensors, snapshot[key], strict=True))
        for tensors in state2.values():
            assert len(tensors) == 2 and all(isinstance(t, torch.Tensor) for t in tensors)


# Finite differences: (rule, hyperparameter, settings) with the value of the hyperparameter.
FD_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("sgd", "lr", {"momentum": 0.9}),
    ("sgd", "momentum", {"momentum": 0.9}),
    ("sgd", "weight_decay", {"momentum": 0.5, "weight_decay": 0.1}),
    ("sgd", "dampening", {"momentum": 0.5, "dampening": 0.3}),
    ("nesterov", "lr", {}),
    ("nesterov", "momentum", {"momentum": 0.7}),
    ("adam", "lr", {}),
    ("adam", "beta1", {"betas": (0.8, 0.99)}),
    ("adam", "beta2", {"betas": (0.8, 0.9)}),
    ("adam", "weight_decay", {"weight_decay": 0.1}),
    ("adamw", "lr", {}),
    ("adamw", "weight_decay", {"weight_decay": 0.1}),
    ("adamw", "beta1", {"betas": (0.7, 0.99)}),
    ("rmsprop", "lr", {"momentum": 0.5}),
    ("rmsprop", "alpha", {"alpha": 0.9}),
    ("rmsprop", "momentum", {"momentum": 0.5}),
    ("adagrad", "lr", {}),
    ("adagrad", "weight_decay", {"weight_decay": 0.1}),
    ("adagrad", "lr_decay", {"lr_decay": 0.2}),
    ("adagrad", "initial_accumulator_value", {"initial_accumulator_value": 0.3}),
]


def unrolled_val_loss(
    name: str, settings: dict[str, Any], key: str, value: torch.Tensor
) -> torch.Tensor:
    """The validation loss after ``STEPS`` steps that keep their graph, with the
    hyperparameter ``key`` of both tensors set to ``value``."""
    rule = make_rule(name, **settings)
    hyper = {"lr": [LRS[name]] * 2, **{k: [v, v] for k, v in rule.hyper.items()}}
    hyper[key] = [value, value]
    params, state = initial_params(), {}
    for step in range(STEPS):
        grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
        params, state = rule.update(params, list(grads), state, hyper, step)
    return loss_fn(params, X_VAL, Y_VAL)


@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_hypergradient_matches_finite_differences(case: tuple[str, str, dict[str, Any]]) -> None:
    name, key, settings = case
    value = LRS[name] if key == "lr" else make_rule(name, **settings).hyper[key]
    h = torch.tensor(value, dtype=DTYPE, requires_grad=True)
    (grad,) = torch.autograd.grad(unrolled_val_loss(name, settings, key, h), h)
    eps = 1e-6
    plus = unrolled_val_loss(name, settings, key, torch.tensor(value + eps, dtype=DTYPE))
    minus = unrolled_val_loss(name, settings, key, torch.tensor(value - eps, dtype=DTYPE))
    fd = (plus - minus).detach() / (2 * eps)
    assert abs(fd.item()) > 1e-4  # the check is meaningful
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    "name, settings",
    [
        ("adam", {}),
        ("adamw", {}),
        ("rmsprop", {}),
        ("rmsprop", {"momentum": 0.9}),
        ("adagrad", {}),
    ],
)
def test_zero_gradient_gives_finite_second_derivatives(name: str, settings: dict[str, Any]) -> None:
    """Where a gradient is exactly zero the second moment is zero: the root's derivative
    must not turn ``inf * 0`` into NaN, for first or second derivatives."""
    rule = make_rule(name, **settings)
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    hyper = {"lr": [lr, lr], **{k: [v, v] for k, v in rule.hyper.items()}}
    start = [
        torch.tensor([1.0, 0.0, -0.5], dtype=DTYPE, requires_grad=True),
        torch.tensor([[0.0, 2.0], [0.0, -1.0]], dtype=DTYPE, requires_grad=True),
    ]
    params, state = start, {}
    for step in range(3):
        loss = sum(0.5 * (p * p).sum() + 0.25 * (p**4).sum() for p in params)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        assert (grads[0][1] == 0) and (grads[1][:, 0] == 0).all()
        params, state = rule.update(params, list(grads), state, hyper, step)
    assert params[0][1] == 0 and (params[1][:, 0] == 0).all()
    outer = sum(((p - 0.3) ** 2).sum() for p in params)
    first = torch.autograd.grad(outer, [*start, lr], create_graph=True)
    assert all(torch.isfinite(g).all() for g in first)
    second = torch.autograd.grad(sum(g.sum() for g in first), [*start, lr], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in second)
    assert second[-1] is not None


# Arguments.


def test_defaults_are_torch_optim_defaults() -> None:
    for name, (cls, _) in TORCH.items():
        signature = inspect.signature(cls).parameters
        for key, value in make_rule(name).hyper.items():
            if name == "nesterov" and key == "momentum":
                assert value == 0.9  # torch.optim.SGD has no usable default for Nesterov
                continue
            if key in ("beta1", "beta2"):
                expected = signature["betas"].default[int(key[-1]) - 1]
            else:
                expected = signature[key].default
            assert value == expected and isinstance(value, float), (name, key)


def test_factories_store_values_as_given() -> None:
    momentum = torch.tensor(5.0, requires_grad=True)  # out of range: the LL optimizer's job

    def weight_decay(ul_model: Any) -> torch.Tensor:
        return torch.tensor(0.1)

    rule = sgd(momentum=momentum, weight_decay=weight_decay, dampening=0)
    assert rule.hyper["momentum"] is momentum
    assert rule.hyper["weight_decay"] is weight_decay
    assert rule.hyper["dampening"] == 0.0 and isinstance(rule.hyper["dampening"], float)
    assert set(rule.bounds) == set(rule.hyper) and rule.name == "sgd"
    schedule = torch.linspace(0.9, 0.5, 4)
    rule = adam(betas=([0.9, schedule], 0.999))
    assert rule.hyper["beta1"][1] is schedule and rule.hyper["beta2"] == 0.999
    assert "betas" not in rule.hyper
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.name = "other"  # type: ignore[misc]


def test_bounds() -> None:
    for name, factory in RULES.items():
        rule = factory()
        assert isinstance(rule, UpdateRule) and rule.name == name
        assert set(rule.bounds) == set(rule.hyper)
        for key, bound in rule.bounds.items():
            assert isinstance(bound, Bound)
            value = rule.hyper[key]
            assert bound.contains(value), (name, key)
    assert make_rule("adam").bounds["beta1"] == Bound(0.0, 1.0, closed_low=True)
    assert make_rule("adam").bounds["eps"] == Bound(0.0, math.inf, closed_low=False)
    assert make_rule("nesterov").bounds["momentum"] == Bound(0.0, 1.0, closed_low=False)
    assert str(Bound(0.0, 1.0, closed_low=True)) == "[0.0, 1.0)"
    assert not LR_BOUND.contains(0.0) and LR_BOUND.contains(1e-3)
    assert not Bound(0.0, 1.0, True).contains(math.nan)


@pytest.mark.parametrize(
    "factory, kwargs, error, word",
    [
        (sgd, {"momentum": True}, TypeError, "momentum"),
        (sgd, {"weight_decay": False}, TypeError, "weight_decay"),
        (sgd, {"momentum": "0.9"}, TypeError, "momentum"),
        (sgd, {"momentum": None}, TypeError, "momentum"),
        (sgd, {"momentum": [0.9, True]}, TypeError, "momentum[1]"),
        (sgd, {"momentum": -0.1}, ValueError, "momentum"),
        (sgd, {"momentum": 1.0}, ValueError, "momentum"),
        (sgd, {"dampening": 1.5}, ValueError, "dampening"),
        (sgd, {"weight_decay": -1e-3}, ValueError, "weight_decay"),
        (sgd, {"weight_decay": math.nan}, ValueError, "weight_decay"),
        (sgd, {"weight_decay": math.inf}, ValueError, "weight_decay"),
        (nesterov, {"momentum": 0.0}, ValueError, "momentum"),
        (nesterov, {"momentum": True}, TypeError, "momentum"),
        (adam, {"betas": (0.9, 1.0)}, ValueError, "betas[1]"),
        (adam, {"betas": (-0.1, 0.9)}, ValueError, "betas[0]"),
        (adam, {"betas": (True, 0.9)}, TypeError, "betas[0]"),
        (adam, {"betas": 0.9}, TypeError, "betas"),
        (adam, {"betas": (0.9,)}, ValueError, "betas"),
        (adam, {"eps": 0.0}, ValueError, "eps"),
        (adamw, {"weight_decay": -0.01}, ValueError, "weight_decay"),
        (adamw, {"betas": (0.9, 2.0)}, ValueError, "betas[1]"),
        (rmsprop, {"alpha": 1.0}, ValueError, "alpha"),
        (rmsprop, {"alpha": True}, TypeError, "alpha"),
        (rmsprop, {"momentum": -0.5}, ValueError, "momentum"),
        (adagrad, {"lr_decay": -1.0}, ValueError, "lr_decay"),
        (adagrad, {"initial_accumulator_value": -0.1}, ValueError, "initial_accumulator_value"),
        (adagrad, {"eps": -1e-10}, ValueError, "eps"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_bad_arguments_name_the_argument(
    factory: Callable[..., UpdateRule], kwargs: dict[str, Any], error: type, word: str
) -> None:
    with pytest.raises(error, match=re.escape(word)):
        factory(**kwargs)
    with pytest.raises(error, match=re.escape(word)):
        make_rule(factory.__name__, **kwargs)


def test_out_of_range_message_gives_the_interval() -> None:
    with pytest.raises(ValueError, match=r"momentum must lie in \[0\.0, 1\.0\), got 1\.5"):
        sgd(momentum=1.5)
    with pytest.raises(ValueError, match=r"eps must lie in \(0\.0, inf\)"):
        rmsprop(eps=0.0)


def test_make_rule_refuses_unknown_names_and_keywords() -> None:
    with pytest.raises(ValueError, match=r"'lion'.*adagrad.*adam.*adamw.*nesterov.*rmsprop.*sgd"):
        make_rule("lion")
    with pytest.raises(TypeError, match="string"):
        make_rule(None)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"^adam takes no argument 'momentum'; it takes betas, eps, weight_decay\.$",
    ):
        make_rule("adam", momentum=0.9)
    with pytest.raises(TypeError, match="'lr'"):
        make_rule("sgd", lr=0.1)
    with pytest.raises(TypeError, match="'nesterov'"):
        make_rule("sgd", nesterov=True)
    assert make_rule("adamw", betas=(0.5, 0.6)).hyper == adamw(betas=(0.5, 0.6)).hyper
    assert sorted(RULES) == ["adagrad", "adam", "adamw", "nesterov", "rmsprop", "sgd"]
