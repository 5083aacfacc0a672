"""Generate ``docs/hyper_cleaning.md`` from the ``results.json`` of hyper-cleaning and
per-pixel-penalty runs (Franceschi et al. 2017; Pedregosa 2016); nothing on the page is typed
by hand.

    python benchmarks/hyper_cleaning_results.py                 # the page (from runs/ if any)
    python benchmarks/hyper_cleaning_results.py --forward-cost  # first measure Forward vs Reverse

The runs are made by ``examples/hyper_cleaning.py`` and ``examples/feature_penalty.py`` with
``--out runs/...``. What the page shows of each run (its metrics, settings, command, date,
commit and machine) is kept in ``benchmarks/results/hyper_cleaning_runs.json`` (committed):
the runs found under ``--runs`` replace their records there (by experiment and run name), the
others stay, and their plots are copied to ``docs/img/hyper_cleaning/``. Without runs at hand
the page is rendered from that digest alone (``tests/test_benchmark_reports.py`` checks that
it gives the committed page). A run is taken off the page by deleting its record.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from argtypes import count, folder
from common import code_revision

ROOT = Path(__file__).resolve().parent.parent
DIGEST = ROOT / "benchmarks" / "results" / "hyper_cleaning_runs.json"
FORWARD_COST = "forward_cost.json"
FORWARD_COST_VAL = 1000  # validation images of the Forward cost measurement
MNIST_TRAIN = 60_000  # MNIST's training images
EXPERIMENTS = ("hyper_cleaning", "feature_penalty")
#: the settings the page states (each run's ``results.json`` holds them all)
HC_SETTINGS = ["n_train", "n_val", "corrupt", "ll_steps", "ll_lr", "l2", "hidden", "ul_lr"]
HC_SETTINGS += ["truncate", "solver_iters", "tolerance", "neumann_alpha", "final_steps", "seed"]
FP_SETTINGS = ["n_train", "n_val", "ll_steps", "ll_lr", "init_l2", "ul_optimizer", "ul_lr"]
FP_SETTINGS += ["cg_iters", "tolerance"]

TITLE = """\
---
hide:
  - toc
---

# Data hyper-cleaning

Data hyper-cleaning (Franceschi et al. 2017) learns one weight per training example so that a
classifier trained on a data set with many wrong labels does as well as one trained on the
clean part only. It is the standard test of hypergradients with thousands of hyperparameters,
used since by Shaban et al. (2019) and the BOML/BOAT line. Everything on this page is generated
by `benchmarks/hyper_cleaning_results.py` from `benchmarks/results/hyper_cleaning_runs.json`:
the digest of the runs' `results.json` (the runs themselves, under `runs/`, are not committed),
which keeps what the page shows of each run with its command, date, commit and machine;
`tests/test_benchmark_reports.py` regenerates the page from it. {provenance}
"""

PROTOCOL = """\
## How it was measured

- **Data.** From the training set of MNIST (or Fashion-MNIST), a random subset of 5,000
  training and a disjoint one of 5,000 validation examples (the split depends on `--seed`);
  the 10,000 examples of the official test set. Pixels in [0, 1], centered by the mean image
  of the training subset.
- **Noise.** Exactly half of the training labels, chosen at random, are replaced by a
  uniformly random *other* class. The validation labels are clean.
- **Hyperparameters.** One logit $z_i$ per training example; the example's weight is
  $\\sigma(z_i)$, starting at 0.5.
- **Lower level.** A linear softmax classifier (zero init), or an MLP with one hidden layer
  of tanh units (`--model mlp`, seeded init), trained by gradient descent on
  $L_{ll}(w, z) = \\sum_i \\sigma(z_i)\\,\\mathrm{CE}_i(w) / \\sum_i \\sigma(z_i)
  + \\tfrac{\\ell_2}{2}\\|W\\|^2$ (the L2 term is on the weight matrices).
- **Upper level.** The validation cross-entropy of the LL's last iterate, minimized over the
  logits with Adam.
- **Evaluation.** After the UL steps a fresh classifier is trained on the weighted training
  set (`--final-steps` GD steps) and its test accuracy is reported. Examples with weight
  below 0.5 are *flagged*; precision, recall and F1 of the flagged set against the corrupted
  set are reported. In the same run, with the same training procedure, a **baseline** is
  trained on all 5,000 noisy examples (every weight 1) and an **oracle** on the clean half
  only (weights 1 and 0).
