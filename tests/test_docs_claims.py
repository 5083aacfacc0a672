"""The numbers and commands on the documentation pages are backed by their sources.

``tests/test_docs.py`` runs the pages' marked code and checks the API reference; this file
checks what the pages *claim*:

- each generated page (benchmarks, method families, convergence curves, Omniglot) is what its
  generator writes from the committed JSON now (a hand edit or a stale page fails);
- the printed output shown under a tested block is what the block prints;
- every ``--flag`` of a command quoted on a page exists in that script;
- bounds and summaries stated in words cover the data they summarize;
- hand-written numbers that cite a JSON file agree with it, and the reproduce commands of the
  Omniglot page give the settings its runs were made with.

Nothing here runs a benchmark: the generators are called on the committed JSON, with their
figures drawn into a temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from local_modules import local_modules

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCHMARKS = ROOT / "benchmarks"
EXAMPLES = ROOT / "examples"
RESULTS = BENCHMARKS / "results"


def page(name: str) -> str:
    return (DOCS / name).read_text()


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


@contextlib.contextmanager
def imported(folder: Path, name: str) -> Iterator:
    """``folder/name.py`` imported with its folder's own modules (see
    :func:`local_modules.local_modules`)."""
    with local_modules(folder, name) as (module,):
        yield module


# --------------------------------------------------------------------------- generated pages


def between(text: str, begin: str, end: str) -> str:
    return text[text.index(begin) : text.index(end)]


def report_sources(text: str) -> list[Path]:
    """The results files of the page's own ``python benchmarks/report.py`` command: those it
    names, or the newest run's (what the command reads without arguments)."""
    (line,) = [x for x in text.splitlines() if x.startswith("python benchmarks/report.py")]
    named = [ROOT / a for a in shlex.split(line.split("#")[0])[2:]]
    return named or sorted(RESULTS.glob("2*-*.json"))[-1:]


def test_benchmarks_page_is_what_report_writes(monkeypatch, tmp_path) -> None:
    """The page is what the command in its reproduce section writes (from one run, or from
    several merged)."""
    sources = report_sources(page("benchmarks.md"))
    with imported(BENCHMARKS, "report") as report:
        monkeypatch.setattr(report, "IMAGES", tmp_path)
        res = report.Results(report.merged(sources))
        expected = report.page(res, sources[0].resolve(), report.plots(res))
    assert page("benchmarks.md") == expected, "run the page's python benchmarks/report.py"


def test_method_families_page_is_what_its_report_writes(monkeypatch, tmp_path) -> None:
    with imported(BENCHMARKS, "method_families_report") as report:
        monkeypatch.setattr(report, "IMAGES", tmp_path)
        data = json.loads(report.SOURCE.read_text())
        expected = report.Page(data).render(report.SOURCE.resolve())
    assert page("method_families.md") == expected, "run benchmarks/method_families_report.py"


def test_curves_page_is_what_its_report_writes(tmp_path) -> None:
    with imported(BENCHMARKS, "bilevel_curves_report") as report:
        out = tmp_path / "bilevel_curves.md"
        report.write(
            load("bilevel_curves.json"), out, tmp_path / "img", load("benchopt_quadratic.json")
        )
    assert page("bilevel_curves.md") == out.read_text(), "run bilevel_curves_report.py"


def test_curves_page_quotes_every_command_its_results_were_made_with() -> None:
    """The curves of an ``--update`` run replace some methods' runs in the JSON: the page
    gives its command and date next to the full run's, as it does for benchopt's updates."""
    text = page("bilevel_curves.md")
    for source in ("bilevel_curves.json", "benchopt_quadratic.json"):
        data = load(source)
        for run in [data, *data.get("updates", [])]:
            assert f"\n{run['command']}\n" in text, run["command"]
            assert run["date"][:10] in text


@pytest.mark.parametrize(
    ("script", "results", "doc"),
    [
        ("online_vs_offline", "online.json", "online.md"),
        ("memory_long_run", "memory_long_run.json", "robustness.md"),
    ],
)
def test_results_sections_are_what_their_scripts_write(script, results, doc) -> None:
    """The generated sections of the online and robustness pages (between their markers)."""
    with imported(BENCHMARKS, script) as module:
        expected = module.results_block(load(results))
    assert expected in page(doc), f"run python benchmarks/{script}.py"


