"""PTT's UL losses at the iterates, when the UL objective draws at random at some of them
only: the generators' state is captured before each evaluation only once the first
evaluation is seen to draw, and an objective that starts drawing later is compared again
from where the comparisons started. Each case is pinned against a hand-written PTT on the
same draws (one pass of comparisons, in order, then the gradient of the largest loss), in
float64: the step picked, the hypergradient, the loss and the global RNG left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import PTT

DTYPE = torch.float64
LR, ITERS, SEED = 0.3, 6, 7
LAM = (1.0, 2.0, -1.0)
CENTER = torch.tensor([0.2, 0.1, 0.4], dtype=DTYPE)
NOISE = 0.5
CALLS = [0]  # UL evaluations


class Vector(nn.Module):
    def __init__(self, values: tuple[float, ...]) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.tensor(values, dtype=DTYPE))


class Hyper(Vector):
    """The UL variables, with a counter of UL evaluations as a buffer that weighs the UL
    loss: comparisons that did not start from the same buffers would compare other losses."""

    def __init__(self) -> None:
        super().__init__(LAM)
        self.register_buffer("count", torch.zeros((), dtype=DTYPE))


def ll_objective(state: dict) -> torch.Tensor:
    w, lam = state["ll_model"].v, state["ul_model"].v
    return 0.5 * ((w - lam) ** 2).sum()


def ul_loss(w: torch.Tensor, hyper: Hyper, threshold: float) -> torch.Tensor:
    """``||w - c||^2 / 2``, 10 more at the third evaluation (``count == 2``), plus a drawn
    term ``NOISE * z * sum(w)`` at the iterates whose first weight exceeds ``threshold``
    (``w_k[0] = 1 - 0.7^k``: 0.3, 0.51, 0.66, ...); the counter moves at every evaluation."""
    loss = 0.5 * ((w - CENTER) ** 2).sum() + 10.0 * (hyper.count == 2)
    CALLS[0] += 1
    if float(w[0].detach()) > threshold:
        loss = loss + NOISE * torch.randn((), dtype=DTYPE) * w.sum()
    with torch.no_grad():
        hyper.count += 1
    return loss


def library(
    threshold: float,
) -> tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor, torch.Tensor]:
    net, hyper = Vector((0.0, 0.0, 0.0)), Hyper()

    def ul_objective(state: dict) -> torch.Tensor:
        return ul_loss(state["ll_model"].v, state["ul_model"], threshold)

    ll = GradientDescent(ll_objective, net, hyper, lr=LR, iters=ITERS)
    ul = PTT(ul_objective, hyper, ll_objective, net)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(hyper.parameters(), lr=0.0))
    batch = (torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))
    torch.manual_seed(SEED)
    CALLS[0] = 0
    problem.step(batch, batch)  # (SGD with lr = 0: the gradient stays in .grad)
    k = ul.diagnostics["ptt_step"] - 1
    calls = CALLS[0]
    return (
        [hyper.v.grad],
        k,
        ul.diagnostics["ul_loss"],
        torch.get_rng_state(),
        hyper.count.clone(),
        calls,
    )


def by_hand(threshold: float) -> tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor]:
    hyper = Hyper()
    lam = hyper.v
    torch.manual_seed(SEED)
    w, iterates = torch.zeros(3, dtype=DTYPE), []
    for _ in range(ITERS):
        w = w - LR * (w - lam)
        iterates.append(w)
    losses = []
    for w in iterates:  # in order, each with its own draws and the counter's value
        losses.append(ul_loss(w, hyper, threshold))
    rng = torch.get_rng_state()
    k = int(torch.stack([x.detach() for x in losses]).argmax())
    # differentiated from the counter as the UL step found it, with iterate k's draws
    hyper.count.zero_()
    seeded = torch.get_rng_state()
    torch.manual_seed(SEED)
    for w in iterates[:k]:
        ul_loss(w.detach(), hyper, threshold)
    hyper.count.zero_()
    loss = ul_loss(iterates[k], hyper, threshold)
    torch.set_rng_state(seeded)
    return list(torch.autograd.grad(loss, [lam])), k, loss.detach(), rng


@pytest.mark.parametrize(
    "threshold, passes, case",
    [
        (2.0, 1, "never draws"),
        (0.0, 1, "draws from the first iterate: the states are captured from there on"),
        (0.4, 2, "draws from the second: compared again, from the same generators and buffers"),
    ],
)
def test_ptt_compares_with_the_draws_it_differentiates(threshold, passes, case):
    grads, k, loss, rng, count, calls = library(threshold)
    expected, k_hand, loss_hand, rng_hand = by_hand(threshold)
    assert k == k_hand, case
    torch.testing.assert_close(loss, loss_hand, rtol=1e-13, atol=0)
    torch.testing.assert_close(grads[0], expected[0], rtol=1e-12, atol=1e-15)
    assert torch.equal(rng, rng_hand), case  # where one pass of comparisons leaves it
    assert float(count) == 1.0  # the UL model's buffers moved once: the evaluation differentiated
    assert calls == passes * ITERS + 1, case  # the comparisons, then the loss differentiated
