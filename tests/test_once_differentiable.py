"""LL objectives through a ``torch.autograd.Function`` whose backward is marked
``once_differentiable``, across every method, in float64.

PyTorch raises nothing when ``torch.autograd.grad(loss, w, create_graph=True)`` passes through
such a Function: its backward runs under ``no_grad`` (the error node it attaches is reached by
``.backward()`` only), so the gradient has no graph through it, and Hessian-vector products,
mixed second derivatives and back-propagation through LL steps leave its terms out. Each
objective below computes ridge's LL loss (``tests/problems.py``) with the same value and first
derivative as ``ridge_ll``: the squared loss as a once-differentiable Function (``last``), the
model's outputs through a once-differentiable identity (``outputs``), or the whole loss, the
UL variables inside too, as one such Function (``whole``: its mixed derivative is lost as
well).

Measured before the refusals (relative error of the hypergradient against the same method on
the plain expression, on the ridge problem of test_methods_across_dynamics.py, ``x @ w + b``
with per-feature L2; own-state methods after 4 UL steps; ``last`` and ``outputs`` alike, then
``whole``; on ``tests/problems.ridge`` Implicit cg, minres and neumann were all 231% off):

- silently wrong, now refused with the Function's name and the cure: Reverse 236%/100%,
  Truncated(2) 41%/103%, Forward and MemorySavingReverse as Reverse, PTT 0%/107% (the iterate
  it picks), Implicit cg (its divergence error, whose cure does not apply), minres 1e18 and
  101%, normal_cg / neumann / fixed_point 114%/101%, StochasticImplicit 126%/101%, DM
  51%/103%, SOBA 17%/105%, SABA 33%/104%, StocBiO 107%/101%, AmIGO 112%/101%,
  PBGD(penalty='gradient') 100%/100%, Meta-SGD step sizes through Reverse 232%/795%, Reverse
  and Truncated through BDA 171%/85% and 29%/99%;
- exact anyway (first derivatives only; round-off apart): FirstOrder, Reptile,
  FiniteDifference, IGA, BOME (both phi), PBGD(penalty='value'), BVFIM, MESO, GAFFO, F2SA,
  Alternating.

The check (``bilevel.second_derivatives.refuse_once_differentiable``) runs once per LL run
whose steps are differentiated and at every gradient the other methods differentiate; its
graph walk stops at the weights. Measured (one CPU thread, float32): 6 us on a 20-64-64-5 MLP
(0.9% of a Reverse UL step of 5 LL steps on 25 samples), 14 us on the 4-conv few-shot net
(0.06% of that UL step with 32 filters, 0.01% with 64).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from problems import DTYPE, FeatureL2, Linear, ridge, ridge_ul
from torch import nn
from torch.autograd.function import once_differentiable

from bilevel import BilevelProblem, linalg
from bilevel.ll import BDA, GradientDescent
from bilevel.second_derivatives import once_differentiable_in
from bilevel.ul import (
    BOME,
    BVFIM,
    DM,
    F2SA,
    GAFFO,
    IGA,
    MESO,
    PBGD,
    PTT,
    SABA,
    SOBA,
    Alternating,
    AmIGO,
    FiniteDifference,
    FirstOrder,
    Forward,
    Implicit,
    MemorySavingReverse,
    Reptile,
    Reverse,
    StocBiO,
    StochasticImplicit,
    Truncated,
)

LR = 0.3
BDA_OPTIONS = {"alpha": 0.5, "alpha_decay": 0.8}

# ------------------------------------------------------------- once-differentiable Functions


class HalfMeanSquare(torch.autograd.Function):
    """``0.5 * mean(r ** 2)`` with a first-order-only backward."""

    @staticmethod
    def forward(ctx, r: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(r)
        return 0.5 * (r * r).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return grad * r / r.numel()


class Through(torch.autograd.Function):
    """The identity, with a first-order-only backward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        return z.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class RidgeLoss(torch.autograd.Function):
    """``0.5 * mean(r ** 2) + 0.5 * sum(exp(log_l2) * w ** 2)``, first-order-only backward."""

    @staticmethod
    def forward(ctx, r: torch.Tensor, w: torch.Tensor, log_l2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(r, w, log_l2)
        return 0.5 * (r * r).mean() + 0.5 * (log_l2.exp() * w * w).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r, w, log_l2 = ctx.saved_tensors
        l2 = log_l2.exp()
        return grad * r / r.numel(), grad * l2 * w, grad * 0.5 * l2 * w * w


FUNCTION_OF = {"last": "HalfMeanSquare", "outputs": "Through", "whole": "RidgeLoss"}

# ------------------------------------------------------------------------------ objectives

#: the L2 strength where the UL model is the LL's initialization (Reptile)
LOG_L2 = torch.full((5,), math.log(0.3), dtype=DTYPE)


def log_l2(state: dict) -> torch.Tensor:
    ul = state["ul_model"]
    return ul.log_l2 if isinstance(ul, FeatureL2) else LOG_L2


def penalty(state: dict) -> torch.Tensor:
    return 0.5 * (log_l2(state).exp() * state["ll_model"].w ** 2).sum()


def plain(state: dict) -> torch.Tensor:
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean() + penalty(state)


def last(state: dict) -> torch.Tensor:
    residual = state["ll_model"](state["data"]) - state["target"]
    return HalfMeanSquare.apply(residual) + penalty(state)


def outputs(state: dict) -> torch.Tensor:
    residual = Through.apply(state["ll_model"](state["data"])) - state["target"]
    return 0.5 * (residual**2).mean() + penalty(state)


def whole(state: dict) -> torch.Tensor:
    residual = state["ll_model"](state["data"]) - state["target"]
    return RidgeLoss.apply(residual, state["ll_model"].w, log_l2(state))


OBJECTIVES = {"last": last, "outputs": outputs, "whole": whole}


def ul_objective(state: dict) -> torch.Tensor:
    """``ridge_ul`` plus a direct term (FirstOrder and Alternating follow only that)."""
    return ridge_ul(state) + 0.05 * (log_l2(state) ** 2).sum()


def split(objective: Callable) -> Callable:
    """``ll_outputs`` for StochasticImplicit's Gauss-Newton curvature: the outputs (through
    the Function for ``outputs``), the squared loss and the penalty."""

    def ll_outputs(state: dict):
        z = state["ll_model"](state["data"])
        if objective is outputs:
            z = Through.apply(z)
        target = state["target"]
        return z, lambda out: 0.5 * F.mse_loss(out, target), penalty(state)

    return ll_outputs


# ------------------------------------------------------------------------------ the table


def gd(f, p, iters):
    return GradientDescent(f, p.ll_model, p.ul_model, lr=LR, iters=iters)


def with_method(cls, iters=6, **options):
    """``(objective, problem) -> (ll, method)`` for a method with the common signature."""

    def build(f, p):
        return gd(f, p, iters), cls(ul_objective, p.ul_model, f, p.ll_model, **options)

    return build


def implicit(method):
    def build(f, p):
        ul = Implicit(ul_objective, p.ul_model, f, p.ll_model, LR, 50, 1e-12, method=method)
        return gd(f, p, 60), ul

    return build


def stochastic_implicit(curvature):
    def build(f, p):
        options = {"ll_outputs": split(f)} if curvature == "gauss_newton" else {}
        ul = StochasticImplicit(
            ul_objective,
            p.ul_model,
            f,
            p.ll_model,
            steps=7,
            batches=None,
            cross="full",
            curvature=curvature,
            **options,
        )
        return gd(f, p, 6), ul

    return build


class MetaSGD(FeatureL2):
    """The L2 strengths and one learned step size per weight (Li et al. 2017)."""

    def __init__(self) -> None:
        super().__init__(5)
        self.log_lr = nn.Parameter(torch.full((5,), math.log(LR), dtype=DTYPE))


def meta_sgd(f, p):
    p.ul_model = MetaSGD()
    ll = GradientDescent(f, p.ll_model, p.ul_model, lr=[lambda ul: ul.log_lr.exp()], iters=6)
    return ll, Reverse(ul_objective, p.ul_model, f, p.ll_model)


def bda(cls, **options):
    def build(f, p):
        ll = BDA(f, p.ll_model, p.ul_model, LR, 6, ul_objective=ul_objective, **BDA_OPTIONS)
        return ll, cls(ul_objective, p.ul_model, f, p.ll_model, **options)

    return build


def reptile(f, p):
    p.ul_model = p.ll_model  # the initialization is the UL variable
    return gd(f, p, 6), Reptile(ul_objective, p.ll_model, f, p.ll_model)


#: methods that differentiate the LL gradient: refused, naming the Function and the cure
REFUSED = {
    "Reverse": with_method(Reverse),
    "Truncated": with_method(Truncated, truncate_iter=2),
    "Forward": with_method(Forward),
    "MemorySavingReverse": with_method(MemorySavingReverse),
    "PTT": with_method(PTT),
    "Meta-SGD (Reverse)": meta_sgd,
    "BDA + Reverse": bda(Reverse),
    "BDA + Truncated": bda(Truncated, truncate_iter=2),
    **{f"Implicit-{m}": implicit(m) for m in ("cg", "minres", "normal_cg", "neumann")},
    "Implicit-fixed_point": implicit("fixed_point"),
    "Implicit-callable": implicit(linalg.cg),
    "StochasticImplicit": stochastic_implicit("hessian"),
    "StochasticImplicit-gauss_newton": stochastic_implicit("gauss_newton"),
    "DM": with_method(DM, 3),
    "SOBA": with_method(SOBA, 1, batch_size=None),
    "SABA": with_method(SABA, 1, batch_size=None),
    "StocBiO": with_method(StocBiO, 3, batch_size=None),
    "AmIGO": with_method(AmIGO, 3, batch_size=None),
    "PBGD-gradient": with_method(PBGD, 3, penalty="gradient"),
}

#: methods that need first derivatives only: exact, as on the plain expression
EXACT = {
    "FirstOrder": with_method(FirstOrder),
    "Reptile": reptile,
    "FiniteDifference": with_method(FiniteDifference, 1),
    "IGA": with_method(IGA, converged_warning=None),
    "BOME": with_method(BOME, 3),
    "BOME-value": with_method(BOME, 3, phi="value"),
    "PBGD": with_method(PBGD, 3),
    "BVFIM": with_method(BVFIM, 3),
    "MESO": with_method(MESO, 3),
    "GAFFO": with_method(GAFFO, 3),
    "F2SA": with_method(F2SA, 3),
    "Alternating": with_method(Alternating, 3),
}


def problem(build: Callable, f: Callable) -> tuple[BilevelProblem, list[torch.Tensor]]:
    p = ridge(n=20, seed=0)
    ll, ul = build(f, p)
    optimizer = torch.optim.SGD(ul.ul_params, lr=0.05)
    return BilevelProblem(ll, ul, optimizer), ul.ul_params


def run(build: Callable, f: Callable, steps: int) -> list[torch.Tensor]:
    """``steps`` UL steps, then the hypergradient, and the UL parameters after the steps."""
    runner, params = problem(build, f)
    for _ in range(steps):
        runner.step(runner_train, runner_val)
    return [*runner.hypergradient(runner_train, runner_val), *(x.detach() for x in params)]


_p = ridge(n=20, seed=0)
runner_train, runner_val = _p.train, _p.val

CURE = r"without @once_differentiable.*FirstOrder, Reptile, FiniteDifference, IGA"


@pytest.mark.parametrize("variant", list(OBJECTIVES))
@pytest.mark.parametrize("name", list(REFUSED))
def test_a_method_that_differentiates_the_ll_gradient_refuses_the_function(name, variant):
    """FOUND: no error, and the hypergradient off by the amounts in the module docstring.
    Refused at the first UL step, before any result: the UL parameters have not moved."""
    runner, params = problem(REFUSED[name], OBJECTIVES[variant])
    before = [x.detach().clone() for x in params]
    pattern = rf"(?s)Function {FUNCTION_OF[variant]}, whose backward is marked once_diff.*{CURE}"
    with pytest.raises(ValueError, match=pattern):
        runner.step(runner_train, runner_val)
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))


