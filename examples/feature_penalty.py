"""Per-pixel L2 penalties: learn one weight-decay coefficient per input pixel on MNIST.

The classic demonstration of many hyperparameters (Pedregosa 2016, HOAG; Lorraine et al.
2020): a 10-class logistic regression trained on a small subset of MNIST, with the penalty
``sum_j exp(log_l2_j) / 2 * ||W[:, j]||^2`` (784 hyperparameters, one per pixel), tuned on a
validation subset by implicit differentiation with conjugate gradient. The learned penalty is
saved as a 28x28 image. Pixels that never vary in the training subset get no hypergradient
and keep their initial penalty (their weights stay zero anyway).

Run: ``python examples/feature_penalty.py --out runs/feature_penalty`` (``--help``). Data:
``--data-root`` or ``BILEVEL_DATA``. Running the same command again resumes.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import _common  # the examples/ folder is on sys.path when this file is run as a script
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Forward, Implicit, Reverse


class PixelPenalty(nn.Module):
    """UL model: the log of one L2 penalty per input feature."""

    def __init__(self, features: int, init: float) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.full((features,), math.log(init)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``sum_j exp(log_l2_j) / 2 * ||weight[:, j]||^2`` for a ``(classes, features)``
        weight matrix."""
        return 0.5 * (self.log_l2.exp() * (weight**2).sum(0)).sum()


def penalized_loss(net: nn.Linear, x: torch.Tensor, y: torch.Tensor, penalty: Any) -> torch.Tensor:
    """Mean cross-entropy plus the penalty of the weight matrix (the bias is not penalized)."""
    return F.cross_entropy(net(x), y) + penalty(net.weight)


def ll_objective(state: dict[str, Any]) -> torch.Tensor:
    """Training loss with the per-pixel penalties."""
    return penalized_loss(state["ll_model"], state["data"], state["target"], state["ul_model"])


def ul_objective(state: dict[str, Any]) -> torch.Tensor:
    """Validation cross-entropy."""
    return F.cross_entropy(state["ll_model"](state["data"]), state["target"])