def _hyper_cleaning_run(method: str) -> dict:
    """A ``results.json`` of examples/hyper_cleaning.py made before runs recorded their date
    and commit, with made-up numbers: only its fields matter here."""
    keys = ["n_train", "n_val", "corrupt", "ll_steps", "l2", "hidden", "ul_lr", "truncate"]
    keys += ["solver_iters", "tolerance", "neumann_alpha", "final_steps", "seed"]
    settings = {**dict.fromkeys(keys, 1), "ll_lr": 1.0}
    return {
        "experiment": "hyper_cleaning",
        "dataset": "mnist",
        "model": "linear",
        "method": method,
        "seed": 0,
        "settings": settings,
        "test_acc": 0.9,
        "f1": 0.9,
        "precision": 0.9,
        "recall": 0.9,
        "ul_steps": 100,
        "seconds": 60.0,
        "cpu_seconds": 50.0,
        "history": [{"step": 10, "f1": 0.9, "cpu_seconds": 5.0, "ll_grad_norm": 0.01}],
        "hardware": "x86_64",
        "baseline": {"test_acc": 0.8},
        "oracle": {"test_acc": 0.9},
        "relative_grad_norm_at_ll_steps": 0.01,
        "relative_grad_norm_at_final_steps": 0.001,
    }


def test_hyper_cleaning_cost_table_gives_the_date_and_code_of_runs_that_record_them(
    tmp_path,
) -> None:
    dated = {**_hyper_cleaning_run("reverse"), "date": "2026-12-03 05:59:59 UTC"}
    dated["git"] = {"commit": "abc1234", "dirty": True}
    runs = [("old", _hyper_cleaning_run("reverse")), ("new", dated)]
    with imported(BENCHMARKS, "hyper_cleaning_results") as generator:
        records = [generator.hyper_cleaning_record(name, r, None) for name, r in runs]
        _, results = generator.hyper_cleaning_section(records)
        head = generator.title(records, None)
    assert "| 2026-12-03, commit abc1234 (with local changes) |" in results
    assert "| not recorded |" in results
    assert "The runs `old` were made before that check." in results
    assert "made 2026-12-03 with the code of commit abc1234 (with local changes)" in head
    assert "(1 run(s) record no date or commit)" in head


def test_omniglot_tables_are_what_omniglot_results_writes_from_the_digest(tmp_path) -> None:
    """The generated blocks of docs/omniglot.md against the committed digest (the run
    folders are not in the repository)."""
    with imported(BENCHMARKS, "omniglot_results") as results:
        rows = sorted(load("omniglot_runs.json")["runs"], key=results.row_order)
        copy = tmp_path / "omniglot.md"
        copy.write_text(page("omniglot.md"))
        results.rewrite(copy, results.summary(rows), *results.SUMMARY)
        results.rewrite(copy, results.equal_table(rows), *results.EQUAL)
        results.rewrite(copy, results.table(rows))
    assert page("omniglot.md") == copy.read_text(), "run python benchmarks/omniglot_results.py"


# --------------------------------------------------------------------------- shown output

SHOWN = re.compile(r"<!-- test -->\s*\n```python\n(.*?)\n```\s*\n(?:```text\n(.*?)\n```)?", re.S)
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def same_printout(shown: str, got: str) -> bool:
    """Equal up to the last printed digit of each number; numbers below 1e-6 (solver
    residuals at round-off) only need to stay below 1e-6."""
    if NUMBER.sub("#", shown) != NUMBER.sub("#", got):
        return False
    for a, b in zip(NUMBER.findall(shown), NUMBER.findall(got), strict=True):
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
        if abs(x) < 1e-6:
            if abs(y) >= 1e-6:
                return False
            continue
        digits = a.replace(",", "").lower().split("e")[0]
        exponent = int(a.lower().split("e")[1]) if "e" in a.lower() else 0
        unit = 10.0 ** (exponent - (len(digits.split(".")[1]) if "." in digits else 0))
        if abs(x - y) > unit * 1.01:
            return False
    return True


def pages_with_output() -> list[str]:
    return sorted(
        p.name for p in DOCS.glob("*.md") if any(s for _, s in SHOWN.findall(p.read_text()))
    )


