"""The floor of the method-families benchmark: BDA, PTT and DARTS' finite differences written
by hand in bare PyTorch (no library), next to ``impl_floor``'s reverse, truncated, implicit
and forward loops and its MAML / first-order MAML meta-steps, which are reused as they are.

The issue's speed target is "within 1.1x of a hand-written torch loop for BDA, PTT and
DARTS": these loops are that reference. Like ``impl_floor`` they check and log nothing.
"""

from __future__ import annotations

from typing import Any

import impl_floor
import problems as P
import torch
from common import NotSupported
from impl_floor import descend, grad, version  # noqa: F401  (version: the worker)

NAME = "floor"
Tensors = list[torch.Tensor]


def bda(s: P.Spec, lams: Tensors, steps: int, alpha: float, decay: float) -> Tensors:
    """Reverse mode through ``steps`` BDA steps ``w <- w - lr grad_w((1 - a_k) f + a_k F)``,
    ``a_k = alpha decay^k`` (Liu et al. 2020, with the UL step equal to the LL step)."""
    ws = [w.clone().requires_grad_() for w in s.w0]
    a = alpha
    for _ in range(steps):
        gs = grad((1 - a) * s.ll(ws, lams) + a * s.ul(ws, lams), ws, create_graph=True)
        ws = [w - s.lr * g for w, g in zip(ws, gs, strict=True)]
        a *= decay
    return list(grad(s.ul(ws, lams), lams))


def ptt(s: P.Spec, lams: Tensors, steps: int, momentum: float = 0.0) -> tuple[Tensors, int]:
    """IAPTT-GM's pessimistic truncation: the UL loss at every iterate (no graph), then
    reverse mode from the iterate ``k* = argmax_k F(w_k)`` (Liu et al. 2021); the
    hypergradient and ``k*`` (1-based). The LL steps are GD, or heavy-ball with ``momentum``
    as ``torch.optim.SGD`` takes it (the first step a plain gradient step). The losses are
    taken after the LL run, not between its steps: interleaved, the LL and UL data evict
    each other from the cache (on logistic regression, 1,000 x 100 in float64, that made
    the UL losses 5x slower and the whole UL step 1.5x slower)."""
    ws = [w.clone().requires_grad_() for w in s.w0]
    iterates, velocity = [], None
    for _ in range(steps):
        gs = grad(s.ll(ws, lams), ws, create_graph=True)
        if momentum and velocity is not None:
            gs = [momentum * v + g for v, g in zip(velocity, gs, strict=True)]
        velocity = gs
        ws = [w - s.lr * g for w, g in zip(ws, gs, strict=True)]
        iterates.append(ws)
    with torch.no_grad():
        worst = int(torch.stack([s.ul(w, lams) for w in iterates]).argmax())
    return list(grad(s.ul(iterates[worst], lams), lams)), worst + 1


def darts(s: P.Spec, lams: Tensors, steps: int, r: float) -> Tensors:
    """DARTS' second-order approximation through the last of ``steps`` SGD steps, the mixed
    derivative by central differences at radius ``r`` (Liu, Simonyan & Yang 2019, eq. 7-8)."""
    ws = [w.requires_grad_() for w in descend(s, s.w0, lams, steps - 1)]
    gs = grad(s.ll(ws, lams), ws)
    after = [(w - s.lr * g).detach().requires_grad_() for w, g in zip(ws, gs, strict=True)]
    n = len(lams)
    both = grad(s.ul(after, lams), [*lams, *after], allow_unused=True)
    direct = [torch.zeros_like(t) if g is None else g for t, g in zip(lams, both[:n], strict=True)]
    v = both[n:]
    eps = r / torch.sqrt(sum((t * t).sum() for t in v))
    with torch.no_grad():
        plus = [(w + eps * t).requires_grad_() for w, t in zip(ws, v, strict=True)]
        minus = [(w - eps * t).requires_grad_() for w, t in zip(ws, v, strict=True)]
    g_plus = grad(s.ll(plus, lams), lams)
    g_minus = grad(s.ll(minus, lams), lams)
    scale = s.lr / (2 * eps)
    return [d - scale * (p - m) for d, p, m in zip(direct, g_plus, g_minus, strict=True)]


class Runner(impl_floor.Runner):
    """``impl_floor.Runner`` with BDA, PTT and DARTS; Adam on the UL variables when the
    configuration trains (``ul_lr``)."""

    def __init__(self, config: dict[str, Any], problem: Any) -> None:
        super().__init__(config, problem)
        if config.get("ul_lr"):
            self.opt = torch.optim.Adam(self.lams, lr=config["ul_lr"])

    def hypergradient(self) -> Tensors:
        c, s, lams = self.config, self.s, self.lams
        if c["method"] == "bda":
            return bda(s, lams, c["T"], c["alpha"], c["decay"])
        if c["method"] in ("ptt", "ptt_interior"):
            grads, self.ptt_step = ptt(s, lams, c["T"], c.get("momentum", 0.0))
            return grads
        if c["method"] == "fd":
            return darts(s, lams, c["T"], c.get("r", 1e-2))
        return super().hypergradient()


META_BASE = {"reverse": "maml", "first_order": "fomaml"}


def ptt_step(runner: Runner) -> int:
    """The LL iterate ``k*`` (1-based) that :func:`ptt` back-propagated from last."""
    return runner.ptt_step


def ul_tensors(runner: Any) -> Tensors:
    """The runner's UL variables (read after training)."""
    return [t.detach() for t in runner.lams]


def build(config: dict[str, Any], problem: Any) -> Any:
    """The runner of a configuration."""
    if isinstance(problem, P.Meta):
        if config["method"] not in META_BASE:
            raise NotSupported(f"no hand-written meta-step for {config['method']!r}")
        return impl_floor.MetaRunner({**config, "method": META_BASE[config["method"]]}, problem)
    return Runner(config, problem)
