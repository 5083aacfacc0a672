"""Any fixed-point map as the LL (an equilibrium layer), with Implicit and Reverse (float64):
against the implicit function theorem with dense Jacobians."""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, Linear, relative_error
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import FixedPointMap, LowerLevelDivergenceError
from bilevel.ul import Implicit, Reverse

D, M = 6, 3


class Equilibrium(nn.Module):
    """``w = tanh(A w + B lam)`` with ``||A|| = 0.6``: a contraction, whose Jacobian
    ``diag(1 - w^2) A`` is not symmetric."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(D, D, generator=g, dtype=DTYPE)
        self.a = 0.6 * a / torch.linalg.matrix_norm(a, ord=2)
        self.b = torch.randn(D, M, generator=g, dtype=DTYPE)
        self.c = torch.randn(D, generator=g, dtype=DTYPE)
        self.lam = nn.Parameter(torch.randn(M, generator=g, dtype=DTYPE))

    def exact(self, damping: float = 0.0) -> torch.Tensor:
        """``dF/dlam = (D B)^T q``, ``((I - D A)^T + damping I) q = w* - c`` (without damping
        the IFT's ``(dw/dlam)^T (w* - c)``, ``dw/dlam = (I - D A)^{-1} D B``)."""
        lam = self.lam.detach()
        w = torch.zeros(D, dtype=DTYPE)
        for _ in range(500):
            w = torch.tanh(self.a @ w + self.b @ lam)
        slope = torch.diag(1 - w**2)
        system = (torch.eye(D, dtype=DTYPE) - slope @ self.a).T + damping * torch.eye(D)
        return (slope @ self.b).T @ torch.linalg.solve(system, w - self.c)


def fixed_point_map(state):
    ul, w = state["ul_model"], state["ll_model"].w
    return [torch.tanh(ul.a @ w + ul.b @ ul.lam)]


def ul_objective(state):
    return 0.5 * (state["ll_model"].w - state["ul_model"].c).pow(2).sum()


def hypergradient(method_cls, iters=120, **kwargs):
    ul_model, ll_model = Equilibrium(), Linear(D)
    ll = FixedPointMap(fixed_point_map, ll_model, ul_model, iters=iters)
    ul = method_cls(ul_objective, ul_model, fixed_point_map, ll_model, **kwargs)
    (grad,) = BilevelProblem(ll, ul).hypergradient(((), ()), ((), ()))
    return grad, ul_model.exact(), ul


@pytest.mark.parametrize(
    ("method", "k"), [("fixed_point", 100), ("normal_cg", 30), ("neumann", 100)]
)
def test_implicit_on_a_fixed_point_map_is_the_ift_hypergradient(method, k):
    grad, exact, ul = hypergradient(Implicit, k=k, method=method)
    assert relative_error(grad, exact) < 1e-10
    assert not ul.diagnostics["diverged"]


@pytest.mark.parametrize(
    ("method", "k", "kwargs"),
    [("fixed_point", 200, {"alpha": 0.5}), ("normal_cg", 30, {}), ("neumann", 200, {"alpha": 0.5})],
)
def test_damping_on_a_fixed_point_map_damps_the_transposed_system(method, k, kwargs):
    """The non-symmetric system ``(I - dPhi/dw)^T q = v`` with ``damping`` on its diagonal
    (its transpose product too, for ``normal_cg``)."""
    grad, _, ul = hypergradient(Implicit, k=k, method=method, damping=0.5, **kwargs)
    exact = ul.ul_model.exact(damping=0.5)
    assert relative_error(exact, ul.ul_model.exact()) > 0.05  # the damping shows at this size
    assert relative_error(grad, exact) < 1e-10


def test_reverse_through_the_iterations_reaches_the_same_answer():
    grad, exact, _ = hypergradient(Reverse)
    assert relative_error(grad, exact) < 1e-10


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_symmetric_solvers_are_refused_on_a_fixed_point_map(method):
    with pytest.raises(ValueError, match=r"not symmetric.*method='fixed_point'"):
        hypergradient(Implicit, k=10, method=method)


def test_a_map_that_returns_the_wrong_shape_is_named():
    ul_model, ll_model = Equilibrium(), Linear(D)

    def bad(state):
        return [state["ll_model"].w[:3]]

    ll = FixedPointMap(bad, ll_model, ul_model, iters=3)
    with pytest.raises(ValueError, match=r"output 0 must be a tensor of shape \(6,\)"):
        ll.run((), ())


def test_an_expanding_map_is_caught_as_a_diverging_ll():
    """``w <- 2 w + 1`` moves away from its fixed point: the LL loss ``1/2 ||Phi(w) - w||^2``
    grows, as a diverging gradient LL's would."""
    ul_model, ll_model = Equilibrium(), Linear(D)
    expanding = lambda s: [2 * s["ll_model"].w + 1]  # noqa: E731
    with pytest.raises(LowerLevelDivergenceError, match="not a contraction"):
        FixedPointMap(expanding, ll_model, ul_model, iters=6).run((), ())
    ll = FixedPointMap(expanding, ll_model, ul_model, iters=6, on_growth="ignore")
    losses = ll.run((), ()).losses
    assert bool((losses[1:] > losses[:-1]).all())
