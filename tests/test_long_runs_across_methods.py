"""Long runs and interruptions, across every hypergradient method (float64, ridge).

What only shows over many UL steps or across a stop:

- resume: k UL steps, ``state_dict()`` through a checkpoint file, new objects built the same
  way (models, LL, method, Adam UL optimizer) with another global RNG state, then the rest:
  UL and LL weights, the method's state (LL variables, multipliers, samplers' generators,
  SABA's tables) and the optimizer's state end bitwise where an uninterrupted run ends; also
  through ``BilevelProblem.run(checkpoint=...)`` after a crash, and after a skipped step;
- flat memory: over windows of 15 UL steps (or online updates), with ``hypergradient``,
  ``state_dict`` and log records between them, no Python object accumulates (``gc``, by
  type: tensors included) nor do the autograd nodes reachable from live tensors, and no
  autograd graph outlives the UL step that made it;
- ``hypergradient()`` between steps changes nothing: the same trajectory, bitwise;
- what a long run moves: a step size that is a UL variable is checked at every run (as the
  value of a callable is), an LL step size assigned mid-run is not silently ignored, and a
  refused first SABA step does not poison its memory.

Tested against: the uninterrupted run (bitwise), object counts (exact), the callable form
of the same step size (its check), and the state before a refused step.
"""

from __future__ import annotations

import collections
import copy
import gc
import itertools
import re
import types
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from problems import DTYPE, ridge, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel import checkpoint as ckpt
from bilevel import ul as U
from bilevel.ll import BDA, FixedPointMap, GradientDescent
from bilevel.online import OnlineHypergradient

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # stationarity notes


# --- the problems -------------------------------------------------------------------------


def ul_objective(state: dict) -> torch.Tensor:
    """Ridge's validation loss plus a small direct term in the UL variables (so that
    ``Alternating``, which follows ``grad_x F`` only, has a direction)."""
    return ridge_ul(state) + 1e-2 * (state["ul_model"].log_l2 ** 2).sum()


def fixed_point_map(state: dict) -> list[torch.Tensor]:
    """A gradient step on ridge's LL plus a small skew term: a contraction that is not a
    gradient step (its Jacobian is not symmetric)."""
    x, y = state["data"], state["target"]
    w = state["ll_model"].w
    grad = x.T @ (x @ w - y) / len(x) + state["ul_model"].log_l2.exp() * w
    return [w - 0.3 * grad + 0.02 * (torch.roll(w, 1) - torch.roll(w, -1))]


def constraint(state: dict) -> torch.Tensor:
    """GAFFO's LL constraint ``w <= 0.3`` (elementwise)."""
    return state["ll_model"].w - 0.3


def ridge_problem(
    dynamics: str = "sgd", iters: int = 6, method: Any = U.Reverse, **options: Any
) -> tuple[BilevelProblem, Any]:
    """A ridge problem driven by ``method`` over LL ``dynamics``, with Adam as UL optimizer."""
    p = ridge()
    ll_model, ul_model, f = p.ll_model, p.ul_model, ridge_ll
    if dynamics == "sgd":
        ll = GradientDescent(f, ll_model, ul_model, lr=0.3, iters=iters)
    elif dynamics == "momentum":
        ll = GradientDescent(f, ll_model, ul_model, lr=0.15, iters=iters, momentum=0.5)
    elif dynamics == "adam":
        ll = GradientDescent(f, ll_model, ul_model, lr=0.05, iters=iters, optimizer="adam")
    elif dynamics == "bda":
        ll = BDA(
            f, ll_model, ul_model, 0.3, iters, ul_objective=ul_objective, alpha=0.5, alpha_decay=0.9
        )
    else:
        f = fixed_point_map
        ll = FixedPointMap(f, ll_model, ul_model, iters=iters)
    ul = method(ul_objective, ul_model, f, ll_model, **options)
    optimizer = torch.optim.Adam(ul_model.parameters(), lr=0.05)
    return BilevelProblem(ll, ul, optimizer), p


