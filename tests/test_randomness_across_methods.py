"""Random draws inside the objectives, across methods: dropout layers in the LL model and a
noise term drawn in ``ll_objective`` (an augmentation), both from torch's global RNG.

The semantics pinned here (docs/methods.md, "Random draws in the objectives"):

- An LL run draws in step order: step ``t`` evaluates ``ll_objective`` once, with its own
  draws ``m_t`` (dropout masks, noise); the UL loss at the result draws next (``Reverse``,
  ``Truncated``, ``Forward``: ``T`` LL evaluations, then one UL evaluation).
- A method that evaluates an objective again *for the same step* replays that step's draws:
  ``MemorySavingReverse`` recomputes step ``t`` with ``m_t`` (its result is ``Reverse``'s
  on the same draws), ``FiniteDifference`` takes ``grad f`` at ``w+-`` with the last LL
  step's draws (the mixed derivative of the one-step unroll, error ``O(r^2)``), ``PTT``
  differentiates the UL loss at ``k*`` with the draws it was compared with. Replays leave
  the global RNG where the run left it: after a call, ``MemorySavingReverse`` and
  ``FiniteDifference`` leave it where ``Reverse`` does.
- Methods that take derivatives at the auxiliary model (``Implicit``, ``IGA``, ``DM``) draw
  once for the UL loss and once for the LL loss there; the Hessian and the cross term share
  that one LL draw.
- Checks draw nothing: StochasticImplicit's split check, the LL growth message's curvature.
- Modes: dropout is on in the LL steps when the user's module is in training mode, off in
  eval mode (then dropout draws nothing). An objective that switches ``state["ll_model"]``
  to eval mode does so for its own evaluation: the method's later LL evaluations (the
  recomputed or perturbed steps, the residual at the auxiliary model) run in the LL run's
  mode.
- ``hypergradient()`` draws as ``step()`` does (fresh draws at every call, never frozen).

Every hand-written reference below replays the draws by seeding torch's global RNG and
making the same calls in the same order (the objectives are shared; the unrolls, the
derivatives and the solves are written out).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bilevel import BilevelProblem
from bilevel.ll import BDA, GradientDescent
from bilevel.ul import (
    DM,
    IGA,
    PTT,
    FiniteDifference,
    Forward,
    Implicit,
    MemorySavingReverse,
    Reverse,
    StochasticImplicit,
    Truncated,
)

DTYPE = torch.float64
LR = 0.1
NOISE = 0.1  # the augmentation's scale
SEED = 1234


class Net(nn.Module):
    """A small MLP with dropout between its layers (float64, fixed weights)."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 6).to(DTYPE)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(6, 1).to(DTYPE)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p_ in self.parameters():
                p_.copy_(0.6 * torch.randn(p_.shape, generator=g, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x)))).squeeze(-1)


class Hyper(nn.Module):
    """Input scales (they meet the dropout masks in the LL loss) and an L2 strength."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 0.5, -0.7], dtype=DTYPE))
        self.log_l2 = nn.Parameter(torch.tensor(-2.0, dtype=DTYPE))


def ll_terms(forward, weights, hyper, x, y):
    """The LL loss: a noisy copy of the inputs (drawn here), the model (dropout), a penalty."""
    noisy = x + NOISE * torch.randn_like(x)
    fit = ((forward(noisy * hyper.scale) - y) ** 2).mean()
    return fit + 0.5 * hyper.log_l2.exp() * sum((w**2).sum() for w in weights)


def ul_terms(forward, hyper, x, y):
    """The UL loss: the model (dropout) on the validation inputs."""
    return ((forward(x * hyper.scale) - y) ** 2).mean()


def ll_objective(state):
    model = state["ll_model"]
    return ll_terms(model, list(model.parameters()), state["ul_model"], *_pair(state))


def ul_objective(state):
    return ul_terms(state["ll_model"], state["ul_model"], *_pair(state))


def _pair(state):
    return state["data"], state["target"]


def data():
    g = torch.Generator().manual_seed(1)
    xt, xv = (torch.randn(20, 3, generator=g, dtype=DTYPE) for _ in range(2))
    yt, yv = (torch.randn(20, generator=g, dtype=DTYPE) for _ in range(2))
    return (xt, yt), (xv, yv)


def functional(net):
    """``weights -> forward``: the user's module (its dropout included) at other weights."""
    names = [n for n, _ in net.named_parameters()]
    return lambda w: lambda x: functional_call(net, dict(zip(names, w, strict=True)), (x,))


