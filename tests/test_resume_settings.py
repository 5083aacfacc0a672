"""Checkpoint settings cover every setting that changes a run: the LL update rule's
hyperparameters besides lr (momentum, dampening, weight decay, betas, eps, alpha, lr_decay,
...), BDA's aggregation, and UL method settings (Implicit's power iterations with
alpha="auto", StochasticImplicit's solver optimizer and scheduler). A resume with another
value is refused and the message names the setting; a resume with the same value continues
bit for bit; checkpoints in the settings format of before (defaults only) still load."""

from __future__ import annotations

import re

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem, checkpoint
from bilevel.ll import BDA, GradientDescent, rules
from bilevel.ul import DM, Implicit, Reverse, StochasticImplicit

LR = 0.1
ITERS = 5


def _sgd_solver(momentum):
    return lambda q: torch.optim.SGD(q, lr=0.1, momentum=momentum)


def _step_scheduler(gamma):
    return lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=gamma)


def make(ll=None, bda=None, ul="reverse", ul_options=None, ll_lr=LR, ll_iters=ITERS):
    """A small float64 ridge problem: LL options ``ll`` (GradientDescent's, or BDA's with
    ``bda``), the UL method ``ul`` with ``ul_options``, an SGD UL optimizer."""
    p = ridge(n=30, d=3)
    ll_options = dict(ll or {})
    if bda is not None:
        lower = BDA(ridge_ll, p.ll_model, p.ul_model, ll_lr, ll_iters, ul_objective=ridge_ul, **bda)
    else:
        lower = GradientDescent(ridge_ll, p.ll_model, p.ul_model, ll_lr, ll_iters, **ll_options)
    options = dict(ul_options or {})
    if ul == "reverse":
        upper = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    elif ul == "implicit":
        upper = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **options)
    else:
        upper = StochasticImplicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **options)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.05)
    return p, BilevelProblem(lower, upper, optimizer)


def params(p):
    return [t.detach().clone() for t in (*p.ul_model.parameters(), *p.ll_model.parameters())]


def run(p, problem, steps):
    for _ in range(steps):
        problem.step(p.train, p.val)


