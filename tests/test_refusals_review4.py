"""Findings of a review of the method families (review 4), in float64:

1. ``PTT`` and ``Reptile`` called the UL objective without checking its result: a
   per-example loss, a Python float or an integer tensor failed with a raw error from inside
   the method (``shape '[]' is invalid``, ``'float' object has no attribute 'ndim'``,
   ``torch.finfo() requires a floating point input``), or was accepted (Reptile, integer);
   now the message every other method gives.
2. ``DM`` refused UL parameters that are the LL's initial weights with the cure "Use
   Reverse, Implicit or Reptile", and plain ``Implicit`` refuses them too; every method the
   message names now runs on them.
3. A UL step that failed because an LL parameter was frozen after construction put the
   method's state back with ``load_state_dict``, which raised in its turn (DM: "it was saved
   for another model"): that error replaced the real one, and the rest of the put-back
   (torch's generators, the buffers) was skipped. The real error is raised now, with the
   failed put-back as a note, and the rest is put back.
4. ``StochasticImplicit`` declared its solve diverged only above ``1e6 ||v||``: SGD on the
   quadratic growing 10% per step (a step of 2.1 / lambda_max) returned a hypergradient
   1400 times off, silently. A residual that ends above ``||v||`` and 100 times the least
   one met is refused now.
5. Models on the meta device (shapes without values) were accepted; data on the CPU was
   then refused with the cure "move it with .to('meta')", which ended in a raw "Cannot copy
   out of meta tensor". They are refused at construction, with ``to_empty`` as the cure.
6. ``compute_gradients`` called twice on one auxiliary model advised "run ll.optimize(data,
   target) again", which PTT refuses; the cure named now works for every method.
7. ``StocBiO`` and ``AmIGO``: an LL step above ``2 / L`` made the warm-started inner loop
   diverge for 40 UL steps (``|y|`` 2e17, the estimate 1e34) without an error, where SOBA
   and SABA raise (their LL loss is followed across UL steps); and AmIGO's ``v_lr`` above
   ``2 / L`` made ``v`` diverge (the estimate 1e12, exact 0.14), silently. Both raise now,
   with the state kept.
8. An empty batch (0 rows) was reported by the first-order methods as NaN values to cure
   with smaller step sizes, and by BVFIM as a zero regularized LL solution; NaN in BVFIM's
   data as a step size or a slack problem. The runner refuses an empty batch, naming it, and
   BVFIM leaves non-finite values to the common check, which names the data first.
9. PBGD, F2SA, MESO, GAFFO and Alternating with a step size above ``2 / L`` (``ll.lr``,
   ``lr_y`` or ``eta``) ran 30 UL steps to directions of 1e8 to 1e108 without a word (only
   NaN or inf was refused). Their LL loss is now followed across UL steps as SOBA's is; a
   rise past every earlier loss is confirmed by more of the method's updates at the UL point
   (not committed), then raises, with the state kept (or warns, ``on_growth="warn"``).
10. ``PerElement`` and ``PerStep`` were refused for a rule's hyperparameters (momentum,
    betas): a per-step momentum for a bias as long as the run could not be written at all
    (unmarked, that shape is ambiguous and refused). The markers now pass to the LL
    optimizer, which reads them as it reads ``lr``'s.

Bugs are asserted by the exception type and its message; unchanged computations against
hand-written answers.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from problems import (
    DTYPE,
    FeatureL2,
    Linear,
    relative_error,
    ridge,
    ridge_exact_hypergradient,
    ridge_hessian,
    ridge_ll,
    ridge_ul,
)

import bilevel.ul
from bilevel import BilevelProblem
from bilevel.ll import (
    BDA,
    FixedPointMap,
    GradientDescent,
    LowerLevelDivergenceError,
    PerStep,
    rules,
)
from bilevel.ul import (
    BVFIM,
    DM,
    F2SA,
    GAFFO,
    MESO,
    PBGD,
    PTT,
    SOBA,
    Alternating,
    AmIGO,
    HypergradientDivergenceError,
    Reptile,
    Reverse,
    StocBiO,
    StochasticImplicit,
    Truncated,
)

LR = 0.1


def per_example(state):
    return 0.5 * (state["ll_model"](state["data"]) - state["target"]) ** 2


def a_float(state):
    return 0.5


def an_integer_tensor(state):
    return torch.tensor(1)


def reptile_ll(state):
    return ridge_ul(state) + 0.1 * (state["ll_model"].w ** 2).sum()


def hypergradient_with(method, ul_objective):
    """The hypergradient of ridge through 3 LL steps, ``ul_objective`` as the UL loss."""
    p = ridge(seed=0)
    with torch.no_grad():  # (from 0, the first step's hypergradient is 0: no test)
        p.ll_model.w.fill_(1.0)
    if method is Reptile:  # meta-learning: the LL model's start is the UL variable
        ul_model, ll_objective = p.ll_model, reptile_ll
    else:
        ul_model, ll_objective = p.ul_model, ridge_ll
    ll = GradientDescent(ll_objective, p.ll_model, ul_model, lr=LR, iters=3)
    problem = BilevelProblem(ll, method(ul_objective, ul_model, ll_objective, p.ll_model))
    return problem.hypergradient(p.train, p.val), p


@pytest.mark.parametrize("method", [PTT, Reptile])
@pytest.mark.parametrize(
    ("objective", "error", "message"),
    [
        (per_example, ValueError, r"must return a scalar, .* shape \(60,\); reduce it with"),
        (a_float, TypeError, "must return a scalar torch.Tensor, but it returned float"),
        (an_integer_tensor, TypeError, "must return a floating-point tensor, got dtype"),
    ],
)
def test_the_ul_objectives_result_is_checked(method, objective, error, message):
    with pytest.raises(error, match="ul_objective " + message):
        hypergradient_with(method, objective)


def test_checked_results_change_no_answer():
    """PTT's hypergradient against a hand-written unroll from the worst iterate, and
    Reptile's against ``w_0 - w_T``: the checks read the results, and change nothing."""
    (ptt_grad,), p = hypergradient_with(PTT, ridge_ul)
    x, y = p.train
    xv, yv = p.val
    lam = p.ul_model.log_l2.detach().clone().requires_grad_()
    w = p.ll_model.w.detach().clone()
    iterates = []
    for _ in range(3):
        w = w - LR * (x.T @ (x @ w - y) / len(x) + lam.exp() * w)
        iterates.append(w)
    losses = torch.stack([0.5 * ((xv @ v - yv) ** 2).mean() for v in iterates])
    worst = iterates[int(losses.argmax())]
    (exact,) = torch.autograd.grad(0.5 * ((xv @ worst - yv) ** 2).mean(), lam)
    assert relative_error(ptt_grad, exact) < 1e-12

    (reptile_grad,), p = hypergradient_with(Reptile, ridge_ul)
    w0 = p.ll_model.w.detach().clone().requires_grad_()
    w = w0
    for _ in range(3):
        (g,) = torch.autograd.grad(reptile_ll({"ll_model": _At(w), "data": x, "target": y}), w)
        w = (w - LR * g).detach().requires_grad_()
    assert relative_error(reptile_grad, (w0 - w).detach()) < 1e-12
    assert reptile_grad.dtype == DTYPE


