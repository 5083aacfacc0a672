"""A UL step that raises changes nothing: catching the error and stepping again is safe.

An objective raises in the middle of ``BilevelProblem.step`` (the LL objective at its first,
middle or last call of the step, the UL objective at its last, the second task of a
meta-batch after the first task's hypergradient was added, ``before_ul_step``, the UL
optimizer's step before it changed anything; a ``KeyboardInterrupt`` or the library's own
refusal of a NaN), for every method family. Afterwards, in float64:

- the UL parameters and their ``.grad``, the LL model, the UL optimizer's state, the
  method's state across UL steps (LL variables, multipliers, SABA's tables, samplers'
  generators and epochs, counters), its diagnostics, the last LL loss, the models' buffers
  (batch-norm running statistics) and torch's global generator are bitwise as before;
- no fast weight or graph stays on the user's modules (the same parameter objects, leaves,
  ``requires_grad`` as before);
- the step taken again, and one more, end bitwise where a twin problem that never failed
  ends (same process, same operations; the objectives draw from torch's global generator,
  dropout-like, so a step that failed must also leave the generator as it was).

Also: an error in the UL optimizer after it changed a UL parameter says so (that part cannot
be put back), an online run that raised resumes from its checkpoint bitwise, a hypergradient
query made from ``before_ul_step`` leaves the step as it was, and a skipped step
(``on_nonfinite="skip"``) leaves the models' buffers as they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, ridge
from torch import nn

from bilevel import BilevelProblem
from bilevel import ul as U
from bilevel.ll import BDA, GradientDescent
from bilevel.online import OnlineHypergradient

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


class Boom(Exception):
    """An error of the user's objective (a data error, an out-of-memory error, ...)."""


class Fault:
    """Counts the objectives' calls; once armed, the ``at``-th call of ``level`` raises
    ``error`` (or returns NaN, for ``error=None``)."""

    def __init__(self) -> None:
        self.arm(None, 0)

    def arm(self, level: str | None, at: int, error: BaseException | None = None) -> None:
        self.level, self.at, self.error = level, at, error
        self.calls = {"ll": 0, "ul": 0}

    def call(self, level: str, loss: torch.Tensor) -> torch.Tensor:
        self.calls[level] += 1
        if self.level != level or self.calls[level] != self.at:
            return loss
        if self.error is None:
            return loss * float("nan")
        raise self.error


FAULT = Fault()


def features(state: dict) -> torch.Tensor:
    norm = getattr(state["ul_model"], "norm", None)  # a UL model with running statistics
    return state["data"] if norm is None else norm(state["data"])


def ll_objective(state: dict) -> torch.Tensor:
    """Ridge's LL loss, with a small term drawn from torch's global generator."""
    w = state["ll_model"].w
    residual = state["ll_model"](features(state)) - state["target"]
    loss = 0.5 * (residual**2).mean() + state["ul_model"].penalty(state["ll_model"])
    loss = loss + 1e-3 * (torch.randn(w.shape, dtype=w.dtype) * w).sum()
    return FAULT.call("ll", loss)


def ul_objective(state: dict) -> torch.Tensor:
    residual = state["ll_model"](features(state)) - state["target"]
    loss = 0.5 * (residual**2).mean() + 1e-2 * (state["ul_model"].log_l2 ** 2).sum()
    return FAULT.call("ul", loss * (1 + 1e-3 * torch.rand((), dtype=loss.dtype)))


