"""The lean one-step DARTS path (issue: within 1.1x of a hand-written loop per UL step): what
it works out once and reuses across UL steps (the patched copy's attributes, the finite
differences' layout and step sizes, a leaf module's training flag) follows every change, and
a UL step runs few library calls."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from problems import DTYPE, FeatureL2, ridge, ridge_ll, ridge_ul
from torch import nn

import bilevel
from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference

LR = 0.3
PACKAGE = str(Path(bilevel.__file__).parent)


def library_calls(step) -> int:
    """Python frames entered in the ``bilevel`` package during ``step()``."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            count += 1

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return count


def test_a_one_step_darts_ul_step_runs_few_library_calls():
    """A UL step of one-step DARTS (BilevelProblem.step: checks, one LL step, the finite
    differences, the UL optimizer) enters at most 167 Python frames of the library (187
    before the lean path, 149 with it, 153 later, 162 once a step that raises puts
    everything back, 164 with the models' buffers listed without ``buffers()``'s generators,
    which costs less time, 166 with the check of the method against the LL optimizer that
    every run_ll makes, by hand too (one frame, about 0.5 us), 167 with the runner's check of
    the two levels made by that one method rather than a twin of it inline; a hand-written
    torch loop enters none): a guard against the per-step overhead creeping back."""
    p = ridge(seed=1)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=1)
    fd = FiniteDifference(ridge_ul, p.ul_model, ridge_ll, p.ll_model, r=1e-3)
    problem = BilevelProblem(ll, fd, torch.optim.SGD(p.ul_model.parameters(), lr=0.0))
    for _ in range(3):  # what is worked out once
        problem.step(p.train, p.val)
    assert library_calls(lambda: problem.step(p.train, p.val)) <= 167


class Scaled(nn.Module):
    """``scale * (x @ w)``: a plain attribute that an objective reads."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=DTYPE))
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x @ self.w)


def test_the_patched_copy_takes_the_users_attributes_however_they_changed():
    """Between runs: an attribute changed on the user's module, one added to it, one that an
    objective set on the patched copy or deleted from it: each run sees the user's module
    as it is, as a freshly patched copy would (the same hypergradient as a new problem)."""
    p = ridge(seed=2)
    model, hyper = Scaled(5), FeatureL2(5)
    seen: list[float] = []

    def ll_objective(state):
        seen.append(state["ll_model"].scale)
        residual = state["ll_model"](state["data"]) - state["target"]
        return 0.5 * (residual**2).mean() + state["ul_model"].penalty(state["ll_model"])

    def ul_objective(state):
        model_now = state["ll_model"]
        residual = model_now(state["data"]) - state["target"]
        if getattr(model_now, "tamper", False):  # what a careless objective could do
            model_now.scale = 7.0
            del model_now.tamper
        return 0.5 * (residual**2).mean()

    def hypergradient(problem_model: nn.Module, fresh: bool) -> torch.Tensor:
        ll = GradientDescent(ll_objective, problem_model, hyper, lr=LR, iters=1)
        fd = FiniteDifference(ul_objective, hyper, ll_objective, problem_model, r=1e-3)
        problem = BilevelProblem(ll, fd) if fresh else shared
        return problem.hypergradient(p.train, p.val)[0]

    shared = BilevelProblem(
        GradientDescent(ll_objective, model, hyper, lr=LR, iters=1),
        FiniteDifference(ul_objective, hyper, ll_objective, model, r=1e-3),
    )
    for change in ("none", "scale", "added", "tampered", "after tampering"):
        if change == "scale":
            model.scale = 0.5
        elif change == "added":
            model.extra = "an attribute added between runs"
        elif change == "tampered":
            model.tamper = True
        seen.clear()
        got = hypergradient(model, fresh=False)
        if change == "tampered":  # (within the step the copy is what the objective made it)
            del model.tamper  # the user's own attribute goes too
            continue
        assert all(s == model.scale for s in seen), (change, seen)
        torch.testing.assert_close(got, hypergradient(model, fresh=True), rtol=0, atol=0)
    assert model.scale == 0.5  # nothing leaked into the user's module


def test_the_finite_differences_follow_a_new_set_of_trainable_weights_and_step_sizes():
    """The layout of the trainable weights (where the UL parameters that are initial weights
    sit among them) and the step sizes are worked out once per set: freezing an LL weight
    ahead of an initial weight, or another LL optimizer with another step size, gives what
    a new FiniteDifference gives."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, dtype=DTYPE), torch.randn(40, dtype=DTYPE)
    xv, yv = torch.randn(40, 3, dtype=DTYPE), torch.randn(40, dtype=DTYPE)

    class ThreePart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.randn((), dtype=DTYPE))
            self.w = nn.Parameter(torch.randn(3, dtype=DTYPE))
            self.b = nn.Parameter(torch.randn((), dtype=DTYPE))

        def forward(self, data: torch.Tensor) -> torch.Tensor:
            return data @ self.w + self.a + self.b

    class DecayAndStart(nn.Module):
        """The L2 penalty, and the LL's initial bias ``b`` (a UL variable too)."""

        def __init__(self, model: ThreePart) -> None:
            super().__init__()
            self.log_l2 = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))
            self.b = model.b

    model = ThreePart()
    hyper = DecayAndStart(model)

    def ll_objective(state):
        m = state["ll_model"]
        fit = 0.5 * ((m(state["data"]) - state["target"]) ** 2).mean()
        return fit + 0.5 * state["ul_model"].log_l2.exp() * m.w.pow(2).sum()

    def ul_objective(state):
        return 0.5 * ((state["ll_model"](state["data"]) - state["target"]) ** 2).mean()

    kept = FiniteDifference(ul_objective, hyper, ll_objective, model, r=1e-3)
    for lr, frozen in ((0.2, False), (0.2, True), (0.05, True), (0.05, False)):
        model.a.requires_grad_(not frozen)  # b moves from the third trainable weight to the second
        ll = GradientDescent(ll_objective, model, hyper, lr=lr, iters=1)
        fresh = FiniteDifference(ul_objective, hyper, ll_objective, model, r=1e-3)
        got = BilevelProblem(ll, kept).hypergradient((x, y), (xv, yv))
        expected = BilevelProblem(ll, fresh).hypergradient((x, y), (xv, yv))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_leaf_ll_model_switched_to_eval_by_the_ul_objective_is_back_in_training_mode():
    """A module without children keeps its one training flag: the UL objective's ``.eval()``
    holds for that evaluation only, the finite-difference points see the LL run's mode, and
    the next UL step too."""
    p = ridge(seed=3)
    modes: list[bool] = []

    def ll_objective(state):
        modes.append(state["ll_model"].training)
        return ridge_ll(state)

    def ul_objective(state):
        state["ll_model"].eval()
        return ridge_ul(state)

    ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=LR, iters=1)
    fd = FiniteDifference(ul_objective, p.ul_model, ll_objective, p.ll_model, r=1e-3)
    problem = BilevelProblem(ll, fd)
    for _ in range(2):
        problem.hypergradient(p.train, p.val)
    assert modes == [True] * 6  # per UL step: the LL step and the two points
    assert p.ll_model.training
