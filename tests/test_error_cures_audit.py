"""Audit of error messages and their cures: the situation triggers the message, the numbers it
quotes are right, and the cure, applied as written, makes the run go through (float64)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent, LowerLevelDivergenceError
from bilevel.ul import PTT, HypergradientDivergenceError, Implicit, Reverse
from tests.problems import (
    DTYPE,
    Linear,
    ridge,
    ridge_exact_hypergradient,
    ridge_hessian,
    ridge_ll,
    ridge_ul,
)

# --- the LL at a saddle: no series step converges -------------------------------------------

EIGENVALUES = torch.tensor([5.0, 2.0, -0.5], dtype=DTYPE)


class Shift(nn.Module):
    """``lam``: the linear term of the LL objective ``1/2 w^T A w - lam^T w``."""

    def __init__(self) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor([1.0, -1.0, 0.5], dtype=DTYPE))


def saddle_ll(state: dict) -> torch.Tensor:
    w = state["ll_model"].w
    return 0.5 * (EIGENVALUES * w * w).sum() - state["ul_model"].lam @ w


def saddle_ul(state: dict) -> torch.Tensor:
    return 0.5 * (state["ll_model"].w - 1.0).pow(2).sum()


def saddle_problem(**implicit: object) -> tuple[BilevelProblem, torch.Tensor]:
    """The LL starts (and stays) at its stationary point ``w* = A^{-1} lam``, a saddle; the
    exact hypergradient of ``F = 1/2 ||w* - 1||^2`` is ``A^{-1} (w* - 1)``."""
    ul_model = Shift()
    w_star = ul_model.lam.detach() / EIGENVALUES
    ll_model = Linear(3, w_star)
    ll = GradientDescent(saddle_ll, ll_model, ul_model, lr=0.2, iters=5)
    ul = Implicit(saddle_ul, ul_model, saddle_ll, ll_model, **implicit)
    return BilevelProblem(ll, ul), (w_star - 1.0) / EIGENVALUES


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
@pytest.mark.parametrize("alpha", [None, 0.1, "auto"])
def test_a_series_diverging_on_an_indefinite_hessian_names_a_cure_that_works(method, alpha):
    """BUG (before the fix): the series' divergence message blamed the step and advised
    ``alpha = 1 / lambda_max`` even when the step was already below ``2 / lambda_max``: here
    "alpha is 0.2 ... use alpha=0.2", "alpha is 0.1 ... use alpha=0.2" (a larger step),
    "(alpha='auto' does this)" when alpha='auto' was used, "or method='cg'" (which refuses an
    indefinite Hessian in turn). On an indefinite Hessian no step converges; MINRES does."""
    problem, exact = saddle_problem(method=method, k=40, alpha=alpha)
    with pytest.raises(HypergradientDivergenceError) as error:
        problem.hypergradient(((), ()), ((), ()))
    message = str(error.value)
    assert "use alpha=" not in message and "method='cg'" not in message
    assert "not positive definite" in message and "method='minres'" in message
    assert re.search(r"-0\.5\b", message)  # the negative eigenvalue, quoted
    cured, exact = saddle_problem(method="minres", k=40)
    (grad,) = cured.hypergradient(((), ()), ((), ()))
    assert torch.allclose(grad, exact, rtol=1e-10, atol=1e-12)


def test_a_series_step_too_large_quotes_a_safe_alpha_that_converges():
    """The cure of a too-large series step on a positive definite Hessian, applied as written:
    the quoted alpha is below ``2 / lambda_max`` and gives the exact hypergradient."""
    p = ridge(scale=3.0)
    lambda_max = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())

    def problem(alpha: float) -> BilevelProblem:
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=1 / lambda_max, iters=400)
        ul = Implicit(
            ridge_ul, p.ul_model, ridge_ll, p.ll_model, method="neumann", k=400, alpha=alpha
        )
        return BilevelProblem(ll, ul)

    with pytest.raises(HypergradientDivergenceError) as error:
        problem(3 / lambda_max).hypergradient(p.train, p.val)
    quoted = float(re.search(r"use alpha=([0-9.e+-]+)", str(error.value)).group(1))
    assert 0.9 / lambda_max < quoted < 2 / lambda_max
    (grad,) = problem(quoted).hypergradient(p.train, p.val)
    assert torch.allclose(grad, ridge_exact_hypergradient(p), rtol=1e-6, atol=1e-10)


def test_a_diverging_ll_quotes_a_stable_lr_that_runs():
    """The LL divergence's cure, applied as written: the quoted ``lr`` is below
    ``2 / lambda_max`` (exact for ridge) and the run with it goes through."""
    p = ridge(scale=3.0)
    lambda_max = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())

    def problem(lr: float) -> BilevelProblem:
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=30)
        return BilevelProblem(ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model))

    with pytest.raises(LowerLevelDivergenceError) as error:
        problem(3 / lambda_max).hypergradient(p.train, p.val)
    quoted = float(re.search(r"use lr=([0-9.e+-]+) \(1/lambda_max\)", str(error.value)).group(1))
    assert quoted < 2 / lambda_max
    assert error.value.safe_lr == pytest.approx(1 / lambda_max, rel=1e-6)
    (grad,) = problem(quoted).hypergradient(p.train, p.val)
    assert bool(torch.isfinite(grad).all())


# --- checkpoints of another problem ---------------------------------------------------------


class ScaledLinear(Linear):
    """``Linear`` with a buffer: its state_dict has an entry that ``Linear``'s lacks."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.register_buffer("scale", torch.ones((), dtype=DTYPE))


