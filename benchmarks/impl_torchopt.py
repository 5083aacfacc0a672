"""TorchOpt 0.7.3 on the benchmark problems (runs in TorchOpt's own virtual environment).

Reverse and truncated: ``torchopt.MetaSGD`` on a module, as TorchOpt's MAML example does
(truncated: the first T - K steps are cut with ``torchopt.stop_gradient``). Implicit:
``torchopt.diff.implicit.custom_root`` with the LL gradient (``torch.func.grad``) as the
optimality condition and ``torchopt.linear_solve.solve_cg`` or ``solve_inv(ns=True)``; its
LL solver is the plain no-graph GD loop of the floor. iMAML: ``custom_root`` with the
proximal LL objective, as in TorchOpt's iMAML example.
"""

from __future__ import annotations

from typing import Any

import problems as P
import torch
import torch.nn.functional as F
import torchopt
from common import NotSupported, apply_hypergradient
from impl_floor import descend
from torch import nn
from torch.func import functional_call

NAME = "torchopt"
Tensors = list[torch.Tensor]


def version() -> str:
    """TorchOpt's version."""
    return torchopt.__version__


def notes() -> list[str]:
    """Whether TorchOpt's compiled extension loads with this torch (it is not needed here:
    the operations used are pure Python, and ``use_accelerated_op`` defaults to False)."""
    try:
        from torchopt import _C  # noqa: F401
    except ImportError as exc:
        return [
            f"its compiled extension `torchopt._C` does not load with torch {torch.__version__} "
            f"(`ImportError: {str(exc)[:160]}...`); the benchmarks use only its pure-Python "
            "code (MetaSGD, custom_root, solve_cg, solve_inv), which runs"
        ]
    return []


class Weights(nn.Module):
    """The LL variables as parameters of a module (what ``MetaSGD`` steps)."""

    def __init__(self, tensors: Tensors) -> None:
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in tensors])


class Runner:
    """One UL step: hypergradient into ``.grad`` of the UL variables, ``SGD(lr=0)`` step."""

    def __init__(self, config: dict[str, Any], problem: Any) -> None:
        self.config = config
        self.s = s = P.spec(problem)
        self.lams = [t.detach().clone().requires_grad_() for t in s.lam0]
        self.opt = torch.optim.SGD(self.lams, lr=0.0)
        method = config["method"]
        if method in ("reverse", "truncated"):
            self.net = Weights(s.w0)
            self.inner = torchopt.MetaSGD(self.net, lr=s.lr)
            self.net_state = torchopt.extract_state_dict(self.net, by="reference")
            self.inner_state = torchopt.extract_state_dict(self.inner, by="reference")
        elif method == "cg":
            solve = torchopt.linear_solve.solve_cg(maxiter=config["k"], rtol=1e-10, atol=0.0)
            self.solver = self._implicit(solve)
        elif method == "neumann":
            solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=config["k"], alpha=s.lr)
            self.solver = self._implicit(solve)
        else:
            raise NotSupported(f"TorchOpt has no {method!r} hypergradient")

    def _implicit(self, solve: Any) -> Any:
        s, steps = self.s, self.config["T"]

        def ll(ws: tuple, lams: tuple) -> torch.Tensor:
            return s.ll(list(ws), list(lams))

        @torchopt.diff.implicit.custom_root(torch.func.grad(ll, argnums=0), argnums=1, solve=solve)
        def solver(ws: tuple, lams: tuple) -> tuple:
            with torch.enable_grad():  # custom_root runs the solver under no_grad
                return tuple(descend(s, list(ws), [t.detach() for t in lams], steps))

        return solver

    def hypergradient(self) -> Tensors:
        s, c = self.s, self.config
        if c["method"] in ("cg", "neumann"):
            ws = self.solver(tuple(s.w0), tuple(self.lams))
            return list(torch.autograd.grad(s.ul(list(ws), self.lams), self.lams))
        steps = c["T"]
        cut = steps - min(c.get("K", steps), steps) if c["method"] == "truncated" else 0
        for t in range(steps):
            self.inner.step(s.ll(list(self.net.ws), self.lams))
            if t < cut:
                torchopt.stop_gradient(self.net)
                torchopt.stop_gradient(self.inner)
        grads = list(torch.autograd.grad(s.ul(list(self.net.ws), self.lams), self.lams))
        torchopt.recover_state_dict(self.net, self.net_state)
        torchopt.recover_state_dict(self.inner, self.inner_state)
        return grads

    def step(self) -> None:
        apply_hypergradient(self.opt, self.lams, self.hypergradient())


