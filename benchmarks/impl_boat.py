"""BOAT 1.1.1 (``boat_torch``) on the benchmark problems (runs in BOAT's own environment).

A UL step is ``boat_torch.Problem.run_iter``, configured with ``gm_op=["NGD"]`` (the LL:
``lower_iters`` steps of ``torch.optim.SGD`` through ``higher``) and ``na_op``:
``["RAD"]`` (reverse), ``["RAD", "RGT"]`` (truncated: BOAT's ``truncate_iter`` counts the
steps *not* differentiated, T - K), ``["CG"]`` and ``["NS"]`` (implicit, ``CG.k``
iterations). MAML is ``["IAD", "RAD"]`` and first-order MAML ``["FOA", "IAD", "RAD"]`` with
``accumulate_grad`` over the tasks. Its objectives take ``(feed_dict, ul_model, ll_model,
params=None)`` and are loaded by import path, so they are the functions of this module.

``run_iter`` also evaluates both losses after the step and rewrites its loss log (a JSON
file) each call: that is part of BOAT's UL step. The runner empties BOAT's in-memory logs
before each step so that they do not grow over the measurement.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import boat_torch
import problems as P
import torch
import torch.nn.functional as F
from common import NotSupported
from torch import nn

NAME = "boat"
Tensors = list[torch.Tensor]


def version() -> str:
    """BOAT's version (from the package metadata)."""
    from importlib.metadata import version as dist_version

    return dist_version("boat-torch")


class Linear(nn.Module):
    """The LL variables of a regression or hyper-cleaning problem as a ``higher``-patchable
    module; ``forward`` returns the list of (fast) weights."""

    def __init__(self, tensors: Tensors) -> None:
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in tensors])

    def forward(self) -> Tensors:
        return list(self.ws)


class Hyper(nn.Module):
    """The UL variables."""

    def __init__(self, tensors: Tensors) -> None:
        super().__init__()
        self.lams = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in tensors])


def _weights(ll_model: nn.Module, params: Tensors | None) -> Tensors:
    return ll_model(params=params) if params is not None else ll_model()


def spec_ll(feed: dict, ul_model: nn.Module, ll_model: nn.Module, params=None) -> torch.Tensor:
    """BOAT LL objective of a regression or hyper-cleaning problem."""
    return feed["spec"].ll(_weights(ll_model, params), list(ul_model.lams))


def spec_ul(feed: dict, ul_model: nn.Module, ll_model: nn.Module, params=None) -> torch.Tensor:
    """BOAT UL objective of a regression or hyper-cleaning problem."""
    return feed["spec"].ul(_weights(ll_model, params), list(ul_model.lams))


def task_loss(feed: dict, ul_model: nn.Module, ll_model: nn.Module, params=None) -> torch.Tensor:
    """Cross-entropy of the (patched) network on the feed's batch (meta-learning)."""
    logits = ll_model(feed["x"], params=params) if params is not None else ll_model(feed["x"])
    return F.cross_entropy(logits, feed["y"])


NA_OP = {"reverse": ["RAD"], "truncated": ["RAD", "RGT"], "cg": ["CG"], "neumann": ["NS"]}
META_NA_OP = {"maml": ["IAD", "RAD"], "fomaml": ["FOA", "IAD", "RAD"], "hyperrep": ["RAD"]}