@pytest.mark.parametrize("variant", list(OBJECTIVES))
@pytest.mark.parametrize("name", list(EXACT))
def test_a_first_order_method_is_exact_and_not_refused(name, variant):
    """Guard (no false refusal): 3 UL steps and a hypergradient, as on ``plain``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # FiniteDifference's one-step note
        expected = run(EXACT[name], plain, 3)
        got = run(EXACT[name], OBJECTIVES[variant], 3)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))


def test_bda_refuses_the_function_in_the_ul_objective_it_steps_on():
    """BDA's steps descend ``ul_objective`` too; Reverse through them differentiates its
    gradient. FOUND: not refused (the same silent loss of terms)."""
    p = ridge(n=20, seed=0)

    def ul_once(state: dict) -> torch.Tensor:
        return HalfMeanSquare.apply(state["ll_model"](state["data"]) - state["target"])

    ll = BDA(plain, p.ll_model, p.ul_model, LR, 6, ul_objective=ul_once, **BDA_OPTIONS)
    runner = BilevelProblem(ll, Reverse(ul_once, p.ul_model, plain, p.ll_model))
    with pytest.raises(ValueError, match=r"(?s)ll_objective and ul_objective.*HalfMeanSquare"):
        runner.hypergradient(p.train, p.val)


# ------------------------------------------------------------------ what the check is about


class Features(nn.Module):
    """A UL model that maps the inputs through a once-differentiable Function (a fused
    feature op of a representation), with the per-feature L2 strengths."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5, dtype=DTYPE))
        self.log_l2 = nn.Parameter(torch.full((5,), math.log(0.3), dtype=DTYPE))

    def forward(self, x: torch.Tensor, through: bool) -> torch.Tensor:
        z = x * self.scale
        return Through.apply(z) if through else z


