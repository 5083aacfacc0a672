"""The floor: bare hand-written PyTorch for each method, no library.

Unrolled methods are plain loops of ``torch.autograd.grad(..., create_graph=True)``; the
lower level of the implicit and first-order methods runs without a graph; Hessian-vector
products are double backward passes through one retained graph of the LL gradient; forward
mode takes batched Jacobian-vector products by double backward; the network is evaluated
with ``torch.func.functional_call``. Nothing is checked or logged: any library's overhead is
measured against this.
"""

from __future__ import annotations

from typing import Any

import problems as P
import torch
import torch.nn.functional as F
from common import NotSupported, apply_hypergradient
from torch.func import functional_call

NAME = "floor"
Tensors = list[torch.Tensor]
grad = torch.autograd.grad


def version() -> str:
    """The torch version (the floor is torch itself)."""
    return torch.__version__


def descend(s: P.Spec, ws: Tensors, lams: Tensors, steps: int) -> Tensors:
    """``steps`` GD steps without a graph to ``lams``."""
    lams = [t.detach() for t in lams]  # record no graph to the UL variables
    for _ in range(steps):
        ws = [w.detach().requires_grad_() for w in ws]
        gs = grad(s.ll(ws, lams), ws)
        ws = [w - s.lr * g for w, g in zip(ws, gs, strict=True)]
    return [w.detach() for w in ws]


def unrolled(s: P.Spec, lams: Tensors, steps: int, keep: int) -> Tensors:
    """Reverse mode through the last ``keep`` of ``steps`` GD steps (all: ``keep = steps``)."""
    ws = descend(s, s.w0, lams, steps - keep)
    ws = [w.requires_grad_() for w in ws]
    for _ in range(keep):
        gs = grad(s.ll(ws, lams), ws, create_graph=True)
        ws = [w - s.lr * g for w, g in zip(ws, gs, strict=True)]
    return list(grad(s.ul(ws, lams), lams))


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def cg(matvec: Any, b: Tensors, k: int) -> Tensors:
    """``k`` iterations of conjugate gradient from zero (an exactly solved system stays put)."""
    x = [torch.zeros_like(t) for t in b]
    r, p = list(b), list(b)
    rr = dot(r, r)
    for _ in range(k):
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = torch.where(pap > 0, rr / pap, 0.0)
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap, strict=True)]
        rr_new = dot(r, r)
        beta = torch.where(rr > 0, rr_new / rr, 0.0)
        p = [ri + beta * pi for ri, pi in zip(r, p, strict=True)]
        rr = rr_new
    return x


def implicit(s: P.Spec, lams: Tensors, steps: int, method: str, k: int) -> Tensors:
    """IFT hypergradient at the end of ``steps`` GD steps, with ``k`` iterations of CG, the
    Neumann series (step = LL lr) or the fixed-point iteration."""
    ws = [w.requires_grad_() for w in descend(s, s.w0, lams, steps)]
    outer = s.ul(ws, lams)
    v = grad(outer, ws)
    g = grad(s.ll(ws, lams), ws, create_graph=True)

    def hvp(q: Tensors) -> Tensors:
        return grad(g, ws, q, retain_graph=True)

    if method == "cg":
        x = cg(hvp, v, k)
    elif method == "neumann":
        term, x = list(v), [s.lr * t for t in v]
        for _ in range(k):
            term = [t - s.lr * h for t, h in zip(term, hvp(term), strict=True)]
            x = [xi + s.lr * t for xi, t in zip(x, term, strict=True)]
    elif method == "fixed_point":
        x = [torch.zeros_like(t) for t in v]
        for _ in range(k):
            x = [xi + s.lr * (vi - h) for xi, vi, h in zip(x, v, hvp(x), strict=True)]
    else:
        raise NotSupported(method)
    return [-t for t in grad(g, lams, x)]


def forward(s: P.Spec, lams: Tensors, steps: int) -> Tensors:
    """Forward mode: ``Z_{t+1} = (d step/dw) Z_t + d step/dlambda``, one tangent per scalar of
    the UL variables. The Jacobian-vector products are taken by the double-backward trick
    (a vector-Jacobian product with a dummy cotangent, differentiated again), batched over
    the tangents; ``torch.func.jvp`` under ``vmap`` measured 3x slower here."""
    if len(lams) != 1:
        raise NotSupported("forward floor for one UL tensor")
    lam = lams[0].detach().requires_grad_()
    n = lam.numel()
    eye = torch.eye(n, dtype=lam.dtype, device=lam.device).reshape(n, *lam.shape)
    ws = [w.clone() for w in s.w0]
    zs = [w.new_zeros(n, *w.shape) for w in ws]
    for _ in range(steps):
        ws = [w.detach().requires_grad_() for w in ws]
        gs = grad(s.ll(ws, [lam]), ws, create_graph=True)
        new = [w - s.lr * g for w, g in zip(ws, gs, strict=True)]
        dummies = [torch.zeros_like(w, requires_grad=True) for w in new]
        vjps = grad(new, [*ws, lam], dummies, create_graph=True)
        zs = grad(vjps, dummies, [*zs, eye], is_grads_batched=True)
        ws = [w.detach() for w in new]
    ws = [w.requires_grad_() for w in ws]
    v = grad(s.ul(ws, lams), ws)
    through = sum(z.reshape(n, -1) @ vi.reshape(-1) for z, vi in zip(zs, v, strict=True))
    return [through.reshape(lam.shape)]


