"""Audit of the UL side of ``BilevelProblem``: UL optimizers with several param groups (weight
decay, a frozen group), ``.grad`` present before ``step``, hooks on UL parameters, UL
parameters frozen or unfrozen after the method was built, batch-norm buffers in the UL
objective, stateful methods (``hypergradient`` is what ``step`` applies), and an LR scheduler
resumed from a checkpoint. References are hand-written float64 unrolls and ``torch.optim``
used directly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel import ul as methods
from bilevel.ll import GradientDescent

DTYPE = torch.float64
LR = 0.5
ITERS = 10


class ShiftL2(nn.Module):
    """Per-feature L2 strengths around a learned centre, and a frozen parameter."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.linspace(-1.0, -0.5, d, dtype=DTYPE))
        self.shift = nn.Parameter(torch.linspace(0.1, -0.1, d, dtype=DTYPE))
        self.frozen = nn.Parameter(torch.ones(d, dtype=DTYPE), requires_grad=False)

    def penalty(self, ll_model: nn.Module) -> torch.Tensor:
        w = next(iter(ll_model.parameters()))
        return 0.5 * (self.log_l2.exp() * (w - self.shift) ** 2).sum()


def by_hand(ul: ShiftL2, p) -> list[torch.Tensor]:
    """Reverse through ``ITERS`` plain gradient steps from ``w = 0``, on plain tensors."""
    (x, y), (xv, yv) = p.train, p.val
    log_l2, shift = (t.detach().clone().requires_grad_() for t in (ul.log_l2, ul.shift))
    w = torch.zeros(x.shape[1], dtype=DTYPE, requires_grad=True)
    for _ in range(ITERS):
        f = 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (log_l2.exp() * (w - shift) ** 2).sum()
        (g,) = torch.autograd.grad(f, w, create_graph=True)
        w = w - LR * g
    return list(torch.autograd.grad(0.5 * ((xv @ w - yv) ** 2).mean(), [log_l2, shift]))


def groups(ul: ShiftL2, kind=torch.optim.AdamW) -> torch.optim.Optimizer:
    return kind(
        [
            {"params": [ul.log_l2], "lr": 0.05, "weight_decay": 0.1},
            {"params": [ul.shift], "lr": 0.02, "weight_decay": 0.0},
            {"params": [ul.frozen], "lr": 0.3, "weight_decay": 0.5},
        ]
    )


def build(method=methods.Reverse, optimizer=groups, **options):
    p = ridge()
    ul = ShiftL2()
    ll = GradientDescent(ridge_ll, p.ll_model, ul, lr=LR, iters=options.pop("iters", ITERS))
    upper = method(ridge_ul, ul, ridge_ll, p.ll_model, **options)
    return p, ul, BilevelProblem(ll, upper, optimizer(ul))


