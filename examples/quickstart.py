"""Quickstart: learn one L2 penalty per feature of a ridge regression, on generated data.

Only a few of the features carry signal; the rest are noise. The UL minimizes the validation
loss over per-feature penalties, so the penalties of the noise features grow. Needs no
download. Run: ``python examples/quickstart.py`` (``--help`` for the options). With
``--out DIR`` it also writes ``DIR/results.json`` and a checkpoint that the same command
resumes from (after SIGTERM or Ctrl-C too); without it, nothing is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

import _common  # the examples/ folder is on sys.path when this file is run as a script
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit, Reverse, Truncated

METHODS = ["implicit-cg", "implicit-neumann", "implicit-fixed_point", "reverse", "truncated"]


class LinearModel(nn.Module):
    """LL model: a linear regression without bias."""

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
    """Training MSE plus the per-feature penalties."""
    fit = F.mse_loss(state["ll_model"](state["data"]), state["target"])
    return fit + state["ul_model"].penalty(state["ll_model"])


def ul_objective(state: dict) -> torch.Tensor:
    """Validation MSE."""
    return F.mse_loss(state["ll_model"](state["data"]), state["target"])


def make_data(n: int, features: int, informative: int, seed: int) -> tuple:
    """Train, validation and test sets of ``n`` examples each: ``y = x w + noise`` with only
    the first ``informative`` entries of ``w`` nonzero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(features)
    w[:informative] = torch.randn(informative, generator=g)
    x = torch.randn(3 * n, features, generator=g)
    y = x @ w + 0.5 * torch.randn(3 * n, generator=g)
    return (x[:n], y[:n]), (x[n : 2 * n], y[n : 2 * n]), (x[2 * n :], y[2 * n :])


def make_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--method", default="implicit-cg", choices=METHODS, help="hypergradient")
    parser.add_argument("--ul-steps", type=_common.count, default=60, help="UL (outer) steps")
    parser.add_argument(
        "--ll-steps", type=_common.count, default=200, help="LL gradient-descent steps"
    )
    parser.add_argument("--ll-lr", type=_common.positive, default=0.15, help="LL learning rate")
    parser.add_argument(
        "--ul-lr", type=_common.positive, default=0.05, help="Adam step on the log penalties"
    )
    parser.add_argument(
        "--features", type=_common.count, default=30, help="features of the regression"
    )
    parser.add_argument(
        "--informative", type=int, default=5, help="features that carry signal (the first ones)"
    )
    parser.add_argument(
        "--samples",
        type=_common.count,
        default=60,
        help="examples in each of train, validation, test",
    )
    parser.add_argument(
        "--tolerance",
        type=_common.positive,
        default=1e-5,
        help="relative residual at which the implicit solver stops; the run is in float32, "
        "whose round-off keeps the residual near 1e-7, so 1e-10 would never be reached",
    )
    parser.add_argument("--seed", type=_common.seed, default=0, help="random seed (data and run)")
    parser.add_argument(
        "--out",
        type=_common.folder,
        default=None,
        help="output folder for results.json and checkpoint.pt, which the same command "
        "resumes from; if not given, nothing is written",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and checked."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.informative <= args.features:
        parser.error("--informative must lie between 0 and --features")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the quickstart; with ``--out``, write ``results.json`` and the checkpoint."""
    args = parse_args(argv)
    command = sys.argv[1:] if argv is None else argv
    with _common.Run(args.out, _common.settings_of(args), steps=args.ul_steps) as run:
        return experiment(args, run, command)


def experiment(args: argparse.Namespace, run: _common.Run, command: list[str]) -> dict[str, Any]:
    """The body of :func:`main`, in its open :class:`_common.Run`."""
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
            tolerance=args.tolerance,
            method=solver,
            alpha="auto" if solver != "cg" else None,
        )
    elif args.method == "reverse":
        ul = Reverse(*common)
    else:
        ul = Truncated(*common, truncate_iter=10)
    problem = BilevelProblem(ll, ul, torch.optim.Adam(ul_model.parameters(), lr=args.ul_lr))
    log_every = checkpoint_every = 10
    record = run.record
    if record is not None:
        record.note_invocation(_common.invocation(torch.device("cpu")))

    def show(entry: dict) -> None:
        solver = ""
        if "residual_norm" in entry:
            relative = entry["residual_norm"] / max(entry.get("rhs_norm") or 0.0, 1e-300)
            verdict = "converged" if entry["converged"] else "not converged"
            solver = (
                f"  solver: {entry['iterations']} it, relative residual {relative:.1e} "
                f"({verdict} at tolerance {args.tolerance:g}, float32)"
            )
        print(
            f"UL step {entry['step']:4d}  val loss {entry['ul_loss']:.4f}  "
            f"LL loss {entry['ll_loss']:.4f}{solver}"
        )
        if record is not None:
            keep = ("step", "ul_loss", "ll_loss", "iterations", "residual_norm", "converged")
            done = entry["step"]
            record.log(
                {k: entry[k] for k in keep if entry.get(k) is not None},
                done % checkpoint_every == 0 or done == args.ul_steps,
            )

    run.reserve(problem.state_dict())
    run.run_problem(
        problem,
        lambda step: (train, val),
        steps=args.ul_steps,
        stop=(args.method, "--ll-lr"),
        checkpoint_every=checkpoint_every,
        log=show,
        log_every=log_every,
        progress=False,
    )
    aux = ll.optimize(*train)
    test_mse = ul_objective({"data": test[0], "target": test[1], "ll_model": aux}).item()
    penalties = ul_model.log_l2.detach().exp()
    informative = penalties[: args.informative].mean().item()
    noise = penalties[args.informative :].mean().item()
    print(f"test MSE {test_mse:.4f}")
    print(f"mean L2 penalty: informative features {informative:.3g}, noise features {noise:.3g}")
    results = {
        "experiment": "quickstart",
        "method": args.method,
        "command": shlex.join(["python", "examples/quickstart.py", *command]),
        "test_mse": test_mse,
        "mean_l2_informative": informative,
        "mean_l2_noise": noise,
        "log_l2": ul_model.log_l2.detach().tolist(),
        "ul_steps": problem.step_count,
        "settings": {**_common.settings_of(args), "ul_steps": args.ul_steps},
    }
    if record is not None:
        results.update(
            seconds=round(record.seconds, 3),
            # where this invocation resumed, or that it only evaluated a finished run again
            **record.account(problem.step_count),
            history=record.history,
            hardware=_common.hardware(torch.device("cpu")),
            **_common.provenance(),
        )
        _common.write_json(run.out / _common.RESULTS_FILE, results)
        print(f"wrote {run.out / _common.RESULTS_FILE}")
    return results


if __name__ == "__main__":
    main()
