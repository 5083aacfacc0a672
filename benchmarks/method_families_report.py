"""Write docs/method_families.md and its figures from the results of ``method_families.py``.

    python benchmarks/method_families_report.py [RESULTS_JSON]
    # default: benchmarks/results/method_families.json

Everything on the page comes from the JSON file: the tables, the figures, the machine, the
date, the command, the targets met or missed, and where a BOAT operation is faster, more
accurate (however little) or uses less memory than ours. Table cells and helpers are
``report.py``'s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from argtypes import existing_file  # noqa: E402
from common import RESULTS, ROOT, code_revision  # noqa: E402
from report import (  # noqa: E402
    FIG_DPI,
    FIG_WIDTH,
    PAGE_PX,
    Results,
    cell_time,
    heap_of_timings,
    mib,
    portable,
    sci,
)

SOURCE = RESULTS / "method_families.json"
PAGE = ROOT / "docs" / "method_families.md"
IMAGES = ROOT / "docs" / "img" / "method_families"
IMPLS = ("bilevel", "boat", "floor")
IMPL_NAMES = {"bilevel": "bilevel", "boat": "BOAT", "floor": "torch floor"}
TARGET_FLOOR = 1.1
#: two float64 relative errors closer than this differ by round-off, not by the method
ROUND_OFF = 1e-12
#: ours against the floor across processes and inside one (benchmarks/process_check.py)
PROCESS_CHECK = HERE / "results" / "method_families_process_check.json"
STEP_BUDGET = HERE / "results" / "darts_step_budget.json"
FLOOR_TARGETS = {"bda": "BDA", "ptt": "PTT", "fd": "DARTS"}
NAMES = {
    "reverse": "Reverse",
    "truncated": "Truncated",
    "cg": "Implicit CG",
    "neumann": "Implicit Neumann",
    "fixed_point": "Implicit fixed point",
    "minres": "Implicit MINRES",
    "normal_cg": "Implicit normal CG",
    "forward": "Forward",
    "memory_saving_reverse": "MemorySavingReverse",
    "ptt": "PTT",
    "ptt_interior": "PTT, k* inside the run",
    "fd": "FiniteDifference (DARTS)",
    "iga": "IGA",
    "bda": "BDA + Reverse",
    "fixed_point_map": "FixedPointMap + Implicit",
    "reverse_di": "Reverse + learned LL start (DI)",
    "stochastic_implicit": "StochasticImplicit",
    "dm": "DM",
    "soba": "SOBA",
    "saba": "SABA",
    "stocbio": "StocBiO",
    "amigo": "AmIGO",
    "bome": "BOME",
    "pbgd": "PBGD",
    "bvfim": "BVFIM",
    "meso": "MESO",
    "gaffo": "GAFFO",
    "f2sa": "F2SA",
    "first_order": "FirstOrder (first-order MAML)",
    "reptile": "Reptile",
}
# BOAT 1.1.1's operations for each method (impl_boat_families.py builds them)
BOAT_OPS = {
    "reverse": "NGD + RAD",
    "truncated": "NGD + RAD + RGT",
    "cg": "NGD + CG",
    "neumann": "NGD + NS",
    "ptt": "NGD + PTT + RAD",
    "ptt_interior": "NGD (SGD with momentum) + PTT + RAD",
    "fd": "NGD + FD",
    "iga": "NGD + IGA",
    "bda": "NGD + GDA + RAD",
    "reverse_di": "NGD + DI + RAD",
    "dm": "DM + CG",
    "bome": "VFO",
    "pbgd": "PGDO",
    "bvfim": "VSO",
    "meso": "MESO",
    "first_order": "FOA + IAD + RAD",
}
# BOAT's first-order operations are other algorithms than ours in their details: they are not
# counted among the comparisons of the same operation (the targets), but told apart
NOT_STEP_FOR_STEP = {"bome", "pbgd", "bvfim", "meso"}
PROBLEMS = {
    "ridge": "ridge regression, 20 per-feature L2 penalties",
    "logistic": "logistic regression, 100 per-feature L2 penalties",
    "mnist": "MNIST data hyper-cleaning",
    "meta": "Omniglot-shaped meta-step",
}


AHEAD = "Where BOAT is faster, more accurate or uses less memory"
AHEAD_ANCHOR = "where-boat-is-faster-more-accurate-or-uses-less-memory"


def boat_better(pair: tuple[str, dict, float, float, bool]) -> bool:
    """Whether BOAT's side of an ``accuracy_pairs`` entry is strictly better than ours."""
    what, _, ours, boat, _ = pair
    return boat < ours if what == "error" else boat > ours


def setting(c: dict[str, Any]) -> str:
    """The configuration's parameters, e.g. ``T=200, K=10``."""
    keys = ("T", "K", "k", "r", "start", "momentum", "minibatch", "warm", "alpha", "decay")
    keys += ("batch",)
    return ", ".join(f"{k}={c[k]}" for k in keys if k in c)


def name(c: dict[str, Any]) -> str:
    """The method's name; DARTS with one LL step is told apart from DARTS after T steps."""
    if c["method"] == "fd" and c.get("T") == 1:
        return "DARTS, one LL step"
    return NAMES[c["method"]]


def label(c: dict[str, Any]) -> str:
    """The method and its setting in one cell."""
    return f"{NAMES[c['method']]}<br><small>{setting(c)}</small>"


