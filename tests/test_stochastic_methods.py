"""SOBA, SABA, StocBiO and AmIGO (the stochastic family): hand-written full-batch steps,
convergence to the closed-form solution of a strongly convex quadratic bilevel problem
(benchopt's quadratic setting, with rank-one per-sample Hessians), the rates the papers
state with minibatches, checkpoints that resume bitwise, the sampler, and bad input.

Everything is float64. Minibatch runs are seeded through the methods' own sampler, so every
assertion is deterministic up to round-off (which does not change which batches are drawn).
"""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, ridge, ridge_exact_hypergradient, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import SABA, SOBA, AmIGO, Sampler, StocBiO
from bilevel.ul.sampling import select

MU, NU = 1.0, 0.5  # the LL's and the UL's deterministic curvature
P_DIM, D_DIM = 5, 3  # LL (y) and UL (x) dimensions
LR = 0.3  # LL step size rho (below 2 / the largest per-sample curvature, about 4.6)


# --- the quadratic problem -------------------------------------------------------------------


class Vector(nn.Module):
    """One parameter vector, named ``name``."""

    def __init__(self, dim: int, name: str, init: torch.Tensor | None = None) -> None:
        super().__init__()
        value = torch.zeros(dim, dtype=DTYPE) if init is None else init.clone()
        self.register_parameter(name, nn.Parameter(value))


def quadratic_ll(state: dict) -> torch.Tensor:
    """``G(y, x) = mean_i [(u_i.y)^2 / 2 + (c_i.x)(w_i.y) + a_i.y] + MU |y|^2 / 2``."""
    d, y, x = state["data"], state["ll_model"].y, state["ul_model"].x
    per_sample = 0.5 * (d["u"] @ y) ** 2 + (d["c"] @ x) * (d["w"] @ y) + d["a"] @ y
    return per_sample.mean() + 0.5 * MU * (y @ y)


def quadratic_ul(state: dict) -> torch.Tensor:
    """``F(y, x) = mean_j [(s_j.y)^2/2 + (r_j.x)^2/2 + (k_j.x)(l_j.y) + f_j.y + h_j.x]
    + NU |x|^2 / 2``."""
    d, y, x = state["data"], state["ll_model"].y, state["ul_model"].x
    per_sample = (
        0.5 * (d["s"] @ y) ** 2
        + 0.5 * (d["r"] @ x) ** 2
        + (d["k"] @ x) * (d["l"] @ y)
        + d["f"] @ y
        + d["h"] @ x
    )
    return per_sample.mean() + 0.5 * NU * (x @ x)


def quadratic_data(n: int = 64, m: int = 64, seed: int = 0, noise: float = 0.3):
    """Train and validation data: one row per sample (dicts of tensors, no target)."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    def around(k: int, dim: int) -> torch.Tensor:  # a common mean plus per-sample noise
        return normal(1, dim) + noise * normal(k, dim)

    train = {
        "u": 1.2 * normal(n, P_DIM) / P_DIM**0.5,
        "c": around(n, D_DIM),
        "w": 0.5 * around(n, P_DIM),
        "a": around(n, P_DIM),
    }
    val = {
        "s": normal(m, P_DIM) / P_DIM**0.5,
        "r": normal(m, D_DIM) / D_DIM**0.5,
        "k": 0.5 * around(m, D_DIM),
        "l": 0.5 * around(m, P_DIM),
        "f": around(m, P_DIM),
        "h": around(m, D_DIM),
    }
    return train, val


def full_matrices(train: dict, val: dict) -> dict[str, torch.Tensor]:
    """The full-data quadratic forms: ``G = y'Ay/2 + x'Cy + a'y``,
    ``F = y'Fy/2 + x'Hx/2 + x'Ky + f'y + h'x``."""
    n, m = len(train["u"]), len(val["s"])
    return {
        "A": train["u"].T @ train["u"] / n + MU * torch.eye(P_DIM, dtype=DTYPE),
        "C": train["c"].T @ train["w"] / n,
        "a": train["a"].mean(0),
        "F": val["s"].T @ val["s"] / m,
        "H": val["r"].T @ val["r"] / m + NU * torch.eye(D_DIM, dtype=DTYPE),
        "K": val["k"].T @ val["l"] / m,
        "f": val["f"].mean(0),
        "h": val["h"].mean(0),
    }