def test_some_page_shows_output() -> None:
    assert "quickstart.md" in pages_with_output()


@pytest.mark.parametrize("name", pages_with_output())
def test_shown_output_is_what_the_block_prints(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    dtype = torch.get_default_dtype()
    namespace: dict[str, object] = {"__name__": f"docs_{name[:-3]}"}
    try:
        for i, (code, shown) in enumerate(SHOWN.findall(page(name))):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # test_docs.py turns them into errors
                exec(compile(code, f"{name}[block {i}]", "exec"), namespace)
            if shown:
                got = printed.getvalue().rstrip("\n")
                assert same_printout(shown, got), f"{name}, block {i} prints:\n{got}"
    finally:
        torch.set_default_dtype(dtype)


def test_printout_comparison() -> None:
    assert same_printout("MSE 0.2731  residual 1.4e-11, 18 it", "MSE 0.2732  residual 3e-12, 18 it")
    assert not same_printout("MSE 0.2731", "MSE 0.2745")
    assert not same_printout("residual 1.4e-11", "residual 2.0e-05")
    assert not same_printout("18 iterations", "18 steps")


# --------------------------------------------------------------------------- quoted commands

COMMAND = re.compile(r"((?:examples|benchmarks|docs)/\w+\.py)((?:[ \t]+[^\s`|;&#)]+)*)")


def known_flags(script: Path) -> set[str]:
    """Every ``--flag`` string literal of the script and of the helpers its folder shares."""
    sources = [script, EXAMPLES / "_common.py", BENCHMARKS / "common.py"]
    text = "\n".join(s.read_text() for s in sources if s.exists())
    return {"--help", *re.findall(r"[\"'](--[a-z][\w-]*)[\"']", text)}


def quoted_commands() -> list[tuple[str, int, str, str]]:
    found = []
    for path in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [(path.name, number, m.group(1), m.group(2)) for m in COMMAND.finditer(line)]
    return found


def test_quoted_commands_name_scripts_and_flags_that_exist() -> None:
    commands = quoted_commands()
    assert len(commands) > 50  # the pattern still finds the pages' commands
    wrong = []
    for name, number, script, rest in commands:
        if not (ROOT / script).is_file():
            wrong.append(f"{name}:{number}: no {script}")
            continue
        flags = {f.split("=")[0] for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)}
        wrong += [
            f"{name}:{number}: {script} has no {f}" for f in flags - known_flags(ROOT / script)
        ]
    assert not wrong, wrong


