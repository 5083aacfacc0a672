"""Where one-step DARTS' time goes: the library, the hand-written floor, and the floor with the
library's safety work written inline, timed alternately in one process.

    python benchmarks/darts_step_budget.py [--rounds 1000]

One-step DARTS (``method_families``' ``fd_one_step`` cells, ridge and logistic regression) is
the cell of the speed target of #14 ("within 1.1x of a hand-written torch loop") that stays
above it in one process (``process_check.py``). This script splits its gap. Four UL steps are
timed in turn, one thread, in a new order each round:

- ``ours``: ``BilevelProblem.step`` with ``GradientDescent(iters=1)`` and
  ``FiniteDifference`` (``impl_bilevel_families``);
- ``floor``: the hand-written step of ``impl_floor_families``;
- ``checked``: the floor's mathematics with the work that the library does for safety,
  inline (:class:`Checked`): the objectives of ``impl_bilevel_families`` called on a state
  dict (the UL module read through ``nn.Module.__getattr__``), the generators' state kept at
  the step's start, the LL step's draws replayed at both perturbed points and the generators
  put back, the UL parameters' ``requires_grad`` off during the LL step, the scalar check of
  every objective's value, the radius checked against the weights' round-off, one host sync
  each for the LL loss, the UL loss and the hypergradient, ``.grad`` set to a copy,
  ``zero_grad`` and the optimizer step;
- ``no_runner``: ours without ``BilevelProblem``'s step around the method (:class:`NoRunner`):
  the method's ``task_gradients`` on the same LL optimizer, method and UL optimizer, the
  hypergradient's NaN check and the optimizer step.

``checked - floor`` is what the checks cost, ``no_runner - checked`` what the LL run and the
method add to them, and ``ours - no_runner`` what the runner adds. The four hypergradients
are compared first (relative 1e-8). Writes ``benchmarks/results/darts_step_budget.json``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from argtypes import count

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "darts_step_budget.json"
IMPLS = ("ours", "floor", "checked", "no_runner")


class Checked:
    """The floor's one-step DARTS UL step (``impl_floor_families.darts``) with the library's
    safety work inline (the module's docstring lists it); regression problems (one LL
    tensor, one UL tensor)."""

    def __init__(self, config: dict[str, Any], problem: Any) -> None:
        import impl_bilevel_families as ours
        import problems as P

        self.s, self.r = P.spec(problem), config["r"]
        self.ll_objective, self.ul_objective = ours.objectives(problem)
        self.ul_model = ours.Weights(lam0=self.s.lam0[0])
        self.lam = self.ul_model.lam0
        self.start = self.s.w0[0].detach().clone()  # the LL weights the run starts from
        self.ll_model = types.SimpleNamespace()  # weights as plain attributes, as patched
        self.opt = torch.optim.SGD([self.lam], lr=0.0)

    def state(self, pair: tuple[Any, Any]) -> dict[str, Any]:
        data, target = pair
        return {
            "data": data,
            "target": target,
            "ul_model": self.ul_model,
            "ll_model": self.ll_model,
        }

    @staticmethod
    def scalar(value: Any) -> Any:
        if not (value.ndim == 0 and value.requires_grad and value.is_floating_point()):
            raise ValueError("an objective must return a scalar with a graph")
        return value

    def hypergradient(self) -> list[Any]:
        s, lam, r = self.s, self.lam, self.r
        grad = torch.autograd.grad
        w = self.start.detach().requires_grad_()
        self.ll_model.w0 = w
        train = self.state(s.train)
        lam.requires_grad_(False)  # the LL step records no graph to the UL variables
        try:
            draws = torch.get_rng_state()
            loss = self.scalar(self.ll_objective(train))
            (g,) = grad(loss, [w])
        finally:
            lam.requires_grad_(True)
        if not math.isfinite(loss.detach().item()):
            raise FloatingPointError("the LL loss is not finite")
        after = (w - s.lr * g).detach().requires_grad_()
        self.ll_model.w0 = after
        ul_loss = self.scalar(self.ul_objective(self.state(s.val)))
        direct, v = grad(ul_loss, [lam, after], allow_unused=True)
        direct = torch.zeros_like(lam) if direct is None else direct
        eps = r / torch.sqrt((v * v).sum())
        size = torch.linalg.vector_norm(w.detach())
        if r < torch.finfo(w.dtype).eps * float(size):
            raise ValueError("the radius is below the weights' round-off")
        saved = torch.get_rng_state()
        moved = []
        for sign in (1.0, -1.0):
            torch.set_rng_state(draws)  # the LL step's draws at both points
            with torch.no_grad():
                point = (w + eps * v if sign > 0 else w - eps * v).requires_grad_()
            self.ll_model.w0 = point
            moved.append(grad(self.scalar(self.ll_objective(train)), [lam])[0])
        torch.set_rng_state(saved)
        if not math.isfinite(ul_loss.detach().item()):
            raise FloatingPointError("the UL loss is not finite")
        return [direct - s.lr / (2 * eps) * (moved[0] - moved[1])]

    def step(self) -> None:
        kept = (self.lam.grad, torch.get_rng_state())  # what a failed step puts back
        self.opt.zero_grad(set_to_none=True)
        (g,) = self.hypergradient()
        self.lam.grad = g.detach().clone()
        if not math.isfinite(self.lam.grad.sum().item()):
            self.lam.grad = kept[0]
            raise FloatingPointError("the hypergradient is not finite")
        self.opt.step()


class NoRunner:
    """Ours without ``BilevelProblem.step``: the method's ``task_gradients`` on the LL
    optimizer, method and UL optimizer of ``ours`` (a runner of ``impl_bilevel_families``),
    then the hypergradient's NaN check and the UL optimizer's step."""

    def __init__(self, ours: Any) -> None:
        problem = ours.problem
        self.ll, self.ul, self.opt = problem.ll, problem.ul, problem.ul_optimizer
        self.train, self.val = ours.train, ours.val

    def accumulate(self) -> list[Any]:
        """The hypergradient, into ``.grad`` of the UL parameters (returned)."""
        self.opt.zero_grad(set_to_none=True)
        self.ul.task_gradients(self.ll, self.train, self.val)
        return [p.grad for p in self.ul.ul_params]

    def hypergradient(self) -> list[Any]:
        grads = [g.detach().clone() for g in self.accumulate()]
        self.opt.zero_grad(set_to_none=True)
        return grads

    def step(self) -> None:
        if not math.isfinite(sum(float(g.sum()) for g in self.accumulate())):
            raise FloatingPointError("the hypergradient is not finite")
        self.opt.step()


def runners(problem_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The configuration of the one-step DARTS cell on ``problem_name`` and its four runners."""
    import method_families as M

    config = M.method_config("regression", problem_name, "fd_one_step")
    modules = {"ours": "bilevel_families", "floor": "floor_families"}
    built = {impl: M.FamilyWorker(module).build(config)[0] for impl, module in modules.items()}
    built["checked"] = Checked(config, M.make_problem(config))
    built["no_runner"] = NoRunner(built["ours"])
    return config, built