def hyper_params(hyper):
    return [hyper.scale, hyper.log_l2]


def close(a, b, rtol=1e-10):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * 1e-3)


def rel_error(a, b):
    num = torch.cat([(x - y).reshape(-1) for x, y in zip(a, b, strict=True)]).norm()
    return float(num / torch.cat([y.reshape(-1) for y in b]).norm())


def problem_for(make_ul, iters=4, net=None, hyper=None, ll=None, **ll_options):
    net = Net() if net is None else net
    hyper = Hyper() if hyper is None else hyper
    if ll is None:
        # the LL loss carries dropout noise: the growth check is left out (on_growth) but
        # where a test is about it
        ll_options.setdefault("on_growth", "ignore")
        ll = GradientDescent(ll_objective, net, hyper, lr=LR, iters=iters, **ll_options)
    problem = BilevelProblem(ll, make_ul(net, hyper), torch.optim.SGD(hyper.parameters(), 0.0))
    return problem, net, hyper


def seeded_hypergradient(problem, train, val, seed=SEED):
    """The hypergradient from a seeded global RNG, and the RNG state it leaves."""
    torch.manual_seed(seed)
    grads = problem.hypergradient(train, val)
    return grads, torch.get_rng_state()


def unroll_by_hand(net, hyper, train, iters, graph_from=0, start=None):
    """Plain SGD steps on ``ll_terms`` (one evaluation, one draw, per step): the weights
    after each step; steps before ``graph_from`` keep no graph (Truncated)."""
    at = functional(net)
    w = [p.detach().clone().requires_grad_() for p in net.parameters()] if start is None else start
    iterates = []
    for t in range(iters):
        graph = t >= graph_from
        if not graph:
            w = [x.detach().requires_grad_() for x in w]
        loss = ll_terms(at(w), w, hyper, *train)
        g = torch.autograd.grad(loss, w, create_graph=graph)
        w = [x - LR * gi for x, gi in zip(w, g, strict=True)]
        if not graph:
            w = [x.detach().requires_grad_() for x in w]
        iterates.append(w)
    return iterates


def reverse_by_hand(net, hyper, train, val, iters, graph_from=0, seed=SEED):
    torch.manual_seed(seed)
    w = unroll_by_hand(net, hyper, train, iters, graph_from)[-1]
    loss = ul_terms(functional(net)(w), hyper, *val)
    return list(torch.autograd.grad(loss, hyper_params(hyper))), torch.get_rng_state()


# --- 1. the draw order of an LL run -----------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["reverse", "forward", "truncated"],
)
def test_one_draw_per_ll_step_then_the_ul_loss(name):
    """Reverse, Forward and Truncated(K=2) equal the hand-written unroll on the same draws
    (one LL evaluation per step, in order, then the UL loss), and leave the global RNG where
    it leaves it. Forward carries its tangents through the step's own evaluation."""
    train, val = data()
    iters = 4
    make = {
        "reverse": lambda n, h: Reverse(ul_objective, h, ll_objective, n),
        "forward": lambda n, h: Forward(ul_objective, h, ll_objective, n),
        "truncated": lambda n, h: Truncated(ul_objective, h, ll_objective, n, truncate_iter=2),
    }[name]
    problem, net, hyper = problem_for(make, iters)
    grads, rng = seeded_hypergradient(problem, train, val)
    graph_from = iters - 2 if name == "truncated" else 0
    expected, expected_rng = reverse_by_hand(net, hyper, train, val, iters, graph_from)
    close(grads, expected)
    assert torch.equal(rng, expected_rng)
    # the draws matter: another seed gives another hypergradient
    other, _ = seeded_hypergradient(problem, train, val, seed=SEED + 1)
    assert rel_error(other, grads) > 1e-3


def test_dropout_follows_the_users_module_mode():
    """The LL steps run in the user's module's mode at every run: in training mode the
    hypergradient is that of the dropout unroll; in eval mode nothing is dropped (the run is
    the unroll without dropout, and only the noise term draws: T draws of its shape); back
    in training mode, dropout is on again."""
    train, val = data()
    problem, net, hyper = problem_for(lambda n, h: Reverse(ul_objective, h, ll_objective, n))
    iters = problem.ll.iters
    for mode in ("train", "eval", "train"):
        net.train(mode == "train")
        grads, rng = seeded_hypergradient(problem, train, val)
        expected, expected_rng = reverse_by_hand(net, hyper, train, val, iters)
        close(grads, expected)
        assert torch.equal(rng, expected_rng)
        torch.manual_seed(SEED)
        for _ in range(iters):
            torch.randn(train[0].shape, dtype=DTYPE)
        assert torch.equal(rng, torch.get_rng_state()) == (mode == "eval")


