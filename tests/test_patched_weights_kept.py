"""The patched LL model's fast weights are read without ``nn.Module.__getattr__`` (they sit in
each module's instance dict as well as in its parameter slots), its modules' calls run the
user's own ``forward`` (none of ``higher``'s per-call work), and every way of writing the
weights keeps the two the same, is read for the call that made it, or is refused:
``torch.func.functional_call`` on ``state["ll_model"]`` or on a submodule (a hypernetwork's
forward) computes with the weights it is given, as on a plain module (ignored silently, then
refused, before), and ``params=`` on a directly called submodule is refused (taken silently
before)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from problems import DTYPE, ridge, ridge_exact_hypergradient, ridge_ll, ridge_ul
from test_patched_models import (
    LR,
    Hyper,
    Net,
    check_method,
    fit_objective,
    functional_losses,
    net_out,
    regression_data,
)
from torch import nn
from torch.func import functional_call

from bilevel.ll import GradientDescent, evaluate_at
from bilevel.ll.patched import install, patch, release_weights, sync_from
from bilevel.ul import Implicit, Reverse


@pytest.mark.parametrize("method", ["reverse", "finite_difference"])
def test_functional_call_on_the_ll_model_evaluates_the_weights_it_is_given(method):
    """functional_call swaps other weights into the patched model's slots: the call computes
    with them, as on the user's module. (higher's forward put the LL run's weights back over
    them: the objective was evaluated at the run's weights, without a word; then refused.)"""
    model, hyper = Net(), Hyper()

    def objective(state: dict) -> torch.Tensor:
        m, u = state["ll_model"], state["ul_model"]
        out = functional_call(m, {"feat.weight": 2 * m.feat.weight}, (state["data"],))
        fit = F.mse_loss(out, state["target"] + u.shift)
        return fit + u.log_c.exp() * (m.feat.weight**2).sum()

    def loss(w: list, u: list, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fit = F.mse_loss(net_out([2 * w[0], *w[1:]], x), y + u[1])
        return fit + u[0].exp() * (w[0] ** 2).sum()

    train, val = regression_data(3)
    check_method(method, objective, model, hyper, (loss, loss), train, val)


class HyperNetwork(nn.Module):
    """An LL model whose forward generates the weight of its ``target`` layer from its own
    weights and calls the layer with it through ``functional_call`` (the target's own weight,
    always replaced, is frozen)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.code = nn.Parameter(0.5 * torch.randn(2, dtype=DTYPE))
        self.generator = nn.Linear(2, 12).to(DTYPE)
        self.target = nn.Linear(3, 4).to(DTYPE)
        self.target.weight.requires_grad_(False)
        self.head = nn.Linear(4, 1).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.generator(self.code).view(4, 3)
        hidden = functional_call(self.target, {"weight": weight}, (x,))
        return self.head(torch.tanh(hidden)).squeeze(-1)


@pytest.mark.parametrize("method", ["reverse", "finite_difference"])
def test_a_hypernetwork_ll_model_runs_its_target_at_the_generated_weights(method):
    """The LL run and the hypergradient of a hypernetwork LL model against the same model's
    unroll by hand, evaluated with torch's functional_call on the user's module (the review
    measured the hypergradient off by 9.4 through higher's forward; it was refused since)."""
    model, hyper = HyperNetwork(), Hyper()
    train, val = regression_data(3)
    loss, _ = functional_losses(model)  # fit_objective by hand (the UL objective here too)
    check_method(method, fit_objective, model, hyper, (loss, loss), train, val)


def _patched(model: nn.Module) -> tuple[nn.Module, list[torch.Tensor]]:
    """A patched copy of ``model`` synced as at every LL run (hooks, buffers), holding copies
    of the model's weights as its fast weights (returned too)."""
    patched = patch(model)
    sync_from(model, patched)
    fast = [p.detach().clone() for p in model.parameters()]
    install(patched, fast)
    return patched, fast


def test_per_example_gradients_through_functional_call_are_the_users_modules():
    """``torch.func.vmap`` of ``torch.func.grad`` over ``functional_call`` on the patched
    model (per-example gradients, as docs/migrating.md says), and the run's weights in place
    afterwards."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    patched, fast = _patched(model)
    names = [name for name, _ in model.named_parameters()]
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, dtype=DTYPE)

    def per_example(m: nn.Module) -> dict[str, torch.Tensor]:
        def loss(weights: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return (functional_call(m, weights, (xi[None],)).squeeze() - yi) ** 2

        weights = dict(zip(names, fast, strict=True))
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(weights, x, y)

    got, expected = per_example(patched), per_example(model)
    assert all(torch.equal(got[name], expected[name]) for name in names)
    assert patched[0].weight is fast[0] and patched[2].bias is fast[3]


def test_functional_call_on_a_submodule_of_the_ll_model_computes_with_its_weights():
    model = Net()
    patched, fast = _patched(model)
    x = torch.randn(5, 3, dtype=DTYPE)
    other = {"weight": torch.randn(4, 3, dtype=DTYPE), "bias": torch.randn(4, dtype=DTYPE)}
    out = functional_call(patched.feat, other, (x,))
    assert torch.equal(out, F.linear(x, other["weight"], other["bias"]))
    # afterwards the run's weights are read and called again, also after a call that raised
    with pytest.raises(RuntimeError):
        functional_call(patched.feat, other, (torch.randn(5, 2, dtype=DTYPE),))
    assert patched.feat.weight is fast[0] and patched.feat._parameters["weight"] is fast[0]
    assert torch.equal(patched.feat(x), F.linear(x, fast[0], fast[1]))
    release_weights(patched)  # swapped into a released model: some slots empty
    with pytest.raises(ValueError, match="was released"):
        functional_call(patched.feat, {"weight": other["weight"]}, (x,))


def test_a_submodule_called_with_params_is_refused():
    """higher lets a directly called submodule take ``params=``, which replaced the LL run's
    fast weights (all of them, the root's too) with the caller's, silently; only the whole
    model's call refused it."""
    model, hyper = Net(), Hyper()
    train, _ = regression_data(3)

    def objective(state: dict) -> torch.Tensor:
        m = state["ll_model"]
        other = [2 * w for w in m.parameters()]
        feat = m.feat(state["data"], params=other)
        return F.mse_loss(m.head(torch.tanh(feat)).squeeze(-1), state["target"])

    ll = GradientDescent(objective, model, hyper, lr=LR, iters=2)
    with pytest.raises(TypeError, match="submodules\\) was called with params"):
        ll.optimize(*train)


def test_every_write_of_the_fast_weights_is_what_reads_and_calls_see():
    """install, evaluate_at, an assignment from an objective (higher's update_params) and
    release: the attribute read, the parameter slot and a call of the model agree."""
    model = Net()
    patched = patch(model)
    x = torch.randn(5, 3, dtype=DTYPE)
    names = ("feat.weight", "feat.bias", "head.weight", "head.bias")

    def seen(m: nn.Module) -> list[torch.Tensor]:
        return [m.feat.weight, m.feat.bias, m.head.weight, m.head.bias]

    def agree(weights: list[torch.Tensor]) -> None:
        assert all(a is b for a, b in zip(seen(patched), weights, strict=True))
        assert all(a is b for a, b in zip(patched.parameters(), weights, strict=True))
        expected = functional_call(model, dict(zip(names, weights, strict=True)), (x,))
        assert torch.equal(patched(x), expected)
        assert torch.equal(patched.feat(x), F.linear(x, weights[0], weights[1]))

    first = [torch.randn_like(p) for p in model.parameters()]
    install(patched, first)
    agree(first)
    other = [torch.randn_like(p) for p in model.parameters()]
    with evaluate_at(patched, other):
        agree(other)
    agree(first)
    # an assignment from an objective (higher: a new list of fast weights, one replaced; on a
    # submodule's weight it fails inside higher 0.2.1, on the root's it works)
    patched_root = patch(nn.Linear(3, 1).to(DTYPE))
    install(patched_root, [torch.randn(1, 3, dtype=DTYPE), torch.randn(1, dtype=DTYPE)])
    new_weight = torch.randn(1, 3, dtype=DTYPE)
    patched_root.weight = new_weight
    assert patched_root.weight is new_weight
    assert torch.equal(patched_root(x), F.linear(x, new_weight, patched_root.bias))
    patched_root.update_params([first[2], first[3]])
    assert patched_root.weight is first[2] and patched_root.bias is first[3]
    release_weights(patched)
    assert seen(patched) == [None] * 4
    # released by the LL optimizer (ll.release): no weights to read, and a call says so
    p = ridge(seed=2)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=2)
    auxiliary = ll.optimize(*p.train)
    assert auxiliary.w is auxiliary._parameters["w"]
    ll.release(auxiliary)
    assert auxiliary.w is None
    with pytest.raises(ValueError, match="was released"):
        auxiliary(p.train[0])


def test_an_objective_reads_the_ll_weights_without_module_getattr():
    """The speed of this change (3-5% of a PTT or BDA UL step on small problems): reading the
    LL model's weight in an objective does not go through ``nn.Module.__getattr__``; and the
    hypergradient is still exact (ridge, implicit, against the closed form)."""
    p = ridge(seed=3)
    reads = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is nn.Module.__getattr__.__code__:
            reads.append(frame.f_locals.get("name"))

    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=3)
    method = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    method.compute_gradients(*p.val, ll.optimize(*p.train), *p.train)
    sys.setprofile(profile)
    try:
        method.compute_gradients(*p.val, ll.optimize(*p.train), *p.train)
    finally:
        sys.setprofile(None)
    assert "w" not in reads  # the LL weight (the UL model's log_l2 is the user's own module)
    assert "log_l2" in reads  # (the profile saw the reads it is meant to see)

    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=300)
    ll.differentiable_steps = 0  # (what BilevelProblem sets for Implicit)
    exact = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.3, k=50, tolerance=1e-12)
    p.ul_model.zero_grad()
    exact.compute_gradients(*p.val, ll.optimize(*p.train), *p.train)
    expected = ridge_exact_hypergradient(p)
    assert torch.allclose(p.ul_model.log_l2.grad, expected, rtol=1e-8, atol=1e-12)


