"""Data hyper-cleaning: learn one weight per training example to undo label noise.

The protocol of Franceschi et al. (2017), "Forward and Reverse Gradient-Based Hyperparameter
Optimization", ICML: 5,000 training examples, half of them with their label replaced by a
random other class; 5,000 clean validation examples; the 10,000 test examples. The LL trains
a classifier by gradient descent on the training loss, each example's loss multiplied by its
weight ``sigmoid(logit_i)``; the UL minimizes the validation cross-entropy over the logits.
Examples whose weight ends below 0.5 are flagged as corrupted.

Run: ``python examples/hyper_cleaning.py --method implicit-cg --out runs/hc`` (``--help``).
Data: ``--data-root`` or ``BILEVEL_DATA``, the folder holding ``MNIST/`` and
``FashionMNIST/``. Running the same command again resumes from ``OUT/checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import _common  # the examples/ folder is on sys.path when this file is run as a script
import torch
import torch.nn.functional as F
from torch import nn

import bilevel.ul
from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit, Reverse, Truncated

METHODS = ["reverse", "truncated", "implicit-cg", "implicit-neumann"]
HAS_FORWARD = hasattr(bilevel.ul, "Forward")
# forward mode costs one JVP per scalar hyperparameter per LL step
FORWARD_MAX_HYPERPARAMETERS = 100


def corrupt_labels(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the labels of ``round(fraction * n)`` examples, chosen at random, by a random
    *other* class (uniform over the ``num_classes - 1`` wrong ones).

    Returns:
        ``(noisy_labels, corrupted)``: the new labels and a boolean mask of changed examples.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}.")
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    chosen = torch.randperm(n, generator=g)[: round(fraction * n)]
    shift = torch.randint(1, num_classes, (chosen.numel(),), generator=g)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift.to(labels.device)) % num_classes
    corrupted = torch.zeros(n, dtype=torch.bool, device=labels.device)
    corrupted[chosen] = True
    return noisy, corrupted


def detection_scores(flagged: torch.Tensor, corrupted: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of ``flagged`` as a detector of ``corrupted`` (bool masks)."""
    tp = (flagged & corrupted).sum().item()
    precision = tp / max(flagged.sum().item(), 1)
    recall = tp / max(corrupted.sum().item(), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def make_classifier(model: str, hidden: int, seed: int) -> nn.Module:
    """A linear softmax classifier (zero init) or a one-hidden-layer tanh MLP (seeded init)."""
    if model == "linear":
        net = nn.Linear(784, 10)
        nn.init.zeros_(net.weight)
        nn.init.zeros_(net.bias)
        return net
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, 10))


class ExampleWeights(nn.Module):
    """UL model: one logit per training example; its weight is ``sigmoid(logit)``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def weighted_loss(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, l2: float
) -> torch.Tensor:
    """``sum_i w_i CE_i / sum_i w_i + (l2 / 2) * ||weight matrices||^2``."""
    losses = F.cross_entropy(net(x), y, reduction="none")
    decay = sum((p**2).sum() for name, p in net.named_parameters() if name.endswith("weight"))
    return (weights * losses).sum() / weights.sum() + 0.5 * l2 * decay


def make_objectives(l2: float) -> tuple[Any, Any]:
    """The LL objective (weighted training loss) and the UL objective (validation loss)."""

    def ll_objective(state: dict[str, Any]) -> torch.Tensor:
        weights = state["ul_model"]()
        return weighted_loss(state["ll_model"], state["data"], state["target"], weights, l2)

    def ul_objective(state: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(state["ll_model"](state["data"]), state["target"])

    return ll_objective, ul_objective


def fit(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    l2: float,
    lr: float,
    steps: int,
) -> nn.Module:
    """Plain gradient descent on :func:`weighted_loss` (for the final model, baseline, oracle)."""
    weights = weights.detach()
    params = list(net.parameters())
    for _ in range(steps):
        grads = torch.autograd.grad(weighted_loss(net, x, y, weights, l2), params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-lr)
    return net


def gradient_norm(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, l2: float
) -> float:
    """``||grad_w weighted_loss||``: how far ``net`` is from a stationary point of the LL."""
    grads = torch.autograd.grad(weighted_loss(net, x, y, weights.detach(), l2), net.parameters())
    return torch.cat([g.flatten() for g in grads]).norm().item()


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Classification accuracy of ``net`` on ``(x, y)``."""
    return (net(x).argmax(1) == y).float().mean().item()


