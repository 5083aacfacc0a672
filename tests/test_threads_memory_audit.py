"""Audit (float64): results and checks across torch's intra-op thread count, and memory and
time across many UL steps.

A. Thread count. CI machines change CPU and core count, and torch's intra-op thread count
changes how BLAS splits its sums (``x.T @ r`` over 2,000 x 200 examples differed at 1e-11
between one and two threads), so round-off. Hypergradients must agree to round-off (1e-10
relative on a well-conditioned problem), and no library check may fire under one thread count
and not the other: an LL started at its solution, where the LL gradient and the LL's drift
are round-off, is where they are tested.

B. Memory and time. Over 300 UL steps (or online updates) of a small problem, no live tensor
or autograd node accumulates, nothing the runner keeps holds a graph after a step, and the
time per step does not drift up.

FOUND (A), on ridge with 1e6 uncentered examples (4 features ``5 + N(0, 1)``), the LL
started at its float64 closed-form solution, 5 LL steps: the round-off floors
(``ROUNDOFF * eps`` times the terms that cancel) were measured on 60 to 80 examples, but the
round-off of a sum grows like the square root of its length. The LL gradient there was 50 to
194 eps times ``||H|| ||w||`` with one thread and 2 to 69 with two (30 seeds; 100 to 300 over
4e6 examples), around the floor of 100, and every check built on it came and went with the
thread count (seed 9 below, or 22 for PTT; 4 to 10 of 30 seeds each):

1. ``Implicit``: "the LL is not stationary" (83% of its first gradient) with one thread only;
2. ``IGA``: multiplier -3.4e9 with one thread, 0 with two;
3. ``BOME``: ``lambda`` 3.0e10 with one thread, 1.1e11 with two, where ``y_hat`` is ``y`` to
   round-off (5 LL steps moved ``y`` 70 to 340 eps ``||y||``, against a floor of 100);
4. ``PTT``: ``k*`` 3 with one thread, 4 with two, instead of ``T = 5`` (the hypergradient
   3.5% and 1.7% off ``Reverse``'s; on seed 2 ``k*`` was 1); 20 LL steps from the solution
   drifted 400 to 800 eps ``||w||`` on 2e5 examples.

Now the floors grow as ``sqrt(n / 100)`` over ``n > 100`` examples
(``bilevel.roundoff.roundoff_floor(scale, terms)``), and the distance floors of ``PTT`` and
``BOME`` count the LL steps between the weights compared (each step moves at most about the
floor of ``||w||`` on a round-off gradient). B found nothing: its tests are guards.

Tested against: the same call under the other thread count (round-off), ``Reverse`` (PTT at
an LL that does not move) and the exact zero multipliers (IGA, BOME) at the LL's solution.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, Problem, ridge, ridge_ll, ridge_ul
from test_long_runs_across_methods import CASES, LearnedRate, batches, graphs_held

from bilevel import BilevelProblem
from bilevel import ul as U
from bilevel.ll import BDA, GradientDescent
from bilevel.online import OnlineHypergradient

# --- A. thread count ----------------------------------------------------------------------


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (the tests run with one), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        assert torch.get_num_threads() == count
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=2)  # (one seed, under both thread counts)
def uncentered_data(seed: int, count: int) -> tuple[tuple, tuple, torch.Tensor, float]:
    """Ridge data on 1e6 examples with 4 features ``5 + N(0, 1)`` (not centred: the sums
    over examples do not cancel), the float64 closed-form LL solution for L2 0.3, computed
    under ``count`` threads, and ``1 / lambda_max(H)``."""
    n, d = 1_000_000, 4
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=DTYPE)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = 5.0 + torch.randn(n, d, generator=g, dtype=DTYPE)
        return x, x @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)

    train, val = batch(), batch()
    x, y = train
    l2 = FeatureL2(d, 0.3).log_l2.detach().exp()  # (the UL model's, to the last bit)
    with threads(count):
        hessian = x.T @ x / n + torch.diag(l2)
        solution = torch.linalg.solve(hessian, x.T @ y / n)
    return train, val, solution, 1.0 / float(torch.linalg.eigvalsh(hessian)[-1])


def direct_term(state: dict) -> torch.Tensor:
    """Ridge's validation loss and a direct term in the UL variables."""
    return ridge_ul(state) + 1e-2 * (state["ul_model"].log_l2 ** 2).sum()