- **Methods.** `Reverse` (back-propagation through all LL steps), `Truncated` (the last K
  steps), `Implicit` with conjugate gradient and with the Neumann series; Neumann uses
  `alpha="auto"`, i.e. $\\alpha = 1/\\lambda_{max}$ of the LL Hessian estimated by power
  iteration at every UL step, which is always inside the convergence region
  $0 < \\alpha < 2/\\lambda_{max}$.
"""


# --- the digest: what the page shows of each run ----------------------------------------------


def load_runs(runs: Path) -> dict[str, list[tuple[str, dict[str, Any], Path]]]:
    """All ``results.json`` under ``runs``, grouped by experiment, as (name, results, folder)."""
    found: dict[str, list[tuple[str, dict[str, Any], Path]]] = {}
    for path in sorted(runs.glob("**/results.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        experiment = results.get("experiment") if isinstance(results, dict) else None
        if experiment in EXPERIMENTS:
            found.setdefault(experiment, []).append((path.parent.name, results, path.parent))
    return found


def provenance_of(r: dict[str, Any]) -> dict[str, Any]:
    """The command, date, commit and machine of a run (runs from before the date and commit
    were recorded have none)."""
    git = r.get("git") or {}
    return {
        "command": r.get("command"),
        "date": r.get("date"),
        "commit": git.get("commit"),
        "dirty": git.get("dirty"),
        "hardware": r.get("hardware"),
    }


def hyper_cleaning_record(name: str, r: dict[str, Any], image: str | None) -> dict[str, Any]:
    """What the page shows of one hyper-cleaning run."""
    record = {
        "name": name,
        "dataset": r["dataset"],
        "model": r["model"],
        "method": r["method"],
        "seed": r["seed"],
        "settings": {k: r["settings"][k] for k in HC_SETTINGS if k in r["settings"]},
        **provenance_of(r),
    }
    if "error" in r:
        return {**record, "error": r["error"], "failed_at_ul_step": r["failed_at_ul_step"]}
    history = r["history"]
    best = max(history, key=lambda h: h.get("f1", 0.0)) if history else None
    last = history[-1] if history else {}
    return {
        **record,
        "test_acc": r["test_acc"],
        "f1": r["f1"],
        "precision": r["precision"],
        "recall": r["recall"],
        "ul_steps": r["ul_steps"],
        "seconds": r["seconds"],
        "cpu_seconds": r.get("cpu_seconds"),
        "peak_f1": None
        if best is None
        else {"f1": best["f1"], "step": best["step"], "cpu_seconds": best.get("cpu_seconds")},
        "baseline_test_acc": r["baseline"]["test_acc"],
        "oracle_test_acc": r["oracle"]["test_acc"],
        "relative_grad_norm_at_ll_steps": r["relative_grad_norm_at_ll_steps"],
        "relative_grad_norm_at_final_steps": r["relative_grad_norm_at_final_steps"],
        "last_ll_grad_norm": last.get("ll_grad_norm"),
        "last_solver_relative_residual": last["residual_norm"] / last["rhs_norm"]
        if last.get("rhs_norm")
        else None,
        "last_lambda_max": last.get("lambda_max"),
        "image": image,
    }


def feature_penalty_record(name: str, r: dict[str, Any], image: str | None) -> dict[str, Any]:
    """What the page shows of one per-pixel-penalty run."""
    return {
        "name": name,
        "dataset": r["dataset"],
        "method": r["method"],
        "seed": r["seed"],
        "settings": {k: r["settings"][k] for k in FP_SETTINGS if k in r["settings"]},
        **provenance_of(r),
        "test_acc": r["test_acc"],
        "val_acc": r["val_acc"],
        "initial_penalty": r["initial_penalty"],
        "best_single_penalty": {k: r["best_single_penalty"][k] for k in ("l2", "test_acc")},
        "ul_steps": r["ul_steps"],
        "seconds": r["seconds"],
        "cpu_seconds": r.get("cpu_seconds"),
        "image": image,
    }


def copy_plot(folder: Path, plot: str, img: Path, name: str) -> str | None:
    """Copy a run's plot into the docs' images; its file name there, or ``None``."""
    source = folder / plot
    if not source.exists():
        return None
    img.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, img / name)
    return name


def update_digest(
    digest: dict[str, Any], found: dict[str, list[tuple[str, dict[str, Any], Path]]], img: Path
) -> dict[str, Any]:
    """``digest`` with the records of the runs ``found`` replaced or added (their plots copied
    to ``img``); the plots of no record are removed from ``img``."""
    make = {
        "hyper_cleaning": lambda name, r, folder: hyper_cleaning_record(
            name, r, copy_plot(folder, "weights_hist.png", img, f"{name}.png")
        ),
        "feature_penalty": lambda name, r, folder: feature_penalty_record(
            name, r, copy_plot(folder, "penalty.png", img, f"penalty-{name}.png")
        ),
    }
    updated = dict(digest)
    for experiment in EXPERIMENTS:
        fresh = [make[experiment](*run) for run in found.get(experiment, [])]
        names = {r["name"] for r in fresh}
        kept = [r for r in digest.get(experiment, []) if r["name"] not in names]
        updated[experiment] = sorted(kept + fresh, key=lambda r: r["name"])
    shown = {r.get("image") for experiment in EXPERIMENTS for r in updated[experiment]}
    for stale in img.glob("*.png"):  # this folder holds only this page's plots
        if stale.name not in shown:
            stale.unlink()
    return updated


# --- the page ----------------------------------------------------------------------------------


def made_with(record: dict[str, Any]) -> str:
    """The date and the code of a run (runs made before they were recorded say so)."""
    if not record.get("date") or not record.get("commit"):
        return "not recorded"
    return f"{record['date'][:10]}, {code_of(record)}"


def code_of(record: dict[str, Any]) -> str:
    """E.g. "commit 76e3861 (with local changes)"."""
    return code_revision({"commit": record["commit"], "dirty": record.get("dirty")})


def title(records: list[dict[str, Any]], conditions: str | None) -> str:
    """The page's head: where its numbers come from, when and with which code they were made,
    and under which conditions the runs ran."""
    dated = [r for r in records if made_with(r) != "not recorded"]
    if not dated:
        made = "The runs record no date or commit."
    else:
        days = sorted({r["date"][:10] for r in dated})
        codes = sorted({code_of(r) for r in dated})
        when = days[0] if len(days) == 1 else f"between {days[0]} and {days[-1]}"
        made = f"The runs were made {when} with the code of {' and '.join(codes)}"
        undated = len(records) - len(dated)
        made += f" ({undated} run(s) record no date or commit)." if undated else "."
    if conditions:  # how the runs shared the machine: what their times are worth
        made += f" They ran {conditions}."
    else:
        made += " How they shared the machine is not recorded."
    return TITLE.format(provenance=made)


def stationarity_text(before_check: list[str], runs: int) -> str:
    """What the stationarity table shows; ``before_check``: the runs (of ``runs``) that
    record no commit, made before ``Implicit`` checked the distance left (commits are
    recorded since after that check came)."""
    if not before_check:
        made = ""
    elif len(before_check) == runs:
        made = " The runs on this page were made before that check."
    else:
        made = f" The runs {', '.join(before_check)} were made before that check."
    return (
        "`Implicit` assumes that the LL has reached a stationary point. The first two columns "
        "give the LL gradient norm, relative to its value at the start, after `--ll-steps` "
        "(the LL of the bilevel problem) and after `--final-steps` (the final model), on the "
        "learned weights; the L2 term makes the LL strongly convex for the linear model. On "
        "Fashion-MNIST the LL Hessian is stiffer: with `--ll-lr 1` gradient descent oscillated "
        "without the LL loss growing (its gradient stayed far from zero, so the library's "
        "growth warning did not fire), hence `--ll-lr 0.5` there; the example now prints a "
        "warning when the LL gradient after `--ll-steps` is above 10% of its initial norm. The "
        "last columns are the diagnostics of the last UL step: the LL gradient norm "
        "`ll_grad_norm`, the relative residual of the linear solve, and $\\lambda_{max}$ "
        'of the LL Hessian measured for `alpha="auto"`. The solves are not run to '
        "convergence (20 iterations, float32): the LL Hessian is ill-conditioned, with "
        "eigenvalues down to about the L2 coefficient, and Neumann's fixed step converges "
        "slowest; a few iterations still give a good descent direction, as `Truncated` does. "
        "A small gradient ratio does not by itself put the weights near the LL solution: "
        "along the least curved direction (curvature about the L2 coefficient) each step of "
        "1.0 shrinks the distance by only about 1%. `Implicit` now also estimates the distance "
        "left from the last step's contraction and warns when it is above 10% of the distance "
        f"travelled.{made}"
    )


def pct(value: float) -> str:
    """An accuracy as a percentage with two decimals."""
    return f"{100 * value:.2f}%"


def seconds(value: float | None) -> str:
    """Seconds, rounded (``nan`` for runs that did not record them)."""
    return f"{float('nan') if value is None else value:.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def peak(best: dict[str, Any] | None) -> str:
    """The highest logged F1, the UL step where it was reached and the CPU seconds until then."""
    if not best:
        return ""
    return f"{best['f1']:.3f} at {best['step']} ({seconds(best.get('cpu_seconds'))})"


def settings_line(all_settings: list[dict[str, Any]], keys: list[str]) -> str:
    """``key=value`` for each of ``keys``, with every value the runs used."""
    parts = []
    for k in keys:
        values = sorted({str(s[k]) for s in all_settings if k in s})
        if values:
            parts.append(f"`{k}={' or '.join(values)}`")
    return ", ".join(parts)


def results_tables(rows: list[dict[str, str]]) -> list[str]:
    """The accuracy table and the cost table (narrow enough for the page)."""
    accuracy = table(
        [
            "data",
            "model",
            "method",
            "test acc",
            "F1",
            "precision",
            "recall",
            "peak F1 at step (CPU s)",
        ],
        [
            [r[k] for k in ("data", "model", "method", "test_acc", "f1", "precision", "recall")]
            + [r["peak"]]
            for r in rows
        ],
    )
    dated = any(r["made"] != "not recorded" for r in rows)
    cost = table(
        ["data", "model", "method", "LL lr", "UL steps", "wall s", "CPU s"]
        + (["date, code"] if dated else []),
        [
            [r["data"], r["model"], r["method"], r["ll_lr"], r["ul_steps"], r["wall"], r["cpu"]]
            + ([r["made"]] if dated else [])
            for r in rows
        ],
    )
    hardware = "; ".join(sorted({r["hardware"] for r in rows}))
    return [
        accuracy,
        "Cost: wall-clock and CPU seconds of the UL loop (the baseline, the oracle and the "
        f"final retraining are not counted), on {hardware}:",
        cost,
    ]


def takeaways(rows: list[dict[str, str]], refs: list[list[str]]) -> str:
    """What to take away: per data set and model, the best method against the baseline and
    the oracle, its F1, the cheapest method, and the machine."""
    lines = ["## What to take away", ""]
    reference = {(d, m): (b, o) for d, m, _seed, b, o in refs}
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["model"]), []).append(r)
    for (data, model), mine in groups.items():
        best = max(mine, key=lambda r: float(r["test_acc"].rstrip("%")))
        cheap = min(mine, key=lambda r: float(r["cpu"]))
        base, oracle = reference.get((data, model), ("?", "?"))
        lines.append(
            f"- **{data}, {model} classifier**: {best['method']} reaches {best['test_acc']} "
            f"test accuracy (trained on all noisy labels: {base}; on the clean half only: "
            f"{oracle}), and finds the corrupted examples with F1 {best['f1']}; the cheapest, "
            f"{cheap['method']}, takes {cheap['cpu']} CPU seconds for {cheap['ul_steps']} UL "
            "steps."
        )

    def acc(r: dict[str, str]) -> float:
        return float(r["test_acc"].rstrip("%"))

    spread = max(max(map(acc, g)) - min(map(acc, g)) for g in groups.values())
    hardware = "; ".join(sorted({r["hardware"] for r in rows}))
    lines += [
        "",
        f"On each data set and model the methods' test accuracies are within {spread:.2f} "
        "points of each other: the choice of method matters for cost and robustness more than "
        f"for the result. Machine: {hardware}.",
    ]
    return "\n".join(lines)


def hyper_cleaning_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    """What to take away; the results tables, baseline and oracle, LL stationarity and the
    weight histograms."""
    order = {"reverse": 0, "truncated": 1, "implicit-cg": 2, "implicit-neumann": 3}
    failed = [r for r in records if "error" in r]
    records = sorted(
        (r for r in records if "error" not in r),
        key=lambda r: (r["dataset"], r["model"], order.get(r["method"], 9), r["name"]),
    )
    rows, refs, stationarity, figures = [], {}, [], []
    undated = [r["name"] for r in records if made_with(r) == "not recorded"]
    for r in records:
        s = r["settings"]
        rows.append(
            {
                "data": r["dataset"],
                "model": r["model"],
                "method": f"`{r['method']}`",
                "ll_lr": f"{s['ll_lr']:g}",
                "test_acc": pct(r["test_acc"]),
                "f1": f"{r['f1']:.3f}",
                "precision": f"{r['precision']:.3f}",
                "recall": f"{r['recall']:.3f}",
                "ul_steps": str(r["ul_steps"]),
                "wall": seconds(r["seconds"]),
                "cpu": seconds(r["cpu_seconds"]),
                "peak": peak(r["peak_f1"]),
                "hardware": r["hardware"],
                "made": made_with(r),
            }
        )
        key = (r["dataset"], r["model"], r["seed"], s["n_train"], s["l2"], s["final_steps"])
        refs.setdefault(key, (r["baseline_test_acc"], r["oracle_test_acc"]))
        residual = r["last_solver_relative_residual"]
        stationarity.append(
            [
                r["dataset"],
                r["model"],
                f"`{r['method']}`",
                f"{r['relative_grad_norm_at_ll_steps']:.2%}",
                f"{r['relative_grad_norm_at_final_steps']:.3%}",
                "" if r["last_ll_grad_norm"] is None else f"{r['last_ll_grad_norm']:.2g}",
                "" if residual is None else f"{residual:.1e}",
                f"{r['last_lambda_max']:.3g}" if r["last_lambda_max"] else "",
            ]
        )
        if r["image"]:
            figures.append(f"![{r['name']}](img/hyper_cleaning/{r['image']})")
    ref_rows = [
        [d, m, str(seed), pct(b), pct(o)] for (d, m, seed, *_), (b, o) in sorted(refs.items())
    ]
    every = [r["settings"] for r in records]
    keys = [k for k in HC_SETTINGS if k != "ll_lr"]
    parts = [
        "## Results",
        "One row per run (each run is one `results.json`). Test accuracy of the classifier "
        "retrained on the learned weights; F1, precision and recall of the examples flagged as "
        "corrupted (weight < 0.5); the highest F1 among the logged UL steps (every "
        "`--log-every`), the step, and the CPU seconds spent until then. F1 peaks before the "
        "end: the validation loss keeps falling as the UL goes on to lower the weights of hard "
        "clean examples, which the 0.5 threshold then flags.",
        *results_tables(rows),
        "Baseline (all noisy examples, every weight 1) and oracle (the clean half only), "
        "trained in the same runs with the same procedure as the final model:",
        table(["data", "model", "seed", "baseline test acc", "oracle test acc"], ref_rows),
        "Settings (every value used by some run; the LL learning rate of each run is in the "
        "table, and each `results.json` holds its full `settings`): "
        f"{settings_line(every, keys)}. The runs ran with `--threads 1` on a machine shared "
        "with other jobs (how, at the top of the page), so wall-clock times are noisy; CPU "
        "seconds (of the process, all threads) are the steadier measure of cost.",
        failed_section(failed),
        "### Is the lower level stationary?",
        stationarity_text([f"`{n}`" for n in undated], len(records)),
        table(
            [
                "data",
                "model",
                "method",
                "rel. grad norm, LL",
                "rel. grad norm, final",
                "`ll_grad_norm`",
                "solver rel. residual",
                "$\\lambda_{max}$",
            ],
            stationarity,
        ),
        "### Learned weights",
        "Histograms of the learned weights of clean (blue) and corrupted (red) examples; the "
        "dashed line is the 0.5 threshold.",
        "\n\n".join(figures),
    ]
    return takeaways(rows, ref_rows), "\n\n".join(p for p in parts if p)


def failed_section(failed: list[dict[str, Any]]) -> str:
    """The runs that stopped with an error (a diverged solve, a NaN), with the message."""
    if not failed:
        return ""
    lines = [
        "Runs that stopped with an error (the library refuses to return a hypergradient it "
        "cannot trust; the message names the cure):",
    ]
    for r in sorted(failed, key=lambda r: r["name"]):
        lines.append(
            f"- {r['dataset']}, {r['model']}, `{r['method']}`: stopped at UL step "
            f"{r['failed_at_ul_step']} with *{r['error']}*"
        )
    return lines[0] + "\n\n" + "\n".join(lines[1:])


def forward_section(cost: dict[str, Any] | None) -> str:
    """Why Forward is not run here, with the measured cost if ``--forward-cost`` was run."""
    text = (
        "## Forward mode\n\n"
        "`bilevel.ul.Forward` carries $dw_t/d\\lambda$ through the LL steps: one "
        "Jacobian-vector product per scalar hyperparameter per LL step. With one weight per "
        "training example that is 5,000 products per LL step, each as expensive as a pass "
        "over the training set, so the cost of one hypergradient grows with the square of the "
        "number of examples; `examples/hyper_cleaning.py` refuses `--method forward` with "
        "more than 100 hyperparameters (`--n-train`). It gives the same hypergradient as "
        "`Reverse`."
    )
    if cost is None:
        return text
    rows = [
        [
            str(m["n_train"]),
            f"{m['forward_s_per_ll_step']:.3g}",
            f"{m['reverse_s_per_ll_step']:.3g}",
            f"{m['forward_s_per_ll_step'] / m['reverse_s_per_ll_step']:.0f}x",
            f"{m['max_abs_difference']:.1e}",
            f"{m['max_abs_hypergradient']:.1e}",
        ]
        for m in cost["measurements"]
    ]
    made = made_with(cost)
    made = "" if made == "not recorded" else f"; {made}"
    return "\n\n".join(
        [
            text,
            f"Measured on linear hyper-cleaning with fewer training examples "
            f"({cost['ll_steps']} LL steps, CPU seconds per LL step, {cost['hardware']}{made}):",
            table(
                [
                    "training examples = hyperparameters",
                    "Forward s / LL step",
                    "Reverse s / LL step",
                    "ratio",
                    "max abs difference",
                    "max abs hypergradient",
                ],
                rows,
            ),
            f"Extrapolated quadratically from the largest size, Forward would take about "
            f"{cost['extrapolated_s_per_ul_step_at_5000'] / 60:.0f} minutes per UL step at "
            "5,000 examples and 100 LL steps.",
        ]
    )


def feature_penalty_section(records: list[dict[str, Any]]) -> str:
    """The per-pixel L2 penalty runs: accuracies and the penalty images."""
    rows, figures = [], []
    for r in sorted(records, key=lambda r: r["name"]):
        s = r["settings"]
        best, initial = r["best_single_penalty"], r["initial_penalty"]
        cpu = float("nan") if r["cpu_seconds"] is None else r["cpu_seconds"]
        rows.append(
            [
                r["dataset"],
                f"`{r['method']}`",
                f"{s['n_train']} / {s['n_val']}",
                pct(r["test_acc"]),
                pct(r["val_acc"]),
                f"{pct(initial['test_acc'])} ({initial['l2']:g})",
                f"{pct(best['test_acc'])} ({best['l2']:g})",
                str(r["ul_steps"]),
                seconds(r["seconds"]),
                seconds(r["cpu_seconds"]),
                f"{cpu / max(r['ul_steps'], 1):.2g}",
            ]
        )
        if r["image"]:
            figures.append(f"![learned penalty, {r['name']}](img/hyper_cleaning/{r['image']})")
    every = [r["settings"] for r in records]
    keys = [k for k in FP_SETTINGS if k not in ("n_train", "n_val")]
    return "\n\n".join(
        [
            "## Per-pixel L2 penalties",
            "The classic many-hyperparameter demonstration (Pedregosa 2016; Lorraine et al. "
            "2020), `examples/feature_penalty.py`: a 10-class logistic regression on a small "
            "random subset of MNIST's training set, with one L2 penalty per pixel, "
            "$\\sum_j e^{\\theta_j} \\|W_{:,j}\\|^2 / 2$ (784 hyperparameters $\\theta$), tuned "
            'on a disjoint validation subset with `Implicit(method="cg")`. Test accuracy on '
            "the 10,000 test images, of a model retrained with the learned penalties; for "
            "reference the same model with one penalty for all pixels: the initial one, and "
            "the best of a grid $10^{-5}, \\dots, 1$ chosen on the validation subset.",
            table(
                [
                    "data",
                    "method",
                    "train / val",
                    "test acc",
                    "val acc",
                    "single penalty (initial)",
                    "best single penalty",
                    "UL steps",
                    "wall s",
                    "CPU s",
                    "CPU s / UL step",
                ],
                rows,
            ),
            "`Forward` is practical here only for a few UL steps, to measure its cost: 784 "
            "hyperparameters make 784 Jacobian-vector products per LL step (compare its CPU "
            "seconds per UL step with `Reverse`'s); it is not a way to train this model.",
            f"Settings: {settings_line(every, keys)}. The learned penalties, log10, as an "
            "image; pixels that never vary in the training subset get no hypergradient and "
            "are left blank. With few validation examples and 784 hyperparameters the "
            "validation accuracy runs ahead of the test accuracy: the penalties overfit the "
            "validation set.",
            "\n\n".join(figures),
        ]
    )


def reproduce_section(digest: dict[str, Any]) -> str:
    """The commands of all runs, then this script's."""
    commands = [r["command"] for e in EXPERIMENTS for r in digest.get(e, []) if r["command"]]
    report = "python benchmarks/hyper_cleaning_results.py"
    if digest.get("forward_cost"):
        report += " --forward-cost"
    return "\n\n".join(
        [
            "## Reproduce",
            "With the data folder in `BILEVEL_DATA` (or `--data-root`); running a command "
            "again resumes it from its `checkpoint.pt`:",
            "```bash\n" + "\n".join(sorted(commands)) + f"\n{report}\n```",
        ]
    )


