"""The benchmark scripts refuse nonsense command-line values before any work: argparse's
usage error (exit status 2), with a message that names the flag. Their defaults still parse.

Only the command lines are parsed here (each script's ``parse_args``): no benchmark runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from local_modules import local_modules

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = (
    "benchopt_driver_jax",
    "benchopt_quadratic",
    "bilevel_curves",
    "bilevel_curves_report",
    "darts_step_budget",
    "fd_many_steps",
    "heap_trim",
    "hyper_cleaning_results",
    "imaml_inner_convergence",
    "memory_long_run",
    "memory_saving_reverse",
    "method_families",
    "method_families_report",
    "objective_overhead",
    "omniglot_diagnosis",
    "online_vs_offline",
    "process_check",
    "report",
    "run",
    "same_process",
    "single_loop_growth",
    "vmap_tasks",
    "worker",
)
# placeholders in the command lines below, replaced by paths (see the ``paths`` fixture)
FILE, MISSING, FOLDER, RUN = "<file>", "<missing>", "<folder>", "<run>"
DRIVER = ["--bench", FOLDER, "--npz", FILE]  # benchopt_driver_jax's required paths

# each script's command line as it needs to be to parse (its required arguments)
VALID = {
    "benchopt_driver_jax": [*DRIVER, "--spec", "{}"],
    "bilevel_curves_report": [FILE],
    "imaml_inner_convergence": [RUN],
    "same_process": [FILE],
    "worker": ["serve", "--impl", "bilevel"],
}

BAD = {
    "benchopt_driver_jax": [
        ([*DRIVER, "--spec", "not json"], "--spec"),
        ([*DRIVER, "--spec", "[1, 2]"], "--spec"),
        (["--bench", FOLDER, "--npz", MISSING, "--spec", "{}"], "--npz"),
        (["--bench", MISSING, "--npz", FILE, "--spec", "{}"], "--bench"),
    ],
    "same_process": [
        ([], "results"),
        ([MISSING], "results"),
        (["--rounds", "0", FILE], "--rounds"),
        (["--seconds", "-1", FILE], "--seconds"),
        (["--deps", MISSING, FILE], "--deps"),
    ],
    "heap_trim": [
        (["--processes", "0"], "--processes"),
        (["--steps", "-1"], "--steps"),
        (["child", "--impl", "boat", "--config", "{}"], "--impl"),
        (["child", "--config", "not json"], "--config"),
        (["child"], "--config"),
    ],
    "benchopt_quadratic": [
        (["--methods", ""], "--methods"),
        (["--methods", "SOBA,Newton"], "--methods"),
        (["--repeats", "0"], "--repeats"),
        (["--every", "0"], "--every"),
        (["--budget", "0"], "--budget"),
        (["--budget", "inf"], "--budget"),
        (["--max-iters", "0"], "--max-iters"),
        (["--stop", "-1"], "--stop"),
        (["--stop", "nan"], "--stop"),
        (["--benchopt-oracle", "sparse"], "--benchopt-oracle"),
        (["--benchopt-oracle", ","], "--benchopt-oracle"),
        (["--scratch", ""], "--scratch"),
        (["--resummarize", "--out", MISSING], "--resummarize"),
        (["--sampler-check", "--out", MISSING], "--sampler-check"),
    ],
    "bilevel_curves": [
        (["--problems", ""], "--problems"),
        (["--problems", "quadratic,mnist"], "--problems"),
        (["--methods", "SOBA,Newton"], "--methods"),
        (["--methods", ","], "--methods"),
        (["--max-minutes", "0"], "--max-minutes"),
        (["--max-minutes", "nan"], "--max-minutes"),
        (["--max-steps", "0"], "--max-steps"),
        (["--cleaning-train", "0"], "--cleaning-train"),
        (["--cleaning-train", "59001"], "--cleaning-train"),
        (["--threads", "0"], "--threads"),
        (["--update", "--out", MISSING], "--update"),
    ],
    "bilevel_curves_report": [
        ([MISSING], "result"),
        ([FILE, "--img", ""], "--img"),
    ],
    "fd_many_steps": [
        (["--n", "0"], "--n"),
        (["--d", "0"], "--d"),
        (["--steps", "0"], "--steps"),
        (["--kappa", "1"], "--kappa"),
        (["--kappa", "2", "0.5"], "--kappa"),
        (["--kappa", "nan"], "--kappa"),
        (["--seeds", "0"], "--seeds"),
        (["--r", "0"], "--r"),
    ],
    "hyper_cleaning_results": [
        (["--sizes", "0"], "--sizes"),
        (["--sizes", "250", "59001"], "--sizes"),
        (["--runs", ""], "--runs"),
        (["--img", ""], "--img"),
    ],
    "imaml_inner_convergence": [
        ([RUN, "--tasks", "0"], "--tasks"),
        ([FOLDER], "run"),
    ],
    "memory_long_run": [
        (["--steps", "100", "--warmup", "200"], "--steps"),
        (["--steps", "150", "--every", "100", "--warmup", "0"], "--steps"),
        (["--steps", "0"], "--steps"),
        (["--every", "0"], "--every"),
        (["--warmup", "-1"], "--warmup"),
        (["--child", "newton"], "--child"),
    ],
    "memory_saving_reverse": [
        (["--steps", "0"], "--steps"),
        (["--steps", "10", "-1"], "--steps"),
        (["--hidden", "0"], "--hidden"),
        (["--repeats", "0"], "--repeats"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--child", "newton"], "--child"),
    ],
    "method_families": [
        (["--impls", ""], "--impls"),
        (["--impls", "bilevel,torchopt"], "--impls"),
        (["--threads", "0"], "--threads"),
        (["--rounds", "0"], "--rounds"),
        (["--target-rounds", "0"], "--target-rounds"),
        (["--methods", ""], "--methods"),
    ],
    "method_families_report": [([MISSING], "source")],
    "objective_overhead": [
        (["--warmup", "-1"], "--warmup"),
        (["--profile-calls", "-1"], "--profile-calls"),
        (["--wait", "-1"], "--wait"),
        (["--wait", "nan"], "--wait"),
    ],
    "omniglot_diagnosis": [
        (["train", "--ways", "1"], "--ways"),
        (["check", "--shots", "0"], "--shots"),
        (["train", "--query", "0"], "--query"),
        (["train", "--hidden", "0"], "--hidden"),
        (["train", "--threads", "0"], "--threads"),
        (["imaml", "--max-minutes", "0"], "--max-minutes"),
        (["train", "--meta-steps", "0"], "--meta-steps"),
        (["train", "--meta-batch", "0"], "--meta-batch"),
        (["train", "--meta-lr", "0"], "--meta-lr"),
        (["train", "--adam-eps=-1e-8"], "--adam-eps"),
        (["train", "--inner-steps", "0"], "--inner-steps"),
        (["train", "--inner-lr", "nan"], "--inner-lr"),
        (["train", "--reg", "0"], "--reg"),
        (["train", "--cg", "0"], "--cg"),
        (["train", "--damping", "-1"], "--damping"),
        (["train", "--log-every", "0"], "--log-every"),
        (["train", "--cos-every", "-1"], "--cos-every"),
        (["train", "--curvature-tasks", "9"], "--curvature-tasks"),
        (["train", "--eval-every", "0"], "--eval-every"),
        (["train", "--val-tasks", "0"], "--val-tasks"),
        (["train", "--save-at", "100"], "--save-at"),
        (["train", "--save", "p.pt", "--save-at", "400"], "--save-at"),
        (["imaml", "--tasks", "0"], "--tasks"),
        (["imaml", "--first-task", "-1"], "--first-task"),
        (["imaml", "--reg", "2", "0"], "--reg"),
        (["imaml", "--cg-steps", "0"], "--cg-steps"),
        (["imaml", "--exact-iters", "0"], "--exact-iters"),
        (["imaml", "--lanczos-steps", "0"], "--lanczos-steps"),
        (["imaml", "--maml-lr", "0"], "--maml-lr"),
        (["spikes", "--cg", "0"], "--cg"),
        (["curvature", "--inner-steps", "0"], "--inner-steps"),
        (["check", "--tasks", "0"], "--tasks"),
    ],
    "online_vs_offline": [
        (["--n", "0"], "--n"),
        (["--d", "0"], "--d"),
        (["--ll-lr", "0"], "--ll-lr"),
        (["--ll-lr", "nan"], "--ll-lr"),
        (["--ll-steps", "0"], "--ll-steps"),
        (["--hyper-every", "0"], "--hyper-every"),
        (["--budget", "0"], "--budget"),
        (["--budget", "100"], "--budget"),  # fewer LL steps than one offline UL step takes
        (["--ll-steps", "5", "--hyper-every", "50", "--budget", "20"], "--budget"),
        (["--ul-lrs", "0.05", "-0.01"], "--ul-lrs"),
    ],
    "darts_step_budget": [
        (["--rounds", "0"], "--rounds"),
    ],
    "process_check": [
        (["--methods", "newton"], "--methods"),
        (["--methods", ""], "--methods"),
        (["--rounds", "0"], "--rounds"),
        (["--request-seconds", "0"], "--request-seconds"),
        (["--request-seconds", "inf"], "--request-seconds"),
    ],
    "report": [([MISSING], "results")],
    "run": [
        (["--impls", "bilevel,jax"], "--impls"),
        (["--suites", ""], "--suites"),
        (["--suites", "regression,nope"], "--suites"),
        (["--only", "ridge("], "--only"),
        (["--threads", "0"], "--threads"),
        (["--rounds", "0"], "--rounds"),
        (["--budget", "0"], "--budget"),
        (["--no-memory", "--memory-only"], "--memory-only"),
        (["--patched", FOLDER], "--patched"),
        (["--annotate", MISSING], "--annotate"),
    ],
    "single_loop_growth": [
        (["--steps", "0"], "--steps"),
    ],
    "vmap_tasks": [
        (["--rounds", "0"], "--rounds"),
        (["--batches", "4", "0"], "--batches"),
        (["--threads", "0"], "--threads"),
    ],
    "worker": [
        (["serve", "--impl", "bilevel", "--threads", "0"], "--threads"),
        (["memory", "--impl", "bilevel", "--steps", "0", "--config", "{}"], "--steps"),
        (["memory", "--impl", "bilevel"], "--config"),
        (["memory", "--impl", "bilevel", "--config", "{"], "--config"),
        (["memory", "--impl", "bilevel", "--config", "3"], "--config"),
    ],
}


@pytest.fixture(scope="module")
def scripts():
    """The scripts of benchmarks/ as modules (see :func:`local_modules.local_modules`)."""
    with local_modules(BENCHMARKS, *SCRIPTS) as modules:
        yield dict(zip(SCRIPTS, modules, strict=True))


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """The placeholders' paths: a file, a missing file, a folder, a run folder."""
    root = tmp_path_factory.mktemp("benchmark_arguments")
    (root / "result.json").write_text("{}")
    (root / "folder").mkdir()
    run = root / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    (run / "best.pt").write_bytes(b"")
    return {
        FILE: str(root / "result.json"),
        MISSING: str(root / "missing.json"),
        FOLDER: str(root / "folder"),
        RUN: str(run),
    }


