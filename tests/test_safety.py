"""Divergent Neumann / fixed point are corrected by alpha="auto" or refused loudly; NaN and
divergence in the LL are reported."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from problems import DTYPE, relative_error, ridge, ridge_exact_hypergradient, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import HypergradientDivergenceError, Implicit, Reverse

STIFF_LR = 0.045  # the LL converges (lambda_max ~ 40), but 0.1 is too large for the series


def stiff():
    p = ridge(d=5, scale=5.2, l2=0.5)
    x = p.train[0]
    lam = torch.linalg.eigvalsh(x.T @ x / len(x) + 0.5 * torch.eye(5, dtype=DTYPE))
    assert 2 / lam[-1] < 0.1 < 2.0 / lam[-1] * 3 and STIFF_LR < 2 / lam[-1]
    return p, float(lam[-1])


def too_large_step(p, method, **kwargs):
    """Implicit whose series step 0.1 exceeds 2 / lambda_max."""
    return Implicit(
        ridge_ul,
        p.ul_model,
        ridge_ll,
        p.ll_model,
        alpha=0.1,
        k=10,
        method=method,
        **kwargs,
    )


def solve(p, ul):
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=STIFF_LR, iters=2000)
    (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    return grad


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_divergent_series_is_refused_with_lambda_max_and_safe_alpha(method):
    p, lambda_max = stiff()
    ul = too_large_step(p, method)
    with pytest.raises(HypergradientDivergenceError) as err:
        solve(p, ul)
    message = str(err.value)
    assert "diverged" in message and "alpha='auto'" in message
    assert f"{lambda_max:.4g}" in message  # the measured lambda_max
    assert f"alpha={1 / lambda_max:.3g}" in message  # and a safe step


def test_divergent_series_can_warn_instead():
    p, _ = stiff()
    ul = too_large_step(p, "neumann", on_divergence="warn")
    with pytest.warns(RuntimeWarning, match="diverged"):
        solve(p, ul)
    assert ul.diagnostics["diverged"]


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_alpha_auto_corrects_the_divergent_case(method):
    p, lambda_max = stiff()
    ul = Implicit(
        ridge_ul,
        p.ul_model,
        ridge_ll,
        p.ll_model,
        ll_learning_rate=0.1,
        k=3000,
        method=method,
        alpha="auto",
        power_iters=100,
    )
    grad = solve(p, ul)
    assert ul.diagnostics["lambda_max"] == pytest.approx(lambda_max, rel=1e-3)
    assert not ul.diagnostics["diverged"]
    assert relative_error(grad, ridge_exact_hypergradient(p)) < 1e-7


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)

    def forward(self, x):
        return self.net(x).squeeze(-1)


class WeightDecay(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_decay = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))


def mlp_ll(state):
    model = state["ll_model"]
    fit = F.mse_loss(model(state["data"]), state["target"])
    decay = sum((w**2).sum() for w in model.parameters())
    return fit + 0.5 * state["ul_model"].log_decay.exp() * decay


def mlp_ul(state):
    return F.mse_loss(state["ll_model"](state["data"]), state["target"])


def test_mlp_weight_decay_neumann_auto_agrees_with_cg_and_the_naive_series_is_refused():
    """The typical user report: a weight-decay hyperparameter on a small MLP, ten Neumann terms
    with alpha = the LL learning rate, terms growing each step."""
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 3, generator=g, dtype=DTYPE)
    y = torch.sin(x.sum(1))
    xv = 3 * torch.randn(64, 3, generator=g, dtype=DTYPE)
    yv = torch.sin(xv.sum(1))
    net, decay = MLP(), WeightDecay()
    # the LL solved once (3000 Adam steps), then each hypergradient runs one Adam step of
    # 1e-8 from its solution: the three solvers see that point, for a third of the LL's work
    solved = GradientDescent(mlp_ll, net, decay, lr=0.01, iters=3000, optimizer="adam")
    solution = list(solved.optimize(x, y).parameters())
    with torch.no_grad():
        for w, value in zip(net.parameters(), solution, strict=True):
            w.copy_(value)
    ll_converged = GradientDescent(mlp_ll, net, decay, lr=1e-8, iters=1, optimizer="adam")

    def hypergradient(ul):
        (grad,) = BilevelProblem(ll_converged, ul).hypergradient((x, y), (xv, yv))
        return grad

    naive = Implicit(mlp_ul, decay, mlp_ll, net, ll_learning_rate=1.0, k=10, method="neumann")
    with pytest.raises(HypergradientDivergenceError, match="lambda_max"):
        hypergradient(naive)
    cg = hypergradient(Implicit(mlp_ul, decay, mlp_ll, net, 1.0, k=200, method="cg"))
    auto = Implicit(
        mlp_ul, decay, mlp_ll, net, 1.0, k=4000, method="neumann", alpha="auto", power_iters=50
    )
    assert relative_error(hypergradient(auto), cg) < 1e-4


def test_nan_in_the_ll_loss_names_the_step():
    p = ridge()

    def ll_objective(state):
        loss = ridge_ll(state)
        return loss * torch.where(state["ll_model"].w[0] > 10, float("nan"), 1.0)

    ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=5.0, iters=50, on_growth="ignore")
    with pytest.raises(FloatingPointError, match=r"LL step \d+ of 50 \(lr=5\)"):
        ll.optimize(*p.train)


def test_diverging_ll_is_reported_with_the_step_size():
    """Refused by default (LowerLevelDivergenceError, a FloatingPointError), with the step
    size, the measured lambda_max (power iteration) and 1/lambda_max; warned with "warn"."""
    from problems import ridge_hessian

    from bilevel.ll import LowerLevelDivergenceError

    p = ridge()
    lam = float(torch.linalg.eigvalsh(ridge_hessian(p))[-1])
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=4.5, iters=10)
    with pytest.raises(LowerLevelDivergenceError, match=r"lr=4.5.*the LL is diverging") as err:
        ll.optimize(*p.train)
    # 20 power iterations approach lambda_max from below; 1/lambda_max keeps a factor ~2
    assert lam * (1 - 1e-3) < err.value.lambda_max <= lam * (1 + 1e-12)
    assert f"use lr={1 / lam:.3g}" in str(err.value) and err.value.safe_lr < 2 / lam
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=4.5, iters=10, on_growth="warn")
    with pytest.warns(RuntimeWarning, match=r"lr=4.5.*the LL is diverging"):
        ll.optimize(*p.train)


def test_nonfinite_hypergradient_raises_or_skips_and_never_reaches_the_parameters():
    p = ridge()

    def ul_objective(state):
        return ridge_ul(state) * torch.sqrt(state["ul_model"].log_l2.sum() * 0)  # grad: inf*0

    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=5)
    ul = Reverse(ul_objective, p.ul_model, ridge_ll, p.ll_model)
    before = p.ul_model.log_l2.detach().clone()
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    with pytest.raises(
        FloatingPointError, match=r"UL step 0 \(reverse\): the hypergradient is not finite"
    ):
        problem.step(p.train, p.val)
    skipping = BilevelProblem(
        ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1), on_nonfinite="skip"
    )
    skipping.step(p.train, p.val)
    assert skipping.skipped_steps == 1
    assert torch.equal(p.ul_model.log_l2.detach(), before)


def test_nan_in_the_ll_during_a_ul_step_names_the_step_and_method_or_is_skipped():
    p = ridge()

    def ll_objective(state):  # NaN once the penalty grows past a threshold
        bad = state["ul_model"].log_l2.sum() > 0
        return ridge_ll(state) * torch.where(bad, float("nan"), 1.0)

    ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=0.5, iters=5)
    ul = Implicit(ridge_ul, p.ul_model, ll_objective, p.ll_model, 0.5, k=3)
    with torch.no_grad():
        p.ul_model.log_l2.fill_(1.0)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    with pytest.raises(FloatingPointError, match=r"UL step 0 \(implicit\): The LL loss became nan"):
        problem.step(p.train, p.val)
    skipping = BilevelProblem(
        ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1), on_nonfinite="skip"
    )
    before = p.ul_model.log_l2.detach().clone()
    skipping.run(lambda step: (p.train, p.val), steps=3, progress=False)
    assert skipping.skipped_steps == 3 and skipping.step_count == 3
    assert torch.equal(p.ul_model.log_l2.detach(), before)


def test_implicit_warns_once_when_the_ll_is_not_stationary():
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=1)  # stopped early
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=10)
    problem = BilevelProblem(ll, ul)
    with pytest.warns(RuntimeWarning, match="the LL is not stationary"):
        problem.hypergradient(p.train, p.val)
    assert ul.diagnostics["ll_grad_ratio"] > 0.1
    ll.iters = 300  # converged: no warning, and a tiny ratio
    problem.hypergradient(p.train, p.val)
    assert ul.diagnostics["ll_grad_ratio"] < 1e-10


class _TwoModes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 0.0], dtype=DTYPE))


def _two_modes_problem(iters: int, slow: float = 0.02) -> tuple[BilevelProblem, Implicit, float]:
    """``f(w) = 1/2 (w - w*)^T A (w - w*)`` with ``A = diag(10, slow)`` and ``w* = (0, 1 +
    u)`` (``u`` the UL variable), from ``w = (1, 0)`` by gradient descent with lr 0.09: the
    stiff mode's gradient dominates the first step and vanishes in a few steps, the slow one
    shrinks by ``1 - 0.09 * slow`` per step. Returns the problem, its Implicit and the
    slow mode's exact distance left after ``iters`` steps."""
    ll_model, ul_model = _TwoModes(), nn.Linear(1, 1, bias=False).double()
    nn.init.zeros_(ul_model.weight)
    curvature = torch.tensor([10.0, slow], dtype=DTYPE)

    def ll_objective(state: dict) -> torch.Tensor:
        target = torch.stack([torch.zeros((), dtype=DTYPE), 1 + state["ul_model"].weight[0, 0]])
        return 0.5 * (curvature * (state["ll_model"].w - target) ** 2).sum()

    def ul_objective(state: dict) -> torch.Tensor:
        return (state["ll_model"].w ** 2).sum()

    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.09, iters=iters)
    ul = Implicit(ul_objective, ul_model, ll_objective, ll_model, k=10)
    left = (1 - 0.09 * slow) ** iters  # |w_2 - w*_2| after the run, from 1 at the start
    return BilevelProblem(ll, ul), ul, left


