"""Where a peer's UL step was faster than ours: the two again in one process, alternated.

    python benchmarks/same_process.py RESULTS... [--rounds 8] [--seconds 0.5] [--deps DIR]

``run.py`` times every implementation in its own worker process. On this machine the same
code can run a few percent faster or slower in one process than in another, even with the
kept heap (``heap_trim.py``, which removes one cause; the rest was not pinned down).
For every configuration of the results files (merged as ``report.py`` merges them) where a
peer's median is below ours, this script starts one process with the peer's Python, imports
ours beside it, builds both runners and times them alternately: a warm-up step each, then
``--rounds`` turns of each in alternating order, every turn timing UL steps for about
``--seconds`` (at least one). Ours needs its own dependencies in the peer's environment, from
``--deps``: ``pip install --target DIR --no-deps tqdm higher==0.2.1`` with the peer's pip.

Writes ``benchmarks/results/same_process.json``; ``report.py`` quotes each ratio beside the
configuration on the benchmarks page.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from argtypes import count, existing_file, existing_folder, json_object, positive
from common import RESULTS, ROOT, json_from_process, process_environment, write_cells

HERE = Path(__file__).resolve().parent
OUT = RESULTS / "same_process.json"


def child(impls: list[str], config: dict[str, Any], rounds: int, seconds: float) -> dict:
    """Build ``config`` for each of ``impls`` in this process and time them alternately:
    the UL step times of each (seconds)."""
    import problems as P
    import torch

    torch.set_num_threads(1)
    runners = {
        i: importlib.import_module(f"impl_{i}").build(config, P.build(config)) for i in impls
    }
    for runner in runners.values():
        runner.step()
    times: dict[str, list[float]] = {i: [] for i in impls}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            end = time.perf_counter() + seconds
            while True:
                start = time.perf_counter()
                runners[impl].step()
                finish = time.perf_counter()
                times[impl].append(finish - start)
                if finish >= end:
                    break
    return times


def slower_cells(sources: list[Path]) -> list[tuple[dict[str, Any], str, float]]:
    """The configurations where a peer's median is below ours: ``(config, peer, ours /
    theirs)``."""
    from report import PEERS, Results, key, merged

    res = Results(merged(sources))
    cells, seen = [], set()
    for configs in res.configs.values():
        for config in configs:
            if key(config) in seen:  # (a configuration of two suites: timed once)
                continue
            seen.add(key(config))
            ours = res.median(config, "bilevel")
            for peer in PEERS:
                theirs = res.median(config, peer)
                if ours is not None and theirs is not None and theirs < ours:
                    cells.append((config, peer, ours / theirs))
    return cells


def measure(
    config: dict[str, Any], peer: str, rounds: int, seconds: float, deps: Path | None
) -> dict[str, Any]:
    """Ours and ``peer`` in one process of the peer's Python (``run.PEERS``)."""
    import run

    var, default = run.PEERS[peer]
    python = os.environ.get(var, default)
    path = [str(ROOT), str(HERE), *([str(deps)] if deps else [])]
    env = process_environment(True, {**os.environ, "PYTHONPATH": os.pathsep.join(path)})
    command = [python, str(Path(__file__).resolve()), "child", "--impls", f"bilevel,{peer}"]
    command += ["--rounds", str(rounds), "--seconds", str(seconds), "--config", json.dumps(config)]
    times = json_from_process(command, env, f"{peer} on {config}")
    ours, theirs = statistics.median(times["bilevel"]), statistics.median(times[peer])
    return {
        "config": config,
        "peer": peer,
        "ours_s": ours,
        "theirs_s": theirs,
        "one_process": ours / theirs,
        "samples": min(len(v) for v in times.values()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=existing_file, help="run.py results, in order")
    parser.add_argument("--rounds", type=count, default=8, help="alternation rounds")
    parser.add_argument("--seconds", type=positive, default=0.5, help="timed seconds per turn")
    parser.add_argument("--deps", type=existing_folder, help="ours' dependencies (see above)")
    return parser.parse_args(argv)


def child_main(argv: list[str]) -> None:
    """``child --impls A,B --config JSON --rounds N --seconds S``: :func:`child`'s times, as
    one JSON line."""
    parser = argparse.ArgumentParser(prog="same_process.py child")
    parser.add_argument("--impls", required=True, help="comma-separated")
    parser.add_argument("--config", type=json_object, required=True)
    parser.add_argument("--rounds", type=count, required=True)
    parser.add_argument("--seconds", type=positive, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(child(args.impls.split(","), args.config, args.rounds, args.seconds)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        child_main(argv[1:])
        return
    args = parse_args(argv)
    cells = []
    for config, peer, across in slower_cells(args.results):
        cell = measure(config, peer, args.rounds, args.seconds, args.deps)
        cell["across_processes"] = across
        cells.append(cell)
        print(
            f"{config['problem']} {config['method']} {peer}: ours / theirs {across:.3f} in "
            f"their own processes, {cell['one_process']:.3f} in one ({cell['samples']} steps)",
            flush=True,
        )
    # (the command as run from the checkout's root, the results files where run.py writes them)
    files = [f"benchmarks/results/{p.name}" for p in args.results]
    options = ["--rounds", str(args.rounds), "--seconds", str(args.seconds)]
    options += ["--deps", str(args.deps)] if args.deps else []
    command = " ".join(["python3", "benchmarks/same_process.py", *files, *options])
    write_cells(
        OUT, "same_process.py", cells, sources=[p.name for p in args.results], command=command
    )


if __name__ == "__main__":
    main()
