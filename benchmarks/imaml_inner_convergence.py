"""Is iMAML's inner problem solved where the meta-gradient assumes it is? (issue 16)

    python benchmarks/imaml_inner_convergence.py runs/omniglot/long/imaml-damped-5w1s-h32 \\
        [--tasks 100] [--out benchmarks/results/imaml_inner_convergence.json]

iMAML's meta-gradient (the implicit function theorem) is that of the proximal inner problem's
solution ``w*(theta) = argmin_w L_support(w) + reg/2 ||w - theta||^2``. This script takes a
run of ``examples/omniglot.py --method imaml`` (its ``best.pt`` and the settings in its
``results.json``), and on meta-VALIDATION tasks (the example's: seed 1) runs that inner
problem by gradient descent as the run does (its step size), for twice its number of steps,
and with a five times smaller step for twenty times its number of steps (towards ``w*``). It
records, averaged over the tasks, the query accuracy of the adapted network along the way,
the LL gradient's norm relative to the first step's (what ``Implicit`` checked,
``ll_grad_ratio``), the last step's contraction ``rho = ||g_T|| / ||g_{T-1}||``, and the
distance still to travel estimated from it, ``lr ||g_T|| / (1 - rho)``, against the distance
travelled ``||w_T - theta||`` (what ``Implicit`` now checks, ``ll_distance_ratio``), next to
the distance to the long run's end point. Batch norm uses the statistics of the batch it sees,
as in the example (transductive). One thread, float32, as the run computed.

Reference: Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with Implicit Gradients",
NeurIPS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from argtypes import count  # noqa: E402
from common import git_revision  # noqa: E402

from bilevel import checkpoint  # noqa: E402
from bilevel.data import Omniglot, TaskSampler  # noqa: E402
from bilevel.models import FewShotNet  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "imaml_inner_convergence.json"
VAL_SEED = 1  # the example's meta-validation tasks
Params = dict[str, torch.Tensor]


def norm(tensors: Params) -> float:
    """The Euclidean norm of a set of tensors."""
    return math.sqrt(sum(float((t * t).sum()) for t in tensors.values()))


def proximal_descent(
    net: torch.nn.Module,
    theta: Params,
    task: dict[str, tuple[torch.Tensor, torch.Tensor]],
    reg: float,
    lr: float,
    steps: int,
    every: int,
    keep: int | None = None,
) -> dict[str, Any]:
    """Gradient descent on ``L_support(w) + reg/2 ||w - theta||^2`` from ``theta``: the
    gradient norm at every step, the query accuracy every ``every`` steps, the weights after
    ``keep`` steps (default: the end)."""
    (xs, ys), (xq, yq) = task["train"], task["test"]
    w = {k: v.clone().requires_grad_() for k, v in theta.items()}
    grad_norms, accuracy, kept = [], {}, None
    for step in range(steps + 1):
        if step == (steps if keep is None else keep):
            kept = {k: v.detach() for k, v in w.items()}
        support = F.cross_entropy(functional_call(net, w, (xs,)), ys)
        proximal = 0.5 * reg * sum(((w[k] - theta[k]) ** 2).sum() for k in w)
        grads = dict(zip(w, torch.autograd.grad(support + proximal, list(w.values())), strict=True))
        grad_norms.append(norm(grads))
        if step % every == 0:
            with torch.no_grad():
                logits = functional_call(net, w, (xq,))
            accuracy[step] = float((logits.argmax(-1) == yq).float().mean())
        if step < steps:
            with torch.no_grad():
                w = {k: (v - lr * grads[k]).requires_grad_() for k, v in w.items()}
    return {"grad_norms": grad_norms, "accuracy": accuracy, "kept": kept}


def measure(run: Path, tasks: int, data_root: str | None) -> dict[str, Any]:
    """Every number of the JSON file, for the run in folder ``run``."""
    results = json.loads((run / "results.json").read_text())
    s = results["settings"]
    if results.get("method") != "imaml":
        raise SystemExit(f"{run} is a {results.get('method')!r} run, not an iMAML one.")
    net = FewShotNet(s["ways"], hidden=s["hidden"])
    best = checkpoint.load(run / "best.pt", require=("ul_model", "step"))
    net.load_state_dict(best["ul_model"])
    theta = {k: v.detach() for k, v in net.named_parameters()}
    omniglot = Omniglot(data_root)
    sampler = TaskSampler(
        omniglot.split("val"), s["ways"], s["shots"], s["eval_query"], seed=VAL_SEED
    )
    steps, lr, reg = s["inner_steps"], s["inner_lr"], s["reg"]
    small, long_steps = lr / 5, 20 * steps
    per_task = []
    for i in range(tasks):
        task = sampler.task(i)
        every = max(steps // 4, 1)
        run_like = proximal_descent(net, theta, task, reg, lr, 2 * steps, every, keep=steps)
        towards = proximal_descent(net, theta, task, reg, small, long_steps, long_steps // 10)
        g, at_steps = run_like["grad_norms"], run_like["kept"]  # the run's end point
        travelled = norm({k: at_steps[k] - theta[k] for k in theta})
        rho = g[steps] / g[steps - 1]
        estimated = lr * g[steps] / (1 - rho) if rho < 1 else math.inf
        to_long_end = norm({k: at_steps[k] - towards["kept"][k] for k in theta})
        per_task.append(
            {
                "ll_grad_ratio": g[steps] / g[0],
                "contraction": rho,
                "travelled": travelled,
                "estimated_left": estimated,
                "distance_to_long_end": to_long_end,
                "long_end_grad_ratio": towards["grad_norms"][-1] / towards["grad_norms"][0],
                "accuracy_run_lr": run_like["accuracy"],
                "accuracy_small_lr": towards["accuracy"],
            }
        )

    def mean(key: str) -> float:
        return statistics.fmean(t[key] for t in per_task)

    def mean_curve(key: str) -> dict[str, float]:
        steps_seen = per_task[0][key]
        return {str(k): statistics.fmean(t[key][k] for t in per_task) for k in steps_seen}

    return {
        "run": str(run),
        "best_step": best["step"],  # the model tested: the best on validation so far
        "settings": {
            "inner_steps": steps,
            "inner_lr": lr,
            "reg": reg,
            "small_lr": small,
            "long_steps": long_steps,
        },
        "tasks": tasks,
        "ll_grad_ratio": mean("ll_grad_ratio"),
        "contraction": mean("contraction"),
        "estimated_left_over_travelled": mean("estimated_left") / mean("travelled"),
        "distance_to_long_end_over_travelled": mean("distance_to_long_end") / mean("travelled"),
        "long_end_grad_ratio": mean("long_end_grad_ratio"),
        "accuracy_run_lr": mean_curve("accuracy_run_lr"),
        "accuracy_small_lr": mean_curve("accuracy_small_lr"),
        "per_task": per_task,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an examples/omniglot.py --method imaml run folder")
    parser.add_argument("--tasks", type=count, default=100, help="meta-validation tasks")
    parser.add_argument("--data-root", default=None, help="folder with omniglot/ (BILEVEL_DATA)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    missing = [name for name in ("results.json", "best.pt") if not (args.run / name).is_file()]
    if missing:
        parser.error(f"run: {args.run} is not a run folder (no {' or '.join(missing)} in it)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = measure(args.run, args.tasks, args.data_root or os.environ.get("BILEVEL_DATA"))
    out = {
        "command": "python benchmarks/imaml_inner_convergence.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        "1 thread",
        **out,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "per_task"}, indent=1))
    return out


if __name__ == "__main__":
    main()