def _parse(scripts, paths, name: str, argv: list[str]) -> argparse.Namespace:
    return scripts[name].parse_args([paths.get(arg, arg) for arg in argv])


@pytest.mark.parametrize(
    ("name", "argv", "flag"),
    [(name, argv, flag) for name, cases in BAD.items() for argv, flag in cases],
)
def test_a_nonsense_value_is_refused_naming_its_flag(scripts, paths, name, argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        _parse(scripts, paths, name, argv)
    assert stop.value.code == 2  # argparse's usage error, before any work
    error = capsys.readouterr().err.split("error:", 1)[1]  # not the usage, which names all
    assert flag in error, error


def test_every_script_with_a_command_line_parses_it_apart(scripts) -> None:
    """Each script's ``parse_args`` parses and checks its command line, and is tested here
    (but omniglot_results.py's: its one argument, a runs folder, is refused when not one)."""
    with_command_line = {p.stem for p in BENCHMARKS.glob("*.py") if "add_argument" in p.read_text()}
    assert with_command_line - {"omniglot_results"} == set(BAD) == set(SCRIPTS)
    assert all(callable(getattr(module, "parse_args", None)) for module in scripts.values())


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_defaults_parse(scripts, paths, name):
    if name == "omniglot_diagnosis":  # one command line per subcommand
        for command in ("train", "imaml", "spikes", "curvature", "check"):
            assert _parse(scripts, paths, name, [command]).command == command
    else:
        assert isinstance(_parse(scripts, paths, name, VALID.get(name, [])), argparse.Namespace)
