"""What objectives written the natural way cost against a ``torch.func.functional_call`` floor.

The problem is the small float64 ridge of the tests (60 examples, 5 features, one L2 penalty
``exp(log_l2)`` per feature as the UL variable). The LL model is a linear module ``x @ weight``
and the LL objective is written the natural way, by calling the model held in the state::

    model = state["ll_model"]
    0.5 * ((model(state["data"]) - state["target"]) ** 2).mean()
        + 0.5 * (state["ul_model"].log_l2.exp() * model.weight**2).sum()

One full hypergradient (an LL run of ``--iters`` steps of plain SGD, lr 0.5, then the
hypergradient) is timed for

- ``ours``: ``BilevelProblem(GradientDescent(...), Reverse(...) | Implicit(k=10, "cg"))``;
- ``ours_attr``: the same, with the objectives reading ``model.weight`` instead of calling the
  model (``x @ model.weight``): what the library costs without a call of the model;
- ``floor``: the same mathematics by hand, the model evaluated with
  ``functional_call(module, {"weight": w}, (x,))``: a loop of
  ``torch.autograd.grad(..., create_graph=True)`` (Reverse), or a loop without a graph, then
  10 iterations of CG on Hessian-vector products written inline (Implicit);
- ``bare``: the floor with ``x @ w`` in place of ``functional_call``;

``implicit_ll_phase`` times the LL run alone that ``Implicit`` asks for (no graph; ours: its
``run_ll``), against the floor's loop. Every configuration also runs with one LL step, so that
the gap splits into a fixed part per hypergradient and a part per LL step.

Configurations are timed in turn, round after round, in a new random order each round, after
a warm-up, with one thread; wall time and the thread's CPU time are both recorded (the CPU
time is the steadier figure on a shared machine). Reported: the median and the minimum, the
ratio of the medians to the floor's and the median of the per-round ratios. The
hypergradients are checked against each other and against closed forms. Then an LL step is
taken apart: the library's functions wrapped with timers inside real runs (an LL step of
Reverse and of Implicit's LL run; a one-step Reverse for the fixed costs), the pieces of a
step timed alone, and the Reverse case profiled (pyinstrument when installed; cProfile for
call counts).

    python benchmarks/objective_overhead.py [--repeats 60] [--iters 100] [--out FILE]

writes ``benchmarks/results/objective_overhead.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import importlib
import json
import math
import os
import pstats
import random
import statistics
import sys
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from argtypes import count, nonnegative, nonnegative_int
from common import RESULTS, ROOT, git_revision, machine
from torch import nn
from torch.func import functional_call

DTYPE = torch.float64
N, D = 60, 5
LR = 0.5
L2 = 0.3
CG_ITERS = 10
OUT = RESULTS / "objective_overhead.json"
#: what is compared with the ``functional_call`` floor
IMPLS = ("ours", "ours_attr", "bare")
Tensor = torch.Tensor
grad = torch.autograd.grad


# --------------------------------------------------------------------------- the problem


class LinearModel(nn.Module):
    """``x @ weight``: the LL model (``nn.Linear(d, 1, bias=False)`` without the extra axis)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


class FeatureL2(nn.Module):
    """One L2 penalty per feature, ``exp(log_l2)``: the UL model."""

    def __init__(self, d: int, value: float) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.full((d,), math.log(value), dtype=DTYPE))