def omniglot_commands() -> list[list[str]]:
    """The ``examples/omniglot.py`` command lines of docs/omniglot.md's bash blocks, with
    ``$COMMON`` expanded."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page("omniglot.md"), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        common = re.search(r'COMMON="([^"]*)"', text)
        for line in text.splitlines():
            line = line.split("#")[0]
            if "examples/omniglot.py" in line:
                if common:
                    line = line.replace("$COMMON", common.group(1))
                words = shlex.split(line)
                commands.append(words[words.index("examples/omniglot.py") + 1 :])
    return commands


def test_omniglot_reproduce_commands_give_the_runs_settings() -> None:
    """A command that names a run's folder, run with today's defaults, has the settings the
    run was made with (a default that changed since must be spelled out)."""
    with imported(BENCHMARKS, "omniglot_results") as results:
        runs = {r["name"]: r for r in load("omniglot_runs.json")["runs"]}
        with imported(EXAMPLES, "omniglot") as omniglot:
            checked, wrong = 0, []
            for argv in omniglot_commands():
                out = argv[argv.index("--out") + 1] if "--out" in argv else ""
                name = out.removeprefix("runs/omniglot/").replace("/", "-")
                if name not in runs or "--help" in argv:
                    continue
                args = omniglot.parse_args(argv)
                record = {
                    "settings": vars(args),
                    "ways": args.ways,
                    "shots": args.shots,
                    "method": args.method,
                    "ul_method": args.ul_method,
                }
                checked += 1
                if results.setting(record) != runs[name]["setting"]:
                    wrong.append(f"{name}: {results.setting(record)} != {runs[name]['setting']}")
    assert checked >= 10
    assert not wrong, wrong


# --------------------------------------------------------------------------- stated bounds


def test_benchmarks_bounds_in_words_cover_the_data() -> None:
    """'match ... to X' and 'at most Y' are upper bounds: not below the largest value."""
    data = load(sorted(RESULTS.glob("2*-*.json"))[-1].name)
    errors = [r for r in data["records"] if r["kind"] == "error" and r["impl"] == "bilevel"]
    unrolled = max(
        r["error_unrolled"]
        for r in errors
        if r["config"].get("problem") == "ridge"
        and r["config"]["method"] in ("reverse", "forward")
        and "error_unrolled" in r
    )
    distance = max(
        r["difference_to_floor"]
        for r in errors
        if r["config"].get("suite") in ("cleaning", "meta") and "difference_to_floor" in r
    )
    text = page("benchmarks.md")
    exact = float(re.search(r"unrolled LL to ([\d.e+-]+) \(float64", text).group(1))
    far = float(re.search(r"relative distance at most ([\d.e+-]+) on", text).group(1))
    assert exact >= unrolled * (1 - 1e-9), (exact, unrolled)
    assert far >= distance * (1 - 1e-9), (far, distance)


def test_hyper_cleaning_spread_in_words_covers_the_table() -> None:
    text = page("hyper_cleaning.md")
    claimed = float(re.search(r"test accuracies are within ([\d.]+) points", text).group(1))
    table = between(text, "| data | model | method | test acc |", "Cost:")
    groups: dict[tuple[str, str], list[float]] = {}
    for data, model, _, acc in re.findall(
        r"^\| (\w+) \| (\w+) \| `([\w-]+)` \| ([\d.]+)%", table, re.M
    ):
        groups.setdefault((data, model), []).append(float(acc))
    assert len(groups) >= 2
    spread = max(max(v) - min(v) for v in groups.values())
    assert claimed >= spread - 1e-9, (claimed, spread)


def test_omniglot_equal_compute_says_which_runs_did_not_get_it() -> None:
    """A run in an equal-compute ranking that stopped early, or ran on another CPU than the
    others, is said to be so wherever it is ranked (summary and table)."""
    runs = load("omniglot_runs.json")["runs"]
    machines = [r["hardware"] for r in runs]
    usual = max(set(machines), key=machines.count)
    text = page("omniglot.md")
    summary = between(text, "<!-- summary:begin -->", "<!-- summary:end -->")
    tables = between(text, "<!-- equal:begin -->", "<!-- equal:end -->")
    lines = [line for line in summary.splitlines() if line.startswith("With the same compute")]
    assert lines
    for r in runs:
        if not r.get("budget_cpu_minutes") or not (r.get("stopped") or r["hardware"] != usual):
            continue
        ranking = next(x for x in lines if f"({r['budget_cpu_minutes']:g} CPU minutes" in x)
        accuracy = re.escape(f"{r['test_accuracy_pct']:.2f}%")
        entry = re.search(accuracy + r"( \([^)]*\))?", ranking)
        assert entry and entry.group(1), f"{r['name']} ranked without a note: {ranking}"
        if r.get("stopped"):
            used = r["cpu_seconds_per_meta_step"] * r["meta_steps"] / 60
            assert f"stopped at {used:.1f} CPU minutes" in entry.group(1)
            assert f"{r['meta_steps']:,} (stopped at {used:.1f} CPU minutes" in tables
        if r["hardware"] != usual:
            assert r["hardware"].split(",")[0] in entry.group(1)


# --------------------------------------------------------------------------- hand-written numbers


def test_boat_finite_difference_answers_on_the_methods_page() -> None:
    """methods.md quotes the norms of BOAT's DARTS answer with T > 1 LL steps (zero to
    round-off, whose cosine to the exact hypergradient changed from run to run: it quoted
    cosines 0.63 and 0.08 as if they measured an answer) and of ours."""
    records = load("method_families.json")["records"]
    norms = {
        (r["config"]["problem"], r["impl"]): r["norm"]
        for r in records
        if r["kind"] == "error"
        and r["config"]["method"] == "fd"
        and r["config"].get("suite") == "regression"
        and r["config"].get("T") != 1
    }
    text = re.sub(r"\s+", " ", page("methods.md"))
    quoted = re.search(
        r"its answer is zero to round-off, norm (\S+) \(ridge, \$T = 200\$\) and (\S+) "
        r"\(logistic, \$T = 100\$\) where the one-step hypergradient's is (\S+) and (\S+) ",
        text,
    )
    assert quoted, "methods.md no longer quotes the norms of BOAT's DARTS answers"
    expected = [
        norms[("ridge", "boat")],
        norms[("logistic", "boat")],
        norms[("ridge", "bilevel")],
        norms[("logistic", "bilevel")],
    ]
    for shown, value in zip(quoted.groups(), expected, strict=True):
        assert abs(float(shown) / value - 1) < 0.05, (shown, value)
    assert norms[("ridge", "boat")] < 1e-12 * norms[("ridge", "bilevel")]


def test_memory_saving_reverse_table_matches_its_json() -> None:
    data = load("memory_saving_reverse.json")
    peak = {(r["method"], r["T"]): r["peak_delta_mib"] for r in data["runs"]}
    rows = re.findall(
        r"^\| (\d+) \| ([\d.]+) MiB \| ([\d.]+) MiB \| ([\d.]+) \| ([\d.]+) \|$",
        page("methods.md"),
        re.M,
    )
    assert len(rows) == 3
    for steps, full, saving, ratio, cpu in rows:
        t = int(steps)
        assert float(full) == pytest.approx(peak["reverse", t], abs=0.051)
        assert float(saving) == pytest.approx(peak["memory_saving_reverse", t], abs=0.051)
        ratios = data["ratios_memory_saving_over_reverse"][steps]
        assert float(ratio) == pytest.approx(ratios["memory"], rel=0.02)
        assert float(cpu) == pytest.approx(ratios["cpu_time"], abs=0.006)
    assert data["date"][:10] in page("methods.md")


def test_omniglot_prose_numbers_match_their_sources() -> None:
    text = re.sub(r"\s+", " ", page("omniglot.md"))
    runs = {r["name"]: r for r in load("omniglot_runs.json")["runs"]}
    # Reptile trains on support and query images together
    reptile = runs["equal-reptile"]
    query = int(re.search(r"(\d+) queries/class", reptile["setting"]).group(1))
    images = reptile["ways"] * (reptile["shots"] + query)
    quoted = re.search(r"\*\*Reptile\*\* .*? on the task's (\d+) images", text)
    assert quoted and int(quoted.group(1)) == images
    # the first-order MAML default's result is one of the runs
    quoted = re.search(r"defaults to five inner steps of 0\.1: \*\*([\d.]+) ± ([\d.]+)%\*\*", text)
    assert quoted
    assert any(
        (f"{r['test_accuracy_pct']:.2f}", f"{r['test_ci95_pct']:.2f}") == quoted.groups()
        and "5 inner steps (lr 0.1)" in r["setting"]
        and r["method"] == "fomaml"
        for r in runs.values()
    ), quoted.groups()
    # the inner-loop convergence of iMAML's long run
    inner = load("imaml_inner_convergence.json")
    assert f"at {100 * inner['ll_grad_ratio']:.1f}% of its first value" in text
    assert f"shrank it only by {inner['contraction']:.3f}" in text
    assert f"{inner['estimated_left_over_travelled']:.2f} times the distance travelled" in text
    assert f"{100 * inner['accuracy_run_lr']['20']:.1f}% after the run's 20 steps" in text
    assert f"{100 * inner['accuracy_small_lr']['400']:.1f}% at the near-solution" in text
    # first-order MAML against MAML after 300 meta-steps (the diagnosis runs)
    for run, quoted, digits in (("maml", "88.5", 1), ("fomaml_inner_lr0.2", "77", 0)):
        log = load(f"omniglot_diagnosis_train_{run}.json")["log"]
        last = [e["val_accuracy"] for e in log if e.get("val_accuracy") is not None][-1]
        assert f"{100 * last:.{digits}f}" == quoted and f"{quoted}%" in text, (run, last)


def test_troubleshooting_states_the_growth_default() -> None:
    """A growing LL loss raises by default; the page must not describe it as a warning."""
    from bilevel.ll import GradientDescent

    model = torch.nn.Linear(2, 1)
    ll = GradientDescent(lambda s: s["ll_model"].weight.sum(), model, model, lr=0.1, iters=2)
    assert ll.on_growth == "raise"
    section = between(page("troubleshooting.md"), '## "The LL loss grew', '## "lr (a UL variable')
    assert "LowerLevelDivergenceError" in section and 'on_growth="raise"' in section


def test_finite_difference_many_steps_cosines_match_their_json() -> None:
    """methods.md quotes benchmarks/fd_many_steps.py's cosines and norm ratios."""
    results = {r["condition_number"]: r for r in load("fd_many_steps.json")["results"]}
    text = re.sub(r"\s+", " ", page("methods.md"))
    quoted = re.findall(
        r"([\d.]+)-([\d.]+) at condition number (\d+), with a norm ([\d.]+)-([\d.]+)%", text
    )
    assert len(quoted) == 2, quoted
    for low, high, kappa, n_low, n_high in quoted:
        r = results[float(kappa)]
        assert (low, high) == (f"{r['cosine_min']:.3f}", f"{r['cosine_max']:.3f}")
        digits = 0 if float(n_low) >= 10 else 1
        assert (n_low, n_high) == (
            f"{100 * r['norm_ratio_min']:.{digits}f}",
            f"{100 * r['norm_ratio_max']:.{digits}f}",
        )
    assert "benchmarks/results/fd_many_steps.json" in text