def test_a_call_of_the_patched_model_runs_none_of_highers_per_call_work():
    """The patched modules' forward is the user's class's (the fast weights are already in
    each instance): a call enters no frame of ``higher``, whose per-call forward set every
    weight again through ``__setattr__`` in every module (4x a linear module's own time)."""
    model = Net()
    patched = patch(model)
    weights = [torch.randn_like(p) for p in model.parameters()]
    install(patched, weights)
    x = torch.randn(5, 3, dtype=DTYPE)
    entered = []

    def profile(frame, event, arg):
        if event == "call" and "/higher/" in frame.f_code.co_filename:
            entered.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        out = patched(x)
        feat = patched.feat(x)
    finally:
        sys.setprofile(None)
    assert entered == []
    names = ("feat.weight", "feat.bias", "head.weight", "head.bias")
    assert torch.equal(out, functional_call(model, dict(zip(names, weights, strict=True)), (x,)))
    assert torch.equal(feat, F.linear(x, weights[0], weights[1]))


class Halved(nn.Linear):
    """A class that serves its weight through its own ``__getattr__`` (halved)."""

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        return 0.5 * value if name == "weight" else value


class ReadsChild(nn.Module):
    """A forward that reads a submodule's weights without calling it, and a container's."""

    def __init__(self) -> None:
        super().__init__()
        self.sub = nn.Linear(3, 3).to(DTYPE)
        self.extra = nn.ParameterList([nn.Parameter(torch.randn(3, 3, dtype=DTYPE))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.sub.weight.T + self.sub.bias) @ self.extra[0]


def test_a_class_that_serves_its_weights_itself_is_read_through_it():
    """An instance entry would be found before the class's ``__getattr__``: the patched model
    computed with the raw weight where the user's module halves it (review of the change)."""
    model = Halved(3, 2).to(DTYPE)
    patched = patch(model)
    weights = [torch.randn_like(p) for p in model.parameters()]
    install(patched, weights)
    x = torch.randn(4, 3, dtype=DTYPE)
    expected = functional_call(model, {"weight": weights[0], "bias": weights[1]}, (x,))
    assert torch.equal(patched(x), expected)


@pytest.mark.parametrize("swapped", ["sub.weight", "extra.0"])
def test_functional_call_of_weights_read_without_a_call_computes_with_them(swapped):
    """A call reads the slots of the modules below it too, whose weights its forward may read
    without calling them (review of the change: ignored silently, then refused)."""
    model = ReadsChild()
    patched, fast = _patched(model)
    x = torch.randn(5, 3, dtype=DTYPE)
    other = {swapped: 2 * dict(model.named_parameters())[swapped].detach()}
    names = [name for name, _ in model.named_parameters()]
    expected = functional_call(model, {**dict(zip(names, fast, strict=True)), **other}, (x,))
    assert torch.equal(functional_call(patched, other, (x,)), expected)
    assert torch.equal(
        patched(x), functional_call(model, dict(zip(names, fast, strict=True)), (x,))
    )


def test_functional_call_on_a_module_with_forward_hooks_is_refused():
    """A pruning pre-hook computes the weight before the forward runs: called directly, the
    pruned layer's hook has read the LL run's weights before the call could give it the
    caller's, and the call is refused rather than computed with the run's weights. Called
    from above, the hook runs after the caller's weights are in place, and the result is the
    user's module's."""
    model = Net()
    torch.nn.utils.prune.l1_unstructured(model.feat, "weight", amount=0.3)
    patched, _ = _patched(model)  # the hooks synced, as at every LL run
    x = torch.randn(5, 3, dtype=DTYPE)
    weight = 2 * model.feat.weight_orig.detach()
    with pytest.raises(TypeError, match=r"straight on a Linear .*forward hooks.*evaluate_at"):
        functional_call(patched.feat, {"weight_orig": weight}, (x,))
    other = {"feat.weight_orig": weight}
    assert torch.equal(functional_call(patched, other, (x,)), functional_call(model, other, (x,)))
    assert torch.equal(patched(x), model(x))  # the run's weights (the user's, installed)


class SharedLayer(nn.Module):
    """One layer registered at two places (the patched model holds a copy per place)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        layer = nn.Linear(3, 3).to(DTYPE)
        self.a, self.b = layer, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class ReadsOwnParameters(nn.Linear):
    """A root whose forward reads ``self.parameters()`` (the root's is patched)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + sum(p.pow(2).sum() for p in self.parameters())


class OwnCall(nn.Linear):
    """A class that reads its weight in its own ``__call__``, outside ``forward``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) / self.weight.norm()


def test_functional_call_edge_cases_compute_as_the_users_module_or_are_refused():
    """Review of the change (each was computed with the run's weights, silently, or refused
    with a wrong reason): the root's ``parameters()`` read in its forward, ``None`` given for
    a weight, one layer at two places swapped under one of its names, and a class reading its
    weight in its own ``__call__``."""
    x = torch.randn(4, 3, dtype=DTYPE)
    root = nn.Linear(3, 3).to(DTYPE)
    root.__class__ = ReadsOwnParameters
    other = {"weight": torch.randn(3, 3, dtype=DTYPE)}
    expected = functional_call(root, other, (x,))
    assert torch.equal(functional_call(_patched(root)[0], other, (x,)), expected)
    net = nn.Sequential(nn.Linear(3, 2), nn.Tanh()).to(DTYPE)
    no_bias = {"0.bias": None}
    assert torch.equal(
        functional_call(_patched(net)[0], no_bias, (x,)), functional_call(net, no_bias, (x,))
    )
    shared = SharedLayer()
    patched, _ = _patched(shared)
    swapped = {"a.weight": torch.randn(3, 3, dtype=DTYPE)}
    tied = functional_call(patched, swapped, (x,))  # tie_weights=True: both places
    assert torch.equal(tied, functional_call(copy.deepcopy(shared), swapped, (x,)))
    with pytest.raises(TypeError, match=r"registered at two places.*tie_weights=True"):
        functional_call(patched, swapped, (x,), tie_weights=False)
    assert torch.equal(patched(x), shared(x))  # refused, not broken
    scaled = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).to(DTYPE)
    scaled[0].__class__ = OwnCall
    patched, _ = _patched(scaled)
    with pytest.raises(TypeError, match=r"straight on a OwnCall .*__call__ of its own"):
        functional_call(patched[0], other, (x,))
    from_above = {"0.weight": other["weight"]}
    assert torch.equal(
        functional_call(patched, from_above, (x,)), functional_call(scaled, from_above, (x,))
    )


def test_a_released_model_with_hooks_or_containers_says_it_was_released():
    """A pruning pre-hook or a container read runs before any call of a module with weights of
    its own: the refusal comes from the whole model's call (review: raw errors before)."""
    p = ridge(seed=4)
    x = torch.randn(5, 3, dtype=DTYPE)
    pruned = Net()
    torch.nn.utils.prune.l1_unstructured(pruned.feat, "weight", amount=0.3)
    for model in (pruned, ReadsChild()):

        def objective(state: dict) -> torch.Tensor:
            return state["ll_model"](x).pow(2).mean() + 0 * state["ul_model"].log_l2.sum()

        ll = GradientDescent(objective, model, p.ul_model, lr=0.01, iters=2)
        auxiliary = ll.optimize(*p.train)
        ll.release(auxiliary)
        with pytest.raises(ValueError, match="was released"):
            auxiliary(x)
