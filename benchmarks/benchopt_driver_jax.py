"""Run benchopt's own bilevel solvers (benchmark_bilevel, JAX) on a quadratic problem read
from a ``.npz`` file, and write the UL iterates they reach against wall time (issue 15).

This script runs INSIDE the JAX virtual environment made by ``benchmarks/benchopt_setup.sh``
and imports neither torch nor ``bilevel``. ``benchmarks/benchopt_quadratic.py`` starts it
(one subprocess per solver run, alternated with this library's runs) and reads its JSON
answer; it is not meant to be run by hand.

The problem (one sample ``i`` of ``n``; ``y`` the inner variable, ``x`` the outer one)::

    G_i(y, x) = (u_i.y)^2/2 + (c_i.x)(w_i.y) + a_i.y + mu |y|^2/2
    F_i(y, x) = (s_i.y)^2/2 + (r_i.x)^2/2 + (k_i.x)(l_i.y) + f_i.y + h_i.x + nu |x|^2/2

is written in benchopt's quadratic form ``y'A_i y/2 + x'B_i x/2 + x'C_i y + d_i.y + e_i.x``
with per-sample matrices (``A_i = u_i u_i' + mu I``, ``C_i = c_i w_i'``, ...), and the
functions are benchopt's own (``datasets/simulated.py``'s ``get_function``: a dense matrix
per sample), or, with ``oracle="rank1"``, the same functions computed from the vectors (an
``O(p)`` oracle per sample instead of ``O(p^2)``; the solvers are benchopt's either way).

Timing follows benchopt: ``Solver.set_objective`` (which compiles, through ``run_once``) and
one warm-up ``run`` are timed apart as compile time; then ``Solver.run(callback)`` is timed
with the clock stopped inside the callback, which records ``x`` every ``eval_freq``
iterations (the stochastic solvers call it once per jitted epoch of ``eval_freq``
iterations, BOME once per iteration).

Usage (by benchmarks/benchopt_quadratic.py)::

    JAX_ENABLE_X64=1 JAX_PLATFORMS=cpu $VENV/bin/python benchopt_driver_jax.py \
        --bench $SCRATCH/benchmark_bilevel --npz problem.npz --spec '{"solver": "soba", ...}'

References: Dagreou, Ablin, Vaiter & Moreau (2022), "A framework for bilevel optimization
that enables stochastic and global variance reduction algorithms", NeurIPS (the benchmark);
Moreau et al. (2022), "Benchopt", NeurIPS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from functools import partial
from typing import Any

import numpy as np
from argtypes import existing_file, json_object


def load_module(path: str, name: str) -> Any:
    """Import the file ``path`` as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def dense_terms(z: Any) -> tuple[tuple, tuple]:
    """benchopt's per-sample matrices ``(A, B, C, d, e)`` of the inner and outer problems."""
    n, p = z["u"].shape
    d = z["c"].shape[1]
    mu, nu = float(z["mu"]), float(z["nu"])
    eye_p, eye_d = np.eye(p), np.eye(d)
    inner = (
        np.einsum("ni,nj->nij", z["u"], z["u"]) + mu * eye_p,
        np.zeros((n, d, d)),
        np.einsum("ni,nj->nij", z["c"], z["w"]),
        z["a"],
        np.zeros((n, d)),
    )
    outer = (
        np.einsum("ni,nj->nij", z["s"], z["s"]),
        np.einsum("ni,nj->nij", z["r"], z["r"]) + nu * eye_d,
        np.einsum("ni,nj->nij", z["k"], z["l"]),
        z["f"],
        z["h"],
    )
    return inner, outer


def closed_form_x_star(inner: tuple, outer: tuple) -> np.ndarray:
    """``x*`` from the means of benchopt's matrices: the value function's gradient
    ``grad_x F + C_G (-A_G^{-1} grad_y F)`` at ``y*(x) = -A_G^{-1}(d_G + C_G' x)`` is affine
    in ``x``; solve it for zero (benchopt's ``metrics`` formula, in closed form)."""
    A, _, C, dg, _ = (t.mean(0) for t in inner)
    As, Bf, Cf, df, ef = (t.mean(0) for t in outer)
    M = -np.linalg.solve(A, C.T)  # dy*/dx
    y0 = -np.linalg.solve(A, dg)
    # grad_y F = As y + Cf' x + df ; grad_x F = Bf x + Cf y + ef ; grad h = grad_x F + M' grad_y F
    lin = Bf + Cf @ M + M.T @ (As @ M + Cf.T)
    const = Cf @ y0 + ef + M.T @ (As @ y0 + df)
    return -np.linalg.solve(0.5 * (lin + lin.T), const)


def rank1_function(jnp: Any, jax: Any, z: dict, level: str) -> Any:
    """The same per-sample objective as ``get_function`` (benchopt's signature
    ``f(inner, outer, start=0, batch_size=1)``), computed from the vectors."""
    mu, nu = float(z["mu"]), float(z["nu"])
    if level == "inner":
        names = ("u", "c", "w", "a")
    else:
        names = ("s", "r", "k", "l", "f", "h")
    arrays = [jnp.asarray(z[k]) for k in names]

    @partial(jax.jit, static_argnames=("batch_size",))
    def f(inner_var: Any, outer_var: Any, start: Any = 0, batch_size: int = 1) -> Any:
        rows = [jax.lax.dynamic_slice(a, (start, 0), (batch_size, a.shape[1])) for a in arrays]
        y, x = inner_var, outer_var
        if level == "inner":
            u, c, w, a = rows
            per = 0.5 * (u @ y) ** 2 + (c @ x) * (w @ y) + a @ y
            return jnp.mean(per) + 0.5 * mu * (y @ y)
        s, r, k, l_, f_, h = rows
        per = 0.5 * (s @ y) ** 2 + 0.5 * (r @ x) ** 2 + (k @ x) * (l_ @ y) + f_ @ y + h @ x
        return jnp.mean(per) + 0.5 * nu * (x @ x)

    return f