def solution(q: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x*``: ``y*(x) = M x + c`` with ``M = -A^{-1} C^T``, ``c = -A^{-1} a``; the value
    function ``F(y*(x), x)`` is the quadratic ``x'Px/2 + p'x + const`` below; ``x* = -P^{-1} p``."""
    M = -torch.linalg.solve(q["A"], q["C"].T)
    c = -torch.linalg.solve(q["A"], q["a"])
    P = M.T @ q["F"] @ M + q["H"] + q["K"] @ M + M.T @ q["K"].T
    p = M.T @ q["F"] @ c + q["K"] @ c + M.T @ q["f"] + q["h"]
    return -torch.linalg.solve(P, p)


TRAIN, VAL = quadratic_data()
Q = full_matrices(TRAIN, VAL)
X_STAR = solution(Q)


def grad_y_G(y, x):
    return Q["A"] @ y + Q["C"].T @ x + Q["a"]


def grad_y_F(y, x):
    return Q["F"] @ y + Q["K"].T @ x + Q["f"]


def grad_x_F(y, x):
    return Q["H"] @ x + Q["K"] @ y + Q["h"]


def test_closed_form_solution_is_stationary():
    """x* from the formula: the value function's gradient, by autograd through a dense LL
    solve, vanishes there; and the value function is strongly convex."""
    x = X_STAR.clone().requires_grad_(True)
    y = torch.linalg.solve(Q["A"], -(Q["C"].T @ x + Q["a"]))
    value = 0.5 * y @ Q["F"] @ y + 0.5 * x @ Q["H"] @ x + x @ Q["K"] @ y + Q["f"] @ y + Q["h"] @ x
    (gradient,) = torch.autograd.grad(value, x)
    assert gradient.norm() < 1e-12 * X_STAR.norm()
    hessian = torch.autograd.functional.hessian(_value, X_STAR)
    assert torch.linalg.eigvalsh(hessian).min() > 0.5
    assert X_STAR.norm() > 1.0  # a solution well away from the start x = 0


def _value(x: torch.Tensor) -> torch.Tensor:
    y = torch.linalg.solve(Q["A"], -(Q["C"].T @ x + Q["a"]))
    return 0.5 * y @ Q["F"] @ y + 0.5 * x @ Q["H"] @ x + x @ Q["K"] @ y + Q["f"] @ y + Q["h"] @ x


# --- helpers ---------------------------------------------------------------------------------


def build(method, y0=None, x0=None, lr=LR, iters=1, ul_lr=0.3, **options):
    """A problem on the quadratic: ``(problem, method, ll_model, ul_model)``."""
    ll_model = Vector(P_DIM, "y", y0)
    ul_model = Vector(D_DIM, "x", x0)
    ll = GradientDescent(quadratic_ll, ll_model, ul_model, lr=lr, iters=iters)
    ul = method(quadratic_ul, ul_model, quadratic_ll, ll_model, **options)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=ul_lr))
    return problem, ul, ll_model, ul_model


def steps(problem, count: int, train=TRAIN, val=VAL) -> None:
    for _ in range(count):
        problem.step((train, None), (val, None))


def error(ul_model) -> float:
    return float((ul_model.x.detach() - X_STAR).norm() ** 2 / X_STAR.norm() ** 2)


START_Y = torch.linspace(-1.0, 1.0, P_DIM, dtype=DTYPE)
START_X = torch.tensor([0.5, -0.25, 1.0], dtype=DTYPE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # the method sums per-sample terms, the hand-written step multiplies averaged matrices:
    # they agree to round-off, far below these tolerances, far above any real discrepancy
    torch.testing.assert_close(actual.detach(), expected, rtol=1e-10, atol=1e-12)


# --- full batches: the deterministic updates, by hand ---------------------------------------


def test_soba_full_batch_is_the_hand_written_update():
    """Two SOBA steps (y, v and x move together, with the paper's decreasing steps)."""
    problem, ul, ll_model, ul_model = build(SOBA, START_Y, START_X, batch_size=None)
    y, x, v = START_Y.clone(), START_X.clone(), torch.zeros(P_DIM, dtype=DTYPE)
    for t in range(1, 3):
        rho, scale = LR * t**-0.4, t**-0.6
        loss = problem.step((TRAIN, None), (VAL, None))
        value = 0.5 * y @ Q["F"] @ y + 0.5 * x @ Q["H"] @ x + x @ Q["K"] @ y + Q["f"] @ y
        assert_close(loss, value + Q["h"] @ x)  # the UL loss before the step
        dy = grad_y_G(y, x)
        dv = Q["A"] @ v + grad_y_F(y, x)
        dx = Q["C"] @ v + grad_x_F(y, x)
        y, v, x = y - rho * dy, v - rho * dv, x - 0.3 * scale * dx
        assert_close(ll_model.y, y)
        assert_close(ul.v[0], v)
        assert_close(ul_model.x, x)
    assert ul.t == 2 and ul.diagnostics["ll_lr"] == pytest.approx(LR * 2**-0.4)


def test_saba_full_batch_is_soba_with_constant_steps_bitwise():
    a = build(SABA, START_Y, START_X, batch_size=None)
    b = build(SOBA, START_Y, START_X, batch_size=None, ll_decay=0, ul_decay=0)
    for problem, *_ in (a, b):
        steps(problem, 3)
    (_, ua, ya, xa), (_, ub, yb, xb) = a, b
    assert ua.memory == {}  # one batch per level: no SAGA table
    assert torch.equal(ya.y, yb.y) and torch.equal(xa.x, xb.x)
    assert torch.equal(ua.v[0], ub.v[0])


def test_stocbio_full_batch_is_the_hand_written_neumann_hypergradient():
    """Two UL steps: T = 3 warm-started GD steps, a Neumann series of Q = 4 terms with
    eta = 0.2 (not ll.lr), the hypergradient grad_x F - C (eta sum_q (I - eta A)^q grad_y F)."""
    problem, ul, ll_model, ul_model = build(
        StocBiO, START_Y, START_X, iters=3, batch_size=None, neumann_steps=4, neumann_lr=0.2
    )
    y, x = START_Y.clone(), START_X.clone()
    for _ in range(2):
        problem.step((TRAIN, None), (VAL, None))
        for _ in range(3):
            y = y - LR * grad_y_G(y, x)
        term = grad_y_F(y, x)
        total = term.clone()
        for _ in range(4):
            term = term - 0.2 * Q["A"] @ term
            total = total + term
        x = x - 0.3 * (grad_x_F(y, x) - Q["C"] @ (0.2 * total))
        assert_close(ll_model.y, y)
        assert_close(ul_model.x, x)
    assert ul.v is None  # StocBiO keeps no linear-system variable


def test_amigo_full_batch_is_the_hand_written_warm_started_update():
    """Two UL steps: T = 3 GD steps on y and M = 2 GD steps on v with beta = 0.2, both
    warm-started from the previous UL step."""
    problem, ul, ll_model, ul_model = build(
        AmIGO, START_Y, START_X, iters=3, batch_size=None, v_iters=2, v_lr=0.2
    )
    y, x, v = START_Y.clone(), START_X.clone(), torch.zeros(P_DIM, dtype=DTYPE)
    for _ in range(2):
        problem.step((TRAIN, None), (VAL, None))
        for _ in range(3):
            y = y - LR * grad_y_G(y, x)
        fy = grad_y_F(y, x)
        for _ in range(2):
            v = v - 0.2 * (Q["A"] @ v + fy)
        x = x - 0.3 * (grad_x_F(y, x) + Q["C"] @ v)
        assert_close(ll_model.y, y)
        assert_close(ul.v[0], v)
        assert_close(ul_model.x, x)


# --- convergence to x* -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "count", "tolerance", "options"),
    [
        # squared relative error after `count` UL steps from x = 0, y = 0
        (SOBA, 100, 1e-14, {"ll_decay": 0, "ul_decay": 0, "ul_lr": 0.5}),
        (SABA, 100, 1e-14, {"ul_lr": 0.5}),
        # the truncated series (Q = 10, eta = 0.3) biases the fixed point: its relative error
        # in v is below (1 - eta lambda_min(A))^(Q + 1) = 1e-2
        (StocBiO, 30, 1e-4, {"iters": 5, "neumann_steps": 10}),
        (AmIGO, 40, 1e-12, {"iters": 5, "ul_lr": 0.5}),
    ],
)
def test_full_batch_reaches_the_solution(method, count, tolerance, options):
    problem, *_, ul_model = build(method, batch_size=None, **options)
    steps(problem, count)
    assert error(ul_model) < tolerance


def window_error(problem, ul_model, count: int) -> float:
    """Run ``count`` steps; the mean squared relative error over the last half."""
    total = 0.0
    for k in range(count):
        steps(problem, 1)
        if k >= count // 2:
            total += error(ul_model)
    return total / (count - count // 2)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        (StocBiO, {"iters": 3, "neumann_steps": 10}),
        (AmIGO, {"iters": 3}),
    ],
)
def test_minibatches_with_small_constant_steps_reach_the_solution(method, options):
    """Batches of 16 of 64 samples, constant steps, UL learning rate 0.1: a neighbourhood of
    x* whose size is set by the noise (relative squared error 1.6e-4 measured for both)."""
    problem, *_, ul_model = build(method, batch_size=16, ul_lr=0.1, **options)
    assert window_error(problem, ul_model, 100) < 5e-3


