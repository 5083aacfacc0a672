"""Five places where the library returned a wrong answer silently, or refused with a
misleading cure (review 3), in float64:

1. ``FiniteDifference(r=...)`` below the round-off of the LL weights: ``w + eps v`` and
   ``w - eps v`` were the same numbers, the difference exactly 0, and the hypergradient the
   direct term alone, silently. A genuinely zero mixed derivative (also an exact 0) is not
   refused.
2. ``Implicit(method=<not a series>, alpha=...)``: the step was ignored without a word.
3. ``StochasticImplicit(batches=<int>)`` refused dict data that the other methods' samplers
   split; it now splits them with the shared sampling code, as the same tensors.
4. A ``FixedPointMap`` computed under ``torch.no_grad()``: the error blamed ``ul_objective``.
5. A UL parameter replaced, or an LL parameter frozen, after the problem was built: the
   message said "unfrozen", or "use them in an objective", or "wrap the variables in
   nn.Parameter"; it now says that the parameter set changed after construction.

Bugs are asserted by the exception type and its message; unchanged computations bitwise or
at round-off.
"""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, relative_error, ridge, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem, linalg
from bilevel.ll import FixedPointMap, GradientDescent
from bilevel.ul import FiniteDifference, Implicit, Reverse, StochasticImplicit

LR = 0.3


def away_from_zero(p, seed: int = 1) -> None:
    """LL weights of size about 1 (the round-off of the weights is then about eps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.ll_model.w.copy_(1.0 + torch.rand(p.ll_model.w.shape, generator=g, dtype=DTYPE))


# ----------------------------------------------------------------- 1. FiniteDifference's radius


@pytest.mark.parametrize("r", [1e-20, 1e-17])
def test_a_radius_below_the_weights_round_off_is_refused_with_a_working_radius(r):
    """BUG: with ``r`` below ``eps * ||w||`` the two finite-difference points are the same
    floating-point numbers: the hypergradient was the direct term alone (here 0), silently."""
    p = ridge(seed=3)
    away_from_zero(p)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=1)
    fd = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model, r=r)
    before = p.ll_model.w.detach().clone()
    with pytest.raises(ValueError, match=r"r=.* is below the round-off of the LL weights") as e:
        BilevelProblem(ll, fd).hypergradient(p.train, p.val)
    assert "use r=0.01" in str(e.value)  # the working radius, DARTS' (the default)
    assert torch.equal(p.ll_model.w, before) and p.ul_model.log_l2.grad is None


def test_the_named_radius_works_and_small_legitimate_radii_are_not_refused():
    """Radii from DARTS' 1e-2 down to 1e-8 (far above eps ||w||) give the one-step
    hypergradient (the ridge LL is quadratic in w: exact up to round-off of the finite
    difference, which grows as 1 / r)."""
    p = ridge(seed=3)
    away_from_zero(p)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=1)
    (exact,) = BilevelProblem(
        ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    ).hypergradient(p.train, p.val)
    for r, tolerance in ((1e-2, 1e-11), (1e-5, 1e-8), (1e-8, 1e-5)):
        fd = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model, r=r)
        (got,) = BilevelProblem(ll, fd).hypergradient(p.train, p.val)
        assert relative_error(got, exact) < tolerance, r


class WithOffset(nn.Module):
    """The ridge LL weights ``w`` beside a trainable ``offset`` of 1e15 that only a decoupled
    LL term reads: ``||(w, offset)||`` is 1e15, its round-off 0.22, above DARTS' radius 0.01,
    but the UL loss does not read ``offset``, so the perturbation lands on ``w`` (size 1)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.offset = nn.Parameter(torch.tensor([1e15], dtype=DTYPE))

    @property
    def w(self) -> torch.Tensor:
        return self.linear.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def offset_ll(state):
    """``ridge_ll`` on ``w``, plus a term of the offset alone."""
    model, ul = state["ll_model"], state["ul_model"]
    residual = model(state["data"]) - state["target"]
    penalty = 0.5 * (ul.log_l2.exp() * model.w * model.w).sum()
    return 0.5 * (residual**2).mean() + penalty + 0.5 * ((model.offset - 1e15) ** 2).sum()