class Runner:
    """One UL step: the hypergradient into ``.grad``, then a UL ``SGD(lr=0)`` step."""

    def __init__(self, config: dict[str, Any], problem: Any) -> None:
        self.config = config
        self.s = P.spec(problem)
        self.lams = [t.detach().clone().requires_grad_() for t in self.s.lam0]
        self.opt = torch.optim.SGD(self.lams, lr=0.0)

    def hypergradient(self) -> Tensors:
        c, s, lams = self.config, self.s, self.lams
        method, steps = c["method"], c["T"]
        if method == "reverse":
            return unrolled(s, lams, steps, steps)
        if method == "truncated":
            return unrolled(s, lams, steps, min(c["K"], steps))
        if method in ("cg", "neumann", "fixed_point"):
            return implicit(s, lams, steps, method, c["k"])
        if method == "forward":
            return forward(s, lams, steps)
        raise NotSupported(f"method {method!r}")

    def step(self) -> None:
        apply_hypergradient(self.opt, self.lams, self.hypergradient())


class MetaRunner:
    """MAML, first-order MAML, iMAML and hyper-representation on the 4-conv network, one task
    at a time, evaluated with ``functional_call``."""

    def __init__(self, config: dict[str, Any], m: P.Meta) -> None:
        self.method, self.m = config["method"], m
        self.net = P.meta_network(m)
        self.params = dict(self.net.named_parameters())
        if self.method == "hyperrep":
            self.params = {k: v for k, v in self.params.items() if k.startswith("features.")}
        self.opt = torch.optim.SGD(self.params.values(), lr=0.0)

    def loss(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.net, params, (x,)), y)

    def adapt(self, fast: dict, x: torch.Tensor, y: torch.Tensor, graph: bool) -> dict:
        m = self.m
        anchor = {k: v.detach() for k, v in fast.items()}
        for _ in range(m.steps):
            if not graph:
                fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            loss = self.loss(fast, x, y)
            if self.method == "imaml":
                loss = loss + P.proximal(list(fast.values()), list(anchor.values()), m.reg)
            gs = grad(loss, list(fast.values()), create_graph=graph)
            fast = {k: v - m.lr * g for (k, v), g in zip(fast.items(), gs, strict=True)}
        return fast

    def task(self, i: int) -> Tensors:
        m, method, theta = self.m, self.method, self.params
        xs, ys, xq, yq = m.xs[i], m.ys[i], m.xq[i], m.yq[i]
        if method == "maml":
            fast = self.adapt(dict(theta), xs, ys, graph=True)
            return list(grad(self.loss(fast, xq, yq), list(theta.values())))
        if method == "fomaml":
            fast = self.adapt(dict(theta), xs, ys, graph=False)
            fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            return list(grad(self.loss(fast, xq, yq), list(fast.values())))
        if method == "imaml":
            fast = self.adapt(dict(theta), xs, ys, graph=False)
            fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            ws = list(fast.values())
            v = grad(self.loss(fast, xq, yq), ws)
            g = grad(self.loss(fast, xs, ys), ws, create_graph=True)

            def matvec(q: Tensors) -> Tensors:  # (I + H / reg) q
                hq = grad(g, ws, q, retain_graph=True)
                return [qi + h / m.reg for qi, h in zip(q, hq, strict=True)]

            return cg(matvec, v, m.cg_iters)
        if method == "hyperrep":
            fs = functional_call(self.net.features, _strip(theta), (xs,))
            fq = functional_call(self.net.features, _strip(theta), (xq,))
            w, b = self.net.head.weight, self.net.head.bias
            head = [w.detach().requires_grad_(), b.detach().requires_grad_()]
            for _ in range(m.steps):
                gs = grad(F.cross_entropy(F.linear(fs, *head), ys), head, create_graph=True)
                head = [h - m.lr * gh for h, gh in zip(head, gs, strict=True)]
            return list(grad(F.cross_entropy(F.linear(fq, *head), yq), list(theta.values())))
        raise NotSupported(f"method {method!r}")

    def hypergradient(self) -> Tensors:
        total = None
        for i in range(self.m.batch):
            gs = self.task(i)
            total = gs if total is None else [a + b for a, b in zip(total, gs, strict=True)]
        return [t / self.m.batch for t in total]

    def step(self) -> None:
        apply_hypergradient(self.opt, self.params.values(), self.hypergradient())


def _strip(params: dict) -> dict:
    return {k.removeprefix("features."): v for k, v in params.items()}


def build(config: dict[str, Any], problem: Any) -> Any:
    """The runner of a configuration."""
    if isinstance(problem, P.Meta):
        return MetaRunner(config, problem)
    return Runner(config, problem)
