"""The benchmark scripts' bookkeeping: partial re-runs merged into a results file, the
commands and summaries recorded with the results, and which results a page may quote."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from local_modules import local_modules

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmark_module(name: str):
    """benchmarks/<name>.py (see :func:`local_modules.local_modules`)."""
    with local_modules(BENCHMARKS, name) as (module,):
        yield module


@pytest.fixture(scope="module")
def method_families():
    """benchmarks/method_families.py (see :func:`_benchmark_module`)."""
    yield from _benchmark_module("method_families")


@pytest.fixture(scope="module")
def omniglot_results():
    """benchmarks/omniglot_results.py (see :func:`_benchmark_module`)."""
    yield from _benchmark_module("omniglot_results")


def _run(methods, date, records, impls=("bilevel", "boat", "floor")):
    return {
        "versions": dict.fromkeys(impls, "1"),
        "command": "python benchmarks/method_families.py",
        "date": date,
        "loadavg_start": [1.0],
        "loadavg_end": [1.0],
        "git": "abc",
        "only_methods": methods,
        "duration_s": 60.0,
        "records": records,
    }


def _record(method, seconds):
    return {"kind": "time", "config": {"method": method}, "impl": "bilevel", "s": seconds}


def test_a_partial_rerun_replaces_its_records_and_the_notes_it_supersedes(method_families):
    full = _run(None, "d0", [_record("bda", 1.0), _record("ptt", 2.0), _record("cg", 3.0)])
    first = method_families.merge(full, _run(["bda"], "d1", [_record("bda", 1.5)]))
    second = method_families.merge(first, _run(["bda", "ptt"], "d2", [_record("bda", 1.2)]))
    third = method_families.merge(second, _run(["cg"], "d3", [_record("cg", 2.5)]))
    seconds = {r["config"]["method"]: r["s"] for r in third["records"]}
    assert seconds == {"bda": 1.2, "ptt": 2.0, "cg": 2.5}
    # d1's note is superseded by d2's (a superset of its methods); d3's covers other methods
    assert [n["date"] for n in third["remeasured"]] == ["d2", "d3"]
    assert third["date"] == "d0"  # the header stays the full run's


def test_a_rerun_of_fewer_implementations_keeps_the_earlier_note(method_families):
    """Records the re-run did not measure again (another implementation's, or memory) keep the
    note that says when they were measured."""
    full = _run(None, "d0", [_record("bda", 1.0)])
    first = method_families.merge(full, _run(["bda"], "d1", [_record("bda", 1.5)]))
    memory = {"kind": "memory", "config": {"method": "bda"}, "impl": "bilevel", "s": 9.0}
    first["records"].append(memory)
    first["remeasured"][0]["kinds"] = ["memory", "time"]
    second = method_families.merge(first, _run(["bda"], "d2", [_record("bda", 1.2)], ["bilevel"]))
    assert [n["date"] for n in second["remeasured"]] == ["d1", "d2"]
    assert memory in second["records"]


def test_a_note_from_before_implementations_and_kinds_were_recorded_is_superseded(
    method_families,
):
    """A note without ``impls``/``kinds`` (an older file) stands for the full run's
    implementations and kinds: a re-run of the same methods on all of them replaces it
    instead of listing the same re-measurement twice."""
    full = _run(None, "d0", [_record("bda", 1.0)])
    first = method_families.merge(full, _run(["bda"], "d1", [_record("bda", 1.5)]))
    for key in ("impls", "kinds"):
        del first["remeasured"][0][key]
    second = method_families.merge(first, _run(["bda"], "d2", [_record("bda", 1.2)]))
    assert [n["date"] for n in second["remeasured"]] == ["d2"]
    only_ours = method_families.merge(
        first, _run(["bda"], "d3", [_record("bda", 1.1)], ["bilevel"])
    )  # the boat and floor records of d1 are still there: its note stays
    assert [n["date"] for n in only_ours["remeasured"]] == ["d1", "d3"]


def _omniglot_row(method, budget, accuracy, setting="5-way 1-shot; 32 filters"):
    return {
        "name": f"equal{budget}-{method}",
        "method": method,
        "ul_method": "reverse",
        "ways": 5,
        "shots": 1,
        "setting": setting,
        "budget_cpu_minutes": budget,
        "test_accuracy_pct": accuracy,
        "test_ci95_pct": 0.5,
        "meta_steps": 100,
        "cpu_seconds_per_meta_step": 0.3,
        "best_step": 100,
        "test_tasks": 600,
        "train_minutes": budget,
        "seconds_per_meta_step": 0.3,
        "hardware": "x86_64",
    }


def test_equal_compute_tables_per_budget_with_the_runs_still_going(omniglot_results):
    """Each budget given to several runs gets its own table, the largest first; a budget
    that only some runs have reached names the others (by method and settings) as going
    on; a lone long run (budget 150) makes no table."""
    rows = [
        _omniglot_row(m, 10, a) for m, a in (("maml", 96.7), ("fomaml", 95.5), ("metasgd", 98.2))
    ]
    rows += [_omniglot_row("maml", 60, 98.1), _omniglot_row("metasgd", 60, 98.6)]
    rows += [_omniglot_row("maml", 150, 98.5)]
    groups = omniglot_results.equal_groups(rows)
    assert [(b, len(r)) for b, r in groups] == [(60, 2), (10, 3)]
    pending = omniglot_results.pending_runs(60, groups[0][1], groups)
    assert [r["method"] for r in pending] == ["fomaml"]
    assert omniglot_results.pending_runs(10, groups[1][1], groups) == []
    text = "\n".join(omniglot_results.equal_table(rows))
    assert text.index("**60 CPU minutes**") < text.index("**10 CPU minutes**")
    assert "Not yet given 60 CPU minutes" in text and "first-order MAML" in text
    summary = "\n".join(omniglot_results.summary(rows))
    assert "60 CPU minutes of meta-training each, one thread; 2 of 3 so far" in summary
    # another setting is another run: not counted as done
    rows[3]["setting"] = "5-way 1-shot; 64 filters"
    groups = omniglot_results.equal_groups(rows)
    assert [r["method"] for r in omniglot_results.pending_runs(60, groups[0][1], groups)] == [
        "maml",
        "fomaml",
    ]
    # a variant made only with the larger budget is not going on to the smaller one
    rows[3]["setting"] = "5-way 1-shot; 32 filters"
    rows.append({**_omniglot_row("maml", 60, 98.0), "setting": "failed meta-steps skipped"})
    groups = omniglot_results.equal_groups(rows)
    assert omniglot_results.pending_runs(10, groups[1][1], groups) == []
    summary = "\n".join(omniglot_results.summary(rows))
    assert "10 CPU minutes of meta-training each, one thread; the" in summary


def test_feature_norm_runs_are_named_and_described(omniglot_results):
    """A hyper-representation run with --feature-norm is told apart from one without, in
    the method's name and in its settings line."""
    row = {**_omniglot_row("hyperrep", 60, 97.0), "feature_norm": 5.0, "ll": "gd"}
    assert omniglot_results.method_name(row) == (
        "hyper-representation, features of norm 5 (Reverse)"
    )
    assert omniglot_results.method_name({**row, "feature_norm": None}) == (
        "hyper-representation (Reverse)"
    )
    settings = {
        "hidden": 32,
        "inner_steps": 10,
        "inner_lr": 0.1,
        "meta_batch": 8,
        "query": 5,
        "meta_lr": 1e-3,
        "head_l2": 1e-3,
        "eval_inner_steps": 10,
        "feature_norm": 5.0,
    }
    run = {"method": "hyperrep", "ul_method": "reverse", "ways": 5, "shots": 1}
    text = omniglot_results.setting({**run, "settings": settings})
    assert text.endswith("head L2 0.001; features scaled to norm 5")
    del settings["feature_norm"]
    assert "norm" not in omniglot_results.setting({**run, "settings": settings})


@pytest.fixture(scope="module")
def online_vs_offline():
    """benchmarks/online_vs_offline.py (see :func:`_benchmark_module`)."""
    yield from _benchmark_module("online_vs_offline")


def test_online_results_record_the_command_that_made_them(online_vs_offline, tmp_path, monkeypatch):
    """The command on docs/online.md is the one that ran: run again, it gives the recorded
    settings (it was recorded without its arguments, so a shorter run quoted the defaults)."""
    page = tmp_path / "docs" / "online.md"
    page.parent.mkdir()
    begin, end = online_vs_offline.BEGIN, online_vs_offline.END
    page.write_text(f"before\n{begin}\nold\n{end}\nafter\n")
    monkeypatch.setattr(online_vs_offline, "ROOT", tmp_path)
    argv = ["--n", "20", "--d", "4", "--ll-steps", "5", "--budget", "10", "--ul-lrs", "0.05"]
    monkeypatch.setattr(sys, "argv", ["benchmarks/online_vs_offline.py", *argv])
    online_vs_offline.main()
    result = json.loads((tmp_path / "benchmarks" / "results" / "online.json").read_text())
    command = shlex.split(result["command"])
    assert command == ["python", "benchmarks/online_vs_offline.py", *argv]
    rerun = online_vs_offline.make_parser().parse_args(command[2:])
    assert vars(rerun) == result["settings"]
    assert set(result["git"]) == {"commit", "dirty"}
    assert f"`{result['command']}`" in page.read_text()


def test_online_results_elsewhere_leave_the_committed_ones_and_the_page(
    online_vs_offline, tmp_path, monkeypatch
):
    """``--out`` elsewhere (a quick try): the committed results and the page they make are
    left as they are (before, every run overwrote both)."""
    page = tmp_path / "docs" / "online.md"
    page.parent.mkdir()
    begin, end = online_vs_offline.BEGIN, online_vs_offline.END
    page.write_text(f"before\n{begin}\nold\n{end}\nafter\n")
    monkeypatch.setattr(online_vs_offline, "ROOT", tmp_path)
    elsewhere = tmp_path / "try" / "online.json"
    argv = ["--n", "20", "--d", "4", "--ll-steps", "5", "--budget", "10", "--ul-lrs", "0.05"]
    online_vs_offline.main([*argv, "--out", str(elsewhere)])
    assert json.loads(elsewhere.read_text())["runs"]
    assert not (tmp_path / "benchmarks" / "results" / "online.json").exists()
    assert page.read_text() == f"before\n{begin}\nold\n{end}\nafter\n"


@pytest.fixture(scope="module")
def benchopt_quadratic():
    """benchmarks/benchopt_quadratic.py (see :func:`_benchmark_module`)."""
    yield from _benchmark_module("benchopt_quadratic")


def test_a_thinned_curve_gives_the_summary_of_the_whole_curve(benchopt_quadratic):
    """The JSON keeps thinned curves and ``--resummarize`` recomputes the summaries from
    them: the lowest point (``best_subopt``) must be kept, also where it is a dip of a curve
    that has levelled off, between the points kept for the iteration count and the levels."""
    curve = []
    for i in range(400):  # down to a floor of 2e-3 (between two levels), with noise
        subopt = max(10.0 ** (-1 - i / 100), 2e-3) * (1.5 if i % 2 else 1.0)
        curve.append({"iters": i, "time": 0.01 * i, "subopt": subopt, "distance": subopt})
    kept = {p["iters"] for p in benchopt_quadratic.thin(curve)}
    dip = next(i for i in range(300, 400) if i not in kept)
    curve[dip]["subopt"] = 1.5e-3  # the lowest point, above the next level (1e-3)
    thinned = benchopt_quadratic.thin(curve)
    assert len(thinned) < len(curve) / 2
    summary = benchopt_quadratic.summarize([{"curve": thinned}], 1.0)
    assert summary == benchopt_quadratic.summarize([{"curve": curve}], 1.0)
    assert summary["best_subopt"] == 1.5e-3


@pytest.fixture(scope="module")
def method_families_report():
    """benchmarks/method_families_report.py (see :func:`_benchmark_module`)."""
    yield from _benchmark_module("method_families_report")


def test_a_process_check_made_before_the_measurement_is_not_quoted(method_families_report):
    """The page explains a cell over the floor target by its re-timing in one process
    (process_check.py), a separate file: a check older than the run, or than a re-measurement
    of the method, says nothing about these numbers."""
    report = method_families_report
    data = json.loads(report.SOURCE.read_text())
    later = datetime.datetime.fromisoformat(data["date"]) + datetime.timedelta(days=1)
    later = later.isoformat()  # after the run and after the committed process check

    def notes(run: dict) -> str:
        page = report.Page(run)
        over = [(c, r) for c, r in page.floor_targets() if r > report.TARGET_FLOOR]
        assert over, "the committed run has a cell over the target"
        return "\n".join(page.over_notes(over))

    quoted = "in one process**"
    assert quoted in notes(data)
    assert quoted not in notes({**data, "date": later})
    over = {c["method"] for c, r in report.Page(data).floor_targets() if r > report.TARGET_FLOOR}
    again = {"date": later, "methods": sorted(over)}
    assert quoted not in notes({**data, "remeasured": [again]})
    other = {"date": later, "methods": ["reverse"]}
    assert quoted in notes({**data, "remeasured": [other]})


@pytest.fixture(scope="module")
def darts_step_budget():
    """benchmarks/darts_step_budget.py (see :func:`_benchmark_module`)."""
    yield from _benchmark_module("darts_step_budget")


def test_the_floor_with_checks_takes_the_same_step_and_refuses_a_nan(darts_step_budget):
    """The third runner of darts_step_budget.py is the floor's computation (its checks aside),
    as the library's is: the three hypergradients agree to round-off; and its checks do
    check: a NaN in the data is refused before the UL step."""
    _, built = darts_step_budget.runners("ridge")
    assert (
        darts_step_budget.agree(built) <= 1e-10
    )  # round-off, amplified by the difference quotient
    checked = built["checked"]
    before = checked.lam.detach().clone()
    data = checked.s.train[0]
    data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="LL loss"):
        checked.step()
    assert torch.equal(checked.lam.detach(), before)