def test_rates_with_minibatches_saba_linear_soba_sublinear():
    """The papers' rates, with i.i.d. batches of 16 of 64 samples (the analyses' sampling),
    averaged over three seeds, from x = 0. SABA with constant steps converges linearly: its
    error falls by a constant factor per step (over 100 times in 50 steps; measured 1000).
    SOBA with the paper's decreasing steps (rho t^-2/5, gamma t^-3/5) keeps falling (by more
    than 2 times from steps 60-120 to steps 120-240; measured 6), but sublinearly: by less
    than 50 times (a linear rate like SABA's would give 1e-7), more than 1000 times behind
    SABA at over twice its budget (measured 3e4), and below the noise floor where constant
    steps stall (measured 10 times below)."""
    seeds = range(3)

    def mean(values):
        return sum(values) / len(values)

    def sampler(seed):
        return Sampler(16, seed=seed, order="uniform")

    saba_50, saba_100 = [], []
    for seed in seeds:
        problem, *_, ul_model = build(SABA, sampler=sampler(seed))
        steps(problem, 50)
        saba_50.append(error(ul_model))
        steps(problem, 50)
        saba_100.append(error(ul_model))
    assert mean(saba_100) < 1e-2 * mean(saba_50)
    assert mean(saba_100) < 1e-6

    soba_120, soba_240, constant = [], [], []
    for seed in seeds:
        problem, *_, ul_model = build(SOBA, sampler=sampler(seed))
        soba_120.append(window_error(problem, ul_model, 120))
        total = 0.0
        for _ in range(120):
            steps(problem, 1)
            total += error(ul_model) / 120
        soba_240.append(total)  # the mean over steps 120..240
        problem, *_, ul_model = build(SOBA, sampler=sampler(seed), ll_decay=0, ul_decay=0)
        constant.append(window_error(problem, ul_model, 100))
    ratio = mean(soba_240) / mean(soba_120)
    assert 0.02 < ratio < 0.5, ratio  # falls, sublinearly
    assert mean(soba_240) < mean(constant) / 3  # below the constant steps' floor
    assert mean(soba_240) > 1e3 * mean(saba_100)  # SABA is far ahead at a smaller budget


