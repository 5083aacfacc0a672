"""Is it the library or the process? Ours against the hand-written floor, both ways.

    python benchmarks/process_check.py [--methods bda,ptt] [--rounds 10]

``method_families.py`` times each implementation in its own worker process. On a shared
machine the same code can run at different speeds in different processes, so a ratio of
1.1-1.2 between two processes may be the processes. This script starts three workers on the
cells of ``--methods`` (ridge and logistic): one for ours, one for the floor (as the benchmark
does) and one that serves both, and alternates timing requests among the four slots. It
reports ours / floor across processes and inside one process, and writes
``benchmarks/results/method_families_process_check.json``, which
``method_families_report.py`` quotes under the targets table. Each request takes one warm-up
UL step and then times single UL steps for ``--request-seconds`` (at least one): a few steps
of BDA's and PTT's cells, hundreds of one-step DARTS', whose sub-millisecond steps would
otherwise be timed cache-cold right after the process woke up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from argtypes import count, names, positive

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "method_families_process_check.json"
SLOTS = (("ours", "bilevel"), ("floor", "floor"), ("both", "bilevel"), ("both", "floor"))


def serve(impls: list[str]) -> None:
    """A worker answering ``{"impl", "config", "budget"}`` requests for several
    implementations in this one process (one thread)."""
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    warnings.simplefilter("ignore")
    import method_families
    import torch

    torch.set_num_threads(1)
    workers = {impl: method_families.FamilyWorker(f"{impl}_families") for impl in impls}
    print(json.dumps({"ready": impls}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            return
        budget, most = request["budget"], request["max_steps"]
        timed = workers[request["impl"]].time(request["config"], budget, 1, 1, most)
        print(json.dumps({"times": timed["times"]}), flush=True)


class Worker:
    """One serving process."""

    def __init__(self, impls: str, seconds: float) -> None:
        self.seconds = seconds
        command = [sys.executable, __file__, "--serve", impls]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
        self.proc = subprocess.Popen(command, **pipes)
        self.proc.stdout.readline()

    def time(self, impl: str, config: dict[str, Any]) -> list[float]:
        request = {"impl": impl, "config": config, "budget": self.seconds, "max_steps": 10_000}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times"]

    def close(self) -> None:
        self.proc.stdin.write('{"quit": true}\n')
        self.proc.stdin.flush()
        self.proc.wait()


def check(method: str, problem: str, rounds: int, seconds: float) -> dict[str, Any]:
    """The four slots' median seconds per UL step on one cell, alternated for ``rounds``."""
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import method_families

    config = method_families.method_config("regression", problem, method)
    workers = {
        name: Worker(name_impls, seconds)
        for name, name_impls in (("ours", "bilevel"), ("floor", "floor"), ("both", "bilevel,floor"))
    }
    times: dict[tuple[str, str], list[float]] = {slot: [] for slot in SLOTS}
    try:
        for r in range(rounds):
            for slot in SLOTS if r % 2 == 0 else SLOTS[::-1]:
                times[slot] += workers[slot[0]].time(slot[1], config)
    finally:
        for worker in workers.values():
            worker.close()
    median = {slot: statistics.median(v) for slot, v in times.items()}
    return {
        "method": method,
        "problem": problem,
        "seconds": {f"{p}:{i}": m for (p, i), m in median.items()},
        "samples": min(len(v) for v in times.values()),  # UL steps timed, the fewest of a slot
        "across_processes": median[("ours", "bilevel")] / median[("floor", "floor")],
        "one_process": median[("both", "bilevel")] / median[("both", "floor")],
        "floor_own_over_shared": median[("floor", "floor")] / median[("both", "floor")],
        "load_average": os.getloadavg()[0],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import method_families

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        type=names(method_families.METHODS),
        default="bda",
        help="method_families methods",
    )
    parser.add_argument("--rounds", type=count, default=10, help="alternation rounds per cell")
    parser.add_argument(
        "--request-seconds", type=positive, default=0.5, help="timed seconds per request"
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT})")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve.split(","))
        return
    sys.path.insert(0, str(HERE))
    from common import write_cells

    cells = []
    for method in args.methods.split(","):
        for problem in ("ridge", "logistic"):
            cells.append(check(method, problem, args.rounds, args.request_seconds))
            c = cells[-1]
            print(
                f"{method} {problem}: ours/floor across processes {c['across_processes']:.3f}, "
                f"in one process {c['one_process']:.3f} ({c['samples']} samples, load "
                f"{c['load_average']:.1f})",
                flush=True,
            )
    write_cells(args.out, "process_check.py", cells)


if __name__ == "__main__":
    main()