def make_calculator(args: argparse.Namespace, common: tuple) -> Any:
    """The UL calculator named by ``--method``."""
    if args.method == "reverse":
        return Reverse(*common)
    if args.method == "truncated":
        return Truncated(*common, truncate_iter=args.truncate)
    if args.method == "forward":  # (its size is checked with the command line)
        return bilevel.ul.Forward(*common)
    solver = args.method.split("-", 1)[1]
    return Implicit(
        *common,
        ll_learning_rate=args.ll_lr,
        k=args.solver_iters,
        tolerance=args.tolerance,
        method=solver,
        alpha=None if solver == "cg" else args.neumann_alpha,
    )


def plot_weights(
    weights: torch.Tensor, corrupted: torch.Tensor, title: str, path: Path
) -> Path | None:
    """Histogram of the learned weights of clean vs corrupted examples; returns ``path``, or
    ``None`` without matplotlib."""
    plt = _common.pyplot()
    if plt is None:
        return None

    w = weights.cpu().numpy()
    c = corrupted.cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [i / 40 for i in range(41)]
    ax.hist(w[~c], bins=bins, alpha=0.6, label=f"clean ({(~c).sum()})", color="tab:blue")
    ax.hist(w[c], bins=bins, alpha=0.6, label=f"corrupted ({c.sum()})", color="tab:red")
    ax.axvline(0.5, color="black", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("learned weight sigmoid(logit)")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=9)
    ax.legend()
    _common.save_figure(fig, path)
    return path