class MetaSGD(nn.Module):
    """The initialization, a learned step size per weight (Li et al. 2017) and an L2 penalty."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.log_lr = nn.Parameter(torch.full_like(net.w.detach(), -1.5))
        self.log_l2 = nn.Parameter(torch.full_like(net.w.detach(), -1.0))

    def penalty(self, ll_model: nn.Module) -> torch.Tensor:
        w = next(iter(ll_model.parameters()))
        return 0.5 * (self.log_l2.exp() * w * w).sum()


def meta_sgd(method: Any = U.Reverse) -> tuple[BilevelProblem, Any]:
    """Meta-SGD: initial weights, per-element step sizes and the penalty learned together."""
    p = ridge()
    meta = MetaSGD(p.ll_model)
    ll = GradientDescent(ridge_ll, p.ll_model, meta, lr=[lambda u: u.log_lr.exp()], iters=4)
    ul = method(ul_objective, meta, ridge_ll, p.ll_model)
    return BilevelProblem(ll, ul, torch.optim.Adam(meta.parameters(), lr=0.05)), p


def reptile() -> tuple[BilevelProblem, Any]:
    p = ridge()
    net = p.ll_model

    def task(state: dict) -> torch.Tensor:
        return 0.5 * (state["ll_model"](state["data"]) - state["target"]).pow(2).mean()

    ll = GradientDescent(task, net, net, lr=0.1, iters=3)
    ul = U.Reptile(task, net, task, net)
    return BilevelProblem(ll, ul, torch.optim.Adam(net.parameters(), lr=0.05)), p


def _with(cls: Any, **options: Any) -> Callable[..., Any]:
    return lambda *args: cls(*args, **options)


CASES: dict[str, Callable[[], tuple[BilevelProblem, Any]]] = {
    "reverse-sgd": lambda: ridge_problem("sgd"),
    "reverse-momentum": lambda: ridge_problem("momentum"),
    "reverse-adam": lambda: ridge_problem("adam"),
    "reverse-bda": lambda: ridge_problem("bda"),
    "reverse-fixed_point_map": lambda: ridge_problem("fixed_point"),
    "truncated-momentum": lambda: ridge_problem(
        "momentum", method=_with(U.Truncated, truncate_iter=3)
    ),
    "truncated-bda": lambda: ridge_problem("bda", method=_with(U.Truncated, truncate_iter=3)),
    **{
        f"implicit-{solver}": (
            lambda solver=solver: ridge_problem("sgd", 30, _with(U.Implicit, k=8, method=solver))
        )
        for solver in ("cg", "minres", "neumann", "fixed_point", "normal_cg")
    },
    "implicit-cg-damping": lambda: ridge_problem("sgd", 30, _with(U.Implicit, k=8, damping=0.1)),
    "implicit-neumann-auto": lambda: ridge_problem(
        "sgd", 30, _with(U.Implicit, k=8, method="neumann", alpha="auto")
    ),
    "implicit-fixed_point_map": lambda: ridge_problem(
        "fixed_point", 30, _with(U.Implicit, k=8, method="fixed_point")
    ),
    "forward-adam": lambda: ridge_problem("adam", method=U.Forward),
    "forward-momentum": lambda: ridge_problem("momentum", method=U.Forward),
    "memory_saving_reverse-adam": lambda: ridge_problem("adam", method=U.MemorySavingReverse),
    "first_order": lambda: ridge_problem("sgd", method=U.FirstOrder),
    "ptt-sgd": lambda: ridge_problem("sgd", method=U.PTT),
    "ptt-bda": lambda: ridge_problem("bda", method=U.PTT),
    "finite_difference": lambda: ridge_problem("sgd", 1, U.FiniteDifference),
    "iga": lambda: ridge_problem("sgd", 3, U.IGA),
    "dm-auto": lambda: ridge_problem("sgd", 1, U.DM),
    "dm-eta": lambda: ridge_problem("sgd", 1, _with(U.DM, eta=0.3)),
    "dm-bda": lambda: ridge_problem("bda", 1, U.DM),
    "stochastic_implicit": lambda: ridge_problem(
        "sgd", 30, _with(U.StochasticImplicit, steps=6, batches=20)
    ),
    "stochastic_implicit-momentum-scheduler": lambda: ridge_problem(
        "sgd",
        30,
        _with(
            U.StochasticImplicit,
            steps=6,
            batches=20,
            solver_optimizer=lambda q: torch.optim.SGD(q, lr=0.2, momentum=0.5),
            solver_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
        ),
    ),
    "bome": lambda: ridge_problem("sgd", 4, U.BOME),
    "bome-schedule": lambda: ridge_problem("sgd", 4, _with(U.BOME, lr_y=lambda k: 0.3 / (1 + k))),
    "pbgd-value": lambda: ridge_problem("sgd", 4, _with(U.PBGD, gamma_growth=0.5)),
    "pbgd-gradient": lambda: ridge_problem("sgd", 4, _with(U.PBGD, penalty="gradient")),
    "bvfim": lambda: ridge_problem("sgd", 4, U.BVFIM),
    "meso": lambda: ridge_problem("sgd", 4, U.MESO),
    "gaffo-constrained": lambda: ridge_problem("sgd", 4, _with(U.GAFFO, ll_constraints=constraint)),
    "f2sa": lambda: ridge_problem("sgd", 4, U.F2SA),
    "alternating": lambda: ridge_problem("sgd", 4, U.Alternating),
    "soba": lambda: ridge_problem("sgd", 1, _with(U.SOBA, batch_size=16)),
    "soba-uniform": lambda: ridge_problem(
        "sgd", 1, _with(U.SOBA, sampler=U.Sampler(16, 20, seed=3, order="uniform"))
    ),
    "saba": lambda: ridge_problem("sgd", 1, _with(U.SABA, batch_size=16)),
    "saba-zero": lambda: ridge_problem("sgd", 1, _with(U.SABA, batch_size=16, memory_init="zero")),
    "stocbio": lambda: ridge_problem("sgd", 3, _with(U.StocBiO, neumann_steps=3, batch_size=16)),
    "amigo": lambda: ridge_problem("sgd", 3, _with(U.AmIGO, batch_size=16)),
    "reptile": reptile,
    "meta_sgd-reverse": meta_sgd,
    "meta_sgd-forward": lambda: meta_sgd(U.Forward),
    "meta_sgd-memory_saving_reverse": lambda: meta_sgd(U.MemorySavingReverse),
}

#: the methods that keep state across UL steps (what the checkpoint's "method" holds)
STATEFUL = [
    name
    for name in CASES
    if name.split("-")[0]
    in {"dm", "stochastic_implicit", "bome", "pbgd", "bvfim", "meso", "gaffo", "f2sa"}
    | {"alternating", "soba", "saba", "stocbio", "amigo"}
]


def draws_its_own_minibatches(problem: BilevelProblem) -> bool:
    return hasattr(problem.ul, "sampler")


def batches(problem: BilevelProblem, p: Any) -> Callable[[int], Any]:
    """Random LL minibatches from torch's global generator (so that a resume must restore
    it); the stochastic methods get the full data and draw their own."""

    def batch(step: int) -> Any:
        if draws_its_own_minibatches(problem):
            return p.train, p.val
        index = torch.randint(0, len(p.train[0]), (40,))
        return (p.train[0][index], p.train[1][index]), p.val

    return batch


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested state as ``{path: leaf}``."""
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in leaves(item, f"{prefix}/{key}").items()
        }
    if isinstance(value, list | tuple):
        return {
            k: v for i, item in enumerate(value) for k, v in leaves(item, f"{prefix}/{i}").items()
        }
    return {prefix: value.detach().clone() if isinstance(value, torch.Tensor) else value}


