"""benchopt's own bilevel solvers (benchmark_bilevel, JAX) against this library's on ONE
quadratic problem, in the same run (issue 15).

The problem is ``benchmarks/bilevel_curves.py``'s quadratic (rank-one per-sample quadratics
at both levels, float64, ``p = 50`` LL and ``d = 10`` UL variables, 1,024 samples per level).
Its data are written once to a temporary ``.npz``; this library reads them as tensors and
benchopt's side (``benchmarks/benchopt_driver_jax.py``, run in the JAX virtual environment)
writes them in benchopt's quadratic form, with a matrix per sample (``A_i = u_i u_i' + mu I``,
...), and evaluates them with benchopt's own function (``datasets/simulated.py``), or with
``--benchopt-oracle rank1`` also through a JAX function of the vectors (same values, ``O(p)``
per sample). Before timing it checks that both sides have the same oracles (values and
gradients on a few minibatches) and the same ``x*`` (benchopt's form solved in closed form).

Then each solver runs with the same hyperparameters on both sides (step sizes, batch size 64,
inner steps, schedules: benchopt's hard-coded ones), alternating the sides, ``--repeats``
times with different sampling seeds, one thread each (torch ``set_num_threads(1)``; XLA's
Eigen pool off and one intra-op thread). The UL iterate ``x`` is recorded every ``--every``
iterations with the clock stopped (benchopt's callback on its side), and the same code
computes ``h(x) - h(x*) = (x - x*)' P (x - x*) / 2`` for both. benchopt's JIT compile time
(``set_objective``, which compiles through ``run_once``, plus one warm-up run) is reported
apart from its run time. Oracle calls (full-data equivalents) are counted on this library's
side as ``bilevel_curves.py`` counts them; the algorithms are the same, so benchopt's side
makes the same number per iteration.

benchopt's benchmark and the JAX environment live OUTSIDE the repository (never committed):
``SCRATCH=/work/scratch bash benchmarks/benchopt_setup.sh`` fetches and installs them. When
either is absent this script says so and exits with status 0 ("absent, skipped").

Usage::

    python3 benchmarks/benchopt_quadratic.py --repeats 3 --budget 25 \
        --out benchmarks/results/benchopt_quadratic.json
    # re-measure some solvers only, keeping the others' results
    python3 benchmarks/benchopt_quadratic.py --methods SOBA,SABA --update \
        --out benchmarks/results/benchopt_quadratic.json
    # our SOBA with benchopt's minibatch order (explains SOBA's late floor), added to the JSON
    python3 benchmarks/benchopt_quadratic.py --sampler-check \
        --out benchmarks/results/benchopt_quadratic.json
    python3 benchmarks/bilevel_curves_report.py benchmarks/results/bilevel_curves.json

References: Dagreou, Ablin, Vaiter & Moreau (2022), "A framework for bilevel optimization that
enables stochastic and global variance reduction algorithms", NeurIPS (benchopt's bilevel
benchmark); Moreau et al. (2022), "Benchopt", NeurIPS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bilevel_curves as bc
from argtypes import count, folder, names, nonnegative, positive

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import BOME, SABA, SOBA, AmIGO, StocBiO
from bilevel.ul.sampling import Minibatch, Sampler

METHODS = ["SOBA", "SABA", "StocBiO", "AmIGO", "BOME"]
LEVELS = [10.0 ** (-k / 2) for k in range(1, 25)]  # half decades, 0.32 down to 1e-12
THREAD_ENV = {
    "JAX_ENABLE_X64": "1",
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


# --- the problem, once -------------------------------------------------------------------------


def problem_arrays(setting: bc.Setting) -> dict[str, np.ndarray]:
    """The quadratic's data, ``P`` and ``x*`` (float64 NumPy), recomputed from the data and
    checked against ``setting.suboptimality``."""
    tr, va = setting.train[0], setting.val[0]
    z = {k: v.numpy().astype(np.float64) for k, v in {**tr, **va}.items()}
    n, p = z["u"].shape
    d = z["c"].shape[1]
    mu = nu = 0.1  # bilevel_curves.quadratic_setting's
    A = z["u"].T @ z["u"] / n + mu * np.eye(p)
    C = z["c"].T @ z["w"] / n
    Fm = z["s"].T @ z["s"] / n
    H = z["r"].T @ z["r"] / n + nu * np.eye(d)
    K = z["k"].T @ z["l"] / n
    M = -np.linalg.solve(A, C.T)
    c0 = -np.linalg.solve(A, z["a"].mean(0))
    P = M.T @ Fm @ M + H + K @ M + M.T @ K.T
    P = 0.5 * (P + P.T)
    q = M.T @ Fm @ c0 + K @ c0 + M.T @ z["f"].mean(0) + z["h"].mean(0)
    x_star = -np.linalg.solve(P, q)
    # the setting's own metric must vanish there (this pins mu, nu and the formula)
    _, ul_model = setting.make_models()
    with torch.no_grad():
        ul_model.x.copy_(torch.from_numpy(x_star))
    check = setting.suboptimality(ul_model, {})
    assert check["distance"] < 1e-12, check
    return {**z, "mu": np.array(mu), "nu": np.array(nu), "P": P, "x_star": x_star}


def our_oracles(setting: bc.Setting, z: dict[str, np.ndarray]) -> list[dict]:
    """This library's objectives and gradients at the test points of ``z``."""
    out = []
    for y, x, start, size in zip(
        z["test_y"], z["test_x"], z["test_start"], z["test_size"], strict=True
    ):
        rows = slice(int(start), int(start) + int(size))
        ll_model, ul_model = setting.make_models()
        with torch.no_grad():
            ll_model.y.copy_(torch.from_numpy(y))
            ul_model.x.copy_(torch.from_numpy(x))
        tr = {k: v[rows] for k, v in setting.train[0].items()}
        va = {k: v[rows] for k, v in setting.val[0].items()}
        res: dict[str, Any] = {}
        for name, obj, data in (("G", setting.ll_objective, tr), ("F", setting.ul_objective, va)):
            value = obj({"data": data, "target": None, "ll_model": ll_model, "ul_model": ul_model})
            gy, gx = torch.autograd.grad(value, (ll_model.y, ul_model.x))
            res[name] = float(value.detach())
            res[name + "_y"], res[name + "_x"] = gy.tolist(), gx.tolist()
        out.append(res)
    return out