def make_data(n: int = N, d: int = D, seed: int = 0) -> dict[str, Tensor]:
    """Train and validation sets from one linear teacher, as in ``tests/problems.py``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    w_true = torch.randn(d, generator=g, dtype=DTYPE)
    y = x @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    xv = torch.randn(n, d, generator=g, dtype=DTYPE)
    yv = xv @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    return {"x": x, "y": y, "xv": xv, "yv": yv}


def ll_objective(state: dict) -> Tensor:
    """LL loss written the natural way: the model held in the state is called."""
    model = state["ll_model"]
    residual = model(state["data"]) - state["target"]
    penalty = 0.5 * (state["ul_model"].log_l2.exp() * model.weight**2).sum()
    return 0.5 * (residual**2).mean() + penalty


def ul_objective(state: dict) -> Tensor:
    """UL loss (validation error), written the natural way."""
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean()


def ll_objective_attr(state: dict) -> Tensor:
    """The LL loss reading the fast weight instead of calling the model."""
    model = state["ll_model"]
    residual = state["data"] @ model.weight - state["target"]
    penalty = 0.5 * (state["ul_model"].log_l2.exp() * model.weight**2).sum()
    return 0.5 * (residual**2).mean() + penalty


def ul_objective_attr(state: dict) -> Tensor:
    """The UL loss reading the fast weight instead of calling the model."""
    residual = state["data"] @ state["ll_model"].weight - state["target"]
    return 0.5 * (residual**2).mean()


# --------------------------------------------------------------------------- closed forms


def hessian(data: dict[str, Tensor], log_l2: Tensor) -> Tensor:
    x = data["x"]
    return x.T @ x / len(x) + torch.diag(log_l2.exp())


def exact_unrolled(data: dict[str, Tensor], log_l2: Tensor, steps: int) -> Tensor:
    """Gradient of ``log_l2 -> L_ul(w_T)`` for ``T`` GD steps from zero, from
    ``w_T = H^{-1} (I - (I - lr H)^T) b``."""
    lam = log_l2.detach().clone().requires_grad_()
    x, y, xv, yv = data["x"], data["y"], data["xv"], data["yv"]
    h = hessian(data, lam)
    eye = torch.eye(len(h), dtype=DTYPE)
    power = torch.linalg.matrix_power(eye - LR * h, steps)
    w = torch.linalg.solve(h, (eye - power) @ (x.T @ y / len(x)))
    return grad(0.5 * ((xv @ w - yv) ** 2).mean(), lam)[0]


def exact_implicit(data: dict[str, Tensor], log_l2: Tensor) -> Tensor:
    """Implicit-function-theorem hypergradient at the exact LL minimizer."""
    lam = log_l2.detach()
    x, y, xv, yv = data["x"], data["y"], data["xv"], data["yv"]
    h = hessian(data, lam)
    w = torch.linalg.solve(h, x.T @ y / len(x))
    q = torch.linalg.solve(h, xv.T @ (xv @ w - yv) / len(xv))
    return -(lam.exp() * w) * q


def exact_solution(data: dict[str, Tensor], log_l2: Tensor) -> Tensor:
    """The LL minimizer."""
    x, y = data["x"], data["y"]
    return torch.linalg.solve(hessian(data, log_l2.detach()), x.T @ y / len(x))


def relative_error(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- the floors


def forward_of(module: nn.Module, kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``(w, x) -> model output``: through ``functional_call`` or as ``x @ w``."""
    if kind == "floor":
        return lambda w, x: functional_call(module, {"weight": w}, (x,))
    return lambda w, x: x @ w


