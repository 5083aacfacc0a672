"""Few-shot Omniglot: MAML, first-order MAML, iMAML, Reptile, Meta-SGD and hyper-representation.

Every method is a :class:`bilevel.BilevelProblem` over the 4-conv network of
:mod:`bilevel.models`, stepped on meta-batches of tasks (``problem.meta_step(batch)``):

- ``maml``: the UL variables are the network's initial weights, the LL adapts all of them
  by gradient descent, ``Reverse`` differentiates through the LL steps (Finn et al. 2017);
- ``fomaml``: the same with ``FirstOrder`` (Finn et al. 2017; Nichol et al. 2018);
- ``imaml``: the LL objective is ``task loss + reg/2 ||w - theta||^2``, ``Implicit`` with
  conjugate gradient (Rajeswaran et al. 2019);
- ``reptile``: the initial weights moved towards the weights adapted on each task's support
  and query images together, ``Reptile`` stepped by SGD (Nichol, Achiam & Schulman 2018);
- ``metasgd``: MAML with one learned step size per weight (Li et al. 2017, "Meta-SGD"), the
  step sizes UL variables beside the initialization;
- ``hyperrep``: the UL variables are the conv trunk, the LL is a linear head per task,
  started at zero, with ``--ul-method reverse | truncated | implicit`` (Franceschi et al.
  2018, "Bilevel Programming for Hyperparameter Optimization and Meta-Learning", ICML);
  ``--ll bda`` steps the head on BDA's aggregation of the query and support losses (Liu et
  al. 2020) instead of plain gradient descent.

Evaluation on a task: adapt on the support set (the LL, without any UL graph), accuracy on
the query set. Batch normalization always uses the statistics of the batch it sees (as in
MAML's code), so evaluation is transductive: the query images of a task are normalized
together. Test accuracy: the mean over ``--eval-tasks`` meta-test tasks with its 95%
confidence interval, taken with the best model on ``--val-tasks`` meta-validation tasks.

Run: ``python examples/omniglot.py --method maml --out runs/omniglot/maml-5w1s`` (``--help``).
Data: ``--data-root`` or ``BILEVEL_DATA``, the folder holding ``omniglot/`` (``--download``
fetches missing zips, ``--no-check-md5`` takes zips of unknown md5). Running the same command
again resumes from ``OUT/checkpoint.pt`` (a larger ``--meta-steps`` or
``--budget-cpu-minutes`` extends the run). ``--budget-cpu-minutes`` gives every method the
same compute: meta-training stops once its CPU time, validation excluded, reaches it.
Writes ``OUT/log.csv``, ``OUT/curve.png``, ``OUT/best.pt`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import _common  # the examples/ folder is on sys.path when this file is run as a script
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bilevel import BilevelProblem, checkpoint, distributed
from bilevel.data import SPLIT_SIZES, Omniglot, TaskSampler
from bilevel.data.omniglot import N_DRAWINGS
from bilevel.ll import BDA, GradientDescent, LowerLevelDivergenceError, PerElement
from bilevel.models import ConvNet4, FewShotNet
from bilevel.ul import FirstOrder, Implicit, Reptile, Reverse, Truncated

METHODS = ("maml", "fomaml", "imaml", "reptile", "metasgd", "hyperrep")
UL_METHODS = ("reverse", "truncated", "implicit")
#: the UL calculator each meta-learning method is defined by
FIXED_UL_METHOD = {
    "maml": "reverse",
    "fomaml": "first_order",
    "imaml": "implicit",
    "reptile": "reptile",
    "metasgd": "reverse",
}
#: per-method defaults of the LL (inner loop); MAML's are those of Finn et al. (2017).
#: First-order MAML drops the factor (I - lr H) of each inner step, and with one step of 0.4
#: on this network lr * eig(H) spans about [-80, 50] at initialization and [-4, 7.5] at a
#: MAML-trained point: far from I. It learns with small steps (several, as Nichol et al. 2018
#: run it); see benchmarks/omniglot_diagnosis.py.
INNER_DEFAULTS = {
    "maml": {"inner_steps": 1, "inner_lr": 0.4},
    "fomaml": {"inner_steps": 5, "inner_lr": 0.1},
    "imaml": {"inner_steps": 20, "inner_lr": 0.05},
    "reptile": {"inner_steps": 5, "inner_lr": 0.1},
    "metasgd": {"inner_steps": 1, "inner_lr": 0.4},
    "hyperrep": {"inner_steps": 10, "inner_lr": 0.1},
}
#: the UL optimizer and its step: Adam for the hypergradient methods; Reptile's direction
#: ``theta - w_T`` is not a gradient, and its paper steps it with SGD (outer step 1)
META_DEFAULTS = {"reptile": ("sgd", 1.0)}
#: the classes of each split as the example samples them: each character in 4 rotations
#: (``Omniglot.split(name)``, rotations on), so the meta-validation split has the fewest
SPLIT_CLASSES = {name: 4 * characters for name, characters in SPLIT_SIZES.items()}
SPLIT_LABELS = {"train": "meta-training", "val": "meta-validation", "test": "meta-test"}
#: task seeds of the meta-validation and meta-test samplers (fixed, so that every run and
#: every method is evaluated on the same tasks); meta-training tasks use --seed
VAL_SEED, TEST_SEED = 1, 2
#: arguments that may change when a run is resumed (the experiment stays the same)
RESUMABLE = (
    "meta_steps",
    "budget_cpu_minutes",
    "eval_tasks",
    "max_minutes",
    "checkpoint_minutes",
    "cache_dir",
)
LOG_FIELDS = (
    "step",
    "seconds",
    "cpu_seconds",
    "val_cpu_seconds",
    "loss",
    "accuracy",
    "ll_loss",
    "val_accuracy",
    "val_ci95",
    "cg_iterations",
    "cg_diverged",
    "ll_grad_ratio",
    "skipped",
)
#: settings added after runs were made, with their defaults: a run's settings (compared when
#: it resumes) record them only when they differ, so that the older runs resume
ADDED_SETTINGS = {"on_failed_step": "stop", "feature_norm": None}
#: with --on-failed-step skip, this many failed meta-steps in a row stop meta-training
MAX_SKIPS_IN_A_ROW = 20


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval, ``1.96 * std / sqrt(n)``."""
    values = values.double()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(n)