class _At(torch.nn.Module):
    """A linear model at the weights ``w`` (for the hand-written Reptile run)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_dms_refusal_of_initial_weights_names_methods_that_take_them():
    p = ridge(seed=0)
    ll = GradientDescent(reptile_ll, p.ll_model, p.ll_model, lr=LR, iters=3)
    with pytest.raises(ValueError, match="cannot also be LL weights") as refused:
        DM(ridge_ul, p.ll_model, reptile_ll, p.ll_model)
    cures = re.search(r"Use (.*?) for those", str(refused.value)).group(1)
    names = re.findall(r"[A-Z][A-Za-z]+", cures)
    assert len(names) >= 3
    for name in names:
        method = getattr(bilevel.ul, name)(ridge_ul, p.ll_model, reptile_ll, p.ll_model)
        (grad,) = BilevelProblem(ll, method).hypergradient(p.train, p.val)
        assert grad.shape == p.ll_model.w.shape


class TwoPart(torch.nn.Module):
    """``x @ w + b``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(5, dtype=DTYPE))
        self.b = torch.nn.Parameter(torch.zeros((), dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


def noisy_ll(state):
    """ridge_ll with a small random term: the step draws from torch's generator."""
    return ridge_ll(state) + 1e-3 * (torch.randn((), dtype=DTYPE) * state["ll_model"].w).sum()


def dm_problem():
    p = ridge(seed=0)
    model = TwoPart()
    ll = GradientDescent(noisy_ll, model, p.ul_model, lr=LR, iters=3)
    dm = DM(ridge_ul, p.ul_model, noisy_ll, model)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    return BilevelProblem(ll, dm, optimizer), p, model


def test_a_step_that_fails_on_a_frozen_parameter_keeps_its_error_and_puts_back_the_rest():
    torch.manual_seed(0)
    problem, p, model = dm_problem()
    problem.step(p.train, p.val)
    model.b.requires_grad_(False)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="trainable LL parameters are now") as failed:
        problem.step(p.train, p.val)
    assert any("could not be put back" in note for note in failed.value.__notes__)
    assert torch.equal(torch.get_rng_state(), rng)
    # unfrozen, the run goes on as one that never failed
    model.b.requires_grad_(True)
    problem.step(p.train, p.val)
    torch.manual_seed(0)
    again, q, _ = dm_problem()
    again.step(q.train, q.val)
    again.step(q.train, q.val)
    assert torch.equal(p.ul_model.log_l2, q.ul_model.log_l2)
    assert torch.equal(problem.ul.multiplier[0], again.ul.multiplier[0])


@pytest.mark.parametrize(("step", "steps"), [(1.9, 400), (2.1, 100)])
def test_a_diverging_stochastic_solve_is_refused(step, steps):
    """The full batch (a deterministic solve) at a converged LL: SGD on the quadratic with a
    step of ``step / lambda_max`` converges to the exact hypergradient below 2 and is refused
    above it (10% growth per step: after 100 steps, 1400 times off before)."""
    p = ridge(seed=6)
    lambda_max = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=1 / lambda_max, iters=3000)
    method = StochasticImplicit(
        ridge_ul,
        p.ul_model,
        ridge_ll,
        p.ll_model,
        steps=steps,
        batches=None,
        solver_optimizer=lambda q: torch.optim.SGD(q, lr=step / lambda_max),
    )
    problem = BilevelProblem(ll, method)
    if step > 2:
        with pytest.raises(HypergradientDivergenceError, match="solve diverged"):
            problem.hypergradient(p.train, p.val)
        return
    (grad,) = problem.hypergradient(p.train, p.val)
    assert relative_error(grad, ridge_exact_hypergradient(p)) < 1e-8