def floor_reverse(
    module: nn.Module, lam: Tensor, data: dict, steps: int, kind: str
) -> Callable[[], Tensor]:
    """Reverse mode through ``steps`` GD steps, a plain loop of ``autograd.grad``."""
    f = forward_of(module, kind)
    x, y, xv, yv = data["x"], data["y"], data["xv"], data["yv"]

    def run() -> Tensor:
        w = torch.zeros(x.shape[1], dtype=DTYPE, requires_grad=True)
        for _ in range(steps):
            loss = 0.5 * ((f(w, x) - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()
            (g,) = grad(loss, w, create_graph=True)
            w = w - LR * g
        (h,) = grad(0.5 * ((f(w, xv) - yv) ** 2).mean(), lam)
        return h

    return run


def floor_implicit(
    module: nn.Module, lam: Tensor, data: dict, steps: int, kind: str, ll_only: bool = False
) -> Callable[[], Tensor]:
    """``steps`` GD steps without a graph, then ``CG_ITERS`` iterations of CG on HVPs (with
    ``ll_only``, the LL weights after the steps)."""
    f = forward_of(module, kind)
    x, y, xv, yv = data["x"], data["y"], data["xv"], data["yv"]

    def ll(w: Tensor, l2: Tensor) -> Tensor:
        return 0.5 * ((f(w, x) - y) ** 2).mean() + 0.5 * (l2.exp() * w**2).sum()

    def run() -> Tensor:
        frozen = lam.detach()
        w = torch.zeros(x.shape[1], dtype=DTYPE)
        for _ in range(steps):
            w = w.detach().requires_grad_()
            (g,) = grad(ll(w, frozen), w)
            w = w - LR * g
        if ll_only:
            return w
        w = w.detach().requires_grad_()
        (v,) = grad(0.5 * ((f(w, xv) - yv) ** 2).mean(), w)
        (g,) = grad(ll(w, lam), w, create_graph=True)
        q, r, p = torch.zeros_like(v), v, v
        rr = (r * r).sum()
        for _ in range(CG_ITERS):
            (hp,) = grad(g, w, p, retain_graph=True)
            php = (p * hp).sum()
            alpha = torch.where(php > 0, rr / php, 0.0)
            q = q + alpha * p
            r = r - alpha * hp
            rr_new = (r * r).sum()
            beta = torch.where(rr > 0, rr_new / rr, 0.0)
            p = r + beta * p
            rr = rr_new
        (h,) = grad(g, lam, q)
        return -h

    return run


# --------------------------------------------------------------------------- the library


def import_library(wait_s: float) -> tuple[dict[str, Any] | None, str | None]:
    """``bilevel``'s classes, retrying every minute for ``wait_s`` seconds while an import
    fails (the library may be mid-edit); ``(None, error)`` when it never imports."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lib = {
                "BilevelProblem": importlib.import_module("bilevel").BilevelProblem,
                "GradientDescent": importlib.import_module("bilevel.ll").GradientDescent,
                "Reverse": importlib.import_module("bilevel.ul").Reverse,
                "Implicit": importlib.import_module("bilevel.ul").Implicit,
            }
            return lib, None
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
            for name in [m for m in sys.modules if m == "bilevel" or m.startswith("bilevel.")]:
                del sys.modules[name]
            if time.monotonic() + 60 > deadline:
                return None, message
            print(f"import bilevel failed ({message}); retrying in 60 s", flush=True)
            time.sleep(60)


def ours(
    lib: dict[str, Any], method: str, steps: int, data: dict, attr: bool = False
) -> tuple[Callable[[], Tensor], Any]:
    """The library's hypergradient on fresh models (``implicit_ll_phase``: the LL run that
    ``Implicit`` asks for, without a graph, and its final weights); returns
    ``(call, problem)``."""
    ll_obj, ul_obj = (
        (ll_objective_attr, ul_objective_attr) if attr else (ll_objective, ul_objective)
    )
    model, penalty = LinearModel(D), FeatureL2(D, L2)
    ll = lib["GradientDescent"](ll_obj, model, penalty, lr=LR, iters=steps)
    if method == "reverse":
        ul = lib["Reverse"](ul_obj, penalty, ll_obj, model)
    elif method == "implicit_ll_phase":
        ul = lib["Implicit"](ul_obj, penalty, ll_obj, model, ll_learning_rate=LR, k=CG_ITERS)
        problem = lib["BilevelProblem"](ll, ul)

        def ll_phase() -> Tensor:
            trajectory = ul.run_ll(ll, data["x"], data["y"])
            weight = trajectory.weights[0].detach()
            ll.release(trajectory.model)
            return weight

        return ll_phase, problem
    else:
        ul = lib["Implicit"](
            ul_obj, penalty, ll_obj, model, ll_learning_rate=LR, k=CG_ITERS, method="cg"
        )
    problem = lib["BilevelProblem"](ll, ul)
    train, val = (data["x"], data["y"]), (data["xv"], data["yv"])

    def run() -> Tensor:
        return problem.hypergradient(train, val)[0]

    return run, problem


def configurations(
    lib: dict[str, Any] | None, data: dict, steps: int
) -> tuple[dict[str, Callable[[], Tensor]], dict[str, str]]:
    """Every timed configuration, ``"<method>/T=<steps>/<impl>"``, and the errors of those
    that could not be built or run."""
    fns: dict[str, Callable[[], Tensor]] = {}
    errors: dict[str, str] = {}
    floors = {
        "reverse": floor_reverse,
        "implicit_cg": floor_implicit,
        "implicit_ll_phase": functools.partial(floor_implicit, ll_only=True),
    }
    for method, floor in floors.items():
        for t in (steps, 1):
            key = f"{method}/T={t}"
            if lib is not None:
                for impl, attr in (("ours", False), ("ours_attr", True)):
                    name = f"{key}/{impl}"
                    try:
                        fn, _ = ours(lib, method.replace("_cg", ""), t, data, attr)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # T=1 is not stationary
                            fn()  # patches the LL model (reused by the later calls)
                        fns[name] = fn
                    except Exception as error:
                        errors[name] = f"{type(error).__name__}: {error}"
                        traceback.print_exc()
            for impl in ("floor", "bare"):
                module, lam = LinearModel(D), FeatureL2(D, L2).log_l2
                fns[f"{key}/{impl}"] = floor(module, lam, data, t, impl)
    return fns, errors


# --------------------------------------------------------------------------- timing


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function, wall (``perf_counter``) and the CPU time of this
    thread (``thread_time``: with one thread the CPU autograd engine runs here, and time spent
    descheduled by other processes on a shared machine does not count), timed in turn round
    after round after ``warmup`` untimed rounds, in a new random order each round (so that no
    configuration always follows the same one: the one after a long run would pay for its
    memory)."""
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for clock in times.values():
        clock.update({name: [] for name in fns})
    order = list(fns)
    shuffle = random.Random(0).shuffle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for round_ in range(warmup + repeats):
            shuffle(order)
            for name in order:
                fn = fns[name]
                cpu, wall = time.thread_time(), time.perf_counter()
                fn()
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                if round_ >= warmup:
                    times["wall"][name].append(wall)
                    times["cpu"][name].append(cpu)
    return times


def summary_ms(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "n": len(times),
    }


def _quartiles(values: list[float]) -> list[float]:
    return [float(q) for q in statistics.quantiles(values, n=4)] if len(values) > 1 else values


def ratios(times: dict[str, list[float]], steps: int) -> dict[str, dict[str, Any]]:
    """Per method and LL length: median/median and paired (per-round) ratios to the
    ``functional_call`` floor, and the gap to it in µs per LL step."""
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({name.rsplit("/", 1)[0] for name in times}):
        base = times.get(f"{key}/floor")
        for impl in IMPLS:
            mine = times.get(f"{key}/{impl}")
            if mine is None or base is None:
                continue
            t = int(key.split("T=")[1])
            paired = [a / b for a, b in zip(mine, base, strict=True)]
            gap = statistics.median(mine) - statistics.median(base)
            out[f"{key}/{impl}"] = {
                "ratio_of_medians": statistics.median(mine) / statistics.median(base),
                "ratio_of_mins": min(mine) / min(base),
                "ratio_paired_median": statistics.median(paired),
                "ratio_paired_quartiles": _quartiles(paired),
                "gap_us": gap * 1e6,
                "gap_us_per_ll_step": gap * 1e6 / t,
            }
    # split the gap into a fixed part and a part per LL step, from T=steps and T=1
    for method in ("reverse", "implicit_cg", "implicit_ll_phase"):
        for impl in IMPLS:
            long_, short = out.get(f"{method}/T={steps}/{impl}"), out.get(f"{method}/T=1/{impl}")
            if long_ is None or short is None or steps == 1:
                continue
            per_step = (long_["gap_us"] - short["gap_us"]) / (steps - 1)
            long_["gap_split"] = {
                "per_ll_step_us": per_step,
                "fixed_us": short["gap_us"] - per_step,
            }
    return out


def micro_us(fn: Callable[[], Any], calls: int = 2000, blocks: int = 7) -> float:
    """Median over ``blocks`` of the mean µs per call of ``fn``."""
    per_call = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_call)