# --- 2. methods that evaluate a step again replay its draws ------------------------------


def _bda(net, hyper, iters):
    return BDA(
        ll_objective,
        net,
        hyper,
        lr=LR,
        iters=iters,
        ul_objective=ul_objective,
        alpha=0.3,
        alpha_decay=0.9,
        on_growth="ignore",
    )


@pytest.mark.parametrize("dynamics", ["sgd", "momentum", "maml", "bda"])
def test_memory_saving_reverse_replays_each_steps_draws(dynamics):
    """MemorySavingReverse recomputes step t with the draws step t made in the forward run,
    so its result is Reverse's on the same draws (to round-off), for SGD, momentum, MAML
    (the initial weights as UL variables) and BDA (whose steps also evaluate the UL loss);
    the recomputation draws nothing: the global RNG ends where Reverse leaves it."""
    train, val = data()
    iters = 5
    results = []
    for method in (Reverse, MemorySavingReverse):
        net = Net()
        hyper = net if dynamics == "maml" else Hyper()
        if dynamics == "maml":
            options = {}

            def ll_obj(state):  # MAML: the noise and dropout, no penalty
                model = state["ll_model"]
                noisy = state["data"] + NOISE * torch.randn_like(state["data"])
                return ((model(noisy) - state["target"]) ** 2).mean()

            def ul_obj(state):
                return ((state["ll_model"](state["data"]) - state["target"]) ** 2).mean()
        else:
            ll_obj, ul_obj = ll_objective, ul_objective
            options = {"optimizer": "sgd", "momentum": 0.8} if dynamics == "momentum" else {}
        if dynamics == "bda":
            ll = _bda(net, hyper, iters)
        else:
            ll = GradientDescent(
                ll_obj, net, hyper, lr=LR, iters=iters, on_growth="ignore", **options
            )
        problem = BilevelProblem(ll, method(ul_obj, hyper, ll_obj, net))
        results.append(seeded_hypergradient(problem, train, val))
    (expected, expected_rng), (grads, rng) = results
    close(grads, expected, rtol=1e-11)
    assert torch.equal(rng, expected_rng)