class Recorder:
    """benchopt's callback, timed: records ``x`` every call, the clock stopped meanwhile."""

    def __init__(self, solver: Any, every: int, max_iters: int, budget_s: float,
                 stop: Any) -> None:  # fmt: skip
        self.solver, self.every, self.max_iters, self.budget_s = solver, every, max_iters, budget_s
        self.stop = stop
        self.calls, self.elapsed, self.started = 0, 0.0, None
        self.records: list[dict] = []
        self.call_times: list[float] = []

    def __call__(self) -> bool:
        import jax

        now = time.perf_counter()
        if self.started is not None:
            jax.block_until_ready(self.solver.outer_var)
            now = time.perf_counter()
            self.call_times.append(now - self.started)
            self.elapsed += now - self.started
        iters = self.calls * self.every
        x = np.asarray(getattr(self.solver, "outer_var", self.solver.outer_var0), dtype=np.float64)
        self.records.append({"iters": iters, "time": self.elapsed, "x": x.tolist()})
        self.calls += 1
        go = (
            iters < self.max_iters
            and self.elapsed < self.budget_s
            and np.all(np.isfinite(x))
            and not self.stop(x)
        )
        self.started = time.perf_counter()
        return bool(go)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, help="benchopt's benchmark_bilevel folder")
    parser.add_argument(
        "--npz", required=True, type=existing_file, help="the problem (written by the caller)"
    )
    parser.add_argument(
        "--spec", required=True, type=json_object, help="JSON: solver, params, oracle, limits"
    )
    parser.add_argument("--check", action="store_true", help="only evaluate the oracles")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.bench):
        parser.error(f"--bench: no folder {args.bench}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = args.spec
    assert "torch" not in sys.modules and "bilevel" not in sys.modules

    os.chdir(os.environ.get("TMPDIR", "/tmp"))  # joblib's cache folder lands here, not in a repo
    sys.path.insert(0, args.bench)
    import jax
    import jax.numpy as jnp

    if not jax.config.jax_enable_x64:
        raise SystemExit("set JAX_ENABLE_X64=1 (the problem is float64)")
    z = dict(np.load(args.npz))
    n, p = z["u"].shape
    d = z["c"].shape[1]
    inner, outer = dense_terms(z)
    answer: dict[str, Any] = {"jax": jax.__version__, "devices": str(jax.devices())}
    answer["x_star_benchopt_form"] = closed_form_x_star(inner, outer).tolist()

    simulated = load_module(os.path.join(args.bench, "datasets", "simulated.py"), "bb_simulated")
    if spec.get("oracle", "dense") == "dense":
        f_inner = simulated.get_function(*(jnp.asarray(t) for t in inner))
        f_outer = simulated.get_function(*(jnp.asarray(t) for t in outer))
    else:
        f_inner = rank1_function(jnp, jax, z, "inner")
        f_outer = rank1_function(jnp, jax, z, "outer")

    if args.check:
        # the oracles at the caller's test points, on rows [start, start + size)
        out = []
        for y, x, start, size in zip(
            z["test_y"], z["test_x"], z["test_start"], z["test_size"], strict=True
        ):
            start, size = int(start), int(size)
            gi = jax.grad(f_inner, argnums=(0, 1))(y, x, start, size)
            go = jax.grad(f_outer, argnums=(0, 1))(y, x, start, size)
            out.append({
                "G": float(f_inner(y, x, start, size)), "F": float(f_outer(y, x, start, size)),
                "G_y": np.asarray(gi[0]).tolist(), "G_x": np.asarray(gi[1]).tolist(),
                "F_y": np.asarray(go[0]).tolist(), "F_x": np.asarray(go[1]).tolist(),
            })  # fmt: skip
        answer["oracles"] = out
        print(json.dumps(answer))
        return

    name = spec["solver"]
    module = load_module(os.path.join(args.bench, "solvers", f"{name}.py"), f"bb_{name}")
    params = dict(spec["params"])
    every = int(spec["every"])
    if name != "bome":
        params["eval_freq"] = every
    solver = module.Solver.get_instance(**params)
    y0, x0 = jnp.zeros(p), jnp.zeros(d)
    P, x_star = z["P"], z["x_star"]

    def subopt(x: np.ndarray) -> float:
        e = x - x_star
        return float(0.5 * e @ P @ e)

    t0 = time.perf_counter()
    solver.set_objective(f_inner, f_outer, n, n, y0, x0)  # compiles (benchopt's run_once)
    warm = Recorder(solver, every if name != "bome" else 1, 3 * every, 1e9, lambda x: False)
    solver.run(warm)  # one warm-up run: the jitted epoch with the run's own argument types
    jax.block_until_ready(solver.outer_var)
    answer["compile_s"] = time.perf_counter() - t0

    stop = float(spec["stop"])
    rec = Recorder(
        solver,
        every if name != "bome" else 1,
        int(spec["max_iters"]),
        float(spec["budget_s"]),
        lambda x: subopt(x) < stop,
    )
    solver.run(rec)
    records = rec.records
    if name == "bome":  # one callback per iteration: keep every `every`-th (and the last)
        records = [r for r in records if r["iters"] % every == 0 or r is records[-1]]
    answer.update(
        solver=name,
        params=params,
        oracle=spec.get("oracle", "dense"),
        records=records,
        first_call_s=rec.call_times[0] if rec.call_times else None,
        median_call_s=float(np.median(rec.call_times)) if rec.call_times else None,
    )
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