def at_the_solution(
    seed: int, count: int, method: Any, iters: int = 5
) -> tuple[torch.Tensor, dict, list[str]]:
    """Under ``count`` threads, the hypergradient of ``method`` (a class) after ``iters`` LL
    steps from the LL's solution (:func:`uncentered_data`), its diagnostics and the warnings
    it gave."""
    train, val, solution, lr = uncentered_data(seed, count)
    p = Problem(Linear(len(solution), solution), FeatureL2(len(solution), 0.3), train, val)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=iters)
    ul = method(direct_term, p.ul_model, ridge_ll, p.ll_model)
    with threads(count), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    return grad, dict(ul.diagnostics), [str(w.message) for w in caught]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", autouse=True)
def _free_the_data() -> Iterator[None]:
    yield
    uncentered_data.cache_clear()


# round-off: on 1e6 examples (LL condition number 78) the hypergradients of one and two
# threads were up to 4e-12 apart (Implicit); on 400,000 entries, up to 1e-15
TOLERANCE = 1e-10


def test_implicit_at_the_ll_solution_of_many_examples_does_not_warn():
    """FOUND 1: the stationarity warning at an LL that started at its solution (its gradient
    at round-off of a sum over 1e6 examples) came with one thread only."""
    results = []
    for count in (1, 2):
        grad, _, caught = at_the_solution(9, count, U.Implicit)
        assert not [m for m in caught if "not stationary" in m], (count, caught)
        results.append(grad)
    assert relative(*results) < TOLERANCE


@pytest.mark.parametrize(
    ("method", "multiplier"),
    [(U.IGA, "iga_multiplier"), (U.BOME, "lambda")],
    ids=["iga", "bome"],
)
def test_a_multiplier_at_the_ll_solution_of_many_examples_is_zero(method, multiplier):
    """FOUND 2 and 3: at the LL's solution IGA's multiplier is round-off over round-off
    squared, and BOME's ``y_hat`` is ``y``'s round-off drift over its inner steps: both are
    taken as 0 below the floor. Over 1e6 examples IGA's was -3.4e9 with one thread, BOME's
    lambda 3.0e10 with one thread and 1.1e11 with two."""
    results = []
    for count in (1, 2):
        grad, diagnostics, _ = at_the_solution(9, count, method)
        assert float(diagnostics[multiplier]) == 0.0, (count, diagnostics)
        results.append(grad)
    assert relative(*results) < TOLERANCE


def test_ptt_at_the_ll_solution_of_many_examples_is_reverse():
    """FOUND 4: an LL that does not move (started at its solution) has T equal iterates up
    to round-off drift: k* must be T, the hypergradient Reverse's (k* was 3 with one thread
    and 4 with two, 3.5% and 1.7% off)."""
    results = []
    for count in (1, 2):
        grad, diagnostics, _ = at_the_solution(22, count, U.PTT)
        reverse, _, _ = at_the_solution(22, count, U.Reverse)
        assert diagnostics["ptt_step"] == 5, (count, diagnostics)
        assert relative(grad, reverse) < TOLERANCE
        results.append(grad)
    assert relative(*results) < TOLERANCE