def test_the_step_budget_quotes_its_split_and_where_the_checked_floor_lies(
    method_families_report, tmp_path, monkeypatch
):
    """darts_step_budget.py's split of one-step DARTS' fixed cost is quoted with its ranges;
    whether the floor with the checks is within the target is read from the numbers, not
    written in; without the file the page says nothing of it."""
    report = method_families_report
    path = tmp_path / "budget.json"
    monkeypatch.setattr(report, "STEP_BUDGET", path)
    assert report.step_budget() == ""

    def write(checked: list[float]) -> str:
        cells = [
            {
                "over_floor": {"checked": c},
                "checks_us": 100.0 + 50 * i,
                "rest_us": 500.0 + 90 * i,
                "runner_us": 150.0 + 20 * i,
            }
            for i, c in enumerate(checked)
        ]
        budget = {"command": "python3 b.py", "date": "d", "cpu": "cpu", "cells": cells}
        path.write_text(json.dumps(budget))
        return report.step_budget()

    text = write([1.07, 1.05])
    assert "100-150 µs per UL step" in text and "500-590 µs" in text
    assert "150-170 µs are the runner's" in text
    assert "1.05-1.07x of the floor, within 1.1x" in text
    assert "1.05-1.12x of the floor, above 1.1x" in write([1.05, 1.12])
    assert "runs at 1.07x of the floor, within 1.1x" in write([1.071, 1.074])


