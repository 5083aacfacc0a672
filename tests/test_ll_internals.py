"""The LL's shortcuts around ``higher`` give what ``higher`` itself gives."""

from __future__ import annotations

import higher
import pytest
import torch
from torch import nn

from bilevel.ll import GradientDescent
from bilevel.ll.patched import install
from bilevel.models import FewShotNet
from bilevel.state import all_finite


class Shared(nn.Module):
    """Nested modules, a frozen parameter and a layer used twice (a shared parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.body = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), self.layer, nn.Linear(3, 2))
        self.scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.body(self.layer(x))


@pytest.mark.parametrize("track", [True, False])
def test_install_places_the_weights_where_update_params_does(track):
    """Same tensors in the same places as higher's update_params (shared weights, nested
    modules), and only the latest weights kept, also when higher would keep a history."""
    torch.manual_seed(0)
    for module, x in ((Shared(), torch.randn(5, 3)), (FewShotNet(5, hidden=4), None)):
        if x is None:
            x = torch.randn(5, 1, 28, 28)
        ours = higher.monkeypatch(module, copy_initial_weights=True, track_higher_grads=track)
        theirs = higher.monkeypatch(module, copy_initial_weights=True, track_higher_grads=track)
        for _ in range(2):  # twice: the second call reuses the cached slots
            params = [torch.randn_like(p) for p in module.parameters()]
            install(ours, params)
            theirs.update_params(params)
            assert len(ours._fast_params) == 1
            assert all(p is q for p, q in zip(ours.fast_params, params, strict=True))
            for (name, a), (_, b) in zip(
                ours.named_parameters(), theirs.named_parameters(), strict=True
            ):
                assert a is b, name
            for (name, a), (_, b) in zip(ours.named_modules(), theirs.named_modules(), strict=True):
                for key in a._parameters:
                    assert a._parameters[key] is b._parameters[key], f"{name}.{key}"
            torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_steps_without_a_graph_update_in_place_and_match_out_of_place_steps():
    """The first T - K steps (no graph) run in place; their result equals plain GD, and the
    UL parameters are restored to requires_grad=True afterwards."""
    torch.manual_seed(1)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    ll_model = nn.Linear(3, 1).double()
    ul_model = nn.Linear(1, 1, bias=False).double()

    def ll_objective(state):
        out = state["ll_model"](state["data"]).squeeze(-1)
        decay = state["ul_model"].weight.exp().sum() * state["ll_model"].weight.pow(2).sum()
        return ((out - state["target"]) ** 2).mean() + decay

    for optimizer, kw in (("sgd", {}), ("sgd", {"momentum": 0.5}), ("adam", {})):
        gd = GradientDescent(
            ll_objective, ll_model, ul_model, 0.05, 7, optimizer, differentiable_steps=2, **kw
        )
        aux = gd.optimize(x, y)
        assert all(p.requires_grad for p in ul_model.parameters())
        reference = [p.detach().clone().requires_grad_() for p in ll_model.parameters()]
        patched = higher.monkeypatch(ll_model, copy_initial_weights=True)
        torch_opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
        opt = torch_opt(reference, lr=0.05, **kw)
        for _ in range(7):
            opt.zero_grad()
            patched.update_params(reference)
            loss = ll_objective({"data": x, "target": y, "ul_model": ul_model, "ll_model": patched})
            loss.backward()
            opt.step()
        for a, b in zip(aux.fast_params, reference, strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
        # the last two steps kept a graph to the weights they started from
        assert aux.fast_params[0].grad_fn is not None


def test_ul_parameters_are_unfrozen_when_the_ll_objective_raises():
    ll_model, ul_model = nn.Linear(2, 1), nn.Linear(1, 1)
    calls = []

    def ll_objective(state):
        calls.append(state["ul_model"].weight.requires_grad)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return state["ll_model"](state["data"]).pow(2).mean() * state["ul_model"].weight.sum()

    gd = GradientDescent(ll_objective, ll_model, ul_model, 0.1, 5, differentiable_steps=0)
    with pytest.raises(RuntimeError, match="boom"):
        gd.optimize(torch.randn(4, 2), torch.zeros(4))
    assert calls == [False, False, False]  # frozen while the steps ran without a graph
    assert all(p.requires_grad for p in ul_model.parameters())


def test_in_place_steps_round_as_the_steps_that_keep_a_graph():
    """float32, a conv net with batch norm: the weights after the in-place (no-graph) steps
    are bit for bit those after the same steps taken with a graph."""
    torch.manual_seed(2)
    net = FewShotNet(5, hidden=8)
    x, y = torch.randn(10, 1, 28, 28), torch.arange(5).repeat(2)

    def ll_objective(state):
        return torch.nn.functional.cross_entropy(state["ll_model"](state["data"]), y)

    results = []
    for steps in (0, None):
        gd = GradientDescent(ll_objective, net, net, 0.4, 3, differentiable_steps=steps)
        results.append([w.detach() for w in gd.optimize(x, y).fast_params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_all_finite_sees_nan_and_inf_and_is_not_fooled_by_an_overflowing_sum():
    big = torch.full((4,), torch.finfo(torch.float32).max)  # finite entries, infinite sum
    assert all_finite([big])
    assert all_finite([torch.zeros(3), big])
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not all_finite([torch.tensor([1.0, bad, 2.0])])
        assert not all_finite([torch.ones(2), torch.tensor([bad])])
        assert not all_finite([big, torch.tensor([bad])])