def snapshot(problem: BilevelProblem) -> dict[str, Any]:
    """Everything a run carries on: UL and LL models, the UL optimizer's state, counters, the
    method's state (not the global RNG, which the data draws move)."""
    state = problem.state_dict()
    del state["rng"]
    return leaves(state)


def assert_bitwise(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, got[key]), (key, value, got[key])
        else:
            assert value == got[key], (key, value, got[key])


def fresh(name: str) -> tuple[Any, Any, Any]:
    """Case ``name`` built from the same global RNG state: ``(problem, p, data)``."""
    torch.manual_seed(0)
    problem, p = CASES[name]()
    return problem, p, batches(problem, p)


def stepped(name: str, steps: int) -> tuple[Any, Any, Any]:
    """:func:`fresh`, then ``steps`` UL steps."""
    problem, p, data = fresh(name)
    for step in range(steps):
        problem.step(*data(step))
    return problem, p, data


# --- (a) resume bitwise -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_a_resumed_run_ends_bitwise_where_an_uninterrupted_one_does(name, tmp_path):
    """4 UL steps straight, or 2, the state through a checkpoint file, new objects (another
    global RNG state), the state loaded, 2 more: bitwise the same everything."""
    expected = snapshot(stepped(name, 4)[0])

    problem, p, data = stepped(name, 2)
    halfway = snapshot(problem)
    ckpt.save(tmp_path / "state.pt", problem.state_dict())
    torch.manual_seed(123)  # a new process starts from other states
    problem, p = CASES[name]()
    problem.load_state_dict(ckpt.load(tmp_path / "state.pt"))
    data = batches(problem, p)
    for step in range(2, 4):
        problem.step(*data(step))
    got = snapshot(problem)
    assert_bitwise(expected, got)
    # the control: the two last steps moved the UL weights (the comparison can fail)
    moved = [
        k for k, v in halfway.items() if k.startswith("/ul_model") and not torch.equal(v, got[k])
    ]
    assert moved