def relative_gap(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# --- the hyperparameters, one set for both sides -----------------------------------------------


def configs(setting: bc.Setting) -> dict[str, dict]:
    """Per solver: step sizes, batch size and inner steps, and how each side spells them.
    Step sizes are ``bilevel_curves.py``'s for the quadratic; schedules are benchopt's
    (SOBA's ``1/sqrt(t)`` on both steps; constant for the others)."""
    qc = setting.configs
    slr, ul = qc["SOBA"]["lr"], qc["SOBA"]["ul_lr"]  # 0.5 / L_batch and 0.5 / L_P
    lr, bome_ul = qc["BOME"]["lr"], qc["BOME"]["ul_lr"]  # 1 / L and 0.5 / L_P
    common = {"step_size": slr, "outer_ratio": slr / ul, "batch_size": 64}
    return {
        "SOBA": {
            "lr": slr, "ul_lr": ul, "iters": 1,
            "ours": {"ll_decay": 0.5, "ul_decay": 0.5, "batch_size": 64},
            "benchopt": ("soba", dict(common)),
        },
        "SABA": {
            "lr": slr, "ul_lr": ul, "iters": 1,
            "ours": {"memory_init": "zero", "batch_size": 64},
            "benchopt": ("saba", dict(common)),
        },
        "StocBiO": {
            "lr": slr, "ul_lr": ul, "iters": 10,
            "ours": {"neumann_steps": 10, "neumann_lr": None, "batch_size": 64},
            "benchopt": ("stocbio", {**common, "n_inner_steps": 10, "n_shia_steps": 10}),
        },
        "AmIGO": {
            "lr": slr, "ul_lr": ul, "iters": 10,
            "ours": {"batch_size": 64},
            "benchopt": ("amigo", {**common, "n_inner_steps": 10}),
        },
        "BOME": {
            "lr": lr, "ul_lr": bome_ul, "iters": 10,
            "ours": {"eta": 0.5, "phi": "grad_norm"},
            "benchopt": ("bome", {"step_size": lr, "outer_ratio": lr / bome_ul,
                                  "n_inner_steps": 10, "eta": 0.5, "choice_phi": "grad_norm"}),
        },
    }  # fmt: skip


CLASSES = {"SOBA": SOBA, "SABA": SABA, "StocBiO": StocBiO, "AmIGO": AmIGO, "BOME": BOME}


# --- the two sides ---------------------------------------------------------------------------


def run_ours(
    setting: bc.Setting, name: str, cfg: dict, seed: int, every: int, limits: dict, z: dict
) -> dict:
    """One run of this library's method: ``x`` every ``every`` steps, step time only."""
    ll_model, ul_model = setting.make_models()
    ll_obj = bc.counted(setting.ll_objective, setting.n_train)
    ul_obj = bc.counted(setting.ul_objective, setting.n_val)
    ll = GradientDescent(ll_obj, ll_model, ul_model, lr=cfg["lr"], iters=cfg["iters"])
    options = dict(cfg["ours"])
    if name != "BOME":
        options["seed"] = seed
    ul = CLASSES[name](ul_obj, ul_model, ll_obj, ll_model, **options)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=cfg["ul_lr"]))
    P, x_star = z["P"], z["x_star"]
    records = [{"iters": 0, "time": 0.0, "calls": 0.0, "x": ul_model.x.detach().tolist()}]
    bc.COUNT["calls"], elapsed, step = 0.0, 0.0, 0
    torch.autograd.grad = bc._counting_grad
    try:
        while step < limits["max_iters"] and elapsed < limits["budget_s"]:
            start = time.perf_counter()
            for _ in range(every):
                problem.step(setting.train, setting.val)
            elapsed += time.perf_counter() - start
            step += every
            x = ul_model.x.detach().numpy().astype(np.float64)
            records.append(
                {"iters": step, "time": elapsed, "calls": bc.COUNT["calls"], "x": x.tolist()}
            )
            e = x - x_star
            if not np.all(np.isfinite(x)) or 0.5 * e @ P @ e < limits["stop"]:
                break
    finally:
        torch.autograd.grad = bc._AUTOGRAD_GRAD
    return {"records": records, "calls_per_iter": bc.COUNT["calls"] / max(step, 1)}


