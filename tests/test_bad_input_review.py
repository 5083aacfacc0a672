"""What two reviews fed the public API (2026-12-03) that got through: an online run whose LL
diverges from its first window, online batches that are not pairs or of another dtype, a
plain ``nn.Module()`` container in the LL model, a UL optimizer that leaves out a UL
parameter, a series divergence told to use the step size that diverged. Each test fails
before its fix."""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, ridge, ridge_hessian, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent, LowerLevelDivergenceError
from bilevel.online import OnlineHypergradient
from bilevel.ul import Forward, HypergradientDivergenceError, Implicit, Reverse, Truncated


def _online(p, lr: float, method: str = "forward", hyper_every: int = 2) -> OnlineHypergradient:
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=8)
    args = (ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    ul = Forward(*args) if method == "forward" else Truncated(*args, truncate_iter=hyper_every)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    return OnlineHypergradient(ll, ul, optimizer, hyper_every)


@pytest.mark.parametrize("method", ["forward", "truncated"])
def test_an_online_run_that_diverges_from_its_start_is_refused_before_any_ul_update(method):
    """An LL step size above 2/lambda_max: the first window's losses grow tenfold. It ran on,
    and the UL parameters reached 1e188 (Forward) without an error."""
    p = ridge()
    lambda_max = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())
    start = p.ul_model.log_l2.detach().clone()
    runner = _online(p, lr=4.0 / lambda_max, method=method, hyper_every=4)
    with pytest.raises(LowerLevelDivergenceError, match=f"online {method}, LL steps 1-4: The LL"):
        runner.run(p.train, p.val, 8, progress=False)
    assert torch.equal(p.ul_model.log_l2.detach(), start)  # no UL update from it


def test_an_online_run_with_a_stable_step_is_not_refused():
    p = ridge()
    lambda_max = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())
    _online(p, lr=1.0 / lambda_max).run(p.train, p.val, 8, progress=False)
    assert p.ul_model.log_l2.grad is not None


@pytest.mark.parametrize(
    ("which", "bad", "error", "message"),
    [
        ("val", lambda x, y: x, TypeError, r"val must be a pair \(data, target\)"),
        ("train", lambda x, y: x, TypeError, r"train must be a pair \(data, target\)"),
        ("val", lambda x, y: (x.float(), y.float()), ValueError, r"val\[0\] has dtype"),
        ("train", lambda x, y: (x, y.float()), ValueError, r"train\[1\] has dtype"),
    ],
)
def test_online_batches_are_checked_as_a_step_checks_them(which, bad, error, message):
    """Before: TypeErrors from inside the library (Call.__init__ takes 7 positional
    arguments but 25 were given) or a raw matmul error inside the objective."""
    p = ridge()
    batches = {"train": p.train, "val": p.val}
    batches[which] = bad(*batches[which])
    with pytest.raises(error, match=message):
        _online(p, lr=0.1).run(batches["train"], batches["val"], 4, progress=False)


def test_online_batches_from_a_function_are_checked_each():
    p = ridge()
    x, y = p.train
    batch = lambda step: (x, y) if step < 3 else x  # noqa: E731
    with pytest.raises(TypeError, match=r"the batch train\(3\) returned: train must be a pair"):
        _online(p, lr=0.1).run(batch, p.val, 6, progress=False)


# ------------------------------------------------------------------ models and optimizers


class _Inner(nn.Module):
    """An empty subclass: what a plain ``nn.Module()`` container should behave as."""