@pytest.fixture(scope="module")
def hyper_cleaning_results():
    """benchmarks/hyper_cleaning_results.py (see :func:`_benchmark_module`)."""
    yield from _benchmark_module("hyper_cleaning_results")


def test_the_hyper_cleaning_page_is_what_its_committed_digest_gives(
    hyper_cleaning_results, tmp_path
):
    """Without runs at hand docs/hyper_cleaning.md is rendered from the digest alone, byte for
    byte; the digest and the plots are left alone, and every plot the digest names is
    committed (and no other)."""
    module = hyper_cleaning_results
    digest = module.DIGEST.read_bytes()
    page, img = tmp_path / "hyper_cleaning.md", tmp_path / "img"
    module.main(["--runs", str(tmp_path / "no-runs"), "--page", str(page), "--img", str(img)])
    assert page.read_text() == (BENCHMARKS.parent / "docs" / "hyper_cleaning.md").read_text()
    assert module.DIGEST.read_bytes() == digest and not img.exists()
    records = json.loads(digest)
    named = {r.get("image") for e in module.EXPERIMENTS for r in records[e]} - {None}
    committed = BENCHMARKS.parent / "docs" / "img" / "hyper_cleaning"
    assert named == {path.name for path in committed.glob("*.png")}


def _hyper_cleaning_run(name: str, test_acc: float) -> dict:
    """A results.json of examples/hyper_cleaning.py, with the fields the page reads."""
    settings = {"n_train": 5000, "n_val": 5000, "ll_lr": 1.0, "l2": 0.01, "final_steps": 500}
    return {
        "experiment": "hyper_cleaning",
        "dataset": "mnist",
        "model": "linear",
        "method": name,
        "seed": 0,
        "command": f"python examples/hyper_cleaning.py --method {name}",
        "settings": {**settings, "log_every": 10},
        "hardware": "CPU, 1 thread(s)",
        "date": "2026-12-03 06:00:00 UTC",
        "git": {"commit": "abc1234", "dirty": False},
        **{"test_acc": test_acc, "f1": 0.9, "precision": 0.9, "recall": 0.9},
        **{"ul_steps": 100, "seconds": 60.0, "cpu_seconds": 50.0},
        "baseline": {"test_acc": 0.8, "val_acc": 0.8},
        "oracle": {"test_acc": 0.9, "val_acc": 0.9},
        "relative_grad_norm_at_ll_steps": 0.01,
        "relative_grad_norm_at_final_steps": 0.001,
        "history": [{"step": 10, "f1": 0.95, "cpu_seconds": 5.0, "ll_grad_norm": 0.01}],
    }


