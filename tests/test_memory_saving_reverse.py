"""MemorySavingReverse (stored iterates, one step recomputed at a time) against Reverse
(the whole LL graph kept), in float64: the same unrolled hypergradient, to round-off."""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, FeatureL2, relative_error, ridge, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import MemorySavingReverse, Reverse

RTOL = 1e-10


class Hypers(FeatureL2):
    """Per-feature L2 plus an LL step size and a momentum as UL variables."""

    def __init__(self, d: int, iters: int) -> None:
        super().__init__(d, 0.3)
        self.log_lr = nn.Parameter(torch.tensor(-1.5, dtype=DTYPE))
        self.schedule = nn.Parameter(torch.linspace(0.3, 0.1, iters, dtype=DTYPE))
        self.momentum = nn.Parameter(torch.tensor(0.6, dtype=DTYPE))


def both(ll_objective, ul_objective, ll_model, ul_model, train, val, **ll_kwargs):
    """Hypergradients of Reverse and MemorySavingReverse on one problem."""
    out = []
    for method in (Reverse, MemorySavingReverse):
        ll = GradientDescent(ll_objective, ll_model, ul_model, **ll_kwargs)
        ul = method(ul_objective, ul_model, ll_objective, ll_model)
        out.append(BilevelProblem(ll, ul).hypergradient(train, val))
    return out


def assert_same(reverse, saving):
    assert len(reverse) == len(saving)
    for r, s in zip(reverse, saving, strict=True):
        assert relative_error(s, r) < RTOL


def test_ridge_per_feature_l2_equals_reverse():
    p = ridge(d=5, seed=1)
    reverse, saving = both(
        ridge_ll, ridge_ul, p.ll_model, p.ul_model, p.train, p.val, lr=0.3, iters=25
    )
    assert_same(reverse, saving)
    assert reverse[0].abs().min() > 1e-6  # every component is far from zero


@pytest.mark.parametrize(
    ("hyper", "kwargs"),
    [
        ("momentum", {"lr": 0.2, "momentum": 0.8}),
        ("ul_momentum", {"lr": 0.2, "momentum": "ul"}),
        ("ul_step_size", {"lr": "ul", "momentum": 0.5}),
        ("callable_step_size", {"lr": lambda ul: ul.log_lr.exp()}),
        ("schedule", {"lr": "schedule"}),
        ("adam", {"lr": 0.05, "optimizer": "adam"}),
    ],
)
def test_rules_and_hyperparameter_forms_equal_reverse(hyper, kwargs):
    """Heavy ball (state carried back), UL tensors for the step size and the momentum, a step
    size computed from the UL model (its graph shared by every step), a per-step schedule,
    and Adam (state and step-dependent bias correction)."""
    iters = 15
    p = ridge(d=4, seed=2)
    ul_model = Hypers(4, iters)
    used = {"log_l2"}
    if kwargs.get("momentum") == "ul":
        kwargs = {**kwargs, "momentum": ul_model.momentum}
        used.add("momentum")
    if kwargs.get("lr") == "ul":
        kwargs = {**kwargs, "lr": ul_model.log_lr}  # a leaf: the raw step size
        with torch.no_grad():
            ul_model.log_lr.fill_(0.25)
        used.add("log_lr")
    elif kwargs.get("lr") == "schedule":
        kwargs = {**kwargs, "lr": ul_model.schedule}
        used.add("schedule")
    elif callable(kwargs.get("lr")):
        used.add("log_lr")
    for name, param in ul_model.named_parameters():
        param.requires_grad_(name in used)
    kwargs = {"iters": iters, **kwargs}
    reverse, saving = both(ridge_ll, ridge_ul, p.ll_model, ul_model, p.train, p.val, **kwargs)
    assert len(reverse) == len(used)
    assert_same(reverse, saving)