class MetaSGD(nn.Module):
    """A network's initialization and one learned step size per weight (Li et al. 2017,
    "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

    Args:
        net: the network whose weights are the initialization.
        lr: the step sizes' initial value.
    """

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = nn.ParameterList(
            nn.Parameter(torch.full_like(p.detach(), lr)) for p in net.parameters()
        )


class Experiment:
    """The models, objectives and bilevel problem of one method, and few-shot evaluation.

    Attributes:
        ul_model: the meta-learned module (the whole network, or the conv trunk).
        ll_model: the module the LL adapts (the same network, or a zero linear head).
        problem: the :class:`BilevelProblem` that meta-training steps.
        query_accuracy: accuracies recorded by the UL objective since the last read.
    """

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        torch.manual_seed(args.seed)
        if args.method == "hyperrep":
            self.ul_model = ConvNet4(hidden=args.hidden).to(device)
            self.ll_model = nn.Linear(self.ul_model.out_features, args.ways).to(device)
            nn.init.zeros_(self.ll_model.weight)
            nn.init.zeros_(self.ll_model.bias)
        elif args.method == "metasgd":
            self.ll_model = FewShotNet(args.ways, hidden=args.hidden).to(device)
            self.ul_model = MetaSGD(self.ll_model, args.inner_lr).to(device)
        else:
            self.ul_model = self.ll_model = FewShotNet(args.ways, hidden=args.hidden).to(device)
        self.query_accuracy: list[torch.Tensor] = []
        # Meta-SGD's step sizes are UL leaves shaped like the weights, marked per-element: a
        # bias of --ways entries would otherwise also read as a schedule of as many LL steps
        if args.method == "metasgd":
            lr = [PerElement(t) for t in self.ul_model.lr]
        else:
            lr = args.inner_lr
        models = (self.ll_model, self.ul_model, lr, args.inner_steps)
        if args.ll == "bda":
            ll = BDA(
                self.ll_objective,
                *models,
                ul_objective=self.ul_objective,
                alpha=args.bda_alpha,
                alpha_decay=args.bda_alpha_decay,
            )
        else:
            ll = GradientDescent(self.ll_objective, *models)
        common = (self.ul_objective, self.ul_model, self.ll_objective, self.ll_model)
        if args.ul_method == "reptile":
            ul = Reptile(*common)
        elif args.ul_method == "reverse":
            ul = Reverse(*common)
        elif args.ul_method == "truncated":
            ul = Truncated(*common, truncate_iter=args.truncate)
        elif args.ul_method == "first_order":
            ul = FirstOrder(*common)
        else:
            # the LL Hessian of a network need not be positive definite away from a minimum
            # (iMAML under batch norm: H + reg I is indefinite on most tasks); truncated CG
            # then returns an iterate that can be thousands of times too large, which stalls
            # Adam, and MINRES (the default for imaml) does not. A solver's trouble is
            # reported (cg_diverged in the log) and meta-training goes on
            ul = Implicit(
                *common,
                ll_learning_rate=args.inner_lr,
                k=args.cg_steps,
                tolerance=args.cg_tolerance,
                method=args.solver,
                on_divergence="warn",
                damping=args.damping or 0.0,
            )
        if args.meta_optimizer == "sgd":
            optimizer = torch.optim.SGD(self.ul_model.parameters(), lr=args.meta_lr)
        else:
            optimizer = torch.optim.Adam(self.ul_model.parameters(), lr=args.meta_lr)
        on_nonfinite = "skip" if args.on_failed_step == "skip" else "raise"
        self.problem = BilevelProblem(ll, ul, optimizer, on_nonfinite=on_nonfinite)
        # evaluation: the same LL without any graph, with its own number of steps; for the
        # hyper-representation the features are fixed, so it adapts the head on them
        eval_objective = self.head_objective if args.method == "hyperrep" else self.ll_objective
        self.adapt = GradientDescent(
            eval_objective,
            self.ll_model,
            self.ul_model,
            lr,
            args.eval_inner_steps,
            differentiable_steps=0,
            on_growth="ignore",
        )

    def logits(self, state: dict[str, Any]) -> torch.Tensor:
        """The network's output on ``state["data"]`` with the LL's current weights."""
        if self.args.method == "hyperrep":
            return state["ll_model"](self.features(state["ul_model"], state["data"]))
        return state["ll_model"](state["data"])

    def features(self, trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The hyper-representation's features; with ``--feature-norm C`` each image's
        feature vector scaled to norm ``C``, which bounds the head's LL curvature (see
        :func:`head_curvature_bound`)."""
        features = trunk(images)
        if self.args.feature_norm is None:
            return features
        return self.args.feature_norm * F.normalize(features, dim=1)

    def ul_objective(self, state: dict[str, Any]) -> torch.Tensor:
        """Query-set cross-entropy of the adapted model (records the query accuracy)."""
        logits = self.logits(state)
        accuracy = (logits.argmax(-1) == state["target"]).float().mean()
        self.query_accuracy.append(accuracy.detach())
        return F.cross_entropy(logits, state["target"])

    def take_query_accuracy(self) -> torch.Tensor:
        """The mean query accuracy of the adapted models since the last call. BDA evaluates
        the UL objective at each of its LL steps too (unless its alpha is 0):
        ``inner_steps + 1`` records per task, of which the last is the adapted model's."""
        recorded = self.query_accuracy
        if self.args.ll == "bda" and self.args.bda_alpha > 0:
            per_task = self.args.inner_steps + 1
            if len(recorded) % per_task:
                raise RuntimeError(f"expected {per_task} UL evaluations per task with BDA")
            recorded = recorded[per_task - 1 :: per_task]
        accuracy = torch.stack(recorded).mean()
        self.query_accuracy.clear()
        return accuracy

    def ll_objective(self, state: dict[str, Any]) -> torch.Tensor:
        """Support-set cross-entropy; iMAML adds ``reg/2 ||w - theta||^2`` with ``theta`` the
        UL model; the hyper-representation adds ``head_l2/2 ||head||^2``."""
        loss = F.cross_entropy(self.logits(state), state["target"])
        if self.args.method == "imaml":
            pairs = zip(state["ll_model"].parameters(), state["ul_model"].parameters(), strict=True)
            loss = loss + 0.5 * self.args.reg * sum(((w - t) ** 2).sum() for w, t in pairs)
        elif self.args.method == "hyperrep" and self.args.head_l2 > 0:
            loss = loss + self.head_penalty(state["ll_model"])
        return loss

    def head_penalty(self, head: nn.Module) -> torch.Tensor:
        """``head_l2/2 ||head||^2`` (hyper-representation)."""
        return 0.5 * self.args.head_l2 * sum((w**2).sum() for w in head.parameters())

    def head_objective(self, state: dict[str, Any]) -> torch.Tensor:
        """The hyper-representation's LL objective on precomputed features."""
        loss = F.cross_entropy(state["ll_model"](state["data"]), state["target"])
        return loss + self.head_penalty(state["ll_model"]) if self.args.head_l2 > 0 else loss

    def task_accuracy(self, task: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Adapt on the support set, return the accuracy on the query set."""
        (xs, ys), (xq, yq) = task["train"], task["test"]
        if self.args.method == "hyperrep":
            with torch.no_grad():
                xs, xq = self.features(self.ul_model, xs), self.features(self.ul_model, xq)
        adapted = self.adapt.optimize(xs, ys)
        with torch.no_grad():
            accuracy = (adapted(xq).argmax(-1) == yq).float().mean()
        self.adapt.release(adapted)  # the next task reuses the patched model
        return accuracy

    def evaluate(self, sampler: TaskSampler, tasks: int, progress: bool = False) -> torch.Tensor:
        """Query accuracy on tasks ``0 .. tasks - 1`` of ``sampler`` (one value per task)."""
        device = next(self.ul_model.parameters()).device
        accuracies = []
        for i in tqdm(range(tasks), desc="evaluate", disable=not progress, leave=False):
            task = sampler.task(i)
            task = {k: (x.to(device), y.to(device)) for k, (x, y) in task.items()}
            accuracies.append(self.task_accuracy(task))
        return torch.stack(accuracies).cpu()


def head_curvature_bound(feature_norm: float, head_l2: float) -> float:
    """An upper bound on the largest eigenvalue of the head's LL Hessian (mean softmax
    cross-entropy of a linear head with bias, plus ``head_l2/2 ||head||^2``) on features of
    norm ``feature_norm``: per image the Hessian is ``(diag(p) - p p^T) (x) [x; 1][x; 1]^T``,
    whose first factor's eigenvalues are at most 1/2, so ``(feature_norm**2 + 1) / 2 +
    head_l2``. Gradient descent on the head is stable for steps below ``2 / bound``."""
    return (feature_norm**2 + 1.0) / 2.0 + head_l2


def write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """The log records as CSV (rewritten whole, atomically: the history of a resumed run is
    truncated)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    checkpoint.atomic_write_text(path, text.getvalue())