def test_saba_minibatches_of_unequal_size_reach_the_exact_hypergradient():
    """Ridge regression with per-feature L2 (tests/problems.py), the UL parameters held
    fixed: SABA's y and v converge linearly to the LL solution and -H^{-1} grad_y F, so the
    UL direction becomes the exact hypergradient (implicit function theorem, dense solve),
    with 62 samples in batches of 16, 16, 15 and 15 (weighted to keep SAGA unbiased)."""
    p = ridge(n=62, d=5, seed=3)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=1)
    ul = SABA(ridge_ul, p.ul_model, ridge_ll, p.ll_model, batch_size=16)
    ul.check_against(ll)
    for _ in range(300):
        p.ul_model.log_l2.grad = None
        ul.task_gradients(ll, p.train, p.val)
    assert ul.memory["train"].count == 4
    exact = ridge_exact_hypergradient(p)
    torch.testing.assert_close(p.ul_model.log_l2.grad, exact, rtol=1e-8, atol=1e-12)


# --- checkpoints -----------------------------------------------------------------------------

CHECKPOINTED = [
    (SOBA, {}),
    (SABA, {}),
    (SABA, {"memory_init": "zero"}),
    (StocBiO, {"iters": 2, "neumann_steps": 2}),
    (AmIGO, {"iters": 2}),
]


def batches(step: int):
    return (TRAIN, None), (VAL, None)


def finals(ul, ll_model, ul_model) -> list[torch.Tensor]:
    """Everything that must match after a resume: x, y, v, the sampler's generator."""
    out = [ul_model.x.detach(), ll_model.y.detach(), ul.sampler.generator.get_state()]
    return out + ([] if ul.v is None else list(ul.v))


@pytest.mark.parametrize(("method", "options"), CHECKPOINTED)
def test_checkpoint_resumes_bitwise(tmp_path, method, options):
    """12 UL steps straight, or 7 then a new process-like start (fresh models, method and
    optimizer) resuming from the checkpoint: bitwise the same x, y, v, memory and draws."""
    path = tmp_path / "run.pt"
    straight = build(method, batch_size=16, **options)
    straight[0].run(batches, 12, progress=False)
    first = build(method, batch_size=16, **options)
    first[0].run(batches, 7, checkpoint=path, checkpoint_every=7, progress=False)
    resumed = build(method, batch_size=16, **options)
    resumed[0].run(batches, 12, checkpoint=path, checkpoint_every=100, progress=False)
    assert resumed[1].t == 12 and resumed[0].step_count == 12
    for a, b in zip(finals(*straight[1:]), finals(*resumed[1:]), strict=True):
        assert torch.equal(a, b)
    if method is SABA:
        for level, memory in straight[1].memory.items():
            other = resumed[1].memory[level]
            for term, tables in memory.tables.items():
                for a, b in zip(tables, other.tables[term], strict=True):
                    assert torch.equal(a, b)