def wide_ridge(seed: int = 0, n: int = 4000, d: int = 100) -> Problem:
    """Ridge on 4,000 x 100 centred features (400,000 entries: BLAS splits its sums across
    threads), LL from zero."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=DTYPE) / d**0.5

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d, generator=g, dtype=DTYPE)
        return x, x @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)

    return Problem(Linear(d), FeatureL2(d, 0.3), batch(), batch())


#: (LL dynamics, LL steps, method): every hypergradient method (Forward, with one tangent
#: per UL variable, and Reptile, whose UL variables are the LL's, in B), on gradient descent
#: and on the other LL dynamics
WIDE = {
    "reverse": ("sgd", 6, U.Reverse),
    "reverse-momentum": ("momentum", 6, U.Reverse),
    "reverse-adam": ("adam", 6, U.Reverse),
    "reverse-bda": ("bda", 6, U.Reverse),
    "truncated": ("sgd", 6, lambda *a: U.Truncated(*a, truncate_iter=3)),
    **{
        f"implicit-{solver}": ("sgd", 15, lambda *a, s=solver: U.Implicit(*a, k=8, method=s))
        for solver in ("cg", "minres", "neumann", "fixed_point", "normal_cg")
    },
    "memory_saving_reverse": ("momentum", 6, U.MemorySavingReverse),
    "first_order": ("sgd", 6, U.FirstOrder),
    "ptt": ("bda", 6, U.PTT),
    "finite_difference": ("sgd", 1, U.FiniteDifference),
    "iga": ("sgd", 3, U.IGA),
    "dm": ("sgd", 1, U.DM),
    "stochastic_implicit": ("sgd", 15, lambda *a: U.StochasticImplicit(*a, steps=4, batches=4)),
    "bome": ("sgd", 4, U.BOME),
    "pbgd": ("sgd", 4, U.PBGD),
    "bvfim": ("sgd", 4, U.BVFIM),
    "meso": ("sgd", 4, U.MESO),
    "gaffo": ("sgd", 4, U.GAFFO),
    "f2sa": ("sgd", 4, U.F2SA),
    "alternating": ("sgd", 4, U.Alternating),
    "soba": ("sgd", 1, lambda *a: U.SOBA(*a, batch_size=500)),
    "saba": ("sgd", 1, lambda *a: U.SABA(*a, batch_size=500)),
    "stocbio": ("sgd", 2, lambda *a: U.StocBiO(*a, neumann_steps=3, batch_size=500)),
    "amigo": ("sgd", 2, lambda *a: U.AmIGO(*a, batch_size=500)),
}


def lower_level(dynamics: str, iters: int, p: Problem) -> Any:
    """The LL of ``dynamics`` on ``p`` (stable steps: the LL Hessian's eigenvalues lie in
    [1.0, 1.7])."""
    if dynamics == "bda":
        bda = {"ul_objective": direct_term, "alpha": 0.5, "alpha_decay": 0.9}
        return BDA(ridge_ll, p.ll_model, p.ul_model, 0.3, iters, **bda)
    options = {"momentum": {"momentum": 0.5}, "adam": {"optimizer": "adam"}}.get(dynamics, {})
    lr = 0.01 if dynamics == "adam" else 0.3
    return GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=iters, **options)


def two_points(name: str) -> tuple[list[torch.Tensor], list[str]]:
    """The hypergradients of case ``name`` on :func:`wide_ridge` before and after one UL
    step (the state a method keeps moved with it), and the warnings."""
    dynamics, iters, method = WIDE[name]
    p = wide_ridge()
    torch.manual_seed(0)  # (the stochastic methods' samplers)
    ll = lower_level(dynamics, iters, p)
    ul = method(direct_term, p.ul_model, ridge_ll, p.ll_model)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = problem.hypergradient(p.train, p.val)[0]
        problem.step(p.train, p.val)
        after = problem.hypergradient(p.train, p.val)[0]
    return [before, after], sorted({type(w.message).__name__ + str(w.message)[:40] for w in caught})


@pytest.mark.parametrize("name", list(WIDE))
def test_hypergradients_agree_across_thread_counts(name):
    """Every method, before and after a UL step on 400,000 entries: the hypergradients of one
    and two threads agree to round-off, and the same warnings come (or none)."""
    results = []
    for count in (1, 2):
        with threads(count):
            results.append(two_points(name))
    (one, said_one), (two, said_two) = results
    assert said_one == said_two
    for a, b in zip(one, two, strict=True):
        assert relative(a, b) < TOLERANCE


# --- B. memory and time over many UL steps ------------------------------------------------


def live() -> tuple[int, int]:
    """Live tensors (``gc``) and autograd nodes reachable from them."""
    gc.collect()
    tensors = [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor)]
    stack, seen = [t.grad_fn for t in tensors], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    return len(tensors), len(seen)


#: methods and LL dynamics of test_long_runs_across_methods: those that keep state across UL
#: steps, or an LL graph within one (the audit ran all its 47 cases, 300 steps each)
LONG = [
    "reverse-fixed_point_map",
    "truncated-momentum",
    "implicit-cg",
    "memory_saving_reverse-adam",
    "ptt-bda",
    "dm-auto",
    "stochastic_implicit-momentum-scheduler",
    "bome",
    "pbgd-value",
    "bvfim",
    "gaffo-constrained",
    "f2sa",
    "saba",
    "stocbio",
    "amigo",
    "meta_sgd-forward",
]


def assert_steady(marks: dict[int, tuple[int, int]], times: list[float], graphs: list) -> None:
    """Live tensors and autograd nodes as many at the last mark as at the first, no graph
    kept, and the median time of the last 50 steps within 3x that of steps 50 to 100 (a graph
    chained across steps makes step 300 six times step 50)."""
    first, *_, last = marks.values()
    assert first == last, marks
    assert graphs == [], graphs
    early, late = statistics.median(times[50:100]), statistics.median(times[-50:])
    assert late < 3 * early, (early, late)


@pytest.mark.parametrize("name", LONG)
def test_three_hundred_ul_steps_keep_nothing_and_do_not_slow_down(name):
    """300 UL steps: live tensors and autograd nodes flat from step 50 to 300, no tensor
    the runner keeps (LL variables, multipliers, tables, momentum, diagnostics) holds a
    graph after a step, and no drift in the time per step."""
    torch.manual_seed(0)
    problem, p = CASES[name]()
    data = batches(problem, p)
    marks, times = {}, []
    for step in range(1, 301):
        start = time.process_time()  # (this process's: other loads do not count)
        problem.step(*data(step))
        times.append(time.process_time() - start)
        if step in (50, 175, 300):
            marks[step] = live()
    assert_steady(marks, times, graphs_held(problem))


@pytest.mark.parametrize("method", [U.Forward, U.Truncated])
def test_three_hundred_online_updates_keep_nothing_and_do_not_slow_down(method):
    """RTHO and online truncated reverse, 300 UL updates of 5 LL steps (Adam): flat live
    tensors and nodes, and no drift in the time per update."""
    p = ridge()
    ul = LearnedRate(5)
    ll = GradientDescent(
        ridge_ll, p.ll_model, ul, lr=lambda u: 0.05 * u.rate, iters=1, optimizer="adam"
    )
    options = {"truncate_iter": 5} if method is U.Truncated else {}
    calculator = method(ridge_ul, ul, ridge_ll, p.ll_model, **options)
    runner = OnlineHypergradient(ll, calculator, torch.optim.Adam(ul.parameters(), lr=0.01), 5)
    marks, times, clock = {}, [], [time.process_time()]

    def log(record: dict) -> None:
        now = time.process_time()
        times.append(now - clock[0])
        clock[0] = now
        if record["ul_step"] in (50, 175, 300):
            marks[record["ul_step"]] = live()

    runner.run(p.train, p.val, ll_steps=1500, log=log, progress=False)
    assert len(times) == 300
    assert_steady(marks, times, graphs_held(runner))
