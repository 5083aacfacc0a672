"""Settings of the UL methods and LL dynamics set after construction are checked as the
constructor checks them, as ``ll.iters`` is (float64); what a change could not reach
consistently is fixed at construction and refused with the cure. FOUND: ``ul.k = 0`` on
``Implicit`` ran a solver of no iterations and returned a zero hypergradient, silently;
``Truncated``'s ``truncate_iter = 0`` was refused as "get no hypergradient ... use them in an
objective"; ``FiniteDifference``'s ``r = 0`` raised a bare ZeroDivisionError; ``Implicit``'s
``damping = -1`` was taken as given (a system shifted the wrong way). Then the other ~60:
``BOME``'s ``eta = -1``, ``Implicit``'s ``on_divergence = "wran"`` (a diverged series let
through with a warning, as ``"warn"``), ``ll.on_growth = "wran"``, ``F2SA``'s ``lam_max`` below
``lam``, ``alpha`` with CG, ... were all taken as given; ``ul.ll_objective``, ``ll.rule`` or
``SOBA``'s ``sampler`` replaced were taken without a word, where the LL optimizer, the runs'
cached plans (the rule) or the checks the runner made go on with the old ones. A legitimate
change takes effect: the next hypergradient (or, for a method that keeps state across UL
steps, the next three UL steps) equals, bitwise, that of a method built with the new value;
and the comparison is one that the setting changes (the old value gives another)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from problems import FeatureL2, Linear, ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import BDA, FixedPointMap, GradientDescent, rules
from bilevel.ul import (
    BOME,
    BVFIM,
    DM,
    F2SA,
    GAFFO,
    IGA,
    MESO,
    PBGD,
    SABA,
    SOBA,
    AmIGO,
    FiniteDifference,
    Implicit,
    Reverse,
    StocBiO,
    StochasticImplicit,
    Truncated,
)
from bilevel.ul.sampling import Sampler

LR, ITERS = 0.3, 20


def ridge_away():
    """A ridge problem, its LL weights started away from zero (one LL step from zero does
    not reach the penalty: a hypergradient of zero)."""
    p = ridge(seed=2)
    with torch.no_grad():
        p.ll_model.w.fill_(0.5)
    return p


@dataclass(frozen=True)
class Kind:
    """How a case builds the object under test on a problem (``build(p, **settings)``), and
    what it compares (``run(p, obj)``: tensors, the next hypergradient or the state after
    UL steps)."""

    build: Callable[..., Any]
    run: Callable[[Any, Any], list[torch.Tensor]]


def quartic_ll(state: dict) -> torch.Tensor:
    """``ridge_ll`` with a quartic term: LL gradients not linear in the weights (finite
    differences of them are then not exact)."""
    return ridge_ll(state) + 0.05 * (state["ll_model"].w ** 4).sum()


def one_hypergradient(iters: int = ITERS, objective: Callable = ridge_ll) -> Callable:
    """The next hypergradient, and the method's state after it (a generator's draws)."""

    def run(p, method):
        ll = GradientDescent(objective, p.ll_model, p.ul_model, lr=LR, iters=iters)
        grads = BilevelProblem(ll, method).hypergradient(p.train, p.val)
        return [*grads, *tensors(getattr(method, "state_dict", dict)())]

    return run


def ul_steps(iters: int, count: int = 3) -> Callable:
    """UL steps of a method that keeps state across them: the UL and LL parameters and the
    method's state after them."""

    def run(p, method):
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=iters)
        problem = BilevelProblem(ll, method, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
        for _ in range(count):
            problem.step(p.train, p.val)
        return [*p.ul_model.parameters(), *p.ll_model.parameters(), *tensors(method.state_dict())]

    return run


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors and numbers in a state dict, as tensors."""
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [torch.tensor(value)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors(v)]
    return []


def method(cls: type, run: Callable, objective: Callable = ridge_ll, **fixed: Any) -> Kind:
    def build(p, /, **options):
        return cls(ridge_ul, p.ul_model, objective, p.ll_model, **fixed, **options)

    return Kind(build, run)


def through_reverse(p, dynamics) -> list[torch.Tensor]:
    """The next hypergradient of Reverse through the LL dynamics under test."""
    ul = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    return BilevelProblem(dynamics, ul).hypergradient(p.train, p.val)


def gradient_descent(lr: float = LR, iters: int = ITERS) -> Kind:
    def build(p, **options):
        return GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=iters, **options)

    return Kind(build, through_reverse)


def bda_build(p, **options):
    return BDA(
        ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS, ul_objective=ridge_ul, **options
    )


def ridge_outputs(state):
    """The ridge LL objective as a loss of the model's outputs plus the penalty."""
    target = state["target"]
    outputs = state["ll_model"](state["data"])
    return (
        outputs,
        lambda z: 0.5 * ((z - target) ** 2).mean(),
        state["ul_model"].penalty(state["ll_model"]),
    )


def curved_outputs(state):
    """The ridge LL objective as a loss of outputs ``asinh(x w)``, curved in the weights: its
    Gauss-Newton matrix is not the Hessian."""
    target = state["target"]
    outputs = torch.asinh(state["ll_model"](state["data"]))
    return (
        outputs,
        lambda z: 0.5 * ((torch.sinh(z) - target) ** 2).mean(),
        state["ul_model"].penalty(state["ll_model"]),
    )


def constraints(state):
    """Every LL weight at most 0.1 (active at the ridge solution)."""
    return state["ll_model"].w - 0.1


def half_lr_sgd(q):
    return torch.optim.SGD(q, lr=0.15)


def halving(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.9)


def decreasing(k):
    return 0.05 / (k + 1)


IMPLICIT = Kind(
    lambda p, **o: Implicit(
        ridge_ul, p.ul_model, ridge_ll, p.ll_model, **{"ll_learning_rate": LR, **o}
    ),
    one_hypergradient(),
)
TRUNCATED = method(Truncated, one_hypergradient())
FINITE_DIFFERENCE = method(
    FiniteDifference, one_hypergradient(iters=1, objective=quartic_ll), objective=quartic_ll
)
IGA_ = method(IGA, one_hypergradient())
SID = method(StochasticImplicit, one_hypergradient())
DM_ = method(DM, ul_steps(iters=1))
BOME_ = method(BOME, ul_steps(iters=5))
BVFIM_ = method(BVFIM, ul_steps(iters=5))
F2SA_ = method(F2SA, ul_steps(iters=5))
GAFFO_ = method(GAFFO, ul_steps(iters=1), ll_constraints=constraints)
MESO_ = method(MESO, ul_steps(iters=1))
PBGD_ = method(PBGD, ul_steps(iters=5))
SOBA_ = method(SOBA, ul_steps(iters=1), batch_size=10)
STOCBIO = method(StocBiO, ul_steps(iters=3), batch_size=10)
AMIGO = method(AmIGO, ul_steps(iters=3), batch_size=10)
GD = gradient_descent()
GD_GROWING = gradient_descent(lr=1.5, iters=4)  # an LL that grows (lr above 2 / lambda_max)
BDA_ = Kind(bda_build, through_reverse)

# (kind, built with, set to a bad value, the constructor's message; set to a good value,
# or None where every value the object accepts gives what the old one gave)
CASES = [
    (IMPLICIT, {"k": 10}, ("k", 0), "k must be an integer >= 1", ("k", 3)),
    (IMPLICIT, {"k": 10}, ("k", 2.5), "k must be an integer >= 1", ("k", 3)),
    (
        IMPLICIT,
        {"damping": 0.0},
        ("damping", -1.0),
        "damping must be a finite number >= 0",
        ("damping", 0.5),
    ),
    (
        IMPLICIT,
        {"method": "neumann"},
        ("ll_learning_rate", -1.0),
        "ll_learning_rate must be a number > 0 or None",
        None,  # a value other than the LL's is refused at the next run (below)
    ),
    (
        IMPLICIT,
        {"k": 50, "tolerance": 1e-12},
        ("tolerance", -1.0),
        "tolerance must be a number >= 0",
        ("tolerance", 1e-2),
    ),
    (IMPLICIT, {"method": "cg"}, ("method", "lu"), "method must be one of", ("method", "minres")),
    (
        IMPLICIT,
        {"method": "neumann", "alpha": 0.1},
        ("method", "cg"),
        r"alpha=0.1 was given, but method='cg' does not use it",
        ("method", "fixed_point"),
    ),
    (
        IMPLICIT,
        {"method": "neumann", "alpha": 0.1},
        ("alpha", -1.0),
        "alpha must be None, 'auto' or a number > 0",
        ("alpha", 0.2),
    ),
    (
        IMPLICIT,
        {"method": "cg", "alpha": None},
        ("alpha", 0.2),
        r"alpha=0.2 was given, but method='cg' does not use it",
        None,
    ),
    (
        IMPLICIT,
        {"method": "neumann", "alpha": "auto", "power_iters": 20},
        ("power_iters", 0),
        "power_iters must be an integer >= 1",
        ("power_iters", 2),
    ),
    (
        IMPLICIT,
        {"method": "neumann", "alpha": 5.0, "on_divergence": "raise"},
        ("on_divergence", "wran"),
        "on_divergence must be 'raise' or 'warn'",
        ("on_divergence", "warn"),
    ),
    (
        IMPLICIT,
        {"stationarity_warning": 0.1},
        ("stationarity_warning", -1.0),
        "stationarity_warning must be None or a number > 0",
        ("stationarity_warning", 1e-12),
    ),
    (
        TRUNCATED,
        {"truncate_iter": 5},
        ("truncate_iter", 0),
        "truncate_iter must be >= 1",
        ("truncate_iter", 2),
    ),
    (FINITE_DIFFERENCE, {"r": 1e-2}, ("r", 0.0), "r must be a finite number > 0", ("r", 1e-3)),
    (
        FINITE_DIFFERENCE,
        {"r": 1e-2},
        ("r", float("nan")),
        "r must be a finite number > 0",
        ("r", 1e-3),
    ),
    (
        IGA_,
        {"converged_warning": 1e-12},
        ("converged_warning", 2.0),
        r"converged_warning must lie in \(0, 1\)",
        ("converged_warning", 0.5),
    ),
    (
        DM_,
        {"eta": "auto"},
        ("eta", -1.0),
        "eta must be a finite number > 0 or 'auto'",
        ("eta", 0.1),
    ),
    (SID, {"steps": 20}, ("steps", 0), "steps must be an integer >= 1", ("steps", 5)),
    (
        SID,
        {"batches": None},
        ("batches", 0),
        r"batches \(a minibatch size\) must be an integer >= 1",
        ("batches", 10),
    ),
    (
        SID,
        {"batches": 10, "cross": "minibatch"},
        ("cross", "half"),
        "cross must be one of",
        ("cross", "full"),
    ),
    (
        SID,
        {"curvature": "hessian"},
        ("curvature", "gauss_newton"),
        "curvature='gauss_newton' needs ll_outputs",
        None,
    ),
    (
        SID,
        {"curvature": "hessian", "ll_outputs": curved_outputs},
        ("curvature", "newton"),
        "curvature must be one of",
        ("curvature", "gauss_newton"),
    ),
    (
        SID,
        {"curvature": "gauss_newton", "ll_outputs": ridge_outputs},
        ("ll_outputs", None),
        "curvature='gauss_newton' needs ll_outputs",
        None,
    ),
    (
        SID,
        {"solver_optimizer": None},
        ("solver_optimizer", 0.1),
        "solver_optimizer must be a callable params -> torch.optim.Optimizer",
        ("solver_optimizer", half_lr_sgd),
    ),
    (
        SID,
        {"solver_scheduler": None},
        ("solver_scheduler", 0.5),
        "solver_scheduler must be a callable optimizer -> scheduler",
        ("solver_scheduler", halving),
    ),
    (BOME_, {"eta": 0.5}, ("eta", -1), r"eta must lie in \(0.0, inf\)", ("eta", 2.0)),
    (
        BOME_,
        {"phi": "grad_norm", "eta": 2.0},
        ("phi", "norm"),
        "phi must be one of",
        ("phi", "value"),
    ),
    (BOME_, {"lr_y": None}, ("lr_y", 0), r"lr_y must lie in \(0.0, inf\)", ("lr_y", decreasing)),
    (BVFIM_, {"mu": 0.01}, ("mu", 0.0), r"mu must lie in \(0.0, inf\)", ("mu", 0.1)),
    (BVFIM_, {"theta": 0.01}, ("theta", "x"), "theta must be a number", ("theta", 0.1)),
    (BVFIM_, {"sigma": 0.01}, ("sigma", -1.0), r"sigma must lie in \(0.0, inf\)", ("sigma", 0.1)),
    (
        BVFIM_,
        {"y_iters": None},
        ("y_iters", 0),
        "y_iters must be an integer >= 1 or None",
        ("y_iters", 2),
    ),
    (BVFIM_, {"lr_y": None}, ("lr_y", 0.0), r"lr_y must lie in \(0.0, inf\)", ("lr_y", 0.1)),
    (
        BVFIM_,
        {"slack": "barrier"},
        ("ll_lower_bound", 0.0),
        "ll_lower_bound is needed with slack='lower_bound' and only there",
        None,
    ),
    (
        BVFIM_,
        {"slack": "lower_bound", "ll_lower_bound": -1.0},
        ("ll_lower_bound", None),
        "ll_lower_bound is needed with slack='lower_bound' and only there",
        ("ll_lower_bound", -3.0),
    ),
    (
        BVFIM_,
        {"slack": "barrier"},
        ("slack", "lower_bound"),
        "ll_lower_bound is needed with slack='lower_bound' and only there",
        ("slack", "regularized"),
    ),
    (
        BVFIM_,
        {"slack_floor": 0.3},
        ("slack_floor", 2.0),
        r"slack_floor must lie in \(0.0, 1.0\]",
        ("slack_floor", 0.9),
    ),
    (
        F2SA_,
        {"lam": 1.0, "lam_max": 2.0},
        ("lam", 5.0),
        r"lam_max must lie in \[5.0, inf\)",
        ("lam", 1.5),
    ),
    (F2SA_, {"lam": 1.0}, ("lam", -1.0), r"lam must lie in \(0.0, inf\)", ("lam", 3.0)),
    (
        F2SA_,
        {"lam_growth": 0.1},
        ("lam_growth", -1.0),
        r"lam_growth must lie in \[0.0, inf\)",
        ("lam_growth", 2.0),
    ),
    (
        F2SA_,
        {"lam": 1.0, "lam_max": None, "lam_growth": 1.0},
        ("lam_max", 0.5),
        r"lam_max must lie in \[1.0, inf\)",
        ("lam_max", 1.5),
    ),
    (F2SA_, {"lr_y": None}, ("lr_y", -1.0), r"lr_y must lie in \(0.0, inf\)", ("lr_y", 0.1)),
    (GAFFO_, {"gamma1": 10.0}, ("gamma1", 0.0), "gamma1 must lie in", ("gamma1", 1.0)),
    (GAFFO_, {"gamma2": 1.0}, ("gamma2", 0.0), "gamma2 must lie in", ("gamma2", 3.0)),
    (GAFFO_, {"c0": 1.0}, ("c0", 0.0), "c0 must lie in", ("c0", 3.0)),
    (GAFFO_, {"p": 0.25}, ("p", -1.0), "p must lie in", ("p", 0.5)),
    (GAFFO_, {"eta": None}, ("eta", 0.0), "eta must lie in", ("eta", 0.1)),
    (GAFFO_, {"lr_y": None}, ("lr_y", 0.0), "lr_y must lie in", ("lr_y", 0.1)),
    (GAFFO_, {"lr_z": None}, ("lr_z", 0.0), "lr_z must lie in", ("lr_z", 3.0)),
    (GAFFO_, {"z_max": None}, ("z_max", 0.0), "z_max must lie in", ("z_max", 0.01)),
    (MESO_, {"gamma": 10.0}, ("gamma", 0.0), "gamma must lie in", ("gamma", 1.0)),
    (MESO_, {"c0": 1.0}, ("c0", -1.0), "c0 must lie in", ("c0", 3.0)),
    (MESO_, {"p": 0.25}, ("p", -1.0), "p must lie in", ("p", 0.5)),
    (MESO_, {"eta": None}, ("eta", 0.0), "eta must lie in", ("eta", 0.1)),
    (MESO_, {"lr_y": None}, ("lr_y", 0.0), "lr_y must lie in", ("lr_y", 0.1)),
    (
        PBGD_,
        {"gamma": 10.0, "gamma_max": 20.0},
        ("gamma", 30.0),
        r"gamma_max must lie in \[30.0, inf\)",
        ("gamma", 5.0),
    ),
    (
        PBGD_,
        {"gamma_growth": 0.0},
        ("gamma_growth", -1.0),
        "gamma_growth must lie in",
        ("gamma_growth", 5.0),
    ),
    (
        PBGD_,
        {"gamma": 10.0, "gamma_max": None, "gamma_growth": 5.0},
        ("gamma_max", 5.0),
        r"gamma_max must lie in \[10.0, inf\)",
        ("gamma_max", 12.0),
    ),
    (
        PBGD_,
        {"penalty": "value"},
        ("penalty", "gap"),
        "penalty must be one of",
        ("penalty", "gradient"),
    ),
    (PBGD_, {"lr_y": None}, ("lr_y", 0.0), "lr_y must lie in", ("lr_y", 0.1)),
    (SOBA_, {"ll_decay": 0.4}, ("ll_decay", -1.0), "ll_decay must be >= 0", ("ll_decay", 0.0)),
    (
        SOBA_,
        {"ul_decay": 0.6},
        ("ul_decay", float("inf")),
        "ul_decay must be a finite number >= 0",
        ("ul_decay", 0.0),
    ),
    (
        STOCBIO,
        {"neumann_steps": 10},
        ("neumann_steps", -1),
        "neumann_steps must be an integer >= 0",
        ("neumann_steps", 2),
    ),
    (
        STOCBIO,
        {"neumann_lr": None},
        ("neumann_lr", 0.0),
        "neumann_lr must be > 0",
        ("neumann_lr", 0.1),
    ),
    (AMIGO, {"v_iters": None}, ("v_iters", 0), "v_iters must be an integer >= 1", ("v_iters", 1)),
    (AMIGO, {"v_lr": None}, ("v_lr", -1.0), "v_lr must be > 0", ("v_lr", 0.1)),
    (
        GD_GROWING,
        {"on_growth": "raise"},
        ("on_growth", "wran"),
        "on_growth must be 'raise', 'warn' or 'ignore'",
        ("on_growth", "ignore"),
    ),
    (
        GD_GROWING,
        {"growth_tolerance": 1e-3},
        ("growth_tolerance", -1.0),
        "growth_tolerance must be a finite number >= 0",
        ("growth_tolerance", 1e6),
    ),
    (
        BDA_,
        {"alpha": 0.5, "alpha_decay": 0.9},
        ("alpha", 2.0),
        r"alpha must lie in \[0, 1\]",
        ("alpha", 0.2),
    ),
    (
        BDA_,
        {"alpha": 0.5, "alpha_decay": 0.9},
        ("alpha_decay", 0.0),
        r"alpha_decay must lie in \(0, 1\]",
        ("alpha_decay", 0.5),
    ),
    (
        BDA_,
        {"alpha": 0.5, "alpha_decay": 0.9, "ul_scale": 1.0},
        ("ul_scale", 0.0),
        "ul_scale must be a finite number > 0",
        ("ul_scale", 3.0),
    ),
]


def outcome(kind: Kind, p, obj) -> tuple[Any, list[str]]:
    """What ``kind.run`` gives (tensors, or the error it raised) and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result: Any = [t.detach() for t in kind.run(p, obj)]
        except (ValueError, FloatingPointError) as error:
            result = f"{type(error).__name__}: {error}"
    return result, [str(w.message) for w in caught]


def same(a: tuple[Any, list[str]], b: tuple[Any, list[str]]) -> bool:
    (x, said_x), (y, said_y) = a, b
    if isinstance(x, str) or isinstance(y, str):
        return x == y and said_x == said_y
    return len(x) == len(y) and all(map(torch.equal, x, y)) and said_x == said_y  # bitwise


def settings_of(obj) -> dict:
    return obj.settings() if hasattr(obj, "settings") else {}


@pytest.mark.parametrize(("kind", "built", "bad", "message", "good"), CASES)
def test_a_setting_set_after_construction_is_checked_as_at_construction(
    kind, built, bad, message, good
):
    p = ridge_away()
    obj = kind.build(p, **built)
    name, value = bad
    before, recorded = getattr(obj, name), settings_of(obj)
    with pytest.raises((ValueError, TypeError), match=message):
        setattr(obj, name, value)
    with pytest.raises((ValueError, TypeError), match=message):
        kind.build(p, **{**built, name: value})  # the constructor's own refusal, the same words
    assert getattr(obj, name) is before or getattr(obj, name) == before  # left as it was
    assert settings_of(obj) == recorded
    if good is None:
        return
    name, value = good
    setattr(obj, name, value)
    assert getattr(obj, name) == value
    q, r = ridge_away(), ridge_away()
    fresh = kind.build(q, **{**built, name: value})
    assert settings_of(obj) == settings_of(fresh)  # what checkpoints record and compare
    changed = outcome(kind, p, obj)
    assert same(changed, outcome(kind, q, fresh))
    assert not same(changed, outcome(kind, r, kind.build(r, **built)))  # the setting counts


def fixed_point_map(p):
    return FixedPointMap(lambda s: [0.5 * s["ll_model"].w], p.ll_model, p.ul_model, 3)


FIXED = [  # (build, setting, a new value): fixed at construction
    (IMPLICIT.build, "ul_objective", ridge_ll),
    (IMPLICIT.build, "ll_objective", ridge_ul),
    (IMPLICIT.build, "ul_model", FeatureL2(5)),
    (IMPLICIT.build, "ll_model", Linear(5)),
    (IMPLICIT.build, "ul_params", list(FeatureL2(5).parameters())),
    (IMPLICIT.build, "ll_trainable", list(Linear(5).parameters())),
    (IMPLICIT.build, "initial_weight_of", [0]),
    (SOBA_.build, "ll_model", Linear(5)),
    (SOBA_.build, "sampler", Sampler(20, 20, 1)),
    (method(SABA, ul_steps(1), batch_size=10).build, "memory_init", "zero"),
    (GAFFO_.build, "ll_constraints", None),
    (SID.build, "seed", 1),
    (GD.build, "ll_objective", ridge_ul),
    (GD.build, "ll_model", Linear(5)),
    (GD.build, "ul_model", FeatureL2(5)),
    (GD.build, "rule", rules.adam()),
    (GD.build, "optimizer", "adam"),
    (GD.build, "hyper", {}),
    (lambda p: bda_build(p, alpha=0.5, alpha_decay=0.9), "ul_objective", ridge_ll),
    (fixed_point_map, "fixed_point_map", lambda s: [0.25 * s["ll_model"].w]),
]


@pytest.mark.parametrize(("build", "name", "value"), FIXED)
def test_a_setting_fixed_at_construction_is_refused_with_the_cure(build, name, value):
    """Objectives, models and the parameter lists taken from them, samplers and seeds, the
    LL update rule, and what a method's state across UL steps was made for: a change could
    not reach the runs' plans, the checks already made or the state, so it is refused,
    saying how to make it (build again)."""
    p = ridge_away()
    obj = build(p)
    before = getattr(obj, name)
    with pytest.raises(AttributeError, match=rf"\.{name} is fixed at construction: .*[Bb]uild"):
        setattr(obj, name, value)
    assert getattr(obj, name) is before


def test_a_changed_setting_is_checked_against_the_ll_again():
    """What the runner checked when it was built (the method against the LL optimizer) is
    checked again at the next step after a setting of either changed: an ``ll_learning_rate``
    the series would take other than the LL's step, BDA's ``alpha`` raised from 0 under
    Implicit (whose formula needs an LL that ends at a stationary point of ll_objective).
    Both were used silently."""
    p = ridge_away()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=ITERS)
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, LR, method="neumann")
    problem = BilevelProblem(ll, ul)
    problem.hypergradient(p.train, p.val)
    ul.ll_learning_rate = 0.2
    with pytest.raises(ValueError, match=r"ll_learning_rate=0.2\) disagrees with the LL"):
        problem.hypergradient(p.train, p.val)
    ul.ll_learning_rate = LR
    problem.hypergradient(p.train, p.val)  # agreed again: runs

    bda = BDA(
        ridge_ll,
        p.ll_model,
        p.ul_model,
        LR,
        ITERS,
        ul_objective=ridge_ul,
        alpha=0.0,
        alpha_decay=1.0,
    )
    problem = BilevelProblem(bda, Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model))
    problem.hypergradient(p.train, p.val)
    bda.alpha = 0.5
    with pytest.raises(ValueError, match="Implicit needs an LL run that ends at a stationary"):
        problem.hypergradient(p.train, p.val)


def test_a_changed_ll_iters_is_checked_against_the_method_again():
    """``ll.iters`` (a property of its own) counts as a changed setting too, and the check
    runs for every method, also those that do not run the LL through ``run_ll``: SOBA, which
    takes one LL step per UL step and refuses ``iters=5`` at construction, took steps with
    ``ll.iters = 5`` set later without a word. The refused step changes nothing."""
    p = ridge_away()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=1)
    ul = SOBA(ridge_ul, p.ul_model, ridge_ll, p.ll_model, batch_size=10)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    problem.step(p.train, p.val)
    ll.iters = 5
    kept = [t.clone() for t in p.ul_model.parameters()]
    with pytest.raises(ValueError, match=r"one LL step per UL step .* ll\.iters = 5"):
        problem.step(p.train, p.val)
    assert all(torch.equal(a, b) for a, b in zip(kept, p.ul_model.parameters(), strict=True))
    ll.iters = 1
    problem.step(p.train, p.val)  # agreed again: runs
    assert not all(torch.equal(a, b) for a, b in zip(kept, p.ul_model.parameters(), strict=True))


def test_an_online_run_checks_a_changed_setting_as_at_construction():
    """Online ``Truncated`` back-propagates through the ``hyper_every`` steps since the last
    UL update, and its construction refuses ``truncate_iter != hyper_every``; set later, the
    other ``truncate_iter`` was ignored without a word. The next run now refuses it."""
    from bilevel.online import OnlineHypergradient

    p = ridge_away()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=8)
    ul = Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=2)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    runner = OnlineHypergradient(ll, ul, optimizer, hyper_every=2)
    runner.run(p.train, p.val, 4, progress=False)
    ul.truncate_iter = 3
    kept = [t.clone() for t in p.ul_model.parameters()]
    with pytest.raises(ValueError, match=r"truncate_iter == hyper_every \(2\), got 3"):
        runner.run(p.train, p.val, 4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(kept, p.ul_model.parameters(), strict=True))
    ul.truncate_iter = 2
    runner.run(p.train, p.val, 4, progress=False)  # agreed again: runs