def fixed_point_step(state):
    model = state["ll_model"]
    return [0.5 * model.w - 0.1 * state["ul_model"].log_l2]


@pytest.mark.parametrize("on_meta", ["ll_model", "ul_model", "buffer"])
@pytest.mark.parametrize(
    "build",
    [
        lambda ll, ul: GradientDescent(ridge_ll, ll, ul, lr=LR, iters=3),
        lambda ll, ul: BDA(
            ridge_ll, ll, ul, lr=LR, iters=3, ul_objective=ridge_ul, alpha=0.5, alpha_decay=0.9
        ),
        lambda ll, ul: FixedPointMap(fixed_point_step, ll, ul, iters=3),
        lambda ll, ul: PTT(ridge_ul, ul, ridge_ll, ll),
        lambda ll, ul: StochasticImplicit(ridge_ul, ul, ridge_ll, ll),
    ],
    ids=["GradientDescent", "BDA", "FixedPointMap", "PTT", "StochasticImplicit"],
)
def test_models_on_the_meta_device_are_refused_with_the_cure(build, on_meta):
    ll_model, ul_model = Linear(5), FeatureL2(5)
    if on_meta == "buffer":
        ll_model.register_buffer("scale", torch.ones(5, dtype=DTYPE, device="meta"))
    else:
        {"ll_model": ll_model, "ul_model": ul_model}[on_meta].to("meta")
    with pytest.raises(ValueError, match=r"on the meta device .*to_empty\(device="):
        build(ll_model, ul_model)