def test_runs_at_hand_replace_their_records_and_plots_and_keep_the_others(
    hyper_cleaning_results, tmp_path
):
    """A run found under --runs replaces its record in the digest (what the page shows, not
    its history) and its plot; the other runs' records and plots stay; a plot of no record
    is removed."""
    module = hyper_cleaning_results
    runs, img, digest = tmp_path / "runs", tmp_path / "img", tmp_path / "digest.json"
    old = {
        name: module.hyper_cleaning_record(name, _hyper_cleaning_run(name, 0.5), f"{name}.png")
        for name in ("reverse", "truncated")
    }
    digest.write_text(json.dumps({"hyper_cleaning": list(old.values())}))
    img.mkdir()
    for name in ("reverse", "truncated", "withdrawn"):
        (img / f"{name}.png").write_bytes(b"old")
    folder = runs / "hyper_cleaning" / "truncated"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(_hyper_cleaning_run("truncated", 0.75)))
    (folder / "weights_hist.png").write_bytes(b"new")
    page = tmp_path / "page.md"
    args = ["--runs", str(runs), "--digest", str(digest), "--page", str(page), "--img", str(img)]
    module.main([*args, "--conditions", "two at a time"])
    records = {r["name"]: r for r in json.loads(digest.read_text())["hyper_cleaning"]}
    assert records["reverse"] == old["reverse"] and records["truncated"]["test_acc"] == 0.75
    assert "history" not in records["truncated"]
    assert {p.name: p.read_bytes() for p in img.iterdir()} == {
        "reverse.png": b"old",
        "truncated.png": b"new",
    }
    text = page.read_text()
    assert "75.00%" in text and "50.00%" in text and "two at a time" in text
    assert "2026-12-03, commit abc1234" in text