class NormedL2(FeatureL2):
    """Per-feature penalties and a batch norm of the data: buffers that every call moves."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.norm = nn.BatchNorm1d(d, affine=False, dtype=DTYPE)


Built = tuple[BilevelProblem, Callable[[], Any]]


def ridge_case(
    kind: Any, iters: int = 4, dynamics: str = "sgd", **options: Any
) -> Callable[[], Built]:
    def build() -> Built:
        p = ridge()
        ul_model = NormedL2(5) if dynamics == "batchnorm" else p.ul_model
        if dynamics == "bda":
            ll = BDA(
                ll_objective, p.ll_model, ul_model, 0.3, iters,
                ul_objective=ul_objective, alpha=0.5, alpha_decay=0.9,
            )  # fmt: skip
        elif dynamics == "adam":
            ll = GradientDescent(
                ll_objective, p.ll_model, ul_model, lr=0.05, iters=iters, optimizer="adam"
            )
        else:
            ll = GradientDescent(ll_objective, p.ll_model, ul_model, lr=0.3, iters=iters)
        ul = kind(ul_objective, ul_model, ll_objective, p.ll_model, **options)
        optimizer = torch.optim.Adam(ul_model.parameters(), lr=0.05)
        return BilevelProblem(ll, ul, optimizer), lambda: (p.train, p.val)

    return build


TASKS = 3


def meta_case(method: Any) -> Callable[[], Built]:
    """A meta-batch of 3 tasks; the UL variables are the LL's initial weights."""

    def loss(state: dict, level: str) -> torch.Tensor:
        residual = state["ll_model"](state["data"]) - state["target"]
        value = 0.5 * (residual**2).mean() * (1 + 1e-3 * torch.rand((), dtype=DTYPE))
        return FAULT.call(level, value)

    def build() -> Built:
        p = ridge(d=4, seed=3)
        net = Linear(4, torch.tensor([0.3, -0.1, 0.2, 0.05], dtype=DTYPE))
        ll_loss, ul_loss = functools.partial(loss, level="ll"), functools.partial(loss, level="ul")
        ll = GradientDescent(ll_loss, net, net, lr=0.2, iters=3)
        problem = BilevelProblem(
            ll, method(ul_loss, net, ll_loss, net), torch.optim.Adam(net.parameters(), lr=0.05)
        )
        (x, y), (xv, yv) = p.train, p.val
        batch = {
            "train": (x.reshape(TASKS, 20, 4), y.reshape(TASKS, 20)),
            "test": (xv.reshape(TASKS, 20, 4), yv.reshape(TASKS, 20)),
        }
        return problem, lambda: batch

    return build


CASES: dict[str, Callable[[], Built]] = {
    "reverse": ridge_case(U.Reverse),
    "reverse-batchnorm": ridge_case(U.Reverse, dynamics="batchnorm"),
    "truncated": ridge_case(U.Truncated, truncate_iter=2),
    "implicit-cg": ridge_case(U.Implicit, iters=20, ll_learning_rate=0.3, k=5, method="cg"),
    "forward": ridge_case(U.Forward, dynamics="adam"),
    "ptt": ridge_case(U.PTT),
    "finite_difference": ridge_case(U.FiniteDifference, iters=1),
    "memory_saving_reverse": ridge_case(U.MemorySavingReverse, dynamics="adam"),
    "iga": ridge_case(U.IGA, iters=3),
    "dm": ridge_case(U.DM, iters=1),
    "reverse-bda": ridge_case(U.Reverse, dynamics="bda"),
    "first_order-meta": meta_case(U.FirstOrder),
    "reptile-meta": meta_case(U.Reptile),
    "soba": ridge_case(U.SOBA, iters=1, batch_size=16),
    "saba": ridge_case(U.SABA, iters=1, batch_size=16),
    "stocbio": ridge_case(U.StocBiO, iters=3, neumann_steps=3, batch_size=16),
    "amigo": ridge_case(U.AmIGO, iters=3, batch_size=16),
    "stochastic_implicit": ridge_case(U.StochasticImplicit, iters=10, steps=4, batches=10),
    "bome": ridge_case(U.BOME),
    "f2sa": ridge_case(U.F2SA),
}


class Twin:
    """A problem with its own stream of torch's global generator (two problems in one
    process draw as two processes would)."""

    def __init__(self, name: str) -> None:
        self.problem, self.batch = CASES[name]()
        self.rng = torch.Generator().manual_seed(0).get_state()

    def step(self) -> None:
        torch.set_rng_state(self.rng)
        try:
            batch = self.batch()
            if isinstance(batch, dict):
                self.problem.meta_step(batch)
            else:
                self.problem.step(*batch)
        finally:
            self.rng = torch.get_rng_state()


