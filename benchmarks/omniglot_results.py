"""Write the results tables of docs/omniglot.md from the runs' results.json files.

    python benchmarks/omniglot_results.py [RUNS_FOLDER]   # default: runs/omniglot

Every ``results.json`` under the folder written by ``examples/omniglot.py`` gives one row;
its ``curve.png`` is copied to ``docs/img/omniglot/<run>.png`` and shown below the tables.
What the page shows of each run is kept in ``benchmarks/results/omniglot_runs.json``
(committed): the runs found update their rows there (by run name) and the others stay, so
the page is rewritten whole even when only some runs' folders are at hand. The page is
rewritten between the ``summary:begin``/``summary:end`` marker comments (what to take away,
at the top), the ``equal:begin``/``equal:end`` ones (the equal-compute table: the runs made
with ``--budget-cpu-minutes``) and the ``results:begin``/``results:end`` ones (every run)
only; nothing in them is typed by hand. The published numbers next to each row come from
the papers (``PUBLISHED``), for comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "omniglot.md"
IMAGES = ROOT / "docs" / "img" / "omniglot"
DIGEST = ROOT / "benchmarks" / "results" / "omniglot_runs.json"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SUMMARY = ("<!-- summary:begin -->", "<!-- summary:end -->")
EQUAL = ("<!-- equal:begin -->", "<!-- equal:end -->")
METHOD_ORDER = ("maml", "fomaml", "imaml", "reptile", "metasgd", "hyperrep")
NAMES = {
    "maml": "MAML",
    "fomaml": "first-order MAML",
    "imaml": "iMAML",
    "reptile": "Reptile",
    "metasgd": "Meta-SGD",
    "hyperrep": "hyper-representation",
}
UL_NAMES = {
    "reverse": "Reverse",
    "first_order": "FirstOrder",
    "implicit": "Implicit",
    "truncated": "Truncated",
    "reptile": "Reptile",
}
#: Published test accuracies (%) on Omniglot with the 4-conv network, by (method, ways, shots):
#: Finn et al. (2017) Table 1 (MAML, first-order MAML); Rajeswaran et al. (2019) Table 2
#: (iMAML, GD; it also quotes MAML's and first-order MAML's, and Reptile's from Nichol et al.
#: 2018). No figure is shown for Meta-SGD (Li et al. 2017) or the hyper-representation
#: (Franceschi et al. 2018): their tables could not be read offline to check figures that
#: would otherwise come from memory.
PUBLISHED = {
    "maml": {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9},
    "fomaml": {(5, 1): 98.3, (5, 5): 99.2, (20, 1): 89.4, (20, 5): 97.9},
    "reptile": {(5, 1): 97.68, (5, 5): 99.48, (20, 1): 89.43, (20, 5): 97.12},
    "imaml": {(5, 1): 99.16, (5, 5): 99.67, (20, 1): 94.46, (20, 5): 98.69},
}
#: their 95% confidence intervals (the same tables), for 5-way 1-shot
PUBLISHED_CI = {"maml": 0.4, "fomaml": 0.5, "reptile": 0.04, "imaml": 0.35}


def published_text(published: float | None) -> str:
    """The published figure for the table."""
    return "–" if published is None else str(published)


def load_runs(folder: Path) -> list[tuple[str, dict[str, Any], Path]]:
    """``(run name, results, run folder)`` for every results.json under ``folder``."""
    runs = []
    for path in sorted(folder.rglob("results.json")):
        results = json.loads(path.read_text())
        if results.get("experiment") != "omniglot":
            continue
        name = path.parent.relative_to(folder).as_posix().replace("/", "-")
        runs.append((name, results, path.parent))

    return runs


def row_order(r: dict[str, Any]) -> tuple:
    """Task shape, then method, then run name."""
    method = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99
    return (r["ways"], r["shots"], method, r["ul_method"], r["name"])


def setting(r: dict[str, Any]) -> str:
    """The task shape and the main settings of a run."""
    s = r["settings"]
    parts = [
        f"{r['ways']}-way {r['shots']}-shot",
        f"{s['hidden']} filters",
        f"{s['inner_steps']} inner step{'s' if s['inner_steps'] > 1 else ''} (lr {s['inner_lr']})",
        f"meta-batch {s['meta_batch']}, {s['query']} queries/class, "
        f"{'SGD' if s.get('meta_optimizer') == 'sgd' else 'Adam'} {s['meta_lr']}",
    ]
    if s.get("ll") == "bda":
        parts.append(f"BDA alpha {s['bda_alpha']}, decay {s['bda_alpha_decay']}")
    if r["method"] == "imaml":
        parts.append(f"reg {s['reg']}, {solver_of(r).upper()} {s['cg_steps']}")
    elif r["ul_method"] == "implicit":
        parts.append(f"{solver_of(r).upper()} {s['cg_steps']}")
    if s.get("damping"):
        parts.append(f"damping {s['damping']:g}")
    if r["ul_method"] == "truncated":
        parts.append(f"K={s['truncate']}")
    if r["method"] == "hyperrep" and s.get("head_l2"):
        parts.append(f"head L2 {s['head_l2']}")
    if s.get("feature_norm"):
        parts.append(f"features scaled to norm {s['feature_norm']:g}")
    if s["eval_inner_steps"] != s["inner_steps"]:
        parts.append(f"{s['eval_inner_steps']} steps at test")
    if s.get("on_failed_step") == "skip":
        parts.append("failed meta-steps skipped")
    return "; ".join(parts)


def solver_of(r: dict[str, Any]) -> str:
    """The linear solver of an implicit run (runs from before ``--solver`` used CG)."""
    return r["settings"].get("solver") or "cg"


def cg_breakdowns(folder: Path) -> tuple[int, int] | None:
    """From ``log.csv``: on how many of the sampled tasks (the last task of each logged
    meta-step) CG met non-positive curvature, out of how many; ``None`` without CG."""
    path = folder / "log.csv"
    if not path.exists():
        return None
    with open(path) as f:
        flags = [row["cg_diverged"] for row in csv.DictReader(f) if row.get("cg_diverged")]
    return (sum(int(x) for x in flags), len(flags)) if flags else None


def minutes(seconds: float) -> str:
    """Minutes, one decimal."""
    return f"{seconds / 60:.1f}"


def summarize(name: str, r: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What the page shows of one run (the digest's record)."""
    hardware = r["hardware"]
    if r.get("cpu_count") and r.get("device") == "cpu":
        hardware += f"; {r['cpu_count']} CPU cores"
    implicit = r["ul_method"] == "implicit"
    cg = cg_breakdowns(folder) if implicit and solver_of(r) == "cg" else None
    budget = r["settings"].get("budget_cpu_minutes")
    return {
        "name": name,
        "method": r["method"],
        "ul_method": r["ul_method"],
        "solver": solver_of(r) if implicit else None,
        "damping": r["settings"].get("damping") or None,
        "ll": r["settings"].get("ll", "gd"),
        # --feature-norm (hyper-representation; only where given)
        **(
            {"feature_norm": r["settings"]["feature_norm"]}
            if r["settings"].get("feature_norm")
            else {}
        ),
        "meta_optimizer": r["settings"].get("meta_optimizer", "adam"),
        "budget_cpu_minutes": budget,
        "cpu_seconds_per_meta_step": None
        if budget is None
        else round(r["train_cpu_seconds_without_validation"] / max(r["meta_steps"], 1), 3),
        "ways": r["ways"],
        "shots": r["shots"],
        "setting": setting(r),
        "test_accuracy_pct": round(100 * r["test_accuracy"], 2),
        "test_ci95_pct": round(100 * r["test_ci95"], 2),
        "test_tasks": r["test_tasks"],
        "meta_steps": r["meta_steps"],
        "train_minutes": round(r["train_seconds"] / 60, 1),
        "cpu_minutes": None
        if r.get("train_cpu_seconds") is None
        else round(r["train_cpu_seconds"] / 60, 1),
        "seconds_per_meta_step": round(r["seconds_per_meta_step"], 2),
        "best_val_accuracy_pct": round(100 * (r["best_val_accuracy"] or 0), 2),
        "best_step": r["best_step"],
        "eval_seconds": round(r["eval_seconds"]),
        "cg_nonpositive": None if cg is None else list(cg),
        "stopped": r.get("stopped"),
        # meta-steps that failed and were skipped (--on-failed-step skip; only where any)
        **({"skipped_steps": r["skipped_steps"]} if r.get("skipped_steps") else {}),
        "hardware": hardware,
        # when and from which code (runs since 2026-12-02 record them)
        **(
            {"date": r["date"], "commit": r["git"]["commit"], "dirty": r["git"]["dirty"]}
            if r.get("date") and r.get("git")
            else {}
        ),
    }