def test_a_radius_below_the_round_off_of_a_large_weight_it_does_not_move_is_let_through():
    """FOUND (review): the radius was compared with ``eps ||w||`` of all the weights, so one
    large weight (an intercept of prices, here an offset of 1e15) refused DARTS' default radius
    although the perturbation lands on the small weights and survives their rounding (a
    float32 ridge with an intercept of 2e5 was refused, and is 1.2e-3 off float64 without the
    check). Now what the rounded points keep of ``2 r`` decides: the answer is Reverse's."""
    p = ridge(seed=3)
    away_from_zero(p)
    model = WithOffset(p.ll_model)
    ll = GradientDescent(offset_ll, model, p.ul_model, lr=LR, iters=1)
    (exact,) = BilevelProblem(ll, Reverse(ridge_ul, p.ul_model, offset_ll, model)).hypergradient(
        p.train, p.val
    )
    fd = FiniteDifference(ridge_ul, p.ul_model, offset_ll, model, r=1e-2)
    (got,) = BilevelProblem(ll, fd).hypergradient(p.train, p.val)
    assert relative_error(got, exact) < 1e-10


class Decoupled(nn.Module):
    """UL variables that enter the LL objective without touching the LL weights: the mixed
    derivative d2f / dlambda dw is exactly 0."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.linspace(-0.5, 0.5, d, dtype=DTYPE))


def decoupled_ll(state):
    residual = state["ll_model"](state["data"]) - state["target"]
    w = state["ll_model"].w
    return 0.5 * (residual**2).mean() + 0.15 * (w * w).sum() + state["ul_model"].lam.exp().sum()


def decoupled_ul(state):
    return ridge_ul(state) + 0.5 * (state["ul_model"].lam ** 2).sum()


@pytest.mark.parametrize("r", [1e-2, 1e-6])
def test_a_genuinely_zero_mixed_derivative_is_not_refused(r):
    """The finite difference is exactly 0 here too (the LL gradient in lambda does not depend
    on w), but the radius is far above the weights' round-off: the answer is the direct term,
    which is the exact one-step hypergradient (Reverse, to round-off)."""
    p = ridge(seed=3)
    away_from_zero(p)
    ul = Decoupled(5)
    ll = GradientDescent(decoupled_ll, p.ll_model, ul, lr=LR, iters=1)
    (exact,) = BilevelProblem(
        ll, Reverse(decoupled_ul, ul, decoupled_ll, p.ll_model)
    ).hypergradient(p.train, p.val)
    fd = FiniteDifference(decoupled_ul, ul, decoupled_ll, p.ll_model, r=r)
    (got,) = BilevelProblem(ll, fd).hypergradient(p.train, p.val)
    torch.testing.assert_close(got, ul.lam.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------- 2. Implicit's alpha


def returning_b(matvec, b):
    return [x.clone() for x in b]


@pytest.mark.parametrize("alpha", [0.1, "auto"])
@pytest.mark.parametrize(
    "method", ["cg", "minres", "normal_cg", returning_b], ids=["cg", "minres", "normal_cg", "fn"]
)
def test_an_alpha_that_the_solver_ignores_is_refused_at_construction(method, alpha):
    """BUG: ``alpha`` (the series' step) was ignored without a word by the other solvers."""
    p = ridge()
    with pytest.raises(ValueError, match=r"alpha=.* was given, but method=.* does not use it"):
        Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, method=method, alpha=alpha)
    with pytest.raises(ValueError, match=r"method='neumann' and method='fixed_point'"):
        Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, method=method, alpha=alpha)


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_the_series_take_alpha_and_the_other_solvers_run_without_it(method):
    p = ridge()
    for alpha in (None, 0.1, "auto"):
        Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, method=method, alpha=alpha)
    for other in ("cg", "minres", "normal_cg", returning_b):
        Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, method=other)
        Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, method=other, alpha=None)


# --------------------------------------------------------- 3. StochasticImplicit, dict data


def fit_tensor(state):
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean()


def fit_dict_and_target(state):
    residual = state["ll_model"](state["data"]["x"]) - state["target"]
    return 0.5 * (residual**2).mean()


def fit_dict_only(state):
    data = state["data"]
    residual = state["ll_model"](data["inputs"]["x"]) - data["y"]
    return 0.5 * (residual**2).mean()


def stochastic_hypergradients(fit, as_data, steps: int = 3):
    """Three hypergradients of StochasticImplicit(batches=7) on the ridge problem, its data
    given as ``as_data(x, y)``; the draws of its first call, as rows of x."""
    p = ridge(n=30, seed=4)
    ul_model, ll_model = FeatureL2(5), Linear(5)

    def ll_objective(state):
        return fit(state) + state["ul_model"].penalty(state["ll_model"])

    def ul_objective(state):
        return fit(state)

    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.5, iters=40)
    ul = StochasticImplicit(
        ul_objective, ul_model, ll_objective, ll_model, steps=25, batches=7, seed=11
    )
    problem = BilevelProblem(ll, ul)
    train, val = as_data(*p.train), as_data(*p.val)
    grads = [problem.hypergradient(train, val)[0] for _ in range(steps)]
    ul.generator.manual_seed(11)
    drawn = ul.draw(train)
    return grads, drawn