def test_omniglot_first_order_maml_curvature_matches_the_diagnosis() -> None:
    """The Hessian eigenvalues quoted for first-order MAML's step, and alpha times them, are
    the extremes over the tasks of the cited diagnosis files (at iMAML's adapted weights)."""
    text = re.sub(r"\s+", " ", page("omniglot.md"))
    quoted = re.search(
        r"eigenvalues lie between ([-\d.]+) and ([\d.]+) at initialization and between "
        r"([-\d.]+) and ([\d.]+) at a MAML-trained point, so that with MAML's single step "
        r"\$\\alpha = ([\d.]+)\$, \$\\alpha \\cdot \\text\{eig\}\(H\)\$ there spans about "
        r"\$\[([-\d.]+), ([\d.]+)\]\$ and \$\[([-\d.]+), ([\d.]+)\]\$",
        text,
    )
    assert quoted, "omniglot.md no longer quotes the support Hessian's range for MAML's step"
    values = [float(x) for x in quoted.groups()]
    alpha = values[4]
    for i, name in enumerate(("init", "maml300")):
        tasks = load(f"omniglot_diagnosis_imaml_{name}.json")["per_reg"]["2.0"]["tasks"]
        low = min(t["curvature"]["H_lambda_min"] for t in tasks)
        high = max(t["curvature"]["H_lambda_max"] for t in tasks)
        assert values[2 * i] == pytest.approx(low, abs=0.051), name
        assert values[2 * i + 1] == pytest.approx(high, abs=0.051), name
        assert values[5 + 2 * i] == pytest.approx(alpha * low, rel=0.02), name
        assert values[6 + 2 * i] == pytest.approx(alpha * high, rel=0.02), name
    long = {r["name"]: r for r in load("omniglot_runs.json")["runs"]}["long-imaml-damped-5w1s-h32"]
    assert (
        f"{long['test_accuracy_pct']:.2f} ± {long['test_ci95_pct']:.2f}% at "
        f"{long['meta_steps']:,}" in text
    )
    assert f"{long['cpu_minutes']:.1f} CPU minutes" in text


