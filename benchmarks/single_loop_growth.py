"""The single-loop methods' LL growth check (``bilevel.ul.ll_growth``) on ridge problems:
which runs it stops, at which UL step, and how often it confirms a suspect step.

    python benchmarks/single_loop_growth.py [--steps 1500] [--out FILE]

SOBA and SABA on ``tests/problems.ridge`` (60 examples, 5 features, seed 1) with LL steps
0.5 to 1.1 times the full batch's stable ``2 / lambda_max``, full batch and minibatches of
10 and 30, SOBA's constant and decaying steps, UL SGD steps of 0.01 and 0.3; each run takes
``--steps`` UL steps or stops at the first error. A run counts as converged when it ends
without an error; the check's false alarms would be converged runs it stopped, and its
confirmations on converged runs its cost. The table and a JSON file (``--out``) report, per
run, the confirmations, how the run ended and its last LL loss.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from argtypes import count

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "single_loop_growth.json"
FACTORS = (0.5, 0.9, 0.99, 1.02, 1.1)
BATCHES = (None, 10, 30)
UL_LRS = (0.01, 0.3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=count, default=1500, help="UL steps per run")
    parser.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT})")
    return parser.parse_args(argv)


def run(method: str, factor: float, batch: int | None, decay: bool, ul_lr: float, steps: int):
    """One run: ``(confirmations, how it ended, last LL loss)``."""
    import torch
    from problems import ridge, ridge_hessian, ridge_ll, ridge_ul

    from bilevel import BilevelProblem
    from bilevel.ll import GradientDescent
    from bilevel.ul import SABA, SOBA
    from bilevel.ul.stochastic import StochasticMethod

    p = ridge(n=60, d=5, seed=1)
    lambda_max = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=factor * 2 / lambda_max, iters=1)
    options: dict[str, Any] = {"batch_size": batch}
    if method == "SOBA" and not decay:
        options.update(ll_decay=0.0, ul_decay=0.0)
    kind = SOBA if method == "SOBA" else SABA
    ul = kind(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **options)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=ul_lr))
    confirmations = 0
    confirm = StochasticMethod._step_too_large

    def counted(self: StochasticMethod, step: Any) -> str | None:
        nonlocal confirmations
        confirmations += 1
        return confirm(self, step)

    ul._step_too_large = counted.__get__(ul)  # this run's method only
    ended = "converged"
    for t in range(steps):
        try:
            problem.step(p.train, p.val)
        except FloatingPointError as error:  # LowerLevelDivergenceError or a NaN
            ended = f"{type(error).__name__} at UL step {t}"
            break
    last = problem.last_ll_loss
    return confirmations, ended, None if last is None else float(last)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import torch

    torch.set_num_threads(1)
    rows = []
    start = time.perf_counter()
    cells = itertools.product(("SOBA", "SABA"), FACTORS, BATCHES, (True, False), UL_LRS)
    for method, factor, batch, decay, ul_lr in cells:
        if method == "SABA" and not decay:
            continue  # (SABA's steps are constant)
        confirmations, ended, last = run(method, factor, batch, decay, ul_lr, args.steps)
        row = {"method": method, "factor": factor, "batch": batch, "decay": decay}
        row.update(ul_lr=ul_lr, confirmations=confirmations, ended=ended, last_ll_loss=last)
        rows.append(row)
        print(
            f"{method} step x{factor:<5} batch {batch!s:>4} decay {decay!s:5} ul_lr {ul_lr:<4} "
            f"confirmations {confirmations:>2}  {ended}  (LL loss {last:.3g})",
            flush=True,
        )
    converged = [r for r in rows if r["ended"] == "converged"]
    summary = {
        "runs": len(rows),
        "converged": len(converged),
        "confirmations_on_converged": sum(r["confirmations"] for r in converged),
        "stopped_by_growth": sum("LowerLevelDivergence" in r["ended"] for r in rows),
        "stopped_by_nan": sum("FloatingPointError" in r["ended"] for r in rows),
        "steps": args.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