def test_stochastic_implicit_splits_dict_data_as_the_same_tensors():
    """BUG: ``batches=<int>`` refused data given as a dict of tensors (``TypeError: pass a
    callable batches``), which SOBA, StocBiO, ... split. The same rows are drawn of every
    tensor in the dict, and the hypergradients are bitwise those of the tensor data."""
    expected, (x_rows, y_rows) = stochastic_hypergradients(fit_tensor, lambda x, y: (x, y))
    for fit, as_data in (
        (fit_dict_and_target, lambda x, y: ({"x": x}, y)),
        (fit_dict_only, lambda x, y: ({"inputs": {"x": x}, "y": y}, None)),
    ):
        got, (data, target) = stochastic_hypergradients(fit, as_data)
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)
        if target is None:
            data, target = data["inputs"], data["y"]
        assert torch.equal(data["x"], x_rows) and torch.equal(target, y_rows)
    assert len(x_rows) == 7 and not torch.equal(expected[0], expected[1])  # fresh draws


def test_stochastic_implicit_refuses_dict_data_without_rows_with_its_own_cure():
    """Dict data whose tensors disagree on the number of rows, or hold a 0-d tensor: the
    shared sampling code's refusals, with this method's option (batches=None or a callable)."""
    p = ridge(n=30)
    ul = StochasticImplicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, batches=7)
    x, y = p.train
    with pytest.raises(ValueError, match="different numbers of samples"):
        ul.draw(({"x": x}, y[:-1]))
    with pytest.raises(ValueError, match=r"0-dimensional tensor.*pass batches=None"):
        ul.draw(({"x": x, "scale": torch.tensor(2.0, dtype=DTYPE)}, y))
    with pytest.raises(TypeError, match=r"got str\. Pass batches=None .* a callable batches"):
        ul.draw(({"x": x, "name": "train"}, y))


# ------------------------------------------------------------ 4. a fixed-point map without graph

D, M = 6, 3