@pytest.mark.parametrize(
    "method",
    [PTT, Reverse, lambda *a: Truncated(*a, truncate_iter=2)],
    ids=["PTT", "Reverse", "Truncated"],
)
def test_the_cure_for_a_second_call_on_one_auxiliary_model_works(method):
    p = ridge(seed=0)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=3)
    ul = method(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    model = ul.run_ll(ll, *p.train).model
    first = ul.compute_gradients(*p.val, model, *p.train)
    with pytest.raises(TypeError, match="frees their graph") as refused:
        ul.compute_gradients(*p.val, model, *p.train)
    cure = re.search(r"with (\S+)\(ll, data, target\)\.model", str(refused.value))
    assert cure is not None and cure.group(1) == "method.run_ll"
    again = ul.run_ll(ll, *p.train).model  # the cure, as the message writes it
    assert torch.equal(ul.compute_gradients(*p.val, again, *p.train), first)


def steps_until_refused(method, ll_factor, **settings):
    """UL steps (at most 40, the UL variables fixed) of ``method`` on full-batch ridge with
    the LL step ``ll_factor * 2 / L`` until it raises: ``(steps taken, the error)``."""
    p = ridge(n=40, d=4)
    lipschitz = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=ll_factor * 2 / lipschitz, iters=3)
    settings = {k: v * 2 / lipschitz for k, v in settings.items()}
    ul = method(ridge_ul, p.ul_model, ridge_ll, p.ll_model, batch_size=None, **settings)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.0))
    for step in range(40):
        before = [t.clone() for t in (p.ll_model.w, *(ul.v or []))]
        try:
            problem.step(p.train, p.val)
        except (LowerLevelDivergenceError, HypergradientDivergenceError) as error:
            after = [p.ll_model.w, *(ul.v or [])]
            assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
            return step, error
    return 40, None


@pytest.mark.parametrize(
    ("method", "settings"),
    [(AmIGO, {}), (AmIGO, {"v_lr": 0.3}), (StocBiO, {"neumann_lr": 0.3})],
    ids=["AmIGO", "AmIGO-v_lr", "StocBiO-neumann_lr"],
)
def test_an_inner_loop_that_diverges_is_refused(method, settings):
    steps, error = steps_until_refused(method, 1.2, **settings)
    assert isinstance(error, LowerLevelDivergenceError), error
    assert "Lower the LL step size ll.lr" in str(error)
    assert steps <= 15
    # stable (0.3 of the bound): 40 steps and no error
    assert steps_until_refused(method, 0.3, **settings) == (40, None)


def test_amigos_diverging_v_is_refused():
    steps, error = steps_until_refused(AmIGO, 0.3, v_lr=1.2)
    assert isinstance(error, HypergradientDivergenceError), error
    assert "v diverged" in str(error) and "Lower v_lr" in str(error)
    assert steps <= 10
    assert steps_until_refused(AmIGO, 0.3, v_lr=0.9) == (40, None)


@pytest.mark.parametrize("method", [SOBA, PBGD, BVFIM, Reverse])
@pytest.mark.parametrize("which", ["train", "val"])
def test_an_empty_batch_is_refused_naming_it(method, which):
    p = ridge(n=40, d=4)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=1)
    problem = BilevelProblem(
        ll,
        method(ridge_ul, p.ul_model, ridge_ll, p.ll_model),
        torch.optim.SGD(p.ul_model.parameters(), lr=0.05),
    )
    batches = {"train": p.train, "val": p.val}
    batches[which] = (batches[which][0][:0], batches[which][1][:0])
    with pytest.raises(ValueError, match=rf"{which}\[0\] is empty \(shape \(0, 4\)"):
        problem.step(batches["train"], batches["val"])