class _Holder(nn.Module):
    """An LL model whose weight lives in a container submodule ``inner``."""

    def __init__(self, container: type[nn.Module], d: int) -> None:
        super().__init__()
        self.inner = container()
        self.inner.w = nn.Parameter(torch.zeros(d, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.inner.w


def _held_ll(state: dict) -> torch.Tensor:
    residual = state["ll_model"](state["data"]) - state["target"]
    penalty = 0.5 * (state["ul_model"].log_l2.exp() * state["ll_model"].inner.w ** 2).sum()
    return 0.5 * (residual**2).mean() + penalty


@pytest.mark.parametrize("method", ["reverse", "cg"])
def test_an_ll_model_with_a_plain_module_as_container_runs(method):
    """``self.inner = nn.Module()`` holding a parameter: every LL run raised higher's bare
    "Cannot create a consistent method resolution order (MRO) for bases Module,
    _MonkeyPatchBase". Now it gives the hypergradient of the same model built with a
    subclass, bitwise, and the user's module keeps its class."""
    p = ridge()
    grads = []
    for container in (nn.Module, _Inner):
        net, ul = _Holder(container, 5), FeatureL2(5)
        ll = GradientDescent(_held_ll, net, ul, lr=0.1, iters=20)
        args = (ridge_ul, ul, _held_ll, net)
        upper = (
            Reverse(*args)
            if method == "reverse"
            else Implicit(*args, method="cg", k=20, stationarity_warning=None)
        )
        grads.append(BilevelProblem(ll, upper).hypergradient(p.train, p.val)[0])
        assert type(net.inner) is container
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().max() > 0


def test_a_ul_optimizer_that_leaves_out_a_ul_parameter_is_refused():
    """The parameter left out never moved and its .grad added up across steps (0.088,
    0.177, 0.265, ...): a clipping hook saw its norm grow and scaled down the others'."""
    p = ridge()
    ul = FeatureL2(5)
    ul.shift = nn.Parameter(torch.zeros(5, dtype=DTYPE))
    ll = GradientDescent(ridge_ll, p.ll_model, ul, lr=0.1, iters=3)
    with pytest.raises(ValueError, match=r"leaves out UL parameter\(s\) .*ul_model\.shift"):
        BilevelProblem(
            ll, Reverse(ridge_ul, ul, ridge_ll, p.ll_model), torch.optim.SGD([ul.log_l2])
        )
    ul.shift.requires_grad_(False)  # the cure: a parameter meant to stay is frozen
    BilevelProblem(ll, Reverse(ridge_ul, ul, ridge_ll, p.ll_model), torch.optim.SGD([ul.log_l2]))


# ------------------------------------------------------------------ messages with a cure


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_a_series_on_an_indefinite_hessian_is_not_told_to_use_the_alpha_it_used(method):
    """Eigenvalues -0.05 next to 0.05: the shifted power iteration cannot resolve the
    negative one, and the message said "use alpha=0.0915 (alpha='auto' does this) or
    method='cg'", the alpha that had just diverged, and a method that fails too."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DTYPE))
    eigenvalues = torch.tensor([-0.05, 0.05, 0.4, 0.5, 0.6, 10.93], dtype=DTYPE)
    a, b = q @ torch.diag(eigenvalues) @ q.T, torch.randn(6, generator=g, dtype=DTYPE)

    def ll_objective(state: dict) -> torch.Tensor:
        w = state["ll_model"].w
        return 0.5 * w @ a @ w - (state["ul_model"].log_l2 * b) @ w

    def ul_objective(state: dict) -> torch.Tensor:
        return 0.5 * ((state["ll_model"].w - 1.0) ** 2).sum()

    net, ul = Linear(6), FeatureL2(6)
    ll = GradientDescent(ll_objective, net, ul, lr=0.05, iters=2, on_growth="ignore")
    upper = Implicit(
        ul_objective, ul, ll_objective, net, method=method, alpha="auto", k=500,
        stationarity_warning=None,
    )  # fmt: skip
    with pytest.raises(HypergradientDivergenceError, match="a smaller alpha is no cure") as info:
        BilevelProblem(ll, upper).hypergradient((None, None), (None, None))
    assert "alpha='auto' does this" not in str(info.value)
    assert "method='minres'" in str(info.value)


# ------------------------------------------------------------------ settings and call order


def _reverse_problem(p, **options) -> BilevelProblem:
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3, **options)
    upper = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    return BilevelProblem(ll, upper, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))


def test_run_to_fewer_steps_than_its_checkpoint_holds_is_refused(tmp_path):
    """It returned None silently, the problem at the checkpoint's later step."""
    path = tmp_path / "run.pt"
    _reverse_problem(ridge()).run(lambda i: (ridge().train, ridge().val), 4, path, progress=False)
    again = _reverse_problem(ridge())
    with pytest.raises(ValueError, match=r"steps=2 is the total .* holds UL step 4"):
        again.run(lambda i: (ridge().train, ridge().val), 2, path, progress=False)
    again.run(lambda i: (ridge().train, ridge().val), 4, path, progress=False)  # the cure
    assert again.step_count == 4


@pytest.mark.parametrize(
    ("value", "message"),
    [(0, "iters must be an integer >= 1"), (2.5, "iters must be an integer >= 1")],
)
def test_ll_iters_set_later_is_checked_as_at_construction(value, message):
    """``ll.iters = 0`` raised a bare 'stack expects a non-empty TensorList' at the next run,
    and 2.5 a message about differentiable_steps, which the user never set."""
    ll = GradientDescent(ridge_ll, Linear(5), FeatureL2(5), lr=0.1, iters=3)
    with pytest.raises(ValueError, match=message):
        ll.iters = value
    ll.iters = 7  # a valid change goes through
    assert ll.iters == 7


def test_ll_iters_cannot_outgrow_a_per_step_schedule():
    """A schedule of 3 step sizes with ll.iters = 5 raised a bare IndexError at step 3."""
    schedule = torch.tensor([0.1, 0.05, 0.02], dtype=DTYPE)
    ll = GradientDescent(ridge_ll, Linear(5), FeatureL2(5), lr=schedule, iters=3)
    with pytest.raises(ValueError, match="lr is a per-step schedule of 3 steps"):
        ll.iters = 5


def test_a_step_size_that_requires_grad_outside_the_ul_model_is_refused():
    """It was accepted, got no hypergradient and never moved (lr.grad stayed None)."""
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="lr is a tensor that requires grad but is not a param"):
        GradientDescent(ridge_ll, Linear(5), FeatureL2(5), lr=lr, iters=3)


def test_an_ll_model_holding_the_ul_model_is_told_to_keep_them_apart():
    """The message said 'freeze them' of the UL parameter that the LL model held (the cure
    froze the hyperparameter, and the next error was 'ul_model has no parameters')."""
    p = ridge()

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(5, dtype=DTYPE))
            self.sub = p.ul_model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    net = Holder()
    ll = GradientDescent(ridge_ll, net, p.ul_model, lr=0.1, iters=3)
    problem = BilevelProblem(ll, Reverse(ridge_ul, p.ul_model, ridge_ll, net))
    with pytest.raises(
        ValueError, match=r"ll_model holds parameters of ul_model \(\['sub\.log_l2'"
    ):
        problem.hypergradient(p.train, p.val)


