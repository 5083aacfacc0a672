"""BOAT 1.1.1 (``boat_torch``) on the method-families benchmark, in BOAT's own environment:
each of our methods mapped to BOAT's operation that computes the same thing.

The LL is BOAT's ``NGD`` (``lower_iters`` SGD steps through ``higher``) unless said:

| ours | BOAT |
|---|---|
| ``Reverse`` | ``na_op=["RAD"]`` |
| ``Truncated(K)`` | ``["RAD", "RGT"]``, ``truncate_iter = T - K`` |
| ``Implicit`` cg / neumann | ``["CG"]`` / ``["NS"]`` |
| ``PTT`` | ``["PTT", "RAD"]`` (heavy-ball LL: ``lower_level_opt`` is SGD with momentum) |
| ``FiniteDifference`` (DARTS) | ``["FD"]`` |
| ``IGA`` | ``["IGA"]`` |
| ``BDA`` + ``Reverse`` | ``gm_op=["NGD", "GDA"]``, ``["RAD"]`` (``gda_loss = a F + (1 - a) f``) |
| dynamic initialization + ``Reverse`` | ``gm_op=["NGD", "DI"]``, ``["RAD"]`` |
| ``DM(eta="auto")`` | ``gm_op=["DM"]``, ``["CG"]`` (the line-searched multiplier step) |
| ``BOME`` (``phi="value"``) | ``fo_op="VFO"`` |
| ``PBGD`` (value penalty) | ``fo_op="PGDO"`` (``penalty="difference"``) |
| ``BVFIM`` | ``fo_op="VSO"`` |
| ``MESO`` | ``fo_op="MESO"`` |
| MAML meta-step | ``["IAD", "RAD"]`` |
| first-order MAML | ``["FOA", "IAD", "RAD"]`` |
| PTT meta-step | ``["PTT", "IAD", "RAD"]`` |

Everything else (objectives, the ``run_iter`` runner, the configuration dict with every key
BOAT reads, MAML) is ``impl_boat``'s.
"""

from __future__ import annotations

from typing import Any

import boat_torch
import impl_boat
import problems as P
import torch
from common import NotSupported
from impl_boat import Hyper, Runner, boat_config, spec_ll, spec_ul, version  # noqa: F401
from torch import nn

NAME = "boat"
Tensors = list[torch.Tensor]

NA_OP = {
    **impl_boat.NA_OP,
    "ptt": ["PTT", "RAD"],
    "ptt_interior": ["PTT", "RAD"],
    "fd": ["FD"],
    "iga": ["IGA"],
    "bda": ["RAD"],
    "reverse_di": ["RAD"],
    "dm": ["CG"],
}
GM_OP = {"bda": ["NGD", "GDA"], "reverse_di": ["NGD", "DI"], "dm": ["DM"]}
FO_OP = {"bome": "VFO", "pbgd": "PGDO", "bvfim": "VSO", "meso": "MESO"}
META_NA_OP = {**impl_boat.META_NA_OP, "ptt": ["PTT", "IAD", "RAD"]}
META_BASE = {"reverse": "maml", "first_order": "fomaml", "ptt": "maml"}


class Flat(nn.Module):
    """The LL variables as parameters of the module itself; ``forward`` returns them.

    ``higher`` fills a patched module's parameters from ``params=`` only in the forward of the
    module that holds them, so with ``impl_boat.Linear`` (a ``ParameterList`` child)
    ``ll_model(params=...)`` returns the latest fast weights whatever ``params`` says: BOAT's
    PTT would then take the UL loss at the last iterate instead of the chosen one."""

    def __init__(self, tensors: Tensors) -> None:
        super().__init__()
        self.names = [f"w{i}" for i in range(len(tensors))]
        for name, t in zip(self.names, tensors, strict=True):
            self.register_parameter(name, nn.Parameter(t.detach().clone()))

    def forward(self) -> Tensors:
        return [getattr(self, name) for name in self.names]


def spec_gda(ll_feed: dict, ul_feed: dict, ul_model, ll_model, params=None) -> torch.Tensor:
    """BOAT's GDA loss ``a F + (1 - a) f``, ``a = ll_feed["alpha"]`` (set by BOAT per step)."""
    alpha = ll_feed["alpha"]
    upper = spec_ul(ul_feed, ul_model, ll_model, params)
    return alpha * upper + (1 - alpha) * spec_ll(ll_feed, ul_model, ll_model, params)


class InitialGradient:
    """Stands in for BOAT's optimizer of the LL's initial weights (``DI``): keeps the
    gradient BOAT accumulated into them (BOAT zeroes it right after its step)."""

    def __init__(self, params: Tensors) -> None:
        self.params, self.grads = params, [torch.zeros_like(p) for p in params]

    def step(self) -> None:
        self.grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params
        ]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class InitRunner(Runner):
    """``Runner`` whose hypergradient also holds the gradient for the LL's initial weights."""

    def hypergradient(self) -> Tensors:
        grads = super().hypergradient()
        return grads + self.problem._lower_init_opt.grads


