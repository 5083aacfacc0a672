"""Quickstart: learn one L2 penalty per feature of a ridge regression, on generated data.

Only a few of the features carry signal; the rest are noise. The UL minimizes the validation
loss over per-feature penalties, so the penalties of the noise features grow. Needs no
download. Run: ``python examples/quickstart.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit, Reverse, Truncated


class LinearModel(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class FeaturePenalty(nn.Module):
    """UL model: log of one L2 penalty per feature."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.full((features,), -2.0))

    def penalty(self, ll_model: nn.Module) -> torch.Tensor:
        return 0.5 * (self.log_l2.exp() * ll_model.weight**2).sum()


def ll_objective(state: dict) -> torch.Tensor:
    fit = F.mse_loss(state["ll_model"](state["data"]), state["target"])
    return fit + state["ul_model"].penalty(state["ll_model"])


def ul_objective(state: dict) -> torch.Tensor:
    return F.mse_loss(state["ll_model"](state["data"]), state["target"])


def make_data(n: int, features: int, informative: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(features)
    w[:informative] = torch.randn(informative, generator=g)
    x = torch.randn(3 * n, features, generator=g)
    y = x @ w + 0.5 * torch.randn(3 * n, generator=g)
    return (x[:n], y[:n]), (x[n : 2 * n], y[n : 2 * n]), (x[2 * n :], y[2 * n :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method",
        default="implicit-cg",
        choices=["implicit-cg", "implicit-neumann", "implicit-fixed_point", "reverse", "truncated"],
    )
    parser.add_argument("--ul-steps", type=int, default=60)
    parser.add_argument("--ll-steps", type=int, default=200)
    parser.add_argument("--ll-lr", type=float, default=0.15)
    parser.add_argument("--ul-lr", type=float, default=0.05)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--informative", type=int, default=5)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train, val, test = make_data(args.samples, args.features, args.informative, args.seed)
    ll_model, ul_model = LinearModel(args.features), FeaturePenalty(args.features)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=args.ll_lr, iters=args.ll_steps)
    common = (ul_objective, ul_model, ll_objective, ll_model)
    if args.method.startswith("implicit"):
        solver = args.method.split("-")[1]
        ul = Implicit(
            *common,
            ll_learning_rate=args.ll_lr,
            k=20,
            method=solver,
            alpha="auto" if solver != "cg" else None,
        )
    elif args.method == "reverse":
        ul = Reverse(*common)
    else:
        ul = Truncated(*common, truncate_iter=10)
    problem = BilevelProblem(ll, ul, torch.optim.Adam(ul_model.parameters(), lr=args.ul_lr))

    def show(record: dict) -> None:
        solver = ""
        if "residual_norm" in record:
            solver = (
                f"  solver: {record['iterations']} it, residual "
                f"{record['residual_norm']:.1e}, converged={record['converged']}"
            )
        print(
            f"UL step {record['step']:4d}  val loss {record['ul_loss']:.4f}  "
            f"LL loss {record['ll_loss']:.4f}{solver}"
        )

    problem.run(
        lambda step: (train, val), steps=args.ul_steps, log=show, log_every=10, progress=False
    )
    aux = ll.optimize(*train)
    test_mse = ul_objective({"data": test[0], "target": test[1], "ll_model": aux}).item()
    penalties = ul_model.log_l2.detach().exp()
    print(f"test MSE {test_mse:.4f}")
    print(
        f"mean L2 penalty: informative features {penalties[: args.informative].mean():.3g}, "
        f"noise features {penalties[args.informative :].mean():.3g}"
    )


if __name__ == "__main__":
    main()