def task(row: dict[str, Any]) -> str:
    return f"{row['ways']}-way {row['shots']}-shot"


def method_name(row: dict[str, Any]) -> str:
    """E.g. "iMAML (Implicit, MINRES)", "hyper-representation with BDA (Reverse)"."""
    name = NAMES.get(row["method"], row["method"])
    if row.get("ll") == "bda":
        name += " with BDA"
    if row.get("feature_norm"):
        name += f", features of norm {row['feature_norm']:g}"
    ul = UL_NAMES.get(row["ul_method"], row["ul_method"])
    if row["ul_method"] == "reptile":  # its direction is stepped by SGD or Adam
        ul = "SGD" if row.get("meta_optimizer") == "sgd" else "Adam"
    if row["ul_method"] == "implicit":
        ul += f", {(row.get('solver') or 'cg').upper()}"
        if row.get("damping"):
            ul += f", damping {row['damping']:g}"
    return name if ul == name else f"{name} ({ul})"


def published(row: dict[str, Any]) -> float | None:
    return PUBLISHED.get(row["method"], {}).get((row["ways"], row["shots"]))


def usual_hardware(rows: list[dict[str, Any]]) -> str:
    """The machine most runs ran on."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["hardware"]] = counts.get(r["hardware"], 0) + 1
    return max(counts, key=lambda h: counts[h])


def compute_notes(r: dict[str, Any], usual: str) -> list[str]:
    """Why a run of an equal-compute table did not get that compute: it stopped early (the
    CPU minutes it used), or it ran on another CPU than most runs."""
    notes = []
    if r.get("stopped"):
        used = r["cpu_seconds_per_meta_step"] * r["meta_steps"] / 60
        notes.append(f"stopped at {used:.1f} CPU minutes")
    if r.get("skipped_steps"):
        notes.append(f"{r['skipped_steps']:,} failed meta-steps skipped")
    if r["hardware"] != usual:
        notes.append(f"on {r['hardware'].split(',')[0]}")
    return notes


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """What to take away: the best run of each method on 5-way 1-shot, and the machine."""
    if not rows:
        return ["No runs yet."]
    lines = []
    for method in METHOD_ORDER:
        mine = [r for r in rows if r["method"] == method and (r["ways"], r["shots"]) == (5, 1)]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["test_accuracy_pct"])
        paper, ci = published(best), PUBLISHED_CI.get(method)
        versus = ""
        if paper and ci:
            inside = abs(best["test_accuracy_pct"] - paper) <= ci
            versus = (
                f" (published: {paper} ± {ci}%, after tens of thousands of meta-steps; "
                f"{'inside' if inside else 'outside'} that interval)"
            )
        lines.append(
            f"- **{method_name(best)}**, 5-way 1-shot: **{best['test_accuracy_pct']:.2f} ± "
            f"{best['test_ci95_pct']:.2f}%** on {best['test_tasks']} meta-test tasks{versus}, "
            f"after {best['meta_steps']:,} meta-steps in {best['train_minutes']:.0f} minutes "
            f"({best['seconds_per_meta_step']:.2f} s per meta-step)."
        )
    machines = _by_machine(rows)
    if len(machines) == 1:
        hardware = list(machines)
    else:  # which runs ran where (a CPU's round-off steers a run's trajectory)
        hardware = [
            f"{machine} ({len(names)} run{'s' * (len(names) > 1)}"
            + (f": {', '.join(f'`{n}`' for n in sorted(names))})" if len(names) <= 3 else ")")
            for machine, names in sorted(machines.items(), key=lambda m: -len(m[1]))
        ]
    groups = equal_groups(rows)
    usual = usual_hardware(rows)

    def entry(r: dict[str, Any]) -> str:
        notes = compute_notes(r, usual)
        return f"{method_name(r)} {r['test_accuracy_pct']:.2f}%" + (
            f" ({'; '.join(notes)})" if notes else ""
        )

    for budget, equal in groups:
        ranked = sorted(equal, key=lambda r: -r["test_accuracy_pct"])
        order = ", ".join(entry(r) for r in ranked)
        pending = pending_runs(budget, equal, groups)
        so_far = f"; {len(equal)} of {len(equal) + len(pending)} so far" if pending else ""
        lines += [
            "",
            f"With the same compute ({budget:g} CPU minutes of meta-training each, one "
            f"thread{so_far}; the equal-compute tables below): {order}.",
        ]
    lines += [
        "",
        "All runs: "
        f"{'; '.join(hardware)}, with 32 filters instead of 64 and meta-batches of 8: what "
        "the methods reach in minutes on a CPU, not a reproduction of the papers' runs.",
    ]
    return lines


def equal_groups(rows: list[dict[str, Any]]) -> list[tuple[float, list[dict[str, Any]]]]:
    """The 5-way 1-shot runs of each CPU budget given to several runs, the largest budget
    first: ``[(budget, runs), ...]``."""
    five_one = [
        r for r in rows if r.get("budget_cpu_minutes") and (r["ways"], r["shots"]) == (5, 1)
    ]
    budgets = [r["budget_cpu_minutes"] for r in five_one]
    shared = sorted({b for b in budgets if budgets.count(b) > 1}, reverse=True)
    return [(b, [r for r in five_one if r["budget_cpu_minutes"] == b]) for b in shared]


def same_run(r: dict[str, Any]) -> tuple[str, str]:
    """What a run is apart from its budget: its method and settings."""
    return method_name(r), r["setting"]


def pending_runs(
    budget: float,
    equal: list[dict[str, Any]],
    groups: list[tuple[float, list[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    """The runs of smaller budgets that ``equal`` (budget ``budget``'s runs) has no run like:
    those still going on to this budget (one per method and settings). A run made only at a
    larger budget is not pending at a smaller one."""
    done = {same_run(r) for r in equal}
    pending: dict[tuple[str, str], dict[str, Any]] = {}
    for smaller, runs in groups:
        if smaller < budget:
            for r in runs:
                if same_run(r) not in done:
                    pending.setdefault(same_run(r), r)
    return list(pending.values())


def equal_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every method given the same CPU minutes: accuracy, meta-steps, cost per meta-step;
    one table per budget, the largest first (with the runs still going on to it)."""
    groups = equal_groups(rows)
    if not groups:
        return ["No equal-compute runs yet (`examples/omniglot.py --budget-cpu-minutes`)."]
    usual = usual_hardware(rows)
    lines = [
        "Each method meta-trained for the same CPU minutes on one thread (validation "
        "excluded), 5-way 1-shot, then tested on 600 meta-test tasks with the model of best "
        "validation accuracy (95% CI). CPU s / meta-step: meta-training's CPU time divided "
        "by the meta-steps done.",
    ]
    for budget, equal in groups:
        lines += ["", f"**{budget:g} CPU minutes** each:", "", *budget_table(equal, usual)]
        pending = pending_runs(budget, equal, groups)
        if pending:
            names = ", ".join(method_name(r) for r in pending)
            lines += [
                "",
                f"Not yet given {budget:g} CPU minutes (a run continues from its checkpoint "
                f"with the larger `--budget-cpu-minutes`, or starts from step 0 with it): "
                f"{names}.",
            ]
    lines += ["", "Settings (run names as in the tables below):", ""]
    names: dict[tuple[str, str], list[str]] = {}
    settings: dict[tuple[str, str], str] = {}
    for _, equal in groups:
        for r in equal:
            names.setdefault(same_run(r), []).append(f"`{r['name']}`")
            settings[same_run(r)] = r["setting"]
    lines += [f"- {', '.join(n)}: {settings[key]}" for key, n in names.items()]
    return lines


def legend(
    runs: list[dict[str, Any]], key: str, meaning: str, value: Callable[[Any], str]
) -> list[str]:
    """A note under a table for the runs whose ``key`` is set: what it means, then each
    run's ``value`` of it (nothing when no run has it)."""
    marked = [r for r in runs if r.get(key)]
    if not marked:
        return []
    return ["", " ".join([meaning, *(f"`{r['name']}`: {value(r[key])}." for r in marked)])]


def budget_table(equal: list[dict[str, Any]], usual: str | None = None) -> list[str]:
    """The table of one budget's runs, the most accurate first; runs that stopped early or
    ran on another CPU than ``usual`` (most runs' machine) are said to be so."""
    usual = usual or usual_hardware(equal)
    lines = [
        "| method (hypergradient) | test accuracy | meta-steps | CPU s / meta-step | best "
        "val. step | published |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(equal, key=lambda r: -r["test_accuracy_pct"]):
        notes = compute_notes(r, usual)
        steps = f"{r['meta_steps']:,}" + (f" ({'; '.join(notes)})" if notes else "")
        lines.append(
            f"| {method_name(r)} | **{r['test_accuracy_pct']:.2f}** ± {r['test_ci95_pct']:.2f} "
            f"| {steps} | {r['cpu_seconds_per_meta_step']:.3f} | "
            f"{r['best_step']:,} | {published_text(published(r))} |"
        )
    lines += legend(
        equal,
        "stopped",
        "(stopped at ...): meta-training ended before the budget because the LL's gradient "
        "descent diverged on a task (`LowerLevelDivergenceError`); the model tested is the "
        "best one before it.",
        lambda stopped: stopped.split(":")[0],
    )
    lines += legend(
        equal,
        "skipped_steps",
        "(... skipped): run with `--on-failed-step skip`: a meta-step whose LL diverged on "
        "a task was skipped (its result unused; the UL parameters untouched) and "
        "meta-training went on, counting its CPU time.",
        lambda skipped: f"{skipped:,}",
    )
    elsewhere = [r for r in equal if r["hardware"] != usual]
    if elsewhere:
        lines += [
            "",
            "(on ...): run on another CPU than the others ("
            + "; ".join(
                ", ".join(f"`{name}`" for name in names) + f": {machine}"
                for machine, names in _by_machine(elsewhere).items()
            )
            + f"; the others: {usual}): a CPU minute there is not the same compute.",
        ]
    return lines


def _by_machine(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The run names of each machine, in the rows' order."""
    machines: dict[str, list[str]] = {}
    for r in rows:
        machines.setdefault(r["hardware"], []).append(r["name"])
    return machines


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Three narrow tables (accuracy, settings, cost) and the learning curves."""
    if not rows:
        return ["No runs yet: run `examples/omniglot.py` with `--out runs/omniglot/<name>`."]
    lines = [
        "**Test accuracy** (%): mean over the meta-test tasks with its 95% confidence interval "
        "(1.96 · std / √n), of the model with the best meta-validation accuracy.",
        "",
        "| run | method (hypergradient) | task | test accuracy | published |",
        "|---|---|---|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['name']}` | {method_name(r)} | {task(r)} | "
            f"**{r['test_accuracy_pct']:.2f}** ± {r['test_ci95_pct']:.2f} | "
            f"{published_text(published(r))} |"
        )
    lines += ["", "**Settings** of each run:", "", "| run | settings |", "|---|---|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['setting']} |")
    lines += [
        "",
        "**Cost**: meta-steps taken, wall time of meta-training (including the periodic "
        "validation, on a machine shared with other jobs), the process's CPU time, and what "
        "the papers' 60,000 meta-steps would take at the run's pace.",
        "",
        "| run | meta-steps | wall (min) | CPU (min) | s / meta-step | 60,000 steps |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cpu = "–" if r["cpu_minutes"] is None else f"{r['cpu_minutes']:.1f}"
        full = 60000 * r["seconds_per_meta_step"] / 3600
        lines.append(
            f"| `{r['name']}` | {r['meta_steps']:,} | {r['train_minutes']:.1f} | {cpu} | "
            f"{r['seconds_per_meta_step']:.2f} | {full:.0f} h |"
        )
    lines += ["", "**Learning curves** and the best validation accuracy of each run:", ""]
    for r in rows:
        line = (
            f"- `{r['name']}`: best validation accuracy {r['best_val_accuracy_pct']:.2f}% at "
            f"meta-step {r['best_step']:,} of {r['meta_steps']:,}; test evaluation "
            f"{r['eval_seconds']} s."
        )
        if r.get("stopped"):
            line += f" Meta-training stopped: {r['stopped'].split(':')[0]}."
        if r.get("date"):  # recorded by runs since 2026-12-02
            code = f" with the code of commit {r['commit']}" if r.get("commit") else ""
            line += f" Tested {r['date']}{code}{' (with local changes)' * bool(r.get('dirty'))}."
        if r.get("cg_nonpositive"):
            bad, total = r["cg_nonpositive"]
            line += (
                f" CG met non-positive curvature on {bad} of {total} sampled tasks (the last"
                " task of each logged meta-step)."
            )
        lines.append(line)
        if (IMAGES / f"{r['name']}.png").exists():
            lines += [
                "",
                f"  ![learning curve of {r['name']}](img/omniglot/{r['name']}.png)"
                '{ width="700" }',
                "",
            ]
    return lines


def copy_curves(runs: list[tuple[str, dict[str, Any], Path]]) -> None:
    """Each run's ``curve.png`` into the docs' images."""
    for name, _, folder in runs:
        curve = folder / "curve.png"
        if curve.exists():
            IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(curve, IMAGES / f"{name}.png")


def rewrite(page: Path, lines: list[str], begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of ``page`` with ``lines``."""
    text = page.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{page} has no {begin} ... {end} section to rewrite.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    note = "<!-- generated by benchmarks/omniglot_results.py; do not edit -->"
    body = "\n".join([note, *lines]).rstrip() + "\n"
    page.write_text(f"{head}{begin}\n{body}{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    """Rewrite the summary and the results of docs/omniglot.md (from the runs when they are
    at hand, writing the digest; otherwise from the digest)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", nargs="?", default=None, help="the runs' folder (default: runs/omniglot)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.folder is not None and not Path(args.folder).is_dir():
        parser.error(f"{args.folder} is not a folder of runs")
    folder = Path(args.folder) if args.folder else ROOT / "runs" / "omniglot"
    runs = load_runs(folder) if folder.exists() else []
    kept = json.loads(DIGEST.read_text())["runs"] if DIGEST.exists() else []
    found = {name for name, _, _ in runs}
    rows = [r for r in kept if r["name"] not in found]
    rows += [summarize(name, r, run_folder) for name, r, run_folder in runs]
    rows = sorted(rows, key=row_order)
    if runs:
        copy_curves(runs)
        DIGEST.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    source = f"{len(runs)} run(s) from {folder}, {len(rows) - len(runs)} kept from {DIGEST}"
    rewrite(PAGE, summary(rows), *SUMMARY)
    rewrite(PAGE, equal_table(rows), *EQUAL)
    rewrite(PAGE, table(rows))
    print(f"wrote {PAGE}: {source}")


if __name__ == "__main__":
    main()
