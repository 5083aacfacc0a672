"""Write the results table of docs/omniglot.md from the runs' results.json files.

    python benchmarks/omniglot_results.py [RUNS_FOLDER]   # default: runs/omniglot

Every ``results.json`` under the folder written by ``examples/omniglot.py`` gives one row;
its ``curve.png`` is copied to ``docs/img/omniglot/<run>.png`` and shown below the table. The
page is rewritten between the ``results:begin`` and ``results:end`` marker comments only;
nothing in the table is typed by hand. The published numbers next to each row come from the
papers (``PUBLISHED``), for comparison.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "omniglot.md"
IMAGES = ROOT / "docs" / "img" / "omniglot"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
METHOD_ORDER = ("maml", "fomaml", "imaml", "hyperrep")
NAMES = {
    "maml": "MAML",
    "fomaml": "first-order MAML",
    "imaml": "iMAML",
    "hyperrep": "hyper-representation",
}
UL_NAMES = {
    "reverse": "Reverse",
    "first_order": "FirstOrder",
    "implicit": "Implicit (CG)",
    "truncated": "Truncated",
}
#: Published test accuracies (%) on Omniglot with the 4-conv network, by (method, ways, shots):
#: Finn et al. (2017) Table 1 (MAML, first-order MAML); Rajeswaran et al. (2019) Table 2
#: (iMAML, GD); Franceschi et al. (2018) Table 2 (hyper-representation).
PUBLISHED = {
    "maml": {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9},
    "fomaml": {(5, 1): 98.3, (5, 5): 99.2, (20, 1): 89.4, (20, 5): 97.9},
    "imaml": {(5, 1): 99.16, (5, 5): 99.67, (20, 1): 94.46, (20, 5): 98.69},
    "hyperrep": {(5, 1): 98.6, (5, 5): 99.5, (20, 1): 95.5, (20, 5): 98.4},
}
#: Figures not yet checked against the paper (written from memory, no copy at hand offline).
UNVERIFIED = {"hyperrep"}


def published_text(method: str, published: float | None) -> str:
    """The published figure for the table, flagged when it is not verified."""
    if published is None:
        return "–"
    return f"{published} (unverified)" if method in UNVERIFIED else str(published)


def load_runs(folder: Path) -> list[tuple[str, dict[str, Any], Path]]:
    """``(run name, results, run folder)`` for every results.json under ``folder``."""
    runs = []
    for path in sorted(folder.rglob("results.json")):
        results = json.loads(path.read_text())
        if results.get("experiment") != "omniglot":
            continue
        name = path.parent.relative_to(folder).as_posix().replace("/", "-")
        runs.append((name, results, path.parent))

    def order(run: tuple[str, dict[str, Any], Path]) -> tuple:
        r = run[1]
        method = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99
        return (r["ways"], r["shots"], method, r["ul_method"], run[0])

    return sorted(runs, key=order)


def setting(r: dict[str, Any]) -> str:
    """The task shape and the main settings of a run."""
    s = r["settings"]
    parts = [
        f"{r['ways']}-way {r['shots']}-shot",
        f"{s['hidden']} filters",
        f"{s['inner_steps']} inner step{'s' if s['inner_steps'] > 1 else ''} (lr {s['inner_lr']})",
        f"meta-batch {s['meta_batch']}, {s['query']} queries/class, Adam {s['meta_lr']}",
    ]
    if r["method"] == "imaml":
        parts.append(f"reg {s['reg']}, CG {s['cg_steps']}")
    if r["ul_method"] == "truncated":
        parts.append(f"K={s['truncate']}")
    if r["method"] == "hyperrep" and s.get("head_l2"):
        parts.append(f"head L2 {s['head_l2']}")
    if s["eval_inner_steps"] != s["inner_steps"]:
        parts.append(f"{s['eval_inner_steps']} steps at test")
    return "; ".join(parts)


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


def table(runs: list[tuple[str, dict[str, Any], Path]]) -> list[str]:
    """The Markdown results table and the learning curves."""
    if not runs:
        return ["No runs yet: run `examples/omniglot.py` with `--out runs/omniglot/<name>`."]
    lines = [
        "| run | method (hypergradient) | setting | test accuracy (%) | published (%) | "
        "meta-steps | wall time (min) | CPU time (min) | s / meta-step | hardware |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r, _ in runs:
        published = PUBLISHED.get(r["method"], {}).get((r["ways"], r["shots"]))
        accuracy = (
            f"**{100 * r['test_accuracy']:.2f} ± {100 * r['test_ci95']:.2f}** "
            f"({r['test_tasks']} tasks)"
        )
        cpu = r.get("train_cpu_seconds")
        hardware = r["hardware"]
        if r.get("cpu_count") and r.get("device") == "cpu":
            hardware += f"; {r['cpu_count']} CPU cores"
        lines.append(
            f"| `{name}` | {NAMES.get(r['method'], r['method'])} "
            f"({UL_NAMES.get(r['ul_method'], r['ul_method'])}) | {setting(r)} | {accuracy} | "
            f"{published_text(r['method'], published)} | {r['meta_steps']:,} | "
            f"{minutes(r['train_seconds'])} | {'–' if cpu is None else minutes(cpu)} | "
            f"{r['seconds_per_meta_step']:.2f} | {hardware} |"
        )
    lines += [
        "",
        "Test accuracy: mean over the meta-test tasks with its 95% confidence interval "
        "(1.96 · std / √n), of the model with the best meta-validation accuracy "
        "(at the meta-step given below). Wall time: meta-training including the periodic "
        "validation, on a machine shared with other jobs; CPU time: the process's own.",
        "",
    ]
    for name, r, folder in runs:
        curve = folder / "curve.png"
        full_hours = 60000 * r["seconds_per_meta_step"] / 3600
        line = (
            f"- `{name}`: best validation accuracy {100 * (r['best_val_accuracy'] or 0):.2f}% "
            f"at meta-step {r['best_step']:,} of {r['meta_steps']:,}; test evaluation "
            f"{r['eval_seconds']:.0f} s. At its pace (these settings, this hardware), the "
            f"papers' 60,000 meta-steps would take {full_hours:.0f} h."
        )
        cg = cg_breakdowns(folder)
        if cg is not None:
            line += (
                f" CG met non-positive curvature on {cg[0]} of {cg[1]} sampled tasks (the last"
                " task of each logged meta-step)."
            )
        lines.append(line)
        if curve.exists():
            IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(curve, IMAGES / f"{name}.png")
            lines += ["", f"  ![learning curve of {name}](img/omniglot/{name}.png)", ""]
    return lines


def rewrite(page: Path, lines: list[str]) -> None:
    """Replace the text between the markers of ``page`` with ``lines``."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page} has no {BEGIN} ... {END} section to rewrite.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    note = "<!-- generated by benchmarks/omniglot_results.py from runs/omniglot; do not edit -->"
    body = "\n".join([note, *lines]).rstrip() + "\n"
    page.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    """Rewrite the results section of docs/omniglot.md."""
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else ROOT / "runs" / "omniglot"
    runs = load_runs(folder)
    rewrite(PAGE, table(runs))
    print(f"wrote {len(runs)} run(s) from {folder} to {PAGE}")


if __name__ == "__main__":
    main()
