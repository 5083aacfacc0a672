"""FiniteDifference (DARTS) with many LL steps, against the exact implicit hypergradient.

With ``T > 1`` plain-SGD LL steps, ``bilevel.ul.FiniteDifference`` differentiates the last
step only: at a converged LL that is the implicit formula with ``H^{-1}`` replaced by
``xi * I`` (``xi`` the LL step size). This script measures how far that is from the exact
hypergradient on ridge regression (``benchmarks/problems.py``, float64), for LL Hessians of
condition number 2 and 50.

The problem: ``n`` training and ``n`` validation rows, ``d`` features, one L2 penalty per
feature (the UL variables, all equal, set so that ``H = X^T X / n + l2 I`` has exactly the
condition number asked for), ``T`` steps of gradient descent from zero with step size
``1 / lambda_max(H)``, ``FiniteDifference`` at DARTS' radius ``r = 0.01``, through the
library's public API (``GradientDescent``, ``FiniteDifference``, ``BilevelProblem``). The
reference is ``problems.exact_hypergradient``: the implicit-function-theorem hypergradient at
the exact LL minimizer (dense solve). For each condition number and seed it records the
cosine between the two, the ratio of their norms, and how far the LL run ended from the
minimizer (``||w_T - w*|| / ||w*||``).

Run (a few seconds on one CPU thread): ``python benchmarks/fd_many_steps.py``; writes
``benchmarks/results/fd_many_steps.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import problems as P
import torch
from argtypes import count, positive
from common import git_revision
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference

OUT = Path(__file__).resolve().parent / "results" / "fd_many_steps.json"


class Weights(nn.Module):
    """One named tensor as a parameter (the LL weights or the UL penalties)."""

    def __init__(self, name: str, value: torch.Tensor) -> None:
        super().__init__()
        self.register_parameter(name, nn.Parameter(value.detach().clone()))


def problem(n: int, d: int, kappa: float, seed: int) -> tuple[P.Regression, float]:
    """A ridge problem whose LL Hessian has condition number ``kappa``, and its ``l2``."""
    p = P.regression("ridge", n, d, seed=seed)
    eig = torch.linalg.eigvalsh(p.x.T @ p.x / n)
    lo, hi = float(eig[0]), float(eig[-1])
    l2 = (hi - kappa * lo) / (kappa - 1)  # (hi + l2) / (lo + l2) = kappa
    if l2 <= 0:
        raise ValueError(f"kappa {kappa} is below X^T X / n's own condition number {hi / lo:.3g}")
    p.log_l2 = torch.full_like(p.log_l2, math.log(l2))
    p.lr = 1.0 / (hi + l2)
    return p, l2


def measure(p: P.Regression, steps: int, r: float) -> dict[str, float]:
    """FiniteDifference's hypergradient after ``steps`` LL steps against the exact one."""
    ll_model, ul_model = Weights("w", p.w0()), Weights("log_l2", p.log_l2)

    def ll_objective(state: dict) -> torch.Tensor:
        return P.regression_ll(p, state["ll_model"].w, state["ul_model"].log_l2)

    def ul_objective(state: dict) -> torch.Tensor:
        return P.regression_ul(p, state["ll_model"].w)

    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=p.lr, iters=steps)
    fd = FiniteDifference(ul_objective, ul_model, ll_objective, ll_model, r=r)
    with warnings.catch_warnings():
        # the one-step approximation is what is measured here: its warning is expected
        warnings.filterwarnings("ignore", "FiniteDifference differentiates only the last")
        (got,) = BilevelProblem(ll, fd).hypergradient((p.x, p.y), (p.xv, p.yv))
    exact = P.exact_hypergradient(p)
    w_star = P.exact_solution(p)
    w_t = ll.optimize(p.x, p.y).w.detach()  # the same deterministic LL run
    got = got.detach()
    return {
        "cosine": float(got @ exact / (got.norm() * exact.norm())),
        "norm_ratio": float(got.norm() / exact.norm()),
        "ll_distance": float((w_t - w_star).norm() / w_star.norm()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=count, default=100, help="training (and validation) rows")
    parser.add_argument("--d", type=count, default=80, help="features")
    parser.add_argument("--steps", type=count, default=100, help="LL gradient steps T")
    parser.add_argument("--kappa", type=positive, nargs="+", default=[2.0, 50.0])
    parser.add_argument("--seeds", type=count, default=5, help="problems per condition number")
    parser.add_argument("--r", type=positive, default=1e-2, help="finite-difference radius")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if min(args.kappa) <= 1:
        parser.error(f"--kappa: a condition number must be > 1, got {min(args.kappa):g}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for kappa in args.kappa:
        rows = []
        for seed in range(args.seeds):
            p, l2 = problem(args.n, args.d, kappa, seed)
            rows.append({"seed": seed, "l2": l2, "lr": p.lr, **measure(p, args.steps, args.r)})
        summary = {
            f"{key}_{f.__name__}": f(row[key] for row in rows)
            for key in ("cosine", "norm_ratio", "ll_distance")
            for f in (min, max)
        }
        results.append({"condition_number": kappa, **summary, "per_seed": rows})
        print(
            f"condition number {kappa:g}: cosine {summary['cosine_min']:.3f}-"
            f"{summary['cosine_max']:.3f}, norm ratio {summary['norm_ratio_min']:.3f}-"
            f"{summary['norm_ratio_max']:.3f}, LL distance left {summary['ll_distance_min']:.2g}-"
            f"{summary['ll_distance_max']:.2g}",
            flush=True,
        )
    out = {
        "command": "python benchmarks/fd_many_steps.py"
        + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        "1 thread",
        "settings": {
            "problem": "ridge (benchmarks/problems.py), float64, one L2 penalty per feature",
            "n": args.n,
            "d": args.d,
            "ll_steps": args.steps,
            "ll_lr": "1 / lambda_max(H)",
            "r": args.r,
            "seeds": args.seeds,
            "reference": "problems.exact_hypergradient (implicit, at the exact LL minimizer)",
        },
        "results": results,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
