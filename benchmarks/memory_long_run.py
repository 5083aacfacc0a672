"""Resident memory over a long run: thousands of UL steps per method, the slope reported.

Each method runs in a fresh subprocess: a small MLP with a learned weight decay (and, for
MAML-style methods, its own initial weights), RSS read from /proc every ``--every`` steps
after a warm-up. A slope near zero means nothing accumulates across steps (no graph kept
alive, no growing history; ``higher`` keeps per-step weights, which the library drops).

Run: ``python benchmarks/memory_long_run.py [--steps 3000]``; writes
``benchmarks/results/memory_long_run.json`` and the results section of
``docs/robustness.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from argtypes import count, nonnegative_int
from common import code_revision, git_revision

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
METHODS = ["reverse", "truncated", "implicit", "forward", "first_order", "maml", "online"]


def rss_kib() -> int:
    """Resident set size of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(method: str, steps: int, every: int, warmup: int) -> dict:
    """Run one method for ``steps`` UL steps and sample RSS."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from bilevel import BilevelProblem
    from bilevel.ll import GradientDescent
    from bilevel.online import OnlineHypergradient
    from bilevel.ul import FirstOrder, Forward, Implicit, Reverse, Truncated

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))

    class Decay(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_decay = nn.Parameter(torch.tensor(-3.0))

    decay = Decay()
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    xv, yv = torch.randn(64, 10), torch.randn(64, 1)

    def ll_objective(state: dict) -> torch.Tensor:
        model = state["ll_model"]
        penalty = sum((w**2).sum() for w in model.parameters())
        return F.mse_loss(model(state["data"]), state["target"]) + 0.5 * (
            state["ul_model"].log_decay.exp() * penalty
        )

    def ul_objective(state: dict) -> torch.Tensor:
        return F.mse_loss(state["ll_model"](state["data"]), state["target"])

    ul_model = net if method in ("maml", "first_order") else decay
    ll_obj = ul_objective if ul_model is net else ll_objective
    ll = GradientDescent(ll_obj, net, ul_model, lr=0.05, iters=20)
    common = (ul_objective, ul_model, ll_obj, net)
    calculators = {
        "reverse": lambda: Reverse(*common),
        "maml": lambda: Reverse(*common),
        "truncated": lambda: Truncated(*common, truncate_iter=5),
        "implicit": lambda: Implicit(
            *common, ll_learning_rate=0.05, k=5, method="cg", on_divergence="warn"
        ),
        "forward": lambda: Forward(*common),
        "first_order": lambda: FirstOrder(*common),
        "online": lambda: Forward(*common),
    }
    ul = calculators[method]()
    opt = torch.optim.Adam(ul_model.parameters(), lr=1e-3)
    samples = []
    if method == "online":
        runner = OnlineHypergradient(ll, ul, opt, hyper_every=20)

        def log(record: dict) -> None:
            if record["ul_step"] >= warmup and record["ul_step"] % every == 0:
                samples.append((record["ul_step"], rss_kib()))

        runner.run((x, y), (xv, yv), ll_steps=20 * steps, log=log, progress=False)
    else:
        problem = BilevelProblem(ll, ul, opt)
        for step in range(1, steps + 1):
            problem.step((x, y), (xv, yv))
            if step >= warmup and step % every == 0:
                samples.append((step, rss_kib()))
    return {"method": method, "samples": samples}


def slope_kib_per_1000(samples: list) -> float:
    """Least-squares slope of RSS against the step, in KiB per 1000 UL steps."""
    n = len(samples)
    mx = sum(s for s, _ in samples) / n
    my = sum(m for _, m in samples) / n
    cov = sum((s - mx) * (m - my) for s, m in samples)
    var = sum((s - mx) ** 2 for s, _ in samples)
    return 1000 * cov / var


def results_block(result: dict) -> str:
    """The results section of ``docs/robustness.md`` (between its markers) for ``result``:
    the dates, and the commits where recorded, of every run in it."""
    rows = [
        "| method | UL steps | RSS after warm-up (MiB) | RSS at the end (MiB) "
        "| slope (KiB / 1000 UL steps) | command |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        first, last = r["samples"][0][1], r["samples"][-1][1]
        rows.append(
            f"| {r['method']} | {r['samples'][-1][0]} | {first / 1024:.1f} | "
            f"{last / 1024:.1f} | {r['slope_kib_per_1000_steps']:.1f} | `{r['command']}` |"
        )
    dates = ", ".join(sorted({r["date"] for r in result["runs"]}))
    codes = ", ".join(sorted({code_revision(r.get("git")) for r in result["runs"]} - {""}))
    return "\n".join(
        [
            BEGIN,
            f"Generated by `benchmarks/memory_long_run.py` on {dates} ({result['machine']}"
            f"{'; ' + codes if codes else ''}). A 10-32-1 MLP, 20 LL steps per UL step (online: "
            "one continuing LL run with a UL update every 20 LL steps); RSS sampled every "
            "`--every` UL steps after `--warmup` steps (100 and 200 by default).",
            "",
            *rows,
            END,
        ]
    )


def write_docs(result: dict) -> None:
    """Rewrite the results section of ``docs/robustness.md``."""
    page = ROOT / "docs" / "robustness.md"
    head, rest = page.read_text().split(BEGIN)
    page.write_text(head + results_block(result) + rest.split(END)[1])


def fewest_steps(every: int, warmup: int) -> int:
    """The fewest UL steps that give two RSS samples (a slope): :func:`child` samples at the
    multiples of ``every`` from step ``warmup`` on."""
    first = -(-max(warmup, 1) // every) * every
    return first + every


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=count, default=3000)
    parser.add_argument("--every", type=count, default=100)
    parser.add_argument("--warmup", type=nonnegative_int, default=200)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument(
        "--out",
        help="results file (default benchmarks/results/memory_long_run.json, the one the "
        "docs page is rewritten from; with another, the page is left as it is)",
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fewest = fewest_steps(args.every, args.warmup)
    if args.steps < fewest:
        parser.error(
            f"--steps {args.steps} takes fewer than two RSS samples (a slope) after --warmup "
            f"{args.warmup}, one every --every {args.every} steps: give --steps >= {fewest}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.every, args.warmup)))
        return
    runs = []
    for method in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--steps",
            str(args.steps),
            "--every",
            str(args.every),
            "--warmup",
            str(args.warmup),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        run = json.loads(out.strip().splitlines()[-1])
        run["slope_kib_per_1000_steps"] = slope_kib_per_1000(run["samples"])
        print(f"{method:12s} slope {run['slope_kib_per_1000_steps']:8.1f} KiB/1000 steps")
        runs.append(run)
    import torch

    for run in runs:
        run["command"] = "python benchmarks/memory_long_run.py " + " ".join(sys.argv[1:])
        run["date"] = datetime.date.today().isoformat()
        run["git"] = git_revision()
        run["every"], run["warmup"] = args.every, args.warmup
    out = (
        ROOT / "benchmarks" / "results" / "memory_long_run.json"
        if args.out is None
        else Path(args.out)
    )
    kept = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {r["method"] for r in runs}  # a method measured again replaces its old row
    result = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "runs": [r for r in kept if r["method"] not in done] + runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.out is None:  # the page quotes the committed results only
        write_docs(result)


if __name__ == "__main__":
    main()