def test_checkpoint_without_the_method_state_would_not_resume(tmp_path):
    """The control: drop the method's state (v, sampler, memory) from the checkpoint: a
    resume refuses it, and loaded anyway (strict=False) the resumed run differs; the state is
    what makes the resume exact."""
    from bilevel import checkpoint

    path = tmp_path / "run.pt"
    straight = build(SABA, batch_size=16)
    straight[0].run(batches, 8, progress=False)
    first = build(SABA, batch_size=16)
    first[0].run(batches, 4, checkpoint=path, progress=False)
    state = checkpoint.load(path)
    assert set(state["method"]) >= {"t", "v", "sampler", "memory"}
    state["method"] = None
    checkpoint.save(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    resumed = build(SABA, batch_size=16)
    with pytest.raises(ValueError, match="the state of SABA"):
        resumed[0].run(batches, 8, checkpoint=path, progress=False)
    resumed = build(SABA, batch_size=16)
    resumed[0].load_checkpoint(path, strict=False)
    resumed[0].run(batches, 8, progress=False)
    assert resumed[0].step_count == 8
    assert not torch.equal(straight[3].x, resumed[3].x)


# --- the sampler -----------------------------------------------------------------------------


def test_sampler_splits_into_balanced_fixed_batches_visited_once_per_epoch():
    sampler = Sampler(4, seed=1)
    drawn = [sampler.draw("train", 10) for _ in range(6)]  # two epochs of 3 batches
    assert [b.count for b in drawn] == [3] * 6
    for epoch in (drawn[:3], drawn[3:]):
        assert sorted(b.id for b in epoch) == [0, 1, 2]
        indices = torch.cat([b.index for b in epoch])
        assert torch.equal(indices.sort().values, torch.arange(10))
        assert sorted(len(b.index) for b in epoch) == [3, 3, 4]
        assert sum(b.weight / b.count * 10 for b in epoch) == pytest.approx(10)
    # the weights make a minibatch mean, drawn uniformly, an unbiased estimate of the mean
    values = torch.arange(10, dtype=DTYPE) ** 2
    estimate = sum(b.weight * values[b.index].mean() / b.count for b in drawn[:3])
    assert float(estimate) == pytest.approx(float(values.mean()), rel=1e-14)
    by_id = {b.id: b.index for b in drawn[:3]}
    assert all(torch.equal(by_id[b.id], b.index) for b in drawn[3:])  # fixed batches
    assert {b.weight for b in drawn} == {3 * 4 / 10, 3 * 3 / 10}
    # the train and validation levels are split apart; a full batch draws nothing
    before = sampler.generator.get_state()
    full = sampler.draw("val", 4)
    assert full.index is None and full.count == 1 and full.weight == 1.0
    assert torch.equal(before, sampler.generator.get_state())


def test_sampler_is_reproducible_and_its_state_round_trips(tmp_path):
    a, b = Sampler(3, 5, seed=7, order="uniform"), Sampler(3, 5, seed=7, order="uniform")
    for _ in range(4):
        assert torch.equal(a.draw("train", 20).index, b.draw("train", 20).index)
    a.draw("val", 20)
    path = tmp_path / "sampler.pt"
    torch.save(a.state_dict(), path)
    c = Sampler(3, 5, seed=0, order="uniform")
    c.load_state_dict(torch.load(path, weights_only=True))
    for _ in range(5):
        for level in ("train", "val"):
            assert torch.equal(a.draw(level, 20).index, c.draw(level, 20).index)
    d = Sampler(3, 5, seed=8, order="uniform")
    assert not all(
        torch.equal(a.draw("train", 20).index, d.draw("train", 20).index) for _ in range(5)
    )


def test_select_takes_rows_of_nested_data():
    index = torch.tensor([2, 0])
    data = {"a": torch.arange(6).view(3, 2), "b": (torch.arange(3), None)}
    out = select(data, index)
    assert torch.equal(out["a"], torch.tensor([[4, 5], [0, 1]]))
    assert torch.equal(out["b"][0], torch.tensor([2, 0])) and out["b"][1] is None
    assert select(data, None) is data


# --- bad input -------------------------------------------------------------------------------


def quadratic_ll_for(ll_model, ul_model, **options):
    return GradientDescent(quadratic_ll, ll_model, ul_model, **{"lr": LR, "iters": 1, **options})


@pytest.mark.parametrize(
    ("method", "ll_options", "error", "match"),
    [
        (SOBA, {"iters": 3}, ValueError, "iters=1"),
        (SABA, {"optimizer": "adam"}, ValueError, "plain SGD"),
        (SOBA, {"momentum": 0.9}, ValueError, "momentum"),
        (AmIGO, {"lr": torch.tensor(0.1, dtype=DTYPE)}, TypeError, "one\\s+finite number"),
    ],
)
def test_refuses_an_ll_optimizer_it_cannot_use(method, ll_options, error, match):
    ll_model, ul_model = Vector(P_DIM, "y"), Vector(D_DIM, "x")
    ll = quadratic_ll_for(ll_model, ul_model, **ll_options)
    ul = method(quadratic_ul, ul_model, quadratic_ll, ll_model)
    with pytest.raises(error, match=match):
        BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=0.1))


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [
        (SOBA, {"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
        (SOBA, {"batch_size": True}, ValueError, "batch_size"),
        (SABA, {"val_batch_size": 2.5}, ValueError, "val_batch_size"),
        (SOBA, {"sampler": Sampler(8), "batch_size": 8}, TypeError, "give them to the Sampler"),
        (SOBA, {"sampler": object()}, TypeError, "Sampler"),
        (SOBA, {"ll_decay": -0.1}, ValueError, "ll_decay"),
        (SOBA, {"ul_decay": True}, TypeError, "ul_decay"),
        (SABA, {"memory_init": "ones"}, ValueError, "memory_init"),
        (StocBiO, {"neumann_steps": -1}, ValueError, "neumann_steps"),
        (StocBiO, {"neumann_lr": 0.0}, ValueError, "neumann_lr"),
        (AmIGO, {"v_iters": 0}, ValueError, "v_iters"),
        (AmIGO, {"v_lr": "0.1"}, TypeError, "v_lr"),
    ],
)
def test_refuses_bad_hyperparameters(method, options, error, match):
    with pytest.raises(error, match=match):
        method(quadratic_ul, Vector(D_DIM, "x"), quadratic_ll, Vector(P_DIM, "y"), **options)


def test_refuses_a_ul_parameter_that_is_an_ll_parameter():
    model = Vector(P_DIM, "y")
    with pytest.raises(ValueError, match="also parameters of ll_model"):
        SOBA(quadratic_ul, model, quadratic_ll, model)


def test_refuses_data_of_another_size_and_the_calculator_path():
    problem, ul, *_ = build(SOBA, batch_size=16)
    steps(problem, 1)
    smaller = {k: v[:32] for k, v in TRAIN.items()}
    with pytest.raises(ValueError, match="same full train data set"):
        problem.step((smaller, None), (VAL, None))
    with pytest.raises(ValueError, match="different numbers of samples"):
        problem.step(({"u": TRAIN["u"], "a": TRAIN["a"][:5]}, None), (VAL, None))
    with pytest.raises(TypeError, match="auxiliary_model"):
        ul.compute_gradients(None, None, torch.nn.Linear(2, 2), None, None)


@pytest.mark.parametrize("method", [SOBA, SABA, AmIGO])
def test_divergence_raises_and_leaves_the_state_as_it_was(method):
    """An LL variable at 1e300: the step overflows; the error names the cause and the cure,
    and y, v and x are those before the step (so on_nonfinite='skip' skips a clean step)."""
    big = torch.full((P_DIM,), 1e300, dtype=DTYPE)
    problem, ul, ll_model, ul_model = build(method, big, batch_size=None)
    with pytest.raises(FloatingPointError, match=r"(?s)diverged|not finite.*ll\.lr"):
        steps(problem, 1)
    assert torch.equal(ll_model.y.detach(), big) and ul.t == 0
    assert torch.equal(ul_model.x.detach(), torch.zeros(D_DIM, dtype=DTYPE))
    assert ul.v is None or not ul.v[0].any()
    problem.on_nonfinite = "skip"
    steps(problem, 1)
    assert problem.skipped_steps == 1 and torch.equal(ll_model.y.detach(), big)


def test_batch_size_none_takes_the_data_as_given():
    """No sampling: each call steps on the data it is given (minibatches the caller draws)."""
    problem, ul, ll_model, _ = build(SOBA, START_Y, START_X, batch_size=None)
    half = {k: v[:32] for k, v in TRAIN.items()}
    problem.step((half, None), (VAL, None))
    expected = START_Y - LR * (
        half["u"].T @ (half["u"] @ START_Y) / 32
        + MU * START_Y
        + (half["w"] * (half["c"] @ START_X)[:, None]).mean(0)
        + half["a"].mean(0)
    )
    assert_close(ll_model.y, expected)
    problem.step((TRAIN, None), (VAL, None))
    assert ul.t == 2


def test_saga_estimate_is_unbiased_with_batches_of_unequal_size():
    """SABA's estimate of a term, averaged over a uniformly drawn batch, is the full-data
    value (the sum of the batches' values weighted by their sizes), whatever the table."""
    from bilevel.ul.saba import _Memory

    sampler = Sampler(4, seed=2)
    sampler.split("train", 10)  # batches of 4, 3 and 3 samples
    batches = [sampler.batch("train", b) for b in range(3)]
    g = torch.Generator().manual_seed(0)
    table = torch.randn(3, 2, generator=g, dtype=DTYPE)
    new = torch.randn(3, 2, generator=g, dtype=DTYPE)
    shares = torch.tensor([len(b.index) / 10 for b in batches], dtype=DTYPE)
    memory = _Memory(3, 10, {"t": [table[0]]})
    memory.load({"t": [table]}, {"t": [shares @ table]})
    estimates = [memory.reduce({"t": [new[b.id]]}, b, [])["t"][0] for b in batches]
    torch.testing.assert_close(sum(estimates) / 3, shares @ new, rtol=1e-13, atol=1e-15)
    # the pending update stores the new value and keeps the average consistent
    pending = []
    memory.reduce({"t": [new[0]]}, batches[0], pending)
    pending[0]()
    assert torch.equal(memory.tables["t"][0][0], new[0])
    torch.testing.assert_close(memory.average["t"][0], shares @ memory.tables["t"][0])


class _Shaped(nn.Module):
    """Parameters of several shapes (a matrix, a vector, a scalar), one of them frozen."""

    def __init__(self, seed: int, frozen: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.3 * torch.randn(2, 3, generator=g, dtype=DTYPE))
        self.b = nn.Parameter(0.1 * torch.randn(2, generator=g, dtype=DTYPE))
        self.s = nn.Parameter(torch.tensor(0.2, dtype=DTYPE))
        if frozen:
            self.s.requires_grad_(False)


def _shaped_ll(state: dict) -> torch.Tensor:
    m, u, x, t = state["ll_model"], state["ul_model"], state["data"], state["target"]
    r = x @ m.w.T + m.b * m.s - t @ (torch.eye(2, dtype=DTYPE) + 0.2 * u.w[:, :2])
    penalty = (u.b.exp()[:, None] * m.w**2).sum() + u.s * (m.b**2).sum()
    return (r**2).mean() + 0.1 * penalty


def _shaped_ul(state: dict) -> torch.Tensor:
    m, u, x, t = state["ll_model"], state["ul_model"], state["data"], state["target"]
    return ((x @ m.w.T + m.b * m.s - t) ** 2).mean() + 0.01 * (u.w**2).sum()


def _shaped_terms(ll_model, ul_model, y, v, batch):
    """SABA's five terms on one batch at ``(y, v, x)``, unweighted, by plain autograd."""
    ys = [t.clone().requires_grad_(True) for t in y]
    xs = list(ul_model.parameters())
    names = [n for n, p in ll_model.named_parameters() if p.requires_grad]
    frozen = {n: p.detach() for n, p in ll_model.named_parameters() if not p.requires_grad}
    weights = dict(zip(names, ys, strict=True)) | frozen
    state = {"data": batch[0], "target": batch[1], "ul_model": ul_model}
    out = {}
    with torch.nn.utils.stateless._reparametrize_module(ll_model, weights):
        state["ll_model"] = ll_model
        gy = torch.autograd.grad(_shaped_ll(state), ys, create_graph=True)
        prod = sum((g * u).sum() for g, u in zip(gy, v, strict=True))
        hv = torch.autograd.grad(prod, ys, retain_graph=True)
        cv = torch.autograd.grad(prod, xs)
        fy_fx = torch.autograd.grad(_shaped_ul(state), [*ys, *xs], allow_unused=True)
    fy_fx = [
        torch.zeros_like(p) if g is None else g for p, g in zip([*ys, *xs], fy_fx, strict=True)
    ]
    out["ll_grad"], out["hvp"], out["cross"] = [g.detach() for g in gy], list(hv), list(cv)
    out["ul_grad_y"], out["ul_grad_x"] = list(fy_fx[: len(ys)]), list(fy_fx[len(ys) :])
    return out


@pytest.mark.parametrize("frozen", [False, True])
def test_saba_memory_holds_every_term_of_parameters_of_any_shape(frozen):
    """SABA's tables (one flat buffer per level, read through per-term views) hold, for
    every batch, each of the five terms of every parameter (a matrix, a vector, a scalar;
    a frozen one left out) as plain autograd gives them at the point where the batch was
    last drawn, with batches of unequal sizes (10 samples in 4, 3, 3; 7 in 3, 2, 2); the
    averages are the tables weighted by the batch sizes; the checkpoint layout is one tensor
    ``(count, *shape)`` per term and parameter."""
    g = torch.Generator().manual_seed(5)
    train = (
        torch.randn(10, 3, generator=g, dtype=DTYPE),
        torch.randn(10, 2, generator=g, dtype=DTYPE),
    )
    val = (torch.randn(7, 3, generator=g, dtype=DTYPE), torch.randn(7, 2, generator=g, dtype=DTYPE))
    ll_model, ul_model = _Shaped(0, frozen), _Shaped(1)
    ll = GradientDescent(_shaped_ll, ll_model, ul_model, lr=0.1, iters=1)
    ul = SABA(_shaped_ul, ul_model, _shaped_ll, ll_model, batch_size=4, val_batch_size=3, seed=2)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=0.05))
    expected: dict[str, dict[int, dict]] = {"train": {}, "val": {}}
    terms = {"train": ("ll_grad", "hvp", "cross"), "val": ("ul_grad_y", "ul_grad_x")}
    for step in range(8):
        y = [p.detach().clone() for p in ll_model.parameters() if p.requires_grad]
        v = [torch.zeros_like(t) for t in y] if ul.v is None else [t.clone() for t in ul.v]
        ul_model_then = _Shaped(1)
        ul_model_then.load_state_dict(ul_model.state_dict())
        sampler = Sampler(4, 3, seed=2)
        sampler.load_state_dict(ul.sampler.state_dict())
        for level, pair in (("train", train), ("val", val)):
            if step == 0:
                sampler.split(level, len(pair[0]))  # the memory's fill draws nothing
            mb = sampler.draw(level, len(pair[0]))
            batch = (select(pair[0], mb.index), select(pair[1], mb.index))
            every = _shaped_terms(ll_model, ul_model_then, y, v, batch)
            expected[level][mb.id] = {t: every[t] for t in terms[level]}
        problem.step(train, val)
    for level, n, count in (("train", 10, 3), ("val", 7, 3)):
        memory = ul.memory[level]
        assert memory.count == count and set(expected[level]) == set(range(count))
        sizes = [len(ul.sampler.batch(level, b).index) for b in range(count)]
        assert sorted(sizes) == ([3, 3, 4] if level == "train" else [2, 2, 3])
        for term in terms[level]:
            for k, table in enumerate(memory.tables[term]):
                like = expected[level][0][term][k]
                assert table.shape == (count, *like.shape)
                for b in range(count):
                    torch.testing.assert_close(
                        table[b], expected[level][b][term][k], rtol=1e-12, atol=1e-14
                    )
                weighted = sum(sizes[b] / n * table[b] for b in range(count))
                torch.testing.assert_close(
                    memory.average[term][k], weighted, rtol=1e-12, atol=1e-14
                )
    assert len(ul.memory["train"].tables["ll_grad"]) == (2 if frozen else 3)
    assert len(ul.memory["train"].tables["cross"]) == 3


