"""The library on a CUDA device, against the same float64 computation on the CPU.

What runs differently there: the solvers' loops (CG masks its updates on the device instead of
testing on the host, and reports the true residual after the loop), the random draws (dropout
on a CUDA model draws from the device's generator, which methods that replay a step's draws
capture and restore, and which checkpoints save), and every method's tensors. Skipped without
CUDA; on a GPU machine run ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import test_methods_across_dynamics as cells
import torch
from problems import ridge, ridge_exact_hypergradient, ridge_ll, ridge_ul

from bilevel import BilevelProblem, linalg
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference, Implicit, MemorySavingReverse, Reverse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
ACCEPTED = [cell for cell in cells.CELLS if cell not in cells.REFUSED]


@pytest.mark.parametrize(("method", "dynamics"), ACCEPTED, ids=[f"{m}-{d}" for m, d in ACCEPTED])
def test_each_method_and_dynamics_gives_the_cpu_hypergradient(method, dynamics):
    on_cpu = cells.hypergradient(method, dynamics)
    on_cuda = cells.hypergradient(method, dynamics, device="cuda")
    assert all(g.device.type == "cuda" for g in on_cuda)
    assert max(float(g.abs().max()) for g in on_cpu) > 1e-4  # not a trivial zero
    cells.close([g.cpu() for g in on_cuda], on_cpu, rtol=1e-9)


def on_cuda(p):
    """The ridge problem's models and data moved to the GPU (float64)."""
    p.ll_model.to(CUDA)
    p.ul_model.to(CUDA)
    p.train = tuple(t.to(CUDA) for t in p.train)
    p.val = tuple(t.to(CUDA) for t in p.val)
    return p


@pytest.mark.parametrize("method", ["cg", "minres", "normal_cg", "neumann", "fixed_point"])
def test_implicit_on_cuda_is_the_exact_ridge_hypergradient(method):
    p = ridge()
    exact = ridge_exact_hypergradient(p)
    on_cuda(p)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=300)
    k = 50 if method in ("cg", "minres", "normal_cg") else 400
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=k, method=method)
    problem = BilevelProblem(ll, ul)
    (grad,) = problem.hypergradient(p.train, p.val)
    assert grad.device.type == "cuda"
    torch.testing.assert_close(grad.cpu(), exact, rtol=1e-8, atol=0)
    assert problem.ul.diagnostics["converged"] is True


def spd(d: int, cond: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, float(torch.tensor(cond).log10()), d, dtype=torch.float64)
    return (q @ torch.diag(eig) @ q.T).to(CUDA, dtype)


