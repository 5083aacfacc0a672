"""glibc's heap trimming against a kept heap: the same UL step, timed in fresh processes.

    python benchmarks/heap_trim.py [--processes 6] [--steps 3]

On Linux PyTorch's CPU tensors come from the C library's ``malloc``. glibc gives freed memory
at the top of its heap back to the operating system once more than ``M_TRIM_THRESHOLD`` of it
is free, and the next step touches those pages again: one page fault per 4 KiB page. How
often that happens inside a UL step differs from process to process running the same code
(measured here), so the same code in two processes runs at different speeds. With
``MALLOC_TRIM_THRESHOLD_`` set above any heap this machine holds, and
``MALLOC_MMAP_THRESHOLD_`` fixed at 32 MiB (the most glibc's own sliding threshold reaches on
64-bit Linux; setting the trim threshold alone would fix the mmap one at 128 KiB and map and
unmap every large tensor), freed memory stays in the heap for the next step.

For each configuration the two environments alternate over ``--processes`` fresh processes
each; every process builds the problem, takes one untimed step, then times ``--steps`` UL
steps and counts their minor page faults (``ru_minflt``). Writes
``benchmarks/results/heap_trim.json``; ``report.py`` quotes it on the benchmarks page, where
``run.py``'s timing workers run with the kept heap (``common.KEPT_HEAP``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from argtypes import count, json_object
from common import (
    KEPT_HEAP,
    RESULTS,
    json_from_process,
    machine,
    process_environment,
    summarize,
    write_cells,
)

OUT = RESULTS / "heap_trim.json"
IMPLS = ("bilevel", "floor")
CONFIGS = (
    {"suite": "meta", "problem": "meta", "method": "maml", "batch": 4},
    {"suite": "meta", "problem": "meta", "method": "hyperrep", "batch": 4},
    {"suite": "cleaning", "problem": "cleaning", "method": "reverse", "T": 100},
)


def child(impl: str, config: dict[str, Any], steps: int) -> dict[str, Any]:
    """Build ``config`` for ``impl`` in this process, take one untimed step, then time
    ``steps`` steps and count their minor page faults."""
    import importlib

    import problems as P
    import torch

    torch.set_num_threads(1)
    runner = importlib.import_module(f"impl_{impl}").build(config, P.build(config))
    runner.step()
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"median": statistics.median(times), "faults": statistics.median(faults)}


def run_child(impl: str, config: dict[str, Any], steps: int, kept: bool) -> dict[str, Any]:
    """:func:`child` in a fresh process, with glibc's defaults or the kept heap."""
    command = [sys.executable, str(Path(__file__).resolve()), "child", "--impl", impl]
    command += ["--steps", str(steps), "--config", json.dumps(config)]
    return json_from_process(command, process_environment(kept), f"{impl} on {config}")


def measure(processes: int, steps: int, impls: list[str]) -> list[dict[str, Any]]:
    cells = []
    for config in CONFIGS:
        for impl in impls:
            runs: dict[str, list[dict[str, Any]]] = {"default": [], "kept": []}
            for i in range(processes):
                order = ("default", "kept") if i % 2 == 0 else ("kept", "default")
                for env in order:
                    runs[env].append(run_child(impl, config, steps, env == "kept"))
            cell = {"config": config, "impl": impl}
            for env, rows in runs.items():
                cell[env] = {
                    "seconds": summarize([r["median"] for r in rows]),
                    "faults": summarize([r["faults"] for r in rows]),
                    "processes": [r["median"] for r in rows],
                }
            ratio = cell["default"]["seconds"]["median"] / cell["kept"]["seconds"]["median"]
            cell["default_over_kept"] = ratio
            cells.append(cell)
            d, k = cell["default"], cell["kept"]
            print(
                f"{config['problem']} {config['method']} {impl}: glibc default "
                f"{d['seconds']['median'] * 1e3:.0f} ms ({d['seconds']['min'] * 1e3:.0f}-"
                f"{d['seconds']['max'] * 1e3:.0f}), {d['faults']['median']:.0f} faults; kept "
                f"{k['seconds']['median'] * 1e3:.0f} ms ({k['seconds']['min'] * 1e3:.0f}-"
                f"{k['seconds']['max'] * 1e3:.0f}), {k['faults']['median']:.0f} faults; "
                f"x{ratio:.2f}",
                flush=True,
            )
    return cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="measure", choices=("measure", "child"))
    parser.add_argument("--processes", type=count, default=6, help="fresh processes per case")
    parser.add_argument("--steps", type=count, default=3, help="timed UL steps per process")
    parser.add_argument("--impl", default="bilevel", choices=IMPLS, help="(child) whose step")
    parser.add_argument("--config", type=json_object, help="(child) the configuration")
    args = parser.parse_args(argv)
    if args.mode == "child" and args.config is None:
        parser.error("--config is required in child mode")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode == "child":
        print(json.dumps(child(args.impl, args.config, args.steps)))
        return
    cells = measure(args.processes, args.steps, list(IMPLS))
    write_cells(OUT, "heap_trim.py", cells, machine=machine(), kept_heap=KEPT_HEAP)


if __name__ == "__main__":
    main()