def test_saba_loads_a_memory_saved_as_separate_tensors(tmp_path):
    """A SABA state whose tables are tensors of their own (as written before the tables
    were held in one buffer per level), saved and loaded with ``weights_only=True``,
    resumes bitwise the run it was taken from."""
    straight = build(SABA, batch_size=16)
    steps(straight[0], 5)
    state = straight[1].state_dict()
    state["memory"] = {
        level: {
            **m,
            "tables": {t: [x.clone() for x in xs] for t, xs in m["tables"].items()},
            "average": {t: [x.clone() for x in xs] for t, xs in m["average"].items()},
        }
        for level, m in state["memory"].items()
    }
    torch.save(state, tmp_path / "saba.pt")
    loaded = torch.load(tmp_path / "saba.pt", weights_only=True)
    resumed = build(SABA, straight[2].y.detach(), straight[3].x.detach(), batch_size=16)
    resumed[1].load_state_dict(loaded)
    steps(straight[0], 6)
    steps(resumed[0], 6)
    for a, b in zip(finals(*straight[1:]), finals(*resumed[1:]), strict=True):
        assert torch.equal(a, b)
    for level, memory in straight[1].memory.items():
        for term, tables in memory.tables.items():
            for a, b in zip(tables, resumed[1].memory[level].tables[term], strict=True):
                assert torch.equal(a, b)
    bad = {**loaded, "memory": {"train": {**loaded["memory"]["train"], "count": 3}}}
    with pytest.raises(ValueError, match="another model"):
        build(SABA, batch_size=16)[1].load_state_dict(bad)