class Crash(Exception):
    pass


@pytest.mark.parametrize("name", [*STATEFUL, "reverse-bda", "meta_sgd-reverse"])
def test_run_resumes_bitwise_from_its_checkpoint_after_a_crash(name, tmp_path):
    """``run(checkpoint=...)``: a crash at step 3 (checkpoints every 2 steps), then the same
    command in new objects: bitwise the uninterrupted 5 steps."""
    torch.manual_seed(0)
    problem, p = CASES[name]()
    problem.run(batches(problem, p), 5, progress=False)
    expected = snapshot(problem)

    def crashing(problem, p):
        data = batches(problem, p)

        def batch(step):
            if step == 3:
                raise Crash
            return data(step)

        return batch

    path = tmp_path / "run.pt"
    torch.manual_seed(0)
    problem, p = CASES[name]()
    with pytest.raises(Crash):
        problem.run(crashing(problem, p), 5, checkpoint=path, checkpoint_every=2, progress=False)
    assert ckpt.load(path)["step"] == 2
    torch.manual_seed(7)
    problem, p = CASES[name]()
    problem.run(batches(problem, p), 5, checkpoint=path, checkpoint_every=2, progress=False)
    assert_bitwise(expected, snapshot(problem))


@pytest.mark.parametrize("name", ["dm-auto", "bome", "gaffo-constrained", "soba", "amigo"])
def test_a_skipped_step_then_a_resume_stays_bitwise(name, tmp_path):
    """A refused step (NaN validation targets, ``on_nonfinite="skip"``) changes nothing but
    the counters (and moves a sampler): resumed before or after it, the run ends bitwise."""

    def data(p, step):
        if step == 1:
            return p.train, (p.val[0], torch.full_like(p.val[1], float("nan")))
        return p.train, p.val

    def build():
        problem, p = CASES[name]()
        problem.on_nonfinite = "skip"
        return problem, p

    problem, p = build()
    for step in range(4):
        problem.step(*data(p, step))
    assert problem.skipped_steps == 1
    expected = snapshot(problem)
    for stop in (1, 2):
        problem, p = build()
        for step in range(stop):
            problem.step(*data(p, step))
        ckpt.save(tmp_path / "state.pt", problem.state_dict())
        problem, p = build()
        problem.load_state_dict(ckpt.load(tmp_path / "state.pt"))
        for step in range(stop, 4):
            problem.step(*data(p, step))
        assert_bitwise(expected, snapshot(problem))


