"""Every bad input found so far, in one table: each is refused with an exception whose message
names the argument at fault (and says what was expected)."""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, ridge, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit, Reverse, Truncated


def parts(ul_cls=Reverse, ul_objective=ridge_ul, **ul_kwargs):
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3)
    ul = ul_cls(ul_objective, p.ul_model, ridge_ll, p.ll_model, **ul_kwargs)
    return p, ll, ul


def problem(ul_cls=Reverse, ul_objective=ridge_ul, **ul_kwargs):
    p, ll, ul = parts(ul_cls, ul_objective, **ul_kwargs)
    return p, BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))


def step(train=None, val=None, ul_cls=Reverse, ul_objective=ridge_ul, **ul_kwargs):
    """One UL step, with ``train`` / ``val`` replaced by ``f(p)`` when given."""
    p, pr = problem(ul_cls, ul_objective, **ul_kwargs)
    pr.step(p.train if train is None else train(p), p.val if val is None else val(p))


def meta_step(transform):
    """One meta-step on a batch of 4 tasks of 10 examples, changed by ``transform``."""
    g = torch.Generator().manual_seed(0)
    net = Linear(5)
    ll = GradientDescent(ridge_ll, net, FeatureL2(5), lr=0.1, iters=3)
    ul = Reverse(ridge_ul, ll.ul_model, ridge_ll, net)
    pr = BilevelProblem(ll, ul, torch.optim.SGD(ll.ul_model.parameters(), lr=0.1))
    batch = {
        key: (torch.randn(4, 10, 5, generator=g, dtype=DTYPE), torch.randn(4, 10, dtype=DTYPE))
        for key in ("train", "test")
    }
    pr.meta_step(transform(batch))


def gd(**kwargs):
    p = ridge()
    GradientDescent(ridge_ll, p.ll_model, p.ul_model, **{"lr": 0.1, "iters": 3, **kwargs})


def implicit(**kwargs):
    p = ridge()
    Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **{"k": 5, **kwargs})


def run(**kwargs):
    p, pr = problem()
    pr.run(**{"data": lambda i: (p.train, p.val), "steps": 2, "progress": False, **kwargs})


def ul_optimizer(make):
    p, ll, ul = parts()
    BilevelProblem(ll, ul, make(p))


def released_auxiliary_model():
    p, ll, ul = parts()
    aux = ll.optimize(*p.train)
    ll.release(aux)
    ul.compute_gradients(*p.val, aux, *p.train)


def constant(state):  # depends on nothing: a leaf made here
    return torch.tensor(1.0, dtype=DTYPE, requires_grad=True)


def hypergradient(ll_objective=ridge_ll, ul_objective=ridge_ul, ll_model=None, ul_model=None):
    p = ridge()
    ll_model = p.ll_model if ll_model is None else ll_model
    ul_model = p.ul_model if ul_model is None else ul_model
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.1, iters=3)
    ul = Reverse(ul_objective, ul_model, ll_objective, ll_model)
    BilevelProblem(ll, ul).hypergradient(p.train, p.val)


class WithSpare(FeatureL2):
    def __init__(self):
        super().__init__(5)
        self.spare = nn.Parameter(torch.zeros(2, dtype=DTYPE))


def with_extra():
    model = Linear(5)
    model.extra = nn.Parameter(torch.zeros(1, dtype=DTYPE))
    return model


def single(tensor):
    return lambda p: tensor


float32 = {
    "val[0]": lambda: step(val=lambda p: (p.val[0].float(), p.val[1])),
    "val[1]": lambda: step(val=lambda p: (p.val[0], p.val[1].float())),
    "train[0]": lambda: step(train=lambda p: (p.train[0].float(), p.train[1])),
}