def test_compute_gradients_twice_on_one_unrolled_auxiliary_model_says_why():
    """The second call raised torch's bare 'Trying to backward through the graph a second
    time'. Implicit, which keeps no graph of the steps, may be asked twice."""
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3)
    reverse = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    aux = ll.optimize(*p.train)
    reverse.compute_gradients(*p.val, aux, *p.train)
    with pytest.raises(TypeError, match="back-propagated through by an earlier compute_grad"):
        reverse.compute_gradients(*p.val, aux, *p.train)
    implicit = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, stationarity_warning=None)
    ll.differentiable_steps = 0
    aux = ll.optimize(*p.train)
    p.ul_model.log_l2.grad = None
    implicit.compute_gradients(*p.val, aux, *p.train)
    once = p.ul_model.log_l2.grad.clone()
    implicit.compute_gradients(*p.val, aux, *p.train)
    torch.testing.assert_close(p.ul_model.log_l2.grad, 2 * once, rtol=1e-14, atol=0)


def test_a_numpy_array_in_a_task_batch_is_refused():
    """Only tensors were split by task: every task got the whole (4, 10, 3) array."""
    p = ridge()
    x = torch.randn(4, 10, 5, dtype=DTYPE)
    batch = {"train": (x.numpy(), x.sum(-1)), "test": (x, x.sum(-1))}
    with pytest.raises(TypeError, match=r'batch\["train"\]\[0\] holds a numpy.ndarray'):
        _reverse_problem(p).meta_hypergradient(batch)


def test_a_log_that_is_not_callable_is_refused_before_the_first_step():
    """``log="log.csv"`` was refused only when the first record was due, 10 UL steps in."""
    p = ridge()
    problem = _reverse_problem(p)
    with pytest.raises(TypeError, match="log must be None or a callable"):
        problem.run(lambda i: (p.train, p.val), 30, log="log.csv", progress=False)
    assert problem.step_count == 0
    with pytest.raises(TypeError, match="log must be None or a callable"):
        _online(ridge(), lr=0.1).run(p.train, p.val, 4, log="log.csv", progress=False)