def run_benchopt(
    python: str, bench: str, driver: str, npz: str, spec: dict, check: bool = False
) -> dict:
    """One subprocess of the JAX driver; its JSON answer."""
    cmd = [python, driver, "--bench", bench, "--npz", npz, "--spec", json.dumps(spec)]
    if check:
        cmd.append("--check")
    env = {**os.environ, **THREAD_ENV}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"benchopt driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- benchopt's minibatch order, reproduced on our side ------------------------------------------


class BenchoptOrder(Sampler):
    """Our fixed batches in the order benchopt's sampler (``benchmark_utils/
    minibatch_sampler.py``) visits its batches: it reads ``batch_order[i]`` before wrapping
    ``i``, and JAX clamps the index ``i = count`` to ``count - 1``, so each epoch draws
    ``count + 1`` batches, its last one twice. Used only to explain a difference in
    convergence; the library's sampler visits each batch once per epoch."""

    def draw(self, level: str, n: int) -> Minibatch:
        count = self.count(level, n)
        state = self.split(level, n)
        if state.position == count:  # the clamped read, then the new epoch's order
            batch = int(state.order[count - 1])
            state.order = torch.randperm(count, generator=self.generator)
            state.position = 0
            return self.batch(level, batch)
        batch = int(state.order[state.position])
        state.position += 1
        return self.batch(level, batch)


