"""StochasticImplicit (SID) in float64: the full-batch solve against CG and the closed form,
the mean over minibatch draws against the full-batch answer (unbiased, error ~ 1/sqrt(draws)),
Gauss-Newton and Hessian products against dense matrices, reproducible draws."""

from __future__ import annotations

import pytest
import torch
from problems import (
    DTYPE,
    FeatureL2,
    relative_error,
    ridge,
    ridge_exact_hypergradient,
    ridge_ll,
    ridge_solution,
    ridge_ul,
    ridge_ul_grad_w,
)
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import HypergradientDivergenceError, Implicit, StochasticImplicit


def ridge_outputs(state):
    """The ridge LL objective split as a loss of the model's outputs plus the penalty."""
    target = state["target"]

    def output_loss(z):
        return 0.5 * ((z - target) ** 2).mean()

    return (
        state["ll_model"](state["data"]),
        output_loss,
        state["ul_model"].penalty(state["ll_model"]),
    )


def sgd(lr, momentum=0.0):
    return lambda q: torch.optim.SGD(q, lr=lr, momentum=momentum)


def make(p, **kwargs):
    return StochasticImplicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **kwargs)


def draws_at(ul, trajectory, p, count):
    """``count`` hypergradients of ``ul`` at one LL solution (the draws differ)."""
    out = []
    for _ in range(count):
        p.ul_model.log_l2.grad = None
        ul.accumulate(trajectory, p.val, p.train)
        out.append(p.ul_model.log_l2.grad.clone())
    p.ul_model.log_l2.grad = None
    return torch.stack(out)


@pytest.fixture(scope="module")
def cg_reference():
    """A ridge problem, its converging LL, and the CG implicit hypergradient there."""
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=100)
    cg = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, k=20, method="cg")
    (expected,) = BilevelProblem(ll, cg).hypergradient(p.train, p.val)
    assert relative_error(expected, ridge_exact_hypergradient(p)) < 1e-10
    return p, ll, expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"solver_optimizer": sgd(0.5)},
        {"solver_optimizer": None},  # SGD with the LL step size
        {"solver_optimizer": sgd(0.5), "curvature": "gauss_newton", "ll_outputs": ridge_outputs},
    ],
)
def test_full_batch_equals_cg_and_closed_form(cg_reference, kwargs):
    """Full batch, plain SGD on the quadratic (contraction <= 0.62 per step here): the implicit
    hypergradient (Gauss-Newton is the Hessian for a squared loss of a linear model)."""
    p, ll, expected = cg_reference
    ul = make(p, steps=70, batches=None, cross="full", **kwargs)
    (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    assert relative_error(grad, expected) < 1e-8


def test_minibatch_mean_is_unbiased_and_its_error_falls_as_one_over_sqrt_draws():
    """Minibatch Hessians of the ridge LL average to the full Hessian, the draws are
    independent and SGD's iterate is linear in them: the expected hypergradient is the
    full-batch one with the same solver steps. The mean over 16 draws has 1/16 the squared
    error of one draw: their root-mean-square ratio over seeds is 4."""
    p = ridge(n=40, d=8, seed=0)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=100)
    settings = {"solver_optimizer": sgd(0.1), "steps": 4}
    full = make(p, batches=None, **settings)
    trajectory = full.run_ll(ll, *p.train)
    (expected,) = draws_at(full, trajectory, p, 1)
    one, sixteen = 0.0, 0.0
    for seed in range(10):
        ul = make(p, batches=2, seed=seed, **settings)
        one += float(((draws_at(ul, trajectory, p, 1)[0] - expected) ** 2).sum())
        sixteen += float(((draws_at(ul, trajectory, p, 16).mean(0) - expected) ** 2).sum())
    assert one > 1e-4 * float((expected**2).sum())  # the draws are noisy
    ratio = (one / sixteen) ** 0.5
    assert 2.0 < ratio < 8.0, ratio