def test_implicit_warns_when_a_slow_mode_is_far_from_converged():
    """A first gradient inflated by a stiff mode that converges at once hides an LL far from
    its stationary point from the gradient ratio (0.2% left: no warning by it); the distance
    left, estimated from the last step's contraction, is the exact one here (one slow mode
    left) and the warning names it."""
    problem, ul, left = _two_modes_problem(20)
    none = torch.zeros(1, 1, dtype=DTYPE)
    with pytest.warns(RuntimeWarning, match="still about 96% of the distance they travelled"):
        problem.hypergradient((none, None), (none, None))
    assert ul.diagnostics["ll_grad_ratio"] < 0.01
    w = problem.ll.ll_model.w.detach()
    travelled = math.hypot(1.0, 1 - left)  # from (1, 0) to (~0, 1 - left)
    assert ul.diagnostics["ll_distance_ratio"] == pytest.approx(left / travelled, rel=1e-6)
    assert torch.equal(w, torch.tensor([1.0, 0.0], dtype=DTYPE))  # the user's weights stay


def test_implicit_warns_when_the_gradient_ratio_is_tiny_but_the_slow_mode_has_not_moved():
    """A slow mode of curvature 1e-6 beside a stiff one of 10: after 20 steps the gradient
    is 1e-7 of the first (far below the threshold), the weights have hardly moved along the
    slow mode, and the estimate says so (before: skipped below a ratio of 1e-6, silently)."""
    problem, ul, left = _two_modes_problem(20, slow=1e-6)
    none = torch.zeros(1, 1, dtype=DTYPE)
    with pytest.warns(RuntimeWarning, match="still about 100% of the distance they travelled"):
        problem.hypergradient((none, None), (none, None))
    assert ul.diagnostics["ll_grad_ratio"] < 1e-6
    travelled = math.hypot(1.0, 1 - left)
    assert ul.diagnostics["ll_distance_ratio"] == pytest.approx(left / travelled, rel=1e-6)


