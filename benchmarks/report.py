"""Write docs/benchmarks.md and its plots from a results file of ``run.py``.

    python benchmarks/report.py [RESULTS_JSON ...]   # default: the newest in benchmarks/results

Given several files, later ones replace the records they repeat (e.g. a ``--memory-only``
rerun over a full run).

Everything on the page comes from the JSON file: the tables, the plots, the machine, the
date, the command, and the lists of configurations where a peer is faster than us, uses
less memory, or is more accurate (however little).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from argtypes import existing_file  # noqa: E402
from common import KEPT_HEAP_TEXT, RESULTS, ROOT, code_revision  # noqa: E402

PAGE = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "img" / "benchmarks"
IMPLS = ("bilevel", "floor", "boat", "torchopt")
NAMES = {"bilevel": "bilevel", "floor": "torch floor", "boat": "BOAT", "torchopt": "TorchOpt"}
PEERS = ("boat", "torchopt")
METHOD_NAMES = {
    "reverse": "Reverse",
    "truncated": "Truncated",
    "cg": "Implicit CG",
    "neumann": "Implicit Neumann",
    "fixed_point": "Implicit fixed point",
    "forward": "Forward",
    "maml": "MAML (Reverse)",
    "fomaml": "first-order MAML (FirstOrder)",
    "imaml": "iMAML (Implicit CG)",
    "hyperrep": "hyper-representation (Reverse)",
}
TARGET_BOAT, TARGET_FLOOR = 0.8, 1.1
#: each problem's precision when its configuration names none (``problems._build``)
PROBLEM_DTYPE = {
    "ridge": "float64",
    "logistic": "float64",
    "ridge_large": "float32",
    "cleaning": "float32",
    "meta": "float32",
}
EPS = {"float64": 2.220446049250313e-16, "float32": 1.1920928955078125e-07}
#: two relative errors closer than this many machine epsilons differ by round-off only
ROUND_OFF_EPS = 100
ERROR_FIELDS = {
    "error_exact": "relative error against the exact hypergradient",
    "error_unrolled": "relative error against the exact T-step unrolled hypergradient",
    "difference_to_floor": "relative distance to the floor's hypergradient",
}
COLORS = {"reverse": "C0", "truncated": "C1", "cg": "C2", "forward": "C3"}


def key(config: dict[str, Any]) -> tuple:
    """A hashable identity of a configuration."""
    return tuple(sorted((k, v) for k, v in config.items() if k != "suite"))


def setting(config: dict[str, Any]) -> str:
    """The configuration's parameters, e.g. ``T=200, K=10``."""
    parts = [f"{k}={config[k]}" for k in ("T", "K", "k", "batch") if k in config]
    return ", ".join(parts)


def ms(seconds: float) -> str:
    """Milliseconds with three significant digits."""
    value = seconds * 1e3
    return f"{value:.3g}" if value < 999.5 else f"{value:,.0f}"  # 999.7 is 1,000, not 1e+03


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


