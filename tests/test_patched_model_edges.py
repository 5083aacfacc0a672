"""LL models that the patched copy met badly (float64): a forward that edits its own weights
in place, a UL submodule kept as a plain attribute of the LL model, and an empty (``None``)
child slot. Each against a hand-written unroll or the user's model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference, Forward, Reverse

DTYPE = torch.float64
LR, ITERS = 0.1, 3


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g, dtype=DTYPE), torch.randn(8, 4, generator=g, dtype=DTYPE)


def mse(state: dict) -> torch.Tensor:
    return ((state["ll_model"](state["data"]) - state["target"]) ** 2).mean()


class MaxNorm(nn.Module):
    """A layer whose forward clips its weights in place (a max-norm constraint)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, dtype=DTYPE)
        with torch.no_grad():
            self.a.weight.mul_(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.a.weight.clamp_(-0.3, 0.3)
        return self.a(x)


class LogLR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(-2.0, dtype=DTYPE))


@pytest.mark.parametrize("method", [Reverse, Forward, FiniteDifference])
def test_a_forward_that_edits_its_weights_leaves_the_users_model_as_it_was(method):
    """BUG (before the fix): runs whose steps all keep no graph (Forward's, one-step DARTS')
    started from aliases of the user's weights, and the forward's in-place clip wrote into
    ``ll_model`` itself."""
    torch.manual_seed(1)
    ll_model, ul_model = MaxNorm(), LogLR()
    before = [t.detach().clone() for t in ll_model.parameters()]
    iters = 1 if method is FiniteDifference else ITERS
    ll = GradientDescent(mse, ll_model, ul_model, lr=lambda u: u.log_lr.exp(), iters=iters)
    if method is FiniteDifference:  # (its step size is a number: a UL penalty instead)
        ll = GradientDescent(
            lambda s: mse(s) + s["ul_model"].log_lr.exp() * (s["ll_model"].a.bias ** 2).sum(),
            ll_model, ul_model, lr=LR, iters=1,
        )  # fmt: skip
    problem = BilevelProblem(ll, method(mse, ul_model, ll.ll_objective, ll_model))
    problem.hypergradient(data(0), data(1))
    for a, b in zip(ll_model.parameters(), before, strict=True):
        assert torch.equal(a.detach(), b)


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6, dtype=DTYPE)


class Head(nn.Module):
    """An LL head that reads the UL trunk, kept as a plain attribute (not registered: the
    LL does not train it), and an empty child slot."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "trunk", trunk)
        self.lin = nn.Linear(6, 4, dtype=DTYPE)
        self.register_module("skip", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.trunk(x)))


def test_an_unregistered_ul_submodule_and_an_empty_child_slot():
    """BUG (before the fix): patching failed inside higher ('Linear' object has no attribute
    '_param_names' for the plain attribute; 'NoneType' object has no attribute
    '_parameters' for the empty slot). The hypergradient of the trunk through the head's
    LL steps equals a hand-written unroll, and the user's modules keep their attribute and
    slot."""
    torch.manual_seed(0)
    ul_model = Trunk()
    head = Head(ul_model.trunk)
    train, val = data(0), data(1)
    problem = BilevelProblem(
        GradientDescent(mse, head, ul_model, lr=LR, iters=ITERS), Reverse(mse, ul_model, mse, head)
    )
    got = problem.hypergradient(train, val)

    trunk = {k: v.detach().clone().requires_grad_() for k, v in ul_model.trunk.named_parameters()}
    weights = {k: v.detach().clone() for k, v in head.lin.named_parameters()}

    def loss(w: dict, pair: tuple) -> torch.Tensor:
        features = torch.tanh(functional_call(ul_model.trunk, trunk, (pair[0],)))
        return ((functional_call(head.lin, w, (features,)) - pair[1]) ** 2).mean()

    for _ in range(ITERS):
        w = {k: v.requires_grad_() if not v.requires_grad else v for k, v in weights.items()}
        grads = torch.autograd.grad(loss(w, train), list(w.values()), create_graph=True)
        weights = {k: v - LR * g for (k, v), g in zip(w.items(), grads, strict=True)}
    expected = torch.autograd.grad(loss(weights, val), list(trunk.values()))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert head.__dict__["trunk"] is ul_model.trunk and "trunk" not in head._modules
    assert "skip" in head._modules and head._modules["skip"] is None