def make_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    methods = [*METHODS, "forward"] if HAS_FORWARD else METHODS
    parser.add_argument(
        "--dataset", choices=sorted(_common.DATASETS), default="mnist", help="MNIST or FashionMNIST"
    )
    parser.add_argument(
        "--model",
        choices=["linear", "mlp"],
        default="linear",
        help="LL classifier: softmax regression, or an MLP with one tanh hidden layer",
    )
    parser.add_argument("--method", choices=methods, default="implicit-cg", help="hypergradient")
    parser.add_argument("--ul-steps", type=_common.count, default=100, help="UL (outer) steps")
    parser.add_argument(
        "--ll-steps", type=_common.count, default=100, help="LL gradient-descent steps"
    )
    parser.add_argument("--ll-lr", type=_common.positive, default=1.0, help="LL learning rate")
    parser.add_argument(
        "--ul-lr", type=_common.positive, default=0.1, help="Adam step on the logits"
    )
    parser.add_argument(
        "--l2", type=_common.nonnegative, default=1e-2, help="LL L2 on weight matrices"
    )
    parser.add_argument("--hidden", type=_common.count, default=32, help="MLP hidden units")
    parser.add_argument(
        "--n-train", type=_common.count, default=5000, help="training examples (random subset)"
    )
    parser.add_argument(
        "--n-val",
        type=_common.count,
        default=5000,
        help="validation examples (disjoint from training)",
    )
    parser.add_argument("--corrupt", type=float, default=0.5, help="fraction of noisy labels")
    parser.add_argument(
        "--truncate", type=_common.count, default=20, help="K for --method truncated"
    )
    parser.add_argument(
        "--solver-iters", type=_common.count, default=20, help="CG / Neumann iterations"
    )
    parser.add_argument(
        "--tolerance", type=_common.positive, default=1e-6, help="CG relative residual"
    )
    parser.add_argument(
        "--neumann-alpha", default="auto", help="Neumann step: 'auto' (1/lambda_max) or a number"
    )
    parser.add_argument(
        "--final-steps",
        type=_common.count,
        default=500,
        help="GD steps of the final/baseline/oracle models",
    )
    parser.add_argument(
        "--log-every",
        type=_common.count,
        default=10,
        help="UL steps between log records (checkpoints: 5x)",
    )
    _common.add_checkpoint_minutes(parser)
    _common.add_run_args(parser, default_out="runs/hyper_cleaning")
    _common.add_mnist_md5_option(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and checked."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.final_steps < args.ll_steps:
        parser.error("--final-steps must be at least --ll-steps.")
    _common.check_subsets(parser, args)
    if args.method == "forward" and args.n_train > FORWARD_MAX_HYPERPARAMETERS:
        parser.error(
            f"--method forward costs one JVP per hyperparameter per LL step: with "
            f"{args.n_train} example weights (--n-train) that is not practical. Use reverse, "
            f"truncated or implicit-*, or --n-train {FORWARD_MAX_HYPERPARAMETERS} or fewer."
        )
    if not 0 <= args.corrupt <= 1:
        parser.error(f"--corrupt is a fraction of the labels, in [0, 1]; got {args.corrupt}.")
    if args.neumann_alpha != "auto":
        try:
            args.neumann_alpha = _common.positive(args.neumann_alpha)
        except argparse.ArgumentTypeError as error:
            parser.error(f"--neumann-alpha is 'auto' or a number: it {error}.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one experiment; write ``results.json`` and the weight histogram to ``--out``."""
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
    (x, y_clean), val, test = data["train"], data["val"], data["test"]
    y, corrupted = corrupt_labels(y_clean, args.corrupt, 10, args.seed)
    x, y, y_clean, corrupted = (t.to(device) for t in (x, y, y_clean, corrupted))
    val = tuple(t.to(device) for t in val)
    test = tuple(t.to(device) for t in test)

    def reference(weights: torch.Tensor) -> dict[str, float]:
        """Train a fresh classifier on the weighted training set; report its accuracy and
        its gradient norm relative to the start, after ``--ll-steps`` and ``--final-steps``."""
        net = make_classifier(args.model, args.hidden, args.seed).to(device)
        start = gradient_norm(net, x, y, weights, args.l2)
        fit(net, x, y, weights, args.l2, args.ll_lr, args.ll_steps)
        at_ll_steps = gradient_norm(net, x, y, weights, args.l2) / start
        fit(net, x, y, weights, args.l2, args.ll_lr, args.final_steps - args.ll_steps)
        return {
            "test_acc": accuracy(net, *test),
            "val_acc": accuracy(net, *val),
            "relative_grad_norm_at_ll_steps": at_ll_steps,
            "relative_grad_norm_at_final_steps": gradient_norm(net, x, y, weights, args.l2) / start,
        }

    baseline = reference(torch.ones(len(y), device=device))
    oracle = reference((~corrupted).float())
    print(f"baseline (all noisy examples): test acc {baseline['test_acc']:.4f}")
    print(f"oracle (clean examples only):  test acc {oracle['test_acc']:.4f}")

    ll_model = make_classifier(args.model, args.hidden, args.seed).to(device)
    ul_model = ExampleWeights(len(y)).to(device)
    ll_objective, ul_objective = make_objectives(args.l2)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=args.ll_lr, iters=args.ll_steps)
    common = (ul_objective, ul_model, ll_objective, ll_model)
    ul = make_calculator(args, common)
    problem = BilevelProblem(ll, ul, torch.optim.Adam(ul_model.parameters(), lr=args.ul_lr))
    checkpoint_every = 5 * args.log_every

    def log(rec: dict[str, Any]) -> None:
        with torch.no_grad():
            w = ul_model()
        keep = ("step", "ul_loss", "ll_loss", "ll_grad_norm", "iterations", "residual_norm")
        keep += ("rhs_norm", "converged", "alpha", "lambda_max")
        entry = {k: rec[k] for k in keep if k in rec and rec[k] is not None}
        entry.update(
            f1=detection_scores(w < 0.5, corrupted)["f1"],
            mean_weight_clean=w[~corrupted].mean().item(),
            mean_weight_corrupted=w[corrupted].mean().item(),
        )
        done = rec["step"]
        record.log(entry, done % checkpoint_every == 0 or done == args.ul_steps)

    identity = {
        "experiment": "hyper_cleaning",
        "dataset": args.dataset,
        "model": args.model,
        "method": args.method,
        "seed": args.seed,
        "command": shlex.join(["python", "examples/hyper_cleaning.py", *command]),
        "settings": {**_common.settings_of(args), "ul_steps": args.ul_steps},
        "hardware": _common.hardware(device),
        **_common.provenance(),
    }
    run.reserve(problem.state_dict())
    try:
        run.run_problem(
            problem,
            lambda step: ((x, y), val),
            steps=args.ul_steps,
            checkpoint_every=checkpoint_every,
            log=log,
            log_every=args.log_every,
            progress=not args.no_progress,
        )
    except FloatingPointError as error:  # a diverged solve or LL: record it, then stop
        failed = {**identity, "error": str(error), "failed_at_ul_step": problem.step_count}
        _common.write_json(out / _common.RESULTS_FILE, failed)
        flags = ("--ll-lr", "--neumann-alpha")
        message = _common.stopped_by(error, args.method, problem.step_count, *flags)
        raise SystemExit(message) from error
    seconds, cpu_seconds = record.seconds, record.cpu_seconds

    with torch.no_grad():
        weights = ul_model()
    scores = detection_scores(weights < 0.5, corrupted)
    final = reference(weights)
    aux = ll.optimize(x, y)
    results = {
        **identity,
        "test_acc": final["test_acc"],
        "val_acc": final["val_acc"],
        "test_acc_ll": accuracy(aux, *test),
        "relative_grad_norm_at_ll_steps": final["relative_grad_norm_at_ll_steps"],
        "relative_grad_norm_at_final_steps": final["relative_grad_norm_at_final_steps"],
        **scores,
        "mean_weight_clean": weights[~corrupted].mean().item(),
        "mean_weight_corrupted": weights[corrupted].mean().item(),
        "ul_steps": problem.step_count,
        "seconds": round(seconds, 2),
        "seconds_per_ul_step": round(seconds / max(problem.step_count, 1), 4),
        "cpu_seconds": round(cpu_seconds, 2),
        # where this invocation resumed, or that it only evaluated a finished run again
        **record.account(problem.step_count),
        "baseline": baseline,
        "oracle": oracle,
        "history": record.history,
    }
    title = (
        f"{args.dataset} {args.model} {args.method}: F1 {scores['f1']:.3f}, "
        f"test acc {final['test_acc']:.4f}"
    )
    _common.write_json(out / _common.RESULTS_FILE, results)
    plotted = plot_weights(weights, corrupted, title, out / "weights_hist.png")
    print(
        f"{args.method}: test acc {final['test_acc']:.4f} (baseline {baseline['test_acc']:.4f}, "
        f"oracle {oracle['test_acc']:.4f}), F1 {scores['f1']:.3f} "
        f"(precision {scores['precision']:.3f}, recall {scores['recall']:.3f}), "
        f"{problem.step_count} UL steps in {seconds:.1f} s"
    )
    if final["relative_grad_norm_at_ll_steps"] > 0.1:
        print(
            f"warning: after {args.ll_steps} LL steps the LL gradient is still "
            f"{final['relative_grad_norm_at_ll_steps']:.0%} of its initial norm: the LL is far "
            "from stationary (Implicit assumes it is). If the LL loss oscillates, --ll-lr is above "
            "2/lambda_max of the LL Hessian: lower it; else raise --ll-steps."
        )
    print(f"wrote {out / _common.RESULTS_FILE}" + (f" and {plotted}" if plotted else ""))
    return results


if __name__ == "__main__":
    main()