class Tiny(nn.Module):
    """A one-hidden-layer tanh network with all its weights in one vector."""

    def __init__(self, d: int, h: int, generator: torch.Generator) -> None:
        super().__init__()
        self.d, self.h = d, h
        self.w = nn.Parameter(0.8 * torch.randn(d * h + h, generator=generator, dtype=DTYPE))

    def forward(self, x, w=None):
        w = self.w if w is None else w
        return torch.tanh(x @ w[: self.d * self.h].view(self.d, self.h)) @ w[self.d * self.h :]


def test_gauss_newton_and_hessian_match_dense_matrices_on_a_nonlinear_model():
    """At the LL solution of a tanh network with a per-weight L2 penalty: the Gauss-Newton
    answer is -(exp(l2) * w) * G^-1 v with G = J^T J / n + diag(exp(l2)), the Hessian answer
    the same with the dense Hessian; the two differ."""
    d, h, n = 3, 4, 20
    g = torch.Generator().manual_seed(0)
    net = Tiny(d, h, g)
    ul_model = FeatureL2(d * h + h, 0.02)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    y = net(x).detach() + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    xv = torch.randn(n, d, generator=g, dtype=DTYPE)
    yv = net(xv).detach() + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    ll = GradientDescent(ridge_ll, net, ul_model, lr=0.3, iters=500)
    probe = StochasticImplicit(ridge_ul, ul_model, ridge_ll, net, steps=1)
    trajectory = probe.run_ll(ll, x, y)
    w = trajectory.weights[0].detach()
    l2 = ul_model.log_l2.detach().exp()

    def ll_loss(weights):
        return 0.5 * ((net(x, weights) - y) ** 2).mean() + 0.5 * (l2 * weights * weights).sum()

    v = torch.autograd.functional.jacobian(
        lambda weights: 0.5 * ((net(xv, weights) - yv) ** 2).mean(), w
    )
    hessian = torch.autograd.functional.hessian(ll_loss, w)
    jacobian = torch.autograd.functional.jacobian(lambda weights: net(x, weights), w)
    gauss_newton = jacobian.T @ jacobian / n + torch.diag(l2)
    assert relative_error(gauss_newton, hessian) > 1e-2  # a nonlinear model: they differ
    for curvature, matrix in (("gauss_newton", gauss_newton), ("hessian", hessian)):
        eig = torch.linalg.eigvalsh(matrix)
        low, high = float(eig[0]), float(eig[-1])
        assert low > 0
        # heavy ball with its optimal parameters for the spectrum [low, high]
        lr = 4 / (high**0.5 + low**0.5) ** 2
        momentum = ((high**0.5 - low**0.5) / (high**0.5 + low**0.5)) ** 2
        ul = StochasticImplicit(
            ridge_ul,
            ul_model,
            ridge_ll,
            net,
            solver_optimizer=sgd(lr, momentum),
            steps=250,
            curvature=curvature,
            ll_outputs=ridge_outputs,
        )
        ul_model.log_l2.grad = None
        ul.accumulate(trajectory, (xv, yv), (x, y))
        expected = -(l2 * w) * torch.linalg.solve(matrix, v)
        assert relative_error(ul_model.log_l2.grad, expected) < 1e-8, curvature
    ul_model.log_l2.grad = None


def test_draws_are_reproducible_from_the_seed_and_the_checkpointed_state():
    p = ridge(n=30, d=4)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=50)
    settings = {"solver_optimizer": sgd(0.1), "steps": 3, "batches": 3}
    a, b, c = make(p, seed=7, **settings), make(p, seed=7, **settings), make(p, seed=8, **settings)
    trajectory = a.run_ll(ll, *p.train)
    first = draws_at(a, trajectory, p, 2)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first, draws_at(b, trajectory, p, 2))
    assert not torch.equal(first, draws_at(c, trajectory, p, 2))
    saved = a.state_dict()
    assert saved["draws"] == 2 * (3 + 1)  # solver steps and the cross term's minibatch
    following = draws_at(a, trajectory, p, 1)
    b.load_state_dict(saved)
    assert torch.equal(following, draws_at(b, trajectory, p, 1))
    full = make(p, **{**settings, "cross": "full"})
    draws_at(full, trajectory, p, 1)
    assert full.draws == 3  # the cross term on the full batch draws nothing