def test_the_omniglot_diagnosis_saves_and_reads_its_parameters_as_checkpoints(tmp_path) -> None:
    """``omniglot_diagnosis.py train --save`` wrote its meta-parameters with a bare
    ``torch.save`` (a run stopped mid-write left a cut-short file) and ``--checkpoint`` read
    them with a bare ``torch.load``, past the checks of ``bilevel.checkpoint``: now both go
    through it. A round trip keeps every parameter bitwise; a cut-short file, or one the
    script wrote before, is refused with the cure."""
    import argparse

    for diagnosis in _benchmark_module("omniglot_diagnosis"):
        net = diagnosis.Net(5, 4, torch.float64, seed=0)
        theta = net.init()
        path = tmp_path / "step-{step}.pt"
        args = argparse.Namespace(save=str(path), hidden=4, ways=5, seed=0, data_root=tmp_path)
        diagnosis.save_params(net, theta, args, 3)
        saved = diagnosis.load_params(str(tmp_path / "step-3.pt"))
        assert (saved["hidden"], saved["ways"], saved["meta_steps"]) == (4, 5, 3)
        for name, value in zip(net.names, theta, strict=True):
            assert torch.equal(saved["params"][name], value)
        whole = (tmp_path / "step-3.pt").read_bytes()
        (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
        with pytest.raises(SystemExit, match=r"(?s)cut\.pt.*train --save"):
            diagnosis.load_params(str(tmp_path / "cut.pt"))
        torch.save({"params": saved["params"], "hidden": 4, "ways": 5}, tmp_path / "old.pt")
        with pytest.raises(SystemExit, match=r"(?s)old\.pt.*not a bilevel checkpoint.*again"):
            diagnosis.load_params(str(tmp_path / "old.pt"))


def test_what_could_not_run_lists_each_failure_once_and_explains_a_stopped_divergence():
    """A configuration that failed in several kinds of measurement (error, time) is listed
    once; where the library's LL growth check stopped it, the page says that the others ran
    the same diverging LL without a check."""
    config = {"suite": "meta", "problem": "meta", "method": "imaml", "batch": 32}
    grew = "LowerLevelDivergenceError: The LL loss grew from 1.6 to 1.8 over 5 LL steps"
    records = [
        {"kind": "error", "config": config, "impl": "bilevel", "failed": grew},
        {"kind": "time", "config": config, "impl": "bilevel", "failed": "UL step 0: " + grew},
        {"kind": "time", "config": config, "impl": "torchopt", "failed": "RuntimeError: boom"},
    ]
    for report in _benchmark_module("report"):
        lines = report.failures(report.Results({"records": records}))
    assert len(lines) == 2, lines
    ours, theirs = lines
    assert ours.startswith("- bilevel, meta iMAML") and "same LL steps" in ours
    assert "RuntimeError: boom" in theirs and "same LL steps" not in theirs


def test_a_page_merged_from_several_runs_names_them_in_its_reproduce_command():
    """A page written from a full run and a partial re-run gives the command with both files
    in their order (the default command would read the newest file alone)."""
    for report in _benchmark_module("report"):
        merged = report.report_command(["20261204-044906.json", "remeasured.json"])
        alone = report.report_command(None)
    assert merged.startswith(
        "python benchmarks/report.py benchmarks/results/20261204-044906.json "
        "benchmarks/results/remeasured.json"
    )
    assert alone.startswith("python benchmarks/report.py ") and "newest" in alone


def test_the_page_says_how_each_timing_treated_the_heap():
    """Timings taken with the kept heap (``run.py``'s default) and with glibc's trimming
    (``--glibc-heap``, and files written before the choice was recorded) are told apart: a
    page merged from both says how many of each."""
    config = {"suite": "meta", "problem": "meta", "method": "maml", "batch": 4}

    def timing(impl, heap):
        record = {"kind": "time", "config": config, "impl": impl, "median": 1.0}
        return record if heap is None else {**record, "heap": heap}

    for report in _benchmark_module("report"):
        kept = report.heap_of_timings([timing("bilevel", "kept")])
        older = report.heap_of_timings([timing("bilevel", None)])
        mixed = report.heap_of_timings(
            [timing("bilevel", "kept"), timing("floor", "glibc"), timing("boat", None)]
        )
    assert "kept in glibc's heap" in kept and "MALLOC_TRIM_THRESHOLD_" in kept
    assert older == "The timing workers run with glibc's default heap trimming."
    assert mixed.startswith("1 of the 3 timings were taken with freed memory kept")


def test_a_faster_peer_is_quoted_with_its_one_process_retiming(tmp_path, monkeypatch):
    """A configuration where a peer's median is below ours carries same_process.py's ratio
    in one process, and a paragraph sums them up; a re-timing made from other results files
    is not quoted."""
    config = {"suite": "cleaning", "problem": "cleaning", "method": "reverse", "T": 100}

    def timing(impl, median):
        return {"kind": "time", "config": config, "impl": impl, "median": median}

    records = [
        {**timing("bilevel", 1.05), "min": 1.0, "max": 1.1},
        {**timing("boat", 1.0), "min": 0.95, "max": 1.05},
    ]
    same = {
        "command": "python3 benchmarks/same_process.py benchmarks/results/run.json",
        "date": "2026-12-04 21:30 UTC",
        "cpu": "AMD EPYC",
        "git": {"commit": "abc1234", "dirty": False},
        "sources": ["run.json"],
        "cells": [{"config": config, "peer": "boat", "one_process": 0.99, "samples": 8}],
    }
    (tmp_path / "same_process.json").write_text(json.dumps(same))
    for report in _benchmark_module("report"):
        monkeypatch.setattr(report, "RESULTS", tmp_path)
        quoted, _ = report.verdicts(report.Results({"records": records, "sources": ["run.json"]}))
        other, _ = report.verdicts(report.Results({"records": records, "sources": ["new.json"]}))
    assert quoted[0].endswith("in one process, alternated: 0.99)"), quoted[0]
    assert "at most as slow as the peer in 1 of 1" in quoted[-1]
    assert len(other) == 1 and "one process" not in other[0]


def test_a_run_records_its_command_without_the_progress_file():
    """run.py's results name the command that made them, less ``--partial``'s progress file
    (a temporary file, which changes no result and which a page must not name)."""
    for run in _benchmark_module("run"):
        shown = run._shown(["--suites", "meta", "--partial", "/tmp/p.json", "--partial=/tmp/q"])
    assert shown == ["--suites", "meta"]


def test_an_answer_zero_to_round_off_shows_its_norm_not_its_cosine():
    """A hypergradient whose norm is round-off beside the others' (BOAT's DARTS with T > 1:
    2.6e-21 against 8.1e-3) has the direction of round-off: its table cell gives the norm, not
    a cosine that changes from run to run; an answer of ordinary size keeps its cosine."""
    config = {"suite": "regression", "problem": "ridge", "method": "fd", "T": 200, "r": 0.01}

    def error(impl, norm, cosine):
        return {"kind": "error", "config": config, "impl": impl, "norm": norm,
                "error_exact": 1.0, "cosine_exact": cosine}  # fmt: skip

    records = [error("bilevel", 8.1e-3, 0.998), error("boat", 2.6e-21, 0.114)]
    for report in _benchmark_module("method_families_report"):
        page = report.Page({"records": records})
        zero, ours = page.error_cell(config, "boat"), page.error_cell(config, "bilevel")
    assert "zero: norm 2.6e-21" in zero and "cos" not in zero
    assert ours.endswith("<small>cos 0.998</small>")