def save_best(path: Path, ul_model: nn.Module, step: int, val_accuracy: float) -> None:
    """Write ``OUT/best.pt``: the UL model with the best meta-validation accuracy so far."""
    state = {"ul_model": ul_model.state_dict(), "step": step, "val_accuracy": val_accuracy}
    checkpoint.save(path, state)


def read_best(path: Path) -> dict[str, Any]:
    """Read ``OUT/best.pt`` (``"ul_model"``, ``"step"``, ``"val_accuracy"``) without running
    code from it.

    Raises:
        bilevel.checkpoint.CheckpointError: the file is damaged, unsafe, from an older bilevel
            or not a best-model file (the message names it and says what to do).
    """
    return checkpoint.load(path, require=("ul_model", "step"))


def plot_curve(path: Path, history: list[dict[str, Any]], title: str) -> None:
    """Meta-training loss and accuracy (running means) and meta-validation accuracy (nothing
    without matplotlib)."""
    plt = _common.pyplot()
    if plt is None:
        return

    train = [h for h in history if h.get("loss") is not None]
    val = [h for h in history if h.get("val_accuracy") is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot([h["step"] for h in train], [h["loss"] for h in train], color="tab:blue")
    left.set_xlabel("meta-step")
    left.set_ylabel("query loss (meta-train)")
    right.plot(
        [h["step"] for h in train], [h["accuracy"] for h in train], label="meta-train (query)"
    )
    if val:
        steps = [h["step"] for h in val]
        acc = [h["val_accuracy"] for h in val]
        ci = [h["val_ci95"] for h in val]
        right.errorbar(steps, acc, yerr=ci, marker="o", ms=3, capsize=2, label="meta-validation")
    right.set_xlabel("meta-step")
    right.set_ylabel("accuracy")
    right.legend(loc="lower right")
    fig.suptitle(title, fontsize=9)
    _common.save_figure(fig, path, dpi=100)


def make_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="maml",
        help="maml, first-order maml, imaml, reptile, metasgd, or hyperrep (a learned conv "
        "trunk, linear heads)",
    )
    parser.add_argument(
        "--ul-method",
        choices=UL_METHODS,
        default=None,
        help="hypergradient of --method hyperrep (default reverse); maml and metasgd are "
        "reverse, fomaml first-order, imaml implicit and reptile reptile by definition",
    )
    parser.add_argument(
        "--ll",
        choices=("gd", "bda"),
        default="gd",
        help="LL dynamics of --method hyperrep: gradient descent on the support loss, or BDA's "
        "aggregation with the query loss (Liu et al. 2020)",
    )
    parser.add_argument(
        "--bda-alpha", type=float, default=0.5, help="BDA: weight of the query loss at step 0"
    )
    parser.add_argument(
        "--bda-alpha-decay", type=float, default=0.9, help="BDA: alpha_k = alpha * decay**k"
    )
    parser.add_argument("--ways", type=int, default=5, help="classes per task (N)")
    parser.add_argument("--shots", type=int, default=1, help="support examples per class (K)")
    parser.add_argument("--query", type=int, default=15, help="query examples per class")
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-step")
    parser.add_argument("--meta-steps", type=int, default=60000, help="UL (outer) steps")
    parser.add_argument(
        "--meta-lr", type=_common.positive, default=None, help="UL step (default 1e-3; reptile 1.0)"
    )
    parser.add_argument(
        "--meta-optimizer",
        choices=("adam", "sgd"),
        default=None,
        help="UL optimizer (default adam; reptile sgd)",
    )
    parser.add_argument(
        "--budget-cpu-minutes",
        type=_common.positive,
        default=None,
        help="stop meta-training once its CPU time (summed over resumed runs, validation "
        "excluded) reaches this: the same compute for every method (use with --threads 1)",
    )
    parser.add_argument(
        "--inner-steps", type=int, default=None, help="LL steps (default: per method)"
    )
    parser.add_argument(
        "--inner-lr", type=_common.positive, default=None, help="LL step size (default: per method)"
    )
    parser.add_argument("--hidden", type=int, default=64, help="filters per conv block")
    parser.add_argument(
        "--reg", type=_common.nonnegative, default=2.0, help="iMAML proximal strength"
    )
    parser.add_argument("--cg-steps", type=int, default=5, help="iMAML / implicit CG steps")
    parser.add_argument(
        "--solver",
        choices=("cg", "minres", "normal_cg"),
        default=None,
        help="linear solver of the implicit hypergradient (default: minres for imaml, whose "
        "LL Hessian is indefinite away from a minimum; cg for hyperrep, whose is not)",
    )
    parser.add_argument(
        "--cg-tolerance", type=_common.nonnegative, default=1e-6, help="CG relative residual"
    )
    parser.add_argument(
        "--damping",
        type=float,
        default=None,
        help="Implicit's damping: solve (H + damping I) q = v, a biased hypergradient that stays "
        "defined where H is indefinite (default: none, the exact one; the iMAML authors' "
        "released code amounts to reg + 20 with --solver cg)",
    )
    parser.add_argument(
        "--truncate", type=int, default=None, help="K of --ul-method truncated (default T/2)"
    )
    parser.add_argument(
        "--head-l2",
        type=_common.nonnegative,
        default=1e-3,
        help="L2 on the head (hyperrep LL objective)",
    )
    parser.add_argument(
        "--feature-norm",
        type=float,
        default=None,
        help="hyperrep: scale each image's features to this norm, which bounds the head's "
        "curvature by (C^2 + 1)/2 + head-l2, so that its gradient descent cannot diverge as "
        "the trunk's features grow (default: none, the features as the trunk makes them)",
    )
    parser.add_argument("--eval-inner-steps", type=int, default=None, help="LL steps at evaluation")
    parser.add_argument(
        "--eval-query", type=int, default=15, help="query examples per class at evaluation"
    )
    parser.add_argument("--eval-every", type=int, default=500, help="meta-steps between vals")
    parser.add_argument("--val-tasks", type=int, default=200, help="meta-validation tasks")
    parser.add_argument("--eval-tasks", type=int, default=600, help="meta-test tasks")
    parser.add_argument("--log-every", type=int, default=10, help="meta-steps between logs")
    parser.add_argument(
        "--max-minutes",
        type=_common.positive,
        default=None,
        help="stop meta-training after this many minutes of this invocation (then evaluate; "
        "the same command goes on from there)",
    )
    parser.add_argument(
        "--on-failed-step",
        choices=("stop", "skip"),
        default="stop",
        help="a meta-step that fails (the LL's descent diverged on a task, NaN or inf, a "
        "diverged solver): stop meta-training and test the best model so far, or skip it (its "
        f"result unused, counted in the log) and go on; {MAX_SKIPS_IN_A_ROW} failures in a row "
        "stop it",
    )
    _common.add_checkpoint_minutes(parser)
    parser.add_argument(
        "--cache-dir", default=None, help="decoded Omniglot cache (default: $BILEVEL_CACHE)"
    )
    parser.add_argument(
        "--no-check-md5",
        action="store_true",
        help="use Omniglot zips whose md5 is none of the known ones (a copy of one's own); "
        "their pixels are still checked against the original release's, with a warning",
    )
    _common.add_run_args(parser, default_out="runs/omniglot/run")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and checked."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.method == "hyperrep":
        args.ul_method = args.ul_method or "reverse"
    elif args.ll != "gd":
        parser.error("--ll bda is for --method hyperrep")
    elif args.ul_method not in (None, FIXED_UL_METHOD[args.method]):
        parser.error(
            f"--method {args.method} is defined by its hypergradient "
            f"({FIXED_UL_METHOD[args.method]}); --ul-method is for --method hyperrep"
        )
    else:
        args.ul_method = FIXED_UL_METHOD[args.method]
    for key, value in INNER_DEFAULTS[args.method].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    optimizer, meta_lr = META_DEFAULTS.get(args.method, ("adam", 1e-3))
    args.meta_optimizer = args.meta_optimizer or optimizer
    args.meta_lr = meta_lr if args.meta_lr is None else args.meta_lr
    if not 0.0 <= args.bda_alpha <= 1.0 or not 0.0 < args.bda_alpha_decay <= 1.0:
        parser.error("--bda-alpha must lie in [0, 1] and --bda-alpha-decay in (0, 1]")
    if args.solver is None:
        args.solver = "minres" if args.method == "imaml" else "cg"
    # (default None, not 0: runs saved before the option existed resume with the same settings)
    if args.damping is not None and (
        not 0 <= args.damping < math.inf or args.ul_method != "implicit"
    ):
        parser.error("--damping must be a number >= 0, for the implicit hypergradient only")
    if args.feature_norm is not None:
        if args.method != "hyperrep" or not 0 < args.feature_norm < math.inf:
            parser.error("--feature-norm must be a number > 0, for --method hyperrep only")
        bound = head_curvature_bound(args.feature_norm, args.head_l2)
        if args.ll == "gd" and args.inner_lr * bound >= 2:
            parser.error(
                f"--inner-lr {args.inner_lr} with --feature-norm {args.feature_norm} may "
                f"diverge: the head's curvature can reach {bound:.4g}, and gradient descent is "
                f"stable below a step of {2 / bound:.4g}; lower --inner-lr or --feature-norm"
            )
    if args.eval_inner_steps is None:
        args.eval_inner_steps = args.inner_steps
    if args.truncate is None:
        args.truncate = max(1, args.inner_steps // 2)
    for name in (
        "ways",
        "shots",
        "query",
        "meta_batch",
        "inner_steps",
        "eval_inner_steps",
        "truncate",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in (
        "eval_query",
        "eval_every",
        "log_every",
        "val_tasks",
        "eval_tasks",
        "hidden",
        "cg_steps",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.meta_steps < 0:
        parser.error("--meta-steps must be >= 0")
    if args.ways < 2:
        parser.error("--ways must be >= 2: a task with one class is solved by any model")
    smallest = min(SPLIT_CLASSES, key=SPLIT_CLASSES.get)
    if args.ways > SPLIT_CLASSES[smallest]:
        parser.error(
            f"--ways {args.ways} is more than the {SPLIT_CLASSES[smallest]} classes of the "
            f"{SPLIT_LABELS[smallest]} split ({smallest!r}: {SPLIT_SIZES[smallest]} characters, "
            f"each in 4 rotations), from which every task draws {args.ways} classes"
        )
    for flag, queries in (("--query", args.query), ("--eval-query", args.eval_query)):
        if args.shots + queries > N_DRAWINGS:
            parser.error(
                f"--shots {args.shots} + {flag} {queries} = {args.shots + queries} images of "
                f"each class, more than the {N_DRAWINGS} drawings of each Omniglot character"
            )
    if args.truncate > args.inner_steps:
        parser.error(
            f"--truncate ({args.truncate}) is more than the {args.inner_steps} LL steps "
            "(--inner-steps) it truncates"
        )
    return args


def agree_any(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true on every process if it is true on any (one all-reduce under
    ``torch.distributed``), so that all processes stop at the same step."""
    if not distributed.active():
        return flags
    (total,) = distributed.all_reduce_sum([torch.tensor(flags, dtype=torch.int32, device=device)])
    return [bool(v) for v in total.tolist()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Meta-train, validate, keep the best model, test; write everything to ``--out``."""
    args = parse_args(argv)
    device = torch.device(args.device)
    distributed.init_from_environment(device)  # a no-op unless launched by torchrun
    main_process = distributed.is_main_process()  # only rank 0 prints, logs and saves
    settings = {k: v for k, v in _common.settings_of(args).items() if k not in RESUMABLE}
    for name, default in ADDED_SETTINGS.items():  # at their defaults, older runs resume
        if settings[name] == default:
            del settings[name]
    minutes = args.checkpoint_minutes
    with _common.Run(
        args.out, settings, minutes, args.threads, main=main_process, steps=args.meta_steps
    ) as run:
        return experiment(args, run, device, settings)


def experiment(
    args: argparse.Namespace, run: _common.Run, device: torch.device, settings: dict[str, Any]
) -> dict[str, Any]:
    """The body of :func:`main`, in its open :class:`_common.Run` (folder checked and locked,
    signals handled)."""
    main_process = run.main
    out, record = run.out, run.record
    progress = not args.no_progress and main_process

    with _common.loading_data():
        options = _common.data_options(args)
        omniglot = Omniglot(args.data_root, cache_dir=args.cache_dir, progress=progress, **options)
    shape = (args.ways, args.shots)
    train = TaskSampler(omniglot.split("train"), *shape, args.query, seed=args.seed)
    val = TaskSampler(omniglot.split("val"), *shape, args.eval_query, seed=VAL_SEED)
    test = TaskSampler(omniglot.split("test"), *shape, args.eval_query, seed=TEST_SEED)

    exp = Experiment(args, device)
    problem = exp.problem
    # the log's running means over the steps since the last log record, saved with a
    # checkpoint taken between records (on a signal, or by time) so that the log goes on
    # exactly as without the interruption
    losses: list[torch.Tensor] = []
    accuracies: list[torch.Tensor] = []
    if record.checkpoint.exists():
        state = _common.read_checkpoint(record.checkpoint)
        problem.load_state_dict(state)
        pending = state.get("pending_log") or {}
        losses = [t.to(device) for t in pending.get("losses", torch.zeros(0)).unbind()]
        accuracies = [t.to(device) for t in pending.get("accuracies", torch.zeros(0)).unbind()]
    run.reserve(problem.state_dict())
    start = problem.step_count
    best_path = out / "best.pt"
    if best_path.exists():  # a damaged file is reported now, not after the training
        read_best(best_path)
    if main_process:
        record.note_invocation(_common.invocation(device))
    vals = [h["val_accuracy"] for h in record.history if h.get("val_accuracy") is not None]
    best = max(vals, default=-1.0)
    ll_label = " with BDA" if args.ll == "bda" else ""
    label = f"{args.method} ({args.ul_method}{ll_label}), {args.ways}-way {args.shots}-shot"
    if main_process:
        print(f"{label}: meta-steps {start} -> {args.meta_steps} in {out}")

    def batch(step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        tasks = train.batch(step, args.meta_batch)
        if args.method == "reptile":  # it needs no query split: the LL trains on all images
            tasks["train"] = tuple(torch.cat(pair, 1) for pair in zip(*tasks.values(), strict=True))
        return {k: (x.to(device), y.to(device)) for k, (x, y) in tasks.items()}

    def save_checkpoint() -> None:
        state = problem.state_dict()
        stacked = {"losses": losses, "accuracies": accuracies}
        state["pending_log"] = {
            k: torch.stack(v).cpu() if v else torch.zeros(0) for k, v in stacked.items()
        }
        checkpoint.save(record.checkpoint, state)
        run.checkpointed()

    postfix: dict[str, str] = {}
    stopped: str | None = None
    # CPU time of this process (all its threads), summed over resumed runs like the wall time:
    # that of the steps in the checkpoint, which progress.json keeps with it (the last log
    # record can be older: a checkpoint on a signal or by time falls between records)
    cpu_before = record.previous_cpu
    # ... of which validation (not counted in --budget-cpu-minutes)
    val_cpu = next(
        (h["val_cpu_seconds"] for h in reversed(record.history) if "val_cpu_seconds" in h), 0.0
    )

    def train_cpu_seconds() -> float:
        return cpu_before + time.process_time() - cpu_start - val_cpu

    def over_budget() -> bool:
        budget = args.budget_cpu_minutes
        return budget is not None and train_cpu_seconds() >= 60 * budget

    invocation_start = time.perf_counter()
    cpu_start = time.process_time()
    # a run that has spent its budget takes no further step when the same command is run
    # again (after a stop during the test evaluation, say): it is tested as it stands
    (spent,) = agree_any([over_budget()], device)
    if spent and start < args.meta_steps and main_process:
        print(f"{label}: the CPU budget of {args.budget_cpu_minutes:g} minutes is spent")
    end = start if spent else args.meta_steps
    bar = tqdm(total=args.meta_steps, initial=start, disable=not progress, desc=label)
    with bar, warnings.catch_warnings(), run.loop():
        # the CG non-positive-curvature warning is counted in the log instead
        warnings.filterwarnings("ignore", message="CG met a direction")
        failed_in_a_row = 0
        for step in range(start, end):
            skipped_before = problem.skipped_steps
            try:
                loss = problem.meta_step(batch(step))
            except LowerLevelDivergenceError as error:
                # the LL's descent diverged on a task (the hyper-representation's features
                # can outgrow its step): meta-training stops, and the best model so far is
                # tested; the same command stops here again (lower --inner-lr or --meta-lr
                # in a new run)
                stopped = f"the LL diverged at meta-step {step + 1}: {error}"
                exp.query_accuracy.clear()
                if main_process:
                    print(f"{label}: meta-training stopped, {stopped}")
                break
            if problem.skipped_steps == skipped_before:
                failed_in_a_row = 0
                losses.append(loss)
                accuracies.append(exp.take_query_accuracy())
            else:  # --on-failed-step skip: the UL parameters were not touched
                exp.query_accuracy.clear()
                failed_in_a_row += 1
                if main_process and problem.skipped_steps == 1:
                    print(f"{label}: skipping a failed meta-step: {problem.last_skipped}")
                if failed_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    stopped = (
                        f"{failed_in_a_row} meta-steps in a row failed and were skipped, the "
                        f"last at meta-step {step + 1}: {problem.last_skipped}"
                    )
                    if main_process:
                        print(f"{label}: meta-training stopped, {stopped}")
                    break
            bar.update(1)
            done = step + 1
            elapsed = time.perf_counter() - invocation_start
            out_of_time = args.max_minutes is not None and elapsed > 60 * args.max_minutes
            out_of_time |= over_budget()
            # every process stops at the same step, on a clock or a signal of any of them
            out_of_time, stop = agree_any([out_of_time, run.stop_requested], device)
            last = done == args.meta_steps or out_of_time
            validate = done % args.eval_every == 0 or last
            if not main_process:  # the other ranks only take part in the meta-steps
                losses.clear()
                accuracies.clear()
            else:
                save = validate or stop or run.checkpoint_due()
                entry: dict[str, Any] | None = None
                if done % args.log_every == 0 or validate:
                    # (none since the last record when every step was skipped)
                    ll_loss = problem.last_ll_loss
                    entry = {
                        "step": done,
                        "loss": torch.stack(losses).mean().item() if losses else None,
                        "accuracy": torch.stack(accuracies).mean().item() if losses else None,
                        "ll_loss": None if ll_loss is None else ll_loss.item(),
                        "cpu_seconds": round(cpu_before + time.process_time() - cpu_start, 3),
                    }
                    losses.clear()
                    accuracies.clear()
                    diagnostics = problem.ul.diagnostics
                    if "iterations" in diagnostics:
                        entry["cg_iterations"] = diagnostics["iterations"]
                        entry["cg_diverged"] = int(diagnostics["diverged"])
                    if diagnostics.get("ll_grad_ratio") is not None:
                        entry["ll_grad_ratio"] = diagnostics["ll_grad_ratio"]
                    if args.on_failed_step == "skip":
                        entry["skipped"] = problem.skipped_steps
                    if entry["loss"] is not None:
                        postfix.update(loss=f"{entry['loss']:.3f}", acc=f"{entry['accuracy']:.3f}")
                    if validate:
                        val_start = time.process_time()
                        acc, ci = mean_ci95(exp.evaluate(val, args.val_tasks))
                        val_cpu += time.process_time() - val_start
                        entry.update(val_accuracy=acc, val_ci95=ci)
                        entry["val_cpu_seconds"] = round(val_cpu, 3)
                        postfix["val"] = f"{acc:.3f}"
                        if acc > best:
                            best = acc
                            save_best(best_path, exp.ul_model, done, acc)
                    bar.set_postfix(postfix)
                if save:
                    save_checkpoint()
                if entry is not None:
                    record.log(entry, checkpointed=save)
                    write_csv(out / "log.csv", record.history)
                elif save:
                    record.mark_checkpoint()
            if stop:
                if distributed.active():  # no process exits while rank 0 still writes
                    torch.distributed.barrier()
                run.stop(done)
            if out_of_time:
                break
    if not main_process:
        return {}
    train_seconds = record.seconds
    cpu_seconds = cpu_before + time.process_time() - cpu_start
    meta_steps = problem.step_count

    evaluated = "final"
    best_step = meta_steps
    if best_path.exists():
        saved = read_best(best_path)
        # only a model of this run's validations: best.pt can be another run's, left in the
        # folder when its checkpoint and progress.json were deleted to start again
        ours = any(
            h.get("step") == saved["step"] and h.get("val_accuracy") == saved.get("val_accuracy")
            for h in record.history
        )
        if ours:
            exp.ul_model.load_state_dict(saved["ul_model"])
            evaluated, best_step = "best", saved["step"]
        else:
            print(
                f"{label}: {best_path} is not the model of any validation of this run (left "
                "by another run?): testing the final model"
            )
    started = time.perf_counter()
    test_acc, test_ci = mean_ci95(exp.evaluate(test, args.eval_tasks, progress))
    eval_seconds = time.perf_counter() - started
    results = {
        "experiment": "omniglot",
        "method": args.method,
        "ul_method": args.ul_method,
        "ways": args.ways,
        "shots": args.shots,
        "test_accuracy": test_acc,
        "test_ci95": test_ci,
        "test_tasks": args.eval_tasks,
        "evaluated_model": evaluated,
        "best_step": best_step,
        "best_val_accuracy": best if best >= 0 else None,
        "meta_steps": meta_steps,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_meta_step": round(train_seconds / max(meta_steps, 1), 4),
        "train_cpu_seconds": round(cpu_seconds, 2),
        "train_cpu_seconds_without_validation": round(cpu_seconds - val_cpu, 2),
        "eval_seconds": round(eval_seconds, 2),
        # where this invocation resumed, or that it only evaluated a finished run again; the
        # machine and code of each invocation that trained the model tested
        **record.account(meta_steps),
        "stopped": stopped,
        "skipped_steps": problem.skipped_steps,
        # every setting, those of ADDED_SETTINGS at their defaults too (which the resume
        # check leaves out)
        "settings": {
            **settings,
            **{k: getattr(args, k) for k in ADDED_SETTINGS},
            **{k: getattr(args, k) for k in RESUMABLE},
        },
        "hardware": _common.hardware(device),
        **_common.provenance(),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    _common.write_json(out / _common.RESULTS_FILE, results)
    if record.history:
        plot_curve(out / "curve.png", record.history, label)
    print(
        f"{label}: test accuracy {100 * test_acc:.2f} +- {100 * test_ci:.2f}% on "
        f"{args.eval_tasks} tasks ({evaluated} model, step {best_step}); {meta_steps} "
        f"meta-steps in {train_seconds:.0f} s"
    )
    return results


if __name__ == "__main__":
    main()