@pytest.mark.parametrize("which", ["train", "val"])
def test_nan_in_bvfims_data_is_reported_as_nan(which):
    p = ridge(n=40, d=4)
    batches = {"train": p.train, "val": p.val}
    target = batches[which][1].clone()
    target[3] = float("nan")
    batches[which] = (batches[which][0], target)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=3)
    problem = BilevelProblem(
        ll,
        BVFIM(ridge_ul, p.ul_model, ridge_ll, p.ll_model),
        torch.optim.SGD(p.ul_model.parameters(), lr=0.05),
    )
    with pytest.raises(FloatingPointError, match=r"NaN or inf.*Check the data for NaN"):
        problem.step(batches["train"], batches["val"])


def with_penalty(state):
    """Alternating's UL objective: it needs a term in the UL variables."""
    return ridge_ul(state) + 0.01 * (state["ul_model"].log_l2 ** 2).sum()


FIRST_ORDER = {"PBGD": PBGD, "F2SA": F2SA, "MESO": MESO, "GAFFO": GAFFO, "Alternating": Alternating}
DIVERGING = [
    ("PBGD", 1.2, {}),
    ("PBGD", 0.14, {"lr_y": 1.2}),
    ("F2SA", 0.14, {"lr_y": 3.0}),
    ("MESO", 0.14, {"eta": 1.2}),
    ("MESO", 0.14, {"lr_y": 1.2}),
    ("GAFFO", 1.2, {}),
    ("Alternating", 1.2, {}),
]


def first_order_problem(name, ll_factor, ul_lr, on_growth="raise", **factors):
    """A first-order method on ridge, its step sizes multiples of ``2 / L``."""
    p = ridge(n=40, d=4)
    bound = 2 / float(torch.linalg.eigvalsh(ridge_hessian(p)).max())
    ll = GradientDescent(
        ridge_ll, p.ll_model, p.ul_model, lr=ll_factor * bound, iters=3, on_growth=on_growth
    )
    ul_objective = with_penalty if name == "Alternating" else ridge_ul
    settings = {k: v * bound for k, v in factors.items()}
    method = FIRST_ORDER[name](ul_objective, p.ul_model, ridge_ll, p.ll_model, **settings)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=ul_lr)
    return BilevelProblem(ll, method, optimizer), method, p


@pytest.mark.parametrize(("name", "ll_factor", "factors"), DIVERGING)
def test_a_first_order_method_whose_ll_diverges_is_refused(name, ll_factor, factors):
    problem, method, p = first_order_problem(name, ll_factor, 0.0, **factors)
    for step in range(30):
        state = (p.ll_model.w.detach().clone(), str(method.state_dict()))
        try:
            problem.step(p.train, p.val)
        except LowerLevelDivergenceError as error:
            assert "Lower the step sizes of the LL updates" in str(error)
            assert torch.equal(p.ll_model.w, state[0])
            assert str(method.state_dict()) == state[1]
            assert step <= 15
            return
    pytest.fail("30 UL steps of a diverging LL and no error")