def agree(built: dict[str, Any]) -> float:
    """The largest relative difference of the other hypergradients to the floor's; raises
    above 1e-8 (they would not be the same computation)."""
    reference = torch.cat([g.flatten() for g in built["floor"].hypergradient()])
    worst = 0.0
    for impl in ("ours", "checked", "no_runner"):
        other = torch.cat([g.flatten().detach() for g in built[impl].hypergradient()])
        worst = max(worst, float((other - reference).norm() / reference.norm()))
    if not worst <= 1e-8:
        raise AssertionError(f"the hypergradients differ by {worst:.3g} (relative)")
    return worst


def measure(problem_name: str, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Median seconds per UL step of each runner, alternated for ``rounds`` rounds."""
    config, built = runners(problem_name)
    difference = agree(built)
    for runner in built.values():  # warm-up
        for _ in range(5):
            runner.step()
    order, times = list(IMPLS), {impl: [] for impl in IMPLS}
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for impl in order:
            start = time.perf_counter()
            built[impl].step()
            times[impl].append(time.perf_counter() - start)
    median = {impl: statistics.median(v) for impl, v in times.items()}
    return {
        "problem": problem_name,
        "T": config["T"],
        "seconds": median,
        "over_floor": {impl: median[impl] / median["floor"] for impl in IMPLS},
        "checks_us": (median["checked"] - median["floor"]) * 1e6,
        "rest_us": (median["ours"] - median["checked"]) * 1e6,
        "runner_us": (median["ours"] - median["no_runner"]) * 1e6,
        "relative_difference": difference,
        "rounds": rounds,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=count, default=1000, help="UL steps timed per runner")
    parser.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    warnings.simplefilter("ignore")
    from common import write_cells

    torch.set_num_threads(1)
    cells = []
    for problem_name in ("ridge", "logistic"):
        c = measure(problem_name, args.rounds)
        cells.append(c)
        us = {
            impl: f"{s * 1e6:.0f} us ({c['over_floor'][impl]:.3f})"
            for impl, s in c["seconds"].items()
        }
        print(
            f"{problem_name}: {us}; checks {c['checks_us']:+.0f} us, rest {c['rest_us']:+.0f} "
            f"us, of which the runner {c['runner_us']:+.0f} us",
            flush=True,
        )
    write_cells(args.out, "darts_step_budget.py", cells, threads=1)


if __name__ == "__main__":
    main()