# --- (c) hypergradient() between steps ----------------------------------------------------


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("stochastic_implicit")])
def test_hypergradient_between_steps_changes_nothing(name):
    """Two ``hypergradient`` calls before every step: they agree, leave the state, ``.grad``
    and the global RNG as they were, and the run is bitwise the run of steps alone.
    (``StochasticImplicit`` is left out: a query draws new minibatches from its generator, as
    from the global RNG; ``tests/test_bad_input_review.py`` checks that.)"""
    expected = snapshot(stepped(name, 3)[0])

    problem, _, data = fresh(name)
    for step in range(3):
        train, val = data(step)
        before = snapshot(problem)
        grads = [None if q.grad is None else q.grad.clone() for q in problem.ul_params]
        rng = torch.get_rng_state()
        first = problem.hypergradient(train, val)
        second = problem.hypergradient(train, val)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        assert torch.equal(rng, torch.get_rng_state())
        assert_bitwise(before, snapshot(problem))
        for q, g in zip(problem.ul_params, grads, strict=True):
            assert (g is None and q.grad is None) or torch.equal(g, q.grad)
        problem.step(train, val)
    assert_bitwise(expected, snapshot(problem))


# --- (b) flat memory ----------------------------------------------------------------------


def census() -> tuple[collections.Counter, int]:
    """The Python objects alive, by type (tensors and parameters included), and the number
    of autograd nodes reachable from every live tensor that has a graph."""
    gc.collect()
    objects = gc.get_objects()
    counts = collections.Counter(type(o).__name__ for o in objects)
    # type(), not isinstance(): the latter reads __class__, which warns on some lazy objects
    stack = [t.grad_fn for t in objects if issubclass(type(t), torch.Tensor)]
    del objects
    seen: set = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return counts, len(seen)