def test_stochastic_implicit_queries_draw_new_minibatches():
    """problem.hypergradient put StochasticImplicit's generator back after each call: 50
    queries were one estimate, bitwise, and a loop of queries and optimizer steps reused one
    minibatch sequence. Now each call draws on, as from the global RNG; from the same
    generator state a query is the hypergradient a step takes."""
    from bilevel.ul import StochasticImplicit

    p = ridge(n=40)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=50)
    si = StochasticImplicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, steps=5, batches=4)
    problem = BilevelProblem(ll, si, torch.optim.SGD(p.ul_model.parameters(), lr=0.0))
    start = si.state_dict()
    first = problem.hypergradient(p.train, p.val)[0]
    second = problem.hypergradient(p.train, p.val)[0]
    assert si.draws > 0 and not torch.equal(first, second)
    si.load_state_dict(start)
    problem.step(p.train, p.val)
    assert torch.equal(p.ul_model.log_l2.grad, first)


# ------------------------------------------------------------------ a review of the fixes


class _Meta(nn.Module):
    """A UL model that holds the LL model (its weights' start, learned) and a step size."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.log_lr = nn.Parameter(torch.tensor(-2.0, dtype=DTYPE))


def test_an_unused_weight_of_a_learned_initialization_is_named_as_unused():
    """The UL model holds the LL model (Meta-SGD, a learned start): an LL weight the
    objective does not read was said to be 'll_model holds parameters of ul_model'."""
    p = ridge()
    net = Linear(5)
    net.unused = nn.Parameter(torch.zeros(2, dtype=DTYPE))
    meta = _Meta(net)
    ll = GradientDescent(_start_ll, net, meta, lr=0.1, iters=3)
    problem = BilevelProblem(ll, Reverse(ridge_ul, meta, _start_ll, net))
    with pytest.raises(ValueError, match=r"ll_objective does not depend on .*\['unused'\]"):
        problem.hypergradient(p.train, p.val)


def _start_ll(state: dict) -> torch.Tensor:
    """Ridge with a fixed penalty: the UL variable is the LL's start (and its step size)."""
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean() + 0.05 * (state["ll_model"].w ** 2).sum()


def test_leaving_a_learned_initialization_out_of_the_optimizer_is_told_the_right_cure():
    """The refusal said to freeze ul_model.net.w, the LL's own weight (then 'll_model has
    no parameters that require grad')."""
    net = Linear(5)
    meta = _Meta(net)
    ll = GradientDescent(_start_ll, net, meta, lr=0.1, iters=3)
    with pytest.raises(ValueError, match="keep ll_model out of ul_model") as info:
        BilevelProblem(ll, Reverse(ridge_ul, meta, _start_ll, net), torch.optim.SGD([meta.log_lr]))
    assert "ul_model.net.w" in str(info.value)


def test_a_series_diverging_on_a_positive_definite_hessian_is_told_to_lower_alpha():
    """alpha 2% above the true 2/lambda_max but below 2/(the power iteration's estimate,
    which is from below): the series diverges and a smaller alpha is the cure; the first fix
    said 'a smaller alpha is no cure'."""
    d = 200
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    a = q @ torch.diag(torch.linspace(0.5, 10.0, d, dtype=DTYPE)) @ q.T
    b = torch.randn(d, generator=g, dtype=DTYPE)

    def ll_objective(state: dict) -> torch.Tensor:
        w = state["ll_model"].w
        return 0.5 * w @ a @ w - (state["ul_model"].log_l2 * b) @ w

    def ul_objective(state: dict) -> torch.Tensor:
        return 0.5 * ((state["ll_model"].w - 1.0) ** 2).sum()

    net, ul = Linear(d), FeatureL2(d)
    ll = GradientDescent(ll_objective, net, ul, lr=0.1, iters=300)
    upper = Implicit(
        ul_objective, ul, ll_objective, net, method="neumann", alpha=2.04 / 10, k=500,
        stationarity_warning=None,
    )  # fmt: skip
    with pytest.raises(HypergradientDivergenceError, match="converges only for alpha <"):
        BilevelProblem(ll, upper).hypergradient((None, None), (None, None))


def test_load_state_dict_of_something_else_says_what_it_needs(tmp_path):
    """None raised a bare AttributeError, and {} with strict=False a KeyError."""
    problem = _reverse_problem(ridge())
    with pytest.raises(TypeError, match=r"state must be the dict of state_dict\(\)"):
        problem.load_state_dict(None)
    with pytest.raises(ValueError, match="the state has no 'ul_model' or 'll_model'"):
        problem.load_state_dict({}, strict=False)


def test_a_checkpoint_saved_onto_a_folder_is_refused_before_writing(tmp_path):
    """A bare IsADirectoryError from os.replace, after the whole file was written."""
    problem = _reverse_problem(ridge())
    with pytest.raises(IsADirectoryError, match="is a folder: give the path of a file in it"):
        problem.save_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []
