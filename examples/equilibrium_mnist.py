"""An equilibrium model on MNIST, trained through the implicit hypergradient of its fixed point.

The hidden state of each image is the fixed point ``z = tanh(gamma W z / ||W||_F + U x + b)``
(a contraction for ``gamma < 1``), found by ``FixedPointMap`` iterations; a linear classifier
reads ``z``. The weights ``W, U, b`` and the classifier are the UL variables; the hidden
states are the LL variable, one row per image of the batch. The UL gradient comes from
``Implicit(method="fixed_point")``: ``(I - dPhi/dz)^T q = grad_z loss`` solved by the
fixed-point iteration of the adjoint, with no graph through the forward iterations (memory
does not grow with them), as in deep equilibrium models (Bai, Kolter & Koltun 2019) and
hypertorch's equilibrium example (Grazzi et al. 2020).

Run: ``python examples/equilibrium_mnist.py --out runs/deq`` (``--help``). Data:
``--data-root`` or ``BILEVEL_DATA``. Running the same command again resumes.
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
from bilevel.ll import FixedPointMap
from bilevel.ul import Implicit, Reverse

TRAIN_IMAGES = 60000 - 10000  # MNIST's training set, less the 10,000 held out for validation


class Equilibrium(nn.Module):
    """UL model: the layer's weights and the classifier that reads its fixed point."""

    def __init__(self, hidden: int, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma
        self.w = nn.Parameter(torch.randn(hidden, hidden) / hidden)
        self.inject = nn.Linear(784, hidden)
        self.classifier = nn.Linear(hidden, 10)

    def layer(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``tanh(gamma W z / ||W||_F + U x + b)`` for a batch of hidden states ``z``."""
        w = self.gamma * self.w / self.w.norm()  # spectral norm <= Frobenius: a contraction
        return torch.tanh(z @ w.T + self.inject(x))


class Hidden(nn.Module):
    """LL model: the hidden states of one batch (their starting point, zeros)."""

    def __init__(self, batch: int, hidden: int) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.zeros(batch, hidden))


def fixed_point_map(state: dict[str, Any]) -> list[torch.Tensor]:
    """One iteration of the layer on the batch."""
    return [state["ul_model"].layer(state["ll_model"].z, state["data"])]


def ul_objective(state: dict[str, Any]) -> torch.Tensor:
    """Cross-entropy of the classifier at the fixed point."""
    return F.cross_entropy(state["ul_model"].classifier(state["ll_model"].z), state["target"])


def accuracy(ll: FixedPointMap, model: Equilibrium, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy on all of ``x``: the fixed point of each batch, without a graph. The LL
    state has one row per example of a batch of fixed size, and each row's iteration is its
    own; a last, partial batch is filled up with the first examples, which are not counted."""
    batch, correct = ll.ll_model.z.shape[0], 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            index = torch.arange(start, start + batch) % len(x)
            z = ll.run(x[index], y[index], differentiable_steps=0).weights[0]
            real = min(batch, len(x) - start)
            correct += int((model.classifier(z[:real]).argmax(1) == y[start : start + real]).sum())
    return correct / len(x)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_run_args(parser, "runs/equilibrium_mnist")
    _common.add_mnist_md5_option(parser)
    _common.add_checkpoint_minutes(parser)
    parser.add_argument(
        "--method",
        choices=["implicit", "reverse"],
        default="implicit",
        help="UL gradient: implicit (fixed-point adjoint) or reverse (unrolled)",
    )
    parser.add_argument(
        "--hidden", type=_common.count, default=64, help="hidden units (default: 64)"
    )
    parser.add_argument(
        "--gamma",
        type=_common.positive,
        default=0.9,
        help="contraction factor of the recurrent weight (default: 0.9)",
    )
    parser.add_argument(
        "--batch", type=_common.count, default=250, help="images per UL step (default: 250)"
    )
    parser.add_argument(
        "--ll-steps",
        type=_common.count,
        default=25,
        help="fixed-point iterations per UL step (default: 25)",
    )
    parser.add_argument(
        "--adjoint-steps",
        type=_common.count,
        default=25,
        help="iterations of the adjoint system (Implicit's k, default: 25)",
    )
    parser.add_argument(
        "--ul-steps",
        type=_common.count,
        default=480,
        help="UL steps (default: 480 of 250 images, 2.4 passes over the 50,000 training images)",
    )
    parser.add_argument(
        "--ul-lr", type=_common.positive, default=2e-3, help="Adam step size (default: 2e-3)"
    )
    args = parser.parse_args(argv)
    if not args.gamma < 1:
        parser.error(
            f"--gamma must lie in (0, 1): the recurrent layer is a contraction (a fixed point "
            f"exists and the iteration reaches it) only for gamma < 1; got {args.gamma}."
        )
    if args.batch > TRAIN_IMAGES:
        parser.error(
            f"--batch must be at most the {TRAIN_IMAGES} training images; got {args.batch}."
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the equilibrium model; write ``results.json`` to ``--out``."""
    command = sys.argv[1:] if argv is None else argv
    args = parse_args(command)
    settings = _common.settings_of(args)
    with _common.Run(
        args.out, settings, args.checkpoint_minutes, args.threads, steps=args.ul_steps
    ) as run:
        return experiment(args, run, command)


def experiment(args: argparse.Namespace, run: _common.Run, command: list[str]) -> dict[str, Any]:
    """The body of :func:`main`, in its open :class:`_common.Run` (folder checked and locked,
    signals handled)."""
    torch.manual_seed(args.seed)
    device, out, record = torch.device(args.device), run.out, run.record
    record.note_invocation(_common.invocation(device))
    options = _common.data_options(args)  # --download, --no-check-md5
    data = _common.mnist_split(args.data_root, "mnist", TRAIN_IMAGES, 10000, args.seed, **options)
    x, y = (t.to(device) for t in data["train"])
    x_val, y_val = (t.to(device) for t in data["val"])
    x_test, y_test = (t.to(device) for t in data["test"])

    model = Equilibrium(args.hidden, args.gamma).to(device)
    ll = FixedPointMap(
        fixed_point_map, Hidden(args.batch, args.hidden).to(device), model, iters=args.ll_steps
    )
    common = (ul_objective, model, fixed_point_map, ll.ll_model)
    if args.method == "implicit":
        ul = Implicit(*common, k=args.adjoint_steps, method="fixed_point", tolerance=1e-6)
    else:
        ul = Reverse(*common)
    problem = BilevelProblem(ll, ul, torch.optim.Adam(model.parameters(), lr=args.ul_lr))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    per_epoch = len(x) // args.batch

    def batch(step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        rows = order[(step % per_epoch) * args.batch :][: args.batch]
        pair = (x[rows], y[rows])
        return pair, pair  # the classifier's loss is on the batch whose fixed point is found

    def log(rec: dict[str, Any]) -> None:
        keep = ("step", "ul_loss", "ll_loss", "iterations", "residual_norm", "rhs_norm")
        record.log({k: rec[k] for k in keep if rec.get(k) is not None}, True)

    run.reserve(problem.state_dict())
    run.run_problem(
        problem,
        batch,
        steps=args.ul_steps,
        checkpoint_every=40,
        log=log,
        log_every=40,
        progress=not args.no_progress,
    )
    seconds = record.seconds
    val_acc = accuracy(ll, model, x_val, y_val)
    test_acc = accuracy(ll, model, x_test, y_test)
    results = {
        "experiment": "equilibrium_mnist",
        "method": args.method,
        "seed": args.seed,
        "command": shlex.join(["python", "examples/equilibrium_mnist.py", *command]),
        "test_acc": test_acc,
        "val_acc": val_acc,
        "ul_steps": problem.step_count,
        "seconds": round(seconds, 2),
        "seconds_per_ul_step": round(seconds / max(problem.step_count, 1), 4),
        # where this invocation resumed, or that it only evaluated a finished run again
        **record.account(problem.step_count),
        "settings": _common.settings_of(args),
        "hardware": _common.hardware(device),
        **_common.provenance(),
        "history": record.history,
    }
    _common.write_json(out / _common.RESULTS_FILE, results)
    print(
        f"{args.method}: test accuracy {test_acc:.4f} after {problem.step_count} UL steps "
        f"({seconds:.1f} s); wrote {out / _common.RESULTS_FILE}"
    )
    return results


if __name__ == "__main__":
    main()