def test_implicit_distance_check_is_quiet_on_a_converged_run():
    """Run to round-off, or converged well within the tolerance: no warning; where the last
    step is within the weights' round-off (rounding stalls the run, and the gradient's
    contraction is 1), the distance estimate is not taken."""
    import warnings

    for iters, estimated in ((20000, False), (3000, True)):
        problem, ul, left = _two_modes_problem(iters)
        none = torch.zeros(1, 1, dtype=DTYPE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            problem.hypergradient((none, None), (none, None))
        assert ("ll_distance_ratio" in ul.diagnostics) is estimated
        if estimated:
            assert ul.diagnostics["ll_distance_ratio"] < 0.1 and left > 1e-3


def test_forward_warns_about_thousands_of_hyperparameters():
    from bilevel.ul import Forward

    p = ridge(d=1200)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=1)
    with pytest.warns(RuntimeWarning, match="1200 Jacobian-vector products per LL step"):
        BilevelProblem(ll, Forward(ridge_ul, p.ul_model, ridge_ll, p.ll_model))


def test_divergence_warning_is_given_once_but_every_solve_is_flagged():
    import warnings

    p, _ = stiff()
    ul = too_large_step(p, "neumann", on_divergence="warn")
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=STIFF_LR, iters=200)
    problem = BilevelProblem(ll, ul)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            problem.hypergradient(p.train, p.val)
            assert ul.diagnostics["diverged"]
    assert sum("diverged" in str(w.message) for w in caught) == 1


