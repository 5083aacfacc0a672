"""BDA through a batch-norm LL model whose UL objective reads it in eval mode (float64).

Each BDA step evaluates ``F`` (eval mode: the running statistics) after ``f`` (train mode:
it moves them in place). ``F``'s graph saves the running statistics; the next step's ``f``
moved those very tensors without a version bump that autograd would catch, so back-propagation
through the steps saw the next step's statistics: here 2e-4 relative off a hand-written
unroll at batch norm's default momentum 0.1 and 2.5e-3 at 0.5 (4e-2 on another net),
silently. Forward (no saved graph) and
MemorySavingReverse (its own buffers per step) were right; the test pins all five.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import DTYPE
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import BDA
from bilevel.ul import PTT, Forward, MemorySavingReverse, Reverse, Truncated

LR, ITERS, ALPHA, DECAY = 0.2, 4, 0.5, 0.9


class Net(nn.Module):
    """Linear, batch norm, tanh, linear head."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.inner = nn.Linear(3, 4, dtype=DTYPE)
        self.norm = nn.BatchNorm1d(4, momentum=momentum, dtype=DTYPE)
        self.head = nn.Linear(4, 1, dtype=DTYPE)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.inner(x)))).squeeze(-1)


def ll_objective(state: dict) -> torch.Tensor:
    """Train mode: batch statistics, running statistics moved in place."""
    m = state["ll_model"]
    fit = ((m(state["data"]) - state["target"]) ** 2).mean()
    return fit + state["ul_model"].log_l2.exp() * (m.head.weight**2).sum()


def ul_objective(state: dict) -> torch.Tensor:
    """Eval mode: the running statistics."""
    m = state["ll_model"]
    m.eval()
    return ((m(state["data"]) - state["target"]) ** 2).mean()


def hand(net: Net, log_l2: torch.Tensor, train, val, momentum: float) -> torch.Tensor:
    """BDA by hand with functional batch norm and new running-statistics tensors per step."""
    log_l2 = log_l2.detach().clone().requires_grad_()
    p = [t.detach().clone().requires_grad_() for t in net.parameters()]
    mean, var = net.norm.running_mean.clone(), net.norm.running_var.clone()

    def forward(p, x, mean, var, training):
        w1, b1, gamma, beta, w2, b2 = p
        h = F.batch_norm(x @ w1.T + b1, mean, var, gamma, beta, training, momentum)
        return (torch.tanh(h) @ w2.T + b2).squeeze(-1)

    for k in range(ITERS):
        mean, var = mean.clone(), var.clone()  # the step's f moves these, not the last ones
        f = ((forward(p, train[0], mean, var, True) - train[1]) ** 2).mean()
        f = f + log_l2.exp() * (p[4] ** 2).sum()
        ul = ((forward(p, val[0], mean, var, False) - val[1]) ** 2).mean()
        a = ALPHA * DECAY**k
        grads = torch.autograd.grad((1 - a) * f + a * ul, p, create_graph=True)
        p = [w - LR * g for w, g in zip(p, grads, strict=True)]
    ul = ((forward(p, val[0], mean, var, False) - val[1]) ** 2).mean()
    return torch.autograd.grad(ul, log_l2)[0]


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("method", [Reverse, Truncated, PTT, MemorySavingReverse, Forward])
def test_bda_with_a_ul_objective_in_eval_mode_equals_the_hand_unroll(method, momentum):
    generator = torch.Generator().manual_seed(0)
    train = (
        torch.randn(20, 3, generator=generator, dtype=DTYPE),
        torch.randn(20, generator=generator, dtype=DTYPE),
    )
    val = (
        torch.randn(20, 3, generator=generator, dtype=DTYPE),
        torch.randn(20, generator=generator, dtype=DTYPE),
    )
    hyper = nn.Module()
    hyper.log_l2 = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))
    expected = hand(Net(momentum), hyper.log_l2, train, val, momentum)
    net = Net(momentum)
    ll = BDA(
        ll_objective, net, hyper, LR, ITERS, ul_objective=ul_objective, alpha=ALPHA,
        alpha_decay=DECAY,
    )  # fmt: skip
    options = {"truncate_iter": ITERS} if method is Truncated else {}
    ul = method(ul_objective, hyper, ll_objective, net, **options)
    (got,) = BilevelProblem(ll, ul).hypergradient(train, val)
    if method is PTT:
        assert ul.diagnostics["ptt_step"] == ITERS  # the UL loss falls: PTT is Reverse here
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