def boat_config(
    ll_model: nn.Module,
    ul_model: nn.Module,
    ul_vars: Tensors,
    lr: float,
    steps: int,
    na_op: list[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """A complete BOAT configuration dict (every key BOAT reads)."""
    log = os.path.join(tempfile.mkdtemp(prefix="boat-"), "losses.json")
    return {
        "fo_op": None,
        "gm_op": ["NGD"],
        "na_op": na_op,
        "lower_level_model": ll_model,
        "upper_level_model": ul_model,
        "lower_level_var": list(ll_model.parameters()),
        "upper_level_var": ul_vars,
        "lower_level_opt": torch.optim.SGD(ll_model.parameters(), lr=lr),
        "upper_level_opt": torch.optim.SGD(ul_vars, lr=0.0),
        "lower_iters": steps,
        "device": "cpu",
        "loss_log_path": log,
        "GDA": {"alpha_init": 0.0, "alpha_decay": 1.0},
        "RGT": {"truncate_iter": 0},
        "CG": {"k": 10, "tolerance": 1e-10},
        "DI": {"lr": lr},
        "FD": {"r": 1e-2},
        "accumulate_grad": False,
        "return_grad": False,
        "copy_last_param": False,
        "fo_ol_batch_input": False,
        **extra,
    }


class Runner:
    """One UL step: ``run_iter`` (LL, hypergradient, UL ``SGD(lr=0)`` step)."""

    def __init__(
        self,
        problem: Any,
        config: dict[str, Any],
        ul_vars: Tensors,
        ll_feed: Any,
        ul_feed: Any,
        scale: float = 1.0,
    ) -> None:
        self.problem, self.config, self.ul_vars = problem, config, ul_vars
        self.ll_feed, self.ul_feed, self.scale = ll_feed, ul_feed, scale
        self.iteration = 0

    def _run(self) -> None:
        self.problem._log_results.clear()
        self.problem.loss_history.clear()
        self.problem.run_iter(self.ll_feed(), self.ul_feed(), self.iteration)
        self.iteration += 1

    def step(self) -> None:
        self._run()

    def hypergradient(self) -> Tensors:
        for v in self.ul_vars:
            v.grad = None
        self.config["return_grad"] = True
        try:
            self._run()
        finally:
            self.config["return_grad"] = False
        grads = [v.grad.detach().clone() * self.scale for v in self.ul_vars]
        for v in self.ul_vars:
            v.grad = None
        return grads


def _problem(config: dict[str, Any], loss: str) -> boat_torch.Problem:
    loss_config = {
        "lower_level_loss": {"function": f"impl_boat.{loss}_ll" if loss == "spec" else loss},
        "upper_level_loss": {"function": f"impl_boat.{loss}_ul" if loss == "spec" else loss},
    }
    problem = boat_torch.Problem(config, loss_config)
    problem.build_ll_solver()
    problem.build_ul_solver()
    return problem


def regression(config: dict[str, Any], problem: Any) -> Runner:
    """Ridge, logistic or hyper-cleaning with RAD, RAD+RGT, CG or NS."""
    method = config["method"]
    if method not in NA_OP:
        raise NotSupported(f"BOAT has no {method!r} hypergradient")
    s = P.spec(problem)
    steps = config["T"]
    extra: dict[str, Any] = {}
    if method == "truncated":
        keep = min(config["K"], steps)
        if keep >= steps:
            raise NotSupported("BOAT's RGT needs K < T (use RAD)")
        extra["RGT"] = {"truncate_iter": steps - keep}
    if method in ("cg", "neumann"):
        extra["CG"] = {"k": config["k"], "tolerance": 1e-10}
    ll_model, ul_model = Linear(s.w0), Hyper(s.lam0)
    ul_vars = list(ul_model.parameters())
    cfg = boat_config(ll_model, ul_model, ul_vars, s.lr, steps, NA_OP[method], extra)
    feed = {"spec": s}
    return Runner(_problem(cfg, "spec"), cfg, ul_vars, lambda: feed, lambda: feed)


def meta(config: dict[str, Any], m: P.Meta) -> Runner:
    """MAML (IAD + RAD), first-order MAML (FOA + IAD + RAD) and hyper-representation (RAD on
    the head, with the trunk's features computed once per task), summed over tasks by
    ``accumulate_grad``; hypergradients are divided by the batch size to give the mean."""
    method = config["method"]
    if method not in META_NA_OP:
        raise NotSupported(f"BOAT has no {method!r} meta-gradient")
    net = P.meta_network(m)
    if method == "hyperrep":
        ll_model, ul_model = net.head, net.features
    else:
        ll_model = ul_model = net
    ul_vars = list(ul_model.parameters())
    cfg = boat_config(
        ll_model, ul_model, ul_vars, m.lr, m.steps, META_NA_OP[method], {"accumulate_grad": True}
    )
    problem = _problem(cfg, "impl_boat.task_loss")
    tasks = range(m.batch)

    def features(x: torch.Tensor) -> torch.Tensor:
        return net.features(x) if method == "hyperrep" else x

    cache: dict[str, list] = {}

    def ll_feed() -> list[dict]:
        cache["ul"] = [{"x": features(m.xq[i]), "y": m.yq[i]} for i in tasks]
        return [{"x": features(m.xs[i]), "y": m.ys[i]} for i in tasks]

    def ul_feed() -> list[dict]:
        return cache.pop("ul")

    return Runner(problem, cfg, ul_vars, ll_feed, ul_feed, scale=1.0 / m.batch)


def build(config: dict[str, Any], problem: Any) -> Runner:
    """The runner of a configuration."""
    if isinstance(problem, P.Meta):
        return meta(config, problem)
    return regression(config, problem)