def pieces(lib: dict[str, Any] | None, data: dict) -> dict[str, Any]:
    """The pieces of one LL step with a graph, each timed alone (µs per call)."""
    x, y = data["x"], data["y"]
    module = LinearModel(D)
    penalty = FeatureL2(D, L2)
    w = torch.zeros(D, dtype=DTYPE, requires_grad=True)
    out: dict[str, Any] = {}

    def add(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            out[name] = micro_us(fn)
        except Exception as error:
            out[name] = f"{type(error).__name__}: {error}"

    add("forward: x @ w", lambda: x @ w)
    add(
        "forward: functional_call(module, {'weight': w}, (x,))",
        lambda: functional_call(module, {"weight": w}, (x,)),
    )
    add("forward: plain nn.Module call module(x)", lambda: module(x))
    add("attribute: plain module.weight", lambda: module.weight)
    add(
        "step floor: loss + autograd.grad(create_graph) + update (bare, one step)",
        lambda: (
            w
            - LR
            * grad(
                0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (penalty.log_l2.exp() * w**2).sum(),
                w,
                create_graph=True,
            )[0]
        ),
    )
    if lib is None:
        return out
    try:
        patched_mod = importlib.import_module("bilevel.ll.patched")
        state_mod = importlib.import_module("bilevel.state")
        gd = lib["GradientDescent"](ll_objective, module, penalty, lr=LR, iters=10)
        patched = gd.patched_model(graph_from_start=False)
    except Exception as error:
        out["library pieces"] = f"{type(error).__name__}: {error}"
        return out
    install = getattr(patched_mod, "install", None)
    if install is not None:
        install(patched, [w])
    state = {"data": x, "target": y, "ul_model": penalty, "ll_model": patched}
    loss = ll_objective(state)
    add("forward: patched model(x)", lambda: patched(x))
    add("attribute: patched model.weight", lambda: patched.weight)
    add("objective: ll_objective(state) (natural, patched model)", lambda: ll_objective(state))
    add("objective: ll_objective_attr(state) (x @ model.weight)", lambda: ll_objective_attr(state))
    if install is not None:
        add("library: install(patched, [w])", lambda: install(patched, [w]))
    fast_weights = getattr(patched_mod, "fast_weights", None)
    if fast_weights is not None:
        add("library: fast_weights(patched)", lambda: fast_weights(patched))
    check = getattr(state_mod, "check_objective_result", None)
    if check is not None:
        add("library: check_objective_result(loss)", lambda: check(loss, "ll_objective"))
    try:
        schedule = gd.schedule()
        add("library: schedule.at(step, detach=False)", lambda: schedule.at(3, detach=False))
    except Exception as error:
        out["library: schedule.at"] = f"{type(error).__name__}: {error}"
    make_state = getattr(state_mod, "make_state", None)
    if make_state is not None:
        add("library: make_state (once per run)", lambda: make_state(x, y, penalty, patched))
    losses = torch.empty(100, dtype=DTYPE)
    add(
        "library: losses[t] = loss.detach() (run_in_place)",
        lambda: losses.__setitem__(7, loss.detach()),
    )
    add("library: loss.detach()", lambda: loss.detach())
    weight = torch.zeros(D, dtype=DTYPE, requires_grad=True)
    g = torch.ones(D, dtype=DTYPE)
    add(
        "library: weight.detach().sub_(lr * g) (run_in_place)", lambda: weight.detach().sub_(LR * g)
    )
    add(
        "floor: (w - lr * g).detach().requires_grad_() (no-graph step)",
        lambda: (weight.detach() - LR * g).detach().requires_grad_(),
    )
    add(
        "autograd.grad(loss, [w], create_graph=True)",
        lambda: grad(ll_objective_attr(state), [w], create_graph=True),
    )
    add(
        "autograd.grad(..., create_graph=True, allow_unused=True)",
        lambda: grad(ll_objective_attr(state), [w], create_graph=True, allow_unused=True),
    )
    return out


# --------------------------------------------------------------------------- profiling


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    root = str(ROOT) + "/"
    if path.startswith(root):
        return path[len(root) :]
    if "/lib/python" in path:
        return "stdlib/" + path.rsplit("/", 1)[-1]
    return path


def _area(label: str) -> str:
    for prefix, area in (
        ("bilevel/", "bilevel"),
        ("higher/", "higher"),
        ("torch/nn/modules/module.py", "torch nn.Module"),
        ("torch/autograd/", "torch autograd"),
        ("torch/_functorch/", "torch.func"),
        ("torch/nn/utils/stateless.py", "torch.func"),
        ("benchmarks/", "objectives"),
        ("stdlib/", "stdlib"),
        ("<built-in>", "C functions (torch ops, autograd engine)"),
    ):
        if label.startswith(prefix):
            return area
    return "other"


def profile_pyinstrument(fn: Callable[[], Any], calls: int, steps: int) -> dict[str, Any]:
    """Sampled time per function (self and inclusive, no double count under recursion), in
    µs per LL step."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0001)
    profiler.start()
    for _ in range(calls):
        fn()
    session = profiler.stop()
    inclusive: dict[str, float] = defaultdict(float)
    self_time: dict[str, float] = defaultdict(float)
    root = session.root_frame()

    def walk(frame: Any, seen: frozenset) -> None:
        cls = getattr(frame, "class_name", None)
        label = f"{_short(frame.file_path or '?')}:{cls + '.' if cls else ''}{frame.function}"
        real = [c for c in frame.children if not c.is_synthetic]
        self_time[label] += frame.time - sum(c.time for c in real)
        if label not in seen:
            inclusive[label] += frame.time
        for child in real:
            walk(child, seen | {label})

    if root is not None:
        walk(root, frozenset())
    scale = 1e6 / (calls * steps)
    areas: dict[str, float] = defaultdict(float)
    for label, t in self_time.items():
        areas[_area(label)] += t * scale
    return {
        "tool": f"pyinstrument {importlib.import_module('pyinstrument').__version__}",
        "interval_s": 0.0001,
        "total_us_per_ll_step": session.duration * scale,
        "self_us_per_ll_step_by_area": dict(sorted(areas.items(), key=lambda kv: -kv[1])),
        "inclusive_us_per_ll_step": _top(inclusive, scale),
        "self_us_per_ll_step": _top(self_time, scale),
    }


def _top(table: dict[str, float], scale: float, n: int = 40) -> dict[str, float]:
    rows = sorted(table.items(), key=lambda kv: -kv[1])[:n]
    return {label: round(t * scale, 2) for label, t in rows}


def profile_cprofile(fn: Callable[[], Any], calls: int, steps: int) -> dict[str, Any]:
    """Deterministic profile: calls per LL step and time per LL step (inflated by the
    profiler's own cost per Python call)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = []
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in stats.items():
        label = f"{_short(path)}:{line}:{func}"
        rows.append((label, ncalls, tottime, cumtime))
    per = calls * steps
    rows.sort(key=lambda r: -r[3])
    keep = [r for r in rows if _area(r[0]) in ("bilevel", "higher", "torch nn.Module")][:40]
    return {
        "tool": "cProfile",
        "rows": {
            label: {
                "calls_per_ll_step": round(ncalls / per, 3),
                "tottime_us_per_ll_step": round(tottime * 1e6 / per, 2),
                "cumtime_us_per_ll_step": round(cumtime * 1e6 / per, 2),
            }
            for label, ncalls, tottime, cumtime in keep
        },
    }


def profile(fns: dict[str, Callable[[], Any]], steps: int, calls: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for impl in ("ours", "floor"):
            fn = fns.get(f"reverse/T={steps}/{impl}")
            if fn is None:
                continue
            entry: dict[str, Any] = {}
            try:
                entry["sampled"] = profile_pyinstrument(fn, calls, steps)
            except ImportError:
                entry["sampled"] = "pyinstrument is not installed"
            entry["deterministic"] = profile_cprofile(fn, max(calls // 4, 2), steps)
            start = time.perf_counter()
            for _ in range(5):
                fn()
            unprofiled = (time.perf_counter() - start) / 5 * 1e6 / steps
            entry["unprofiled_us_per_ll_step"] = unprofiled
            out[f"reverse/T={steps}/{impl}"] = entry
    return out


class Timers:
    """Accumulated wall time and calls per name; ``wrap`` times a callable (its cost, about
    half a microsecond a call, is measured by :meth:`overhead_us`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def per_step(self, steps: int) -> dict[str, dict[str, float]]:
        return {
            name: {
                "us_per_ll_step": self.seconds[name] * 1e6 / steps,
                "calls_per_ll_step": self.calls[name] / steps,
            }
            for name in sorted(self.seconds, key=lambda n: -self.seconds[n])
        }

    @staticmethod
    def overhead_us() -> float:
        timers = Timers()
        nothing = timers.wrap("nothing", lambda: None)
        return micro_us(nothing) - micro_us(lambda: None)


MODEL_CALL = "  model call: state['ll_model'](x) (patched)"


def instrumented(
    lib: dict[str, Any] | None, data: dict, steps: int, calls: int, graph: bool
) -> dict[str, Any]:
    """Where an LL step goes, measured inside real runs: the library's own functions wrapped
    with timers (``Unroll.step`` with a graph, as Reverse runs it, or ``Unroll.run_in_place``
    without, as Implicit runs it; ``GradientStep.direction``, ``install``, ``fast_weights``,
    ``check_objective_result``, ``torch.autograd.grad``) and the objective timing its own
    model call; the floor's loop timed the same way. µs per LL step, each inclusive of what
    it calls (indented under its caller); the UL part and fixed costs are not in these rows."""
    out: dict[str, Any] = {"timer_overhead_us_per_call": Timers.overhead_us()}
    x, y, xv, yv = data["x"], data["y"], data["xv"], data["yv"]

    # the floor, timed part by part
    timers = Timers()
    module, lam = LinearModel(D), FeatureL2(D, L2).log_l2
    frozen = lam.detach()
    call = timers.wrap("  model call: functional_call", functional_call)

    def floor_objective(w: Tensor) -> Tensor:
        output = call(module, {"weight": w}, (x,))
        l2 = lam if graph else frozen
        return 0.5 * ((output - y) ** 2).mean() + 0.5 * (l2.exp() * w**2).sum()

    objective = timers.wrap(" objective (whole)", floor_objective)
    grad_t = timers.wrap(f" autograd.grad (create_graph={graph})", grad)

    def floor_step(w: Tensor) -> Tensor:
        if not graph:
            w = w.detach().requires_grad_()
        return w - LR * grad_t(objective(w), w, create_graph=graph)[0]

    step_t = timers.wrap("step (whole)", floor_step)

    def floor_run() -> None:
        w = torch.zeros(D, dtype=DTYPE, requires_grad=True)
        for _ in range(steps):
            w = step_t(w)
        if graph:
            grad(0.5 * ((functional_call(module, {"weight": w}, (xv,)) - yv) ** 2).mean(), lam)

    floor_timers = timers
    if lib is None:
        _alternate([(floor_run, floor_timers)], calls)
        out["floor"] = floor_timers.per_step(calls * steps)
        return out

    # ours: the library's functions wrapped for the duration of the runs
    try:
        unroll = importlib.import_module("bilevel.ll.unroll")
    except Exception as error:
        _alternate([(floor_run, floor_timers)], calls)
        out["floor"] = floor_timers.per_step(calls * steps)
        out["ours"] = f"{type(error).__name__}: {error}"
        return out
    timers = Timers()
    inside = [False]

    def natural(state: dict) -> Tensor:
        model = state["ll_model"]
        start = time.perf_counter()
        output = model(state["data"])
        if inside[0]:
            timers.seconds[MODEL_CALL] += time.perf_counter() - start
            timers.calls[MODEL_CALL] += 1
        penalty = 0.5 * (state["ul_model"].log_l2.exp() * model.weight**2).sum()
        return 0.5 * ((output - state["target"]) ** 2).mean() + penalty

    ll_obj = timers.wrap(" objective (whole)", natural)
    model, penalty_model = LinearModel(D), FeatureL2(D, L2)
    ll = lib["GradientDescent"](ll_obj, model, penalty_model, lr=LR, iters=steps)
    if graph:
        ul = lib["Reverse"](ul_objective, penalty_model, ll_obj, model)
    else:
        ul = lib["Implicit"](
            ul_objective, penalty_model, ll_obj, model, ll_learning_rate=LR, k=CG_ITERS
        )
    lib["BilevelProblem"](ll, ul)  # the checks a user's problem passes
    whole = ("step", "step (Unroll.step, whole)")
    if not graph:
        whole = ("run_in_place", "step (Unroll.run_in_place, whole, per step)")
    targets = [
        (unroll.Unroll, *whole),
        (unroll.GradientStep, "direction", " GradientStep.direction"),
        (unroll, "check_objective_result", "  check_objective_result"),
        (unroll, "install", " install"),
        (unroll, "fast_weights", " fast_weights"),
        (torch.autograd, "grad", f"  autograd.grad (create_graph={graph})"),
    ]
    saved = []

    def ours_run() -> None:
        trajectory = ul.run_ll(ll, x, y)
        if graph:
            grad(ul_objective(ul.states(trajectory.model, xv, yv)), ul.ul_params)
        ll.release(trajectory.model)

    try:
        for owner, attr, label in targets:
            original = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr)
            if original is None:
                continue
            saved.append((owner, attr, original))
            wrapped = timers.wrap(label, original)
            if attr == "grad":
                wrapped = _only_inside(inside, wrapped, original)
            elif attr == whole[0]:
                wrapped = _flag(inside, wrapped)
            setattr(owner, attr, wrapped)
        _alternate([(floor_run, floor_timers), (ours_run, timers)], calls)
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    out["floor"] = floor_timers.per_step(calls * steps)
    out["ours"] = timers.per_step(calls * steps)
    return out


def fixed_costs(lib: dict[str, Any] | None, data: dict, calls: int) -> dict[str, Any]:
    """What one hypergradient costs besides its LL steps: Reverse with ONE LL step, the
    library's functions on the way wrapped with timers (µs per hypergradient, inclusive,
    indented under their caller), next to the floor's whole one-step Reverse."""
    if lib is None:
        return {}
    try:
        modules = {
            name: importlib.import_module(f"bilevel.{name}")
            for name in ("problem", "ul.base", "ul.reverse", "ll.gradient_descent", "ll.unroll")
        }
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    gd = modules["ll.gradient_descent"].GradientDescent
    base = modules["ul.base"].HypergradientCalculator
    unroll = modules["ll.unroll"]
    targets = [
        (modules["problem"].BilevelProblem, "hypergradient", "BilevelProblem.hypergradient"),
        (modules["problem"].BilevelProblem, "_accumulate", " BilevelProblem._accumulate"),
        (base, "task_gradients", "  task_gradients"),
        (gd, "run", "   GradientDescent.run"),
        (gd, "start", "    GradientDescent.start"),
        (gd, "schedule", "     GradientDescent.schedule"),
        (gd, "patched_model", "     GradientDescent.patched_model"),
        (unroll.Unroll, "step", "    Unroll.step (the one LL step)"),
        (gd, "_check_losses", "    GradientDescent._check_losses"),
        (unroll.Unroll, "record", "    Unroll.record"),
        (base, "accumulate", "   HypergradientCalculator.accumulate"),
        (modules["ul.reverse"].Reverse, "_hypergradient", "    Reverse._hypergradient"),
        (gd, "release", "   GradientDescent.release"),
    ]
    timers = Timers()
    run, _ = ours(lib, "reverse", 1, data)
    floor_timers = Timers()
    floor = floor_timers.wrap(
        "floor: whole one-step Reverse",
        floor_reverse(LinearModel(D), FeatureL2(D, L2).log_l2, data, 1, "floor"),
    )
    saved = []
    try:
        for owner, attr, label in targets:
            original = owner.__dict__.get(attr)
            if original is None:
                continue
            saved.append((owner, attr, original))
            setattr(owner, attr, timers.wrap(label, original))
        _alternate([(run, timers), (floor, floor_timers)], calls)
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    order = [label for _, _, label in targets if label in timers.seconds]
    table = {label: timers.seconds[label] * 1e6 / calls for label in order}
    table.update({k: v * 1e6 / calls for k, v in floor_timers.seconds.items()})
    return {"us_per_hypergradient": table, "calls": calls}


def _alternate(runs: list[tuple[Callable[[], None], Timers]], calls: int) -> None:
    """Each run ``calls`` times, in turn (A B A B ...), after one untimed turn."""
    for i in range(calls + 1):
        for run, timers in runs:
            if i == 1:  # the first turn warms up
                timers.seconds.clear()
                timers.calls.clear()
            run()


def _flag(inside: list[bool], fn: Callable[..., Any]) -> Callable[..., Any]:
    def flagged(*args: Any, **kwargs: Any) -> Any:
        inside[0] = True
        try:
            return fn(*args, **kwargs)
        finally:
            inside[0] = False

    return flagged


def _only_inside(
    inside: list[bool], timed: Callable[..., Any], plain: Callable[..., Any]
) -> Callable[..., Any]:
    def choose(*args: Any, **kwargs: Any) -> Any:
        return (timed if inside[0] else plain)(*args, **kwargs)

    return choose


# --------------------------------------------------------------------------- main


def agreement(fns: dict[str, Callable[[], Tensor]], data: dict, steps: int) -> dict[str, float]:
    """Relative errors of the hypergradients against the floor and the closed forms."""
    lam = FeatureL2(D, L2).log_l2
    exact = {
        "reverse": exact_unrolled(data, lam, steps),
        "implicit_cg": exact_implicit(data, lam),
        "implicit_ll_phase": exact_solution(data, lam),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method, reference in exact.items():
            key = f"{method}/T={steps}"
            floor = fns[f"{key}/floor"]()
            out[f"{key}/floor vs closed form"] = relative_error(floor, reference)
            for impl in IMPLS:
                fn = fns.get(f"{key}/{impl}")
                if fn is not None:
                    out[f"{key}/{impl} vs floor"] = relative_error(fn(), floor)
    return out


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as error:
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=count, default=60, help="timed rounds per configuration (default 60)"
    )
    parser.add_argument(
        "--iters", type=count, default=100, help="LL steps T of one hypergradient (default 100)"
    )
    parser.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=3,
        help="untimed rounds before the timed ones (default 3)",
    )
    parser.add_argument(
        "--profile-calls",
        type=nonnegative_int,
        default=40,
        help="hypergradients run under the sampling profiler (0: no profile; default 40)",
    )
    parser.add_argument(
        "--wait",
        type=nonnegative,
        default=0.0,
        help="seconds to keep retrying, once a minute, an import of bilevel that fails "
        "(the library may be mid-edit; default 0)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON file (default {OUT})")
    args = parser.parse_args(argv)
    if args.iters < 2:
        parser.error(f"--iters must be >= 2 (a one-step run is timed beside it), got {args.iters}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    data = make_data()
    lib, import_error = import_library(args.wait)
    fns, errors = configurations(lib, data, args.iters)
    if import_error is not None:
        errors["import bilevel"] = import_error

    agree = agreement(fns, data, args.iters)
    times = interleaved(fns, args.repeats, args.warmup)
    result = {
        clock: {name: summary_ms(t) for name, t in table.items()} for clock, table in times.items()
    }
    ratio = {clock: ratios(table, args.iters) for clock, table in times.items()}
    micro = pieces(lib, data)
    prof = profile(fns, args.iters, args.profile_calls) if args.profile_calls > 0 else {}
    # these wrap the library's internals, which may be renamed: an error is recorded
    fixed = _guarded(fixed_costs, lib, data, max(args.repeats, 20))
    inloop = {
        method: _guarded(instrumented, lib, data, args.iters, max(args.repeats // 4, 2), graph)
        for method, graph in (("reverse", True), ("implicit_ll_phase", False))
    }

    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "git": git_revision(),
        "problem": {
            "kind": "ridge",
            "n": N,
            "d": D,
            "dtype": "float64",
            "l2": L2,
            "ll": f"{args.iters} steps of plain SGD, lr {LR}",
            "implicit": f"CG, k={CG_ITERS}",
            "objective": "natural: state['ll_model'](state['data'])",
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "errors": errors,
        "agreement_relative_error": agree,
        "times": result,
        "ratios_to_functional_call_floor": ratio,
        "ll_step_breakdown_us_per_ll_step": inloop,
        "fixed_costs_reverse_one_ll_step": fixed,
        "pieces_us_per_call": micro,
        "profile": prof,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    report(record, args.iters)
    print(f"\nwrote {args.out}")


def report(record: dict[str, Any], steps: int) -> None:
    """Print the tables."""
    print(f"{record['machine']['cpu']}, torch {record['machine']['torch']}, 1 thread")
    for name, error in record["errors"].items():
        print(f"ERROR {name}: {error}")
    print("\nrelative errors")
    for name, err in record["agreement_relative_error"].items():
        print(f"  {name:42s} {err:.2e}")
    for clock, title in (("wall", "wall time"), ("cpu", "CPU time of the thread")):
        print(
            f"\n{title}\n{'configuration':34s} {'median ms':>10s} {'min ms':>8s} {'ratio':>6s}"
            f" {'paired':>6s} {'quartiles':>13s} {'gap µs/step':>11s}"
        )
        table = record["ratios_to_functional_call_floor"][clock]
        for name, t in record["times"][clock].items():
            r = table.get(name, {})
            q = r.get("ratio_paired_quartiles", [1.0, 1.0, 1.0])
            print(
                f"{name:34s} {t['median_ms']:10.3f} {t['min_ms']:8.3f}"
                f" {r.get('ratio_of_medians', 1.0):6.3f} {r.get('ratio_paired_median', 1.0):6.3f}"
                f" {q[0]:6.3f}-{q[-1]:6.3f} {r.get('gap_us_per_ll_step', 0.0):11.2f}"
            )
        for name, r in table.items():
            if "gap_split" in r:
                split = r["gap_split"]
                print(
                    f"gap split {name}: {split['per_ll_step_us']:.2f} µs per LL step + "
                    f"{split['fixed_us']:.0f} µs fixed"
                )
    for method, inloop in record["ll_step_breakdown_us_per_ll_step"].items():
        if "error" in inloop:
            print(f"\n{method}: one LL step: {inloop['error']}")
            continue
        print(
            f"\n{method}: one LL step, timed inside real runs (µs per LL step; timer cost "
            f"{inloop['timer_overhead_us_per_call']:.2f} µs a call)"
        )
        for impl in ("ours", "floor"):
            rows = inloop.get(impl)
            if isinstance(rows, dict):
                print(f"  {impl}")
                for label, row in rows.items():
                    print(
                        f"    {row['us_per_ll_step']:8.2f}  {label}"
                        f" ({row['calls_per_ll_step']:.2f} calls/step)"
                    )
            elif rows is not None:
                print(f"  {impl}: {rows}")
    fixed = record["fixed_costs_reverse_one_ll_step"]
    if fixed:
        print("\nReverse with one LL step: the library's functions, µs per hypergradient")
        for label, us in fixed.get("us_per_hypergradient", {}).items():
            print(f"  {us:8.1f}  {label}")
        if "error" in fixed:
            print(f"  {fixed['error']}")
    print("\npieces (µs per call)")
    for name, us in record["pieces_us_per_call"].items():
        print(f"  {name:74s} {us:8.2f}" if isinstance(us, float) else f"  {name}: {us}")
    for name, entry in record["profile"].items():
        sampled = entry["sampled"]
        if isinstance(sampled, str):
            print(f"\n{name}: {sampled}")
            continue
        print(f"\nprofile {name} ({sampled['tool']}): µs per LL step")
        print(f"  total {sampled['total_us_per_ll_step']:.1f}; self time by area:")
        for area, us in sampled["self_us_per_ll_step_by_area"].items():
            print(f"    {area:20s} {us:8.2f}")
        print("  inclusive, top 25:")
        for label, us in list(sampled["inclusive_us_per_ll_step"].items())[:25]:
            print(f"    {us:8.2f}  {label}")


if __name__ == "__main__":
    main()