def growth(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
    """What grew, leaving out the census's own results (Counters) alive in the caller."""
    return {k: after[k] - before[k] for k in after if after[k] > before[k] and k != "Counter"}


def assert_flat(counts: list[collections.Counter], nodes: list[int]) -> None:
    """Steady state over the windows between successive counts (after a warm-up): what grows
    at every step grows in every window, while a one-off (a cache filled once, by torch or
    by Python) grows in one: no type may grow in two windows, the last window adds at most
    two objects and no tensor, and the live autograd nodes stay as many."""
    windows = [growth(a, b) for a, b in itertools.pairwise(counts[1:])]
    assert not set(windows[0]) & set(windows[1]), windows
    last = windows[-1]
    assert sum(last.values()) <= 2 and not {"Tensor", "Parameter"} & set(last), windows
    assert len(set(nodes[1:])) == 1, nodes


FLAT = [
    "reverse-adam",
    "reverse-fixed_point_map",
    "truncated-bda",
    "implicit-cg",
    "implicit-neumann-auto",
    "forward-adam",
    "memory_saving_reverse-adam",
    "ptt-bda",
    "finite_difference",
    "iga",
    "dm-auto",
    "stochastic_implicit-momentum-scheduler",
    "bvfim",
    "gaffo-constrained",
    "saba",
    "amigo",
    "reptile",
    "meta_sgd-forward",
]


@pytest.mark.parametrize("name", FLAT)
def test_nothing_accumulates_over_many_ul_steps(name):
    """After a warm-up, three windows of 15 UL steps (each with a ``hypergradient`` call, a
    checkpoint's ``state_dict`` and a log record): no Python object of any type accumulates,
    and the autograd nodes reachable from live tensors do not grow."""
    problem, p = CASES[name]()

    def steps(n):
        for _ in range(n):
            problem.hypergradient(p.train, p.val)
            loss = problem.step(p.train, p.val)
            problem.state_dict()
            problem.log_record(loss)

    counts, nodes = [], []  # (not a list of pairs: each pair would be a new object)
    for n in (5, 15, 15, 15):
        steps(n)
        objects, graph = census()
        counts.append(objects)
        nodes.append(graph)
    assert_flat(counts, nodes)


@pytest.mark.parametrize(
    ("method", "rule"),
    [
        (U.Forward, "sgd"),
        (U.Forward, "momentum"),
        (U.Truncated, "adam"),
        (U.Truncated, "momentum"),
    ],
)
def test_an_online_run_keeps_nothing_from_its_earlier_updates(method, rule):
    """RTHO and online truncated reverse with a step size computed from the UL model: over
    three windows of 15 UL updates (after 10), no Python object accumulates and the live
    autograd graph does not grow."""
    p = ridge()
    ul = LearnedRate(5)
    options = {"momentum": 0.5} if rule == "momentum" else {}
    if rule == "adam":
        options = {"optimizer": "adam"}
    lr = (lambda u: 0.2 * u.rate) if rule != "adam" else (lambda u: 0.05 * u.rate)
    ll = GradientDescent(ridge_ll, p.ll_model, ul, lr=lr, iters=1, **options)
    calculator = method(
        ridge_ul,
        ul,
        ridge_ll,
        p.ll_model,
        **({"truncate_iter": 5} if method is U.Truncated else {}),
    )
    runner = OnlineHypergradient(ll, calculator, torch.optim.Adam(ul.parameters(), lr=0.01), 5)
    counts, nodes = [], []  # (not a list of pairs: each pair would be a new object)

    def log(record):
        if record["ul_step"] in (10, 25, 40, 55):
            objects, graph = census()
            counts.append(objects)
            nodes.append(graph)

    runner.run(p.train, p.val, ll_steps=275, log=log, progress=False)
    assert len(counts) == 4
    assert_flat(counts, nodes)


class LearnedRate(nn.Module):
    """Per-feature L2 penalties and a learned factor of the LL step size."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.full((d,), -1.0, dtype=DTYPE))
        self.rate = nn.Parameter(torch.tensor(1.0, dtype=DTYPE))

    def penalty(self, ll_model: nn.Module) -> torch.Tensor:
        return 0.5 * (self.log_l2.exp() * ll_model.w**2).sum()


def graphs_held(root: Any) -> list[str]:
    """Paths from ``root`` (through attributes, dicts, lists and closures) to tensors that
    hold an autograd graph."""
    seen = {id(root)}
    queue = collections.deque([(root, "problem")])
    found = []
    while queue:
        obj, path = queue.popleft()
        if isinstance(obj, torch.Tensor):
            if obj.grad_fn is not None:
                found.append(path)
            continue
        if isinstance(obj, type | types.ModuleType):
            continue
        if isinstance(obj, types.FunctionType):
            items = [(c.cell_contents, f"{path}.<closure>") for c in obj.__closure__ or ()]
        elif isinstance(obj, dict):
            items = [(v, f"{path}[{k!r}]") for k, v in obj.items()]
        elif isinstance(obj, list | tuple | set):
            items = [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__"):
            items = [(v, f"{path}.{k}") for k, v in vars(obj).items()]
            slots = getattr(type(obj), "__slots__", ())
            items += [(getattr(obj, k, None), f"{path}.{k}") for k in slots]
        else:
            continue
        for value, where in items:
            if id(value) not in seen and not isinstance(value, str | int | float | type(None)):
                seen.add(id(value))
                queue.append((value, where))
    return found


@pytest.mark.parametrize(
    "name", ["reverse-sgd", "reverse-bda", "truncated-momentum", "ptt-sgd", "meta_sgd-reverse"]
)
def test_no_ll_graph_outlives_its_ul_step(name):
    """Between UL steps nothing the problem holds keeps an autograd graph: the LL graph
    lives only for the UL step that needs it (docs/robustness.md, "Long runs: flat
    memory"). PTT back-propagates only through the steps up to the iterate it picks, so
    a graph kept past the step holds the activations of every later LL step."""
    problem, p = CASES[name]()
    for _ in range(3):
        problem.step(p.train, p.val)
    assert graphs_held(problem) == []
    problem.hypergradient(p.train, p.val)
    assert graphs_held(problem) == []


# --- what a long run moves ----------------------------------------------------------------


class StepSizes(nn.Module):
    """Learned LL step sizes, one per weight (Meta-SGD's form), or one for all."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.lrs = nn.Parameter(torch.full(shape, 0.1, dtype=DTYPE))
        self.register_buffer("l2", torch.full((5,), 0.3, dtype=DTYPE))

    def penalty(self, ll_model: nn.Module) -> torch.Tensor:
        return 0.5 * (self.l2 * ll_model.w**2).sum()


@pytest.mark.parametrize("shape", [(5,), ()], ids=["per_element", "scalar"])
@pytest.mark.parametrize("given_as", ["callable", "tensor"])
def test_a_learned_step_size_the_ul_steps_drive_below_zero_is_refused(shape, given_as):
    """A UL variable used as the LL step size moves at every UL step: once the UL steps
    have driven it out of (0, inf), the next LL run refuses it (one number) or says so
    (per element: Meta-SGD's step sizes may turn negative, test_meta_sgd.py), whether it is
    given as the tensor itself or as a callable returning it (checked at every run). Given
    as the tensor it was checked at construction only: per element, the next UL steps ran
    on with a negative step size and no word; as one number, the growth check fired,
    advising a step size below 1.13 for a step size of -0.0002."""
    p = ridge()
    ul = StepSizes(shape)
    lr = ul.lrs if given_as == "tensor" else (lambda u: u.lrs)
    x, y = p.train
    way = torch.sign((x.T @ y)[0])  # the way the LL moves w[0] from 0 (its first gradient)

    def against_first_weight(state: dict) -> torch.Tensor:
        """Grows as the LL moves ``w[0]``: its gradient in the step size is about constant
        and positive, so the UL steps lower the step size at a steady pace, through zero."""
        return way * state["ll_model"].w[0]

    ll = GradientDescent(ridge_ll, p.ll_model, ul, lr=[lr] if shape else lr, iters=4)
    problem = BilevelProblem(
        ll,
        U.Reverse(against_first_weight, ul, ridge_ll, p.ll_model),
        torch.optim.SGD([ul.lrs], lr=1e-3),
    )
    steps = 0
    while steps < 200 and not bool((ul.lrs <= 0).any()):
        problem.step(p.train, p.val)
        steps += 1
    assert 5 < steps < 200, steps  # the UL steps moved it there, over many of them
    # refused (ValueError, as a callable's value is) or at least said (a warning); not run
    # silently, nor blamed on a step size too large (the growth check's advice)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            problem.step(p.train, p.val)
        except ValueError as error:
            assert shape == (), error  # per element: said, not refused
            assert re.search(r"lr .*must lie in \(0\.0, inf\)", str(error)), error
            return
    said = [str(w.message) for w in caught if re.search(r"lr .*\(0\.0, inf\)", str(w.message))]
    assert said, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ["reverse-sgd", "implicit-cg", "soba", "f2sa"])
def test_an_ll_step_size_assigned_mid_run_is_used_or_refused(name):
    """``ll.lr = 0.1`` between UL steps either takes effect (the next step is that of a
    problem built with ``lr=0.1`` from the same state) or is refused; silently running on
    with the old step size is neither (SOBA and F2SA read ``ll.lr`` at every step, the
    methods that run ``GradientDescent`` used its copy checked at construction)."""
    problem, p = CASES[name]()
    problem.step(p.train, p.val)
    state = copy.deepcopy(problem.state_dict())  # (it shares storage with the live run)
    try:
        problem.ll.lr = 0.1
    except (AttributeError, TypeError, ValueError):
        return  # refused: fine
    problem.step(p.train, p.val)
    with_new_lr, q = CASES[name]()
    with_new_lr.load_state_dict(state)
    rebuilt = type(with_new_lr.ll)(
        with_new_lr.ll.ll_objective, q.ll_model, q.ul_model, lr=0.1, iters=with_new_lr.ll.iters
    )
    with_new_lr.ll = rebuilt
    with_new_lr.step(q.train, q.val)
    assert_bitwise(snapshot(with_new_lr), snapshot(problem))


def test_a_refused_first_saba_step_leaves_no_nan_in_its_memory():
    """SABA fills its memory at its first step: a refused first step (NaN validation
    targets, skipped) must leave it as it was, not filled with NaN, which refuses every
    later step: a long run under ``on_nonfinite="skip"`` then skips all its steps."""
    problem, p = CASES["saba"]()
    problem.on_nonfinite = "skip"
    problem.step(p.train, (p.val[0], torch.full_like(p.val[1], float("nan"))))
    assert problem.skipped_steps == 1
    memory = problem.ul.state_dict()["memory"]
    tensors = [t for t in leaves(memory).values() if isinstance(t, torch.Tensor)]
    assert all(bool(torch.isfinite(t).all()) for t in tensors)
    before = p.ul_model.log_l2.detach().clone()
    for _ in range(5):
        problem.step(p.train, p.val)
    assert problem.skipped_steps == 1
    assert not torch.equal(before, p.ul_model.log_l2.detach())