class MetaRunner:
    """MAML with ``MetaSGD``; iMAML with ``custom_root``; hyper-representation with
    ``MetaSGD`` on the head (trunk features computed once per task, as for every library)."""

    def __init__(self, config: dict[str, Any], m: P.Meta) -> None:
        self.method, self.m = config["method"], m
        self.net = P.meta_network(m)
        if self.method == "maml":
            self.model = self.net
        elif self.method == "hyperrep":
            self.model = self.net.head
        elif self.method == "imaml":
            self.solver = self._imaml()
        else:
            raise NotSupported(f"TorchOpt has no {self.method!r} meta-gradient")
        if self.method in ("maml", "hyperrep"):
            self.inner = torchopt.MetaSGD(self.model, lr=m.lr)
            self.model_state = torchopt.extract_state_dict(self.model, by="reference")
            self.inner_state = torchopt.extract_state_dict(self.inner, by="reference")
        params = self.net.features if self.method == "hyperrep" else self.net
        self.opt = torch.optim.SGD(params.parameters(), lr=0.0)

    def _imaml(self) -> Any:
        m, net = self.m, self.net
        names = [k for k, _ in net.named_parameters()]

        def task_loss(ws: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(net, dict(zip(names, ws, strict=True)), x), y)

        def inner_objective(ws: tuple, theta: tuple, x: torch.Tensor, y: torch.Tensor):
            return task_loss(ws, x, y) + P.proximal(list(ws), list(theta), m.reg)

        solve = torchopt.linear_solve.solve_cg(maxiter=m.cg_iters, rtol=1e-10, atol=0.0)
        optimality = torch.func.grad(inner_objective, argnums=0)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solver(ws: tuple, theta: tuple, x: torch.Tensor, y: torch.Tensor) -> tuple:
            anchor = [t.detach() for t in theta]
            ws = [w.detach() for w in ws]
            with torch.enable_grad():  # custom_root runs the solver under no_grad
                for _ in range(m.steps):
                    ws = [w.requires_grad_() for w in ws]
                    loss = inner_objective(tuple(ws), tuple(anchor), x, y)
                    gs = torch.autograd.grad(loss, ws)
                    ws = [(w - m.lr * g).detach() for w, g in zip(ws, gs, strict=True)]
            return tuple(ws)

        self.task_loss = task_loss
        return solver

    def task(self, i: int) -> None:
        m = self.m
        xs, ys, xq, yq = m.xs[i], m.ys[i], m.xq[i], m.yq[i]
        if self.method == "imaml":
            theta = tuple(self.net.parameters())
            ws = self.solver(theta, theta, xs, ys)
            (self.task_loss(ws, xq, yq) / m.batch).backward()
            return
        if self.method == "hyperrep":
            xs, xq = self.net.features(xs), self.net.features(xq)
        for _ in range(m.steps):
            self.inner.step(F.cross_entropy(self.model(xs), ys))
        (F.cross_entropy(self.model(xq), yq) / m.batch).backward()
        torchopt.recover_state_dict(self.model, self.model_state)
        torchopt.recover_state_dict(self.inner, self.inner_state)

    def hypergradient(self) -> Tensors:
        self.opt.zero_grad(set_to_none=True)
        for i in range(self.m.batch):
            self.task(i)
        params = self.net.features if self.method == "hyperrep" else self.net
        return [p.grad.clone() for p in params.parameters()]

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for i in range(self.m.batch):
            self.task(i)
        self.opt.step()


def build(config: dict[str, Any], problem: Any) -> Any:
    """The runner of a configuration."""
    if isinstance(problem, P.Meta):
        return MetaRunner(config, problem)
    return Runner(config, problem)
