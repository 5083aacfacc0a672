"""Measurement helpers shared by every benchmark process (standard library and torch only).

This module is imported by the workers of all implementations, including the peers' own
virtual environments, so it must not import ``bilevel`` or any peer library.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: the environment of a process whose freed memory stays in glibc's heap for the next step
#: (no trimming; large blocks mapped from 32 MiB up, the most glibc's sliding threshold
#: reaches on 64-bit Linux): ``heap_trim.py`` measures why timings run with it
KEPT_HEAP = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


#: the same settings as a shell would set them
KEPT_HEAP_TEXT = " ".join(f"{k}={v}" for k, v in KEPT_HEAP.items())


def process_environment(kept_heap: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without glibc's heap settings, then
    with :data:`KEPT_HEAP` if ``kept_heap``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in KEPT_HEAP}
    return {**env, **KEPT_HEAP} if kept_heap else env


def json_from_process(command: list[str], env: dict[str, str], what: str) -> Any:
    """Run ``command`` (in this folder, with ``env``) and return its last line of output as
    JSON; raise ``RuntimeError`` naming ``what``, with its error output, if it fails."""
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=RESULTS.parent)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


class NotSupported(Exception):
    """An implementation cannot run a configuration (the reason is the message)."""


def apply_hypergradient(opt: torch.optim.Optimizer, params: Any, grads: list[torch.Tensor]) -> None:
    """One UL step of a hand-built runner: the hypergradient as ``.grad``, then ``opt.step()``."""
    opt.zero_grad(set_to_none=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()


def sync(device: str) -> None:
    """Wait for queued device work, so that wall time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], n: int, device: str = "cpu") -> list[float]:
    """Wall time of ``n`` calls of ``step``, each timed on its own, in seconds."""
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median, min, max and count of a list of step times (seconds)."""
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "n": len(times),
    }


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> str:
    """Reset the process's peak RSS to its current RSS, if the kernel allows it.

    Writing ``5`` to /proc/self/clear_refs resets ``VmHWM`` (Linux >= 4.0). Returns the
    method the peak will be read with: ``"VmHWM"`` after a reset, else ``"ru_maxrss"``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def peak_rss_kib(method: str) -> int:
    """Peak resident set size so far, in KiB, by ``method`` (see :func:`reset_peak_rss`)."""
    if method == "VmHWM":
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    """Current resident set size, in KiB."""
    return _status_kib("VmRSS")


def measure_peak_memory(step: Callable[[], Any], device: str, steps: int = 2) -> dict[str, Any]:
    """Peak memory of ``steps`` UL steps above what the process holds before them.

    CPU: the peak RSS (VmHWM, reset first through /proc/self/clear_refs; ``ru_maxrss`` when
    the reset is not allowed) minus the RSS just before the first step, after the problem,
    the models and the data exist. CUDA: ``torch.cuda.max_memory_allocated`` minus
    ``torch.cuda.memory_allocated`` before the steps.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"method": "cuda.max_memory_allocated", "bytes": peak - base, "baseline": base}
    method = reset_peak_rss()
    base = current_rss_kib() if method == "VmHWM" else peak_rss_kib(method)
    for _ in range(steps):
        step()
    peak = peak_rss_kib(method)
    return {"method": method, "bytes": max(peak - base, 0) * 1024, "baseline": base * 1024}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "-s"))}


def write_cells(path: Path, script: str, cells: list[dict[str, Any]], **extra: Any) -> None:
    """Write a timing script's ``cells`` to ``path`` (JSON) with what a page quotes of the
    run: its command, date, CPU and commit."""
    result = {
        "command": " ".join(["python3", f"benchmarks/{script}", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "git": git_revision(),
        **extra,
        "cells": cells,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def code_revision(git: dict[str, Any] | None) -> str:
    """How a page names the code a result was measured with (a :func:`git_revision` record),
    or ``""`` when the result did not record it."""
    if not git:
        return ""
    return f"commit {git['commit']}" + (" (with local changes)" if git.get("dirty") else "")


def machine() -> dict[str, Any]:
    """What the page states about the machine."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command_line(argv: list[str] | None) -> str:
    """The command that ran this benchmark script, as its results record it."""
    return "python3 " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