@functools.cache
def calls_per_step(name: str) -> dict[str, int]:
    twin = Twin(name)
    twin.step()
    FAULT.arm(None, 0)
    twin.step()
    return dict(FAULT.calls)


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested state as ``{path: leaf}`` (tensors copied)."""
    if isinstance(value, dict):
        items = [(f"{prefix}/{key}", item) for key, item in value.items()]
    elif isinstance(value, list | tuple):
        items = [(f"{prefix}/{i}", item) for i, item in enumerate(value)]
    else:
        return {prefix: value.detach().clone() if isinstance(value, torch.Tensor) else value}
    return {k: v for path, item in items for k, v in leaves(item, path).items()}


def everything(twin: Twin) -> dict[str, Any]:
    """What a step may change: the problem's state (models with their buffers, the UL
    optimizer, counters, the method's state, RNG states), ``.grad``, diagnostics, the last
    LL loss, and the twin's stream of torch's global generator."""
    problem = twin.problem
    torch.set_rng_state(twin.rng)  # (what the problem's state records)
    state = leaves(problem.state_dict())
    state.update(leaves([p.grad for p in problem.ul_params], "/grad"))
    state.update(leaves(dict(problem.ul.diagnostics), "/diagnostics"))
    state["/last_ll_loss"] = problem.last_ll_loss
    return state


def modules(problem: BilevelProblem) -> list[Any]:
    """What a leftover fast weight or graph would change on the user's modules."""
    out = []
    for module in (problem.ul.ul_model, problem.ll.ll_model):
        out.append(sorted(module.__dict__))
        out += [(id(p), p.is_leaf, p.requires_grad, p.grad_fn) for p in module.parameters()]
        out += [None if p.grad is None else p.grad.grad_fn for p in module.parameters()]
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def assert_bitwise(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert expected.keys() == got.keys()
    different = [key for key, value in expected.items() if not _equal(value, got[key])]
    assert not different, different


WHERE = ["ll-first", "ll-middle", "ll-last", "ul-last", "second-task", "nan", "before_ul_step",
         "ul_optimizer"]  # fmt: skip


def raising(error: BaseException) -> Callable[..., None]:
    def call(*args: Any, **kwargs: Any) -> None:
        raise error

    return call


def arm(where: str, name: str, problem: BilevelProblem) -> type[BaseException]:
    """Make the next step of ``problem`` (case ``name``) fail at ``where``; return the type
    of error expected."""
    calls = calls_per_step(name)
    middle = max(1, calls["ll"] // 2)
    if where == "before_ul_step":
        problem.before_ul_step = raising(Boom(where))
    elif where == "ul_optimizer":  # before it changed anything
        problem.ul_optimizer.step = raising(Boom(where))
    elif where == "nan":  # the library's own refusal
        FAULT.arm("ll", middle)
        return FloatingPointError
    elif where == "ll-middle":  # Ctrl-C inside the LL run
        FAULT.arm("ll", middle, KeyboardInterrupt())
        return KeyboardInterrupt
    else:
        level, at = {
            "ll-first": ("ll", 1),
            "ll-last": ("ll", calls["ll"]),
            "ul-last": ("ul", calls["ul"]),
            "second-task": ("ll", calls["ll"] // TASKS + 1),
        }[where]
        FAULT.arm(level, at, Boom(where))
    return Boom


def disarm(problem: BilevelProblem) -> None:
    FAULT.arm(None, 0)
    problem.before_ul_step = None
    problem.ul_optimizer.__dict__.pop("step", None)


@pytest.mark.parametrize(
    ("name", "where"),
    [(n, w) for n in CASES for w in WHERE if w != "second-task" or n.endswith("-meta")],
)
def test_a_step_that_raises_changes_nothing_and_its_retry_is_the_step(name, where):
    failing, clean = Twin(name), Twin(name)
    for _ in range(2):  # state across steps, a UL optimizer with moments, a .grad
        failing.step()
        clean.step()
    before, attached = everything(failing), modules(failing.problem)
    expected = arm(where, name, failing.problem)
    with pytest.raises(expected) as raised:
        failing.step()
    disarm(failing.problem)
    assert not getattr(raised.value, "__notes__", None)  # nothing that could not be put back
    assert_bitwise(before, everything(failing))
    assert modules(failing.problem) == attached
    for _ in range(2):
        failing.step()
        clean.step()
        assert_bitwise(everything(clean), everything(failing))
    after = everything(failing)
    moved = {key.split("/")[1] for key, value in before.items() if not _equal(value, after[key])}
    assert "ul_model" in moved  # the control: the steps taken again moved the UL variables,
    if getattr(failing.problem.ul, "keeps_ll_state", False):  # and the LL variables kept
        assert "ll_model" in moved


class RaisesMidway(torch.optim.SGD):
    """An optimizer stopped after the update of its first parameter group."""

    def step(self, closure: Any = None) -> None:
        groups = self.param_groups
        self.param_groups = groups[:1]
        try:
            super().step(closure)
        finally:
            self.param_groups = groups
        raise KeyboardInterrupt


def test_an_error_in_the_ul_optimizer_after_it_moved_a_parameter_says_so():
    """That part of the step cannot be put back: the error says to load the checkpoint."""
    p = ridge()
    ul_model = nn.Module()
    ul_model.log_l2, ul_model.scale = p.ul_model.log_l2, nn.Parameter(torch.ones((), dtype=DTYPE))
    ul_model.penalty = lambda ll_model: ul_model.scale * p.ul_model.penalty(ll_model)
    ll = GradientDescent(ll_objective, p.ll_model, ul_model, lr=0.3, iters=3)
    ul = U.Reverse(ul_objective, ul_model, ll_objective, p.ll_model)
    optimizer = RaisesMidway([{"params": [ul_model.log_l2]}, {"params": [ul_model.scale]}], 0.1)
    problem = BilevelProblem(ll, ul, optimizer)
    FAULT.arm(None, 0)
    with pytest.raises(KeyboardInterrupt) as raised:
        problem.step(p.train, p.val)
    assert "Load the last checkpoint" in "".join(raised.value.__notes__)
    assert problem.step_count == 0


def test_an_online_run_that_raised_resumes_from_its_checkpoint_bitwise(tmp_path):
    """The UL objective raises at the second UL update; the same runner, run again with the
    same checkpoint, ends where a run that never failed ends."""

    def online() -> tuple[OnlineHypergradient, Any]:
        p = ridge()
        ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=0.3, iters=12)
        ul = U.Forward(ul_objective, p.ul_model, ll_objective, p.ll_model)
        runner = OnlineHypergradient(ll, ul, torch.optim.Adam(p.ul_model.parameters(), 0.05), 3)
        return runner, p

    def run(runner: OnlineHypergradient, p: Any, path: Any) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = runner.run(p.train, p.val, 12, progress=False, checkpoint=path,
                           checkpoint_every=1)  # fmt: skip
        return [*model.parameters(), *runner.ul.ul_model.parameters(), torch.get_rng_state()]

    FAULT.arm(None, 0)
    expected = run(*online(), tmp_path / "clean.pt")
    runner, p = online()
    FAULT.arm("ul", 2, Boom("update 2"))
    with pytest.raises(Boom):
        run(runner, p, tmp_path / "failed.pt")
    FAULT.arm(None, 0)
    got = run(runner, p, tmp_path / "failed.pt")
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(expected, got, strict=True))


@pytest.mark.parametrize("name", ["soba", "saba", "dm", "f2sa"])
def test_a_hypergradient_query_inside_a_step_leaves_the_step_as_it_was(name):
    """BUG (before the fix): a query (``problem.hypergradient``) made while a step holds the
    method's changes, from ``before_ul_step``, had its own changes held with the step's and
    applied after the UL step: the LL state and the step counter moved twice per UL step.
    The query changes nothing but the diagnostics, which are its own (and its draws of
    torch's generator, forked here)."""
    querying, clean = Twin(name), Twin(name)
    problem = querying.problem

    def query(params: list) -> None:
        with torch.random.fork_rng():
            problem.hypergradient(*querying.batch())

    problem.before_ul_step = query
    FAULT.arm(None, 0)
    for _ in range(3):
        querying.step()
        clean.step()
        expected, got = everything(clean), everything(querying)
        for state in (expected, got):
            for key in [k for k in state if k.startswith("/diagnostics/")]:
                del state[key]
        assert_bitwise(expected, got)


def test_a_skipped_step_puts_the_models_buffers_back():
    """BUG (before the fix): under ``on_nonfinite="skip"`` a batch with a NaN was skipped,
    but the batch-norm running statistics it had moved kept its NaN for good (every later
    step averages them in): the model gave NaN in eval mode. A skipped step leaves the
    buffers as they were; the next steps move them as usual."""
    twin = Twin("reverse-batchnorm")
    problem = twin.problem
    problem.on_nonfinite = "skip"
    FAULT.arm(None, 0)
    twin.step()
    buffers = [b.detach().clone() for b in problem.ul.ul_model.buffers()]
    (x, y), (xv, yv) = twin.batch()
    xv = xv.clone()
    xv[0, 0] = float("nan")
    assert problem.step((x, y), (xv, yv)).isnan() and problem.skipped_steps == 1
    after = list(problem.ul.ul_model.buffers())
    assert all(torch.equal(a, b) for a, b in zip(buffers, after, strict=True))
    twin.step()
    moved = list(problem.ul.ul_model.buffers())
    assert all(b.isfinite().all() for b in moved)
    assert not torch.equal(moved[0], buffers[0])