def test_every_peer_with_less_memory_or_a_closer_answer_is_named() -> None:
    """Where a peer's peak memory or hypergradient error is below ours, however little, the
    benchmarks and method families pages say so (counted here from the JSON directly)."""
    data = load(sorted(RESULTS.glob("2*-*.json"))[-1].name)
    by = {
        (r["kind"], json.dumps(r["config"], sort_keys=True), r["impl"]): r for r in data["records"]
    }
    text = page("benchmarks.md")
    lighter = set()
    for (kind, config, impl), r in by.items():
        c = json.loads(config)
        if kind != "memory" or impl not in ("boat", "torchopt") or c["suite"] == "sweep":
            continue
        ours = by.get((kind, config, "bilevel"))
        if ours and "bytes" in ours and "bytes" in r and r["bytes"] < ours["bytes"]:
            lighter.add((impl, json.dumps({k: v for k, v in c.items() if k != "suite"})))
    listed = re.findall(r"^- (BOAT|TorchOpt) on .* MiB against our .* MiB", text, re.M)
    assert len(listed) == len(lighter) > 0
    assert re.search(r"Where a peer's hypergradient is more accurate than ours", text)

    families = load("method_families.json")
    text = page("method_families.md")
    records = {
        (r["kind"], json.dumps(r["config"], sort_keys=True), r["impl"]): r
        for r in families["records"]
    }
    less = closer = 0
    for (kind, config, impl), r in records.items():
        ours = records.get((kind, config, "bilevel"))
        if impl != "boat" or ours is None:
            continue
        suite = json.loads(config)["suite"]
        if kind == "memory" and suite in ("cleaning", "meta"):
            less += "bytes" in r and "bytes" in ours and r["bytes"] < ours["bytes"]
        if kind == "error" and suite == "regression":
            for field in ("error_exact", "error_target"):
                closer += field in r and field in ours and r[field] < ours[field]
        if kind == "error" and suite == "training" and r.get("final") and ours.get("final"):
            closer += r["final"]["test_accuracy"] > ours["final"]["test_accuracy"]
    assert text.count("- **Less memory**: ") == less > 0
    lines = re.findall(r"^- \*\*(?:More accurate|Closer|Higher)[^*]*\*\*: ", text, re.M)
    assert len(lines) == closer > 0