# (id, action, exception type, the argument the message must name)
CASES = [
    # --- issue 12 ---------------------------------------------------------------------------
    (
        "ul_optimizer over the LL model",
        lambda: ul_optimizer(lambda p: torch.optim.SGD(p.ll_model.parameters(), lr=0.1)),
        ValueError,
        "ul_optimizer",
    ),
    (
        "ul_optimizer over another module",
        lambda: ul_optimizer(lambda p: torch.optim.Adam(Linear(3).parameters(), lr=0.1)),
        ValueError,
        "ul_optimizer",
    ),
    (
        "ul_optimizer lr=True",
        lambda: ul_optimizer(lambda p: torch.optim.SGD(p.ul_model.parameters(), lr=True)),
        TypeError,
        "ul_optimizer",
    ),
    (
        "meta-batch without a task dimension",
        lambda: meta_step(
            lambda b: {
                k: (torch.randn(40, 5, dtype=DTYPE), torch.randn(40, dtype=DTYPE)) for k in b
            }
        ),
        ValueError,
        'batch["train"][1]',
    ),
    (
        "meta-batch data and targets of other example counts",
        lambda: meta_step(lambda b: {**b, "test": (b["test"][0], b["test"][1][:, :7])}),
        ValueError,
        'batch["test"]',
    ),
    (
        "meta-batch of another dtype",
        lambda: meta_step(lambda b: {**b, "test": (b["test"][0].float(), b["test"][1])}),
        ValueError,
        'batch["test"][0]',
    ),
    ("run: fewer batches than steps", lambda: run(data=[None] * 3, steps=5), ValueError, "data"),
    ("run: a batch that is no pair", lambda: run(data=lambda i: 1.0), TypeError, "batch of data"),
    ("run: steps=True", lambda: run(steps=True), ValueError, "steps"),
    (
        "run: checkpoint_every=True",
        lambda: run(checkpoint_every=True),
        ValueError,
        "checkpoint_every",
    ),
    ("run: log_every=True", lambda: run(log_every=True), ValueError, "log_every"),
    (
        "run: checkpoint_seconds=True",
        lambda: run(checkpoint_seconds=True),
        ValueError,
        "checkpoint_seconds",
    ),
    ("Implicit alpha=True", lambda: implicit(method="neumann", alpha=True), ValueError, "alpha"),
    ("Implicit tolerance=True", lambda: implicit(tolerance=True), ValueError, "tolerance"),
    (
        "Implicit ll_learning_rate=True",
        lambda: implicit(ll_learning_rate=True),
        ValueError,
        "ll_learning_rate",
    ),
    ("Implicit k=True", lambda: implicit(k=True), ValueError, "k must"),
    ("Implicit power_iters=True", lambda: implicit(power_iters=True), ValueError, "power_iters"),
    ("GradientDescent lr=True", lambda: gd(lr=True), TypeError, "lr"),
    ("GradientDescent iters=True", lambda: gd(iters=True), ValueError, "iters"),
    ("GradientDescent momentum=True", lambda: gd(momentum=True), TypeError, "momentum"),
    (
        "GradientDescent growth_tolerance=True",
        lambda: gd(growth_tolerance=True),
        ValueError,
        "growth_tolerance",
    ),
    ("GradientDescent on_growth=True", lambda: gd(on_growth=True), ValueError, "on_growth"),
    (
        "GradientDescent differentiable_steps=True",
        lambda: gd(differentiable_steps=True),
        TypeError,
        "differentiable_steps",
    ),
    (
        "BilevelProblem on_nonfinite=True",
        lambda: BilevelProblem(*parts()[1:], on_nonfinite=True),
        ValueError,
        "on_nonfinite",
    ),
    *[(f"{name} of another dtype", action, ValueError, name) for name, action in float32.items()],
    ("train with no target", lambda: step(train=lambda p: p.train[0]), TypeError, "train"),
    ("val with no target", lambda: step(val=lambda p: p.val[0]), TypeError, "val"),
    ("val of one item", lambda: step(val=lambda p: (p.val[0],)), TypeError, "val"),
    ("a released auxiliary model", released_auxiliary_model, TypeError, "auxiliary_model"),
    (
        "Reverse: a UL loss that depends on nothing",
        lambda: step(ul_objective=constant),
        ValueError,
        "objective",
    ),
    # --- earlier ---------------------------------------------------------------------------
    (
        "ll_objective returns a float",
        lambda: hypergradient(ll_objective=lambda s: 1.0),
        TypeError,
        "ll_objective",
    ),
    (
        "ll_objective returns a vector",
        lambda: hypergradient(ll_objective=lambda s: s["ll_model"](s["data"])),
        ValueError,
        "ll_objective",
    ),
    (
        "ll_objective detached",
        lambda: hypergradient(ll_objective=lambda s: ridge_ll(s).detach()),
        ValueError,
        "ll_objective",
    ),
    (
        "ul_objective returns a str",
        lambda: hypergradient(ul_objective=lambda s: "loss"),
        TypeError,
        "ul_objective",
    ),
    (
        "ul_objective NaN",
        lambda: hypergradient(ul_objective=lambda s: ridge_ul(s) * float("nan")),
        FloatingPointError,
        "UL loss",
    ),
    ("ll_model without parameters", lambda: gd_model(nn.ReLU()), ValueError, "ll_model"),
    (
        "ul_model not a module",
        lambda: Reverse(ridge_ul, object(), ridge_ll, Linear(5)),
        TypeError,
        "ul_model",
    ),
    ("an unused UL parameter", lambda: hypergradient(ul_model=WithSpare()), ValueError, "'spare'"),
    ("an unused LL parameter", lambda: hypergradient(ll_model=with_extra()), ValueError, "'extra'"),
    ("Implicit k=0", lambda: implicit(k=0), ValueError, "k must"),
    ("Implicit method", lambda: implicit(method="lbfgs"), ValueError, "method"),
    (
        "Implicit on_divergence",
        lambda: implicit(on_divergence="ignore"),
        ValueError,
        "on_divergence",
    ),
    ("GradientDescent lr < 0", lambda: gd(lr=-0.1), ValueError, "lr"),
    ("GradientDescent optimizer", lambda: gd(optimizer="nonsuch"), ValueError, "update rule"),
    ("GradientDescent betas for sgd", lambda: gd(betas=(0.9, 0.99)), TypeError, "betas"),
    ("Truncated truncate_iter=0", lambda: truncated(0), ValueError, "truncate_iter"),
    ("Truncated truncate_iter=True", lambda: truncated(True), TypeError, "truncate_iter"),
    ("models of two dtypes", lambda: gd_model(Linear(5).float()), ValueError, "dtype"),
    (
        "LL data of another dtype",
        lambda: gd_optimize(lambda p: (p.train[0].float(), p.train[1])),
        ValueError,
        "data",
    ),
    (
        "ll and ul on other models",
        lambda: BilevelProblem(parts()[1], parts()[2]),
        ValueError,
        "ll_model and ul_model",
    ),
    ("step without ul_optimizer", lambda: without_optimizer(), ValueError, "ul_optimizer"),
    (
        "meta_step without test",
        lambda: problem()[1].meta_step({"train": ridge().train}),
        TypeError,
        "task batch",
    ),
]


def without_optimizer():
    p, ll, ul = parts()
    BilevelProblem(ll, ul).step(p.train, p.val)


def gd_model(ll_model):
    GradientDescent(ridge_ll, ll_model, ridge().ul_model, lr=0.1, iters=3)


def gd_optimize(batch):
    p = ridge()
    GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3).optimize(*batch(p))


def truncated(value):
    p = ridge()
    Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=value)


@pytest.mark.parametrize(
    ("action", "error", "name"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_naming_the_argument(action, error, name):
    with pytest.raises(error) as err:
        action()
    assert name in str(err.value), str(err.value)


def test_a_released_auxiliary_model_is_named_as_released():
    with pytest.raises(TypeError, match="released"):
        released_auxiliary_model()


def test_implicit_refuses_a_ul_loss_that_depends_on_nothing():
    with pytest.raises(ValueError, match="ul_objective"):
        step(ul_cls=Implicit, ul_objective=constant)


def test_implicit_refuses_a_bool_stationarity_warning():
    with pytest.raises((TypeError, ValueError), match="stationarity_warning"):
        implicit(stationarity_warning=True)