def checkpoint_problem(ll_model: nn.Module | None = None, dtype: torch.dtype = DTYPE):
    p = ridge(d=5)
    ll_model = p.ll_model if ll_model is None else ll_model
    ll_model.to(dtype)
    p.ul_model.to(dtype)
    ll = GradientDescent(ridge_ll, ll_model, p.ul_model, lr=0.1, iters=5)
    ul = Reverse(ridge_ul, p.ul_model, ridge_ll, ll_model)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    return BilevelProblem(ll, ul, optimizer), p


@pytest.fixture
def saved_checkpoint(tmp_path):
    problem, p = checkpoint_problem()
    problem.step(p.train, p.val)
    path = tmp_path / "run.pt"
    problem.save_checkpoint(path)
    return path


def test_a_checkpoint_with_other_entries_does_not_advise_strict_false(saved_checkpoint):
    """BUG (before the fix): "the checkpoint is of another problem (ll_model lacks scale)
    ... pass strict=False to load it anyway"; with strict=False, torch's load_state_dict
    refused it in turn (RuntimeError: Missing key(s) in state_dict: "scale")."""
    problem, _ = checkpoint_problem(ScaledLinear(5))
    with pytest.raises(ValueError, match="ll_model lacks scale") as error:
        problem.load_checkpoint(saved_checkpoint)
    assert "strict=False" not in str(error.value)
    with pytest.raises(RuntimeError, match="Missing key"):  # what strict=False would meet
        problem.load_checkpoint(saved_checkpoint, strict=False)


def test_a_checkpoint_of_another_dtype_advises_strict_false_and_it_loads(saved_checkpoint):
    """Where strict=False does load (entries of another dtype, cast), the cure is offered."""
    problem, _ = checkpoint_problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype") as error:
        problem.load_checkpoint(saved_checkpoint)
    assert "strict=False" in str(error.value)
    problem.load_checkpoint(saved_checkpoint, strict=False)
    assert problem.step_count == 1 and problem.ul.ul_model.log_l2.dtype == torch.float32


def test_run_says_how_to_load_non_strictly_and_the_cure_works(saved_checkpoint):
    """run(checkpoint=) resumes strictly: the strict=False cure was not applicable there as
    written (run has no such argument); the message now says how, and following it the run
    goes on from the checkpoint."""
    p = ridge(d=5)
    problem, _ = checkpoint_problem(dtype=torch.float32)

    def data(step):
        return tuple(tuple(t.float() for t in pair) for pair in (p.train, p.val))

    with pytest.raises(ValueError, match="run\\(\\) resumes strictly") as error:
        problem.run(data, 3, checkpoint=saved_checkpoint, progress=False)
    assert "problem.load_checkpoint(path, strict=False)" in str(error.value)
    problem.load_checkpoint(saved_checkpoint, strict=False)
    problem.save_checkpoint(saved_checkpoint)
    again, _ = checkpoint_problem(dtype=torch.float32)
    again.run(data, 3, checkpoint=saved_checkpoint, progress=False)
    assert again.step_count == 3


# --- an auxiliary model that did not record what the method needs ---------------------------


def test_ptts_cure_for_an_unrecorded_graph_runs_when_followed():
    """BUG (before the fix): PTT given ``ll.optimize``'s result said "Set
    ll.differentiable_steps = 5 before ll.optimize"; done, it refused in turn ("PTT needs an
    LL run that kept every iterate"), since ``ll.optimize`` records no iterates. And passing
    ``ul.run_ll``'s result, the other cure, got "auxiliary_model must be the module returned
    by ll.optimize ..., got Trajectory", without a word of its ``.model``."""
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=5, differentiable_steps=0)
    ul = PTT(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(ValueError, match="last 5 of 5") as error:
        ul.compute_gradients(*p.val, ll.optimize(*p.train), *p.train)
    message = str(error.value)
    assert "Set ll.differentiable_steps" not in message
    assert "ul.run_ll(ll, data, target) and pass its .model" in message
    trajectory = ul.run_ll(ll, *p.train)
    with pytest.raises(TypeError, match=r"got a Trajectory.*pass its \.model"):
        ul.compute_gradients(*p.val, trajectory, *p.train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = ul.compute_gradients(*p.val, trajectory.model, *p.train)
    assert bool(torch.isfinite(loss)) and p.ul_model.log_l2.grad is not None