def test_choosing_page_quotes_the_benchmarks_page() -> None:
    """The "Measured" figures of docs/choosing.md are the benchmarks page's, rounded (they
    were an older machine's: 2.0 s for Reverse at T = 1000 where the page gives 3.5 s, and
    Forward 16 times Reverse where it gives 47)."""
    bench = page("benchmarks.md")

    def first_cells(section: str, label: str) -> list[float]:
        start = bench.index(section)
        text = bench[start : bench.index("\n## ", start + 5)]
        rows = re.findall(rf"^\| {re.escape(label)} \| ([\d,.e+-]+)", text, re.M)
        return [float(r.replace(",", "")) for r in rows]

    scaling = "## Scaling with the number of LL steps"
    reverse_ms, reverse_mib = first_cells(scaling, "Reverse<br><small>T=1000</small>")
    truncated_ms, truncated_mib = first_cells(scaling, "Truncated<br><small>T=1000, K=10</small>")
    cg_ms, cg_mib = first_cells(scaling, "Implicit CG<br><small>T=1000, k=10</small>")
    forward_100 = first_cells(scaling, "Forward<br><small>T=100</small>")[0]
    reverse_100 = first_cells(scaling, "Reverse<br><small>T=100</small>")[0]
    errors = "**ridge: relative error"
    exact = max(
        first_cells(errors, "Reverse<br><small>T=200</small>")[0],
        first_cells(errors, "Forward<br><small>T=200</small>")[0],
    )
    cg_error = first_cells(errors, "Implicit CG<br><small>T=200, k=10</small>")[0]
    neumann_error = first_cells(errors, "Implicit Neumann<br><small>T=200, k=50</small>")[0]

    def power(x: float) -> str:
        mantissa, exponent = f"{x:.1e}".split("e")
        mantissa = mantissa.removesuffix(".0")
        scale = f"10^{{{int(exponent)}}}"
        return f"${scale}$" if mantissa == "1" else f"${mantissa} \\times {scale}$"

    text = re.sub(r"\s+", " ", page("choosing.md"))
    quoted = [
        f"`Reverse` takes {reverse_ms / 1000:.1f} s and {reverse_mib:.0f} MiB",
        f"`Truncated(truncate_iter=10)` {truncated_ms / 1000:.1f} s and {truncated_mib:.0f} MiB",
        f'`Implicit(method="cg")` {cg_ms / 1000:.1f} s and {cg_mib:.0f} MiB',
        f"takes {forward_100 / reverse_100:.0f} times as long as `Reverse`",
        f"exact to round-off ({power(exact)})",
        f"CG with 10 iterations reaches {power(cg_error)}",
        f"series with 50 terms {power(neumann_error)}",
    ]
    missing = [q for q in quoted if q not in text]
    assert not missing, missing
    machine = re.search(r"\*\*Machine\.\*\* ([^,]+),", bench).group(1)
    assert f"{machine}, one thread" in text