def test_param_groups_weight_decay_and_a_frozen_group_are_torch_optim_on_the_exact_hypergradient():
    p, ul, problem = build()
    twin = copy.deepcopy(ul)
    reference = groups(twin)
    frozen = ul.frozen.detach().clone()
    for _ in range(3):
        expected = by_hand(ul, p)
        assert min(float(e.abs().max()) for e in expected) > 1e-4
        got = problem.hypergradient(p.train, p.val)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        twin.log_l2.grad, twin.shift.grad = (e.clone() for e in expected)
        reference.step()
        problem.step(p.train, p.val)
        for a, b in ((ul.log_l2, twin.log_l2), (ul.shift, twin.shift)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    assert torch.equal(ul.frozen, frozen) and ul.frozen.grad is None
    assert set(problem.ul_optimizer.state) == {ul.log_l2, ul.shift}  # no Adam state for it


def test_a_grad_present_before_step_is_replaced_and_before_hypergradient_is_kept():
    p, ul, problem = build()
    _, twin, clean = build()
    junk = [torch.full_like(t, 5.0) for t in (ul.log_l2, ul.shift)]
    ul.log_l2.grad, ul.shift.grad = (j.clone() for j in junk)
    problem.hypergradient(p.train, p.val)
    assert all(torch.equal(t.grad, j) for t, j in zip((ul.log_l2, ul.shift), junk, strict=True))
    for _ in range(2):
        problem.step(p.train, p.val)
        clean.step(p.train, p.val)
        ul.shift.grad = junk[1].clone()  # a leftover between steps
    assert torch.equal(ul.log_l2, twin.log_l2) and torch.equal(ul.shift, twin.shift)


@pytest.mark.parametrize("name", ["Reverse", "Implicit", "Forward", "FiniteDifference"])
def test_a_linear_hook_on_a_ul_parameter_scales_what_step_applies(name):
    options = {"ll_learning_rate": LR, "k": 20} if name == "Implicit" else {}

    def sgd(ul):
        return torch.optim.SGD([ul.log_l2, ul.shift], lr=0.1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FiniteDifference's one-step approximation
        p, ul, problem = build(getattr(methods, name), sgd, **options)
        plain = problem.hypergradient(p.train, p.val)
        ul.log_l2.register_hook(lambda g: 3.0 * g)
        before = [t.detach().clone() for t in (ul.log_l2, ul.shift)]
        problem.step(p.train, p.val)
    moved = [(b - t.detach()) / 0.1 for b, t in zip(before, (ul.log_l2, ul.shift), strict=True)]
    torch.testing.assert_close(moved[0], 3.0 * plain[0], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(moved[1], plain[1], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", ["BOME", "F2SA", "AmIGO", "DM", "StocBiO"])
def test_hypergradient_of_a_stateful_method_is_what_step_applies_and_changes_nothing(name):
    def sgd(ul):
        return torch.optim.SGD([ul.log_l2, ul.shift], lr=0.1)

    p, ul, problem = build(getattr(methods, name), sgd)
    _, twin, alone = build(getattr(methods, name), sgd)
    for k in range(3):
        torch.manual_seed(k)
        got = problem.hypergradient(p.train, p.val)
        before = [t.detach().clone() for t in (ul.log_l2, ul.shift)]
        torch.manual_seed(k)
        problem.step(p.train, p.val)
        torch.manual_seed(k)
        alone.step(p.train, p.val)
        for g, b, t in zip(got, before, (ul.log_l2, ul.shift), strict=True):
            torch.testing.assert_close(b - 0.1 * g, t.detach(), rtol=1e-13, atol=1e-15)
        assert torch.equal(ul.log_l2, twin.log_l2) and torch.equal(ul.shift, twin.shift)
    assert float(ul.log_l2.grad.abs().max()) > 1e-4  # not a vacuous zero


def test_a_scheduler_resumed_with_the_checkpoint_continues_bitwise(tmp_path):
    def make():
        p, ul, problem = build(optimizer=lambda ul: groups(ul, torch.optim.Adam))
        return p, ul, problem, torch.optim.lr_scheduler.StepLR(problem.ul_optimizer, 2, 0.5)

    p, ul, problem, scheduler = make()
    for k in range(5):
        if k == 3:
            problem.save_checkpoint(tmp_path / "run.pt")
            torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
        problem.step(p.train, p.val)
        scheduler.step()
    _, resumed_ul, resumed, resumed_scheduler = make()
    resumed.load_checkpoint(tmp_path / "run.pt")
    resumed_scheduler.load_state_dict(torch.load(tmp_path / "scheduler.pt"))
    for _ in range(2):
        resumed.step(p.train, p.val)
        resumed_scheduler.step()
    assert [g["lr"] for g in resumed.ul_optimizer.param_groups] == [0.0125, 0.005, 0.075]
    assert torch.equal(resumed_ul.log_l2, ul.log_l2) and torch.equal(resumed_ul.shift, ul.shift)


# ------------------------------------------------------------------ bugs found by this audit


def test_a_ul_parameter_unfrozen_after_the_method_was_built_is_refused():
    """FOUND: ``shift`` frozen at construction, unfrozen later (a warm-up schedule), was
    silently never moved: ``step`` gave it no hypergradient (``.grad`` None) and no error."""
    ul = ShiftL2()
    ul.shift.requires_grad_(False)  # frozen when the method is built
    p2 = ridge()
    ll = GradientDescent(ridge_ll, p2.ll_model, ul, lr=LR, iters=ITERS)
    upper = methods.Reverse(ridge_ul, ul, ridge_ll, p2.ll_model)
    problem = BilevelProblem(ll, upper, groups(ul))
    ul.shift.requires_grad_(True)
    shift = ul.shift.detach().clone()
    with pytest.raises(ValueError, match=r"\['shift'\] were unfrozen"):
        problem.step(p2.train, p2.val)
    assert torch.equal(ul.shift, shift)


@pytest.mark.parametrize("name", ["BOME", "F2SA", "StocBiO", "SOBA"])
def test_a_ul_parameter_frozen_after_build_is_refused_clearly_by_stateful_methods(name):
    """FOUND: methods with their own ``task_gradients`` raised autograd's raw "One of the
    differentiated Tensors does not require grad" (calculators say what happened)."""
    p, ul, problem = build(getattr(methods, name), iters=1 if name == "SOBA" else ITERS)
    ul.shift.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['shift'\] were frozen"):
        problem.step(p.train, p.val)


class NormalizedFeatures(ShiftL2):
    """A UL model whose UL objective normalizes the validation inputs (batch norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(5, affine=False, momentum=0.3).to(DTYPE)


def normalized_ul(state: dict) -> torch.Tensor:
    residual = state["ll_model"](state["ul_model"].bn(state["data"])) - state["target"]
    return 0.5 * (residual**2).mean()


def bn_problem(name: str):
    p = ridge()
    ul = NormalizedFeatures()
    ll = GradientDescent(ridge_ll, p.ll_model, ul, lr=LR, iters=ITERS)
    upper = getattr(methods, name)(normalized_ul, ul, ridge_ll, p.ll_model)
    return p, ul, BilevelProblem(ll, upper, torch.optim.SGD([ul.log_l2, ul.shift], lr=0.1))


@pytest.mark.parametrize("name", ["Reverse", "PTT"])
def test_batch_norm_in_the_ul_objective_moves_its_statistics_once_per_ul_step(name):
    """FOUND (PTT): the running statistics moved ITERS + 1 = 11 times per UL step (once per
    iterate compared), not once: with momentum 0.3 after one step the running mean is
    1 - 0.7**11 = 98% of the batch mean instead of 30%."""
    p, ul, problem = bn_problem(name)
    problem.step(p.train, p.val)
    assert int(ul.bn.num_batches_tracked) == 1
    batch_mean = p.val[0].mean(0)
    torch.testing.assert_close(ul.bn.running_mean, 0.3 * batch_mean, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["Reverse", "PTT"])
def test_hypergradient_leaves_the_ul_models_buffers_unchanged(name):
    """FOUND: ``hypergradient`` (a query: parameters and ``.grad`` are left as they were)
    moved the UL model's batch-norm running statistics, so monitoring the hypergradient
    changes the trained model's eval-mode outputs."""
    p, ul, problem = bn_problem(name)
    before = copy.deepcopy(ul.bn.state_dict())
    problem.hypergradient(p.train, p.val)
    after = ul.bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_complex_ul_parameter_with_a_real_ll_model_is_named_as_the_dtype_mix():
    """It was refused with a message about the data's dtype ("train[0] has dtype float64 but
    the models have complex128"): the parameters' dtypes were compared only among real ones."""
    p = ridge(n=20, d=3)
    p.ul_model.log_l2 = nn.Parameter(p.ul_model.log_l2.detach().to(torch.complex128))
    mix = r"log_l2 has dtype torch\.complex128 but ll_model\.w has torch\.float64"
    with pytest.raises(ValueError, match=mix):
        GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3)