SOLVERS = {
    "cg": lambda mv, b, tol: linalg.cg(mv, b, 200, tolerance=tol),
    "minres": lambda mv, b, tol: linalg.minres(mv, b, 200, tolerance=tol),
    "normal_cg": lambda mv, b, tol: linalg.normal_cg(mv, b, 400, tolerance=tol),
    "neumann": lambda mv, b, tol: linalg.neumann(mv, b, 1.0, 4000, tolerance=tol),
    "fixed_point": lambda mv, b, tol: linalg.fixed_point(mv, b, 1.0, 4000, tolerance=tol),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_solvers_on_the_device_claim_convergence_only_when_the_true_residual_meets_it(
    solver, dtype
):
    """On the device CG masks its updates and checks every few iterations; a claimed
    convergence must hold for ``b - A x`` computed afresh (in float32 the recurrences drift
    below it). Float64 converges to 1e-10; float32 at condition number 100 may not reach
    1e-5 (the series' sums), but never claims it falsely (Neumann did, before its fix:
    2.4e-5 relative where it claimed 1e-5)."""
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    a = spd(12, 100.0, dtype) / 100.0  # eigenvalues in [0.01, 1]: the series converge at 1
    b = torch.linspace(-1.0, 2.0, 12, dtype=dtype, device=CUDA)
    x, info = SOLVERS[solver](lambda v: [a @ v[0]], [b], tolerance)
    assert x[0].device.type == "cuda" and x[0].dtype == dtype and not info.diverged
    true = float(torch.linalg.vector_norm(b.double() - a.double() @ x[0].double()))
    relative = true / float(b.double().norm())
    if dtype == torch.float64:
        assert info.converged
    if info.converged:  # (float32's own b - A x is within ~1e-7 relative of this one)
        assert relative <= 1.1 * tolerance
    expected = torch.linalg.solve(a.double(), b.double())
    rtol = 200 * max(relative, tolerance)  # condition number 100 times the relative residual
    torch.testing.assert_close(x[0].double(), expected, rtol=rtol, atol=rtol)


def dropout_ll(state):
    """Ridge whose LL objective drops features at random: draws from the CUDA generator."""
    return ridge_ll({**state, "data": torch.nn.functional.dropout(state["data"], 0.2)})


def seeded(problem, p, seed=7):
    torch.manual_seed(seed)  # seeds the CUDA generator too
    (grad,) = problem.hypergradient(p.train, p.val)
    return grad, torch.cuda.get_rng_state()


def dropout_problem(make_ul, iters=8):
    p = on_cuda(ridge())
    ll = GradientDescent(dropout_ll, p.ll_model, p.ul_model, lr=0.3, iters=iters)
    return BilevelProblem(ll, make_ul(ridge_ul, p.ul_model, dropout_ll, p.ll_model)), p


def test_memory_saving_reverse_replays_each_steps_cuda_draws():
    """Recomputing step t needs the dropout mask step t drew from the CUDA generator: the
    result is Reverse's on the same draws, and the generator is left where Reverse leaves it."""
    reverse, p = dropout_problem(Reverse)
    saving, q = dropout_problem(MemorySavingReverse)
    expected, rng_after_reverse = seeded(reverse, p)
    got, rng_after_saving = seeded(saving, q)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert torch.equal(rng_after_saving, rng_after_reverse)
    other, _ = seeded(saving, q, seed=8)  # other draws give another answer: the draws matter
    assert not torch.allclose(other, expected, rtol=1e-6, atol=0)


def test_finite_difference_evaluates_both_points_with_the_last_steps_cuda_draws():
    """One LL step: DARTS' difference of gradients at ``w+-`` with the step's own dropout mask
    is the one-step unroll's hypergradient (exact on this LL, quadratic in w), and the CUDA
    generator ends where Reverse leaves it."""
    reverse, p = dropout_problem(Reverse, iters=1)
    darts, q = dropout_problem(FiniteDifference, iters=1)
    expected, rng_after_reverse = seeded(reverse, p)
    got, rng_after_darts = seeded(darts, q)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert torch.equal(rng_after_darts, rng_after_reverse)


def make_run(p):
    ll = GradientDescent(dropout_ll, p.ll_model, p.ul_model, lr=0.5, iters=10)
    ul = Implicit(ridge_ul, p.ul_model, dropout_ll, p.ll_model, k=5, stationarity_warning=None)
    optimizer = torch.optim.Adam(p.ul_model.parameters(), lr=0.05)
    return BilevelProblem(ll, ul, optimizer)


def test_a_run_with_cuda_draws_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    def batch(step):  # the batch's rows drawn on the CPU, the steps' dropout on the GPU
        idx = torch.randint(0, 60, (40,))
        return (p.train[0][idx.to(CUDA)], p.train[1][idx.to(CUDA)]), p.val

    p = on_cuda(ridge())
    torch.manual_seed(0)
    make_run(p).run(batch, steps=9, progress=False)
    uninterrupted = p.ul_model.log_l2.detach().clone()

    p = on_cuda(ridge())
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    make_run(p).run(batch, steps=4, checkpoint=path, progress=False)
    torch.manual_seed(123)  # a new process would start from other states (CPU and CUDA)
    p = on_cuda(ridge())
    problem = make_run(p)
    problem.run(batch, steps=9, checkpoint=path, progress=False)
    assert problem.step_count == 9
    assert torch.equal(p.ul_model.log_l2.detach(), uninterrupted)
    # the GPU's draws matter: reseeding only its generator after 4 steps ends elsewhere
    p = on_cuda(ridge())
    torch.manual_seed(0)
    problem = make_run(p)
    problem.run(batch, steps=4, progress=False)
    torch.cuda.manual_seed(123)
    problem.run(batch, steps=9, progress=False)
    assert not torch.equal(p.ul_model.log_l2.detach(), uninterrupted)


def test_a_skipped_step_returns_its_nan_on_the_models_device():
    p = on_cuda(ridge())
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=20)
    ul = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    optimizer = torch.optim.Adam(p.ul_model.parameters(), lr=0.05)
    problem = BilevelProblem(ll, ul, optimizer, on_nonfinite="skip")
    loss = problem.step(p.train, p.val)
    skipped = problem.step(p.train, (p.val[0], torch.full_like(p.val[1], float("nan"))))
    assert problem.skipped_steps == 1 and bool(skipped.isnan())
    assert (skipped.dtype, skipped.device) == (loss.dtype, loss.device)
    assert skipped.dtype == torch.float64 and skipped.device.type == "cuda"