def op_settings(config: dict[str, Any], lr: float) -> dict[str, Any]:
    """The configuration keys of the operations a method uses."""
    steps, method = config["T"], config["method"]
    extra: dict[str, Any] = {"CG": {"k": config.get("k", 10), "tolerance": 1e-10}}
    if method == "truncated":
        if config["K"] >= steps:
            raise NotSupported("BOAT's RGT needs K < T (use RAD)")
        extra["RGT"] = {"truncate_iter": steps - config["K"]}
    if method == "fd":
        extra["FD"] = {"r": config.get("r", 1e-2)}
    if method == "bda":
        extra["GDA"] = {"alpha_init": config["alpha"], "alpha_decay": config["decay"]}
    if method == "reverse_di":
        extra["DI"] = {"lr": 0.0}
    if method == "dm":  # tau = 0: no decay of the steps (x's step is the UL optimizer's)
        extra["DM"] = {"auxiliary_v_lr": lr, "tau": 0.0, "p": 1.0, "mu0": 0.0, "eta0": 1.0}
        extra["DM"]["strategy"] = "s1"
    y_hat = {"y_hat_lr": lr}
    extra["VFO"] = {**y_hat, "eta": 0.5, "u1": 0.5}
    extra["PGDO"] = {**y_hat, "gamma_init": 10.0, "gamma_max": 10.0, "gamma_argmax_step": 1}
    extra["PGDO"].update(update_y_ahead=False, penalty="difference")
    extra["MESO"] = {**y_hat, "eta": lr, "gamma_1": 10.0, "c0": 1.0}
    extra["VSO"] = {"z_loop": steps, "z_lr": lr, "ll_l2_reg": 0.1, "ul_l2_reg": 0.01}
    extra["VSO"].update(ul_ln_reg=10.0, reg_decay=0.01)
    return extra


def regression(config: dict[str, Any], problem: Any) -> Runner:
    """Ridge, logistic or MNIST hyper-cleaning with the BOAT operation of the method."""
    method = config["method"]
    if method not in NA_OP and method not in FO_OP:
        raise NotSupported(f"BOAT has no operation for {method!r}")
    s = P.spec(problem)
    ll_model, ul_model = Flat(s.w0), Hyper(s.lam0)
    ul_vars = list(ul_model.parameters())
    ul_lr = config.get("ul_lr")
    extra = op_settings(config, s.lr)
    if config.get("momentum"):  # heavy-ball LL steps (``higher`` differentiates SGD's momentum)
        momentum = config["momentum"]
        extra["lower_level_opt"] = torch.optim.SGD(ll_model.parameters(), s.lr, momentum)
    extra["upper_level_opt"] = (
        torch.optim.Adam(ul_vars, lr=ul_lr) if ul_lr else torch.optim.SGD(ul_vars, lr=0.0)
    )
    if method in FO_OP:
        extra.update(fo_op=FO_OP[method], gm_op=None, na_op=None)
    else:
        extra["gm_op"] = GM_OP.get(method, ["NGD"])
    steps = 1 if method == "dm" else config["T"]
    cfg = boat_config(ll_model, ul_model, ul_vars, s.lr, steps, NA_OP.get(method), extra)
    losses = {
        "lower_level_loss": {"function": "impl_boat.spec_ll"},
        "upper_level_loss": {"function": "impl_boat.spec_ul"},
        "gda_loss": {"function": "impl_boat_families.spec_gda"},
    }
    problem_ = boat_torch.Problem(cfg, losses)
    problem_.build_ll_solver()
    problem_.build_ul_solver()
    feed = {"spec": s}
    if method == "reverse_di":
        problem_._lower_init_opt = InitialGradient(list(ll_model.parameters()))
        return InitRunner(problem_, cfg, ul_vars, lambda: feed, lambda: feed)
    return Runner(problem_, cfg, ul_vars, lambda: feed, lambda: feed)


def meta(config: dict[str, Any], m: P.Meta) -> Runner:
    """MAML and first-order MAML as ``impl_boat`` builds them; PTT as MAML's configuration
    with ``na_op=["PTT", "IAD", "RAD"]``."""
    method = config["method"]
    if method not in META_BASE:
        raise NotSupported(f"BOAT has no meta-learning operation for {method!r}")
    runner = impl_boat.meta({**config, "method": META_BASE[method]}, m)
    if method == "ptt":
        runner.config["na_op"] = META_NA_OP["ptt"]
        runner.problem = impl_boat._problem(runner.config, "impl_boat.task_loss")
    return runner


def ptt_step(runner: Runner) -> int:
    """The LL iterate ``k*`` (1-based) that BOAT's PTT back-propagated from at the last
    ``run_iter``: what its ``NGD.optimize`` returned and ``run_iter`` passed on as
    ``max_loss_iter`` (the first largest of the UL losses it took with ``.item()``)."""
    (last,) = runner.problem._ll_solver.result_store.get_results()[-1].values()
    return int(last)


def ul_tensors(runner: Runner) -> Tensors:
    """The runner's UL variables (read after training)."""
    return [v.detach() for v in runner.ul_vars]


def build(config: dict[str, Any], problem: Any) -> Runner:
    """The runner of a configuration."""
    if isinstance(problem, P.Meta):
        return meta(config, problem)
    return regression(config, problem)