REFERENCES = """\
## References

- Franceschi, Donini, Frasconi & Pontil (2017). Forward and Reverse Gradient-Based
  Hyperparameter Optimization. ICML.
- Shaban, Cheng, Hatch & Boots (2019). Truncated Back-propagation for Bilevel Optimization.
  AISTATS.
- Pedregosa (2016). Hyperparameter optimization with approximate gradient. ICML.
- Lorraine, Vicol & Duvenaud (2020). Optimizing Millions of Hyperparameters by Implicit
  Differentiation. AISTATS.
"""


def render(digest: dict[str, Any]) -> str:
    """The page, from the digest alone."""
    if not digest.get("hyper_cleaning"):
        raise SystemExit("no hyper-cleaning run in the digest or under the runs folder")
    conditions = digest.get("conditions")
    summary, results = hyper_cleaning_section(digest["hyper_cleaning"])
    every = [r for e in EXPERIMENTS for r in digest.get(e, [])]
    cost = forward_section(digest.get("forward_cost"))
    parts = [title(every, conditions), summary, results, cost]
    if digest.get("feature_penalty"):
        parts.append(feature_penalty_section(digest["feature_penalty"]))
    parts += [PROTOCOL, reproduce_section(digest), REFERENCES]
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def measure_forward_cost(sizes: list[int], ll_steps: int, data_root: str | None) -> dict[str, Any]:
    """Time Forward and Reverse hypergradients of linear hyper-cleaning for a few training-set
    sizes (one thread, CPU seconds) and check that they agree."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import _common
    import hyper_cleaning as hc

    from bilevel import BilevelProblem
    from bilevel.ll import GradientDescent
    from bilevel.ul import Forward, Reverse

    torch.set_num_threads(1)
    data = _common.mnist_split(data_root, "mnist", max(sizes), FORWARD_COST_VAL, 0)
    measurements = []
    for n in sizes:
        x = data["train"][0][:n]
        y, _ = hc.corrupt_labels(data["train"][1][:n], 0.5, 10, 0)
        cpu, grads = {}, {}
        for name, cls in (("forward", Forward), ("reverse", Reverse)):
            for m in (10, n):  # the first is a warm-up
                ll_model = hc.make_classifier("linear", 32, 0)
                ul_model = hc.ExampleWeights(m)
                ll_objective, ul_objective = hc.make_objectives(1e-2)
                ll = GradientDescent(ll_objective, ll_model, ul_model, lr=1.0, iters=ll_steps)
                ul = cls(ul_objective, ul_model, ll_objective, ll_model)
                problem = BilevelProblem(ll, ul)
                start = time.process_time()
                grads[name] = problem.hypergradient((x[:m], y[:m]), data["val"])[0]
                cpu[name] = (time.process_time() - start) / ll_steps
        measurements.append(
            {
                "n_train": n,
                "forward_s_per_ll_step": cpu["forward"],
                "reverse_s_per_ll_step": cpu["reverse"],
                "max_abs_difference": (grads["forward"] - grads["reverse"]).abs().max().item(),
                "max_abs_hypergradient": grads["reverse"].abs().max().item(),
            }
        )
        print(measurements[-1])
    largest = measurements[-1]
    return {
        "ll_steps": ll_steps,
        **provenance_of(
            {
                "command": "python benchmarks/hyper_cleaning_results.py --forward-cost --sizes "
                + " ".join(map(str, sizes)),
                "hardware": _common.hardware(torch.device("cpu")),
                **_common.provenance(),
            }
        ),
        "measurements": measurements,
        "extrapolated_s_per_ul_step_at_5000": largest["forward_s_per_ll_step"]
        * (5000 / largest["n_train"]) ** 2
        * 100,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=folder, default=str(ROOT / "runs"), help="folder searched for runs"
    )
    parser.add_argument("--digest", default=str(DIGEST), help="what the page shows of each run")
    parser.add_argument("--page", default=str(ROOT / "docs" / "hyper_cleaning.md"))
    parser.add_argument("--img", type=folder, default=str(ROOT / "docs" / "img" / "hyper_cleaning"))
    parser.add_argument(
        "--conditions",
        default=None,
        help="how the new runs shared the machine, stated on the page (e.g. 'two at a time on "
        "2 cores, load average 3 to 4'); kept from the digest when not given",
    )
    parser.add_argument(
        "--forward-cost", action="store_true", help="measure Forward vs Reverse first"
    )
    parser.add_argument("--sizes", type=count, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--data-root", default=None, help="default: $BILEVEL_DATA")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    most = MNIST_TRAIN - FORWARD_COST_VAL
    if max(args.sizes) > most:
        parser.error(
            f"--sizes: at most {most} training examples (MNIST's {MNIST_TRAIN} training "
            f"images, less {FORWARD_COST_VAL} for validation), got {max(args.sizes)}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    """Command line: update the digest from the runs at hand (if any), then write the page
    from the digest."""
    args = parse_args(argv)
    runs, img, digest_path = Path(args.runs), Path(args.img), Path(args.digest)
    digest = json.loads(digest_path.read_text()) if digest_path.exists() else {}
    cost_path = runs / "hyper_cleaning" / FORWARD_COST
    if args.forward_cost:
        cost_path.parent.mkdir(parents=True, exist_ok=True)
        cost_path.write_text(
            json.dumps(measure_forward_cost(args.sizes, 5, args.data_root), indent=2) + "\n"
        )
    found = load_runs(runs) if runs.is_dir() else {}
    if found or cost_path.exists() or args.conditions is not None:
        digest = update_digest(digest, found, img)
        if cost_path.exists():
            digest["forward_cost"] = json.loads(cost_path.read_text())
        if args.conditions is not None:
            digest["conditions"] = args.conditions
        digest_path.write_text(json.dumps(digest, indent=1, sort_keys=True) + "\n")
    page = render(digest)
    Path(args.page).write_text(page)
    source = f"{sum(map(len, found.values()))} run(s) from {runs}" if found else "the digest"
    print(f"wrote {args.page} from {source} ({digest_path})")


if __name__ == "__main__":
    main()
