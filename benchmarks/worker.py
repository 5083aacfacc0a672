"""A benchmark worker: runs configurations of one implementation, in its own process.

It is started by ``run.py`` with the Python of the implementation's environment (ours, or a
peer's virtual environment), and never imports another implementation. Two modes:

- ``python worker.py serve --impl NAME --threads N``: reads one JSON request per line on
  stdin (``time``, ``error`` or ``quit``) and answers one JSON line on stdout; the runner
  keeps one per implementation alive and alternates between them.
- ``python worker.py memory --impl NAME --threads N --config JSON``: builds one configuration
  in this fresh process and prints the peak memory of its first UL step.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import problems as P
import torch
from argtypes import count, json_object
from common import NotSupported, measure_peak_memory, summarize, time_steps


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS is a fair baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


class Worker:
    """Builds and runs configurations of one implementation, keeping the last one warm."""

    def __init__(self, impl: str) -> None:
        self.module = importlib.import_module(f"impl_{impl}")
        self.key: str | None = None
        self.runner: Any = None
        self._exact: dict[str, torch.Tensor] = {}

    def build(self, config: dict[str, Any]) -> tuple[Any, bool]:
        """The runner of ``config``, and whether it was just built (not yet warm)."""
        key = json.dumps(config, sort_keys=True)
        if key == self.key:
            return self.runner, False
        self.key, self.runner = None, None
        gc.collect()
        runner = self.module.build(config, P.build(config))
        self.key, self.runner = key, runner
        return runner, True

    def time(
        self, config: dict[str, Any], budget: float, warmup: int, min_steps: int, max_steps: int
    ) -> dict:
        """Time single UL steps: ``warmup`` untimed steps (one more on a fresh build), then as
        many as fit in ``budget`` seconds (between ``min_steps`` and ``max_steps``)."""
        runner, fresh = self.build(config)
        device = config.get("device", "cpu")
        start = time.perf_counter()
        warm = time_steps(runner.step, warmup + (1 if fresh else 0), device)
        times = time_steps(runner.step, 1, device)
        guess = min(warm + times)
        n = int(min(max_steps, max(min_steps, budget / max(guess, 1e-6))))
        times += time_steps(runner.step, n - 1, device)
        return {
            "times": times,
            **summarize(times),
            "warmup_times": warm,
            "wall": time.perf_counter() - start,
        }

    def error(self, config: dict[str, Any], save: str | None) -> dict:
        """The hypergradient at the initial UL point: its errors against the exact answers
        that exist, and (``save``) the tensors, for comparisons across implementations."""
        runner, _ = self.build(config)
        grads = [g.detach().cpu() for g in runner.hypergradient()]
        out: dict[str, Any] = {"norm": float(torch.cat([g.flatten() for g in grads]).norm())}
        problem = P.build({**config, "device": "cpu"}) if config["problem"] != "meta" else None
        if isinstance(problem, P.Regression):
            out["error_exact"] = P.relative_error(grads[0], self._exact_ift(config, problem))
            if problem.kind == "ridge":
                unrolled = P.exact_unrolled_hypergradient(problem, config["T"])
                out["error_unrolled"] = P.relative_error(grads[0], unrolled)
        if save:
            torch.save(grads, save)
            out["saved"] = save
        return out

    def _exact_ift(self, config: dict[str, Any], problem: P.Regression) -> torch.Tensor:
        name = config["problem"]
        if name not in self._exact:
            self._exact[name] = P.exact_hypergradient(problem)
        return self._exact[name]


def serve(impl: str) -> None:
    """Answer JSON requests on stdin until ``quit`` or end of input."""
    worker = Worker(impl)
    notes = getattr(worker.module, "notes", list)()
    hello = {"impl": impl, "version": worker.module.version(), "torch": torch.__version__}
    hello["notes"] = notes
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "quit":
            break
        try:
            if op == "time":
                answer = worker.time(
                    request["config"],
                    request.get("budget", 1.0),
                    request.get("warmup", 1),
                    request.get("min_steps", 3),
                    request.get("max_steps", 200),
                )
            elif op == "error":
                answer = worker.error(request["config"], request.get("save"))
            else:
                raise ValueError(f"unknown op {op!r}")
        except NotSupported as exc:
            answer = {"unsupported": str(exc)}
        except Exception as exc:  # report, keep serving
            worker.key, worker.runner = None, None
            answer = {"failed": f"{type(exc).__name__}: {exc}", "traceback": _tail()}
        print(json.dumps(answer), flush=True)


def memory(impl: str, config: dict[str, Any], steps: int) -> None:
    """Peak memory of the first ``steps`` UL steps of ``config`` in this fresh process, above
    the memory held once the problem is built (see ``common.measure_peak_memory``).

    No warm-up step: memory that a warm-up frees can stay resident in the C allocator, and
    the measured step then reuses it without raising the peak (that hid two thirds of a
    1000-step graph in a test)."""
    worker = Worker(impl)
    try:
        runner, _ = worker.build(config)
        gc.collect()
        _malloc_trim()
        answer = measure_peak_memory(runner.step, config.get("device", "cpu"), steps)
        answer["protocol"] = f"first {steps} UL step(s) in a fresh process"
    except NotSupported as exc:
        answer = {"unsupported": str(exc)}
    except Exception as exc:
        answer = {"failed": f"{type(exc).__name__}: {exc}", "traceback": _tail()}
    print(json.dumps(answer), flush=True)


def _tail() -> str:
    return "".join(traceback.format_exc().splitlines(keepends=True)[-6:])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["serve", "memory"])
    parser.add_argument("--impl", required=True)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--steps", type=count, default=1, help="UL steps measured (memory)")
    parser.add_argument("--config", type=json_object, help="configuration as JSON (memory)")
    args = parser.parse_args(argv)
    if args.mode == "memory" and args.config is None:
        parser.error("memory needs --config, the configuration measured")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt's functorch notices
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.mode == "serve":
        serve(args.impl)
    else:
        memory(args.impl, args.config, args.steps)


if __name__ == "__main__":
    main()