def test_queries_refuse_a_nonfinite_hypergradient_like_a_step():
    """``hypergradient``, ``meta_hypergradient`` and the BOML-style ``compute_gradients``
    returned or added a NaN hypergradient silently (``step`` refused it); now they raise, and
    compute_gradients leaves ``.grad`` as it was."""
    p = ridge()

    def ul_objective(state):
        return ridge_ul(state) * torch.sqrt(state["ul_model"].log_l2.sum() * 0)  # grad: inf*0

    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=5)
    ul = Reverse(ul_objective, p.ul_model, ridge_ll, p.ll_model)
    problem = BilevelProblem(ll, ul)
    with pytest.raises(FloatingPointError, match=r"reverse: the hypergradient is not finite"):
        problem.hypergradient(p.train, p.val)
    batch = {"train": tuple(t[None] for t in p.train), "test": tuple(t[None] for t in p.val)}
    with pytest.raises(FloatingPointError, match=r"the hypergradient is not finite"):
        problem.meta_hypergradient(batch)
    assert p.ul_model.log_l2.grad is None  # the queries leave .grad as it was
    earlier = torch.ones_like(p.ul_model.log_l2)
    p.ul_model.log_l2.grad = earlier.clone()
    model = ll.optimize(*p.train)
    with pytest.raises(FloatingPointError, match=r"the hypergradient is not finite"):
        ul.compute_gradients(*p.val, model, *p.train)
    assert torch.equal(p.ul_model.log_l2.grad, earlier)