def representation(through: bool) -> Callable:
    def objective(state: dict) -> torch.Tensor:
        ul, w = state["ul_model"], state["ll_model"].w
        residual = ul(state["data"], through) @ w - state["target"]
        return 0.5 * (residual**2).mean() + 0.5 * (ul.log_l2.exp() * w * w).sum()

    return objective


@pytest.mark.parametrize("method", ["Reverse", "Implicit"])
def test_a_function_of_the_ul_variables_only_is_allowed(method):
    """A Function upstream of the UL variables only (not of the LL weights) has its backward
    run once, for first derivatives: Reverse and Implicit are exact (as without it), not
    refused."""

    def hypergradient(through: bool) -> list[torch.Tensor]:
        net, ul = Linear(5), Features()
        f = representation(through)
        if method == "Reverse":
            ll, calc = GradientDescent(f, net, ul, LR, 6), Reverse(f, ul, f, net)
        else:
            ll, calc = GradientDescent(f, net, ul, LR, 80), Implicit(f, ul, f, net, LR, 40)
        return BilevelProblem(ll, calc).hypergradient(runner_train, runner_val)

    expected = hypergradient(False)
    for a, b in zip(hypergradient(True), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))


def test_a_model_that_starts_using_the_function_later_is_refused_then():
    """The check runs at every LL run (for the steps: at its first step kept with a graph),
    so an objective (or a model) that takes the Function only from some run on is refused at
    that run."""
    p = ridge(n=20, seed=0)
    use = {"function": False}

    def switching(state: dict) -> torch.Tensor:
        return (last if use["function"] else plain)(state)

    runner = BilevelProblem(
        gd(switching, p, 6), Reverse(ul_objective, p.ul_model, switching, p.ll_model)
    )
    runner.hypergradient(p.train, p.val)
    use["function"] = True
    with pytest.raises(ValueError, match="HalfMeanSquare"):
        runner.hypergradient(p.train, p.val)


def test_the_walk_names_the_function_and_stops_at_the_weights():
    """``once_differentiable_in``: the Function's name; ``None`` for one upstream of other
    tensors only when ``through`` is given; and the walk does not enter the graph behind
    the weights (an earlier step's Function is not this step's)."""
    x = torch.randn(4, 3, dtype=DTYPE)
    w0 = torch.randn(3, dtype=DTYPE, requires_grad=True)
    lam = torch.randn(3, dtype=DTYPE, requires_grad=True)
    assert once_differentiable_in(HalfMeanSquare.apply(x @ w0)) == "HalfMeanSquare"
    assert once_differentiable_in(0.5 * (x @ w0).pow(2).sum()) is None
    loss = ((x * Through.apply(lam)) @ w0).pow(2).sum()
    assert once_differentiable_in(loss) == "Through"
    assert once_differentiable_in(loss, [w0]) is None
    assert once_differentiable_in(loss, [lam]) == "Through"
    w1 = Through.apply(w0) * 2  # an earlier step's Function, behind the weights w1
    assert once_differentiable_in(0.5 * (x @ w1).pow(2).sum(), [w1]) is None
    assert once_differentiable_in(HalfMeanSquare.apply(x @ w1), [w1]) == "HalfMeanSquare"