def test_maml_initial_weights_equal_reverse():
    """The UL parameters are the LL model's own weights (MAML), on a nonlinear network."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DTYPE)
    x, y = (
        torch.randn(12, 3, generator=g, dtype=DTYPE),
        torch.randn(12, 1, generator=g, dtype=DTYPE),
    )
    xv, yv = (
        torch.randn(9, 3, generator=g, dtype=DTYPE),
        torch.randn(9, 1, generator=g, dtype=DTYPE),
    )

    def loss(state):
        return ((state["ll_model"](state["data"]) - state["target"]) ** 2).mean()

    reverse, saving = both(loss, loss, net, net, (x, y), (xv, yv), lr=0.1, iters=10, momentum=0.5)
    assert len(reverse) == 4
    assert_same(reverse, saving)


def test_stores_iterates_not_graph_and_refuses_runs_without_them():
    iters, d = 12, 5
    p = ridge(d=d)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=iters, momentum=0.9)
    ul = MemorySavingReverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    trajectory = ul.run_ll(ll, *p.train)
    assert trajectory.differentiable_steps == 0
    assert all(w.grad_fn is None for w in trajectory.weights)
    assert all(p.requires_grad for p in p.ul_model.parameters())  # unfrozen after the run
    ul.accumulate(trajectory, p.val, p.train)
    # iterates w_0..w_{T-1}, and momentum buffers before steps 1..T-1
    assert ul.diagnostics["stored_bytes"] == (2 * iters - 1) * d * 8
    aux = ll.optimize(*p.train)
    with pytest.raises(ValueError, match="stored every iterate"):
        ul.compute_gradients(*p.val, aux, *p.train)


def test_ul_step_and_bad_ll_input():
    p = ridge(d=3)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=5)
    ul = MemorySavingReverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    opt = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    before = p.ul_model.log_l2.detach().clone()
    BilevelProblem(ll, ul, opt).step(p.train, p.val)
    assert not torch.equal(before, p.ul_model.log_l2.detach())
    with pytest.raises(FloatingPointError, match="LL loss"):
        bad = (p.train[0], torch.full_like(p.train[1], float("nan")))
        BilevelProblem(ll, ul).hypergradient(bad, p.val)


def test_other_step_maps_bda_and_fixed_point_equal_reverse():
    """The recomputed step is the run's own step map: BDA (the UL gradient aggregated into
    the LL steps) and a fixed-point map."""
    from bilevel.ll import BDA, FixedPointMap

    p = ridge(d=4, seed=3)
    x, y = p.train

    def phi(state):
        w = state["ll_model"].w
        grad = x.T @ (x @ w - y) / len(x) + state["ul_model"].log_l2.exp() * w
        return [w - 0.3 * grad]

    def lls():
        yield BDA(
            ridge_ll,
            p.ll_model,
            p.ul_model,
            lr=0.1,
            iters=8,
            ul_objective=ridge_ul,
            alpha=0.6,
            alpha_decay=0.8,
        )
        yield FixedPointMap(phi, p.ll_model, p.ul_model, iters=10)

    for reverse_ll, saving_ll in zip(lls(), lls(), strict=True):
        ll_objective = reverse_ll.ll_objective
        (reverse,) = BilevelProblem(
            reverse_ll, Reverse(ridge_ul, p.ul_model, ll_objective, p.ll_model)
        ).hypergradient(p.train, p.val)
        (saving,) = BilevelProblem(
            saving_ll, MemorySavingReverse(ridge_ul, p.ul_model, ll_objective, p.ll_model)
        ).hypergradient(p.train, p.val)
        assert relative_error(saving, reverse) < RTOL


class SpectralNet(nn.Module):
    """A spectrally normalized layer: each forward in training mode moves its power-iteration
    vectors (buffers) in place, so a step recomputed later sees other buffers unless they
    are put back."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        layer = nn.Linear(3, 3, dtype=DTYPE)
        self.layer = nn.utils.parametrizations.spectral_norm(layer)
        self.head = nn.Linear(3, 1, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(2 * self.layer(x))).squeeze(-1)


def test_a_model_whose_forward_moves_its_buffers_equals_reverse():
    """Each recomputed step starts from the buffers its step saw (before: from those the
    whole run left, 7e-4 relative off Reverse on this model), and the run's buffers are
    back afterwards: a second hypergradient is the same."""
    hyper = nn.Module()
    hyper.log_l2 = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))

    def ll_objective(state):
        m = state["ll_model"]
        fit = ((m(state["data"]) - state["target"]) ** 2).mean()
        return fit + state["ul_model"].log_l2.exp() * (m.head.weight**2).sum()

    def ul_objective(state):
        return ((state["ll_model"](state["data"]) - state["target"]) ** 2).mean()

    torch.manual_seed(0)
    train = (torch.randn(20, 3, dtype=DTYPE), torch.randn(20, dtype=DTYPE))
    val = (torch.randn(20, 3, dtype=DTYPE), torch.randn(20, dtype=DTYPE))
    got = {}
    for method in (Reverse, MemorySavingReverse):
        net = SpectralNet()
        ll = GradientDescent(ll_objective, net, hyper, lr=0.2, iters=4)
        problem = BilevelProblem(ll, method(ul_objective, hyper, ll_objective, net))
        got[method] = [problem.hypergradient(train, val)[0] for _ in range(2)]
    expected = got[Reverse][0]
    for value in got[MemorySavingReverse]:
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