def test_finite_difference_takes_both_points_with_the_last_steps_draws():
    """DARTS' finite difference under dropout: grad_lambda f at w+ and w- with the draws of
    the last LL step (the step it differentiates), so the result is the one-step unrolled
    hypergradient on those draws (w_{T-1} held constant) up to O(r^2): the error falls 100x
    per 10x smaller r. (With a new draw at each point the difference of two masks, divided
    by 2 eps, grows as 1/r.) The two evaluations draw nothing: the global RNG ends where
    Reverse leaves it."""
    train, val = data()
    for iters in (1, 3):
        # the reference: T-1 steps without graph, the last one with its graph, the UL loss
        net, hyper = Net(), Hyper()
        torch.manual_seed(SEED)
        start = list(net.parameters())
        if iters > 1:
            start = unroll_by_hand(net, hyper, train, iters - 1, graph_from=iters)[-1]
        start = [w.detach().clone().requires_grad_() for w in start]
        (last,) = unroll_by_hand(net, hyper, train, 1, start=start)
        loss = ul_terms(functional(net)(last), hyper, *val)
        expected = list(torch.autograd.grad(loss, hyper_params(hyper)))
        expected_rng = torch.get_rng_state()
        errors, states = [], []
        for r in (1e-2, 1e-3):
            problem, _, _ = problem_for(
                lambda n, h, r=r: FiniteDifference(ul_objective, h, ll_objective, n, r=r),
                iters,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # T > 1: the one-step warning
                grads, rng = seeded_hypergradient(problem, train, val)
            errors.append(rel_error(grads, expected))
            states.append(rng)
        assert errors[1] < 1e-5, errors
        assert errors[1] < errors[0] / 30, errors
        assert all(torch.equal(rng, expected_rng) for rng in states)


def ptt_by_hand(net, hyper, train, val, iters):
    """PTT on the same draws: the LL unroll, the UL loss at each iterate (each with its own
    draws, in order), the gradient of the largest of those losses."""
    torch.manual_seed(SEED)
    iterates = unroll_by_hand(net, hyper, train, iters)
    losses = [ul_terms(functional(net)(w), hyper, *val) for w in iterates]
    rng = torch.get_rng_state()
    k = int(torch.stack([x.detach() for x in losses]).argmax())
    return k, losses[k], list(torch.autograd.grad(losses[k], hyper_params(hyper))), rng


def test_ptt_differentiates_the_ul_loss_it_picked():
    """PTT picks k* = argmax_k L_ul(w_k) over losses with their own draws, and takes the
    gradient of that same loss (the same draws): its UL loss is the largest of those
    compared, and the hypergradient is the hand-written one. The re-evaluation draws
    nothing: the global RNG ends after the T LL steps and the T UL evaluations."""
    train, val = data()
    iters = 6
    problem, net, hyper = problem_for(
        lambda n, h: PTT(ul_objective, h, ll_objective, n), iters, net=Net(p=0.5)
    )
    grads, rng = seeded_hypergradient(problem, train, val)
    k, loss, expected, expected_rng = ptt_by_hand(net, hyper, train, val, iters)
    assert problem.ul.diagnostics["ptt_step"] == k + 1
    torch.testing.assert_close(problem.ul.diagnostics["ul_loss"], loss.detach(), rtol=1e-12, atol=0)
    close(grads, expected)
    assert torch.equal(rng, expected_rng)


# --- 3. derivatives at the auxiliary model: one draw for H and the cross term ------------


def dense_solve(matvec, b):
    """``H^{-1} b`` by a dense solve (H from matvec on the unit vectors), for any H."""
    sizes = [x.numel() for x in b]
    n = sum(sizes)
    columns = []
    for j in range(n):
        e = torch.zeros(n, dtype=DTYPE)
        e[j] = 1.0
        parts = list(e.split(sizes))
        columns.append(
            torch.cat(
                [
                    c.reshape(-1)
                    for c in matvec([p.reshape(x.shape) for p, x in zip(parts, b, strict=True)])
                ]
            )
        )
    h = torch.stack(columns, 1)
    x = torch.linalg.solve(h, torch.cat([t.reshape(-1) for t in b]))
    return [p.reshape(t.shape) for p, t in zip(x.split(sizes), b, strict=True)]


def at_the_auxiliary_model_by_hand(net, hyper, train, val, iters):
    """The LL run (its draws), then the UL loss (one draw), then the LL loss (one draw):
    ``grad_lambda F``, ``v = grad_w F``, ``grad_lambda f``, ``g = grad_w f`` (with its graph),
    the weights, the dense Hessian ``dg/dw``, and the RNG state left."""
    torch.manual_seed(SEED)
    w = unroll_by_hand(net, hyper, train, iters, graph_from=iters)[-1]
    w = [x.detach().requires_grad_() for x in w]
    at, lam = functional(net), hyper_params(hyper)
    ul = torch.autograd.grad(ul_terms(at(w), hyper, *val), [*lam, *w], allow_unused=True)
    ul = [torch.zeros_like(x) if d is None else d for x, d in zip([*lam, *w], ul, strict=True)]
    ll_loss = ll_terms(at(w), w, hyper, *train)
    f_lam = torch.autograd.grad(ll_loss, lam, retain_graph=True)
    g = torch.autograd.grad(ll_loss, w, create_graph=True)
    rows = [flat(torch.autograd.grad(gi, w, retain_graph=True)) for gi in flat(g)]
    return {
        "direct": list(ul[:2]),
        "v": list(ul[2:]),
        "f_lam": list(f_lam),
        "g": g,
        "w": w,
        "hessian": torch.stack(rows),
        "rng": torch.get_rng_state(),
    }


def flat(xs):
    return torch.cat([x.reshape(-1) for x in xs])


def unflat(vector, like):
    return [
        p.reshape(x.shape)
        for p, x in zip(vector.split([x.numel() for x in like]), like, strict=True)
    ]


def test_implicit_uses_one_draw_for_the_hessian_and_the_cross_term():
    """Implicit at the auxiliary model: the UL loss (one draw), then the LL gradient (one
    draw) whose graph gives both H and the cross term: the hand-written
    ``grad_lambda F - (d g / d lambda)^T H^{-1} v`` on those draws (a dense solve)."""
    train, val = data()
    iters = 4
    problem, net, hyper = problem_for(
        lambda n, h: Implicit(
            ul_objective, h, ll_objective, n, method=dense_solve, stationarity_warning=None
        ),
        iters,
    )
    grads, rng = seeded_hypergradient(problem, train, val)
    ref = at_the_auxiliary_model_by_hand(net, hyper, train, val, iters)
    q = unflat(torch.linalg.solve(ref["hessian"], flat(ref["v"])), ref["w"])
    cross = torch.autograd.grad(ref["g"], hyper_params(hyper), grad_outputs=q)
    close(grads, [d - c for d, c in zip(ref["direct"], cross, strict=True)], rtol=1e-9)
    assert torch.equal(rng, ref["rng"])


@pytest.mark.parametrize("name", ["iga", "dm"])
def test_iga_and_dm_use_one_draw_at_the_auxiliary_model(name):
    """IGA: ``grad_lambda F - c grad_lambda f``, ``c = <grad_w F, grad_w f> / ||grad_w f||^2``,
    with one LL draw for both gradients of f. DM's first step (``z_0 = 0``, a number eta):
    ``z_1 = eta v`` and the direction ``grad_lambda F - (d g / d lambda)^T z_1``, with one LL
    draw for g."""
    train, val = data()
    iters, eta = 4, 0.1
    make = {
        "iga": lambda n, h: IGA(ul_objective, h, ll_objective, n, converged_warning=None),
        "dm": lambda n, h: DM(ul_objective, h, ll_objective, n, eta=eta),
    }[name]
    problem, net, hyper = problem_for(make, iters)
    grads, rng = seeded_hypergradient(problem, train, val)
    ref = at_the_auxiliary_model_by_hand(net, hyper, train, val, iters)
    if name == "iga":
        g = flat(ref["g"]).detach()
        c = (flat(ref["v"]) @ g) / (g @ g)
        expected = [d - c * f for d, f in zip(ref["direct"], ref["f_lam"], strict=True)]
    else:
        z = [eta * x for x in ref["v"]]
        cross = torch.autograd.grad(ref["g"], hyper_params(hyper), grad_outputs=z)
        expected = [d - c for d, c in zip(ref["direct"], cross, strict=True)]
    close(grads, expected, rtol=1e-9)
    assert torch.equal(rng, ref["rng"])


# --- 4. checks draw nothing ------------------------------------------------------------


def ll_outputs(state):
    """``ll_objective`` split for Gauss-Newton products: the same draws in the same order."""
    model, hyper = state["ll_model"], state["ul_model"]
    x, y = _pair(state)
    noisy = x + NOISE * torch.randn_like(x)
    penalty = 0.5 * hyper.log_l2.exp() * sum((w**2).sum() for w in model.parameters())
    return model(noisy * hyper.scale), lambda z: ((z - y) ** 2).mean(), penalty


def test_gauss_newton_split_check_uses_one_draw_and_draws_nothing(monkeypatch):
    """StochasticImplicit(curvature="gauss_newton") checks ``output_loss(outputs) + rest ==
    ll_objective`` once per call. Under dropout both sides must see the same draws (else a
    correct split is refused), and the check must not move the global RNG: the result is
    the one without the check. A split that drops a term is still refused."""
    train, val = data()

    def make(outputs):
        return lambda n, h: StochasticImplicit(
            ul_objective,
            h,
            ll_objective,
            n,
            steps=3,
            curvature="gauss_newton",
            ll_outputs=outputs,
            solver_optimizer=lambda q: torch.optim.SGD(q, lr=0.05),
        )

    problem, _, _ = problem_for(make(ll_outputs))
    grads, rng = seeded_hypergradient(problem, train, val)  # no refusal
    unchecked, _, _ = problem_for(make(ll_outputs))
    monkeypatch.setattr(unchecked.ul, "_check_split", lambda *args: None)
    expected, expected_rng = seeded_hypergradient(unchecked, train, val)
    close(grads, expected, rtol=1e-12)
    assert torch.equal(rng, expected_rng)

    def no_penalty(state):
        outputs, loss, _ = ll_outputs(state)
        return outputs, loss, 0.0

    wrong, _, _ = problem_for(make(no_penalty))
    with pytest.raises(ValueError, match="does not split"):
        seeded_hypergradient(wrong, train, val)


def test_growth_warning_draws_nothing():
    """A growing LL loss with ``on_growth="warn"`` measures the curvature for its message
    (on that path only); the measurement must not draw from the global RNG, so that the
    run goes on as with ``on_growth="ignore"`` (a warning is a message, not a step)."""
    train, val = data()
    runs = []
    for policy in ("warn", "ignore"):
        problem, _, _ = problem_for(
            lambda n, h: Reverse(ul_objective, h, ll_objective, n),
            iters=3,
            on_growth=policy,
            growth_tolerance=0.0,
        )
        torch.manual_seed(SEED)
        grads = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(6):  # some runs grow (noise), the first one warns
                grads.append(problem.hypergradient(train, val))
        grown = [w for w in caught if "LL loss grew" in str(w.message)]
        runs.append((grads, torch.get_rng_state(), len(grown)))
    (warned, warn_rng, n_warned), (ignored, ignore_rng, _) = runs
    assert n_warned == 1  # the case is exercised
    for a, b in zip(warned, ignored, strict=True):
        close(a, b, rtol=0)
    assert torch.equal(warn_rng, ignore_rng)


# --- 5. an objective's eval() stays in that evaluation -----------------------------------


def ul_objective_eval(state):
    """Evaluate the UL loss in eval mode (no dropout), leaving the mode switched (the pattern
    tests/test_patched_models.py supports for batch norm)."""
    state["ll_model"].eval()
    return ul_objective(state)


def ul_objective_eval_restored(state):
    """The same, switching the patched model back to training mode afterwards."""
    model = state["ll_model"]
    model.eval()
    loss = ul_objective(state)
    model.train()
    return loss


METHODS_AFTER_UL = {
    "memory_saving_reverse": lambda ul, n, h: MemorySavingReverse(ul, h, ll_objective, n),
    "finite_difference": lambda ul, n, h: FiniteDifference(ul, h, ll_objective, n),
    "implicit": lambda ul, n, h: Implicit(
        ul, h, ll_objective, n, method=dense_solve, stationarity_warning=None
    ),
    "iga": lambda ul, n, h: IGA(ul, h, ll_objective, n, converged_warning=None),
    "dm": lambda ul, n, h: DM(ul, h, ll_objective, n, eta=0.1),
}


@pytest.mark.parametrize("name", list(METHODS_AFTER_UL))
def test_eval_mode_in_the_ul_objective_stays_in_it(name):
    """Methods that evaluate the LL objective after the UL loss (recomputed steps, w+-, the
    residual at the auxiliary model) do so in the LL run's mode (training: dropout on),
    whatever mode the UL objective left the patched model in: the result is the one with a
    UL objective that restores the mode itself."""
    train, val = data()
    iters = 1 if name == "finite_difference" else 3
    results = []
    for ul in (ul_objective_eval, ul_objective_eval_restored):
        problem, _, _ = problem_for(lambda n, h, ul=ul: METHODS_AFTER_UL[name](ul, n, h), iters)
        results.append(seeded_hypergradient(problem, train, val))
    (grads, rng), (expected, expected_rng) = results
    close(grads, expected, rtol=1e-12)
    assert torch.equal(rng, expected_rng)


# --- 6. hypergradient() draws as step() does ---------------------------------------------


def test_hypergradient_draws_as_a_step_does():
    """``hypergradient()`` from an RNG state equals the hypergradient ``step()`` takes from
    it, and consecutive calls draw anew (the masks are not frozen across calls): it is the
    next step's estimate, and it moves the global RNG as a step does."""
    train, val = data()
    problem, _, hyper = problem_for(lambda n, h: Reverse(ul_objective, h, ll_objective, n))
    first, rng = seeded_hypergradient(problem, train, val)
    second = problem.hypergradient(train, val)
    assert rel_error(second, first) > 1e-3
    torch.manual_seed(SEED)
    problem.step(train, val)  # lr 0: the UL parameters stay
    close([p.grad for p in hyper_params(hyper)], first, rtol=0)
    assert torch.equal(rng, torch.get_rng_state())


def test_eval_mode_in_bdas_ul_objective_stays_in_it():
    """BDA evaluates the UL objective inside every LL step: a UL objective that switches
    the patched model to eval mode must not turn dropout off for the LL steps after it (the
    run is the one with a UL objective that restores the mode itself)."""
    train, val = data()
    results = []
    for ul in (ul_objective_eval, ul_objective_eval_restored):
        net, hyper = Net(), Hyper()
        ll = BDA(
            ll_objective,
            net,
            hyper,
            lr=LR,
            iters=4,
            ul_objective=ul,
            alpha=0.3,
            alpha_decay=0.9,
            on_growth="ignore",
        )
        problem = BilevelProblem(ll, Reverse(ul, hyper, ll_objective, net))
        results.append(seeded_hypergradient(problem, train, val))
    (grads, rng), (expected, expected_rng) = results
    close(grads, expected, rtol=1e-12)
    assert torch.equal(rng, expected_rng)