class Results:
    """The records of one run, indexed by (kind, configuration, implementation)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.index: dict[tuple, dict] = {}
        self.configs: dict[str, list[dict]] = defaultdict(list)
        seen = set()
        for record in data["records"]:
            config = record["config"]
            self.index[(record["kind"], key(config), record["impl"])] = record
            if (config["suite"], key(config)) not in seen:
                seen.add((config["suite"], key(config)))
                self.configs[config["suite"]].append(config)

    def get(self, kind: str, config: dict[str, Any], impl: str) -> dict | None:
        return self.index.get((kind, key(config), impl))

    def median(self, config: dict[str, Any], impl: str) -> float | None:
        record = self.get("time", config, impl)
        return record.get("median") if record else None

    def impls(self) -> list[str]:
        present = {r["impl"] for r in self.data["records"]}
        return [i for i in IMPLS if i in present]


# --------------------------------------------------------------------------- tables


def cell_time(record: dict | None) -> str:
    """The median in ms, with the min–max range below it in small type (narrow columns)."""
    if record is None:
        return "–"
    if "median" not in record:
        return "fails" if "failed" in record else "–"
    spread = f"{ms(record['min'])}–{ms(record['max'])}"
    return f"{ms(record['median'])}<br><small>{spread}</small>"


def ratio(res: Results, config: dict, impl: str) -> str:
    ours, theirs = res.median(config, "bilevel"), res.median(config, impl)
    if ours is None or theirs is None:
        return "–"
    return f"{ours / theirs:.2f}"


def label(c: dict) -> str:
    """The method and its setting in one cell."""
    return f"{METHOD_NAMES[c['method']]}<br><small>{setting(c)}</small>"


def time_table(res: Results, configs: list[dict]) -> list[str]:
    """Milliseconds per UL step (median, min–max), one column per implementation, then the
    ratios ours / theirs: seven columns at most, so that the table fits the page."""
    impls = res.impls()
    others = [i for i in impls if i != "bilevel"]
    head = ["method", *(f"{NAMES[i]}" for i in impls), *(f"÷ {NAMES[i]}" for i in others)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    for c in configs:
        if not any(res.get("time", c, i) for i in impls):
            continue
        row = [
            label(c),
            *(cell_time(res.get("time", c, i)) for i in impls),
            *(ratio(res, c, i) for i in others),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return [
        "Milliseconds per UL step: the median over all timed steps, the fastest and slowest "
        "below it; `÷ X` is ours divided by X's median (below 1: we are faster).",
        "",
        *lines,
    ]


def per_impl_table(
    res: Results, configs: list[dict], kind: str, suffix: str, cell: Any
) -> list[str]:
    """One row per configuration, one column per implementation: ``cell(record)`` of its
    ``kind`` record, "fails" where it failed, "–" where it did not run; empty rows dropped."""
    impls = res.impls()
    head = ["method", *(f"{NAMES[i]}{suffix}" for i in impls)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * len(impls)]
    for c in configs:
        cells = []
        for i in impls:
            record = res.get(kind, c, i)
            value = cell(record) if record else None
            failed = record is not None and "failed" in record
            cells.append(value if value is not None else ("fails" if failed else "–"))
        if all(x == "–" for x in cells):
            continue
        lines.append("| " + " | ".join([label(c), *cells]) + " |")
    return lines


def error_table(res: Results, configs: list[dict], field: str, title: str) -> list[str]:
    def cell(record: dict) -> str | None:
        return sci(record.get(field)) if field in record else None

    return [f"**{title}**", "", *per_impl_table(res, configs, "error", "", cell)]


def memory_table(res: Results, configs: list[dict]) -> list[str]:
    def cell(record: dict) -> str | None:
        return mib(record["bytes"]) if "bytes" in record else None

    return per_impl_table(res, configs, "memory", " MiB", cell)


def suite_section(res: Results, suite: str, title: str, distance_title: str) -> list[str]:
    """A suite without a closed form: time, peak memory and the distance to the floor's
    hypergradient."""
    configs = res.configs.get(suite, [])
    return [
        f"## {title}",
        "",
        *time_table(res, configs),
        "",
        "Peak memory, MiB:",
        "",
        *memory_table(res, configs),
        "",
        *error_table(res, configs, "difference_to_floor", distance_title),
    ]


def vmap_section() -> list[str]:
    """The loop-against-vmap measurement of ``vmap_tasks.py``, if it was run."""
    source = RESULTS / "vmap_tasks.json"
    if not source.exists():
        return []
    d = json.loads(source.read_text())
    code = code_revision(d.get("git"))
    lines = [
        "## Batching the tasks of a meta-batch with vmap",
        "",
        "The same MAML meta-gradient (the meta problem above) in bare `torch.func`, one task at "
        "a time in a loop against all tasks at once under `torch.func.vmap`, measured on "
        f"{d['date'][:10]} ({d['machine']}, torch {d['torch']}, {d['threads']} thread(s)"
        f"{', ' + code if code else ''}) with",
        "",
        "```bash",
        d["command"],
        "```",
        "",
        "| meta-batch | loop ms | vmap ms | vmap / loop | relative distance to the loop's "
        "meta-gradient |",
        "|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['batch']} | {ms(r['loop_ms'] / 1000)} | {ms(r['vmap_ms'] / 1000)} | "
            f"{r['vmap_over_loop']:.2f} | {sci(r['relative_distance'])} |"
        )
    wrong = [r for r in d["rows"] if not r["agrees"]]
    faster = [r for r in d["rows"] if r["vmap_over_loop"] < 1]
    if wrong:
        verdict = (
            "Under vmap the second-order gradient through batch normalization in training mode "
            "is not the loop's (the loop's equals the floor's above), and the gap is not "
            "round-off: "
            + "; ".join(f"{k}: {sci(v)}" for k, v in d.get("diagnosis", {}).items())
            + ". The batching rule of batch norm's backward is known to be wrong for the input "
            "gradient (functorch issue #534, open). Whatever its speed, a wrong meta-gradient "
            "rules it out: `BilevelProblem.meta_step` keeps the loop over tasks."
        )
    elif faster:
        verdict = "vmap is exact and faster here; `BilevelProblem.meta_step` does not use it yet."
    else:
        verdict = (
            "vmap is not faster than the loop on this machine, so `BilevelProblem.meta_step` "
            "keeps the loop over tasks."
        )
    lines += ["", verdict, ""]
    return lines


def heap_of_timings(records: list[dict[str, Any]]) -> str:
    """How a page's timings (the ``time`` records among ``records``) treated glibc's heap
    (``run.py``'s ``--glibc-heap``), as a sentence of the "how it is measured" list."""
    heaps = [r.get("heap", "glibc") for r in records if r["kind"] == "time"]
    kept = heaps.count("kept")
    how = (
        f"with freed memory kept in glibc's heap (`{KEPT_HEAP_TEXT}`, every implementation "
        "alike; [why](benchmarks.md#the-c-allocator))"
    )
    if kept == len(heaps):
        return f"The timing workers run {how}."
    if kept == 0:
        return "The timing workers run with glibc's default heap trimming."
    return (
        f"{kept} of the {len(heaps)} timings were taken {how}, the others with glibc's "
        "default heap trimming."
    )


def heap_section() -> list[str]:
    """The default-against-kept heap measurement of ``heap_trim.py``, if it was run."""
    source = RESULTS / "heap_trim.json"
    if not source.exists():
        return []
    d = json.loads(source.read_text())
    code = code_revision(d.get("git"))
    rows = []
    for c in d["cells"]:
        default, kept = c["default"], c["kept"]
        rows.append(
            f"| {c['config']['problem']}: {label(c['config'])} | {NAMES.get(c['impl'], c['impl'])} "
            f"| {ms(default['seconds']['median'])}<br><small>"
            f"{ms(default['seconds']['min'])}–{ms(default['seconds']['max'])}</small> "
            f"| {default['faults']['median']:,.0f} "
            f"| {ms(kept['seconds']['median'])}<br><small>"
            f"{ms(kept['seconds']['min'])}–{ms(kept['seconds']['max'])}</small> "
            f"| {kept['faults']['median']:,.0f} | {c['default_over_kept']:.2f} |"
        )
    processes = len(d["cells"][0]["default"]["processes"])
    return [
        "## The C allocator",
        "",
        "On Linux, PyTorch's CPU tensors come from glibc's `malloc`. Once more than a threshold "
        "of the heap's top is free, glibc gives it back to the operating system, and the next "
        "step touches those pages again, one page fault per 4 KiB. How often that happens in a "
        "step differs between processes running the same code (the fault counts below), so "
        "the same code runs at different speeds in different processes. Setting "
        f"`{KEPT_HEAP_TEXT}` keeps freed memory in the heap for the next step (the trim "
        "threshold alone would also pin the mmap threshold at 128 KiB and map every large "
        "tensor afresh; 32 MiB is the most glibc's own sliding threshold reaches on 64-bit "
        "Linux). The same UL step in "
        f"{processes} fresh processes each, the two settings alternated, one untimed step "
        "then the median of the next ones (`"
        + d["command"]
        + f"`, {d['date']}, {d['cpu']}{', ' + code if code else ''}):",
        "",
        "| configuration | implementation | glibc default, ms | page faults per step "
        "| kept heap, ms | page faults per step | default / kept |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The time tables above are taken with the kept heap, for every implementation, so that "
        "they compare the implementations rather than where glibc trimmed in each worker. Peak "
        "memory is measured with glibc's defaults, as programs run. For your own runs on Linux "
        "the same two variables are a free speed-up where steps allocate and free large "
        "tensors; they make the process hold its largest heap until it exits.",
        "",
    ]


def peer_findings(res: Results) -> list[str]:
    """What the run showed about the peers: their own notes, and hypergradients far from
    the floor's (more than 10x its error) on the same configuration."""
    lines = []
    for impl, notes in res.data.get("notes", {}).items():
        lines.extend(f"- **{NAMES.get(impl, impl)}**: {note}." for note in notes)
    for suite in ("regression", "cleaning", "meta"):  # the sweep is in the plot
        for c in res.configs.get(suite, []):
            floor = res.get("error", c, "floor")
            if floor is None:
                continue
            for peer in PEERS:
                r = res.get("error", c, peer)
                for field in ("error_exact", "difference_to_floor"):
                    if not r or field not in r or field not in floor:
                        continue
                    ref = floor[field] if field == "error_exact" else 1e-6
                    if r[field] > max(10 * ref, 1e-3):
                        what = "relative error" if field == "error_exact" else "distance to floor"
                        base = f", the floor's {sci(ref)}" if field == "error_exact" else ""
                        lines.append(
                            f"- **{NAMES[peer]}**, {c['problem']} {METHOD_NAMES[c['method']]} "
                            f"({setting(c)}): {what} {sci(r[field])}{base}."
                        )
    if any("BOAT" in line and "Truncated" in line for line in lines):
        lines.append(
            "- Why BOAT's truncated hypergradient is off: with `RGT`, its `NGD` "
            "(`boat_torch/gm_ol/ngd.py`, lines 101-127) runs the first T − K steps as "
            "`loss.backward(); lower_level_opt.step()` on the LL module, which also adds the LL "
            "loss's gradient into `.grad` of the UL variables at every one of those steps, and "
            "then copies the LL module's weights back from a backup taken before them."
        )
    return lines


def report_command(sources: list[str] | None) -> str:
    """The command that writes the page: from the newest results, or from the files merged."""
    if not sources:
        return (
            "python benchmarks/report.py     # this page and its figures, from the newest results"
        )
    files = " ".join(f"benchmarks/results/{name}" for name in sources)
    return f"python benchmarks/report.py {files}   # later files replace the records they repeat"


def failures(res: Results) -> list[str]:
    """What could not run: each implementation and configuration once (its first failure);
    where the library's own divergence check stopped it, what that means for the others."""
    lines = []
    for impl, why in res.data.get("unavailable", {}).items():
        lines.append(f"- **{NAMES.get(impl, impl)}** could not run at all: `{why}`")
    seen = set()
    for r in res.data["records"]:
        if "failed" in r:
            tag = (r["impl"], key(r["config"]))
            if tag in seen:
                continue
            seen.add(tag)
            text = r["failed"].splitlines()[0][:300]
            line = (
                f"- {NAMES[r['impl']]}, {r['config']['problem']} "
                f"{METHOD_NAMES[r['config']['method']]} ({setting(r['config'])}): "
                f"fails with `{text}`"
            )
            if r["impl"] == "bilevel" and text.startswith("LowerLevelDivergenceError"):
                line += (
                    " The library's LL growth check (on by default, `on_growth='raise'`) stops "
                    "this configuration: its LL loss grows over the LL steps. The other "
                    "implementations take the same LL steps and have no such check: their "
                    "numbers for it are those of a diverging LL."
                )
            lines.append(line)
    return lines


# --------------------------------------------------------------------------- verdicts


def one_process_checks(res: Results) -> tuple[dict[str, Any], dict[tuple, dict[str, Any]]]:
    """``same_process.py``'s run and its re-timings of ours against a peer in one process, by
    ``(configuration key, peer)``: only those made from this page's own results files."""
    source = RESULTS / "same_process.json"
    if not source.exists():
        return {}, {}
    d = json.loads(source.read_text())
    if d.get("sources") != res.data.get("sources"):  # (measured from other results)
        return {}, {}
    return d, {(key(c["config"]), c["peer"]): c for c in d["cells"]}


def one_process_summary(run: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    """What the one-process re-timings ``cells`` of ``run`` showed, in a paragraph after the
    list they annotate."""
    if not cells:
        return []
    code = code_revision(run.get("git"))
    at_most = sum(c["one_process"] <= 1.0 for c in cells)
    worst = max(cells, key=lambda c: c["one_process"])
    return [
        "",
        "Each implementation is timed in its own worker process, and the same code runs a few "
        "percent faster or slower in one process than in another. Each configuration above was "
        "timed again with ours and the peer in one process of the peer's Python, alternated "
        f"(`{run['command']}`, {run['date']}, {run['cpu']}{', ' + code if code else ''}): ours "
        f"was at most as slow as the peer in {at_most} of {len(cells)}, and at most "
        f"{worst['one_process']:.2f}x the peer's time ({NAMES[worst['peer']]} on "
        f"{worst['config']['problem']} {METHOD_NAMES[worst['config']['method']]}, "
        f"{setting(worst['config'])}).",
    ]


def verdicts(res: Results) -> tuple[list[str], list[str]]:
    """Where a peer is faster than us, and how each timing target fares."""
    faster, targets = [], []
    (run, checks), quoted = one_process_checks(res), []
    boat_ok = floor_ok = below_floor = 0
    boat_all, floor_all = [], []
    floor_misses = []  # (floor's time, ours - floor) where the floor target is missed
    floor_steps = []  # (floor's time, ours / floor) everywhere
    for suite in ("regression", "scaling", "cleaning", "meta"):
        for c in res.configs.get(suite, []):
            ours = res.median(c, "bilevel")
            if ours is None:
                continue
            mine = res.get("time", c, "bilevel")
            for peer in PEERS:
                theirs = res.median(c, peer)
                if theirs is not None and theirs < ours:
                    other = res.get("time", c, peer)
                    overlap = mine["min"] <= other["max"] and other["min"] <= mine["max"]
                    note = "; the min–max ranges overlap" if overlap else ""
                    check = checks.get((key(c), peer))
                    again = ""
                    if check:
                        quoted.append(check)
                        again = f"; in one process, alternated: {check['one_process']:.2f}"
                    faster.append(
                        f"- {NAMES[peer]} on {c['problem']} {METHOD_NAMES[c['method']]} "
                        f"({setting(c)}): {ms(theirs)} ms against our {ms(ours)} ms "
                        f"(ours / theirs = {ours / theirs:.2f}{note}{again})"
                    )
            boat, floor = res.median(c, "boat"), res.median(c, "floor")
            if boat is not None:
                boat_all.append(ours / boat)
                boat_ok += ours / boat <= TARGET_BOAT
                # where BOAT is this close to the floor, 0.8x BOAT is faster than the floor
                at_floor = floor is not None and TARGET_BOAT * boat < floor
                below_floor += ours / boat > TARGET_BOAT and at_floor
            if floor is not None:
                floor_all.append(ours / floor)
                floor_ok += ours / floor <= TARGET_FLOOR
                floor_steps.append((floor, ours / floor))
                if ours / floor > TARGET_FLOOR:
                    floor_misses.append((floor, ours - floor))
    if boat_all:
        targets.append(
            f"- time at most {TARGET_BOAT}x BOAT's: met on {boat_ok} of "
            f"{len(boat_all)} configurations (ours / BOAT: median "
            f"{statistics.median(boat_all):.2f}, range {min(boat_all):.2f}–"
            f"{max(boat_all):.2f})"
        )
        if below_floor:
            targets.append(
                f"  - of the {len(boat_all) - boat_ok} misses, {below_floor} are configurations "
                f"where {TARGET_BOAT}x BOAT's time is less than the bare-torch floor's own time "
                f"(BOAT runs within {1 / TARGET_BOAT:.2f}x of the floor there): the target "
                "would need a step faster than the hand-written computation itself, which only "
                "less work (another algorithm) could give"
            )
    if floor_all:
        targets.append(
            f"- time within {TARGET_FLOOR}x the bare-torch floor: met on {floor_ok} of "
            f"{len(floor_all)} configurations (ours / floor: median "
            f"{statistics.median(floor_all):.2f}, range {min(floor_all):.2f}–"
            f"{max(floor_all):.2f})"
        )
        if floor_misses:
            hits = [f for f, r in floor_steps if r <= TARGET_FLOOR]
            missed = [f for f, r in floor_steps if r > TARGET_FLOOR]
            extra = statistics.median(d for _, d in floor_misses)
            targets.append(
                f"  - the floor's step takes a median of {ms(statistics.median(missed))} ms where "
                f"the target is missed and {ms(statistics.median(hits)) if hits else '–'} ms where "
                f"it is met; where missed, ours takes a median of {ms(extra)} ms more per UL step: "
                "the library's own work at every LL and UL step (input and finiteness checks, the "
                "patched model, the objectives' state) is a larger share of a small step"
            )
    return faster + one_process_summary(run, quoted), targets


def unique_configs(res: Results, suites: tuple[str, ...]) -> list[dict]:
    """The configurations of ``suites``, each once (a sweep point may repeat a table's)."""
    seen, out = set(), []
    for suite in suites:
        for c in res.configs.get(suite, []):
            if key(c) not in seen:
                seen.add(key(c))
                out.append(c)
    return out


def less_memory(res: Results) -> tuple[str, list[str]]:
    """Where a peer's peak memory is below ours, however little: a lead sentence with the
    count and the largest gaps, and one line per configuration and peer."""
    lines, compared, gaps = [], 0, []
    for c in unique_configs(res, ("regression", "scaling", "cleaning", "meta")):
        mine = res.get("memory", c, "bilevel")
        if not mine or "bytes" not in mine:
            continue
        for peer in PEERS:
            theirs = res.get("memory", c, peer)
            if not theirs or "bytes" not in theirs:
                continue
            compared += 1
            ours, other = mine["bytes"], theirs["bytes"]
            if other < ours:
                what = f"{NAMES[peer]} on {c['problem']} {METHOD_NAMES[c['method']]} ({setting(c)})"
                gaps.append((ours - other, ours / other, what))
                lines.append(
                    f"- {what}: {mib(other)} MiB against our {mib(ours)} MiB "
                    f"({mib(ours - other)} MiB less; ours / theirs = {ours / other:.2f})"
                )
    if not lines:
        return "No peer uses less memory than us on any configuration that both measured.", []
    most, ratio_most = max(gaps), max(gaps, key=lambda g: g[1])
    lead = (
        f"Where a peer uses less peak memory than us (in {len(lines)} of {compared} "
        "comparisons; the largest gap "
        f"{mib(most[0])} MiB, {most[2]}; the largest ratio ours / theirs "
        f"{ratio_most[1]:.2f}, {ratio_most[2]}; RSS above the baseline in a fresh process, "
        "see [how it is measured](#how-it-is-measured)):"
    )
    return lead, lines


def more_accurate(res: Results) -> list[str]:
    """Where a peer's hypergradient is closer to the reference than ours, however little:
    one line per peer and measure, round-off apart from larger differences."""
    groups: dict[tuple[str, str, bool], list[tuple[dict, float, float]]] = defaultdict(list)
    for c in unique_configs(res, ("regression", "sweep", "cleaning", "meta")):
        mine = res.get("error", c, "bilevel")
        if not mine:
            continue
        eps = EPS[c.get("dtype", PROBLEM_DTYPE.get(c["problem"], "float32"))]
        for peer in PEERS:
            theirs = res.get("error", c, peer)
            for field in ERROR_FIELDS:
                if not theirs or field not in theirs or field not in mine:
                    continue
                ours, other = mine[field], theirs[field]
                if other < ours:
                    round_off = ours - other <= ROUND_OFF_EPS * eps
                    groups[(peer, field, round_off)].append((c, ours, other))
    lines = []
    for (peer, field, round_off), found in groups.items():
        where = [f"{c['problem']} {METHOD_NAMES[c['method']]} ({setting(c)})" for c, _, _ in found]
        if round_off:
            largest = max(ours - other for _, ours, other in found)
            lines.append(
                f"- {NAMES[peer]}, lower {ERROR_FIELDS[field]} by round-off only (by at most "
                f"{largest:.1e}, under {ROUND_OFF_EPS} machine epsilons of the problem's "
                f"precision): " + "; ".join(where)
            )
        else:
            lines.append(
                f"- {NAMES[peer]}, lower {ERROR_FIELDS[field]}: "
                + "; ".join(
                    f"{w}: {sci(other)} against our {sci(ours)}"
                    for w, (_, ours, other) in zip(where, found, strict=True)
                )
            )
    return lines


# --------------------------------------------------------------------------- plots


def columns(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """``[(x, y), ...]`` as ``([x, ...], [y, ...])``."""
    return [x for x, _ in points], [y for _, y in points]


#: Figures are drawn for the page's text column (about 700 CSS pixels wide): 7 inches at
#: 100 dpi per CSS pixel, saved at 2x for sharp text on high-density screens, and shown at
#: that width (``{ width="700" }``), so that their 8-point text reads as 11 pixels.
FIG_WIDTH, FIG_DPI, PAGE_PX = 7.0, 200, 700


def figure_markdown(name: str, alt: str) -> str:
    """The image at the page width."""
    return f'![{alt}](img/benchmarks/{name}){{ width="{PAGE_PX}" }}'


def plots(res: Results) -> dict[str, str]:
    """Write the PNGs; return their Markdown by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 8})
    IMAGES.mkdir(parents=True, exist_ok=True)
    out = {}
    scaling = [
        c
        for c in res.configs.get("scaling", [])
        if not (c["method"] == "truncated" and c.get("K") != 10)
    ]
    if scaling:
        fig, axes = plt.subplots(1, 2, figsize=(FIG_WIDTH, 3.4))
        for method in ("reverse", "truncated", "cg", "forward"):
            for impl, style in (("bilevel", "-o"), ("floor", ":x")):
                pts = [
                    (c["T"], res.median(c, impl), res.get("memory", c, impl))
                    for c in scaling
                    if c["method"] == method
                ]
                t_pts = [(t, m) for t, m, _ in pts if m is not None]
                m_pts = [(t, r["bytes"] / 2**20) for t, _, r in pts if r and "bytes" in r]
                name = f"{METHOD_NAMES[method]} ({NAMES[impl]})"
                color = COLORS[method]
                if t_pts:
                    axes[0].plot(*columns(t_pts), style, color=color, label=name, markersize=4)
                if m_pts and impl == "bilevel":
                    axes[1].plot(*columns(m_pts), style, color=color, markersize=4)
        axes[0].set(
            xscale="log", yscale="log", xlabel="LL steps T", ylabel="s per UL step", title="time"
        )
        axes[1].set(
            xscale="log", xlabel="LL steps T", ylabel="MiB above baseline", title="peak memory"
        )
        # one legend for both panels, below them: it covers no curve
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
        fig.suptitle("large ridge (n=1000, d=2000, 20 penalties); K=10, CG k=10")
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        fig.savefig(IMAGES / "scaling.png", dpi=FIG_DPI)
        plt.close(fig)
        out["scaling"] = figure_markdown("scaling.png", "time and memory against T")
    sweep = res.configs.get("sweep", [])
    if sweep:
        methods = ("cg", "neumann", "fixed_point", "truncated")
        fig, axes = plt.subplots(2, 2, figsize=(FIG_WIDTH, 5.0), sharey=True)
        for ax, method in zip(axes.flat, methods, strict=True):
            for impl, style in (
                ("bilevel", "-o"),
                ("floor", ":x"),
                ("boat", "--s"),
                ("torchopt", "-.^"),
            ):
                pts = []
                for c in sweep:
                    if c["method"] != method:
                        continue
                    r = res.get("error", c, impl)
                    if r and "error_exact" in r:
                        pts.append((c.get("k", c.get("K")), max(r["error_exact"], 1e-17)))
                if pts:
                    ax.plot(*columns(pts), style, label=NAMES[impl], alpha=0.8, markersize=4)
            ax.set(
                xscale="log",
                yscale="log",
                title=METHOD_NAMES[method],
                xlabel="iterations k" if method != "truncated" else "truncation K",
            )
        for ax in axes[:, 0]:
            ax.set_ylabel("relative error")
        handles = {}
        for ax in axes.flat:  # every implementation once, whichever panel has it
            for h, name in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(name, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, frameon=False)
        fig.suptitle("hypergradient error against solver iterations (ridge, T=200, converged LL)")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(IMAGES / "error_vs_iterations.png", dpi=FIG_DPI)
        plt.close(fig)
        out["sweep"] = figure_markdown("error_vs_iterations.png", "error against solver iterations")
    return out


# --------------------------------------------------------------------------- the page


def portable(command: str) -> str:
    """The command without options that name a file of the measuring machine (``--partial``
    only saves progress; the measurement is the same without it)."""
    words, kept = command.split(), []
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        if word == "--partial":
            skip = True
            continue
        if word.startswith("--partial="):
            continue
        kept.append(word)
    return " ".join(kept)


def spread(values: list[float]) -> str:
    """``median m (range a–b)`` of ratios."""
    return f"median {statistics.median(values):.2f} (range {min(values):.2f}–{max(values):.2f})"


def ratios(res: Results, peer: str) -> list[float]:
    """ours / peer on the medians, over every timed configuration both ran."""
    found = []
    for suite in ("regression", "scaling", "cleaning", "meta"):
        for c in res.configs.get(suite, []):
            ours, theirs = res.median(c, "bilevel"), res.median(c, peer)
            if ours is not None and theirs is not None:
                found.append(ours / theirs)
    return found


def largest(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def bound(x: float) -> str:
    """``x`` rounded up to two significant digits: a bound stated in words is never below
    the data it bounds."""
    text = f"{x:.1e}"
    if float(text) < x:
        mantissa, exponent = text.split("e")
        text = f"{float(f'{float(mantissa) + 0.1:.1f}e{exponent}'):.1e}"
    return text


def takeaways(res: Results) -> list[str]:
    """What a reader should know first, computed from the records."""
    d, m = res.data, res.data["machine"]
    lines = []
    ridge = [c for c in res.configs.get("regression", []) if c["problem"] == "ridge"]

    def errors(method: str, field: str, impl: str = "bilevel") -> list[float | None]:
        return [
            (res.get("error", c, impl) or {}).get(field) for c in ridge if c["method"] == method
        ]

    exact = largest(errors("reverse", "error_unrolled") + errors("forward", "error_unrolled"))
    distances = [
        (res.get("error", c, "bilevel") or {}).get("difference_to_floor")
        for suite in ("cleaning", "meta")
        for c in res.configs.get(suite, [])
    ]
    if exact is not None:
        text = (
            f"- **Exact.** `Reverse` and `Forward` match the exact derivative of the unrolled LL "
            f"to {bound(exact)} (float64 ridge regression with a closed form); every method gives "
            "the hypergradient of the same computation written by hand in bare PyTorch"
        )
        far = largest(distances)
        if far is not None:
            text += f" (relative distance at most {bound(far)} on hyper-cleaning and meta-learning"
            text += ", float32)"
        lines.append(text + ".")
    floor = ratios(res, "floor")
    if floor:
        lines.append(
            f"- **Fast.** Time per UL step divided by the hand-written floor's: {spread(floor)}: "
            "the library adds a few percent to a step, more on the smallest problems."
        )
    peers = [(NAMES[p], ratios(res, p)) for p in PEERS]
    peers = [(name, r) for name, r in peers if r]
    if peers:
        parts = [f"{name}'s: {spread(r)}" for name, r in peers]
        lines.append("- **Against the peers**, ours divided by " + "; ".join(parts) + ".")
    scaling = res.configs.get("scaling", [])
    longest = max((c["T"] for c in scaling), default=None)
    if longest is not None:

        def memory(method: str) -> float | None:
            for c in scaling:
                if c["T"] == longest and c["method"] == method and c.get("K", 10) == 10:
                    r = res.get("memory", c, "bilevel")
                    return r["bytes"] / 2**20 if r and "bytes" in r else None
            return None

        rev, trunc, cg = memory("reverse"), memory("truncated"), memory("cg")
        if rev is not None and cg is not None and trunc is not None:
            lines.append(
                f"- **Memory.** With {longest:,} LL steps `Reverse` needs {rev:.0f} MiB above "
                f"the baseline, `Truncated(truncate_iter=10)` {trunc:.0f} MiB and `Implicit` "
                f"{cg:.0f} MiB: only `Reverse` grows with the number of LL steps."
            )
    wrong = [f for f in peer_findings(res) if "relative error" in f or "distance to floor" in f]
    if wrong:
        lines.append(
            "- **Peers.** BOAT's truncated hypergradient is off on every problem it ran (see "
            "[findings](#findings-about-the-peers))."
        )
    gpu = f"GPU {m['cuda']}" if m.get("cuda") else "no GPU"
    lines.append(
        f"- **Machine.** {m['cpu']}, {m['cores']} cores shared with other jobs, "
        f"{d['threads']} torch thread per process, torch {m['torch']}, {gpu}; "
        f"measured on {d['date'][:10]} with the code of checkout {d['git']['commit']}"
        + (" (with local changes)" if d["git"].get("dirty") else "")
        + "."
    )
    return lines


def by_problem(configs: list[dict]) -> list[tuple[str, list[dict]]]:
    """The configurations grouped by problem, in order."""
    groups: dict[str, list[dict]] = {}
    for c in configs:
        groups.setdefault(c["problem"], []).append(c)
    return list(groups.items())


def page(res: Results, source: Path, images: dict[str, str]) -> str:
    d = res.data
    m = d["machine"]
    faster, targets = verdicts(res)
    (lighter_lead, lighter), closer = less_memory(res), more_accurate(res)
    versions = ", ".join(f"{NAMES.get(i, i)} {v}" for i, v in d.get("versions", {}).items())
    dirty = " with uncommitted changes" if d["git"]["dirty"] else ""
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    total = f"total {d['duration_s'] / 60:.1f} min" if "duration_s" in d else "cut short"
    lines = [
        "---",
        "hide:",
        "  - toc",
        "---",
        "",
        "# Benchmarks",
        "",
        "<!-- generated by benchmarks/report.py from the JSON named below; edit the script, "
        "not this page -->",
        "",
        "How the library's hypergradients compare with exact answers, with the same "
        "computation written by hand in bare PyTorch (the *floor*), and with BOAT and "
        "TorchOpt: error, time and memory per UL step.",
        "",
        "## What to take away",
        "",
        *takeaways(res),
        "",
        f"Measured from `{shown}`"
        + "".join(f" and {merged}" for merged in d.get("merged", []))
        + "; the command to reproduce it is at the [end of the page](#reproduce).",
        "",
        "Every method of the library, with BOAT 1.1.1's equivalent operation and a "
        "hand-written torch loop, is measured in one run on the [method families "
        "page](method_families.md); convergence curves of the stochastic and first-order "
        "methods are on the [curves page](bilevel_curves.md).",
        "",
        "## Accuracy",
        "",
        *[
            line
            for problem, configs in by_problem(res.configs.get("regression", []))
            for line in [
                *error_table(
                    res,
                    configs,
                    "error_exact",
                    f"{problem}: relative error against the exact hypergradient at the LL "
                    "minimizer",
                ),
                "",
            ]
        ],
        *error_table(
            res,
            [c for c in res.configs.get("regression", []) if c["problem"] == "ridge"],
            "error_unrolled",
            "ridge: relative error against the exact T-step unrolled hypergradient",
        ),
        "",
        images.get("sweep", ""),
        "",
        "## Time per UL step",
        "",
        *[
            line
            for problem, configs in by_problem(res.configs.get("regression", []))
            for line in [f"### {problem}", "", *time_table(res, configs), ""]
        ],
        "## Scaling with the number of LL steps",
        "",
        images.get("scaling", ""),
        "",
        *time_table(res, res.configs.get("scaling", [])),
        "",
        "Peak memory above the baseline, MiB:",
        "",
        *memory_table(res, res.configs.get("scaling", [])),
        "",
        *suite_section(
            res, "cleaning", "Data hyper-cleaning", "Relative distance to the floor's hypergradient"
        ),
        "",
        *suite_section(
            res,
            "meta",
            "Meta-learning step",
            "Relative distance to the floor's meta-gradient (float32)",
        ),
        "",
        "## Peak memory of the small problems",
        "",
        *memory_table(res, res.configs.get("regression", [])),
        "",
        *vmap_section(),
        *heap_section(),
        "## How it is measured",
        "",
        "- **Implementations.** *bilevel* is this library through its public API "
        "(`BilevelProblem.step` / `meta_step`). *torch floor* is the same computation written "
        "by hand in bare PyTorch (`torch.autograd.grad` loops with `create_graph`, double "
        "backward for Hessian-vector products, `torch.func.functional_call` for the network), "
        "with no checks: the floor any library's overhead is measured against. *BOAT* "
        "(`boat_torch.Problem.run_iter`, ops NGD + RAD / RAD+RGT / CG / NS; MAML as IAD+RAD, "
        "first-order MAML as FOA+IAD+RAD) and *TorchOpt* (`MetaSGD` for unrolled methods, "
        "`diff.implicit.custom_root` with `solve_cg` / `solve_inv(ns=True)` for implicit ones) "
        "run in their own virtual environments, with torch 2.13.0 as ours.",
        "- **Same work.** Every implementation evaluates the same objective functions "
        "(`benchmarks/problems.py`) on the same data from the same starting point, runs the LL "
        "from that point at every UL step, and ends with a UL `SGD(lr=0)` step, so that every "
        "timed step sees the same problem. For hyper-representation all compute the trunk's "
        "features once per task.",
        "- **Time.** Each implementation is a long-lived worker process; the runner alternates "
        "them A B C D A B C D, and each turn runs one untimed warm-up step then times single "
        "UL steps for about the budget. Reported: the median over all rounds (min–max in "
        "brackets), in milliseconds per UL step; ratios are ours / theirs on the medians. "
        + heap_of_timings(d["records"]),
        "- **Memory.** A fresh process per configuration and implementation builds the "
        "problem, frees the allocator's cache (`malloc_trim`), resets the peak RSS "
        "(`/proc/self/clear_refs`), reads the current RSS as the baseline, runs its first UL "
        "step and reports the peak RSS (`VmHWM`) minus the baseline (no warm-up step: memory "
        "a warm-up frees can stay resident and hide the next step's peak). "
        "On a GPU the same code reports `torch.cuda.max_memory_allocated` above the memory "
        "allocated before the steps. RSS counts pages, not tensors: differences of a few MiB "
        "between implementations are the C allocator's, not the method's.",
        "- **Error.** The relative error ‖g − g*‖ / ‖g*‖ of the hypergradient at the initial "
        "UL point, in float64: against the implicit-function-theorem hypergradient at the "
        "exact LL minimizer (ridge: closed form; logistic: Newton's method to convergence and "
        "a dense Hessian solve), and, for ridge, against the exact derivative of the T-step "
        "unrolled map (closed form `w_T = H⁻¹(I − (I − αH)^T) b`, differentiated densely). For "
        "hyper-cleaning and the meta-step, which have no closed form, the distance to the "
        "floor's hypergradient for the same method instead. CG runs with a relative "
        "tolerance of 1e-10 in ours and TorchOpt (an absolute one in BOAT, which also returns "
        "the iterate before its last update); the floor always runs all k iterations, so it "
        "reaches round-off where the others stop at the tolerance.",
        "",
        "## Problems",
        "",
        "- **ridge**: n = 200 training and 200 validation rows, d = 20 standard normal "
        "features, one L2 penalty `exp(λ_i)` per feature (0.1 at the start), LL gradient "
        "descent with lr 0.3 from zero. It converges at this scaling (rate 0.82 per step): "
        "T = 200 is converged to round-off, T = 10 is not. float64.",
        "- **ridge_large** (scaling): n = 1000, d = 2000, features divided by 1 + √(d/n) so "
        "that lr 0.3 converges; 20 penalties, each on a group of 100 features (so that "
        "Forward, whose cost grows with the number of hyperparameters, can run too). float32.",
        "- **logistic**: 1,000 × 100, per-feature L2, 100 LL steps of lr 1.0. float64.",
        "- **cleaning**: MNIST-shaped data hyper-cleaning, 5,000 training examples of 784 "
        "random features (30% of labels flipped), one weight `sigmoid(λ_i)` per example, a "
        "linear 10-class classifier, T = 100 LL steps of lr 0.5, 5,000 validation examples. "
        "float32.",
        "- **meta**: Omniglot-shaped meta-step on the 4-conv network (64 filters, 3×3 conv, "
        "batch norm, ReLU, 2×2 max-pool, ×4, linear head; 28×28×1 random inputs), 5-way "
        "1-shot, 15 queries per class, 5 inner steps of lr 0.1 (MAML's 0.4 makes the LL "
        "diverge on random inputs); iMAML with proximal strength 2 and 5 CG iterations; "
        "hyper-representation with the trunk as UL and the head as LL. "
        "float32.",
        "",
        "## Against the targets",
        "",
        "The library's own goals, checked on every configuration: a step at most "
        f"{TARGET_BOAT}x BOAT's time and within {TARGET_FLOOR}x the floor's.",
        "",
        *(targets or ["- no configuration ran for both us and a peer"]),
        "",
        "Where a peer is faster than us:"
        if faster
        else "No peer is faster than us on any configuration that both run.",
        "",
        *faster,
        "",
        lighter_lead,
        "",
        *lighter,
        "",
        "Where a peer's hypergradient is more accurate than ours, however little:"
        if closer
        else "No peer's hypergradient is more accurate than ours on any configuration.",
        "",
        *closer,
        "",
        "## Findings about the peers",
        "",
        *(peer_findings(res) or ["Nothing to report."]),
        "",
        "## What could not run",
        "",
        *(failures(res) or ["Everything ran."]),
        "",
        "A dash means the implementation has no such method (BOAT and TorchOpt have no fixed "
        "point or forward mode; TorchOpt no first-order MAML; BOAT no iMAML).",
        "",
        "## Reproduce",
        "",
        "```bash",
        "# the peers, each in its own environment, with the CPU torch first",
        "python -m venv /work/venvs/boat",
        "/work/venvs/boat/bin/pip install torch==2.13.0",
        "/work/venvs/boat/bin/pip install --no-deps boat-torch==1.1.1 higher==0.2.1",
        "/work/venvs/boat/bin/pip install numpy==1.26.4 matplotlib",
        "python -m venv /work/venvs/torchopt",
        "/work/venvs/torchopt/bin/pip install torch==2.13.0",
        "/work/venvs/torchopt/bin/pip install --no-deps torchopt==0.7.3",
        "/work/venvs/torchopt/bin/pip install numpy optree typing-extensions graphviz",
        f"{portable(d['command'])}   # what produced this page; --quick for a short run",
        "python benchmarks/heap_trim.py   # the C allocator section",
        "# where a peer was faster, both again in one process: ours' own dependencies beside "
        "the peers' (the same files serve both environments)",
        "/work/venvs/boat/bin/pip install --target /work/venvs/bilevel-deps --no-deps tqdm "
        "higher==0.2.1",
        "python benchmarks/same_process.py "
        + " ".join(f"benchmarks/results/{name}" for name in d.get("sources", []))
        + " --deps /work/venvs/bilevel-deps",
        report_command(d.get("sources")),
        "```",
        "",
        f"Measured with {d['rounds']} alternation rounds of about {d['budget_s']} s of timed "
        f"steps per implementation ({'quick mode' if d['quick'] else 'full mode'}; {total}); "
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}"
        + (f"; GPU {m['cuda']}" if m.get("cuda") else "; no GPU")
        + f"; torch threads per process: {d['threads']}; load average "
        f"{d['loadavg_start'][0]:.2f} at the start, "
        f"{d.get('loadavg_end', d['loadavg_start'])[0]:.2f} at the end; checkout "
        f"{d['git']['commit']}{dirty}; {versions}.",
        "",
        "Other locations: `BENCH_BOAT_PYTHON=... BENCH_TORCHOPT_PYTHON=...`. A peer whose "
        "environment is missing is listed above as unavailable and the rest still runs.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a results file that does not exist is refused."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results",
        nargs="*",
        type=existing_file,
        help="results files of run.py (default: the newest in benchmarks/results); later "
        "ones replace the records they repeat",
    )
    return parser.parse_args(argv)


def merged(sources: list[Path]) -> dict[str, Any]:
    """The results of ``sources`` as one run: the first file's, where later files replace the
    records they repeat (a configuration measured again) and add the others."""
    data = json.loads(sources[0].read_text())
    data["sources"] = [sources[0].name]
    for extra in sources[1:]:
        extra_data = json.loads(extra.read_text())
        more = extra_data["records"]
        again = {(r["kind"], key(r["config"]), r["impl"]) for r in more}
        data["records"] = [
            r for r in data["records"] if (r["kind"], key(r["config"]), r["impl"]) not in again
        ] + more
        code = code_revision(extra_data.get("git"))
        data.setdefault("merged", []).append(
            f"`{extra.name}` (`{extra_data['command']}`{', ' + code if code else ''})"
        )
        data["sources"].append(extra.name)
    return data


def main(argv: list[str] | None = None) -> None:
    sources = parse_args(argv).results
    if not sources:
        dated = sorted(RESULTS.glob("2*-*.json"))  # the runs' files, named by date and time
        if not dated:
            raise SystemExit("no results yet: run python benchmarks/run.py first")
        sources = dated[-1:]
    res = Results(merged(sources))
    images = plots(res)
    PAGE.write_text(page(res, sources[0].resolve(), images))
    print(f"wrote {PAGE.relative_to(ROOT)} and {len(images)} plots")


if __name__ == "__main__":
    main()
