"""Our library on the benchmark problems, through its public API only."""

from __future__ import annotations

from typing import Any

import problems as P
import torch
import torch.nn.functional as F
from common import NotSupported
from torch import nn

import bilevel
import bilevel.ul
from bilevel import BilevelProblem
from bilevel.ll import GradientDescent

NAME = "bilevel"


def version() -> str:
    """The library version (the checkout's commit is recorded by the runner)."""
    return bilevel.__version__


class Weights(nn.Module):
    """A module holding one tensor per name, as parameters (the LL or UL variables)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t.detach().clone()))


def calculator(config: dict[str, Any], ul_obj: Any, ul_model: nn.Module, ll_obj: Any, ll_model):
    """The UL calculator of a configuration's ``method``."""
    method, lr = config["method"], config["lr"]
    args = (ul_obj, ul_model, ll_obj, ll_model)
    if method == "reverse":
        return bilevel.ul.Reverse(*args)
    if method == "truncated":
        return bilevel.ul.Truncated(*args, truncate_iter=config["K"])
    if method in ("cg", "neumann", "fixed_point"):
        return bilevel.ul.Implicit(*args, lr, config["k"], tolerance=1e-10, method=method)
    if method == "forward":
        if not hasattr(bilevel.ul, "Forward"):
            raise NotSupported("bilevel.ul.Forward does not exist in this checkout")
        return bilevel.ul.Forward(*args)
    raise NotSupported(f"method {method!r}")


class Runner:
    """One UL step = ``BilevelProblem.step`` (LL solve, hypergradient, UL optimizer step)."""

    def __init__(self, problem: BilevelProblem, train: Any, val: Any) -> None:
        self.problem, self.train, self.val = problem, train, val

    def step(self) -> None:
        self.problem.step(self.train, self.val)

    def hypergradient(self) -> list[torch.Tensor]:
        return self.problem.hypergradient(self.train, self.val)


def regression(config: dict[str, Any], problem: P.Regression | P.Cleaning) -> Runner:
    """Ridge, logistic or hyper-cleaning: the LL and UL variables are plain tensors, held by
    two modules; the objectives are those of ``problems.spec``."""
    s = P.spec(problem)
    ll_model = Weights(**{f"w{i}": w for i, w in enumerate(s.w0)})
    ul_model = Weights(**{f"lam{i}": t for i, t in enumerate(s.lam0)})

    ll_names = [f"w{i}" for i in range(len(s.w0))]
    ul_names = [f"lam{i}" for i in range(len(s.lam0))]

    def weights(state: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ll, ul = state["ll_model"], state["ul_model"]  # read as attributes, as users write it
        return [getattr(ll, n) for n in ll_names], [getattr(ul, n) for n in ul_names]

    def ll_obj(state: dict) -> torch.Tensor:
        return s.ll(*weights(state))

    def ul_obj(state: dict) -> torch.Tensor:
        return s.ul(*weights(state))

    ll = GradientDescent(ll_obj, ll_model, ul_model, lr=s.lr, iters=config["T"])
    ul = calculator({**config, "lr": s.lr}, ul_obj, ul_model, ll_obj, ll_model)
    opt = torch.optim.SGD(ul_model.parameters(), lr=0.0)
    # the objectives read the data from their closure (as the other implementations do); the
    # pairs are passed so that the library sees and checks them as in real use
    return Runner(BilevelProblem(ll, ul, opt), s.train, s.val)


def _ce(state: dict) -> torch.Tensor:
    return F.cross_entropy(state["ll_model"](state["data"]), state["target"])


class MetaRunner:
    """A meta-step over the task batch: ``BilevelProblem.meta_step``."""

    def __init__(self, problem: BilevelProblem, batch: dict) -> None:
        self.problem, self.batch = problem, batch

    def step(self) -> None:
        self.problem.meta_step(self.batch)

    def hypergradient(self) -> list[torch.Tensor]:
        return self.problem.meta_hypergradient(self.batch)


class HyperRepRunner:
    """Hyper-representation: the trunk's features of each task are computed once per task and
    given to the LL (the linear head) as its data, carrying their graph to the trunk."""

    def __init__(self, ll: GradientDescent, ul: Any, trunk: nn.Module, m: P.Meta) -> None:
        self.ll, self.ul, self.trunk, self.m = ll, ul, trunk, m
        self.opt = torch.optim.SGD(trunk.parameters(), lr=0.0)
        BilevelProblem(ll, ul)  # checks that ll and ul agree (Reverse: the default full graph)

    def _accumulate(self) -> None:
        m = self.m
        for i in range(m.batch):
            fs, fq = self.trunk(m.xs[i]), self.trunk(m.xq[i])
            aux = self.ll.optimize(fs, m.ys[i])
            self.ul.compute_gradients(fq, m.yq[i], aux, fs, m.ys[i])
        for p in self.trunk.parameters():
            p.grad.div_(m.batch)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._accumulate()
        self.opt.step()

    def hypergradient(self) -> list[torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        self._accumulate()
        return [p.grad.clone() for p in self.trunk.parameters()]


def meta(config: dict[str, Any], m: P.Meta) -> Any:
    """MAML, first-order MAML, iMAML and hyper-representation on the 4-conv network."""
    method = config["method"]
    batch = {"train": (m.xs, m.ys), "test": (m.xq, m.yq)}
    if method == "hyperrep":
        net = P.meta_network(m)
        trunk, head = net.features, net.head
        ll = GradientDescent(_ce, head, trunk, lr=m.lr, iters=m.steps)
        ul = bilevel.ul.Reverse(_ce, trunk, _ce, head)
        return HyperRepRunner(ll, ul, trunk, m)
    net = P.meta_network(m)
    ll_obj = _ce
    if method == "imaml":

        def ll_obj(state: dict) -> torch.Tensor:
            fast = list(state["ll_model"].parameters())
            anchor = list(state["ul_model"].parameters())
            return _ce(state) + P.proximal(fast, anchor, m.reg)

    ll = GradientDescent(ll_obj, net, net, lr=m.lr, iters=m.steps)
    if method == "maml":
        ul = bilevel.ul.Reverse(_ce, net, ll_obj, net)
    elif method == "fomaml":
        ul = bilevel.ul.FirstOrder(_ce, net, ll_obj, net)
    elif method == "imaml":
        ul = bilevel.ul.Implicit(_ce, net, ll_obj, net, m.lr, m.cg_iters, method="cg")
    else:
        raise NotSupported(f"method {method!r}")
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    return MetaRunner(BilevelProblem(ll, ul, opt), batch)


def build(config: dict[str, Any], problem: Any) -> Any:
    """The runner of a configuration."""
    if isinstance(problem, P.Meta):
        return meta(config, problem)
    return regression(config, problem)