# (key named in the refusal, options saved, options resumed with); options are make()'s
CASES = {
    "sgd momentum": ("ll_momentum", {"ll": {"momentum": 0.9}}, {"ll": {"momentum": 0.5}}),
    "sgd momentum to default": ("ll_momentum", {"ll": {"momentum": 0.9}}, {}),
    "sgd dampening": (
        "ll_dampening",
        {"ll": {"optimizer": rules.sgd(momentum=0.9, dampening=0.1)}},
        {"ll": {"optimizer": rules.sgd(momentum=0.9, dampening=0.2)}},
    ),
    "sgd weight decay": (
        "ll_weight_decay",
        {"ll": {"optimizer": rules.sgd(weight_decay=0.01)}},
        {"ll": {"optimizer": rules.sgd(weight_decay=0.02)}},
    ),
    "nesterov momentum": (
        "ll_momentum",
        {"ll": {"optimizer": "nesterov", "momentum": 0.8}},
        {"ll": {"optimizer": "nesterov", "momentum": 0.7}},
    ),
    "adam beta1": (
        "ll_beta1",
        {"ll": {"optimizer": "adam", "betas": (0.8, 0.999)}},
        {"ll": {"optimizer": "adam", "betas": (0.7, 0.999)}},
    ),
    "adam beta2": (
        "ll_beta2",
        {"ll": {"optimizer": "adam", "betas": (0.9, 0.99)}},
        {"ll": {"optimizer": "adam", "betas": (0.9, 0.9)}},
    ),
    "adam eps": (
        "ll_eps",
        {"ll": {"optimizer": "adam", "eps": 1e-6}},
        {"ll": {"optimizer": "adam", "eps": 1e-7}},
    ),
    "adamw weight decay": (
        "ll_weight_decay",
        {"ll": {"optimizer": rules.adamw(weight_decay=0.05)}},
        {"ll": {"optimizer": "adamw"}},
    ),
    "rmsprop alpha": (
        "ll_alpha",
        {"ll": {"optimizer": rules.rmsprop(alpha=0.9)}},
        {"ll": {"optimizer": rules.rmsprop(alpha=0.8)}},
    ),
    "adagrad lr_decay": (
        "ll_lr_decay",
        {"ll": {"optimizer": rules.adagrad(lr_decay=0.1)}},
        {"ll": {"optimizer": rules.adagrad(lr_decay=0.2)}},
    ),
    "adagrad initial accumulator": (
        "ll_initial_accumulator_value",
        {"ll": {"optimizer": rules.adagrad(initial_accumulator_value=0.1)}},
        {"ll": {"optimizer": rules.adagrad(initial_accumulator_value=0.2)}},
    ),
    "bda alpha": (
        "ll_bda_alpha",
        {"bda": {"alpha": 0.5, "alpha_decay": 0.9}},
        {"bda": {"alpha": 0.4, "alpha_decay": 0.9}},
    ),
    "bda alpha_decay": (
        "ll_bda_alpha_decay",
        {"bda": {"alpha": 0.5, "alpha_decay": 0.9}},
        {"bda": {"alpha": 0.5, "alpha_decay": 0.8}},
    ),
    "bda ul_scale": (
        "ll_bda_ul_scale",
        {"bda": {"alpha": 0.5, "alpha_decay": 0.9, "ul_scale": 2.0}},
        {"bda": {"alpha": 0.5, "alpha_decay": 0.9}},
    ),
    "bda alpha with rmsprop": (
        "ll_bda_alpha",
        {"bda": {"alpha": 0.5, "alpha_decay": 1.0, "optimizer": rules.rmsprop(alpha=0.9)}},
        {"bda": {"alpha": 0.3, "alpha_decay": 1.0, "optimizer": rules.rmsprop(alpha=0.9)}},
    ),
    "implicit power_iters": (
        "power_iters",
        {
            "ul": "implicit",
            "ul_options": {"method": "neumann", "alpha": "auto", "power_iters": 10, "k": 5},
            "ll_iters": 20,
        },
        {
            "ul": "implicit",
            "ul_options": {"method": "neumann", "alpha": "auto", "power_iters": 15, "k": 5},
            "ll_iters": 20,
        },
    ),
    "stochastic implicit solver optimizer": (
        "solver_optimizer",
        {"ul": "stochastic", "ul_options": {"solver_optimizer": _sgd_solver(0.9), "steps": 8}},
        {"ul": "stochastic", "ul_options": {"solver_optimizer": _sgd_solver(0.5), "steps": 8}},
    ),
    "stochastic implicit solver scheduler": (
        "solver_scheduler",
        {"ul": "stochastic", "ul_options": {"solver_scheduler": _step_scheduler(0.5), "steps": 8}},
        {"ul": "stochastic", "ul_options": {"solver_scheduler": _step_scheduler(0.9), "steps": 8}},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_another_value_is_refused(case, tmp_path):
    key, saved_options, resumed_options = CASES[case]
    p, problem = make(**saved_options)
    run(p, problem, 2)
    path = tmp_path / "ckpt.pt"
    problem.save_checkpoint(path)
    q, resumed = make(**resumed_options)
    before = params(q)
    with pytest.raises(ValueError, match=r"other settings \(.*" + re.escape(key) + ":"):
        resumed.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(before, params(q), strict=True))
    assert resumed.step_count == 0


@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_the_same_value_is_bitwise(case, tmp_path):
    _, options, _ = CASES[case]
    p, problem = make(**options)
    run(p, problem, 4)
    expected = params(p)

    q, first = make(**options)
    run(q, first, 2)
    path = tmp_path / "ckpt.pt"
    first.save_checkpoint(path)
    r, resumed = make(**options)
    resumed.load_checkpoint(path)
    run(r, resumed, 2)
    got = params(r)
    assert resumed.step_count == 4
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    # the run moved: a resume that restored nothing would not match
    assert not all(torch.equal(a, b) for a, b in zip(params(make(**options)[0]), got, strict=True))


def _previous_format(problem):
    """The settings as the code before this change wrote them (its ``_settings``)."""

    def plain(value):
        if isinstance(value, int | float | str | bool | type(None)):
            return value
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, torch.Tensor):
            return value.item() if value.numel() == 1 else f"tensor{list(value.shape)}"
        return type(value).__name__

    ul, ll, opt = problem.ul, problem.ll, problem.ul_optimizer
    return {
        "ul": ul.name,
        "ul_calculator": {k: plain(v) for k, v in ul.settings().items()},
        "ul_parameters": {
            n: list(t.shape) for n, t in ul.ul_model.named_parameters() if t.requires_grad
        },
        "ll_iters": ll.iters,
        "ll_optimizer": ll.optimizer,
        "ll_lr": plain(ll.lr),
        "ul_optimizer": [type(opt).__name__]
        + [{k: plain(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


COMPATIBLE = {
    "plain sgd, reverse": {},
    "plain sgd given as a rule, implicit": {
        "ll": {"optimizer": rules.sgd()},
        "ul": "implicit",
        "ul_options": {"k": 5},
        "ll_iters": 20,
    },
    "adam defaults": {"ll": {"optimizer": "adam"}},
    "bda at alpha 0": {"bda": {"alpha": 0.0, "alpha_decay": 1.0}},
    "stochastic implicit defaults": {"ul": "stochastic", "ul_options": {"steps": 8}},
    "implicit neumann auto, default power_iters": {
        "ul": "implicit",
        "ul_options": {"method": "neumann", "alpha": "auto", "k": 5},
        "ll_iters": 20,
    },
}


@pytest.mark.parametrize("case", list(COMPATIBLE))
def test_checkpoint_in_the_previous_settings_format_loads(case, tmp_path):
    options = COMPATIBLE[case]
    p, problem = make(**options)
    run(p, problem, 2)
    state = problem.state_dict()
    old = _previous_format(problem)
    # the settings the previous code wrote, exactly: no key that it lacked
    assert set(old) == set(state["settings"])
    state["settings"] = old
    checkpoint.save(tmp_path / "old.pt", state)  # the writer save_checkpoint uses
    q, resumed = make(**options)
    resumed.load_checkpoint(tmp_path / "old.pt")
    assert resumed.step_count == 2
    assert all(torch.equal(a, b) for a, b in zip(params(p), params(q), strict=True))


def test_refusal_names_a_default_on_the_other_side(tmp_path):
    _, problem = make(ll={"momentum": 0.9})
    path = tmp_path / "ckpt.pt"
    problem.save_checkpoint(path)
    _, resumed = make()
    with pytest.raises(ValueError, match=re.escape("ll_momentum: 0.9 -> (default)")):
        resumed.load_checkpoint(path)
    # strict=False still loads it (the user's explicit choice)
    resumed.load_checkpoint(path, strict=False)


def _dm_problem():
    """A ridge problem whose method (DM) carries a multiplier across UL steps, with Adam on
    the UL variables (moments carried across UL steps too)."""
    p = ridge(n=30, d=3)
    lower = GradientDescent(ridge_ll, p.ll_model, p.ul_model, LR, 2)
    upper = DM(ridge_ul, p.ul_model, ridge_ll, p.ll_model, eta=0.3)
    optimizer = torch.optim.Adam(p.ul_model.parameters(), lr=0.05)
    return p, BilevelProblem(lower, upper, optimizer)


@pytest.mark.parametrize(
    ("part", "named"),
    [("method", "the state of DM"), ("ul_optimizer", "the UL optimizer's state (Adam)")],
)
def test_a_state_without_what_the_run_carries_is_refused(part, named, tmp_path):
    """A checkpoint lacking the method's state or the UL optimizer's state (written by hand,
    or by other code) used to load silently and restart them: the resumed run then left the
    uninterrupted one (DM's multiplier from zero, Adam's moments from zero)."""
    p, problem = _dm_problem()
    run(p, problem, 3)
    state = problem.state_dict()
    state[part] = None
    path = tmp_path / "partial.pt"
    checkpoint.save(path, state)
    q, resumed = _dm_problem()
    with pytest.raises(ValueError, match=re.escape(named)):
        resumed.load_checkpoint(path)
    # strict=False starts the missing part afresh, on the user's word: the run then differs
    resumed.load_checkpoint(path, strict=False)
    run(p, problem, 2)
    run(q, resumed, 2)
    assert not all(torch.equal(a, b) for a, b in zip(params(p), params(q), strict=True))


def test_a_complete_state_of_a_stateful_method_resumes_bitwise(tmp_path):
    p, problem = _dm_problem()
    run(p, problem, 3)
    problem.save_checkpoint(tmp_path / "full.pt")
    q, resumed = _dm_problem()
    resumed.load_checkpoint(tmp_path / "full.pt")
    run(p, problem, 2)
    run(q, resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(params(p), params(q), strict=True))


# --- a UL learning-rate scheduler ------------------------------------------------------


def _scheduled(kind="step"):
    """The ridge problem with Adam on the UL variables and a scheduler of it."""
    p = ridge(n=30, d=3)
    lower = GradientDescent(ridge_ll, p.ll_model, p.ul_model, LR, ITERS)
    upper = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    optimizer = torch.optim.Adam(p.ul_model.parameters(), lr=0.05)
    if kind == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t))
    return p, BilevelProblem(lower, upper, optimizer, ul_scheduler=scheduler)


@pytest.mark.parametrize("kind", ["step", "lambda"])
def test_a_ul_scheduler_steps_once_per_ul_step_as_torch_loop_does(kind):
    """BilevelProblem(..., ul_scheduler=) steps it after every UL step, as a hand-written
    loop of torch.optim does (the same trajectory, bit for bit)."""
    p, problem = _scheduled(kind)
    q, reference = _scheduled(kind)  # its problem only computes the hypergradients
    for _ in range(5):
        problem.step(p.train, p.val)
        grads = reference.hypergradient(q.train, q.val)
        for param, g in zip(reference.ul_params, grads, strict=True):
            param.grad = g
        reference.ul_optimizer.step()
        reference.ul_scheduler.step()
    assert (
        problem.ul_optimizer.param_groups[0]["lr"] == reference.ul_optimizer.param_groups[0]["lr"]
    )
    assert all(torch.equal(a, b) for a, b in zip(params(p), params(q), strict=True))
    if kind == "step":  # 0.05 halved after steps 2 and 4
        assert problem.ul_optimizer.param_groups[0]["lr"] == 0.05 / 4


def test_a_ul_scheduler_resumes_with_the_checkpoint(tmp_path):
    """The schedule continues where it was: 2 + 3 steps through a checkpoint are the 5 steps
    of one run, bit for bit (before, a scheduler stepped by hand restarted on resume)."""
    p, straight = _scheduled()
    run(p, straight, 5)
    q, first = _scheduled()
    run(q, first, 2)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    r, resumed = _scheduled()
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    run(r, resumed, 3)
    assert resumed.ul_optimizer.param_groups[0]["lr"] == straight.ul_optimizer.param_groups[0]["lr"]
    assert all(torch.equal(a, b) for a, b in zip(params(p), params(r), strict=True))


def test_a_checkpoint_without_the_schedulers_state_is_refused(tmp_path):
    p, problem = _scheduled()
    run(p, problem, 2)
    state = problem.state_dict()
    state["ul_scheduler"] = None
    checkpoint.save(tmp_path / "partial.pt", state)
    _, resumed = _scheduled()
    with pytest.raises(ValueError, match=re.escape("the UL scheduler's state (StepLR)")):
        resumed.load_checkpoint(tmp_path / "partial.pt")


def test_a_scheduler_of_another_optimizer_or_on_a_metric_is_refused():
    p = ridge(n=30, d=3)
    lower = GradientDescent(ridge_ll, p.ll_model, p.ul_model, LR, ITERS)
    upper = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.05)
    other = torch.optim.SGD(p.ul_model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="must schedule the ul_optimizer"):
        BilevelProblem(
            lower, upper, optimizer, ul_scheduler=torch.optim.lr_scheduler.StepLR(other, 2)
        )
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(TypeError, match="ReduceLROnPlateau steps on a metric"):
        BilevelProblem(lower, upper, optimizer, ul_scheduler=plateau)
