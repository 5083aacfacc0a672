"""Run the benchmarks: ours, the bare-torch floor, BOAT and TorchOpt, side by side.

    python benchmarks/run.py            # everything (< 30 min on 2 CPU cores)
    python benchmarks/run.py --quick    # fewer rounds, steps and configurations (minutes)

Each implementation runs in its own worker process, with its own Python (the peers live in
their own virtual environments, see docs/benchmarks.md); the runner alternates between the
workers, A B C D A B C D, so that drift of a shared machine falls on all of them alike.
Peak memory is measured in a fresh process per configuration. The results go to
``benchmarks/results/<date>.json``; then ``report.py`` writes docs/benchmarks.md and its
plots from that file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from argtypes import count, existing_file, names, positive  # noqa: E402
from common import RESULTS, ROOT, git_revision, machine, process_environment  # noqa: E402

PEERS = {
    "boat": ("BENCH_BOAT_PYTHON", "/work/venvs/boat/bin/python"),
    "torchopt": ("BENCH_TORCHOPT_PYTHON", "/work/venvs/torchopt/bin/python"),
}
IMPLS = ("bilevel", "floor", "boat", "torchopt")
# what each implementation offers (others answer "unsupported" and are not asked)
ALL_METHODS = {
    "reverse",
    "truncated",
    "cg",
    "neumann",
    "fixed_point",
    "forward",
    "maml",
    "fomaml",
    "imaml",
    "hyperrep",
}
OFFERS = {
    "bilevel": ALL_METHODS,
    "floor": ALL_METHODS,
    "boat": {"reverse", "truncated", "cg", "neumann", "maml", "fomaml", "hyperrep"},
    "torchopt": {"reverse", "truncated", "cg", "neumann", "maml", "imaml", "hyperrep"},
}
OFFERS["patched"] = OFFERS["bilevel"]  # a modified copy of ours (--patched)


# --------------------------------------------------------------------------- configurations


def _config(suite: str, problem: str, method: str, **kw: Any) -> dict[str, Any]:
    return {"suite": suite, "problem": problem, "method": method, **kw}


def regression_configs(quick: bool) -> Iterator[dict[str, Any]]:
    """Ridge (T = 200: converged; T = 10: not) and logistic regression, every method."""
    for problem, steps in (("ridge", 200), ("ridge", 10), ("logistic", 100)):
        for method, extra in (
            ("reverse", {}),
            ("truncated", {"K": min(10, steps // 2)}),
            ("cg", {"k": 10}),
            ("neumann", {"k": 50}),
            ("fixed_point", {"k": 50}),
            ("forward", {}),
        ):
            yield _config("regression", problem, method, T=steps, **extra)


def sweep_configs(quick: bool) -> Iterator[dict[str, Any]]:
    """Error against solver iterations (and truncation K) at a converged ridge LL."""
    ks = (1, 5, 20, 100) if quick else (1, 2, 5, 10, 20, 50, 100, 150)
    for method in ("cg", "neumann", "fixed_point"):
        for k in ks:
            yield _config("sweep", "ridge", method, T=200, k=k)
    for k in ks:
        yield _config("sweep", "ridge", "truncated", T=200, K=k)


def scaling_configs(quick: bool) -> Iterator[dict[str, Any]]:
    """Time and memory against T on the large ridge problem; Truncated against K."""
    for steps in (10, 100, 1000):
        for method, extra in (
            ("reverse", {}),
            ("truncated", {"K": 10}),
            ("cg", {"k": 10}),
            ("forward", {}),
        ):
            if method == "forward" and steps > (10 if quick else 100):
                continue  # 20 JVPs per LL step: about 70 s per UL step at T = 1000
            yield _config("scaling", "ridge_large", method, T=steps, **extra)
    for k in () if quick else (100, 1000):
        yield _config("scaling", "ridge_large", "truncated", T=1000, K=k)


def cleaning_configs(quick: bool) -> Iterator[dict[str, Any]]:
    """One UL step of data hyper-cleaning (5,000 example weights, T = 100)."""
    for method, extra in (
        ("reverse", {}),
        ("truncated", {"K": 10}),
        ("cg", {"k": 10}),
        ("neumann", {"k": 10}),
        ("fixed_point", {"k": 10}),
    ):
        if quick and method not in ("reverse", "cg"):
            continue
        yield _config("cleaning", "cleaning", method, T=100, **extra)


def meta_configs(quick: bool) -> Iterator[dict[str, Any]]:
    """One meta-step of 5-way 1-shot Omniglot-shaped tasks on the 4-conv network."""
    for batch in (4,) if quick else (4, 32):
        for method in ("maml", "fomaml", "imaml", "hyperrep"):
            yield _config("meta", "meta", method, batch=batch)


SUITES = {
    "regression": regression_configs,
    "sweep": sweep_configs,
    "scaling": scaling_configs,
    "cleaning": cleaning_configs,
    "meta": meta_configs,
}
# which measurements each suite takes
MEASURES = {
    "regression": ("time", "error", "memory"),
    "sweep": ("error",),
    "scaling": ("time", "memory"),
    "cleaning": ("time", "memory", "agreement"),
    "meta": ("time", "memory", "agreement"),
}


def label(config: dict[str, Any]) -> str:
    """A short readable name of a configuration."""
    keys = [k for k in ("T", "K", "k", "batch") if k in config]
    return " ".join([config["problem"], config["method"], *(f"{k}={config[k]}" for k in keys)])


# --------------------------------------------------------------------------- workers


class WorkerProcess:
    """A ``worker.py serve`` process of one implementation."""

    def __init__(
        self,
        impl: str,
        python: str,
        threads: int,
        library: str | None = None,
        kept_heap: bool = True,
    ) -> None:
        self.impl, self.python, self.threads = impl, python, threads
        path = os.pathsep.join([library or str(ROOT), str(HERE)]) if impl == "bilevel" else HERE
        # peak memory is measured with glibc's defaults, as users run; timings with the
        # kept heap (``kept_heap``), where they measure the code, not where glibc's trimming
        # happened to fall in that process (heap_trim.py)
        self.env = process_environment(False, {**os.environ, "PYTHONPATH": str(path)})
        self.proc = subprocess.Popen(
            [python, str(HERE / "worker.py"), "serve", "--impl", impl, "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=process_environment(kept_heap, self.env),
            cwd=HERE,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {impl} worker exited at start ({python})")
        self.hello = json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} worker died on {request}")
        return json.loads(line)

    def memory(self, config: dict[str, Any], steps: int) -> dict[str, Any]:
        """Peak memory of ``config`` in a fresh process of this implementation."""
        cmd = [
            self.python,
            str(HERE / "worker.py"),
            "memory",
            "--impl",
            self.impl,
            "--threads",
            str(self.threads),
            "--steps",
            str(steps),
            "--config",
            json.dumps(config),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=HERE)
        lines = out.stdout.strip().splitlines()
        if out.returncode or not lines:
            return {"failed": f"exit {out.returncode}: {out.stderr.strip()[-500:]}"}
        return json.loads(lines[-1])

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def start_workers(
    impls: list[str], threads: int, patched: str | None = None, kept_heap: bool = True
) -> tuple[dict[str, WorkerProcess], dict]:
    """Start one worker per implementation; a peer that cannot start is reported, not fatal.
    ``patched``: a folder holding a modified ``bilevel`` package, run as one more
    implementation named ``patched`` (to measure a proposed change against the checkout).
    ``kept_heap``: the timing workers run with :data:`common.KEPT_HEAP`."""
    workers, unavailable = {}, {}
    if patched:
        worker = WorkerProcess("bilevel", sys.executable, threads, patched, kept_heap)
        worker.name = "patched"
        workers["patched"] = worker
    for impl in impls:
        python = sys.executable
        if impl in PEERS:
            var, default = PEERS[impl]
            python = os.environ.get(var, default)
            if not Path(python).exists():
                unavailable[impl] = f"no Python at {python} (set {var}; see docs/benchmarks.md)"
                continue
        try:
            workers[impl] = WorkerProcess(impl, python, threads, kept_heap=kept_heap)
        except Exception as exc:
            unavailable[impl] = f"{type(exc).__name__}: {exc}"
    return workers, unavailable


# --------------------------------------------------------------------------- the run


class Run:
    """Runs the suites and collects one JSON document."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds or (2 if self.quick else 3)
        self.budget = args.budget or (0.2 if self.quick else 0.6)
        self.records: list[dict[str, Any]] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-")

    def log(self, text: str) -> None:
        print(text, flush=True)

    def offers(self, impl: str, config: dict[str, Any], measure: str = "error") -> bool:
        """Whether ``impl`` runs ``config`` for ``measure``. Quick mode times the scaling
        suite and measures memory for ours and the floor only."""
        if config["method"] not in OFFERS[impl]:
            return False
        quick_skip = measure == "memory" or (measure == "time" and config["suite"] == "scaling")
        return not (self.quick and quick_skip and impl in PEERS)

    def heavy(self, config: dict[str, Any]) -> int:
        """0 for a light configuration, 1 for one of seconds per UL step, 2 for the slowest."""
        if config.get("batch", 0) >= 32:
            return 2
        slow = config["method"] == "forward" and config["problem"] == "ridge_large"
        return int(config["suite"] in ("meta", "cleaning") or config.get("T", 0) >= 1000 or slow)

    def wants_memory(self, config: dict[str, Any]) -> bool:
        """Memory where it can differ: not for the small regression problems in quick mode
        (all of them but ridge T=200 in full mode), and at meta-batch 4 only (the tasks run
        one after another, so the peak does not grow with the batch)."""
        if self.args.no_memory or "memory" not in MEASURES[config["suite"]]:
            return False
        if config["suite"] == "regression":
            return not self.quick and config["problem"] == "ridge" and config["T"] == 200
        return config.get("batch", 4) == 4

    def time(self, workers: dict[str, WorkerProcess], config: dict[str, Any]) -> None:
        """Alternate the implementations for ``rounds`` rounds; pool the step times."""
        impls = [i for i in workers if self.offers(i, config, "time")]
        times: dict[str, list[float]] = {i: [] for i in impls}
        status: dict[str, dict] = {}
        heavy = self.heavy(config)
        max_steps = [200, 2 if self.quick else 4, 1][heavy]
        rounds = 2 if heavy == 2 else self.rounds
        for _ in range(rounds):
            for impl in impls:
                if impl in status:
                    continue
                request = {
                    "op": "time",
                    "config": config,
                    "budget": self.budget,
                    "max_steps": max_steps,
                    "min_steps": 1 if heavy else 3,
                    "warmup": 0 if heavy else 1,
                }
                answer = workers[impl].ask(request)
                if "times" in answer:
                    times[impl].extend(answer["times"])
                else:
                    status[impl] = answer
        load = os.getloadavg()
        for impl in impls:
            heap = "glibc" if self.args.glibc_heap else "kept"
            record = {"kind": "time", "config": config, "impl": impl, "loadavg": load, "heap": heap}
            if impl in status:
                record.update(status[impl])
            else:
                ts = sorted(times[impl])
                record.update(
                    {
                        "median": ts[len(ts) // 2]
                        if len(ts) % 2
                        else (ts[len(ts) // 2 - 1] + ts[len(ts) // 2]) / 2,
                        "min": ts[0],
                        "max": ts[-1],
                        "n": len(ts),
                        "times": times[impl],
                    }
                )
            self.records.append(record)
        self.log(
            "  time   "
            + label(config)
            + ": "
            + ", ".join(
                f"{r['impl']} {r['median'] * 1e3:.1f} ms"
                if "median" in r
                else f"{r['impl']} {next(iter(k for k in r if k in ('unsupported', 'failed')))}"
                for r in self.records[-len(impls) :]
            )
        )

    def error(
        self, workers: dict[str, WorkerProcess], config: dict[str, Any], agreement: bool
    ) -> None:
        """Each implementation's hypergradient at the initial UL point: its error against the
        exact answer, or (``agreement``) its distance to the floor's."""
        import problems as P
        import torch

        saved = {}
        for impl, worker in workers.items():
            if not self.offers(impl, config):
                continue
            path = os.path.join(self.tmp.name, f"{impl}-{len(self.records)}.pt")
            answer = worker.ask({"op": "error", "config": config, "save": path})
            record = {"kind": "error", "config": config, "impl": impl, **answer}
            if "saved" in answer:
                saved[impl] = record
            self.records.append(record)
        if agreement and "floor" in saved:
            floor = torch.load(saved["floor"]["saved"], weights_only=True)
            flat_floor = torch.cat([g.flatten() for g in floor])
            for record in saved.values():
                mine = torch.load(record["saved"], weights_only=True)
                flat = torch.cat([g.flatten() for g in mine])
                record["difference_to_floor"] = P.relative_error(flat, flat_floor)
        for record in saved.values():
            record.pop("saved")
        shown = [r for r in self.records if r["kind"] == "error" and r["config"] is config]
        self.log(
            "  error  "
            + label(config)
            + ": "
            + ", ".join(
                f"{r['impl']} "
                + " ".join(
                    f"{v:.1e}" for k, v in r.items() if k.startswith(("error_", "difference"))
                )
                for r in shown
                if "norm" in r
            )
        )

    def memory(self, workers: dict[str, WorkerProcess], config: dict[str, Any]) -> None:
        """Peak memory per implementation, each in a fresh process."""
        parts = []
        for impl, worker in workers.items():
            if not self.offers(impl, config, "memory"):
                continue
            answer = worker.memory(config, steps=1)
            self.records.append({"kind": "memory", "config": config, "impl": impl, **answer})
            parts.append(
                f"{impl} {answer['bytes'] / 2**20:.1f} MiB" if "bytes" in answer else f"{impl} -"
            )
        self.log("  memory " + label(config) + ": " + ", ".join(parts))

    def run(self) -> dict[str, Any]:
        args = self.args
        started = time.time()
        header = {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(
                ["python", "benchmarks/run.py", *map(shlex.quote, _shown(sys.argv[1:]))]
            ),
            "quick": self.quick,
            "threads": args.threads,
            "rounds": self.rounds,
            "budget_s": self.budget,
            "machine": machine(),
            "git": git_revision(),
            "loadavg_start": os.getloadavg(),
        }
        impls = [i for i in args.impls.split(",") if i]
        workers, unavailable = start_workers(
            impls, args.threads, args.patched, kept_heap=not args.glibc_heap
        )
        header["versions"] = {i: w.hello["version"] for i, w in workers.items()}
        header["notes"] = {i: w.hello.get("notes", []) for i, w in workers.items()}
        header["unavailable"] = unavailable
        for impl, why in unavailable.items():
            self.log(f"{impl}: unavailable: {why}")
        pattern = re.compile(args.only) if args.only else None
        try:
            for suite in args.suites.split(","):
                self.log(f"[{suite}]")
                for config in SUITES[suite](self.quick):
                    if pattern and not pattern.search(label(config)):
                        continue
                    if args.threads != 1:
                        config["threads"] = args.threads
                    measures = ("memory",) if args.memory_only else MEASURES[suite]
                    if "error" in measures or "agreement" in measures:
                        self.error(workers, config, agreement="agreement" in measures)
                    if "time" in measures:
                        self.time(workers, config)
                    if self.wants_memory(config):
                        self.memory(workers, config)
                    if args.partial:  # what is done so far, should the run be cut short
                        done = {**header, "records": self.records}
                        Path(args.partial).write_text(json.dumps(done))
        finally:
            for worker in workers.values():
                worker.close()
        header["loadavg_end"] = os.getloadavg()
        header["duration_s"] = round(time.time() - started, 1)
        return {**header, "records": self.records}


def _shown(argv: list[str]) -> list[str]:
    """The command line as the results record it: without ``--partial``'s progress file,
    which changes no result (a temporary file a page should not name)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--partial":
            skip = True
        elif not arg.startswith("--partial="):
            shown.append(arg)
    return shown


def annotate(path: Path, args: argparse.Namespace) -> None:
    """Record each implementation's notes (what its worker reports at start) in a results
    file, for files written before the workers reported them."""
    workers, _ = start_workers([i for i in args.impls.split(",") if i], args.threads)
    data = json.loads(path.read_text())
    data["notes"] = {i: w.hello.get("notes", []) for i, w in workers.items()}
    for worker in workers.values():
        worker.close()
    path.write_text(json.dumps(data, indent=1))
    print(f"recorded the notes of {', '.join(workers)} in {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes instead of ~25")
    parser.add_argument(
        "--impls", type=names(IMPLS), default=",".join(IMPLS), help="comma-separated"
    )
    parser.add_argument(
        "--suites", type=names(SUITES), default=",".join(SUITES), help="comma-separated"
    )
    parser.add_argument("--only", help="regular expression on configuration labels")
    parser.add_argument("--threads", type=count, default=1, help="torch threads per worker")
    parser.add_argument("--rounds", type=count, help="alternation rounds (2 quick, 3 full)")
    parser.add_argument("--budget", type=positive, help="seconds of timed steps per round")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument(
        "--glibc-heap",
        action="store_true",
        help="time with glibc's default heap trimming (default: the kept heap, heap_trim.py)",
    )
    parser.add_argument("--memory-only", action="store_true", help="only the memory runs")
    parser.add_argument("--no-report", action="store_true", help="do not write the docs page")
    parser.add_argument("--out", help="results file (default: results/<date>.json)")
    parser.add_argument("--patched", help="folder with a modified bilevel package to compare")
    parser.add_argument("--partial", help="file to rewrite with the results after each config")
    parser.add_argument(
        "--annotate",
        type=existing_file,
        help="only (re)record the workers' notes into this file",
    )
    args = parser.parse_args(argv)
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as error:
            parser.error(f"--only: not a regular expression ({error}): {args.only!r}")
    if args.no_memory and args.memory_only:
        parser.error("--no-memory and --memory-only together would measure nothing")
    if args.patched is not None and not (Path(args.patched) / "bilevel" / "__init__.py").is_file():
        parser.error(f"--patched: {args.patched} holds no bilevel package (bilevel/__init__.py)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.annotate:
        annotate(Path(args.annotate), args)
        return
    result = Run(args).run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['duration_s']} s)")
    if not args.no_report:
        import report

        report.main([str(out)])


if __name__ == "__main__":
    main()