@pytest.mark.parametrize(("name", "ll_factor", "factors"), DIVERGING[:1] + DIVERGING[-1:])
def test_a_first_order_method_whose_ll_diverges_warns_once_if_asked(name, ll_factor, factors):
    problem, _, p = first_order_problem(name, ll_factor, 0.0, on_growth="warn", **factors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(25):
            problem.step(p.train, p.val)
    found = [w for w in caught if "the LL variables are diverging" in str(w.message)]
    assert len(found) == 1
    assert found[0].filename == __file__


@pytest.mark.parametrize("name", sorted(FIRST_ORDER))
def test_a_first_order_method_that_converges_is_not_refused(name):
    """Stable steps (0.14 of the bound) with the UL variables moving: 60 steps, no error and
    no warning."""
    problem, _, p = first_order_problem(name, 0.14, 0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(60):
            problem.step(p.train, p.val)
    assert not [w for w in caught if "diverging" in str(w.message)]


class WeightAndBias(torch.nn.Module):
    """``x @ W.T + b`` with 3 outputs: the bias is as long as a 3-step LL run."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(0.1 * torch.ones(3, 4, dtype=DTYPE))
        self.bias = torch.nn.Parameter(torch.zeros(3, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class Momenta(torch.nn.Module):
    """The UL variables: one momentum logit per LL step for the bias."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([0.1, 0.5, -0.3], dtype=DTYPE))


def regression(weight, bias, x, y):
    return 0.5 * ((x @ weight.T + bias - y) ** 2).mean()


def test_a_rules_hyperparameter_takes_a_marker():
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(30, 4, generator=g, dtype=DTYPE),
        torch.randn(30, 3, generator=g, dtype=DTYPE),
    )
    xv, yv = (
        torch.randn(30, 4, generator=g, dtype=DTYPE),
        torch.randn(30, 3, generator=g, dtype=DTYPE),
    )
    model, ul = WeightAndBias(), Momenta()

    def ll_objective(state):
        return F.mse_loss(state["ll_model"](state["data"]), state["target"]) / 2

    momentum = [0.5, PerStep(lambda u: torch.sigmoid(u.logits))]  # weight: 0.5; bias: per step
    ll = GradientDescent(ll_objective, model, ul, lr=0.2, iters=3, momentum=momentum)
    (grad,) = BilevelProblem(ll, Reverse(ll_objective, ul, ll_objective, model)).hypergradient(
        (x, y), (xv, yv)
    )
    # torch.optim.SGD's heavy ball, written out: buf = g at the first step, then mu buf + g
    logits = ul.logits.detach().clone().requires_grad_()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    w.requires_grad_()
    b.requires_grad_()
    bufs = None
    for t in range(3):
        gw, gb = torch.autograd.grad(regression(w, b, x, y), (w, b), create_graph=True)
        mu = (0.5, torch.sigmoid(logits)[t])
        grads = (gw, gb)
        bufs = (
            grads if bufs is None else [m * u + d for m, u, d in zip(mu, bufs, grads, strict=True)]
        )
        w, b = w - 0.2 * bufs[0], b - 0.2 * bufs[1]
    (exact,) = torch.autograd.grad(regression(w, b, xv, yv), logits)
    assert relative_error(grad, exact) < 1e-12
    # betas of Adam, marked, build as well (they were refused as "got PerElement")
    rules.adam(betas=([0.9, PerStep(lambda u: torch.sigmoid(u.logits))], 0.99))


class Scalar(torch.nn.Module):
    def __init__(self, start: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(start, dtype=DTYPE))


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.0, dtype=DTYPE))


def test_the_divergence_message_says_its_curvature_is_a_lower_estimate():
    """``f(w) = exp(w) - a w`` from ``w = -3``: the curvature at the start, ``e^-3``, bounds the
    step at 40, and lr = 10 diverges as the run reaches larger curvature. The message said
    the power iterations were exact for a quadratic and the bound the one to keep under."""

    def ll_objective(state):
        w = state["ll_model"].w
        return torch.exp(w) - state["ul_model"].a * w

    model, ul = Scalar(-3.0), Scale()
    ll = GradientDescent(ll_objective, model, ul, lr=10.0, iters=3)
    problem = BilevelProblem(ll, Reverse(ll_objective, ul, ll_objective, model))
    data = (torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))
    with pytest.raises(LowerLevelDivergenceError) as diverged:
        problem.hypergradient(data, data)
    message = str(diverged.value)
    assert "at least about 0.04979" in message and "approach it from below" in message
    assert "(the lr that diverged, 10, is below that bound: the estimate is low" in message