def test_solver_steps_follow_the_callable_batches_exactly():
    """``q_{k+1} = q_k - lr (H_{b_k} q_k - v)`` with ``b_k = batches(k)``, by hand."""
    p = ridge(n=30, d=4)
    x, y = p.train
    rows = [slice(3 * (k % 10), 3 * (k % 10) + 3) for k in range(7)]
    seen = []

    def batches(draw):
        seen.append(draw)
        return x[rows[draw]], y[rows[draw]]

    lr, steps = 0.2, 6
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=100)
    ul = make(p, solver_optimizer=sgd(lr), steps=steps, batches=batches)
    (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    assert seen == list(range(steps + 1))  # one draw per step, one for the cross term
    w = ridge_solution(p)
    v = ridge_ul_grad_w(p, w)
    q = torch.zeros_like(w)
    for k in range(steps):
        xb = x[rows[k]]
        q = q - lr * (xb.T @ (xb @ q) / len(xb) + p.l2 * q - v)
    assert relative_error(grad, -(p.l2 * w) * q) < 1e-10


def test_a_diverging_solver_raises_with_the_cure():
    p = ridge(n=30, d=4)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=50)
    ul = make(p, solver_optimizer=sgd(50.0), steps=60, batches=2)
    with pytest.raises(HypergradientDivergenceError, match="lower the solver's learning rate"):
        BilevelProblem(ll, ul).hypergradient(p.train, p.val)


def test_bad_input():
    p = ridge(d=3)
    with pytest.raises(ValueError, match="steps"):
        make(p, steps=True)
    with pytest.raises(ValueError, match="batches"):
        make(p, batches=0)
    with pytest.raises(ValueError, match="cross"):
        make(p, cross="half")
    with pytest.raises(ValueError, match="ll_outputs"):
        make(p, curvature="gauss_newton")
    with pytest.raises(TypeError, match="seed"):
        make(p, seed=1.5)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=20)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        BilevelProblem(ll, make(p, solver_optimizer=lambda q: q)).hypergradient(p.train, p.val)

    def no_penalty(state):
        z, loss, _ = ridge_outputs(state)
        return z, loss, 0.0

    ul = make(p, curvature="gauss_newton", ll_outputs=no_penalty, solver_optimizer=sgd(0.5))
    with pytest.raises(ValueError, match="does not split ll_objective"):
        BilevelProblem(ll, ul).hypergradient(p.train, p.val)


def _tasks(scale_task_1: float) -> dict:
    """Three ridge tasks; task 1's training inputs scaled (8: its LL diverges at lr 0.2)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 12, 4, generator=g, dtype=DTYPE)
    x[1] *= scale_task_1
    train = (x, torch.randn(3, 12, generator=g, dtype=DTYPE))
    test = (torch.randn(3, 7, 4, generator=g, dtype=DTYPE), torch.randn(3, 7, dtype=DTYPE))
    return {"train": train, "test": test}


def test_a_skipped_task_batch_step_draws_as_every_process_does():
    """BUG: under a process group a fault passes over the failing task and those after it
    (their minibatch draws are taken), so every process ends the skipped step with the
    generator of a step whose tasks all ran; one process raised at once, with only the
    tasks before the fault drawn (11 draws where the group took 33), and the two runs took
    different minibatches from then on (1.4e-3 apart). One process now draws as the group."""
    states = []
    for scale in (1.0, 8.0):
        p = ridge(d=4)
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.2, iters=15)
        ul = make(p, steps=3, batches=5, seed=2)
        optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.0)
        problem = BilevelProblem(ll, ul, optimizer, on_nonfinite="skip")
        problem.meta_step(_tasks(scale))
        assert problem.skipped_steps == (scale != 1.0)
        states.append((ul.draws, ul.generator.get_state()))
    (draws, state), (draws_skipped, state_skipped) = states
    assert draws_skipped == draws > 0
    assert torch.equal(state_skipped, state)
