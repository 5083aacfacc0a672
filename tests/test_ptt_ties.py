"""PTT's round-off ties must not override a genuine worst iterate: an LL that converges fast
to a point far from the origin moves, from its first iterate to its last, less than ``T``
times the per-step round-off floor of ``||w||`` in float32, while each of its first steps
moves far more than that floor. The worst iterate is the first; a hand-written PTT gives it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import PTT

D, ITERS, LR = 16, 100, 0.5


class Centre(nn.Module):
    """The UL variable ``c``: the LL pulls its weights towards it."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = nn.Parameter(c.clone())


class Weights(nn.Module):
    """The LL weights, started at ``w0``."""

    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w0.clone())


def ll_objective(state: dict) -> torch.Tensor:
    """``1/2 ||w - c||^2``: each step halves ``w - c`` at lr 0.5."""
    return 0.5 * ((state["ll_model"].w - state["ul_model"].c) ** 2).sum()


def ul_objective(state: dict) -> torch.Tensor:
    """``1/2 ||w - a||^2`` with ``a`` (the target) where ``c`` starts: largest at the first
    iterate, falling by 4x per step after it."""
    return 0.5 * ((state["ll_model"].w - state["target"]) ** 2).sum()


def hand_ptt(c0: torch.Tensor, w0: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Unroll by hand, back-propagate from the iterate with the largest UL loss."""
    c = c0.clone().requires_grad_()
    w, losses = w0.clone(), []
    for _ in range(ITERS):
        w = w - LR * (w - c)
        losses.append(0.5 * ((w - a) ** 2).sum())
    chosen = int(torch.stack([v.detach() for v in losses]).argmax())
    (grad,) = torch.autograd.grad(losses[chosen], c)
    return grad, chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ptt_keeps_a_worst_first_iterate_of_a_fast_converging_ll(dtype):
    generator = torch.Generator().manual_seed(0)
    c0 = torch.randn(D, generator=generator, dtype=dtype)
    c0 = c0 / c0.norm()  # ||w|| about 1
    away = torch.randn(D, generator=generator, dtype=dtype)
    w0 = c0 + 1e-3 * away / away.norm()
    expected, chosen = hand_ptt(c0, w0, c0)
    assert chosen == 0
    # the setting, in float32: from the first iterate on, the LL travels less than T - 1
    # per-step floors (100 eps ||w||), while its first step there moves 10x more than one
    floor = 100 * torch.finfo(torch.float32).eps
    assert (w0 - c0).norm() / 2 < (ITERS - 1) * floor < 10 * (w0 - c0).norm() / 4
    ll_model, ul_model = Weights(w0), Centre(c0)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=LR, iters=ITERS)
    ptt = PTT(ul_objective, ul_model, ll_objective, ll_model)
    (grad,) = BilevelProblem(ll, ptt).hypergradient((None, None), (None, c0.clone()))
    assert ptt.diagnostics["ptt_step"] == 1
    # the hand unroll rounds w_1 as the library does, or one ulp apart where a fused
    # multiply-add differs between CPUs: 2e-4 relative per entry of w_1 - a in float32
    # (4e-13 in float64); the step T gives a hypergradient of round-off, far outside it
    rtol = 1e-2 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(grad, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("block", [1, 40, 1 << 22])
def test_step_lengths_are_the_norms_of_consecutive_differences(block):
    """PTT's step lengths, computed over stacked blocks of flattened iterates, are
    ``||w_{k+1} - w_k||`` over all the tensors of an iterate: for several tensors of other
    shapes, complex ones among them, and blocks of one pair, of three (the last of two) and
    of all."""
    from bilevel.ul.ptt import step_lengths

    g = torch.Generator().manual_seed(0)
    iterates = [
        [
            torch.randn(3, 2, generator=g, dtype=torch.float64),
            torch.randn(4, generator=g, dtype=torch.complex128),
        ]
        for _ in range(9)
    ]
    expected = torch.stack(
        [
            torch.sqrt(sum(((a - b).abs() ** 2).sum() for a, b in zip(after, before, strict=True)))
            for before, after in itertools.pairwise(iterates)
        ]
    )
    lengths = step_lengths(iterates, block=block)
    assert lengths.shape == (8,)
    assert lengths.dtype == torch.float64
    torch.testing.assert_close(lengths, expected, rtol=1e-12, atol=0)
