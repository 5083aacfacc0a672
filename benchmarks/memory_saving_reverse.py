"""Peak memory and time of one MAML hypergradient: Reverse (the whole LL graph kept) against
MemorySavingReverse (the LL iterates kept, one step's graph recomputed at a time), against
the number of LL steps T.

The problem is an Omniglot-shaped meta-step: ``bilevel.models.FewShotNet`` (4 conv blocks,
``--hidden`` filters) on random 28x28 images, a 5-way 1-shot task (5 support images for the
LL, 15 query images for the UL), cross-entropy at both levels, the UL parameters the
network's initial weights (MAML), plain SGD in the LL. Each (method, T) runs in a fresh
subprocess with one thread: a warm-up hypergradient at T = 2, then the resident set size
(``/proc/self/status`` VmRSS) as the baseline, then ``--repeats`` hypergradients (one for the
largest T); the peak is ``ru_maxrss`` (``resource.getrusage``) minus the baseline, the time
the median over the repeats (wall clock, and the process's CPU time, steadier on a shared
machine).

Run: ``python benchmarks/memory_saving_reverse.py [--steps 10 100 1000] [--hidden 16]``;
writes ``benchmarks/results/memory_saving_reverse.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from argtypes import count, positive

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["reverse", "memory_saving_reverse"]


def rss_kib() -> int:
    """Resident set size of this process now, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(method: str, steps: int, hidden: int, repeats: int, lr: float) -> dict:
    """One hypergradient configuration, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from bilevel import BilevelProblem
    from bilevel.ll import GradientDescent
    from bilevel.models import FewShotNet
    from bilevel.ul import MemorySavingReverse, Reverse

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ways, shots, queries = 5, 1, 3
    net = FewShotNet(ways, hidden=hidden)
    support = torch.randn(ways * shots, 1, 28, 28)
    support_labels = torch.arange(ways).repeat_interleave(shots)
    query = torch.randn(ways * queries, 1, 28, 28)
    query_labels = torch.arange(ways).repeat_interleave(queries)

    def loss(state: dict) -> torch.Tensor:
        return F.cross_entropy(state["ll_model"](state["data"]), state["target"])

    method_class = {"reverse": Reverse, "memory_saving_reverse": MemorySavingReverse}[method]

    def hypergradient(iters: int) -> tuple[tuple[float, float], object]:
        ll = GradientDescent(loss, net, net, lr=lr, iters=iters)
        ul = method_class(loss, net, loss, net)
        problem = BilevelProblem(ll, ul)
        start, cpu = time.perf_counter(), time.process_time()
        grads = problem.hypergradient((support, support_labels), (query, query_labels))
        elapsed = (time.perf_counter() - start, time.process_time() - cpu)
        return elapsed, (grads, ul.diagnostics.get("stored_bytes"))

    hypergradient(2)  # warm-up: allocator pools, lazy imports
    baseline = rss_kib()
    times, cpu_times, stored = [], [], None
    for _ in range(repeats):
        (elapsed, cpu), (grads, stored) = hypergradient(steps)
        times.append(elapsed)
        cpu_times.append(cpu)
        del grads
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "method": method,
        "T": steps,
        "baseline_rss_mib": baseline / 1024,
        "peak_delta_mib": max(peak - baseline, 0) / 1024,
        "time_s": statistics.median(times),
        "times_s": times,
        "cpu_time_s": statistics.median(cpu_times),
        "stored_iterates_mib": None if stored is None else stored / 2**20,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=count, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--hidden", type=count, default=16)
    parser.add_argument("--repeats", type=count, default=3)
    parser.add_argument("--lr", type=positive, default=0.01)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "memory_saving_reverse.json")
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        steps = args.steps[0]
        result = child(args.child, steps, args.hidden, args.repeats, args.lr)
        print(json.dumps(result))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    largest = max(args.steps)
    for steps in args.steps:
        for method in args.methods:
            repeats = 1 if steps == largest and len(args.steps) > 1 else args.repeats
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--steps",
                str(steps),
                "--hidden",
                str(args.hidden),
                "--repeats",
                str(repeats),
                "--lr",
                str(args.lr),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"T={steps:5d} {method:22s} peak +{run['peak_delta_mib']:9.1f} MiB  "
                f"{run['time_s']:8.2f} s wall {run['cpu_time_s']:8.2f} s CPU",
                flush=True,
            )
            runs.append(run)
    import torch
    from common import git_revision

    ratios = {}
    for steps in args.steps:
        by = {r["method"]: r for r in runs if r["T"] == steps}
        if len(by) == 2:
            rev, mem = by["reverse"], by["memory_saving_reverse"]
            ratios[str(steps)] = {
                "memory": mem["peak_delta_mib"] / max(rev["peak_delta_mib"], 1e-9),
                "time": mem["time_s"] / rev["time_s"],
                "cpu_time": mem["cpu_time_s"] / rev["cpu_time_s"],
            }
    result = {
        "benchmark": "memory_saving_reverse",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/memory_saving_reverse.py " + " ".join(sys.argv[1:]),
        "git": git_revision(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 1,
        },
        "problem": {
            "model": f"FewShotNet(5, hidden={args.hidden}) on random 28x28 inputs",
            "task": "5-way 1-shot, 15 query images; cross-entropy; MAML (UL = initial weights)",
            "ll": f"plain SGD, lr={args.lr}",
            "memory": "ru_maxrss minus VmRSS after a warm-up hypergradient (T=2), fresh "
            "subprocess per configuration",
        },
        "runs": runs,
        "ratios_memory_saving_over_reverse": ratios,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