def train_logistic(
    x: torch.Tensor, y: torch.Tensor, penalty: Any, lr: float, steps: int
) -> nn.Linear:
    """A fresh zero-initialized logistic regression trained by plain gradient descent."""
    net = nn.Linear(x.shape[1], 10).to(x)
    nn.init.zeros_(net.weight)
    nn.init.zeros_(net.bias)
    params = list(net.parameters())
    for _ in range(steps):
        grads = torch.autograd.grad(penalized_loss(net, x, y, penalty), params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-lr)
    return net


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Classification accuracy of ``net`` on ``(x, y)``."""
    return (net(x).argmax(1) == y).float().mean().item()


def scalar_penalty(value: float) -> Any:
    """One L2 coefficient shared by every pixel."""
    return lambda weight: 0.5 * value * (weight**2).sum()


def plot_penalty(
    log_l2: torch.Tensor, varying: torch.Tensor, title: str, path: Path
) -> Path | None:
    """The learned penalties as a 28x28 image of log10(l2); pixels with no hypergradient (no
    variance in the training subset) are left blank. Returns ``path``, or ``None`` without
    matplotlib."""
    plt = _common.pyplot()
    if plt is None:
        return None

    image = (log_l2 / math.log(10)).detach().cpu().clone()
    image[~varying.cpu()] = float("nan")
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    shown = ax.imshow(image.reshape(28, 28).numpy(), cmap="viridis")
    fig.colorbar(shown, ax=ax, label="log10 of the L2 penalty")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    _common.save_figure(fig, path)
    return path


def make_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--dataset", choices=sorted(_common.DATASETS), default="mnist", help="MNIST or FashionMNIST"
    )
    parser.add_argument(
        "--method",
        choices=["implicit-cg", "reverse", "forward"],
        default="implicit-cg",
        help="forward costs one JVP per pixel (784) per LL step: for timing comparisons only",
    )
    parser.add_argument("--ul-steps", type=_common.count, default=100, help="UL (outer) steps")
    parser.add_argument(
        "--ll-steps", type=_common.count, default=200, help="LL gradient-descent steps"
    )
    parser.add_argument("--ll-lr", type=_common.positive, default=1.0, help="LL learning rate")
    parser.add_argument(
        "--ul-optimizer", choices=["adam", "sgd"], default="adam", help="UL optimizer"
    )
    parser.add_argument(
        "--ul-lr", type=_common.positive, default=0.03, help="UL step on log penalties"
    )
    parser.add_argument("--init-l2", type=_common.positive, default=1e-2, help="initial penalty")
    parser.add_argument(
        "--n-train",
        type=_common.two_or_more,
        default=1000,
        help="training examples (random subset; at least 2: the learned penalties are read on "
        "the pixels that vary across them)",
    )
    parser.add_argument(
        "--n-val",
        type=_common.count,
        default=5000,
        help="validation examples (disjoint from training)",
    )
    parser.add_argument(
        "--cg-iters", type=_common.count, default=30, help="CG iterations (implicit-cg)"
    )
    parser.add_argument(
        "--tolerance", type=_common.positive, default=1e-6, help="CG relative residual"
    )
    parser.add_argument(
        "--final-steps",
        type=_common.count,
        default=1000,
        help="GD steps of the final and reference models",
    )
    parser.add_argument(
        "--log-every",
        type=_common.count,
        default=10,
        help="UL steps between log records (checkpoints: 5x)",
    )
    _common.add_checkpoint_minutes(parser)
    _common.add_run_args(parser, default_out="runs/feature_penalty")
    _common.add_mnist_md5_option(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and checked."""
    parser = make_parser()
    args = parser.parse_args(argv)
    _common.check_subsets(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one experiment; write ``results.json`` and the penalty image to ``--out``."""
    args = parse_args(argv)
    command = sys.argv[1:] if argv is None else argv
    settings = _common.settings_of(args)
    with _common.Run(
        args.out, settings, args.checkpoint_minutes, args.threads, steps=args.ul_steps
    ) as run:
        return experiment(args, run, command)


def experiment(args: argparse.Namespace, run: _common.Run, command: list[str]) -> dict[str, Any]:
    """The body of :func:`main`, in its open :class:`_common.Run` (folder checked and locked,
    signals handled)."""
    device, out, record = torch.device(args.device), run.out, run.record
    record.note_invocation(_common.invocation(device))

    options = _common.data_options(args)  # --download, --no-check-md5
    data = _common.mnist_split(
        args.data_root, args.dataset, args.n_train, args.n_val, args.seed, **options
    )
    train, val, test = (tuple(t.to(device) for t in data[k]) for k in ("train", "val", "test"))
    varying = train[0].std(0) > 0

    # references: one penalty for all pixels, the initial one and the best of a grid on val
    grid = [10.0**e for e in range(-5, 1)]
    scalar = {}
    for value in grid:
        net = train_logistic(*train, scalar_penalty(value), args.ll_lr, args.final_steps)
        scalar[value] = {"val_acc": accuracy(net, *val), "test_acc": accuracy(net, *test)}
    best = max(grid, key=lambda v: scalar[v]["val_acc"])
    print(f"best single L2 on val: {best:g}, test acc {scalar[best]['test_acc']:.4f}")

    ll_model = nn.Linear(784, 10).to(device)
    nn.init.zeros_(ll_model.weight)
    nn.init.zeros_(ll_model.bias)
    ul_model = PixelPenalty(784, args.init_l2).to(device)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=args.ll_lr, iters=args.ll_steps)
    common = (ul_objective, ul_model, ll_objective, ll_model)
    if args.method == "implicit-cg":
        ul = Implicit(
            *common, ll_learning_rate=args.ll_lr, k=args.cg_iters, tolerance=args.tolerance
        )
    elif args.method == "reverse":
        ul = Reverse(*common)
    else:
        ul = Forward(*common)
    optimizer = torch.optim.Adam if args.ul_optimizer == "adam" else torch.optim.SGD
    problem = BilevelProblem(ll, ul, optimizer(ul_model.parameters(), lr=args.ul_lr))
    checkpoint_every = 5 * args.log_every

    def log(rec: dict[str, Any]) -> None:
        keep = ("step", "ul_loss", "ll_loss", "ll_grad_norm", "iterations", "residual_norm")
        entry = {k: rec[k] for k in (*keep, "rhs_norm") if rec.get(k) is not None}
        done = rec["step"]
        record.log(entry, done % checkpoint_every == 0 or done == args.ul_steps)

    run.reserve(problem.state_dict())
    run.run_problem(
        problem,
        lambda step: (train, val),
        steps=args.ul_steps,
        stop=(args.method, "--ll-lr"),
        checkpoint_every=checkpoint_every,
        log=log,
        log_every=args.log_every,
        progress=not args.no_progress,
    )
    seconds, cpu_seconds = record.seconds, record.cpu_seconds

    with torch.no_grad():
        learned = ul_model.log_l2.exp()
    per_pixel = lambda weight: 0.5 * (learned * (weight**2).sum(0)).sum()  # noqa: E731
    net = train_logistic(*train, per_pixel, args.ll_lr, args.final_steps)
    final = {"val_acc": accuracy(net, *val), "test_acc": accuracy(net, *test)}
    initial = scalar_penalty(args.init_l2)
    net0 = train_logistic(*train, initial, args.ll_lr, args.final_steps)
    results = {
        "experiment": "feature_penalty",
        "dataset": args.dataset,
        "method": args.method,
        "seed": args.seed,
        "command": shlex.join(["python", "examples/feature_penalty.py", *command]),
        "test_acc": final["test_acc"],
        "val_acc": final["val_acc"],
        "initial_penalty": {"l2": args.init_l2, "test_acc": accuracy(net0, *test)},
        "best_single_penalty": {"l2": best, **scalar[best]},
        "single_penalty_grid": {f"{v:g}": scalar[v] for v in grid},
        "learned_l2": {
            "min": learned[varying].min().item(),
            "median": learned[varying].median().item(),
            "max": learned[varying].max().item(),
        },
        "varying_pixels": int(varying.sum()),
        "ul_steps": problem.step_count,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "seconds_per_ul_step": round(seconds / max(problem.step_count, 1), 4),
        # where this invocation resumed, or that it only evaluated a finished run again
        **record.account(problem.step_count),
        "settings": {**_common.settings_of(args), "ul_steps": args.ul_steps},
        "hardware": _common.hardware(device),
        **_common.provenance(),
        "history": record.history,
    }
    title = f"{args.dataset}, {args.method}: test acc {final['test_acc']:.4f}"
    _common.write_json(out / _common.RESULTS_FILE, results)
    plotted = plot_penalty(ul_model.log_l2, varying, title, out / "penalty.png")
    print(
        f"{args.method}: test acc {final['test_acc']:.4f} with per-pixel penalties (single "
        f"penalty {args.init_l2:g}: {results['initial_penalty']['test_acc']:.4f}, best single "
        f"{best:g}: {scalar[best]['test_acc']:.4f}), {problem.step_count} UL steps in "
        f"{seconds:.1f} s"
    )
    print(f"wrote {out / _common.RESULTS_FILE}" + (f" and {plotted}" if plotted else ""))
    return results


if __name__ == "__main__":
    main()