def sampler_order_check(setting: bc.Setting, cfg: dict, z: dict, iters: int = 8000) -> dict:
    """Our SOBA (same hyperparameters) with our sampler, with benchopt's order and with
    uniform draws: the suboptimality after ``iters`` iterations, for seeds 0 and 1."""
    out: dict[str, list] = {}
    for label in ("reshuffle", "benchopt_order", "uniform"):
        for seed in (0, 1):
            if label == "benchopt_order":
                sampler = BenchoptOrder(64, seed=seed)
            else:
                sampler = Sampler(64, seed=seed, order=label)
            ll_model, ul_model = setting.make_models()
            ll = GradientDescent(setting.ll_objective, ll_model, ul_model, lr=cfg["lr"], iters=1)
            options = {k: v for k, v in cfg["ours"].items() if k != "batch_size"}
            ul = SOBA(setting.ul_objective, ul_model, setting.ll_objective, ll_model,
                      sampler=sampler, **options)  # fmt: skip
            problem = BilevelProblem(
                ll, ul, torch.optim.SGD(ul_model.parameters(), lr=cfg["ul_lr"])
            )
            marks = []
            for k in range(1, iters + 1):
                problem.step(setting.train, setting.val)
                if k in (iters // 8, iters // 4, iters // 2, iters):
                    e = ul_model.x.detach().numpy() - z["x_star"]
                    marks.append({"iters": k, "subopt": float(0.5 * e @ z["P"] @ e)})
            out.setdefault(label, []).append({"seed": seed, "marks": marks})
            print(label, seed, marks[-1], flush=True)
    return out


# --- summaries ----------------------------------------------------------------------------------


def curve(records: list[dict], P: np.ndarray, x_star: np.ndarray) -> list[dict]:
    """Records with the suboptimality and the relative distance to ``x*`` (x dropped)."""
    out = []
    for r in records:
        e = np.asarray(r["x"]) - x_star
        out.append(
            {
                **{k: v for k, v in r.items() if k != "x"},
                "subopt": float(0.5 * e @ P @ e),
                "distance": float(np.linalg.norm(e) / np.linalg.norm(x_star)),
            }
        )
    return out


def first_below(points: list[dict], level: float) -> dict | None:
    return next((r for r in points if r["subopt"] < level), None)


def summarize(runs: list[dict], calls_per_iter: float) -> dict:
    """Medians over repeats: time, iterations and calls to each level reached by every run,
    the final suboptimality and distance."""
    out: dict[str, Any] = {"levels": {}}
    for level in LEVELS:
        hits = [first_below(r["curve"], level) for r in runs]
        if any(h is None for h in hits):
            break
        out["levels"][f"{level:.2g}"] = {
            "time_s": statistics.median(h["time"] for h in hits),
            "iters": statistics.median(h["iters"] for h in hits),
            "calls": statistics.median(h["iters"] for h in hits) * calls_per_iter,
            "times_s": [h["time"] for h in hits],
        }
    out["final_subopt"] = statistics.median(r["curve"][-1]["subopt"] for r in runs)
    out["final_distance"] = statistics.median(r["curve"][-1]["distance"] for r in runs)
    out["best_subopt"] = statistics.median(min(p["subopt"] for p in r["curve"]) for r in runs)
    out["seconds_per_iter"] = statistics.median(steady_seconds_per_iter(r["curve"]) for r in runs)
    return out


def steady_seconds_per_iter(points: list[dict]) -> float:
    """Seconds per iteration over the run after its first record interval (which may hold a
    compilation: benchopt's BOME re-jits at every run)."""
    first, last = points[min(1, len(points) - 1)], points[-1]
    if last["iters"] > first["iters"]:
        return (last["time"] - first["time"]) / (last["iters"] - first["iters"])
    return last["time"] / max(last["iters"], 1)


def thin(points: list[dict], growth: float = 1.05) -> list[dict]:
    """The records kept in the JSON: the first 32, then one each time the iteration count
    has grown by ``growth``, the first one below every level of ``LEVELS``, the lowest
    (``best_subopt``) and the last (the summaries are the same from the thinned curve)."""
    lowest = min(range(len(points)), key=lambda i: points[i]["subopt"])
    keep = set(range(min(32, len(points)))) | {lowest, len(points) - 1}
    for level in LEVELS:
        hit = next((i for i, r in enumerate(points) if r["subopt"] < level), None)
        if hit is not None:
            keep |= {hit, max(hit - 1, 0)}
    last = 0
    for i, r in enumerate(points):
        if r["iters"] >= growth * points[last]["iters"]:
            keep.add(i)
            last = i
    return [points[i] for i in sorted(keep)]


def resummarize(path: str) -> None:
    """Recompute the summary of a result file from its recorded curves."""
    result = json.loads(Path(path).read_text())
    for runs in result["runs"].values():
        for side_runs in runs.values():
            for run in side_runs:
                run["curve"] = thin(run["curve"])
    for name, entry in result["summary"].items():
        per_iter = entry["calls_per_iter"]
        entry["sides"] = {
            side: summarize(runs, per_iter) for side, runs in result["runs"][name].items()
        }
    _note_command(result, f"python3 benchmarks/benchopt_quadratic.py --resummarize --out {path}")
    Path(path).write_text(json.dumps(result, indent=1))


def _note_command(result: dict, command: str) -> None:
    """Record a command run on the result after the main run (once)."""
    commands = result.setdefault("post_commands", [])
    if command not in commands:
        commands.append(command)


def merge_update(base: dict, new: dict, summary: dict, raw: dict) -> dict:
    """``base`` (an earlier result) with the solvers of ``new`` replaced by their new
    summaries and runs; each replaced solver records when, how and under which load it was
    measured (``summary[name]["measured"]``), and the run is listed in ``base["updates"]``."""
    measured = {
        "date": new["date"],
        "command": new["command"],
        "git": new.get("git"),
        "repeats": new["repeats"],
        "limits": new["limits"],
        "load_average_start": new["machine"]["load_average_start"],
        "load_average_end": new["machine"]["load_average_end"],
        "checks": new["checks"],
    }
    for name in summary:
        base["summary"][name] = {**summary[name], "measured": measured}
        base["runs"][name] = raw[name]
    base.setdefault("updates", []).append({"methods": list(summary), **measured})
    return base


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", type=names(METHODS), default=",".join(METHODS), help="comma-separated solvers"
    )
    parser.add_argument("--repeats", type=count, default=3, help="runs per side and solver (3)")
    parser.add_argument("--every", type=count, default=8, help="iterations between records (8)")
    parser.add_argument(
        "--budget", type=positive, default=20.0, help="seconds per run at most (20)"
    )
    parser.add_argument("--max-iters", type=count, default=200_000, help="iterations per run")
    parser.add_argument(
        "--stop", type=nonnegative, default=1e-10, help="stop below this subopt (0: never)"
    )
    parser.add_argument(
        "--benchopt-oracle",
        type=names(("dense", "rank1")),
        default="dense,rank1",
        help="benchopt-side oracles: dense (benchopt's get_function, a matrix per sample), "
        "rank1 (the same function from the vectors), or both (default)",
    )
    parser.add_argument(
        "--scratch",
        type=folder,
        default=os.environ.get("SCRATCH", "/work/scratch"),
        help="folder holding benchmark_bilevel/ and jaxenv/ ($SCRATCH, else /work/scratch)",
    )
    parser.add_argument(
        "--out", default="benchmarks/results/benchopt_quadratic.json", help="JSON written"
    )
    parser.add_argument(
        "--sampler-check",
        action="store_true",
        help="only run our SOBA with benchopt's minibatch order (and uniform draws) and add "
        "the result to --out",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="run only --methods and replace their results in --out, keeping the other "
        "solvers' (each updated solver records its own date, command and load)",
    )
    parser.add_argument(
        "--resummarize",
        action="store_true",
        help="only recompute the summary of --out from its recorded curves",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = make_parser()
    args = parser.parse_args(argv)
    reading = {"--resummarize": args.resummarize, "--sampler-check": args.sampler_check}
    for flag, given in reading.items():
        if given and not Path(args.out).is_file():
            parser.error(f"{flag} reads --out, and there is no file {args.out}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resummarize:
        resummarize(args.out)
        return 0
    if args.sampler_check:
        torch.set_num_threads(1)
        setting = bc.quadratic_setting()
        z = problem_arrays(setting)
        result = json.loads(Path(args.out).read_text())
        result["sampler_order_check"] = sampler_order_check(setting, configs(setting)["SOBA"], z)
        _note_command(
            result, f"python3 benchmarks/benchopt_quadratic.py --sampler-check --out {args.out}"
        )
        Path(args.out).write_text(json.dumps(result, indent=1))
        return 0
    bench = os.path.join(args.scratch, "benchmark_bilevel")
    python = os.path.join(args.scratch, "jaxenv", "bin", "python")
    absent = [
        what
        for what, ok in (
            (
                f"benchopt's benchmark ({bench}/objective.py)",
                os.path.isfile(f"{bench}/objective.py"),
            ),
            (f"the JAX virtual environment ({python})", os.access(python, os.X_OK)),
        )
        if not ok
    ]
    if absent:
        print(
            "benchopt side by side: ABSENT, skipped; missing: " + "; ".join(absent) + ". Set it "
            "up with: SCRATCH=" + args.scratch + " bash benchmarks/benchopt_setup.sh"
        )
        return 0
    probe = subprocess.run(
        [python, "-c", "import jax, benchopt; print(jax.__version__, benchopt.__version__)"],
        capture_output=True, text=True, env={**os.environ, **THREAD_ENV},
    )  # fmt: skip
    if probe.returncode != 0:
        print(
            "benchopt side by side: ABSENT, skipped: the JAX environment cannot import jax and "
            f"benchopt ({probe.stderr.strip().splitlines()[-1:]}). Run "
            "benchmarks/benchopt_setup.sh."
        )
        return 0
    jax_version, benchopt_version = probe.stdout.split()
    driver = str(Path(__file__).resolve().parent / "benchopt_driver_jax.py")
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    oracles = [o for o in args.benchopt_oracle.split(",") if o]
    setting = bc.quadratic_setting()
    z = problem_arrays(setting)
    rng = np.random.default_rng(0)
    n, p = z["u"].shape
    d = z["c"].shape[1]
    z["test_y"], z["test_x"] = rng.standard_normal((3, p)), rng.standard_normal((3, d))
    z["test_start"], z["test_size"] = np.array([0, 320, 0]), np.array([64, 64, n])
    cfgs = configs(setting)
    result: dict[str, Any] = {
        "command": common.command_line(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git": common.git_revision(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg(),
            "torch": torch.__version__,
            "jax": jax_version,
            "benchopt": benchopt_version,
            "threads": "1 per side (torch.set_num_threads(1); " + THREAD_ENV["XLA_FLAGS"] + ")",
        },
        "problem": {**setting.info, "mu": 0.1, "nu": 0.1},
        "every": args.every,
        "repeats": args.repeats,
        "limits": {"budget_s": args.budget, "max_iters": args.max_iters, "stop": args.stop},
    }
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "quadratic.npz")
        np.savez(npz, **z)
        # same oracles, same x*
        checks: dict[str, Any] = {}
        ours = our_oracles(setting, z)
        for oracle in oracles:
            theirs = run_benchopt(python, bench, driver, npz, {"oracle": oracle}, check=True)
            gaps = {
                key: max(
                    relative_gap(t[key], o[key])
                    for t, o in zip(theirs["oracles"], ours, strict=True)
                )
                for key in ("G", "F", "G_y", "G_x", "F_y", "F_x")
            }
            checks[oracle] = {"oracle_max_relative_gap": gaps}
            xs = np.asarray(theirs["x_star_benchopt_form"])
            checks["x_star_relative_distance"] = relative_gap(xs, z["x_star"])
        result["checks"] = checks
        print("checks:", json.dumps(checks), flush=True)
        limits = {"budget_s": args.budget, "max_iters": args.max_iters, "stop": args.stop}
        raw: dict[str, dict[str, list]] = {m: {"ours": []} for m in methods}
        calls: dict[str, list[float]] = {m: [] for m in methods}
        compile_s: dict[str, dict[str, list]] = {m: {} for m in methods}
        for rep in range(args.repeats):
            for name in methods:
                cfg = cfgs[name]
                sides = ["ours", *(f"benchopt_{o}" for o in oracles)]
                if rep % 2:
                    sides.reverse()
                for side in sides:
                    load = os.getloadavg()[0]
                    if side == "ours":
                        torch.manual_seed(rep)
                        out = run_ours(setting, name, cfg, rep, args.every, limits, z)
                        calls[name].append(out["calls_per_iter"])
                    else:
                        solver, params = cfg["benchopt"]
                        spec = {
                            "solver": solver,
                            "params": {
                                **params,
                                **({} if name == "BOME" else {"random_state": rep + 1}),
                            },
                            "oracle": side.split("_", 1)[1],
                            "every": args.every,
                            **limits,
                        }
                        out = run_benchopt(python, bench, driver, npz, spec)
                        compile_s[name].setdefault(side, []).append(
                            {"compile_s": out["compile_s"], "first_call_s": out["first_call_s"],
                             "median_call_s": out["median_call_s"]}
                        )  # fmt: skip
                    pts = curve(out["records"], z["P"], z["x_star"])
                    raw[name].setdefault(side, []).append({"seed": rep, "load": load, "curve": pts})
                    last = pts[-1]
                    print(
                        f"[{rep}] {name:8s} {side:16s} iters {last['iters']:7d} "
                        f"time {last['time']:8.3f}s subopt {last['subopt']:.2e} "
                        f"load {load:.2f}",
                        flush=True,
                    )
    summary: dict[str, Any] = {}
    for name in methods:
        per_iter = statistics.median(calls[name])
        summary[name] = {
            "config": {k: v for k, v in cfgs[name].items()},
            "calls_per_iter": per_iter,
            "sides": {side: summarize(runs, per_iter) for side, runs in raw[name].items()},
            "benchopt_compile": compile_s[name],
        }
    for runs in raw.values():
        for side_runs in runs.values():
            for run in side_runs:
                run["curve"] = thin(run["curve"])
    result["machine"]["load_average_end"] = os.getloadavg()
    if args.update and Path(args.out).exists():
        result = merge_update(json.loads(Path(args.out).read_text()), result, summary, raw)
    else:
        result["summary"] = summary
        result["runs"] = raw
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1))
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