def table(head: list[str], rows: list[list[str]], align: str = "--:") -> list[str]:
    """A Markdown table, the first column left-aligned."""
    lines = ["| " + " | ".join(head) + " |", "|---|" + f"{align}|" * (len(head) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def fmt(x: float | None, digits: str = ".2f") -> str:
    return "–" if x is None else format(x, digits)


def moment(date: str) -> datetime.datetime:
    """A recorded date (ISO 8601, or ``YYYY-MM-DD HH:MM UTC``) as an aware datetime, UTC
    when it names no zone."""
    when = datetime.datetime.fromisoformat(date.removesuffix(" UTC"))
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def process_cells() -> tuple[dict[tuple[str, str], dict[str, Any]], str, str]:
    """What ``benchmarks/process_check.py`` measured, by ``(method, problem)``, its command
    and date, and its date as recorded (all empty when it has not been run)."""
    if not PROCESS_CHECK.exists():
        return {}, "", ""
    check = json.loads(PROCESS_CHECK.read_text())
    cells = {(c["method"], c["problem"]): c for c in check["cells"]}
    cpu = f", on {check['cpu']}" if check.get("cpu") else ""
    code = code_revision(check.get("git"))
    where = f"`{check['command']}`, {check['date']}{cpu}{', ' + code if code else ''}"
    return cells, where, check["date"]


def check_key(c: dict[str, Any]) -> str:
    """The method's name in process_check's cells (one-step DARTS has its own)."""
    return "fd_one_step" if c["method"] == "fd" and c.get("T") == 1 else c["method"]


def step_budget() -> str:
    """What ``benchmarks/darts_step_budget.py`` found of one-step DARTS' fixed cost: the
    checks' share and the rest (a sentence; empty when it has not been run)."""
    if not STEP_BUDGET.exists():
        return ""
    budget = json.loads(STEP_BUDGET.read_text())
    cells = budget["cells"]
    ratios = sorted(f"{c['over_floor']['checked']:.2f}" for c in cells)
    span = ratios[0] if ratios[0] == ratios[-1] else f"{ratios[0]}-{ratios[-1]}"
    within = max(c["over_floor"]["checked"] for c in cells) <= TARGET_FLOOR
    checks = sorted(c["checks_us"] for c in cells)
    rest = sorted(c["rest_us"] for c in cells)
    runner = sorted(c["runner_us"] for c in cells)
    code = code_revision(budget.get("git"))
    where = f"`{budget['command']}`, {budget['date']}, on {budget['cpu']}"
    return (
        f" Split by `benchmarks/darts_step_budget.py` ({where}{', ' + code if code else ''}), "
        "which alternates ours, the floor and the floor with the library's safety work "
        "written inline (the objectives called on a state dict, the generators kept and the "
        "LL step's draws replayed, the NaN checks of the LL loss, UL loss and hypergradient, "
        "the radius checked against round-off) in one process: the checks cost "
        f"{value_range(checks)} µs per UL step, and that checked floor runs at "
        f"{span}x of the floor, {'within' if within else 'above'} {TARGET_FLOOR}x; the "
        f"other {value_range(rest)} µs are the library passing the step through its runner, "
        "LL run and method (Python frames that cost a few µs each between torch's operations "
        f"on this machine), not its checks; of them, {value_range(runner)} µs are the "
        "runner's (`BilevelProblem.step` against the method's `task_gradients` called "
        "directly)."
    )


def value_range(values: list[float]) -> str:
    """``"a-b"`` for the smallest and largest of ``values`` (sorted), or the one value."""
    low, high = f"{values[0]:.0f}", f"{values[-1]:.0f}"
    return low if low == high else f"{low}-{high}"


class Page:
    """The results, and what the page says about them."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data, self.res = data, Results(data)

    def configs(self, suite: str, problem: str | None = None) -> list[dict]:
        found = self.res.configs.get(suite, [])
        return [c for c in found if problem is None or c["problem"] == problem]

    def error(self, c: dict, impl: str, field: str = "error_exact") -> float | None:
        record = self.res.get("error", c, impl)
        return None if record is None else record.get(field)

    def final(self, c: dict, impl: str) -> dict | None:
        record = self.res.get("error", c, impl)
        return None if record is None else record.get("final")

    def memory(self, c: dict, impl: str) -> float | None:
        record = self.res.get("memory", c, impl)
        return None if record is None else record.get("bytes")

    # ------------------------------------------------------------------ comparisons

    def accuracy_pairs(
        self, family: bool | None = False
    ) -> list[tuple[str, dict, float, float, bool]]:
        """(what, config, ours, BOAT's, ours at least as accurate) for every shared op:
        error against the exact hypergradient (lower is better; equal to round-off counts as
        equal) and hyper-cleaning test accuracy (higher is better). ``family``: instead, the
        methods whose BOAT operation is another algorithm of the same family
        (``NOT_STEP_FOR_STEP``), which the same-operation counts leave out; ``None``: all."""
        pairs = []
        for c in self.configs("regression"):
            ours, boat = self.error(c, "bilevel"), self.error(c, "boat")
            if ours is not None and boat is not None:
                ok = ours <= boat * 1.01 or ours <= 1e-12
                pairs.append(("error", c, ours, boat, ok))
        for c in self.configs("training"):
            ours, boat = self.final(c, "bilevel"), self.final(c, "boat")
            if ours and boat:
                a, b = ours["test_accuracy"], boat["test_accuracy"]
                pairs.append(("test accuracy", c, a, b, a >= b - 1e-4))
        return [p for p in pairs if family in (None, p[1]["method"] in NOT_STEP_FOR_STEP)]

    def time_pairs(self, other: str, family: bool | None = False) -> list[tuple[dict, float]]:
        """(config, ours / other's median time per UL step) for every config both timed of
        the same operation (``family``: of another algorithm of the same family; ``None``:
        all)."""
        out = []
        for suite in ("regression", "cleaning", "meta"):
            for c in self.configs(suite):
                r = ratio(self.res.median(c, "bilevel"), self.res.median(c, other))
                if r is not None and family in (None, c["method"] in NOT_STEP_FOR_STEP):
                    out.append((c, r))
        return out

    def family_note(self) -> str:
        """How ours compares with BOAT's first-order operations of the same family (other
        algorithms), which the same-operation counts leave out; empty where none ran."""
        acc, times = self.accuracy_pairs(family=True), self.time_pairs("boat", family=True)
        if not acc and not times:
            return ""
        methods = sorted({p[1]["method"] for p in acc} | {c["method"] for c, _ in times})
        text = (
            f"BOAT's operations for {', '.join(NAMES[m] for m in methods)} are other "
            "algorithms of the same family, not counted above"
        )
        if acc:
            text += (
                f"; ours is at least as accurate in {sum(p[4] for p in acc)} of {len(acc)} of them"
            )
        if times:
            low, high = min(r for _, r in times), max(r for _, r in times)
            spread = f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}–{high:.2f}"
            text += f", and its time per UL step is {spread} times BOAT's"
        return text + "."

    # ------------------------------------------------------------------ sections

    def takeaways(self) -> list[str]:
        d, m = self.data, self.data["machine"]
        lines = ["## What to take away", ""]
        lines += self.which_method()
        best = sorted(
            (
                (f["test_accuracy"], c["method"])
                for c in self.configs("training")
                if (f := self.final(c, "bilevel"))
            ),
            reverse=True,
        )[:3]
        if best:
            start = self.final_start()
            lines.append(
                f"- **Hyper-cleaning** on MNIST ({self.cleaning_size()}; {self.ul_steps()} UL "
                "steps): "
                "the best test accuracy is reached by "
                + ", ".join(f"`{NAMES[m]}` {100 * a:.2f}%" for a, m in best)
                + (f" (from {100 * start:.2f}% with every weight 0.5)." if start else ".")
            )
        pairs = self.accuracy_pairs()
        worse = [p for p in pairs if not p[4]]
        closer = [p for p in pairs if p[4] and boat_better(p)]
        round_off = [p for p in closer if p[0] == "error" and p[2] - p[3] <= ROUND_OFF]
        by = "by round-off" if len(round_off) == len(closer) else "by round-off or under 1%"
        lines.append(
            f"- **Accuracy against BOAT.** On {len(pairs)} comparisons of the same operation "
            f"(hypergradient error on ridge and logistic, test accuracy after hyper-cleaning), "
            f"ours is at least as accurate in {len(pairs) - len(worse)}"
            + (
                ", counting a difference of round-off or under 1% as equal; in "
                f"{len(closer)} of them BOAT's answer is closer {by}"
                if closer
                else ""
            )
            + (
                "; BOAT is more accurate in " + ", ".join(self.pair_text(p) for p in worse)
                if worse
                else ""
            )
            + (f" (see [where BOAT is ahead](#{AHEAD_ANCHOR}))." if worse or closer else ".")
        )
        family = self.family_note()
        boat = self.time_pairs("boat")
        if boat:
            values = [r for _, r in boat]
            slower = [c for c, r in boat if r >= 1]
            lines.append(
                f"- **Speed against BOAT.** Time per UL step, ours ÷ BOAT's: median "
                f"{statistics.median(values):.2f} (range {min(values):.2f}–{max(values):.2f}) "
                f"over {len(values)} configurations of the same operation; ours is slower in "
                f"{len(slower)}." + (f" {family}" if family else "")
            )
        floor = self.floor_targets()
        if floor:
            worst = max(floor, key=lambda x: x[1])
            met = sum(r <= TARGET_FLOOR for _, r in floor)
            lines.append(
                f"- **Against the hand-written loop** (BDA, PTT, DARTS): within "
                f"{TARGET_FLOOR}x in {met} of {len(floor)} configurations; the largest ratio "
                f"is {worst[1]:.2f} ({name(worst[0])}, {worst[0]['problem']})."
            )
        lines += self.memory_takeaway()
        for note in d.get("remeasured", []):
            shown = {**NAMES, "fd_one_step": "DARTS with one LL step"}
            methods = ", ".join(shown.get(x, x) for x in note.get("methods") or []) or "some"
            lines.append(
                f"- **Re-measured.** The rows of {methods} were measured again on "
                f"{note['date'][:10]} (load average {note['loadavg_start'][0]:.1f} at the start, "
                f"{note['duration_s'] / 60:.1f} minutes"
                + (f", checkout {note['git']['commit']}" if note.get("git") else "")
                + "), all implementations alternated in "
                "that run; the other rows are from the full run below."
            )
        cores = f"{m['cores']} cores" if m.get("cores") else "CPU"
        load = d.get("loadavg_start", [None])[0]
        lines.append(
            f"- **Machine.** {m['cpu']}, {cores} shared with other jobs (load average "
            f"{load:.1f} at the start), {d['threads']} torch thread per process, torch "
            f"{m['torch']}, BOAT {d['versions'].get('boat', 'not run')}; measured on "
            f"{d['date'][:10]} with the code of checkout {d['git']['commit']}"
            + (" (with local changes)" if d["git"].get("dirty") else "")
            + f", the run took {d['duration_s'] / 60:.1f} minutes."
        )
        return [*lines, ""]

    def which_method(self) -> list[str]:
        """The methods exact to 1e-6 on logistic regression, from scratch at every UL step or
        after warm-up (stateful), and the fastest of the first group."""
        configs = self.configs("regression", "logistic")
        exact = [c for c in configs if (self.error(c, "bilevel") or 1) < 1e-6]
        fresh = [c for c in exact if "warm" not in c]
        warm = [c for c in exact if "warm" in c]
        if not exact:
            return []
        line = "- **Which method.** At a converged LL (logistic regression, T = 100)"
        if fresh:
            fastest = min(fresh, key=lambda c: self.res.median(c, "bilevel") or float("inf"))
            line += (
                ", computed afresh at every UL step, "
                + ", ".join(f"`{name(c)}` ({sci(self.error(c, 'bilevel'))})" for c in fresh)
                + " give the exact hypergradient to better than 1e-6; the fastest is "
                f"`{name(fastest)}` at {self.res.median(fastest, 'bilevel') * 1e3:.3g} ms per "
                "UL step"
            )
        if warm:
            line += (
                "; keeping their state across UL steps, "
                + ", ".join(f"`{name(c)}`" for c in warm)
                + f" reach it after {warm[0]['warm']} cheap UL steps at a fixed UL point"
            )
        return [line + "."]

    def memory_takeaway(self) -> list[str]:
        """MemorySavingReverse against Reverse, where both were measured."""
        parts = []
        for suite, problem in (("cleaning", "mnist"), ("meta", "meta")):
            by_method = {
                c["method"]: self.memory(c, "bilevel") for c in self.configs(suite, problem)
            }
            full, saving = by_method.get("reverse"), by_method.get("memory_saving_reverse")
            if full and saving:
                parts.append(f"{mib(saving)} MiB vs {mib(full)} MiB on the {PROBLEMS[problem]}")
        if not parts:
            return []
        return [
            "- **Memory.** `MemorySavingReverse` against `Reverse`, peak above the baseline: "
            + "; ".join(parts)
            + " (the saving grows with the number of LL steps: see the [methods page]"
            "(methods.md#memory-saving-reverse-mode))."
        ]

    def pair_text(self, p: tuple) -> str:
        what, c, ours, boat, _ = p
        if what == "error":
            return f"{name(c)} on {c['problem']} ({sci(ours)} vs {sci(boat)})"
        return f"{NAMES[c['method']]} on hyper-cleaning ({100 * ours:.2f}% vs {100 * boat:.2f}%)"

    def measured_on(self, method: str) -> datetime.datetime:
        """When ``method``'s rows were last measured: the full run's start, or the latest
        re-measurement that named it."""
        notes = self.data.get("remeasured", [])
        dates = [n["date"] for n in notes if method in (n.get("methods") or [method])]
        return max(map(moment, [self.data["date"], *dates]))

    def floor_targets(self) -> list[tuple[dict, float]]:
        """ours / floor for the methods of the issue's 1.1x target."""
        return [(c, r) for c, r in self.time_pairs("floor") if c["method"] in FLOOR_TARGETS]

    def targets(self) -> list[str]:
        pairs = self.accuracy_pairs()
        worse = [p for p in pairs if not p[4]]
        boat = self.time_pairs("boat")
        slower = [(c, r) for c, r in boat if r >= 1]
        floor = self.floor_targets()
        over = [(c, r) for c, r in floor if r > TARGET_FLOOR]

        def where(items: list[tuple[dict, float]]) -> str:
            return ", ".join(f"{name(c)} on {c['problem']} ({r:.2f})" for c, r in items)

        rows = [
            [
                "every method at least as accurate as BOAT's equivalent op",
                f"{len(pairs) - len(worse)} of {len(pairs)}",
                ", ".join(self.pair_text(p) for p in worse) or "met everywhere",
            ],
            [
                "time per UL step below BOAT's on every shared op",
                f"{len(boat) - len(slower)} of {len(boat)}",
                ("slower: " + where(slower)) if slower else "met everywhere",
            ],
            [
                f"within {TARGET_FLOOR}x of a hand-written torch loop for BDA, PTT and DARTS",
                f"{len(floor) - len(over)} of {len(floor)}",
                ("over: " + where(over)) if over else "met everywhere",
            ],
        ]
        out = ["## The issue's targets", "", *table(["target", "met", "where not"], rows, "---")]
        family = self.family_note()
        return out + ([family, ""] if family else []) + self.over_notes(over)

    def over_notes(self, over: list[tuple[dict, float]]) -> list[str]:
        """The cells above the floor target, timed again with ours and the floor in one
        process (``benchmarks/process_check.py``): is it the library or the process?"""
        if not over:
            return []
        checked, source, taken = process_cells()
        lines, library, process, fixed_us, floor_ms = [], [], [], [], []
        per_step: list[tuple[float, float]] = []  # PTT: ours' extra and the floor, per LL step
        for c, r in over:
            cell = checked.get((check_key(c), c["problem"]))
            text = f"{name(c)} on {c['problem']}: {r:.2f} with each in its own process"
            if cell is None:
                lines.append(f"- {text} (not re-measured in one process).")
                continue
            if moment(taken) < self.measured_on(c["method"]):
                lines.append(
                    f"- {text} (re-measured in one process on {taken}, before this "
                    "measurement: not quoted)."
                )
                continue
            one = cell["one_process"]
            (library if one > TARGET_FLOOR else process).append(f"{name(c)} on {c['problem']}")
            seconds = cell["seconds"]
            extra = seconds["both:bilevel"] - seconds["both:floor"]
            if check_key(c) == "fd_one_step" and one > TARGET_FLOOR:
                fixed_us.append(extra * 1e6)
                floor_ms.append(seconds["both:floor"] * 1e3)
            if check_key(c) == "ptt" and one > TARGET_FLOOR:  # per LL step
                per_step.append((extra * 1e6 / c["T"], seconds["both:floor"] * 1e6 / c["T"]))
            lines.append(
                f"- {text}; {cell['across_processes']:.2f} across processes and **{one:.2f} "
                f"in one process** when re-timed alternately (at least {cell['samples']} UL "
                f"steps each, load {cell['load_average']:.1f}; "
                f"{seconds['both:floor'] * 1e3:.3g} ms per UL step for the floor, "
                f"{extra * 1e6:+.0f} µs for ours)."
            )
        intro = (
            "Each implementation runs in its own worker process, and on this shared 2-core "
            "machine the same code runs at different speeds in different processes. The cells "
            f"above {TARGET_FLOOR}x were timed again with ours and the floor alternated, both "
            f"across processes and inside one ({source or 'not run'}):"
        )
        out = ["", intro, "", *lines, ""]
        if process:
            out.append(
                f"In one process {', '.join(process)} {'is' if len(process) == 1 else 'are'} "
                f"within {TARGET_FLOOR}x: the difference is the process, not the library."
            )
        if library:
            cost = ""
            if fixed_us:
                low, high = min(fixed_us), max(fixed_us)
                spread = f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"
                cost = (
                    f" For one-step DARTS it is a fixed cost of {spread} µs per UL step (the "
                    "runner, the LL run with its state dict, patched module and trajectory, the "
                    "method, and the checks they make on the way), next "
                    f"to a floor of {min(floor_ms):.2g}-{max(floor_ms):.2g} ms of torch work: a "
                    "UL step of "
                    f"{high / (TARGET_FLOOR - 1) / 1e3:.2g} ms or more would hide it within "
                    f"{TARGET_FLOOR}x, and longer LL runs spread it over their steps (DARTS "
                    "with 100-200 LL steps above)."
                ) + step_budget()
            if per_step:
                extras = sorted(e for e, _ in per_step)
                floors = sorted(f for _, f in per_step)
                cost += (
                    f" For PTT it is {value_range(extras)} µs per LL step (each step's and each "
                    "iterate's objective read through the state dict and the patched module, "
                    "with the iterate's weights installed, and the LL run's records and checks "
                    f"at every step), next to {value_range(floors)} µs of torch work per LL step "
                    "for the floor."
                )
            out.append(
                f"{', '.join(library)} {'stays' if len(library) == 1 else 'stay'} above "
                f"{TARGET_FLOOR}x in one process: that cost is the library's.{cost}"
            )
        return [*out, ""]

    def accuracy(self) -> list[str]:
        out = [
            "## Hypergradient error",
            "",
            "Relative error $\\|g - g^*\\| / \\|g^*\\|$ against the exact hypergradient $g^*$ at "
            "the LL minimizer (implicit function theorem, float64; the cosine below it), at the "
            "initial UL point. Methods that keep state across UL steps first take `warm` UL "
            "steps with the UL point held fixed.",
            "",
        ]
        for problem in ("ridge", "logistic"):
            configs = self.configs("regression", problem)
            if not configs:
                continue
            rows = [[label(c), *(self.error_cell(c, i) for i in IMPLS)] for c in configs]
            out += [f"**{PROBLEMS[problem]}**", ""]
            out += table(["method", *(IMPL_NAMES[i] for i in IMPLS)], rows)
        targeted = [c for c in self.configs("regression", "ridge") if self.has_target(c)]
        if targeted:
            out += [
                "**What each computes, exactly** (ridge): relative error against the exact "
                "value of the method's own definition, from dense float64 algebra: the T-step "
                "unrolled hypergradient (Reverse, Forward, MemorySavingReverse, DI with the "
                "gradient for the start), the last K steps (Truncated), the pessimistic "
                "iterate's (PTT), one step from the last iterate (DARTS, exact up to $O(r^2)$), "
                "the BDA recursion, the IGA formula.",
                "",
            ]
            rows = [
                [label(c), *(self.error_cell(c, i, "error_target") for i in IMPLS)]
                for c in targeted
            ]
            out += table(["method", *(IMPL_NAMES[i] for i in IMPLS)], rows)
        return out + self.pessimistic()

    def pessimistic(self) -> list[str]:
        """PTT's truncation step ``k*`` as each side picked it, against the float64
        reference's, and each side's error against the exact hypergradient through ``k*``
        steps; empty where no PTT cell recorded its ``k*``."""
        cells = [
            (c, {i: r for i in IMPLS if (r := self.res.get("error", c, i)) and "ptt_step" in r})
            for c in self.configs("regression")
        ]
        cells = [(c, records) for c, records in cells if records]
        if not cells:
            return []
        rows, differ, errors = [], [], {i: [] for i in IMPLS}
        for c, records in cells:
            exact = next(iter(records.values()))["ptt_step_exact"]
            row = [f"{label(c)}<br><small>{c['problem']}</small>", f"{exact} of {c['T']}"]
            for i in IMPLS:
                r = records.get(i)
                if r is None:
                    row.append("–")
                    continue
                if r["ptt_step"] != exact:
                    differ.append(f"{IMPL_NAMES[i]} k* = {r['ptt_step']} on {c['problem']}")
                errors[i].append(r["error_target"])
                row.append(f"{r['ptt_step']}<br><small>{sci(r['error_target'])}</small>")
            rows.append(row)
        sides = [i for i in IMPLS if errors[i]]
        agree = (
            f"all {len(sides)} sides pick the reference's k* in every cell"
            if not differ
            else "they do not all pick the reference's k*: " + ", ".join(differ)
        )
        largest = ", ".join(f"{IMPL_NAMES[i]} {sci(max(errors[i]))}" for i in sides)
        first = {r["ptt_step"] for c, rs in cells if c["method"] == "ptt" for r in rs.values()}
        falling = (
            "Started at a GD iterate (the PTT rows above) the UL loss falls along the LL run: "
            "every side picks $k^* = 1$, so those rows measure a one-step hypergradient. "
            if first == {1}
            else ""
        )
        out = [
            "**PTT's truncation step.** PTT back-propagates from the LL iterate $k^*$ with the "
            f"largest UL loss. {falling}*PTT, k\\* inside the run* starts the LL at the UL "
            "loss's minimizer with heavy-ball steps (`torch.optim.SGD`'s momentum): the UL loss "
            "rises, peaks where the LL overshoots its solution, and falls as it settles. Below, "
            "the $k^*$ each side picked (the reference: the float64 UL losses along a dense "
            "unroll) and its relative error against the exact hypergradient through $k^*$ steps "
            f"(a float64 unroll, on ridge and logistic): {agree}, and the largest errors are "
            f"{largest}.",
            "",
        ]
        head = ["method", "reference k*", *(IMPL_NAMES[i] for i in IMPLS)]
        return out + table(head, rows)

    def has_target(self, c: dict) -> bool:
        return any(self.error(c, i, "error_target") is not None for i in IMPLS)

    def error_cell(self, c: dict, impl: str, field: str = "error_exact") -> str:
        record = self.res.get("error", c, impl)
        if record is None:
            return "–"
        if field not in record:
            return "fails" if "failed" in record else "–"
        cos = record.get(field.replace("error", "cosine"))
        below = f"<br><small>cos {cos:.3f}</small>" if cos is not None else ""
        if self.zero_answer(c, impl):  # (its direction, and so its cosine, is round-off's)
            below = f"<br><small>zero: norm {sci(record['norm'])}</small>"
        return f"{sci(record[field])}{below}"

    def zero_answer(self, c: dict, impl: str) -> bool:
        """Whether ``impl``'s hypergradient on ``c`` is zero to round-off: a norm below
        1e-12 times the largest of the implementations' answers."""
        norms = [r["norm"] for i in IMPLS if (r := self.res.get("error", c, i)) and "norm" in r]
        own = self.res.get("error", c, impl) or {}
        return "norm" in own and own["norm"] < 1e-12 * max(norms)

    def cleaning(self) -> list[str]:
        configs = self.configs("training")
        if not configs:
            return []
        s = self.data["settings"]["cleaning"]
        out = [
            "## Data hyper-cleaning on MNIST",
            "",
            f"{self.cleaning_size()}; a linear softmax classifier trained by {s['T']} GD steps "
            f"(step {s['lr']}) on the example-weighted loss; {s['ul_steps']} UL steps of Adam "
            f"(step {s['ul_lr']}) on the example logits. After the UL steps a fresh LL run at "
            "the learned weights is evaluated: test accuracy (all 10,000 test images), and in "
            "small type the F1 of the examples with weight below 0.5 as a detector of the "
            "corrupted ones and the validation loss (the UL objective).",
            "",
        ]
        rows = []
        for c in configs:
            cells = []
            for impl in IMPLS:
                f = self.final(c, impl)
                record = self.res.get("error", c, impl)
                if f is None:
                    cells.append("fails" if record and "failed" in record else "–")
                    continue
                stop = " (stopped)" if record.get("failed_at") else ""
                small = f"F1 {f['f1']:.3f}, loss {f['ul_objective']:.3f}{stop}"
                cells.append(f"{100 * f['test_accuracy']:.2f}%<br><small>{small}</small>")
            rows.append([label(c), *cells])
        out += table(["method", *(IMPL_NAMES[i] for i in IMPLS)], rows)
        stopped = [
            (c, impl, r["failed_at"])
            for c in configs
            for impl in IMPLS
            if (r := self.res.get("error", c, impl)) and r.get("failed_at")
        ]
        for c, impl, why in stopped:
            out.append(f"- {NAMES[c['method']]} ({IMPL_NAMES[impl]}) stopped at {why}")
        if stopped:
            out.append("")
        if any(c["method"] in NOT_STEP_FOR_STEP for c in configs):
            out += [
                "BOAT's VFO, PGDO, VSO and MESO are the operations BOAT offers for BOME, PBGD, "
                "BVFIM and MESO; their details differ from ours (see the [methods page]"
                "(methods.md#first-order-hessian-free-methods)), so those rows compare two "
                "algorithms of the same family with the same step sizes, not one algorithm. "
                "The single-loop methods (DM, SOBA, SABA, MESO, GAFFO) move the LL by one step "
                "per UL step and are made for many cheap UL steps, not for the "
                f"{s['ul_steps']} steps here.",
                "",
            ]
        return out

    def times(self) -> list[str]:
        out = [
            "## Time per UL step",
            "",
            "Milliseconds per UL step, median over the repeats (the range below it), one torch "
            "thread; then ours divided by BOAT's and by the hand-written floor's.",
            "",
        ]
        for suite, problem in (
            ("regression", "ridge"),
            ("regression", "logistic"),
            ("cleaning", "mnist"),
            ("meta", "meta"),
        ):
            configs = [c for c in self.configs(suite, problem) if self.res.median(c, "bilevel")]
            if not configs:
                continue
            rows = []
            for c in configs:
                ours = self.res.median(c, "bilevel")
                cells = [cell_time(self.res.get("time", c, i)) for i in IMPLS]
                ratios = [fmt(ratio(ours, self.res.median(c, i))) for i in ("boat", "floor")]
                rows.append([label(c), *cells, *ratios])
            head = ["method", *(IMPL_NAMES[i] for i in IMPLS), "÷ BOAT", "÷ floor"]
            out += [f"**{PROBLEMS[problem]}**", "", *table(head, rows)]
        return out + self.floor_notes()

    def floor_notes(self) -> list[str]:
        """What the hand-written floors of BDA, PTT and DARTS do, and how they were timed."""
        rounds = max(self.data.get("target_rounds") or 0, self.data.get("rounds") or 0)
        one_step = [
            (c, self.res.median(c, "floor"))
            for c in self.configs("regression")
            if c["method"] == "fd" and c.get("T") == 1 and self.res.median(c, "floor")
        ]
        lines = [
            "The floors of BDA, PTT and DARTS (`benchmarks/impl_floor_families.py`) do the same "
            "work as ours: the same LL steps, gradient evaluations and UL evaluations (PTT: the "
            "UL loss at every iterate without a graph, then one backward pass from the worst; "
            "DARTS: the LL steps without a graph, one UL gradient and two LL gradients in the "
            "UL variables only). What they leave out is what the library adds for safety: the "
            "checks of the arguments and of the objectives' results, the LL loss of every step "
            "with its NaN and growth check, the finite checks of the UL loss and the "
            "hypergradient, and the state dict and patched module through which objectives "
            "see the weights."
            + (f" Their rows are timed over {rounds} alternation rounds." if rounds else ""),
        ]
        if one_step:
            shown = ", ".join(f"{t * 1e3:.2g} ms ({c['problem']})" for c, t in one_step)
            lines[0] += (
                " DARTS with one LL step takes the floor "
                f"{shown} per UL step: its ratio is the library's fixed cost per UL step (those "
                "checks, and building the run's state), which longer LL runs spread over their "
                "steps."
            )
        return ["", *lines, ""]

    def memories(self) -> list[str]:
        out = [
            "## Peak memory",
            "",
            "MiB above the memory held once the problem is built, during the first UL step, "
            "each configuration in a fresh process (peak resident set size).",
            "",
        ]
        found = False
        for suite, problem in (("cleaning", "mnist"), ("meta", "meta")):
            configs = [c for c in self.configs(suite, problem) if self.memory(c, "bilevel")]
            if not configs:
                continue
            found = True
            rows = [[label(c), *(self.mib_cell(c, i) for i in IMPLS)] for c in configs]
            out += [f"**{PROBLEMS[problem]}**", ""]
            out += table(["method", *(IMPL_NAMES[i] for i in IMPLS)], rows)
        return out if found else []

    def mib_cell(self, c: dict, impl: str) -> str:
        found = self.memory(c, impl)
        return "–" if found is None else mib(found)

    def boat_ahead(self) -> list[str]:
        out = [f"## {AHEAD}", ""]
        worse = [p for p in self.accuracy_pairs(family=None) if not p[4]]
        faster = [(c, r) for c, r in self.time_pairs("boat", family=None) if r >= 1]
        for p in worse:
            out.append(f"- **More accurate**: {self.pair_text(p)}, ours vs BOAT's.")
        out += self.closer()
        for c, r in sorted(faster, key=lambda x: -x[1]):
            ours, boat = self.res.median(c, "bilevel"), self.res.median(c, "boat")
            out.append(
                f"- **Faster**: {name(c)} on {PROBLEMS[c['problem']]} "
                f"({setting(c)}): {ours * 1e3:.3g} ms vs BOAT's {boat * 1e3:.3g} ms ({r:.2f}x)."
            )
        for c, ours, boat in self.less_memory():
            out.append(
                f"- **Less memory**: {name(c)} on {PROBLEMS[c['problem']]} ({setting(c)}): "
                f"BOAT's peak {mib(boat)} MiB vs ours {mib(ours)} MiB "
                f"({mib(ours - boat)} MiB or {100 * (ours - boat) / ours:.1f}% less)."
            )
        if len(out) == 2:
            out.append("- Nowhere in this run.")
        load = self.data.get("loadavg_start", [0])[0]
        out += [
            "",
            f"The machine was shared (load average {load:.1f} on {self.data['machine']['cores']} "
            "cores): differences of 10% or less lie within the spread of the repeats (the "
            "ranges in the time tables), and the smallest problems (ridge, logistic, about "
            "0.2-0.5 ms per LL step) show the library's fixed cost per UL step most.",
        ]
        out += ["", *self.boat_findings(), ""]
        return out

    def less_memory(self) -> list[tuple[dict, float, float]]:
        """(config, ours, BOAT's) wherever BOAT's peak is below ours, however little."""
        found = []
        for suite in ("cleaning", "meta"):
            for c in self.configs(suite):
                ours, boat = self.memory(c, "bilevel"), self.memory(c, "boat")
                if ours and boat and boat < ours:
                    found.append((c, ours, boat))
        return found

    def closer(self) -> list[str]:
        """Where BOAT's answer is better than ours by less than what the "More accurate" lines
        count (round-off, or less than 1%): the error against the exact hypergradient, the
        error against the operation's own definition, and the test accuracy after
        hyper-cleaning."""
        lines = []
        for c in self.configs("regression"):
            for field, against in (
                ("error_exact", "the exact hypergradient"),
                ("error_target", "the operation's own definition"),
            ):
                ours, boat = self.error(c, "bilevel", field), self.error(c, "boat", field)
                if ours is None or boat is None or boat >= ours:
                    continue
                same = ours <= boat * 1.01 or ours <= 1e-12
                if field == "error_exact" and not same:
                    continue  # a "More accurate" line above
                kind = (
                    "Closer at round-off"
                    if ours - boat <= ROUND_OFF
                    else "Closer by less than 1%"
                    if same
                    else "More accurate"
                )
                lines.append(
                    f"- **{kind}**: {name(c)} on {c['problem']} ({setting(c)}), relative error "
                    f"against {against}: BOAT's {sci(boat)} vs ours {sci(ours)}, lower by "
                    f"{ours - boat:.1e}."
                )
        for c in self.configs("training"):
            ours, boat = self.final(c, "bilevel"), self.final(c, "boat")
            if ours and boat and ours["test_accuracy"] < boat["test_accuracy"]:
                a, b = ours["test_accuracy"], boat["test_accuracy"]
                if a < b - 1e-4:
                    continue  # a "More accurate" line above
                lines.append(
                    f"- **Higher test accuracy by less than 0.01 points**: {NAMES[c['method']]} "
                    f"on hyper-cleaning, BOAT's {100 * b:.4f}% vs ours {100 * a:.4f}%."
                )
        return lines

    def boat_findings(self) -> list[str]:
        """What BOAT's answers are, where they differ from the exact ones."""
        lines = []
        for c in self.configs("regression"):
            err, cos = self.error(c, "boat"), self.error(c, "boat", "cosine_exact")
            target = self.error(c, "boat", "error_target")
            ours = self.error(c, "bilevel", "error_target")
            if target is not None and ours is not None and target > 100 * max(ours, 1e-12):
                lines.append(
                    f"- BOAT's {BOAT_OPS[c['method']]} for {name(c)} on {c['problem']} "
                    f"({setting(c)}) is {sci(target)} from what the operation is defined to "
                    f"compute (ours {sci(ours)}); its error against the exact hypergradient is "
                    + (
                        f"{sci(err)}: its answer is zero to round-off (norm "
                        f"{sci(self.error(c, 'boat', 'norm'))}, ours "
                        f"{sci(self.error(c, 'bilevel', 'norm'))}), whose cosine is that of "
                        "round-off and changes from run to run."
                        if self.zero_answer(c, "boat")
                        else f"{sci(err)}, cosine {cos:.2f}."
                    )
                )
                line = self.error(c, "boat", "error_straight_line")
                if line is not None and line < 1e-10:
                    lines.append(
                        f"  Why: it equals, to {sci(line)}, the last K steps started from "
                        "w0 - (T - K) lr grad f(w0). Its T - K untracked steps take the LL "
                        "loss on the patched model, whose weights they do not move, so every "
                        "one of them uses the gradient at the starting weights: the weights "
                        "move along a straight line instead of descending (`gm_ol/ngd.py`)."
                    )
        one_step = [
            c for c in self.configs("regression") if c["method"] == "fd" and c.get("T") == 1
        ]
        for c in one_step:
            target = self.error(c, "boat", "error_target")
            if target is not None and lines:
                lines.append(
                    f"- With one LL step (T = 1, {c['problem']}) BOAT's FD is DARTS as the paper "
                    f"defines it ({sci(target)} from the exact one-step value): it perturbs the "
                    "run's starting weights, which are the last iterate only when T = 1."
                )
        if lines:
            lines.insert(0, "BOAT's answers that differ from their own definition:")
            lines.insert(1, "")
        return lines

    def protocol(self) -> list[str]:
        d = self.data
        s, ll = d["settings"], d["ll_steps"]
        return [
            "## How it was measured",
            "",
            f"- **Problems.** Ridge: 200 training and 200 validation rows, 20 features, one L2 "
            f"penalty $e^{{\\lambda_i}}$ per feature, LL step 0.3, T = {ll['ridge']} GD steps "
            f"from zero (converged to round-off), float64. Logistic: 1,000 rows, 100 features, "
            f"LL step 1.0, T = {ll['logistic']}, float64. The exact hypergradient: closed form "
            "(ridge), Newton's method and a dense solve (logistic). PTT and one-step DARTS "
            f"start the LL at its {d['methods']['ptt'].get('start')}-th GD iterate (from zero, "
            "their first step does not depend on the penalties). Hyper-cleaning: "
            f"{self.cleaning_size()}, float32 (`examples/hyper_cleaning.py`'s split and noise). "
            f"Meta-step: {s['meta_batch']} task(s) of 5-way 1-shot with 15 queries per class, "
            "random 28x28 images, `FewShotNet` (4 conv blocks of 64 filters), 5 SGD steps of "
            "0.1 in the LL, the network's initial weights as the UL variables.",
            "- **Methods.** The same objective functions for every implementation "
            "(`benchmarks/problems.py`); ours through the public API and `BilevelProblem` "
            "(`impl_bilevel_families.py`), BOAT 1.1.1 through `boat_torch.Problem.run_iter` "
            "with the operations named below (`impl_boat_families.py`), the floor in bare "
            "PyTorch (`impl_floor_families.py`, `impl_floor.py`). Stateful methods "
            f"(DM, SOBA, SABA, StocBiO, AmIGO) take {s['warm']} UL steps at the fixed initial "
            "UL point before their direction is measured.",
            "- **BOAT's operations.** "
            + "; ".join(f"{NAMES[m]}: `{op}`" for m, op in BOAT_OPS.items())
            + ". The UL step is BOAT's whole `run_iter` (it also evaluates both losses and "
            "writes its loss log each call).",
            f"- **Time.** Each implementation in its own worker process (BOAT in its virtual "
            f"environment), one torch thread, alternated A B C A B C over {d['rounds']} rounds; "
            "a warm-up step, then as many steps as fit in "
            + ", ".join(f"{v} s ({k})" for k, v in d["budget_s"].items())
            + " per round; the median of all timed steps. "
            + heap_of_timings(d["records"]),
            "- **Memory.** A fresh process per configuration and implementation: the peak "
            "resident set size during the first UL step minus the resident size just before "
            "it (`benchmarks/common.py`).",
            "- **Accuracy on hyper-cleaning.** After the UL steps, a fresh LL run from zero at "
            "the learned weights (the same evaluation for every implementation).",
            "- **Left out.** `Alternating` (and BOAT's ALTO): the penalties and example weights "
            "enter only the LL objective, where a method that follows the partial UL gradient "
            "has no direction (ours refuses; ALTO returns zero); `FirstOrder` likewise outside "
            "meta-learning. `Forward` is not run on hyper-cleaning (one Jacobian-vector product "
            "per example weight per LL step).",
            "",
        ]

    def reproduce(self, source: Path) -> list[str]:
        d = self.data
        command = portable(d["command"])
        git = d.get("git", {})
        state = f"commit `{git.get('commit')}`" + (
            ", with local changes" if git.get("dirty") else ""
        )
        shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source.name
        return [
            "## Reproduce",
            "",
            "```",
            "BILEVEL_DATA=<folder with MNIST/> " + command,
            *(
                "BILEVEL_DATA=<folder with MNIST/> " + portable(note["command"])
                for note in d.get("remeasured", [])
            ),
            "python benchmarks/method_families_report.py   # this page, from the JSON",
            "```",
            "",
            f"Measured from `{shown}` ({state}). BOAT's Python is `BENCH_BOAT_PYTHON` (default "
            "`/work/venvs/boat/bin/python`; see [benchmarks](benchmarks.md) for how it is "
            "installed).",
            "",
        ]

    # ------------------------------------------------------------------ small facts

    def cleaning_size(self) -> str:
        s = self.data["settings"]["cleaning"]
        return (
            f"{s['n_train']:,} training examples, {100 * s['corrupt']:.0f}% of them with a "
            f"wrong label, and {s['n_val']:,} validation examples"
        )

    def ul_steps(self) -> int:
        return self.data["settings"]["cleaning"]["ul_steps"]

    def final_start(self) -> float | None:
        for c in self.configs("training"):
            record = self.res.get("error", c, "bilevel")
            if record and record.get("curve"):
                return record["curve"][0]["test_accuracy"]
        return None

    # ------------------------------------------------------------------ figures

    def figures(self) -> dict[str, str]:
        """The PNGs; their Markdown by name."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 8})
        IMAGES.mkdir(parents=True, exist_ok=True)
        out = {}
        boat, floor = self.time_pairs("boat", family=None), self.floor_targets()
        if boat or floor:
            fig, axes = plt.subplots(1, 2, figsize=(FIG_WIDTH, 0.5 + 0.16 * max(len(boat), 6)))
            for ax, pairs, title, line in (
                (axes[0], boat, "ours ÷ BOAT", 1.0),
                (axes[1], floor, "ours ÷ floor", TARGET_FLOOR),
            ):
                names = [f"{name(c)} · {c['problem']}" for c, _ in pairs]
                values = [r for _, r in pairs]
                colors = ["C3" if r > line else "C0" for r in values]
                ax.barh(range(len(values)), values, color=colors)
                ax.set_yticks(range(len(values)), names)
                ax.invert_yaxis()
                ax.axvline(line, color="black", lw=0.8, ls="--")
                ax.set_title(title)
            fig.tight_layout()
            fig.savefig(IMAGES / "time_ratios.png", dpi=FIG_DPI)
            plt.close(fig)
            out["time"] = self.figure("time_ratios.png", "time ratios")
        curves = {
            c["method"]: self.res.get("error", c, "bilevel") for c in self.configs("training")
        }
        curves = {m: r["curve"] for m, r in curves.items() if r and r.get("curve")}
        if curves:
            fig, ax = plt.subplots(figsize=(FIG_WIDTH, 3.6))
            for i, (method, curve) in enumerate(curves.items()):
                style = "-" if i < 10 else "--" if i < 20 else ":"
                steps = [p["step"] for p in curve]
                ax.plot(steps, [p["test_accuracy"] for p in curve], style, label=NAMES[method])
            ax.set_xlabel("UL step")
            ax.set_ylabel("test accuracy")
            ax.legend(ncol=2, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
            ax.set_title("hyper-cleaning with bilevel: test accuracy of a fresh LL run")
            fig.tight_layout()
            fig.savefig(IMAGES / "cleaning_accuracy.png", dpi=FIG_DPI)
            plt.close(fig)
            out["cleaning"] = self.figure("cleaning_accuracy.png", "hyper-cleaning accuracy")
        return out

    @staticmethod
    def figure(name: str, alt: str) -> str:
        return f'![{alt}](img/method_families/{name}){{ width="{PAGE_PX}" }}'

    # ------------------------------------------------------------------ the page

    def render(self, source: Path) -> str:
        images = self.figures()
        intro = (
            "Every hypergradient method and LL dynamics of the library on the same problems, "
            "with BOAT 1.1.1's equivalent operation and a hand-written PyTorch loop (the "
            "*floor*) in the same run: error against exact answers, what hyper-cleaning "
            "reaches, time per UL step and peak memory."
        )
        lines = [
            "# Method families against BOAT",
            "",
            "<!-- generated by benchmarks/method_families_report.py from the JSON named below; "
            "edit the script, not this page -->",
            "",
            intro,
            "",
            *self.takeaways(),
            f"Measured from `{source.name}`; the command is at the [end of the page](#reproduce).",
            "",
            *self.targets(),
            *self.accuracy(),
            *self.cleaning(),
            *([images["cleaning"], ""] if "cleaning" in images else []),
            *self.times(),
            *([images["time"], ""] if "time" in images else []),
            *self.memories(),
            *self.boat_ahead(),
            *self.protocol(),
            *self.reproduce(source),
        ]
        return "\n".join(lines).rstrip() + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a results file that does not exist is refused."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source",
        nargs="?",
        type=existing_file,
        default=SOURCE,
        help="results file of method_families.py (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    source = parse_args(argv).source
    data = json.loads(source.read_text())
    PAGE.write_text(Page(data).render(source.resolve()))
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