class Equilibrium(nn.Module):
    """``w = tanh(A w + B lam)``, ``||A|| = 0.6``: a contraction."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        a = torch.randn(D, D, generator=g, dtype=DTYPE)
        self.a = 0.6 * a / torch.linalg.matrix_norm(a, ord=2)
        self.b = torch.randn(D, M, generator=g, dtype=DTYPE)
        self.c = torch.randn(D, generator=g, dtype=DTYPE)
        self.lam = nn.Parameter(torch.randn(M, generator=g, dtype=DTYPE))


def no_grad_map(state):
    ul, w = state["ul_model"], state["ll_model"].w
    with torch.no_grad():
        return [torch.tanh(ul.a @ w + ul.b @ ul.lam)]


def detached_map(state):
    ul, w = state["ul_model"], state["ll_model"].w
    return [torch.tanh(ul.a @ w + ul.b @ ul.lam).detach()]


def equilibrium_ul(state):
    return 0.5 * (state["ll_model"].w - state["ul_model"].c).pow(2).sum()


@pytest.mark.parametrize("the_map", [no_grad_map, detached_map], ids=["no_grad", "detach"])
@pytest.mark.parametrize(
    "method",
    [
        lambda *a: Reverse(*a),
        lambda *a: Implicit(*a, method="fixed_point", k=50),
        lambda *a: Implicit(*a, method="normal_cg", k=20),
    ],
    ids=["reverse", "implicit-fixed_point", "implicit-normal_cg"],
)
def test_a_fixed_point_map_without_graph_is_named_with_the_cure(the_map, method):
    """BUG: the refusal blamed ``ul_objective`` (Reverse) or said the UL parameters were used
    in no objective (Implicit); the map is at fault."""
    ul_model, ll_model = Equilibrium(), Linear(D)
    ll = FixedPointMap(the_map, ll_model, ul_model, iters=30)
    problem = BilevelProblem(ll, method(equilibrium_ul, ul_model, the_map, ll_model))
    with pytest.raises(ValueError, match="fixed_point_map returned tensors with no graph") as e:
        problem.hypergradient(((), ()), ((), ()))
    assert "torch.no_grad()" in str(e.value) and ".detach()" in str(e.value)


# ------------------------------------------------ 5. parameters changed after construction


def build(method, ll_model=None, ul_model=None):
    p = ridge(seed=6)
    ll_model = p.ll_model if ll_model is None else ll_model
    ul_model = p.ul_model if ul_model is None else ul_model
    ll = GradientDescent(ridge_ll, ll_model, ul_model, lr=LR, iters=30)
    ul = method(ridge_ul, ul_model, ridge_ll, ll_model)
    optimizer = torch.optim.SGD(ul_model.parameters(), lr=0.1)
    return p, BilevelProblem(ll, ul, optimizer)


METHODS = [Reverse, lambda *a: Implicit(*a, k=30)]
IDS = ["reverse", "implicit"]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("steps_before", [0, 1])
def test_a_ul_parameter_replaced_after_construction_is_named_as_replaced(method, steps_before):
    """BUG: ``ul_model.log_l2 = nn.Parameter(...)`` after the problem was built was refused as
    "were unfrozen"; the UL optimizer and the method hold the old tensor."""
    p, problem = build(method)
    for _ in range(steps_before):
        problem.step(p.train, p.val)
    p.ul_model.log_l2 = nn.Parameter(p.ul_model.log_l2.detach() + 0.1)
    with pytest.raises(ValueError, match=r"\['log_l2'\] were replaced by new tensors") as e:
        problem.step(p.train, p.val)
    message = str(e.value)
    assert "parameter set changed after construction" in message
    assert "Build the method, the LL optimizer and the UL optimizer again" in message
    assert "copy_(value)" in message  # the in-place alternative
    assert "unfrozen" not in message


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_a_ul_parameter_replaced_by_a_frozen_tensor_is_refused_as_gone(method):
    """BUG: the old parameter got no hypergradient, refused with "use them in an objective"
    (the objective uses the new tensor)."""
    p, problem = build(method)
    p.ul_model.log_l2 = nn.Parameter(p.ul_model.log_l2.detach().clone(), requires_grad=False)
    with pytest.raises(ValueError, match=r"no longer in ul_model \(replaced by a tensor") as e:
        problem.step(p.train, p.val)
    assert "parameter set changed after construction" in str(e.value)


class TwoPart(nn.Module):
    """``x @ w + b``: the UL penalty acts on ``w`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(5, dtype=DTYPE))
        self.b = nn.Parameter(torch.zeros((), dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class PenaltyOnW(FeatureL2):
    def penalty(self, ll_model: nn.Module) -> torch.Tensor:
        return 0.5 * (self.log_l2.exp() * ll_model.w * ll_model.w).sum()


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("steps_before", [0, 1])
def test_an_ll_parameter_frozen_after_construction_is_named(method, steps_before):
    """BUG: freezing ``w`` (the UL variables' path through the LL) after the problem was built
    was refused with "get no hypergradient ... use them in an objective"."""
    ll_model = TwoPart()
    p, problem = build(method, ll_model, PenaltyOnW(5))
    for _ in range(steps_before):
        problem.step(p.train, p.val)
    ll_model.w.requires_grad_(False)
    with pytest.raises(ValueError, match=r"trainable parameters changed after .* was built") as e:
        problem.step(p.train, p.val)
    message = str(e.value)
    assert "['w'] frozen" in message and "parameter set changed after construction" in message
    assert "Unfreeze them" in message and "BilevelProblem again" in message
    assert "Use them in an objective" not in message


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_every_ll_parameter_frozen_after_construction_is_named(method):
    """BUG: "ll_model has no parameters that require grad; wrap the variables to optimize in
    nn.Parameter" (the construction's cure) for parameters frozen since."""
    p, problem = build(method)
    problem.step(p.train, p.val)
    p.ll_model.w.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameters that require grad any more") as e:
        problem.step(p.train, p.val)
    message = str(e.value)
    assert "['w'] frozen" in message and "changed after" in message
    assert "wrap the variables" not in message


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_an_ll_parameter_frozen_off_the_ul_path_still_trains_as_a_new_problem(method):
    """Freezing ``b`` (not on the UL variables' path) is no error: the hypergradient is
    bitwise that of a problem built after the change."""
    ll_model = TwoPart()
    p, problem = build(method, ll_model, PenaltyOnW(5))
    problem.hypergradient(p.train, p.val)
    ll_model.b.requires_grad_(False)
    (got,) = problem.hypergradient(p.train, p.val)
    _, fresh = build(method, ll_model, problem.ul.ul_model)
    (expected,) = fresh.hypergradient(p.train, p.val)
    assert torch.equal(got, expected)
    assert linalg.norm([got]) > 0
