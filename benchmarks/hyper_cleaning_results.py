"""Generate ``docs/hyper_cleaning.md`` from the ``results.json`` of hyper-cleaning and
per-pixel-penalty runs; nothing on the page is typed by hand.

    python benchmarks/hyper_cleaning_results.py                 # the page, from runs/
    python benchmarks/hyper_cleaning_results.py --forward-cost  # first measure Forward vs Reverse

The runs are made by ``examples/hyper_cleaning.py`` and ``examples/feature_penalty.py`` with
``--out runs/...``; their plots are copied to ``docs/img/hyper_cleaning/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import code_revision

ROOT = Path(__file__).resolve().parent.parent
FORWARD_COST = "forward_cost.json"

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
by `benchmarks/hyper_cleaning_results.py` from the runs' `results.json`. Those files are not
in the repository (`runs/` is not committed{provenance}): the numbers below cannot be checked
from a checkout, only remade with the commands at the end.
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


def load_runs(runs: Path) -> dict[str, list[tuple[str, dict[str, Any], Path]]]:
    """All ``results.json`` under ``runs``, grouped by experiment, as (name, results, folder)."""
    found: dict[str, list[tuple[str, dict[str, Any], Path]]] = {}
    for path in sorted(runs.glob("**/results.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        experiment = results.get("experiment") if isinstance(results, dict) else None
        if experiment in ("hyper_cleaning", "feature_penalty"):
            found.setdefault(experiment, []).append((path.parent.name, results, path.parent))
    return found


def made_with(results: dict[str, Any]) -> str:
    """The date and the code of a run, as its ``results.json`` records them (runs made
    before they were recorded say so)."""
    code = code_revision(results.get("git"))
    if "date" not in results or not code:
        return "not recorded"
    return f"{results['date'][:10]}, {code}"


def title(runs: list[dict[str, Any]]) -> str:
    """The page's head: what it is generated from, and whether the runs record their date
    and code (shown in the cost table when they do)."""
    undated = [r for r in runs if made_with(r) == "not recorded"]
    if len(undated) == len(runs):
        provenance = ", and they record no date or commit"
    elif undated:
        provenance = "; the cost table gives the date and commit of the runs that record them"
    else:
        provenance = "; the cost table gives each run's date and commit"
    return TITLE.format(provenance=provenance)


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


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def peak(history: list[dict[str, Any]]) -> str:
    """The highest logged F1, the UL step where it was reached and the CPU seconds until then."""
    if not history:
        return ""
    best = max(history, key=lambda h: h.get("f1", 0.0))
    return f"{best['f1']:.3f} at {best['step']} ({best.get('cpu_seconds', float('nan')):.0f})"


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


def hyper_cleaning_section(
    runs: list[tuple[str, dict[str, Any], Path]], img: Path
) -> tuple[str, str]:
    """What to take away; the results tables, baseline and oracle, LL stationarity and the
    weight histograms."""
    order = {"reverse": 0, "truncated": 1, "implicit-cg": 2, "implicit-neumann": 3}
    failed = [r for r in runs if "error" in r[1]]
    runs = [r for r in runs if "error" not in r[1]]
    runs = sorted(
        runs,
        key=lambda r: (r[1]["dataset"], r[1]["model"], order.get(r[1]["method"], 9), r[0]),
    )
    rows, refs, stationarity, figures = [], {}, [], []
    undated = [name for name, r, _ in runs if made_with(r) == "not recorded"]
    for name, r, folder in runs:
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
                "wall": f"{r['seconds']:.0f}",
                "cpu": f"{r.get('cpu_seconds', float('nan')):.0f}",
                "peak": peak(r["history"]),
                "hardware": r["hardware"],
                "made": made_with(r),
            }
        )
        key = (r["dataset"], r["model"], r["seed"], s["n_train"], s["l2"], s["final_steps"])
        refs.setdefault(key, (r["baseline"], r["oracle"]))
        last = r["history"][-1] if r["history"] else {}
        stationarity.append(
            [
                r["dataset"],
                r["model"],
                f"`{r['method']}`",
                f"{r['relative_grad_norm_at_ll_steps']:.2%}",
                f"{r['relative_grad_norm_at_final_steps']:.3%}",
                f"{last['ll_grad_norm']:.2g}" if "ll_grad_norm" in last else "",
                f"{last['residual_norm'] / last['rhs_norm']:.1e}" if last.get("rhs_norm") else "",
                f"{last['lambda_max']:.3g}" if last.get("lambda_max") else "",
            ]
        )
        source = folder / "weights_hist.png"
        if source.exists():
            img.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, img / f"{name}.png")
            figures.append(f"![{name}](img/hyper_cleaning/{name}.png)")
    ref_rows = [
        [d, m, str(seed), pct(b["test_acc"]), pct(o["test_acc"])]
        for (d, m, seed, *_), (b, o) in sorted(refs.items())
    ]
    every = [r["settings"] for _, r, _ in runs]
    keys = ["n_train", "n_val", "corrupt", "ll_steps", "l2", "hidden", "ul_lr", "truncate"]
    keys += ["solver_iters", "tolerance", "neumann_alpha", "final_steps", "seed"]
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
        f"{settings_line(every, keys)}. The runs ran one at a time with `--threads 1` on a "
        "machine shared with other jobs, so wall-clock times are noisy; CPU seconds (of the "
        "process, all threads) are the steadier measure of cost.",
        failed_section(failed),
        "### Is the lower level stationary?",
        stationarity_text([f"`{n}`" for n in undated], len(runs)),
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


def failed_section(failed: list[tuple[str, dict[str, Any], Path]]) -> str:
    """The runs that stopped with an error (a diverged solve, a NaN), with the message."""
    if not failed:
        return ""
    lines = [
        "Runs that stopped with an error (the library refuses to return a hypergradient it "
        "cannot trust; the message names the cure):",
    ]
    for _, r, _ in sorted(failed, key=lambda r: r[0]):
        lines.append(
            f"- {r['dataset']}, {r['model']}, `{r['method']}`: stopped at UL step "
            f"{r['failed_at_ul_step']} with *{r['error']}*"
        )
    return lines[0] + "\n\n" + "\n".join(lines[1:])


def forward_section(runs: Path) -> str:
    """Why Forward is not run here, with the measured cost if ``--forward-cost`` was run."""
    text = (
        "## Forward mode\n\n"
        "`bilevel.ul.Forward` carries $dw_t/d\\lambda$ through the LL steps: one "
        "Jacobian-vector product per scalar hyperparameter per LL step. With one weight per "
        "training example that is 5,000 products per LL step, each as expensive as a pass "
        "over the training set, so the cost of one hypergradient grows with the square of the "
        "number of examples; `examples/hyper_cleaning.py --method forward` refuses to run "
        "with more than 100 hyperparameters. It gives the same hypergradient as `Reverse`."
    )
    path = runs / FORWARD_COST
    if not path.exists():
        return text
    cost = json.loads(path.read_text())
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
    return "\n\n".join(
        [
            text,
            f"Measured on linear hyper-cleaning with fewer training examples "
            f"({cost['ll_steps']} LL steps, CPU seconds per LL step, {cost['hardware']}):",
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


def feature_penalty_section(runs: list[tuple[str, dict[str, Any], Path]], img: Path) -> str:
    """The per-pixel L2 penalty runs: accuracies and the penalty images."""
    rows, figures = [], []
    for name, r, folder in sorted(runs, key=lambda r: r[0]):
        s = r["settings"]
        best = r["best_single_penalty"]
        rows.append(
            [
                r["dataset"],
                f"`{r['method']}`",
                f"{s['n_train']} / {s['n_val']}",
                pct(r["test_acc"]),
                pct(r["val_acc"]),
                f"{pct(r['initial_penalty']['test_acc'])} ({r['initial_penalty']['l2']:g})",
                f"{pct(best['test_acc'])} ({best['l2']:g})",
                str(r["ul_steps"]),
                f"{r['seconds']:.0f}",
                f"{r.get('cpu_seconds', float('nan')):.0f}",
                f"{r.get('cpu_seconds', float('nan')) / max(r['ul_steps'], 1):.2g}",
            ]
        )
        source = folder / "penalty.png"
        if source.exists():
            img.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, img / f"penalty-{name}.png")
            figures.append(f"![learned penalty, {name}](img/hyper_cleaning/penalty-{name}.png)")
    every = [r["settings"] for _, r, _ in runs]
    keys = ["ll_steps", "ll_lr", "init_l2", "ul_optimizer", "ul_lr", "cg_iters", "tolerance"]
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


def reproduce_section(found: dict[str, list[tuple[str, dict[str, Any], Path]]]) -> str:
    """The commands of all runs."""
    commands = [r["command"] for runs in found.values() for _, r, _ in runs if "command" in r]
    return "\n\n".join(
        [
            "## Reproduce",
            "With the data folder in `BILEVEL_DATA` (or `--data-root`); running a command "
            "again resumes it from its `checkpoint.pt`:",
            "```bash\n" + "\n".join(sorted(commands)) + "\npython benchmarks/"
            "hyper_cleaning_results.py\n```",
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


def measure_forward_cost(
    runs: Path, sizes: list[int], ll_steps: int, data_root: str | None
) -> None:
    """Time Forward and Reverse hypergradients of linear hyper-cleaning for a few training-set
    sizes (one thread, CPU seconds) and check that they agree; write ``FORWARD_COST``."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import _common
    import hyper_cleaning as hc

    from bilevel import BilevelProblem
    from bilevel.ll import GradientDescent
    from bilevel.ul import Forward, Reverse

    torch.set_num_threads(1)
    data = _common.mnist_split(data_root, "mnist", max(sizes), 1000, 0)
    measurements = []
    for n in sizes:
        x = data["train"][0][:n]
        y, _ = hc.corrupt_labels(data["train"][1][:n], 0.5, 10, 0)
        seconds, grads = {}, {}
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
                seconds[name] = (time.process_time() - start) / ll_steps
        measurements.append(
            {
                "n_train": n,
                "forward_s_per_ll_step": seconds["forward"],
                "reverse_s_per_ll_step": seconds["reverse"],
                "max_abs_difference": (grads["forward"] - grads["reverse"]).abs().max().item(),
                "max_abs_hypergradient": grads["reverse"].abs().max().item(),
            }
        )
        print(measurements[-1])
    largest = measurements[-1]
    result = {
        "ll_steps": ll_steps,
        "hardware": _common.hardware(torch.device("cpu")),
        "measurements": measurements,
        "extrapolated_s_per_ul_step_at_5000": largest["forward_s_per_ll_step"]
        * (5000 / largest["n_train"]) ** 2
        * 100,
    }
    _common.write_json(runs / FORWARD_COST, result)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="folder searched for runs")
    parser.add_argument("--page", default=str(ROOT / "docs" / "hyper_cleaning.md"))
    parser.add_argument("--img", default=str(ROOT / "docs" / "img" / "hyper_cleaning"))
    parser.add_argument(
        "--forward-cost", action="store_true", help="measure Forward vs Reverse first"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--data-root", default=None, help="default: $BILEVEL_DATA")
    args = parser.parse_args()
    runs, img = Path(args.runs), Path(args.img)
    if args.forward_cost:
        measure_forward_cost(runs / "hyper_cleaning", args.sizes, 5, args.data_root)
    found = load_runs(runs)
    if "hyper_cleaning" not in found:
        raise SystemExit(f"no hyper-cleaning results.json under {runs}")
    for stale in img.glob("*.png"):  # this folder holds only this page's plots
        stale.unlink()
    summary, results = hyper_cleaning_section(found["hyper_cleaning"], img)
    every = [r for experiment in found.values() for _, r, _ in experiment]
    parts = [title(every), summary, results, forward_section(runs / "hyper_cleaning")]
    if "feature_penalty" in found:
        parts.append(feature_penalty_section(found["feature_penalty"], img))
    parts += [PROTOCOL, reproduce_section(found), REFERENCES]
    Path(args.page).write_text("\n\n".join(p.strip("\n") for p in parts) + "\n")
    print(f"wrote {args.page} and the plots in {img}")


if __name__ == "__main__":
    main()
