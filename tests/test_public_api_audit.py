"""The public names that DESIGN.md, the README and the docs promise, checked against the code.

Users and outside checks call these names: import paths, argument names, order and defaults,
what the calls return, the diagnostics and state-dict keys, the error types, the commands of
the README. Each check here is one that no other test pins (the snippets of the pages run in
``tests/test_docs.py``, their flags in ``tests/test_docs_claims.py``).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from example_modules import example_module
from problems import ridge, ridge_ll, ridge_ul

import bilevel
from bilevel import BilevelProblem, linalg
from bilevel import ll as ll_package
from bilevel import ul as ul_package
from bilevel.data import resolve_cache_dir
from bilevel.ll import BDA, FixedPointMap, GradientDescent, GradientStep
from bilevel.online import OnlineHypergradient
from bilevel.ul.base import HypergradientCalculator

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
EMPTY = inspect.Parameter.empty

# ------------------------------------------------------------------ signatures and defaults


def parameters(fn: Callable) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def check_signature(
    fn: Callable, leading: list[str], defaults: dict[str, Any] | None = None
) -> None:
    """``fn``'s first parameters are ``leading``, in that order and positional; each name in
    ``defaults`` has that default (``EMPTY``: required)."""
    params = parameters(fn)
    names = [p.name for p in params[: len(leading)]]
    assert names == leading, f"{fn.__qualname__}: leading parameters {names}, documented {leading}"
    for p in params[: len(leading)]:
        assert p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD), (fn.__qualname__, p.name)
    by_name = {p.name: p for p in params}
    for name, default in (defaults or {}).items():
        assert name in by_name, f"{fn.__qualname__} has no argument {name}"
        assert by_name[name].default == default, (
            f"{fn.__qualname__}({name}=...) defaults to {by_name[name].default!r}, "
            f"documented {default!r}"
        )


UL_LEADING = ["ul_objective", "ul_model", "ll_objective", "ll_model"]
CONTRACT = ["validate_data", "validate_target", "auxiliary_model", "train_data", "train_target"]

DOCUMENTED = [
    # DESIGN.md "The runner"; docs/robustness.md (on_nonfinite="raise" is the default)
    (BilevelProblem, ["ll", "ul", "ul_optimizer"], {"ul_optimizer": None, "on_nonfinite": "raise"}),
    (BilevelProblem.hypergradient, ["train", "val"], {}),
    (BilevelProblem.step, ["train", "val"], {}),
    (BilevelProblem.meta_step, ["batch"], {}),
    (BilevelProblem.meta_hypergradient, ["batch"], {}),
    (
        BilevelProblem.run,  # docs/quickstart.md, docs/robustness.md
        ["data", "steps"],
        {"checkpoint": None, "log": None, "progress": True, "checkpoint_seconds": None},
    ),
    # DESIGN.md "Lower level"; README; docs/troubleshooting.md (growth_tolerance 1e-3)
    (
        GradientDescent,
        ["ll_objective", "ll_model", "ul_model", "lr", "iters"],
        {"lr": EMPTY, "iters": EMPTY, "differentiable_steps": None, "growth_tolerance": 1e-3},
    ),
    (GradientDescent.optimize, ["data", "target"], {}),
    # docs/methods.md: FixedPointMap(fixed_point_map, ll_model, ul_model, iters); BDA's example
    (FixedPointMap, ["fixed_point_map", "ll_model", "ul_model", "iters"], {}),
    (
        BDA,
        ["ll_objective", "ll_model", "ul_model", "lr", "iters"],
        {"ul_objective": EMPTY, "alpha": EMPTY, "alpha_decay": EMPTY, "on_growth": "ignore"},
    ),
    # DESIGN.md: Implicit keeps the seed signature; docs/methods.md and troubleshooting.md
    (
        ul_package.Implicit,
        [*UL_LEADING, "ll_learning_rate", "k", "tolerance", "method"],
        {"tolerance": 1e-10, "alpha": None, "damping": 0.0, "stationarity_warning": 0.1},
    ),
    (ul_package.Truncated, [*UL_LEADING, "truncate_iter"], {"truncate_iter": EMPTY}),
    # docs/methods.md: FiniteDifference(r=1e-2), DM(eta="auto"), SOBA(ll_decay=0.4,
    # ul_decay=0.6), SABA(memory_init="full"), StocBiO(neumann_steps=10), AmIGO(v_iters=None),
    # StochasticImplicit's cross="minibatch" "as the paper"
    (ul_package.FiniteDifference, UL_LEADING, {"r": 1e-2}),
    (ul_package.DM, UL_LEADING, {"eta": "auto"}),
    (ul_package.SOBA, UL_LEADING, {"ll_decay": 0.4, "ul_decay": 0.6}),
    (ul_package.SABA, UL_LEADING, {"memory_init": "full"}),
    (ul_package.StocBiO, UL_LEADING, {"neumann_steps": 10}),
    (ul_package.AmIGO, UL_LEADING, {"v_iters": None}),
    (ul_package.StochasticImplicit, UL_LEADING, {"cross": "minibatch"}),
    # docs/online.md
    (OnlineHypergradient, ["ll", "ul", "ul_optimizer", "hyper_every"], {}),
]


@pytest.mark.parametrize(
    ("fn", "leading", "defaults"), DOCUMENTED, ids=[f[0].__qualname__ for f in DOCUMENTED]
)
def test_documented_signatures(fn: Callable, leading: list[str], defaults: dict) -> None:
    check_signature(fn, leading, defaults)


UL_METHODS = [
    getattr(ul_package, name)
    for name in ul_package.__all__
    if inspect.isclass(getattr(ul_package, name))
    and issubclass(getattr(ul_package, name), HypergradientCalculator)
]


@pytest.mark.parametrize("cls", UL_METHODS, ids=lambda c: c.__name__)
def test_every_ul_method_has_the_calculator_contract(cls: type) -> None:
    """DESIGN.md: every calculator is built from ``(ul_objective, ul_model, ll_objective,
    ll_model, ...)`` and has ``compute_gradients(validate_data, validate_target,
    auxiliary_model, train_data, train_target) -> ul_loss`` (the methods that keep state
    refuse the call, but under the contract's names, not ``*args, **kwargs``)."""
    check_signature(cls, UL_LEADING)
    check_signature(cls.compute_gradients, CONTRACT)
    assert len(parameters(cls.compute_gradients)) == len(CONTRACT), cls.__name__
    check_signature(cls.task_gradients, ["ll", "train", "val"])


def test_the_step_map_on_the_methods_page_is_gradient_steps() -> None:
    """docs/methods.md quotes ``bilevel.ll.GradientStep``'s call: its arguments and the
    number of values it returns."""
    text = " ".join((DOCS / "methods.md").read_text().split())
    quoted = re.search(r"`\w+\(([^)]*)\) -> \(([^)]*)\)`\s*\(`bilevel\.ll\.GradientStep`", text)
    assert quoted, "docs/methods.md no longer quotes the step map before bilevel.ll.GradientStep"
    arguments = [a.strip() for a in quoted.group(1).split(",")]
    assert arguments == [p.name for p in parameters(GradientStep.__call__)]
    returned = [r.strip() for r in quoted.group(2).split(",")]
    annotation = str(inspect.signature(GradientStep.__call__).return_annotation)
    items = re.fullmatch(r"tuple\[(.*)\]", annotation.strip("'"))
    assert items and len(returned) == len(items.group(1).split(",")), (returned, annotation)
    assert returned[:3] == ["weights", "opt_state", "loss"]


# ------------------------------------------------------- calls quoted on the pages bind

QUOTED_MODULES = [
    "bilevel",
    "bilevel.ll",
    "bilevel.ll.rules",
    "bilevel.ul",
    "bilevel.data",
    "bilevel.models",
    "bilevel.linalg",
    "bilevel.online",
]


def public_callables() -> dict[str, Callable]:
    found: dict[str, Callable] = {}
    for module_name in QUOTED_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", None) or dir(module):
            obj = getattr(module, name, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith(
                "bilevel"
            ):
                found.setdefault(name, obj)
    return found


def quoted_code(text: str) -> list[tuple[str, bool]]:
    """Python blocks (complete calls) and inline code spans (abbreviated: the leading
    arguments are often left out, so only keywords are checked)."""
    blocks = [(b, True) for b in re.findall(r"```python\n(.*?)```", text, re.S)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return blocks + [(s, False) for s in re.findall(r"`([^`\n]+)`", prose)]


def calls_that_do_not_bind(text: str, names: dict[str, Callable]) -> list[str]:
    wrong = []
    for code, complete in quoted_code(text):
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        defined = {
            n.name if not isinstance(n, ast.Name) else n.id
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.ClassDef)
            or (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = getattr(func, "id", None) or getattr(func, "attr", None)
            if name not in names or name in defined or ast.unparse(func).startswith("torch."):
                continue
            keywords = {k.arg: None for k in node.keywords if k.arg is not None}
            elided = any(
                isinstance(a, ast.Starred) or (isinstance(a, ast.Constant) and a.value is ...)
                for a in node.args
            ) or any(k.arg is None for k in node.keywords)
            signature = inspect.signature(names[name])
            try:
                if complete and not elided:
                    signature.bind(*[None] * len(node.args), **keywords)
                else:
                    signature.bind_partial(**keywords)
            except TypeError as error:
                wrong.append(f"{ast.unparse(node)}: {error}")
    return wrong


def test_the_call_checker_sees_a_wrong_keyword() -> None:
    names = public_callables()
    assert calls_that_do_not_bind("`Truncated(K=10)`", names)
    assert calls_that_do_not_bind("```python\nFixedPointMap(f, a, b)\n```", names)
    assert not calls_that_do_not_bind("`Truncated(truncate_iter=10)`", names)
    assert not calls_that_do_not_bind("`GradientDescent(..., differentiable_steps=0)`", names)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_calls_quoted_on_the_pages_bind_to_the_signatures(page: Path) -> None:
    """Every call of a public class or function that a page quotes uses argument names the
    code has (in a full code block, also the right number of positional arguments)."""
    wrong = calls_that_do_not_bind(page.read_text(), public_callables())
    assert not wrong, f"{page.name}: {wrong}"


# ------------------------------------------------------------- results, keys and errors

SOLVER_KEYS = {"iterations", "residual_norm", "rhs_norm", "converged", "diverged", "alpha"}
SOLVER_KEYS |= {"lambda_max", "ll_grad_norm", "ll_grad_ratio", "ll_contraction"}
SOLVER_KEYS |= {"ll_distance_ratio", "ul_loss"}


def ridge_args(p: Any) -> tuple:
    return ridge_ul, p.ul_model, ridge_ll, p.ll_model


def returning_b(matvec: Callable, b: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.clone() for x in b]


@pytest.mark.parametrize(
    ("method", "alpha"),
    [(m, None) for m in linalg.SOLVERS] + [("neumann", "auto"), (returning_b, None)],
    ids=[*linalg.SOLVERS, "neumann-auto", "callable"],
)
def test_implicit_fills_the_documented_diagnostics(method: Any, alpha: Any) -> None:
    """docs/methods.md, "Solver diagnostics": every name of DESIGN.md's list and a callable
    ``solve(matvec, b) -> x``; ``lambda_max`` is set when estimated (``alpha="auto"``)."""
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=10)
    ul = ul_package.Implicit(*ridge_args(p), k=50, method=method, alpha=alpha)
    grads = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    assert isinstance(grads, list) and [g.shape for g in grads] == [p.ul_model.log_l2.shape]
    d = ul.diagnostics
    assert SOLVER_KEYS <= set(d), SOLVER_KEYS - set(d)
    assert isinstance(d["iterations"], int) and isinstance(d["converged"], bool)
    assert d["residual_norm"] >= 0 and d["rhs_norm"] > 0 and d["diverged"] is False
    if alpha == "auto":
        assert d["lambda_max"] > 0 and d["alpha"] == pytest.approx(1 / d["lambda_max"])
    else:
        assert d["lambda_max"] is None
    assert (d["alpha"] is not None) == (method in ("neumann", "fixed_point"))


def test_a_named_solver_is_a_value_solve_matvec_b_to_x() -> None:
    """DESIGN.md, "The seams": ``solve(matvec, b) -> x`` on lists of tensors, by name."""
    diagonal = [torch.tensor([2.0, 4.0], dtype=torch.float64), torch.tensor([[8.0]]).double()]
    b = [torch.ones(2, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)]
    assert set(linalg.SOLVERS) == {"cg", "neumann", "fixed_point", "normal_cg", "minres"}
    for name in linalg.SOLVERS:
        alpha = 0.2 if name in ("neumann", "fixed_point") else None
        solve = linalg.make_solver(name, iters=200, tolerance=1e-12, alpha=alpha)
        x = solve(lambda v: [d * t for d, t in zip(diagonal, v, strict=True)], b)
        assert isinstance(x, list) and [t.shape for t in x] == [t.shape for t in b]
        for t, d in zip(x, diagonal, strict=True):
            torch.testing.assert_close(t, 1 / d, rtol=1e-9, atol=0)


def test_state_dict_holds_the_documented_keys(tmp_path: Path) -> None:
    """docs/robustness.md, "Nothing lost": the UL model under ``"ul_model"``, the LL model,
    the UL optimizer and scheduler, the method's state, the step counter, the skipped steps
    and the RNG states (torch, Python, NumPy; CUDA where there is one); the file loads with
    ``torch.load(weights_only=True)``; ``run``'s log records carry the step, the losses, the
    diagnostics and the skipped steps."""
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=10)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5)
    ul = ul_package.Implicit(*ridge_args(p))
    problem = BilevelProblem(ll, ul, optimizer, ul_scheduler=scheduler)
    records: list[dict] = []
    path = tmp_path / "checkpoint.pt"
    batches = lambda step: (p.train, p.val)  # noqa: E731
    problem.run(batches, steps=2, checkpoint=path, log=records.append, log_every=1, progress=False)
    state = problem.state_dict()
    documented = {"ul_model", "ll_model", "ul_optimizer", "ul_scheduler", "method", "step"}
    assert documented | {"skipped_steps", "rng"} <= set(state)
    assert state["step"] == 2 and state["skipped_steps"] == 0
    assert {"torch", "python", "numpy"} <= set(state["rng"])
    assert ("cuda" in state["rng"]) == torch.cuda.is_available()
    assert set(state["ul_model"]) == {"log_l2"}
    assert {"ul_model", "ll_model", "step"} <= set(torch.load(path, weights_only=True))
    assert len(records) == 2 and [r["step"] for r in records] == [1, 2]
    assert {"ul_loss", "ll_loss", "skipped_steps", "iterations", "converged"} <= set(records[0])


def test_documented_error_types() -> None:
    """The errors the docs name, at the paths they give: the numerical ones are
    ``FloatingPointError`` (what ``on_nonfinite`` catches), a stop is a ``SystemExit`` with
    status ``128 + signal``."""
    from bilevel.checkpoint import CheckpointError
    from bilevel.distributed import PeerError
    from bilevel.problem import Interrupted

    assert issubclass(ll_package.LowerLevelDivergenceError, FloatingPointError)
    assert issubclass(ul_package.HypergradientDivergenceError, FloatingPointError)
    assert issubclass(CheckpointError, Exception) and issubclass(PeerError, Exception)
    stop = Interrupted(signal.SIGTERM, step=3, checkpoint="c.pt")
    assert isinstance(stop, SystemExit) and stop.code == 143
    assert (stop.signal, stop.step, stop.checkpoint) == (signal.SIGTERM, 3, "c.pt")
    check_signature(
        ll_package.LowerLevelDivergenceError,
        ["message"],
        {"first": None, "last": None, "iters": None, "lambda_max": None, "safe_lr": None},
    )


def test_higher_is_imported_only_in_bilevel_ll() -> None:
    """DESIGN.md: everything that touches ``higher`` lives in ``bilevel.ll``."""
    outside = []
    for path in sorted((ROOT / "bilevel").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            if any(m.split(".")[0] == "higher" for m in modules):
                relative = path.relative_to(ROOT / "bilevel")
                if relative.parts[0] != "ll":
                    outside.append(str(relative))
    assert not outside, outside


def test_cache_folder_comes_from_the_argument_bilevel_cache_or_the_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """bilevel.data's docstring: ``cache_dir=``, ``BILEVEL_CACHE`` or ``~/.cache/bilevel``."""
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("BILEVEL_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "bilevel"


# ------------------------------------------------------------ the README's commands


def make_dry_run(target: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", target, "PYTHON=python"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip() and line[0] != "#"]


def torch_pin(text: str) -> str:
    pins = set(re.findall(r"torch==([\w.+]+)", text))
    assert len(pins) == 1, pins
    return pins.pop()


def test_readme_commands_are_the_makefiles() -> None:
    """README: ``make quickstart`` (the main job) and ``make test`` (ruff lint and format,
    the docs in strict mode, pytest in two processes) install first, torch pinned to
    constraints.txt's."""
    readme = (ROOT / "README.md").read_text()
    assert "make quickstart" in readme and "make test" in readme
    pin = torch_pin((ROOT / "constraints.txt").read_text())
    assert torch_pin((ROOT / "Makefile").read_text()) == pin
    assert torch_pin(readme) == pin
    quickstart = make_dry_run("quickstart")
    assert "install" in quickstart[0] and f"torch=={pin}" in quickstart[0]
    assert "-c constraints.txt" in quickstart[1] and '-e ".[dev]"' in quickstart[1]
    assert quickstart[-1] == "python examples/quickstart.py"
    test = make_dry_run("test")
    assert test[:2] == quickstart[:2]
    assert test[2:] == [
        "python -m ruff check .",
        "python -m ruff format --check .",
        "python -m mkdocs build --strict --site-dir site",
        "python -m pytest -q -n 2 --dist loadfile",
    ]


EXAMPLE_COMMAND = re.compile(r"examples/(\w+)\.py((?:[ \t]+[^\s`|;&#)]+)*)")


def quoted_example_commands() -> list[tuple[str, str, list[str]]]:
    """``(page, script, argv)`` of each example command line quoted on a page, without the
    ones that hold placeholders (``...``, ``$VAR``, ``<x>``, ``NAME``)."""
    found = []
    for page in PAGES:
        text = re.sub(r"\\\n\s*", " ", page.read_text())
        for line in text.splitlines():
            for match in EXAMPLE_COMMAND.finditer(line.split(" #")[0]):
                script, argv = match.group(1), shlex.split(match.group(2))
                if script.startswith("_") or any(
                    a in ("...", "--help") or "$" in a or "<" in a or re.fullmatch(r"[A-Z_]+", a)
                    for a in argv
                ):
                    continue
                found.append((page.name, script, argv))
    return found


def test_quoted_example_commands_parse() -> None:
    """Each example command quoted in the README and the docs is accepted by the script's
    own parser: its flags and their values (``--method implicit-cg``, ``metasgd``, ...)."""
    commands = quoted_example_commands()
    assert {"README.md"} < {page for page, _, _ in commands} and len(commands) > 20
    wrong = []
    for script in sorted({s for _, s, _ in commands}):
        with example_module(script) as module:
            for page, _, argv in [c for c in commands if c[1] == script]:
                errors = io.StringIO()
                try:
                    with contextlib.redirect_stderr(errors):
                        module.parse_args(argv)
                except SystemExit:
                    wrong.append(f"{page}: {script}.py {shlex.join(argv)}: {errors.getvalue()}")
    assert not wrong, wrong


def test_version_is_the_packages() -> None:
    setup = (ROOT / "setup.py").read_text()
    assert f'version="{bilevel.__version__}"' in setup
